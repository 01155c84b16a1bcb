"""The batch-1 GEMV against a float64 matmul, on odd shapes (interpreted on the CPU)."""
from __future__ import annotations

import importlib
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before triton loads (tests/conftest.py does it too)
pytest.importorskip("triton")
DEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module")
def gemv():
    return importlib.import_module("fastllm.kernels.gemv")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N, K, bias", [(37, 300, False), (64, 1024, True), (5, 1100, True), (129, 77, False)])
@pytest.mark.parametrize("cfg", [0, 3, 8])  # rows per program and tile widths that do and do not divide the shape
def test_gemv_matches_float64(gemv, dtype, N, K, bias, cfg):
    w = torch.randn(N, K, dtype=dtype, device=DEV)
    x = torch.randn(1, K, dtype=dtype, device=DEV)
    b = torch.randn(N, dtype=dtype, device=DEV) if bias else None
    out = gemv.gemv(x, w, b, config=gemv.CONFIGS[cfg])
    ref = x.double() @ w.double().T + (b.double() if bias else 0)
    err = ((out.double() - ref).norm() / ref.norm()).item()
    assert out.shape == (1, N) and out.dtype == dtype and not out.isnan().any()
    assert err < (1e-5 if dtype == torch.float32 else 1e-2), err


def test_gemv_reads_a_strided_weight_view(gemv):
    full = torch.randn(50, 96, device=DEV)
    w = full[:, :64]  # rows 96 apart: a slice of a fused weight
    x = torch.randn(64, device=DEV)
    out = gemv.gemv(x, w, config=gemv.CONFIGS[1])
    torch.testing.assert_close(out, (x.double() @ w.double().T).float(), rtol=1e-5, atol=1e-4)
