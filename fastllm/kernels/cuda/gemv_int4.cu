// The int4 GEMV of batch-1 decode in CUDA: gemv_int8.cu's structure (a warp per row, or a warp
// streaming rows on a persistent grid; WARPS warps per CTA, each lane streaming 16-byte chunks in two
// register batches used in turn, the first before the PDL wait, the input prepared once per CTA in
// shared memory, dp4a) for fastllm.stages.quantizers.int4's storage.
//
// y[n] = sum_k (q[n, k] - zero[n, g]) scale[n, g] x[k] (+ b[n]), g = k / G: packed uint8 [N, Kp / 2]
// (two values per byte along K, low nibble = even k; rows 16-byte aligned), pairs fp32
// [N, ng2, 2] = (scale, zero) per group (ng2 = groups rounded up to even), G a multiple of 32,
// x bf16 [K] (K <= Kp; SILU: x = bf16(silu(h[k]) * h[K + k]) from h [2K]), b, y bf16 [N].
//
// A lane's chunk holds 32 values of one group. The input goes to 16-bit fixed point per chunk of
// 32 (scale = the chunk's largest magnitude / 32767: at most that / 65534 of rounding per input),
// split into even and odd k, each into a signed high and an unsigned low byte plane. A weight word
// (8 values) gives its even nibbles by a mask and its odd ones by a shift and the mask, and meets
// the four planes in four dp4a: P = sum q xi, exact. Per chunk, with S = sum xi (from shared
// memory): acc += scale * xscale * (P - zero * S).
#include "common.cuh"

#define UNROLL 4

// A lane's batch: UNROLL weight chunks and their groups' (scale, zero) pairs.
struct Batch4 {
    uint4 w[UNROLL];
    float2 sz[UNROLL];
};

// Shared memory per chunk c of 32 inputs: uint4 planes [4][chunks] (even high, even low, odd high,
// odd low; word w of a plane holds k = 8 w + 2 e (+1 if odd) for e = 0..3), then float2 [chunks]
// (xscale, xscale * S).
__device__ __forceinline__ void load_batch4(uint4 (&w)[UNROLL], float2 (&sz)[UNROLL], const uint4 *row,
                                            const float2 *pairs, int first, int chunks, int G) {
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
        const int c = first + 32 * u;
        if (c < chunks) {
            w[u] = load_stream(row + c);
            sz[u] = __ldg(pairs + (c * 32) / G);
        }
    }
}

__device__ __forceinline__ void use_batch4(float &acc, const uint4 (&w)[UNROLL], const float2 (&sz)[UNROLL],
                                           const uint4 *xsm, int first, int chunks) {
    const float2 *xs = reinterpret_cast<const float2 *>(xsm + 4 * chunks);
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
        const int c = first + 32 * u;
        if (c >= chunks) continue;
        const uint4 eh = xsm[c], el = xsm[chunks + c], oh = xsm[2 * chunks + c], ol = xsm[3 * chunks + c];
        const uint32_t ww[4] = {w[u].x, w[u].y, w[u].z, w[u].w};
        const uint32_t ehw[4] = {eh.x, eh.y, eh.z, eh.w}, elw[4] = {el.x, el.y, el.z, el.w};
        const uint32_t ohw[4] = {oh.x, oh.y, oh.z, oh.w}, olw[4] = {ol.x, ol.y, ol.z, ol.w};
        int hi = 0, lo = 0;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const uint32_t even = ww[j] & 0x0f0f0f0fu, odd = (ww[j] >> 4) & 0x0f0f0f0fu;
            hi = dp4a_us(even, ehw[j], hi);
            hi = dp4a_us(odd, ohw[j], hi);
            lo = dp4a_uu(even, elw[j], lo);
            lo = dp4a_uu(odd, olw[j], lo);
        }
        const float2 s = xs[c];  // (xscale, xscale * S)
        // |hi * 256 + lo| <= 32 x 15 x 32767 < 2^24: exact in fp32
        acc = fmaf(sz[u].x, fmaf((float)(hi * 256 + lo), s.x, -sz[u].y * s.y), acc);
    }
}

template <bool BIAS>
__device__ __forceinline__ void finish_row4(float acc, int lane, int row, const __nv_bfloat16 *__restrict__ b,
                                            __nv_bfloat16 *__restrict__ y) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
    if (lane == 0) {
        if (BIAS) acc += __bfloat162float(b[row]);
        y[row] = __float2bfloat16(acc);
    }
}

// stride: as gemv_int8's (N: one row per warp; gridDim.x * WARPS: a persistent grid).
template <int WARPS, bool PDL, bool SILU, bool BIAS, int MINB>
__global__ void __launch_bounds__(WARPS * 32, MINB) gemv_int4(const uint8_t *__restrict__ packed,
                                                              const float *__restrict__ pairs,
                                                              const __nv_bfloat16 *__restrict__ x,
                                                              const __nv_bfloat16 *__restrict__ b,
                                                              __nv_bfloat16 *__restrict__ y, int N, int K, int Kp,
                                                              int G, int ng2, int stride) {
    extern __shared__ uint4 xsm[];
    const int lane = threadIdx.x & 31;
    const int row0 = blockIdx.x * WARPS + (threadIdx.x >> 5);
    const int chunks = Kp >> 5;  // 16-byte chunks of a packed row = chunks of 32 inputs
    const uint4 *w4 = reinterpret_cast<const uint4 *>(packed);
    const float2 *p2 = reinterpret_cast<const float2 *>(pairs);
    const size_t rstride = (size_t)chunks, pstride = (size_t)ng2;
    Batch4 wa, wb;
    if (row0 < N) load_batch4(wa.w, wa.sz, w4 + row0 * rstride, p2 + row0 * pstride, lane, chunks, G);
    pdl_wait<PDL>();  // x comes from the kernel before
    // whole chunks of x (and of up, at x + K) on 16-byte boundaries: vector loads
    const bool vec = reinterpret_cast<uintptr_t>(x) % 16 == 0 && (!SILU || K % 8 == 0);
    for (int c = threadIdx.x; c < chunks; c += blockDim.x) {
        __nv_bfloat16 v[32];  // (bf16 values: the inputs as rounded; half the registers of fp32)
        if (vec && 32 * c + 32 <= K) {  // four 16-byte loads (and four of up with SILU)
            uint4 *vv = reinterpret_cast<uint4 *>(v);
            const uint4 *x4 = reinterpret_cast<const uint4 *>(x) + 4 * c;
#pragma unroll
            for (int i = 0; i < 4; ++i) vv[i] = x4[i];
            if (SILU) {
                const uint4 *u4 = reinterpret_cast<const uint4 *>(x + K) + 4 * c;
                uint4 up[4];
#pragma unroll
                for (int i = 0; i < 4; ++i) up[i] = u4[i];
                const __nv_bfloat16 *uv = reinterpret_cast<const __nv_bfloat16 *>(up);
#pragma unroll
                for (int i = 0; i < 32; ++i) v[i] = __float2bfloat16(silu_mul(__bfloat162float(v[i]), __bfloat162float(uv[i])));
            }
        } else {
#pragma unroll
            for (int i = 0; i < 32; ++i) {
                const int k = 32 * c + i;
                v[i] = __float2bfloat16(k < K ? input_at<SILU>(x, K, k) : 0.f);
            }
        }
        float m = 0.f;
#pragma unroll
        for (int i = 0; i < 32; ++i) m = fmaxf(m, fabsf(__bfloat162float(v[i])));
        const float sc = m > 0.f ? m / 32767.f : 1.f, inv = 1.f / sc;
        uint32_t pl[4][4];  // [even high, even low, odd high, odd low][word]
        int sum = 0;
#pragma unroll
        for (int w = 0; w < 4; ++w) {
#pragma unroll
            for (int p = 0; p < 4; ++p) pl[p][w] = 0;
#pragma unroll
            for (int e = 0; e < 4; ++e) {
#pragma unroll
                for (int odd = 0; odd < 2; ++odd) {
                    const int xi = fixed16(__bfloat162float(v[8 * w + 2 * e + odd]), inv);
                    sum += xi;
                    pl[2 * odd][w] |= (uint32_t)((xi >> 8) & 0xff) << (8 * e);
                    pl[2 * odd + 1][w] |= (uint32_t)(xi & 0xff) << (8 * e);
                }
            }
        }
#pragma unroll
        for (int p = 0; p < 4; ++p) xsm[p * chunks + c] = make_uint4(pl[p][0], pl[p][1], pl[p][2], pl[p][3]);
        reinterpret_cast<float2 *>(xsm + 4 * chunks)[c] = make_float2(sc, sc * (float)sum);
    }
    __syncthreads();
    if (row0 >= N) return;
    float acc = 0.f;
    stream_rows(
        wa, wb, row0, N, chunks, stride, 32 * UNROLL,
        [&](Batch4 &w, int row, int base) {
            load_batch4(w.w, w.sz, w4 + row * rstride, p2 + row * pstride, base + lane, chunks, G);
        },
        [&](const Batch4 &w, int base) { use_batch4(acc, w.w, w.sz, xsm, base + lane, chunks); },
        [&](int row) { finish_row4<BIAS>(acc, lane, row, b, y), acc = 0.f; });
}

template <int WARPS, bool PDL, bool SILU, bool BIAS, int MINB>
static int launch4(const void *packed, const void *pairs, const void *x, const void *b, void *y, int N, int K, int Kp,
                   int G, int ng2, int max_ctas, cudaStream_t stream) {
    const int ctas = (N + WARPS - 1) / WARPS, grid = max_ctas > 0 ? min(ctas, max_ctas) : ctas;
    return launch_kernel(gemv_int4<WARPS, PDL, SILU, BIAS, MINB>, grid, WARPS * 32, (size_t)(Kp / 32) * 72, PDL, stream,
                         (const uint8_t *)packed, (const float *)pairs, (const __nv_bfloat16 *)x,
                         (const __nv_bfloat16 *)b, (__nv_bfloat16 *)y, N, K, Kp, G, ng2, grid == ctas ? N : grid * WARPS);
}

// warps: 8 or 16 rows per CTA; minb: 1, or the registers capped for that many CTAs per SM (2 x 16 or
// 3 x 8 warps); max_ctas: as fastllm_gemv_int8's. Returns a cudaError_t (0: launched on `stream`),
// -1 for other warps / minb.
extern "C" int fastllm_gemv_int4(const void *packed, const void *pairs, const void *x, const void *b, void *y, int N,
                                 int K, int Kp, int G, int ng2, int warps, int pdl, int silu, int minb, int max_ctas,
                                 uintptr_t stream) {
    cudaStream_t st = (cudaStream_t)stream;
#define PICK(W, P, S, M)                                                                                    \
    if (warps == W && pdl == P && silu == S && minb == M)                                                   \
        return b ? launch4<W, P, S, true, M>(packed, pairs, x, b, y, N, K, Kp, G, ng2, max_ctas, st)        \
                 : launch4<W, P, S, false, M>(packed, pairs, x, b, y, N, K, Kp, G, ng2, max_ctas, st);
#define PICK_M(W, P, S, M2) PICK(W, P, S, 1) PICK(W, P, S, M2)
    PICK_M(8, 1, 1, 3) PICK_M(8, 1, 0, 3) PICK_M(8, 0, 1, 3) PICK_M(8, 0, 0, 3)
    PICK_M(16, 1, 1, 2) PICK_M(16, 1, 0, 2) PICK_M(16, 0, 1, 2) PICK_M(16, 0, 0, 2)
#undef PICK_M
#undef PICK
    return -1;
}
