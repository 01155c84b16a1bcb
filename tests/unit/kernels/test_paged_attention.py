"""Paged-KV Triton kernels vs the float64 torch reference: on CUDA, else in Triton's CPU interpreter."""
from __future__ import annotations

import importlib
import os

import pytest
import torch
import torch.nn.functional as F

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    # Triton reads TRITON_INTERPRET when a kernel is decorated: set it before triton and the module load.
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")
pa = importlib.import_module("fastllm.kernels.paged_attention")
if DEVICE == "cpu" and type(pa._prefill_kernel).__name__ != "InterpretedFunction":
    pytest.skip("fastllm.kernels.paged_attention was imported before TRITON_INTERPRET was set",
                allow_module_level=True)

TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


def make_case(heads, kv_heads, head_dim, block_size, dtype, seq_lens, query_lens, seed=0):
    """Random cache with shuffled block tables; q for query_lens[b] tokens ending at seq_lens[b]."""
    g = torch.Generator().manual_seed(seed)
    max_blocks = max(-(-n // block_size) for n in seq_lens) + 1
    num_blocks = len(seq_lens) * max_blocks + 3
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=g).to(dtype)
    block_tables = torch.randperm(num_blocks, generator=g)[:len(seq_lens) * max_blocks]
    cu = torch.tensor([0] + query_lens).cumsum(0)
    q = torch.randn(int(cu[-1]), heads, head_dim, generator=g).to(dtype)
    to = dict(device=DEVICE)
    return dict(q=q.to(**to), k_cache=k_cache.to(**to), v_cache=v_cache.to(**to),
                block_tables=block_tables.view(len(seq_lens), max_blocks).to(torch.int32).to(**to),
                cu_seqlens_q=cu.to(torch.int32).to(**to), seq_lens=torch.tensor(seq_lens, dtype=torch.int32, **to),
                scale=head_dim ** -0.5)


def assert_close(out, ref, dtype):
    assert not out.isnan().any(), "an output element was left unwritten (NaN poison) or is NaN"
    tol = TOL[dtype]
    torch.testing.assert_close(out.float(), ref.float(), rtol=tol, atol=tol)


def test_reference_matches_sdpa():
    # Contiguous blocks, one sequence with a cached prefix of 3: the reference is plain causal attention.
    c = make_case(4, 2, 16, 4, torch.float32, [9], [6])
    c["block_tables"] = torch.arange(c["block_tables"].shape[1], dtype=torch.int32, device=DEVICE)[None]
    ref = pa.reference_attention(**c)
    k = c["k_cache"].flatten(0, 1)[:9].transpose(0, 1)  # [KVH, 9, D]
    v = c["v_cache"].flatten(0, 1)[:9].transpose(0, 1)
    mask = torch.arange(9, device=DEVICE)[None, :] <= torch.arange(3, 9, device=DEVICE)[:, None]
    want = F.scaled_dot_product_attention(c["q"].transpose(0, 1), k, v, attn_mask=mask, scale=c["scale"],
                                          enable_gqa=True).transpose(0, 1)
    torch.testing.assert_close(ref, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_store_kv_skips_padding_slots(dtype):
    c = make_case(4, 2, 80, 4, dtype, [8], [1])
    k_cache, v_cache = c["k_cache"], c["v_cache"]
    before_k, before_v = k_cache.clone(), v_cache.clone()
    k = torch.randn(5, 2, 80, device=DEVICE).to(dtype)
    v = torch.randn(5, 2, 80, device=DEVICE).to(dtype)
    slots = torch.tensor([13, -1, 2, 21, -1], dtype=torch.int64, device=DEVICE)
    pa.store_kv(k, v, k_cache, v_cache, slots)
    keep = torch.ones(k_cache.shape[0] * k_cache.shape[1], dtype=torch.bool, device=DEVICE)
    keep[slots[slots >= 0]] = False
    for cache, before, new in ((k_cache, before_k, k), (v_cache, before_v, v)):
        rows = cache.flatten(0, 1)
        assert torch.equal(rows[slots[slots >= 0]], new[slots >= 0])
        assert torch.equal(rows[keep], before.flatten(0, 1)[keep])


def test_store_kv_strided_input():
    # k, v as column slices of one fused qkv output [T, (H + 2 KVH) * D].
    c = make_case(2, 2, 64, 16, torch.float32, [4], [1])
    qkv = torch.randn(3, 6, 64, device=DEVICE)
    k, v = qkv[:, 2:4], qkv[:, 4:6]
    slots = torch.tensor([0, 17, 5], device=DEVICE)
    pa.store_kv(k, v, c["k_cache"], c["v_cache"], slots)
    assert torch.equal(c["k_cache"].flatten(0, 1)[slots], k)
    assert torch.equal(c["v_cache"].flatten(0, 1)[slots], v)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,kv_heads,head_dim", [(6, 2, 64), (4, 4, 80), (3, 1, 32)])
def test_rope_store_kv_equals_rotary_then_store(dtype, heads, kv_heads, head_dim):
    from fastllm.models.llama import apply_rotary

    c = make_case(heads, kv_heads, head_dim, 4, dtype, [8], [1])
    k_cache, v_cache = c["k_cache"], c["v_cache"]
    before_k, before_v = k_cache.clone(), v_cache.clone()
    T = 5
    qkv = torch.randn(T, heads + 2 * kv_heads, head_dim, device=DEVICE).to(dtype)  # one fused projection
    qk, v = qkv[:, :heads + kv_heads], qkv[:, heads + kv_heads:]
    k_in = qk[:, heads:].clone()
    positions = torch.tensor([0, 7, 3, 1000, 42], device=DEVICE)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, device=DEVICE).float() / head_dim))
    n = k_cache.shape[0] * k_cache.shape[1]
    slots = torch.tensor([n - 1, -1, 2, n // 2, 5], dtype=torch.int64, device=DEVICE)
    # reference: the model's torch rotary in float64, then a plain store
    freqs = (positions[:, None].float() * inv_freq[None, :]).double()  # angles in fp32, as HF computes them
    emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]
    want = apply_rotary(qk.double(), 0.9 * emb.cos(), 0.9 * emb.sin())
    pa.rope_store_kv(qk, v, k_cache, v_cache, slots, positions, inv_freq, 0.9, heads)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(qk[:, :heads].double(), want[:, :heads], **tol)  # q rotated in place
    assert torch.equal(qk[:, heads:], k_in)  # k itself is left as it was
    stored = slots >= 0
    rows_k, rows_v = k_cache.flatten(0, 1), v_cache.flatten(0, 1)
    torch.testing.assert_close(rows_k[slots[stored]].double(), want[stored, heads:], **tol)
    assert torch.equal(rows_v[slots[stored]], v[stored])
    keep = torch.ones(rows_k.shape[0], dtype=torch.bool, device=DEVICE)
    keep[slots[stored]] = False
    assert torch.equal(rows_k[keep], before_k.flatten(0, 1)[keep])
    assert torch.equal(rows_v[keep], before_v.flatten(0, 1)[keep])


SHAPES = [  # heads, kv_heads, head_dim, block_size, dtype: GQA and MHA, head_dim padded or not
    (h, kvh, d, bs, dtype) for h, kvh in ((6, 2), (4, 4)) for d in (64, 80) for bs in (4, 16)
    for dtype in (torch.float32, torch.bfloat16)]
# A wide group (20 query heads per kv head) pads the dot's M dim to 32 and splits prefill tiles unevenly.
CASES = SHAPES + [(20, 1, 64, 16, torch.bfloat16)]


@pytest.mark.parametrize("heads,kv_heads,head_dim,block_size,dtype", CASES)
def test_paged_decode(heads, kv_heads, head_dim, block_size, dtype):
    lens = [1, 5, 17, 40, 0]  # the last row is CUDA-graph padding
    c = make_case(heads, kv_heads, head_dim, block_size, dtype, lens, [1] * len(lens))
    out = torch.full_like(c["q"], float("nan"))
    pa.paged_decode(c["q"], c["k_cache"], c["v_cache"], c["block_tables"], c["seq_lens"], c["scale"], out)
    assert_close(out, pa.reference_attention(**c), dtype)
    assert torch.equal(out[-1], torch.zeros_like(out[-1]))


@pytest.mark.parametrize("num_splits", [1, 3, 8])
@pytest.mark.parametrize("heads,kv_heads,head_dim,block_size,dtype", [
    (6, 2, 64, 16, torch.float32), (6, 2, 64, 4, torch.bfloat16), (4, 4, 80, 16, torch.bfloat16),
    (20, 1, 64, 16, torch.bfloat16)])
def test_paged_decode_rope_equals_rope_store_then_decode(heads, kv_heads, head_dim, block_size, dtype, num_splits):
    from fastllm.models.llama import apply_rotary

    # Sequence lengths after this step: 40 keys cross a 32-key tile with one split; the last row is
    # CUDA-graph padding (0 keys, slot -1). The new keys' cache rows hold stale random values.
    lens = [1, 5, 17, 40, 0]
    c = make_case(heads, kv_heads, head_dim, block_size, dtype, lens, [1] * len(lens), seed=3)
    B, H, D = len(lens), heads, head_dim
    qkv = torch.randn(B, H + 2 * kv_heads, D, device=DEVICE).to(dtype)  # one fused projection's output
    qk, v = qkv[:, :H + kv_heads], qkv[:, H + kv_heads:]
    qk_before = qk.clone()
    tables = c["block_tables"].long()
    slots = torch.tensor([int(tables[b, (L - 1) // block_size]) * block_size + (L - 1) % block_size if L else -1
                          for b, L in enumerate(lens)], device=DEVICE)
    positions = torch.tensor([max(L - 1, 0) for L in lens], device=DEVICE)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, D, 2, device=DEVICE).float() / D))
    # reference: the model's torch rotary in float64, the rotated k and v stored, float64 attention
    freqs = (positions[:, None].float() * inv_freq[None, :]).double()
    emb = torch.cat((freqs, freqs), dim=-1)[:, None, :]
    rotated = apply_rotary(qk.double(), 0.9 * emb.cos(), 0.9 * emb.sin()).to(dtype)
    k_want, v_want = c["k_cache"].clone(), c["v_cache"].clone()
    stored = slots >= 0
    k_want.flatten(0, 1)[slots[stored]] = rotated[stored, H:]
    v_want.flatten(0, 1)[slots[stored]] = v[stored]
    ref = pa.reference_attention(rotated[:, :H], k_want, v_want, c["block_tables"], c["cu_seqlens_q"],
                                 c["seq_lens"], c["scale"])

    out = torch.full((B, H, D), float("nan"), dtype=dtype, device=DEVICE)
    scratch = pa.decode_scratch(B + 2, H, D, num_splits, DEVICE).fill_(float("nan"))
    pa.paged_decode_rope(qk, v, c["k_cache"], c["v_cache"], c["block_tables"], c["seq_lens"], slots, positions,
                         inv_freq, 0.9, c["scale"], out, num_splits=num_splits, scratch=scratch)
    assert_close(out, ref, dtype)
    assert torch.equal(out[-1], torch.zeros_like(out[-1]))
    assert torch.equal(qk, qk_before), "paged_decode_rope changed its qk input"
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(c["k_cache"].double(), k_want.double(), **tol)  # new rows rotated, the rest kept
    assert torch.equal(c["v_cache"], v_want)


def test_paged_decode_rope_rejects_odd_shapes():
    c = make_case(4, 2, 64, 16, torch.float32, [3], [1])
    qk = torch.zeros(1, 6, 64, device=DEVICE)
    args = (c["k_cache"], c["v_cache"], c["block_tables"], c["seq_lens"], torch.zeros(1, dtype=torch.long,
            device=DEVICE), torch.zeros(1, device=DEVICE), torch.ones(32, device=DEVICE), 1.0, 0.125)
    with pytest.raises(ValueError, match="qk must be"):  # v with the wrong head count
        pa.paged_decode_rope(qk, torch.zeros(1, 4, 64, device=DEVICE), *args, torch.empty(1, 4, 64, device=DEVICE))
    with pytest.raises(ValueError, match="qk must be"):  # out with the kv heads too
        pa.paged_decode_rope(qk, torch.zeros(1, 2, 64, device=DEVICE), *args, torch.empty(1, 6, 64, device=DEVICE))


@pytest.mark.parametrize("num_splits", [1, 3])
def test_paged_decode_preallocated_scratch(num_splits):
    c = make_case(6, 2, 64, 16, torch.float32, [40, 0, 7], [1, 1, 1])
    scratch = pa.decode_scratch(8, 6, 64, num_splits, DEVICE).fill_(float("nan"))  # larger than the batch
    out = torch.full_like(c["q"], float("nan"))
    pa.paged_decode(c["q"], c["k_cache"], c["v_cache"], c["block_tables"], c["seq_lens"], c["scale"], out,
                    num_splits=num_splits, scratch=scratch)
    assert_close(out, pa.reference_attention(**c), torch.float32)
    assert torch.equal(out[1], torch.zeros_like(out[1]))


def test_paged_decode_rejects_wrong_scratch():
    c = make_case(4, 4, 64, 16, torch.float32, [3], [1])
    with pytest.raises(ValueError, match="scratch"):
        pa.paged_decode(c["q"], c["k_cache"], c["v_cache"], c["block_tables"], c["seq_lens"], c["scale"],
                        torch.empty_like(c["q"]), scratch=pa.decode_scratch(1, 4, 64, 4, DEVICE))


@pytest.mark.parametrize("heads,kv_heads,head_dim,block_size,dtype", CASES)
def test_paged_prefill_with_cached_prefix(heads, kv_heads, head_dim, block_size, dtype):
    # A full prompt, a chunk after a cached prefix, a decode row, an idle sequence, a chunk of 3 after 37.
    seq_lens, query_lens = [17, 12, 1, 7, 40], [17, 5, 1, 0, 3]
    c = make_case(heads, kv_heads, head_dim, block_size, dtype, seq_lens, query_lens)
    out = torch.full_like(c["q"], float("nan"))
    pa.paged_prefill(c["q"], c["k_cache"], c["v_cache"], c["block_tables"], c["cu_seqlens_q"], c["seq_lens"],
                     c["scale"], out, max_query_len=17)
    assert_close(out, pa.reference_attention(**c), dtype)


def test_paged_prefill_crosses_tiles():
    # 70 queries with group 3 span 4 query tiles (21 tokens each) and two 64-key tiles, after 30 cached keys.
    c = make_case(6, 2, 64, 16, torch.float32, [100], [70], seed=1)
    out = torch.full_like(c["q"], float("nan"))
    pa.paged_prefill(c["q"], c["k_cache"], c["v_cache"], c["block_tables"], c["cu_seqlens_q"], c["seq_lens"],
                     c["scale"], out, max_query_len=70)
    assert_close(out, pa.reference_attention(**c), torch.float32)


def test_prefill_decode_rows_match_paged_decode():
    c = make_case(6, 2, 64, 4, torch.float32, [1, 23, 40], [1, 1, 1])
    out_p, out_d = torch.empty_like(c["q"]), torch.empty_like(c["q"])
    pa.paged_prefill(c["q"], c["k_cache"], c["v_cache"], c["block_tables"], c["cu_seqlens_q"], c["seq_lens"],
                     c["scale"], out_p, max_query_len=1)
    pa.paged_decode(c["q"], c["k_cache"], c["v_cache"], c["block_tables"], c["seq_lens"], c["scale"], out_d)
    torch.testing.assert_close(out_p, out_d, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(DEVICE != "cuda", reason="sizes splits by the GPU's SM count")
def test_decode_num_splits_fills_the_gpu():
    splits = [pa.decode_num_splits(b, 8) for b in (1, 8, 64, 256, 4096)]
    assert all(1 <= s <= 32 and s & (s - 1) == 0 for s in splits)
    assert splits == sorted(splits, reverse=True) and splits[0] == 32 and splits[-1] == 1
