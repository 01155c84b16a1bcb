"""attention="sdpa": conformance, masks against eager float64 attention, the memory budget."""
from __future__ import annotations

import pytest
import torch

from fastllm.core.request import Batch
from fastllm.stages.attention.sdpa import SDPAAttention
from fastllm.stages.base import KVSpec
from fastllm.testing import check_attention, eager_attention, fake_request


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(6, 2, 16), (4, 4, 8), (5, 1, 24), (8, 2, 64)])
def test_conformance(heads, kv_heads, head_dim):
    check_attention(SDPAAttention(), num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_conformance_half(dtype):
    check_attention(SDPAAttention(), dtype=dtype)


def test_conformance_with_a_memory_budget():
    check_attention(SDPAAttention(kv_cache_memory=100 * 2 * 2 * 2 * 16 * 4))


def _backend(layers=1, heads=6, kv_heads=2, head_dim=8, memory=None) -> SDPAAttention:
    b = SDPAAttention(kv_cache_memory=memory)
    b.setup(KVSpec(layers, heads, kv_heads, head_dim, torch.float32, torch.device("cpu"), 0.3))
    return b


def _step(b: SDPAAttention, feed: list[tuple[object, int]], q, k, v) -> torch.Tensor:
    batch = Batch([r for r, _ in feed], [n for _, n in feed])
    out = b.forward(0, q, k, v, b.plan(batch))
    for r, n in feed:
        r.num_computed += n
    return out


def test_chunk_after_cache_sees_the_prefix_and_only_earlier_tokens():
    # one 13-token sequence in three chunks (5, 1, 7) equals eager attention over all 13 at once
    torch.manual_seed(0)
    b, r = _backend(), fake_request("s", list(range(13)))
    b.allocate("s", 13)
    q, k, v = torch.randn(13, 6, 8), torch.randn(13, 2, 8), torch.randn(13, 2, 8)
    outs = [_step(b, [(r, n)], q[a:a + n], k[a:a + n], v[a:a + n]) for a, n in ((0, 5), (5, 1), (6, 7))]
    ref = eager_attention(q, k, v, 0, 0.3)
    torch.testing.assert_close(torch.cat(outs).double(), ref, atol=1e-5, rtol=1e-5)


def test_gqa_head_groups_share_their_kv_head():
    # query heads 0-2 read kv head 0, heads 3-5 kv head 1: equal queries in one group agree
    b, r = _backend(), fake_request("s", list(range(4)))
    b.allocate("s", 4)
    q = torch.randn(4, 1, 8).expand(4, 6, 8).contiguous()
    out = _step(b, [(r, 4)], q, torch.randn(4, 2, 8), torch.randn(4, 2, 8))
    torch.testing.assert_close(out[:, 0], out[:, 2])
    torch.testing.assert_close(out[:, 3], out[:, 5])
    assert not torch.allclose(out[:, 0], out[:, 3])


def test_flat_batch_of_odd_lengths_matches_each_sequence_alone():
    torch.manual_seed(1)
    b = _backend()
    lens = [3, 1, 7]
    reqs = [fake_request(f"s{i}", list(range(n))) for i, n in enumerate(lens)]
    for r, n in zip(reqs, lens):
        b.allocate(r.id, n)
    q, k, v = torch.randn(11, 6, 8), torch.randn(11, 2, 8), torch.randn(11, 2, 8)
    out = _step(b, list(zip(reqs, lens)), q, k, v)
    o = 0
    for n in lens:
        ref = eager_attention(q[o:o + n], k[o:o + n], v[o:o + n], 0, 0.3)
        torch.testing.assert_close(out[o:o + n].double(), ref, atol=1e-5, rtol=1e-5)
        o += n


def test_memory_budget_bounds_can_allocate():
    per_token = 2 * 2 * 2 * 8 * 4  # K and V, 2 layers, 2 kv heads, head_dim 8, fp32
    b = _backend(layers=2, memory=10 * per_token + per_token // 2)
    assert b.capacity_tokens == 10
    assert b.can_allocate(10) and not b.can_allocate(11)
    b.allocate("a", 6)
    assert b.can_allocate(4) and not b.can_allocate(5)
    b.allocate("b", 4)
    assert not b.can_allocate(1)
    b.free("a")
    assert b.can_allocate(6) and not b.can_allocate(7)
    b.free("a")  # freeing twice gives nothing back twice
    assert not b.can_allocate(7)
    b.allocate("b", 2)  # allocating a sequence again replaces its cache
    assert b.can_allocate(8) and not b.can_allocate(9)


def test_no_budget_means_no_limit():
    b = _backend()
    assert b.capacity_tokens is None and b.can_allocate(10 ** 9)
