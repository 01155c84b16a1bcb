"""The few-token int8 tensor-core GEMM (fastllm.kernels.cuda_few) against a float64 matmul, on odd
shapes, with and without split-K (CUDA only: it is CUDA C, built with nvcc on first use)."""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA kernel")


@pytest.fixture(scope="module")
def few():
    from fastllm.kernels import cuda_few

    if not cuda_few.available(torch.zeros(1, device="cuda")):
        pytest.skip("the few-token GEMM did not build or load here (see the log)")
    return cuda_few


@pytest.mark.parametrize("M", [1, 2, 7, 8, 13, 16, 17, 31, 33, 64])
@pytest.mark.parametrize("N, K, bias", [(37, 64, True), (200, 576, False), (4096, 4096, True), (1000, 1536, False)])
@pytest.mark.parametrize("splits", [None, 1, 3])
def test_against_float64(few, M, N, K, bias, splits):
    g = torch.Generator(device="cpu").manual_seed(M * 1000 + N + K)
    q = torch.randint(-128, 128, (N, K), generator=g, dtype=torch.int8).cuda()
    s = (torch.rand(N, generator=g) * 0.02 + 1e-3).cuda()
    x = torch.randn(M, K, generator=g).to(torch.bfloat16).cuda()
    b = torch.randn(N, generator=g).to(torch.bfloat16).cuda() if bias else None
    y = few.gemm_few_int8(x, q, s, b, splits=splits)
    ref = (x.double() @ q.double().T) * s.double() + (b.double() if bias else 0)
    assert y.shape == (M, N) and y.dtype == torch.bfloat16
    err = ((y.double() - ref).norm() / ref.norm()).item()
    assert err < 4e-3, err  # bf16 output rounding
    # the same bits on a second call (split-K sums in a fixed order), counters back at zero
    assert torch.equal(few.gemm_few_int8(x, q, s, b, splits=splits), y)
    torch.cuda.synchronize()
    assert all(not c.any() for c in few._counters.values())


def test_rejects(few):
    q = torch.zeros(64, 96, dtype=torch.int8, device="cuda")
    with pytest.raises(ValueError, match="K % 64"):
        few.gemm_few_int8(torch.zeros(2, 96, dtype=torch.bfloat16, device="cuda"), q, torch.ones(64, device="cuda"))
    q = torch.zeros(64, 128, dtype=torch.int8, device="cuda")
    with pytest.raises(ValueError, match="M <= 64"):
        few.gemm_few_int8(torch.zeros(65, 128, dtype=torch.bfloat16, device="cuda"), q, torch.ones(64, device="cuda"))
