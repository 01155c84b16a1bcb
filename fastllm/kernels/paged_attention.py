"""Triton kernels over a paged KV cache, and the torch reference they are tested against.

Cache layout, per layer: k_cache, v_cache [num_blocks, block_size, KVH, D], block_size a power of
two. Token t of a sequence lives in block block_table[b, t // block_size], row t % block_size;
its slot id is block * block_size + row.

- store_kv: write new K/V rows into their slots (slot -1 is skipped: CUDA-graph padding);
  rope_store_kv: RoPE of q (in place) and k, and the store of k and v, in one launch (both in
  fastllm.kernels.kv_store, reached through this module too).
- paged_decode: one query per sequence, two-stage split-K (flash-decoding), graph-safe;
  paged_decode_rope: the same with rope_store_kv's work inside (decode steps of the model; its
  kernel in fastllm.kernels.decode_rope).
- paged_prefill: varlen causal attention of new tokens against the cache (chunked prefill,
  prefix-cache hits and decode rows in one launch).
- reference_attention: float64 torch reference of the same semantics (tests, slow CPU path).

Triton is imported by these modules, not by `import fastllm`. The kernels read TRITON_INTERPRET when this
module is imported, so set it first to run them on the CPU.
"""
from __future__ import annotations

import math

import torch

# store_kv and rope_store_kv live in kv_store; backends call every kernel through this module
from .kv_store import _check_cache, _jit, rope_store_kv, store_kv, tl, triton  # noqa: F401
# the fused RoPE-and-decode kernel (paged_decode_rope's) lives in decode_rope
from .decode_rope import _decode_rope_split_kernel
from .launch import pdl, pdl_wait

LOG2E = 1.4426950408889634
# Tiles (scripts/check_kernels.py --sweep, H200, Llama shapes, bf16): decode BLOCK_N 32 / 4 warps was
# best or tied among 16/32/64 x 2/4 warps; prefill 64x64 / 4 warps / 2 stages was within ~5% of
# 128-row tiles with 3 stages and compiles faster.
DECODE_BLOCK_N, DECODE_WARPS, DECODE_STAGES = 32, 4, 2
PREFILL_BLOCK_M, PREFILL_BLOCK_N, PREFILL_WARPS, PREFILL_STAGES = 64, 64, 4, 2


@_jit
def _attend_tile(acc, l_i, m_i, q, k_cache_ptr, v_cache_ptr, table_ptr, n0, key_end, qpos, qk_scale,
                 head_off, stride_cb, stride_cr, offs_d, mask_d,
                 BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                 DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    # One online-softmax step over keys n0 .. n0+BLOCK_N (those < key_end; with CAUSAL, <= qpos
    # of each row). q: [M, BLOCK_D]; acc: [M, BLOCK_D] fp32; l_i, m_i: [M] (log2 domain).
    pos = n0 + tl.arange(0, BLOCK_N)
    mask_n = pos < key_end
    block = tl.load(table_ptr + pos // BLOCK_SIZE, mask=mask_n, other=0).to(tl.int64)
    rows = block * stride_cb + (pos % BLOCK_SIZE).to(tl.int64) * stride_cr + head_off  # [N]
    kv_mask = mask_n[:, None] & mask_d[None, :]
    k = tl.load(k_cache_ptr + rows[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)  # [N, D]
    if UPCAST_DOT:
        q, k = q.to(tl.float32), k.to(tl.float32)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # [M, N]
    visible = mask_n[None, :]
    if CAUSAL:
        visible = visible & (pos[None, :] <= qpos[:, None])
    s = tl.where(visible, s * qk_scale, float("-inf"))  # qk_scale = scale * log2(e)
    # A row sees some key of its first tile, so m_i is finite from then on: no inf - inf.
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    v = tl.load(v_cache_ptr + rows[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
    if UPCAST_DOT:
        v = v.to(tl.float32)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, l_i, m_new


@_jit
def _decode_split_kernel(q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr, scratch_ptr,
                         qk_scale, num_splits,
                         stride_qb, stride_qh, stride_cb, stride_cr, stride_ch, stride_bt,
                         stride_sb, stride_sh, stride_ss,
                         GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                         BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                         DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr, USE_PDL: tl.constexpr):
    # Grid (B, KVH, num_splits): the GROUP query heads of one kv head over one slice of keys.
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    # seq_lens is written before the step's first kernel, which every earlier kernel waited for
    seq_len = tl.load(seq_lens_ptr + b)
    pdl_wait(USE_PDL, False)  # q and the new keys come from the kernel before (see fastllm.kernels.launch)
    # On the device, so the grid stays graph-safe. (Not tl.cdiv: a @jit helper that the CPU
    # interpreter cannot call when triton was imported before TRITON_INTERPRET was set.)
    per_split = (seq_len + num_splits - 1) // num_splits
    start = split * per_split
    end = tl.minimum(start + per_split, seq_len)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    mask_g = offs_g < GROUP
    mask_d = offs_d < HEAD_DIM
    heads = kvh * GROUP + offs_g
    q = tl.load(q_ptr + b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=mask_g[:, None] & mask_d[None, :], other=0.0)

    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    table_ptr = block_tables_ptr + b.to(tl.int64) * stride_bt
    for n0 in range(start, end, BLOCK_N):
        acc, l_i, m_i = _attend_tile(acc, l_i, m_i, q, k_cache_ptr, v_cache_ptr, table_ptr, n0, end, offs_g,
                                     qk_scale, kvh * stride_ch, stride_cb, stride_cr, offs_d, mask_d,
                                     BLOCK_SIZE, BLOCK_N, False, DOT_PRECISION, UPCAST_DOT)
    if USE_PDL == 1:  # (USE_PDL = 2 let the next kernel launch before the wait)
        tl.extra.cuda.gdc_launch_dependents()

    # An empty split (seq_len 0, or fewer keys than splits) stores o = 0, lse = -inf.
    nonempty = l_i > 0.0
    o = acc / tl.where(nonempty, l_i, 1.0)[:, None]
    lse = tl.where(nonempty, m_i + tl.log2(tl.where(nonempty, l_i, 1.0)), float("-inf"))
    dst = scratch_ptr + b.to(tl.int64) * stride_sb + heads * stride_sh + split * stride_ss  # [G]
    tl.store(dst[:, None] + offs_d[None, :], o, mask=mask_g[:, None] & mask_d[None, :])
    tl.store(dst + HEAD_DIM, lse, mask=mask_g)


@_jit
def _decode_merge_kernel(scratch_ptr, out_ptr, num_splits,
                         stride_sb, stride_sh, stride_ss, stride_ob, stride_oh,
                         HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
                         USE_PDL: tl.constexpr):
    # Grid (B, H): o = sum_i 2^(lse_i - m) o_i / sum_i 2^(lse_i - m), 0 when every split is empty.
    b = tl.program_id(0)
    h = tl.program_id(1)
    pdl_wait(USE_PDL, True)  # the partial results come from the kernel before (see fastllm.kernels.launch)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    mask_s = offs_s < num_splits
    mask_d = offs_d < HEAD_DIM
    base = scratch_ptr + b.to(tl.int64) * stride_sb + h * stride_sh + offs_s * stride_ss  # [S]
    lse = tl.load(base + HEAD_DIM, mask=mask_s, other=float("-inf"))
    m = tl.max(lse, axis=0)
    w = tl.exp2(lse - tl.where(m > float("-inf"), m, 0.0))  # empty splits weigh 2^-inf = 0
    denom = tl.sum(w, axis=0)
    o = tl.load(base[:, None] + offs_d[None, :], mask=mask_s[:, None] & mask_d[None, :], other=0.0)
    acc = tl.sum(w[:, None] * o, axis=0) / tl.where(denom > 0.0, denom, 1.0)
    tl.store(out_ptr + b.to(tl.int64) * stride_ob + h * stride_oh + offs_d,
             acc.to(out_ptr.dtype.element_ty), mask=mask_d)


@_jit
def _prefill_kernel(q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, block_tables_ptr, cu_seqlens_ptr, seq_lens_ptr,
                    qk_scale, stride_qt, stride_qh, stride_ot, stride_oh,
                    stride_cb, stride_cr, stride_ch, stride_bt,
                    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                    DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    # Grid (cdiv(max_query_len, TOKENS), KVH, B). The BLOCK_M rows of a program are TOKENS query
    # tokens x GROUP heads sharing one kv head, so K/V tiles are read once per group.
    TOKENS = BLOCK_M // GROUP  # constexpr arithmetic stays constexpr
    b = tl.program_id(2)
    kvh = tl.program_id(1)
    q_start = tl.load(cu_seqlens_ptr + b)
    q_len = tl.load(cu_seqlens_ptr + b + 1) - q_start
    tok0 = tl.program_id(0) * TOKENS
    if tok0 >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + b)
    ctx = seq_len - q_len  # keys already cached before this step's tokens

    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    tok = tok0 + offs_m // GROUP
    heads = kvh * GROUP + offs_m % GROUP
    mask_m = (offs_m < TOKENS * GROUP) & (tok < q_len)
    row = (q_start + tok).to(tl.int64)
    q = tl.load(q_ptr + row[:, None] * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
                mask=mask_m[:, None] & mask_d[None, :], other=0.0)
    qpos = ctx + tok

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    table_ptr = block_tables_ptr + b.to(tl.int64) * stride_bt
    head_off = kvh * stride_ch
    # Keys below ctx + tok0 + 1 are visible to every row: no causal mask there.
    full_end = (ctx + tok0 + 1) // BLOCK_N * BLOCK_N
    key_end = tl.minimum(ctx + tok0 + TOKENS, seq_len)
    for n0 in range(0, full_end, BLOCK_N):
        acc, l_i, m_i = _attend_tile(acc, l_i, m_i, q, k_cache_ptr, v_cache_ptr, table_ptr, n0, full_end, qpos,
                                     qk_scale, head_off, stride_cb, stride_cr, offs_d, mask_d,
                                     BLOCK_SIZE, BLOCK_N, False, DOT_PRECISION, UPCAST_DOT)
    for n0 in range(full_end, key_end, BLOCK_N):
        acc, l_i, m_i = _attend_tile(acc, l_i, m_i, q, k_cache_ptr, v_cache_ptr, table_ptr, n0, key_end, qpos,
                                     qk_scale, head_off, stride_cb, stride_cr, offs_d, mask_d,
                                     BLOCK_SIZE, BLOCK_N, True, DOT_PRECISION, UPCAST_DOT)
    o = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    tl.store(out_ptr + row[:, None] * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
             o.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])


def _dot_args(dtype: torch.dtype) -> dict:
    # fp32: plain tf32 (10-bit mantissa) is too coarse to match the reference, and "ieee" (FMA
    # loops) took ~15 s to compile per prefill variant on an H200; tf32x3 is near-fp32 on tensor cores.
    # Triton's CPU interpreter (3.9) multiplies bf16 tl.dot operands as their raw uint16 bits,
    # so there the operands go to fp32 first; compiled kernels keep bf16 tensor-core dots.
    interpreted = type(_prefill_kernel).__name__ == "InterpretedFunction"
    upcast = interpreted and dtype == torch.bfloat16
    precision = "ieee" if interpreted else "tf32x3" if dtype == torch.float32 else "tf32"
    return {"DOT_PRECISION": precision, "UPCAST_DOT": upcast}


def decode_scratch(batch: int, num_heads: int, head_dim: int, num_splits: int = 8,
                   device: torch.device | str | None = None) -> torch.Tensor:
    """fp32 scratch of paged_decode: [batch, num_heads, num_splits, head_dim + 1] (split outputs and lse)."""
    return torch.empty(batch, num_heads, num_splits, head_dim + 1, dtype=torch.float32, device=device)


SPLITS_ROUND_DOWN = True  # decode_num_splits' rounding (benchmarks switch it)
MAX_SPLITS = 32


def decode_num_splits(batch: int, num_kv_heads: int, device: torch.device | str | None = None) -> int:
    """Splits for paged_decode: a power of two, 1..32, giving at most four programs per SM (a host
    value: pick it per captured batch size). Rounding down rather than up keeps them to one wave
    and leaves room on each SM for the next kernel's programs to start early: on an H100
    (Llama-2-7B, batch 1, 16 splits against 32) bf16 decoded 205.2 against 198.1 tok/s and int4
    452.8 against 420.0 (SPLITS_ROUND_DOWN = False gives the old rounding)."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    want = -(-4 * sms // (batch * num_kv_heads))
    if SPLITS_ROUND_DOWN:  # at most four programs per SM
        return min(MAX_SPLITS, max(1, triton.next_power_of_2(want + 1) // 2))
    return min(MAX_SPLITS, triton.next_power_of_2(want))


def _checked_scratch(scratch: torch.Tensor | None, batch: int, h: int, d: int, num_splits: int,
                     device: torch.device) -> torch.Tensor:
    """The decode kernels' scratch: the caller's, checked, or a new one."""
    if scratch is None:
        return decode_scratch(batch, h, d, num_splits, device)
    if scratch.dtype != torch.float32 or scratch.shape[0] < batch or scratch.shape[1:] != (h, num_splits, d + 1):
        raise ValueError(f"scratch must be fp32 [>={batch}, {h}, {num_splits}, {d + 1}], got "
                         f"{scratch.dtype} {tuple(scratch.shape)}")
    return scratch


def _merge_splits(scratch: torch.Tensor, out: torch.Tensor, num_splits: int) -> None:
    """The decode kernels' second launch: out [B, H, D] from the splits' partial results."""
    batch, h, d = out.shape
    _decode_merge_kernel[(batch, h)](
        scratch, out, num_splits, scratch.stride(0), scratch.stride(1), scratch.stride(2), out.stride(0), out.stride(1),
        HEAD_DIM=d, BLOCK_S=triton.next_power_of_2(num_splits), BLOCK_D=triton.next_power_of_2(d), **pdl(out, first=True))


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                 seq_lens: torch.Tensor, scale: float, out: torch.Tensor, num_splits: int = 8,
                 scratch: torch.Tensor | None = None) -> None:
    """One query per sequence against its paged keys: out[b] = softmax(q[b] K^T * scale) V.

    q, out: [B, H, D]; block_tables int32 [B, max_blocks]; seq_lens int32 [B] (keys in the cache,
    this step's token included; 0 writes zeros). Graph-safe: no host sync, the grid depends on
    shapes only, and `scratch` (see decode_scratch; a leading slice of a larger one is fine) can
    be preallocated.
    """
    block_size, kvh, d = _check_cache(k_cache, v_cache)
    batch, h = q.shape[0], q.shape[1]
    if q.shape[1:] != (h, d) or h % kvh or out.shape != q.shape or q.stride(-1) != 1 or out.stride(-1) != 1:
        raise ValueError(f"q and out must be [B, H, {d}] with H a multiple of {kvh} and unit stride in the last "
                         f"dim, got {tuple(q.shape)} and {tuple(out.shape)}")
    scratch = _checked_scratch(scratch, batch, h, d, num_splits, q.device)
    if batch == 0:
        return
    group = h // kvh
    # The group's query heads are the M rows of tl.dot, padded to 16 (its minimum). On an H200 this
    # beat a broadcast-multiply-and-sum even for MHA (one live row): 4.3 vs 2.3 TB/s at B=256.
    block_g = max(triton.next_power_of_2(group), 16)
    block_d = triton.next_power_of_2(d)
    _decode_split_kernel[(batch, kvh, num_splits)](
        q, k_cache, v_cache, block_tables, seq_lens, scratch, scale * LOG2E, num_splits,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        scratch.stride(0), scratch.stride(1), scratch.stride(2),
        GROUP=group, HEAD_DIM=d, BLOCK_SIZE=block_size, BLOCK_G=block_g, BLOCK_D=block_d,
        BLOCK_N=DECODE_BLOCK_N, **_dot_args(q.dtype),
        num_warps=DECODE_WARPS, num_stages=DECODE_STAGES, **pdl(q, first=True))
    _merge_splits(scratch, out, num_splits)


def paged_decode_rope(qk: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      block_tables: torch.Tensor, seq_lens: torch.Tensor, slot_mapping: torch.Tensor,
                      positions: torch.Tensor, inv_freq: torch.Tensor, rope_scale: float, scale: float,
                      out: torch.Tensor, num_splits: int = 8, scratch: torch.Tensor | None = None) -> None:
    """rope_store_kv then paged_decode, in the launches of paged_decode alone (one query per sequence).

    qk [B, H + KVH, D] holds q then k, not yet rotated, and v [B, KVH, D] (views of one projection
    are fine); RoPE as rope_store_kv's (positions [B], inv_freq [D/2], rope_scale); the rotated k
    and v go to the cache rows slot_mapping [B] (-1 skipped), and seq_lens [B] counts them. qk is
    left as it was. out [B, H, D]. Graph-safe, as paged_decode.
    """
    block_size, kvh, d = _check_cache(k_cache, v_cache)
    batch, h = qk.shape[0], qk.shape[1] - kvh
    if (qk.dim() != 3 or qk.shape[2] != d or h <= 0 or h % kvh or v.shape != (batch, kvh, d)
            or out.shape != (batch, h, d) or qk.stride(-1) != 1 or v.stride(-1) != 1 or out.stride(-1) != 1):
        raise ValueError(f"qk must be [B, H + {kvh}, {d}] with H a multiple of {kvh}, v [B, {kvh}, {d}] and out "
                         f"[B, H, {d}], each with unit stride in the last dim; got {tuple(qk.shape)}, "
                         f"{tuple(v.shape)} and {tuple(out.shape)}")
    if d % 2:
        raise ValueError(f"rotate-half RoPE needs an even head_dim, got {d}")
    scratch = _checked_scratch(scratch, batch, h, d, num_splits, qk.device)
    if batch == 0:
        return
    group = h // kvh
    _decode_rope_split_kernel[(batch, kvh, num_splits)](
        qk, v, k_cache, v_cache, block_tables, seq_lens, slot_mapping, positions, inv_freq, rope_scale, scratch,
        scale * LOG2E, num_splits, qk.stride(0), qk.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        scratch.stride(0), scratch.stride(1), scratch.stride(2),
        NUM_HEADS=h, GROUP=group, HEAD_DIM=d, BLOCK_SIZE=block_size, BLOCK_R=triton.next_power_of_2(group),
        BLOCK_G=max(triton.next_power_of_2(group), 16),
        BLOCK_HALF=max(triton.next_power_of_2(d // 2), 16), BLOCK_N=DECODE_BLOCK_N, **_dot_args(qk.dtype),
        num_warps=DECODE_WARPS, num_stages=DECODE_STAGES, **pdl(qk, first=True))
    _merge_splits(scratch, out, num_splits)


def paged_prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                  cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor, scale: float, out: torch.Tensor,
                  max_query_len: int) -> None:
    """Causal varlen attention of this step's tokens against the paged cache (already holding them).

    q, out: [T, H, D], sequences back to back; cu_seqlens_q int32 [B+1]; seq_lens int32 [B], keys
    of sequence b after this step. Query i of sequence b (n_b = cu[b+1] - cu[b] queries) sits at
    position seq_lens[b] - n_b + i and sees keys 0 .. that position. max_query_len >= every n_b.
    """
    block_size, kvh, d = _check_cache(k_cache, v_cache)
    h = q.shape[1]
    if q.dim() != 3 or q.shape[2] != d or h % kvh or out.shape != q.shape or q.stride(-1) != 1 or out.stride(-1) != 1:
        raise ValueError(f"q and out must be [T, H, {d}] with H a multiple of {kvh} and unit stride in the last "
                         f"dim, got {tuple(q.shape)} and {tuple(out.shape)}")
    batch = cu_seqlens_q.shape[0] - 1
    if batch <= 0 or max_query_len <= 0:
        return
    group = h // kvh
    block_m = max(PREFILL_BLOCK_M, triton.next_power_of_2(group))
    grid = (triton.cdiv(max_query_len, block_m // group), kvh, batch)
    _prefill_kernel[grid](
        q, k_cache, v_cache, out, block_tables, cu_seqlens_q, seq_lens, scale * LOG2E,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        GROUP=group, HEAD_DIM=d, BLOCK_SIZE=block_size, BLOCK_M=block_m, BLOCK_D=triton.next_power_of_2(d),
        BLOCK_N=PREFILL_BLOCK_N, **_dot_args(q.dtype),
        num_warps=PREFILL_WARPS, num_stages=PREFILL_STAGES)


def reference_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                        cu_seqlens_q: torch.Tensor, seq_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """paged_prefill's semantics in float64 torch (decode: cu_seqlens_q = arange(B+1)); [T, H, D] in q's dtype."""
    block_size, kvh = k_cache.shape[1], k_cache.shape[2]
    group = q.shape[1] // kvh
    k_rows, v_rows = k_cache.flatten(0, 1), v_cache.flatten(0, 1)  # [slots, KVH, D]
    out = torch.zeros(q.shape, dtype=torch.float64, device=q.device)
    cu, lens = cu_seqlens_q.tolist(), seq_lens.tolist()
    for b, seq_len in enumerate(lens):
        lo, hi = cu[b], cu[b + 1]
        if hi == lo or seq_len == 0:
            continue
        pos = torch.arange(seq_len, device=q.device)
        slots = block_tables[b].long()[pos // block_size] * block_size + pos % block_size
        k = k_rows[slots].double().repeat_interleave(group, dim=1).transpose(0, 1)  # [H, S, D]
        v = v_rows[slots].double().repeat_interleave(group, dim=1).transpose(0, 1)
        qq = q[lo:hi].double().transpose(0, 1)  # [H, n, D]
        s = qq @ k.transpose(1, 2) * scale  # [H, n, S]
        qpos = seq_len - (hi - lo) + torch.arange(hi - lo, device=q.device)
        s = s.masked_fill(pos[None, None, :] > qpos[None, :, None], -math.inf)
        out[lo:hi] = (s.softmax(-1) @ v).transpose(0, 1)
    return out.to(q.dtype)
