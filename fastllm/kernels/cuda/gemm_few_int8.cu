// The int8 weight-only product for a few tokens (up to 64), on the tensor cores (mma.sync, bf16),
// built by fastllm.kernels.cuda_few with nvcc on first use:
// y[m, n] = (sum_k x[m, k] q[n, k]) * s[n] (+ b[n]); q int8 [N, K] row-major, K % 64 == 0, rows
// 16-byte aligned; x bf16 [M, K] contiguous, M <= 64; s fp32 [N]; b, y bf16.
//
// Why not Triton: fastllm.kernels.qgemm's tiles pass the weight through shared memory (or a layout
// conversion) on its way to the tensor cores, and at 16-64 tokens they are bound by that, not by
// the weight's bytes: on an H200 (2026-11-28) its int8 qkv_proj of Llama-2-7B took 21 us at 16
// tokens and 31 us at 64, where the bytes alone take about 11.
//
// How: the weight is mma's A operand (a fragment: 16 rows x 16 k), the tokens its B operand (8 per
// n-tile). A dot product does not care in which order it takes its k, so within each step of 64 k
// the kernel takes them in the order that hands each lane its fragment values straight from
// memory: lane (g = lane / 4, t = lane % 4) holds, for chunk j of the step (16 k as mma sees them),
// the values at k0 + 16 t + 4 j + (0, 1, 2, 3) as mma's columns 2t, 2t + 1, 2t + 8, 2t + 9, for its
// rows g and g + 8, and for token g of each n-tile the inputs at the same k. So a lane loads 16
// contiguous weight bytes per row per step (one 16-byte load, no shared memory) and 32 contiguous
// bytes of x per token (from L1: a CTA's warps read the same inputs). Bytes become bf16 exactly
// through fp32 (2^23 + q + 128 by a byte permute, minus 2^23 + 128); the scale comes after the sum.
//
// A warp takes 32 rows (two fragments), a CTA 128. Where that leaves few CTAs, K is split over
// `splits` CTAs per row block: each writes its fp32 partial sum to its slice of ws [splits, M, N]
// and counts itself in on the block's counter; the last to arrive adds the slices in split order
// (the same bits every call), scales, adds the bias, stores, and sets the counter back to zero.
#include "common.cuh"

namespace {

constexpr int WARPS = 4, ROWS = 32 * WARPS, STEP = 64;

__device__ __forceinline__ uint32_t bf16_pair(float lo, float hi) {
    const __nv_bfloat162 p = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<const uint32_t *>(&p);
}

// The four signed bytes of w as bf16 pairs: bytes (0, 1) into lo, (2, 3) into hi; exact.
__device__ __forceinline__ void bytes_to_bf16(uint32_t w, uint32_t &lo, uint32_t &hi) {
    const uint32_t u = w ^ 0x80808080u;  // q + 128 per byte
    const float m = 8388736.f;           // 2^23 + 128
    const float f0 = __uint_as_float(__byte_perm(u, 0x4B000000u, 0x7440)) - m;
    const float f1 = __uint_as_float(__byte_perm(u, 0x4B000000u, 0x7441)) - m;
    const float f2 = __uint_as_float(__byte_perm(u, 0x4B000000u, 0x7442)) - m;
    const float f3 = __uint_as_float(__byte_perm(u, 0x4B000000u, 0x7443)) - m;
    lo = bf16_pair(f0, f1);
    hi = bf16_pair(f2, f3);
}

__device__ __forceinline__ void mma_bf16(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                         uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// One step of 64 k: w holds the lane's 16 bytes of its rows (fragment f, half h) at 2 f + h. The
// weight is converted once per step, then each n-tile's inputs are loaded and multiplied in turn
// (fewer registers than holding every tile's inputs).
template <int NT>
__device__ __forceinline__ void step(float (&acc)[2][NT][4], const uint4 (&w)[4], const uint4 *const (&xp)[NT],
                                     int k0) {
    uint32_t a[2][4][4];  // [f][j]: mma's a0..a3
#pragma unroll
    for (int f = 0; f < 2; ++f)
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            bytes_to_bf16(reinterpret_cast<const uint32_t *>(&w[2 * f])[j], a[f][j][0], a[f][j][2]);
            bytes_to_bf16(reinterpret_cast<const uint32_t *>(&w[2 * f + 1])[j], a[f][j][1], a[f][j][3]);
        }
#pragma unroll
    for (int i = 0; i < NT; ++i) {
        uint4 xv[2] = {__ldg(xp[i] + k0 / 8), __ldg(xp[i] + k0 / 8 + 1)};
        const uint32_t *xw = reinterpret_cast<const uint32_t *>(xv);
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
            for (int f = 0; f < 2; ++f)
                mma_bf16(acc[f][i], a[f][j][0], a[f][j][1], a[f][j][2], a[f][j][3], xw[2 * j], xw[2 * j + 1]);
    }
}

template <int NT>
__global__ void __launch_bounds__(32 * WARPS) gemm_few_int8(const int8_t *__restrict__ q, const __nv_bfloat16 *__restrict__ x,
                                                          const float *__restrict__ s, const __nv_bfloat16 *__restrict__ b,
                                                          __nv_bfloat16 *__restrict__ y, float *__restrict__ ws,
                                                          int *__restrict__ counters, int M, int N, int K, int steps) {
    const int lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int row0 = blockIdx.x * ROWS + (threadIdx.x >> 5) * 32;
    const int split = blockIdx.y, splits = gridDim.y;
    const int k_begin = split * steps * STEP, k_end = min(K, k_begin + steps * STEP);
    const uint4 *wp[4];  // rows row0 + 16 f + 8 h + g (the last row for those past N), from byte 16 t
#pragma unroll
    for (int r = 0; r < 4; ++r)
        wp[r] = reinterpret_cast<const uint4 *>(q + (size_t)min(row0 + 8 * r + g, N - 1) * K) + t;
    const uint4 *xp[NT];  // tokens 8 i + g (the last token for those past M), from value 16 t
#pragma unroll
    for (int i = 0; i < NT; ++i)
        xp[i] = reinterpret_cast<const uint4 *>(x + (size_t)min(8 * i + g, M - 1) * K) + 2 * t;
    float acc[2][NT][4] = {};
    uint4 wa[4], wb[4];  // two register sets used in turn (a copy would wait on the loads)
    auto load = [&](uint4 (&w)[4], int k0) {
#pragma unroll
        for (int r = 0; r < 4; ++r) w[r] = load_stream(wp[r] + k0 / 16);
    };
    if (k_begin < k_end) load(wa, k_begin);
    for (int k0 = k_begin; k0 < k_end; k0 += 2 * STEP) {
        if (k0 + STEP < k_end) load(wb, k0 + STEP);
        step<NT>(acc, wa, xp, k0);
        if (k0 + STEP >= k_end) break;
        if (k0 + 2 * STEP < k_end) load(wa, k0 + 2 * STEP);
        step<NT>(acc, wb, xp, k0 + STEP);
    }
    // acc[f][i]: rows row0 + 16 f + g (c 0, 1) and + 8 (c 2, 3), tokens 8 i + 2 t (c 0, 2) and + 1 (c 1, 3)
    __shared__ int last;
    if (splits > 1) {
#pragma unroll
        for (int f = 0; f < 2; ++f)
#pragma unroll
            for (int i = 0; i < NT; ++i)
#pragma unroll
                for (int c = 0; c < 4; ++c) {
                    const int n = row0 + 16 * f + g + 8 * (c >> 1), m = 8 * i + 2 * t + (c & 1);
                    if (n < N && m < M) ws[((size_t)split * M + m) * N + n] = acc[f][i][c];
                }
        __threadfence();
        __syncthreads();
        if (threadIdx.x == 0) last = atomicAdd(&counters[blockIdx.x], 1) == splits - 1;
        __syncthreads();
        if (!last) return;
        __threadfence();
    }
#pragma unroll
    for (int f = 0; f < 2; ++f)
#pragma unroll
        for (int i = 0; i < NT; ++i)
#pragma unroll
            for (int c = 0; c < 4; ++c) {
                const int n = row0 + 16 * f + g + 8 * (c >> 1), m = 8 * i + 2 * t + (c & 1);
                if (n >= N || m >= M) continue;
                float v = acc[f][i][c];
                if (splits > 1) {  // in split order, whichever CTA came last
                    v = 0.f;
                    for (int p = 0; p < splits; ++p) v += __ldcg(ws + ((size_t)p * M + m) * N + n);
                }
                v *= s[n];
                if (b) v += __bfloat162float(b[n]);
                y[(size_t)m * N + n] = __float2bfloat16(v);
            }
    if (splits > 1 && threadIdx.x == 0) counters[blockIdx.x] = 0;  // ready for the next product
}

template <int NT>
int launch(const void *q, const void *x, const void *s, const void *b, void *y, void *ws, void *counters, int M,
           int N, int K, int splits, int steps, cudaStream_t stream) {
    const dim3 grid((N + ROWS - 1) / ROWS, splits);
    gemm_few_int8<NT><<<grid, 32 * WARPS, 0, stream>>>(
        (const int8_t *)q, (const __nv_bfloat16 *)x, (const float *)s, (const __nv_bfloat16 *)b, (__nv_bfloat16 *)y,
        (float *)ws, (int *)counters, M, N, K, steps);
    return (int)cudaGetLastError();
}

}  // namespace

// splits CTAs per 128 rows, each over `steps` steps of 64 k (splits > 1: ws holds splits x M x N fp32,
// counters one zeroed int per 128 rows). Returns a cudaError_t (0: launched).
extern "C" int fastllm_gemm_few_int8(const void *q, const void *x, const void *s, const void *b, void *y, void *ws,
                                     void *counters, int M, int N, int K, int splits, int steps, size_t stream) {
    const cudaStream_t st = (cudaStream_t)stream;
    if (M <= 8) return launch<1>(q, x, s, b, y, ws, counters, M, N, K, splits, steps, st);
    if (M <= 16) return launch<2>(q, x, s, b, y, ws, counters, M, N, K, splits, steps, st);
    if (M <= 32) return launch<4>(q, x, s, b, y, ws, counters, M, N, K, splits, steps, st);
    if (M <= 64) return launch<8>(q, x, s, b, y, ws, counters, M, N, K, splits, steps, st);
    return (int)cudaErrorInvalidValue;
}
