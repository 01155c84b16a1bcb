"""Decode attention with RoPE and the KV store inside (Triton): one kernel where a decode step
otherwise runs three (rope_store_kv, the split pass and the merge of paged_decode).

At batch 1 a 7B model's attention is latency, not bytes: a few hundred keys per head. Here the
step's new key and value never go through the cache on the way in. Each program of the grid
(B, KVH, splits) rotates its query heads itself; the last split of a kv head rotates the new key,
adds it to its online softmax from registers and stores it with the new value for later steps.
The keys this step reads from the cache were all written by earlier steps, and no kernel of
this step writes them, so a program loads its first K/V tile before its PDL wait (see
fastllm.kernels.launch): that load overlaps the tail of the qkv projection. With `merge_in_kernel`
the last program of a kv head to finish merges the splits (an atomic ticket per kv head, reset to
0 by that program, so the tickets stay ready for the next step and graph replays).
"""
from __future__ import annotations

import torch

from .launch import pdl
from .paged_attention import (LOG2E, DECODE_BLOCK_N, DECODE_STAGES, DECODE_WARPS, _check_cache, _dot_args, _jit,
                              _attend_tile, _merge_head, _softmax_step, _store_partial, _tile_rows, tl,
                              triton)


@_jit
def _load_kv(k_cache_ptr, v_cache_ptr, table_ptr, n0, key_end, head_off, stride_cb, stride_cr, offs_d, mask_d,
             BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr):
    rows, mask_n = _tile_rows(table_ptr, n0, key_end, head_off, stride_cb, stride_cr, BLOCK_SIZE, BLOCK_N)
    kv_mask = mask_n[:, None] & mask_d[None, :]
    k = tl.load(k_cache_ptr + rows[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)  # [N, D]
    v = tl.load(v_cache_ptr + rows[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
    return k, v, mask_n


@_jit
def _attend_kv(acc, l_i, m_i, q, k, v, mask_n, qk_scale, DOT_PRECISION: tl.constexpr):
    """_attend_tile's step on a K/V tile already loaded."""
    s = tl.where(mask_n[None, :], tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale, float("-inf"))
    p, alpha, l_i, m_i = _softmax_step(s, l_i, m_i)
    return acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION), l_i, m_i


@_jit
def _rotated(ptr, offs_d, mask_d, c, s, HALF: tl.constexpr):
    """Rotate-half RoPE of the vector(s) at ptr + offs_d (fp32): x * c + rotate_half(x) * s, where
    rotate_half(x)[d] = -x[d + HALF] below HALF and x[d - HALF] above."""
    partner = tl.where(offs_d < HALF, offs_d + HALF, offs_d - HALF)
    x = tl.load(ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    xp = tl.load(ptr + partner, mask=mask_d, other=0.0).to(tl.float32)
    return x * c + tl.where(offs_d < HALF, -xp, xp) * s


@_jit
def _decode_rope_kernel(qk_ptr, v_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr, slot_ptr, pos_ptr,
                        inv_freq_ptr, rope_scale, scratch_ptr, out_ptr, ticket_ptr, qk_scale, num_splits,
                        stride_qt, stride_qh, stride_vt, stride_vh, stride_cb, stride_cr, stride_ch, stride_bt,
                        stride_sb, stride_sh, stride_ss, stride_ob, stride_oh,
                        NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr,
                        HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_G: tl.constexpr,
                        BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr,
                        MERGE: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
                        USE_PDL: tl.constexpr):
    # Grid (B, KVH, num_splits): the GROUP query heads of one kv head over one slice of the cached keys.
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    # seq_lens and the block tables are written before the step's first kernel
    seq_len = tl.load(seq_lens_ptr + b)
    cached = tl.maximum(seq_len - 1, 0)  # the last key is this step's, in qk
    per_split = (cached + num_splits - 1) // num_splits
    start = split * per_split
    end = tl.minimum(start + per_split, cached)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    table_ptr = block_tables_ptr + b.to(tl.int64) * stride_bt
    head_off = kvh * stride_ch
    k, v, mask_n = _load_kv(k_cache_ptr, v_cache_ptr, table_ptr, start, end, head_off, stride_cb, stride_cr,
                            offs_d, mask_d, BLOCK_SIZE, BLOCK_N)
    if USE_PDL:  # qk and v come from the kernel before
        tl.extra.cuda.gdc_wait()

    HALF: tl.constexpr = HEAD_DIM // 2
    freq = tl.load(pos_ptr + b).to(tl.float32) * tl.load(inv_freq_ptr + offs_d % HALF, mask=mask_d, other=0.0)
    c = tl.cos(freq) * rope_scale
    s = tl.sin(freq) * rope_scale
    offs_g = tl.arange(0, BLOCK_G)
    mask_g = offs_g < GROUP
    heads = kvh * GROUP + offs_g
    q_rows = qk_ptr + b.to(tl.int64) * stride_qt + heads * stride_qh  # [G]
    qmask = mask_g[:, None] & mask_d[None, :]
    # rounded to the model dtype, as rope_store_kv leaves q for paged_decode
    q = _rotated(q_rows[:, None], offs_d[None, :], qmask, c[None, :], s[None, :], HALF).to(qk_ptr.dtype.element_ty)

    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    if start < end:  # the first tile, loaded above
        if UPCAST_DOT:
            q32 = q.to(tl.float32)
            acc, l_i, m_i = _attend_kv(acc, l_i, m_i, q32, k.to(tl.float32), v.to(tl.float32), mask_n, qk_scale,
                                       DOT_PRECISION)
        else:
            acc, l_i, m_i = _attend_kv(acc, l_i, m_i, q, k, v, mask_n, qk_scale, DOT_PRECISION)
    for n0 in range(start + BLOCK_N, end, BLOCK_N):  # the rest as paged_decode walks them (Triton pipelines it)
        acc, l_i, m_i = _attend_tile(acc, l_i, m_i, q, k_cache_ptr, v_cache_ptr, table_ptr, n0, end, offs_g,
                                     qk_scale, head_off, stride_cb, stride_cr, offs_d, mask_d,
                                     BLOCK_SIZE, BLOCK_N, False, DOT_PRECISION, UPCAST_DOT)

    if (split == num_splits - 1) & (seq_len > 0):  # this step's key and value: rotate, attend, store
        kv_row = b.to(tl.int64) * stride_qt + (NUM_HEADS + kvh) * stride_qh
        k_new = _rotated(qk_ptr + kv_row, offs_d, mask_d, c, s, HALF).to(k_cache_ptr.dtype.element_ty)
        v_new = tl.load(v_ptr + b.to(tl.int64) * stride_vt + kvh * stride_vh + offs_d, mask=mask_d, other=0.0)
        sn = tl.sum(q.to(tl.float32) * k_new.to(tl.float32)[None, :], axis=1) * qk_scale  # [G]
        m_new = tl.maximum(m_i, sn)
        alpha = tl.exp2(m_i - m_new)
        pn = tl.exp2(sn - m_new)
        l_i = l_i * alpha + pn
        acc = acc * alpha[:, None] + pn[:, None] * v_new.to(tl.float32)[None, :]
        m_i = m_new
        slot = tl.load(slot_ptr + b).to(tl.int64)
        if slot >= 0:  # -1: CUDA-graph padding
            dst = slot * stride_cr + head_off + offs_d  # the cache is contiguous within a block
            tl.store(k_cache_ptr + dst, k_new, mask=mask_d)
            tl.store(v_cache_ptr + dst, v_new.to(v_cache_ptr.dtype.element_ty), mask=mask_d)
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()
    _store_partial(scratch_ptr, b, heads, split, acc, l_i, m_i, mask_g, offs_d, mask_d,
                   stride_sb, stride_sh, stride_ss, HEAD_DIM)

    if MERGE:  # the last of the kv head's programs to get here merges its GROUP heads
        tl.debug_barrier()  # every thread's partial stored before the ticket releases them
        ticket = ticket_ptr + b * NUM_KV_HEADS + kvh
        if tl.atomic_add(ticket, 1, sem="acq_rel") == num_splits - 1:
            for g in range(GROUP):
                _merge_head(scratch_ptr, out_ptr, b, kvh * GROUP + g, num_splits, stride_sb, stride_sh, stride_ss,
                            stride_ob, stride_oh, HEAD_DIM, BLOCK_S, BLOCK_D)
            tl.atomic_xchg(ticket, 0)  # ready for the next step


def decode_tickets(batch: int, num_kv_heads: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Zeroed int32 [batch, num_kv_heads] tickets of paged_decode_rope's in-kernel merge; the
    kernel leaves them zeroed, so one buffer serves every step and graph replay."""
    return torch.zeros(batch, num_kv_heads, dtype=torch.int32, device=device)


def paged_decode_rope(qk: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      block_tables: torch.Tensor, seq_lens: torch.Tensor, slot_mapping: torch.Tensor,
                      positions: torch.Tensor, inv_freq: torch.Tensor, rope_scale: float, scale: float,
                      out: torch.Tensor, num_splits: int, scratch: torch.Tensor,
                      tickets: torch.Tensor | None = None) -> None:
    """A decode step's attention from unrotated projections: what rope_store_kv then paged_decode
    compute, in one launch with `tickets` (see decode_tickets), two without.

    qk [B, H + KVH, D] holds q then k of each sequence's new token, v [B, KVH, D]; seq_lens [B]
    count the keys with the new one, which goes to the cache row slot_mapping[b] (-1: not stored;
    seq_len 0 writes zeros); positions [B]; out [B, H, D]; scratch as paged_decode's. qk is not
    modified.
    """
    block_size, kvh, d = _check_cache(k_cache, v_cache)
    batch = qk.shape[0]
    h = qk.shape[1] - kvh
    if (h <= 0 or h % kvh or qk.shape[2] != d or v.shape != (batch, kvh, d) or out.shape != (batch, h, d)
            or qk.stride(-1) != 1 or v.stride(-1) != 1 or out.stride(-1) != 1):
        raise ValueError(f"qk must be [B, H + {kvh}, {d}], v [B, {kvh}, {d}] and out [B, H, {d}] with unit stride "
                         f"in the last dim, got {tuple(qk.shape)}, {tuple(v.shape)} and {tuple(out.shape)}")
    if d % 2:
        raise ValueError(f"rotate-half RoPE needs an even head_dim, got {d}")
    if scratch.dtype != torch.float32 or scratch.shape[0] < batch or scratch.shape[1:] != (h, num_splits, d + 1):
        raise ValueError(f"scratch must be fp32 [>={batch}, {h}, {num_splits}, {d + 1}], got "
                         f"{scratch.dtype} {tuple(scratch.shape)}")
    if tickets is not None and (tickets.dtype != torch.int32 or tickets.shape[0] < batch
                                or tickets.shape[1:] != (kvh,) or not tickets.is_contiguous()):
        raise ValueError(f"tickets must be contiguous int32 [>={batch}, {kvh}], got {tickets.dtype} "
                         f"{tuple(tickets.shape)}")
    if batch == 0:
        return
    group = h // kvh
    block_d = triton.next_power_of_2(d)
    block_s = triton.next_power_of_2(num_splits)
    _decode_rope_kernel[(batch, kvh, num_splits)](
        qk, v, k_cache, v_cache, block_tables, seq_lens, slot_mapping, positions, inv_freq, rope_scale, scratch,
        out, tickets if tickets is not None else seq_lens, scale * LOG2E, num_splits,
        qk.stride(0), qk.stride(1), v.stride(0), v.stride(1), k_cache.stride(0), k_cache.stride(1),
        k_cache.stride(2), block_tables.stride(0), scratch.stride(0), scratch.stride(1), scratch.stride(2),
        out.stride(0), out.stride(1),
        NUM_HEADS=h, NUM_KV_HEADS=kvh, GROUP=group, HEAD_DIM=d, BLOCK_SIZE=block_size,
        BLOCK_G=max(triton.next_power_of_2(group), 16), BLOCK_D=block_d, BLOCK_N=DECODE_BLOCK_N, BLOCK_S=block_s,
        MERGE=tickets is not None, **_dot_args(qk.dtype), num_warps=DECODE_WARPS, num_stages=DECODE_STAGES,
        **pdl(qk))
    if tickets is None:
        from .paged_attention import _decode_merge_kernel

        _decode_merge_kernel[(batch, h)](
            scratch, out, num_splits, scratch.stride(0), scratch.stride(1), scratch.stride(2), out.stride(0),
            out.stride(1), HEAD_DIM=d, BLOCK_S=block_s, BLOCK_D=block_d, **pdl(qk))
