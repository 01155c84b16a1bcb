"""The split kernel of paged_decode_rope (fastllm.kernels.paged_attention, which launches it
with the merge it shares with paged_decode): decode attention over a paged KV cache with RoPE of q
and of the new key, and the new key's and value's store, inside. Same cache layout and scratch as
paged_attention's decode kernels."""
from __future__ import annotations

from .kv_store import _jit, tl
from .launch import pdl_wait


@_jit
def _kv_tile(k_cache_ptr, v_cache_ptr, table_ptr, n0, key_end, head_off, stride_cb, stride_cr, cols, mask_c,
             BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr):
    # Keys n0 .. n0+BLOCK_N (those < key_end) of one kv head: positions, k and v [N, C], column c
    # of the tile holding element cols[c] of the head vector.
    pos = n0 + tl.arange(0, BLOCK_N)
    mask_n = pos < key_end
    block = tl.load(table_ptr + pos // BLOCK_SIZE, mask=mask_n, other=0).to(tl.int64)
    rows = block * stride_cb + (pos % BLOCK_SIZE).to(tl.int64) * stride_cr + head_off
    ptrs = rows[:, None] + cols[None, :]
    m = mask_n[:, None] & mask_c[None, :]
    return pos, tl.load(k_cache_ptr + ptrs, mask=m, other=0.0), tl.load(v_cache_ptr + ptrs, mask=m, other=0.0)


@_jit
def _attend_kv(acc, l_i, m_i, q, pos, k, v, k_new, v_new, last, key_end, qk_scale,
               DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    # One online-softmax step of paged_attention._attend_tile's over a tile already read; the key
    # at position `last` (this step's token, not yet in the cache when the tile was read) is
    # k_new / v_new.
    new = (pos == last)[:, None]
    k = tl.where(new, k_new[None, :], k)
    v = tl.where(new, v_new[None, :], v)
    if UPCAST_DOT:
        q, k, v = q.to(tl.float32), k.to(tl.float32), v.to(tl.float32)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # [G, N]
    s = tl.where((pos < key_end)[None, :], s * qk_scale, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    # a tile with no key (an empty split) leaves m at -inf: exponents against 0 keep it all zero
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_ref)
    p = tl.exp2(s - m_ref[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, l_i, m_new


@_jit
def _rotate(ptr, offs, cols, partner, mask, cos, sin):
    # rotate-half RoPE of the vectors at ptr + offs[:, None] (fp32, [R, C]): element cols[c] with
    # its partner, cos / sin per column (sin negated in the first half)
    x = tl.load(ptr + offs[:, None] + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    x_p = tl.load(ptr + offs[:, None] + partner[None, :], mask=mask, other=0.0).to(tl.float32)
    return x * cos[None, :] + x_p * sin[None, :]


@_jit
def _decode_rope_split_kernel(qk_ptr, v_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr, slot_ptr,
                              pos_ptr, inv_freq_ptr, rope_scale, scratch_ptr, qk_scale, num_splits,
                              stride_qb, stride_qh, stride_vb, stride_vh, stride_cb, stride_cr, stride_ch, stride_bt,
                              stride_sb, stride_sh, stride_ss,
                              NUM_HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
                              BLOCK_SIZE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_G: tl.constexpr,
                              BLOCK_HALF: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
                              UPCAST_DOT: tl.constexpr, USE_PDL: tl.constexpr):
    # Grid (B, KVH, num_splits), as _decode_split_kernel, for q and this step's k, v straight from
    # the projection (k not yet rotated, neither stored): RoPE of the group's q heads and of k in
    # registers; the split holding the new key stores it (rotated) and v to the cache. The new
    # key's cache row is read with the first tile before the PDL wait and replaced in registers.
    # Tiles are 2 * BLOCK_HALF columns wide: the first half of the head vector, padded, then the
    # second (with head_dim 128, the vector as it is).
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    HALF: tl.constexpr = HEAD_DIM // 2
    # The step's metadata and the cache's older rows are written before the step's first kernel
    # (every earlier kernel waited for it): read before the wait, so their latency overlaps the
    # kernel before.
    seq_len = tl.load(seq_lens_ptr + b)
    per_split = (seq_len + num_splits - 1) // num_splits
    start = split * per_split
    end = tl.minimum(start + per_split, seq_len)
    last = seq_len - 1
    offs_c = tl.arange(0, 2 * BLOCK_HALF)
    second = offs_c >= BLOCK_HALF
    j = tl.where(second, offs_c - BLOCK_HALF, offs_c)  # index within the half
    mask_c = j < HALF
    cols = tl.where(second, j + HALF, j)
    partner = tl.where(second, j, j + HALF)
    freq = tl.load(pos_ptr + b).to(tl.float32) * tl.load(inv_freq_ptr + j, mask=mask_c, other=0.0)
    cos = tl.cos(freq) * rope_scale
    sin = tl.where(second, 1.0, -1.0) * tl.sin(freq) * rope_scale
    table_ptr = block_tables_ptr + b.to(tl.int64) * stride_bt
    head_off = kvh * stride_ch
    pos, k, v = _kv_tile(k_cache_ptr, v_cache_ptr, table_ptr, start, end, head_off, stride_cb, stride_cr, cols,
                         mask_c, BLOCK_SIZE, BLOCK_N)
    pdl_wait(USE_PDL, False)  # q, k and v come from the kernel before (see fastllm.kernels.launch)

    # The group's BLOCK_R query heads (GROUP padded to a power of two) are rotated once, then each
    # repeated REP times to the BLOCK_G rows tl.dot needs: row r holds head r // REP.
    REP: tl.constexpr = BLOCK_G // BLOCK_R
    offs_r = tl.arange(0, BLOCK_R)
    row = qk_ptr + b.to(tl.int64) * stride_qb
    q = _rotate(row, (kvh * GROUP + offs_r) * stride_qh, cols, partner, (offs_r < GROUP)[:, None] & mask_c[None, :],
                cos, sin).to(qk_ptr.dtype.element_ty)  # rounded as a rotation in place would leave q
    q = tl.reshape(tl.broadcast_to(q[:, None, :], (BLOCK_R, REP, 2 * BLOCK_HALF)), (BLOCK_G, 2 * BLOCK_HALF))
    offs_g = tl.arange(0, BLOCK_G)
    mask_g = (offs_g % REP == 0) & (offs_g // REP < GROUP)  # one row of each head stores
    gm = mask_g[:, None] & mask_c[None, :]
    one = tl.arange(0, 1)
    k_new = tl.reshape(_rotate(row, (NUM_HEADS + kvh) * stride_qh + one, cols, partner, mask_c[None, :], cos, sin),
                       (2 * BLOCK_HALF,)).to(k_cache_ptr.dtype.element_ty)
    v_new = tl.load(v_ptr + b.to(tl.int64) * stride_vb + kvh * stride_vh + cols, mask=mask_c,
                    other=0.0).to(v_cache_ptr.dtype.element_ty)
    slot = tl.load(slot_ptr + b).to(tl.int64)
    if (start <= last) & (last < end) & (slot >= 0):  # this split holds the new key (slot -1: graph padding)
        dst = slot * stride_cr + head_off + cols  # a slot is block * block_size + row
        tl.store(k_cache_ptr + dst, k_new, mask=mask_c)
        tl.store(v_cache_ptr + dst, v_new, mask=mask_c)

    acc = tl.zeros([BLOCK_G, 2 * BLOCK_HALF], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    acc, l_i, m_i = _attend_kv(acc, l_i, m_i, q, pos, k, v, k_new, v_new, last, end, qk_scale, DOT_PRECISION,
                               UPCAST_DOT)
    for n0 in range(start + BLOCK_N, end, BLOCK_N):
        pos, k, v = _kv_tile(k_cache_ptr, v_cache_ptr, table_ptr, n0, end, head_off, stride_cb, stride_cr, cols,
                             mask_c, BLOCK_SIZE, BLOCK_N)
        acc, l_i, m_i = _attend_kv(acc, l_i, m_i, q, pos, k, v, k_new, v_new, last, end, qk_scale, DOT_PRECISION,
                                   UPCAST_DOT)
    if USE_PDL == 1:  # (USE_PDL = 2 let the next kernel launch before the wait)
        tl.extra.cuda.gdc_launch_dependents()

    nonempty = l_i > 0.0
    o = acc / tl.where(nonempty, l_i, 1.0)[:, None]
    lse = tl.where(nonempty, m_i + tl.log2(tl.where(nonempty, l_i, 1.0)), float("-inf"))
    heads = kvh * GROUP + offs_g // REP
    dst = scratch_ptr + b.to(tl.int64) * stride_sb + heads * stride_sh + split * stride_ss  # [G]
    tl.store(dst[:, None] + cols[None, :], o, mask=gm)
    tl.store(dst + HEAD_DIM, lse, mask=mask_g)
