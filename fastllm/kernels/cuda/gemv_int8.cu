// The int8 weight-only GEMV of batch-1 decode, in CUDA (built by fastllm.kernels.cuda_gemv with nvcc
// on first use; fastllm.kernels.gemv falls back to its Triton kernels where it cannot be built), and
// its form for float8 e4m3 weights (FP8, fastllm_gemv_fp8; see use_batch).
//
// y[n] = (sum_k q[n, k] x[k]) * s[n] (+ b[n]); q int8 [N, K] row-major, K % 16 == 0, rows 16-byte
// aligned; x bf16 [K] (SILU: x = bf16(silu(h[k]) * h[K + k]) from h [2K]; NORM: the RMSNorm before
// the layer, see Input; both as the unfused ops round them); s fp32 [N]; b, y bf16 [N].
// GLU: q [2N, K] holds gate_up_proj's gate rows, then its up rows; y[n] = bf16(silu(g) * u) of the
// layer's bf16 outputs g (row n) and u (row N + n), as the unfused layer and silu_and_mul round them.
//
// Why not Triton (scripts/cuda_gemv_probe.py, H100, the four GEMVs of a Llama-2-7B layer chained
// 32 times): the loads alone stream at 2.9 TB/s, the Triton word GEMV at 2.55, held back by the
// arithmetic between a warp's batches of loads. Here
// - one row per warp (or, on a persistent grid, a stream of rows per warp), WARPS (8 or 16) warps
//   per CTA sharing its input's preparation; each lane streams 16-byte chunks c = lane + 32 i of
//   its row, UNROLL at a time, in two register sets used in turn (no copies between them, which
//   would wait on the loads), so the next batch is requested before the current one is used; the
//   first batch before the PDL wait (the weights do not depend on the kernel before);
// - each CTA prepares the input once, in shared memory: per chunk of 16 values, 16-bit fixed point
//   against the chunk's largest magnitude (scale = that / 32767), split into a signed high and an
//   unsigned low byte plane; a weight word meets them in two dp4a, and the chunk's exact integer
//   sum is scaled once. The only rounding added: at most the chunk's largest / 65534 per input
//   (the int4 GEMV's dp4a path does the same per tile).
#include "common.cuh"

#define UNROLL 4

// GLU: a warp's row is gate row `row`'s chunks, then up row `row2`'s (chunks c - chunks).
// A batch wholly in one of the two rows (the warp-uniform base = first & ~31 tells) takes the plain
// path, without a test per chunk.
template <bool GLU>
__device__ __forceinline__ void load_batch(uint4 (&w)[UNROLL], const uint4 *row, const uint4 *row2, int first,
                                           int chunks) {
    if (GLU && (first & ~31) + 32 * UNROLL <= chunks) return load_batch<false>(w, row, row, first, chunks);
    if (GLU && (first & ~31) >= chunks) return load_batch<false>(w, row2, row2, first - chunks, chunks);
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
        const int c = first + 32 * u;
        if (c < (GLU ? 2 * chunks : chunks)) w[u] = load_stream(GLU && c >= chunks ? row2 + (c - chunks) : row + c);
    }
}

// int8 (FP8 false): xsm holds [chunks] high planes, [chunks] low planes (uint4: 16 bytes of one
// chunk), [chunks] fp32 scales; two dp4a per weight word.
// fp8 (e4m3 weights): xsm holds [chunks] first and [chunks] second halves of each chunk's inputs as
// f16 pairs (uint4: 8 halves), [chunks] fp32 power-of-two scales (the inputs / scale in (-1, 1));
// a weight word gives two f16 pairs by cvt, multiplied into an f16 pair per chunk (|sum| < 16 x 448,
// rounded at f16's 2^-11 per step), which is scaled into the fp32 sum once per chunk.
// GLU: chunks past `chunks` are the up row's, summed into acc2.
template <bool FP8, bool GLU>
__device__ __forceinline__ void use_batch(float &acc, float &acc2, const uint4 (&w)[UNROLL], const uint4 *xsm,
                                          int first, int chunks) {
    if (GLU && (first & ~31) + 32 * UNROLL <= chunks) return use_batch<FP8, false>(acc, acc2, w, xsm, first, chunks);
    if (GLU && (first & ~31) >= chunks) return use_batch<FP8, false>(acc2, acc, w, xsm, first - chunks, chunks);
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
        const int cw = first + 32 * u;
        if (cw >= (GLU ? 2 * chunks : chunks)) continue;
        const bool up = GLU && cw >= chunks;
        const int c = up ? cw - chunks : cw;
        float &sum = up ? acc2 : acc;
        const uint4 h = xsm[c], l = xsm[chunks + c];
        const float sc = reinterpret_cast<const float *>(xsm + 2 * chunks)[c];
        if (FP8) {
#if __CUDA_ARCH__ >= 890  // (below, e4m3 has no cvt: cuda_gemv.fits refuses fp8 there, and the build is 2.5x shorter)
            const uint32_t ww[4] = {w[u].x, w[u].y, w[u].z, w[u].w}, xw[8] = {h.x, h.y, h.z, h.w, l.x, l.y, l.z, l.w};
            __half2 a = __float2half2_rn(0.f);
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                a = __hfma2(e4m3x2_to_half2(ww[j] & 0xffffu), as_half2(xw[2 * j]), a);
                a = __hfma2(e4m3x2_to_half2(ww[j] >> 16), as_half2(xw[2 * j + 1]), a);
            }
            sum = fmaf(__low2float(a) + __high2float(a), sc, sum);
#else
            sum = __int_as_float(0x7fc00000);  // NaN: never launched on these cards
#endif
        } else {
            int ah = dp4a_ss(w[u].x, h.x, 0), al = dp4a_su(w[u].x, l.x, 0);
            ah = dp4a_ss(w[u].y, h.y, ah), al = dp4a_su(w[u].y, l.y, al);
            ah = dp4a_ss(w[u].z, h.z, ah), al = dp4a_su(w[u].z, l.z, al);
            ah = dp4a_ss(w[u].w, h.w, ah), al = dp4a_su(w[u].w, l.w, al);
            sum = fmaf((float)(ah * 256 + al), sc, sum);  // |ah * 256 + al| <= 16 x 127 x 32767 < 2^31
        }
    }
}

// Lane 0 of the warp that summed row `row` writes it (GLU: with up row N + row's sum acc2).
template <bool BIAS, bool GLU>
__device__ __forceinline__ void finish_row(float acc, float acc2, int lane, int row, int N, const float *__restrict__ s,
                                           const __nv_bfloat16 *__restrict__ b, __nv_bfloat16 *__restrict__ y) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        acc += __shfl_xor_sync(0xffffffffu, acc, o);
        if (GLU) acc2 += __shfl_xor_sync(0xffffffffu, acc2, o);
    }
    if (lane == 0) {
        float out = acc * s[row];
        if (BIAS) out += __bfloat162float(b[row]);
        if (GLU) {
            float up = acc2 * s[N + row];
            if (BIAS) up += __bfloat162float(b[N + row]);
            out = silu_mul(__bfloat162float(__float2bfloat16(out)), __bfloat162float(__float2bfloat16(up)));
        }
        y[row] = __float2bfloat16(out);
    }
}

// The input modes: x as it is, bf16(silu(h[k]) * h[K + k]) from h [2K], or the RMSNorm before the
// layer (of x, or of bf16(x + residual), that sum then written to res_out by the first CTA), rounded
// as fastllm.kernels.fused.rms_norm rounds it: bf16(w[k] * bf16(v[k] * rsqrt(mean(v^2) + eps)));
// GLU: x as it is, into gate and up rows (see the top).
enum Input { PLAIN = 0, SILU = 1, NORM = 2, NORM_RES = 3, GLU = 4 };

// The 16 values of chunk c before any norm: x's, silu-and-mul's, or bf16(x + residual)'s.
template <int MODE>
__device__ __forceinline__ void chunk_values(float (&v)[16], const __nv_bfloat16 *__restrict__ x,
                                             const __nv_bfloat16 *__restrict__ res, int K, int c) {
    const uint4 *x4 = reinterpret_cast<const uint4 *>(x);
    const uint4 xp[2] = {x4[2 * c], x4[2 * c + 1]};
    const __nv_bfloat16 *xv = reinterpret_cast<const __nv_bfloat16 *>(xp);
    if (MODE == SILU) {
        const uint4 *u4 = reinterpret_cast<const uint4 *>(x + K);
        const uint4 up[2] = {u4[2 * c], u4[2 * c + 1]};
        const __nv_bfloat16 *uv = reinterpret_cast<const __nv_bfloat16 *>(up);
#pragma unroll
        for (int i = 0; i < 16; ++i) v[i] = silu_mul(__bfloat162float(xv[i]), __bfloat162float(uv[i]));
    } else if (MODE == NORM_RES) {
        const uint4 *r4 = reinterpret_cast<const uint4 *>(res);
        const uint4 rp[2] = {r4[2 * c], r4[2 * c + 1]};
        const __nv_bfloat16 *rv = reinterpret_cast<const __nv_bfloat16 *>(rp);
#pragma unroll
        for (int i = 0; i < 16; ++i)
            v[i] = __bfloat162float(__float2bfloat16(__bfloat162float(xv[i]) + __bfloat162float(rv[i])));
    } else {
#pragma unroll
        for (int i = 0; i < 16; ++i) v[i] = __bfloat162float(xv[i]);
    }
}

// stride: rows between a warp's rows. N (one row per warp): a CTA per WARPS rows; gridDim.x *
// WARPS (a persistent grid): each warp streams every stride-th row, the next row's first batch
// requested before the current row's last is used, the input prepared once per CTA.
template <int WARPS, bool PDL, int MODE, bool BIAS, bool FP8>
__global__ void __launch_bounds__(WARPS * 32, 32 / WARPS) gemv_int8(const int8_t *__restrict__ q, const __nv_bfloat16 *__restrict__ x,
                                                                   const float *__restrict__ s, const __nv_bfloat16 *__restrict__ b,
                                                                   __nv_bfloat16 *__restrict__ y, int N, int K, int stride,
                                                                   const __nv_bfloat16 *__restrict__ res,
                                                                   const __nv_bfloat16 *__restrict__ nw,
                                                                   __nv_bfloat16 *__restrict__ res_out, float eps) {
    extern __shared__ uint4 xsm[];
    const int lane = threadIdx.x & 31;
    const int row0 = blockIdx.x * WARPS + (threadIdx.x >> 5);
    const int chunks = K >> 4;
    const uint4 *w4 = reinterpret_cast<const uint4 *>(q);
    const size_t rstride = (size_t)chunks;  // uint4 per row
    uint4 wa[UNROLL], wb[UNROLL];
    constexpr bool G = MODE == GLU;
    if (row0 < N) load_batch<G>(wa, w4 + row0 * rstride, w4 + (N + row0) * rstride, lane, chunks);
    pdl_wait<PDL>();  // x (and the residual) come from the kernels before
    float rs = 1.f;  // the norm's 1 / rms
    if (MODE == NORM || MODE == NORM_RES) {
        __shared__ float part[WARPS];
        float ss = 0.f;
        for (int c = threadIdx.x; c < chunks; c += blockDim.x) {
            float v[16];
            chunk_values<MODE>(v, x, res, K, c);
#pragma unroll
            for (int i = 0; i < 16; ++i) ss = fmaf(v[i], v[i], ss);
            if (MODE == NORM_RES && blockIdx.x == 0) {
                uint4 o[2];
                __nv_bfloat16 *ov = reinterpret_cast<__nv_bfloat16 *>(o);
#pragma unroll
                for (int i = 0; i < 16; ++i) ov[i] = __float2bfloat16(v[i]);
                reinterpret_cast<uint4 *>(res_out)[2 * c] = o[0];
                reinterpret_cast<uint4 *>(res_out)[2 * c + 1] = o[1];
            }
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
        if (lane == 0) part[threadIdx.x >> 5] = ss;
        __syncthreads();
        ss = 0.f;
#pragma unroll
        for (int w = 0; w < WARPS; ++w) ss += part[w];
        rs = rsqrtf(ss / K + eps);
    }
    for (int c = threadIdx.x; c < chunks; c += blockDim.x) {
        float v[16];
        chunk_values<MODE>(v, x, res, K, c);
        if (MODE == NORM || MODE == NORM_RES) {
            const uint4 *n4 = reinterpret_cast<const uint4 *>(nw);
            const uint4 np[2] = {n4[2 * c], n4[2 * c + 1]};
            const __nv_bfloat16 *nv = reinterpret_cast<const __nv_bfloat16 *>(np);
#pragma unroll
            for (int i = 0; i < 16; ++i)
                v[i] = __bfloat162float(__float2bfloat16(
                    __bfloat162float(nv[i]) * __bfloat162float(__float2bfloat16(v[i] * rs))));
        }
        uint32_t hw[4], lw[4];  // int8: high and low planes; fp8: the first and second 8 halves
        const float sc = FP8 ? half_pairs(v, hw, lw) : fixed16_planes(v, hw, lw);
        xsm[c] = make_uint4(hw[0], hw[1], hw[2], hw[3]);
        xsm[chunks + c] = make_uint4(lw[0], lw[1], lw[2], lw[3]);
        reinterpret_cast<float *>(xsm + 2 * chunks)[c] = sc;
    }
    __syncthreads();
    if (row0 >= N) return;
    float acc = 0.f, acc2 = 0.f;
    stream_rows(
        wa, wb, row0, N, G ? 2 * chunks : chunks, stride, 32 * UNROLL,
        [&](uint4(&w)[UNROLL], int row, int base) {
            load_batch<G>(w, w4 + row * rstride, w4 + (N + row) * rstride, base + lane, chunks);
        },
        [&](const uint4(&w)[UNROLL], int base) { use_batch<FP8, G>(acc, acc2, w, xsm, base + lane, chunks); },
        [&](int row) { finish_row<BIAS, G>(acc, acc2, lane, row, N, s, b, y), acc = 0.f, acc2 = 0.f; });
}

template <int WARPS, bool PDL, int MODE, bool BIAS, bool FP8>
static int launch(const void *q, const void *x, const void *s, const void *b, void *y, int N, int K, int max_ctas,
                  const void *res, const void *nw, void *res_out, float eps, cudaStream_t stream) {
    const int ctas = (N + WARPS - 1) / WARPS, grid = max_ctas > 0 ? min(ctas, max_ctas) : ctas;
    return launch_kernel(gemv_int8<WARPS, PDL, MODE, BIAS, FP8>, grid, WARPS * 32, (size_t)(K / 16) * 36, PDL, stream,
                         (const int8_t *)q, (const __nv_bfloat16 *)x, (const float *)s, (const __nv_bfloat16 *)b,
                         (__nv_bfloat16 *)y, N, K, grid == ctas ? N : grid * WARPS, (const __nv_bfloat16 *)res,
                         (const __nv_bfloat16 *)nw, (__nv_bfloat16 *)res_out, eps);
}

#define PICK(W, P, M, F)                                                                                     \
    if (warps == W && pdl == P && mode == M)                                                                 \
        return b ? launch<W, P, M, true, F>(q, x, s, b, y, N, K, max_ctas, res, nw, res_out, eps, st)        \
                 : launch<W, P, M, false, F>(q, x, s, b, y, N, K, max_ctas, res, nw, res_out, eps, st);
#define PICK_M(W, P, F) PICK(W, P, PLAIN, F) PICK(W, P, SILU, F) PICK(W, P, NORM, F) PICK(W, P, NORM_RES, F) PICK(W, P, GLU, F)

// warps: 8 or 16 rows per CTA; mode: an Input (res, nw, res_out and eps are read in the NORM modes
// only; GLU: N output rows of a [2N, K] weight); max_ctas > 0: at most that many CTAs, each warp then streaming every (CTAs x warps)-th row
// (0: one row per warp). Returns a cudaError_t (0: launched on `stream`), -1 for other warps / modes.
extern "C" int fastllm_gemv_int8(const void *q, const void *x, const void *s, const void *b, void *y, int N, int K,
                                 int warps, int pdl, int mode, int max_ctas, const void *res, const void *nw,
                                 void *res_out, float eps, uintptr_t stream) {
    cudaStream_t st = (cudaStream_t)stream;
    PICK_M(8, 1, false) PICK_M(8, 0, false) PICK_M(16, 1, false) PICK_M(16, 0, false)
    return -1;
}

// The same for float8 e4m3 weights (q: [N, K] bytes), 16 rows per CTA.
extern "C" int fastllm_gemv_fp8(const void *q, const void *x, const void *s, const void *b, void *y, int N, int K,
                                int warps, int pdl, int mode, int max_ctas, const void *res, const void *nw,
                                void *res_out, float eps, uintptr_t stream) {
    cudaStream_t st = (cudaStream_t)stream;
    PICK_M(16, 1, true) PICK_M(16, 0, true)
    return -1;
}
#undef PICK_M
#undef PICK
