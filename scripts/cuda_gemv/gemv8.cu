// Probe, second form (see gemv_i8.cu): the int8 GEMV with its per-byte work cut and overlapped.
// gemv_i8.cu showed that the loads alone stream at 2.9 TB/s on an H100 where the GEMV reads 2.4-2.5:
// the arithmetic between a warp's batches of loads is what holds it back. Here
// - each CTA prepares the input vector once, in shared memory, after the PDL wait (the first batch
//   of weights is already on its way);
// - every warp holds two batches of UNROLL 16-byte chunks per lane in two register sets used in
//   turn (no copies between them, which would wait on the loads), so the next batch is requested
//   before the current one is used;
// - FLOAT: x in fp32, laid out so that each lane's four float4 of a chunk are conflict-free; a
//   byte becomes 32896 + q in one PRMT (q + 128 in the mantissa of 2^15) and the CTA's sum of x
//   times 32896 comes off at the end (as fastllm.kernels.gemv_bytes);
// - DP4A: x in 16-bit fixed point per 16-value chunk (scale = the chunk's largest magnitude /
//   32767), split into a signed high and an unsigned low byte plane; a weight word meets them in
//   two dp4a; the chunk's integer sums are scaled once. Rounding added: at most the chunk's
//   largest / 65534 per input.
// y[n] = (sum_k q[n, k] x[k]) * s[n], q int8 [N, K] (K % 16 == 0), x bf16 [K], s fp32 [N], y bf16.
#include "../../fastllm/kernels/cuda/common.cuh"  // load_stream, dp4a, fixed16_planes, launch_kernel

__device__ __forceinline__ float bf16_lo(uint32_t u) { return __uint_as_float(u << 16); }
__device__ __forceinline__ float bf16_hi(uint32_t u) { return __uint_as_float(u & 0xffff0000u); }

template <int UNROLL>
__device__ __forceinline__ void load_batch(uint4 (&w)[UNROLL], const uint4 *row, int first, int chunks) {
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
        const int c = first + 32 * u;
        if (c < chunks) w[u] = load_stream(row + c);
    }
}

template <int UNROLL, bool DP4A>
__device__ __forceinline__ void use_batch(float &acc, const uint4 (&w)[UNROLL], const uint4 *xsm, int first,
                                          int chunks) {
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
        const int c = first + 32 * u;
        if (c >= chunks) continue;
        const uint32_t ww[4] = {w[u].x, w[u].y, w[u].z, w[u].w};
        if (DP4A) {  // xsm: [chunks] high planes, [chunks] low planes, then [chunks] fp32 scales
            const uint4 h = xsm[c], l = xsm[chunks + c];
            const float sc = reinterpret_cast<const float *>(xsm + 2 * chunks)[c];
            int ah = dp4a_ss(ww[0], h.x, 0), al = dp4a_su(ww[0], l.x, 0);
            ah = dp4a_ss(ww[1], h.y, ah), al = dp4a_su(ww[1], l.y, al);
            ah = dp4a_ss(ww[2], h.z, ah), al = dp4a_su(ww[2], l.z, al);
            ah = dp4a_ss(ww[3], h.w, ah), al = dp4a_su(ww[3], l.w, al);
            acc = fmaf((float)(ah * 256 + al), sc, acc);  // |ah * 256 + al| < 2^31: 16 x 127 x 32767
        } else {  // xsm: float4 [4][chunks]: part j (values 4j .. 4j+3) of chunk c at j * chunks + c
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const float4 xv = reinterpret_cast<const float4 *>(xsm)[j * chunks + c];
                const uint32_t t = ww[j] ^ 0x80808080u;
                acc = fmaf(__uint_as_float(__byte_perm(t, 0x47000000u, 0x7504)), xv.x, acc);
                acc = fmaf(__uint_as_float(__byte_perm(t, 0x47000000u, 0x7514)), xv.y, acc);
                acc = fmaf(__uint_as_float(__byte_perm(t, 0x47000000u, 0x7524)), xv.z, acc);
                acc = fmaf(__uint_as_float(__byte_perm(t, 0x47000000u, 0x7534)), xv.w, acc);
            }
        }
    }
}

template <int UNROLL, bool PDL, bool DP4A>
__global__ void __launch_bounds__(256) gemv8(const int8_t *__restrict__ q, const __nv_bfloat16 *__restrict__ x,
                                             const float *__restrict__ s, __nv_bfloat16 *__restrict__ y, int N, int K) {
    extern __shared__ uint4 xsm[];
    __shared__ float red[8];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    const int row = blockIdx.x * warps + warp;
    const int chunks = K >> 4;
    const uint4 *wr = reinterpret_cast<const uint4 *>(q + (size_t)min(row, N - 1) * K);
    uint4 a[UNROLL], b[UNROLL];
    load_batch<UNROLL>(a, wr, lane, chunks);  // the weights do not depend on the kernel before
    pdl_wait<PDL>();
    // the input vector into shared memory, one chunk of 16 values per thread at a time
    const uint4 *xg = reinterpret_cast<const uint4 *>(x);
    float xsum = 0.f;
    for (int c = threadIdx.x; c < chunks; c += blockDim.x) {
        const uint4 p0 = xg[2 * c], p1 = xg[2 * c + 1];
        const uint32_t u[8] = {p0.x, p0.y, p0.z, p0.w, p1.x, p1.y, p1.z, p1.w};
        float v[16];
#pragma unroll
        for (int i = 0; i < 8; ++i) v[2 * i] = bf16_lo(u[i]), v[2 * i + 1] = bf16_hi(u[i]);
        if (DP4A) {
            uint32_t hw[4], lw[4];
            const float sc = fixed16_planes(v, hw, lw);
            xsm[c] = make_uint4(hw[0], hw[1], hw[2], hw[3]);
            xsm[chunks + c] = make_uint4(lw[0], lw[1], lw[2], lw[3]);
            reinterpret_cast<float *>(xsm + 2 * chunks)[c] = sc;
        } else {
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                reinterpret_cast<float4 *>(xsm)[j * chunks + c] =
                    make_float4(v[4 * j], v[4 * j + 1], v[4 * j + 2], v[4 * j + 3]);
#pragma unroll
                for (int e = 0; e < 4; ++e) xsum += v[4 * j + e];
            }
        }
    }
    if (!DP4A) {  // the CTA's sum of x, for the 32896 offset
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) xsum += __shfl_xor_sync(0xffffffffu, xsum, o);
        if (lane == 0) red[warp] = xsum;
    }
    __syncthreads();
    if (!DP4A) {
        xsum = 0.f;
        for (int i = 0; i < warps; ++i) xsum += red[i];
    }
    float acc = 0.f;
    const int step = 32 * UNROLL;
    for (int first = lane;;) {  // batches in a and b in turn: the next is requested before this one is used
        if (first + step < chunks) load_batch<UNROLL>(b, wr, first + step, chunks);
        use_batch<UNROLL, DP4A>(acc, a, xsm, first, chunks);
        first += step;
        if (first >= chunks) break;
        if (first + step < chunks) load_batch<UNROLL>(a, wr, first + step, chunks);
        use_batch<UNROLL, DP4A>(acc, b, xsm, first, chunks);
        first += step;
        if (first >= chunks) break;
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, o);
    if (lane == 0 && row < N) {
        if (!DP4A) acc -= 32896.f * xsum;
        y[row] = __float2bfloat16(acc * s[row]);
    }
}

template <int UNROLL, bool PDL, bool DP4A>
static int launch(const void *q, const void *x, const void *s, void *y, int N, int K, int warps, cudaStream_t stream) {
    const size_t smem = DP4A ? (size_t)(K / 16) * 36 : (size_t)K * 4;
    return launch_kernel(gemv8<UNROLL, PDL, DP4A>, (N + warps - 1) / warps, warps * 32, smem, PDL, stream,
                         (const int8_t *)q, (const __nv_bfloat16 *)x, (const float *)s, (__nv_bfloat16 *)y, N, K);
}

// warps per CTA (one row each): 1-8; unroll 2, 4 or 8; returns a cudaError_t, -1 for an unknown variant
extern "C" int gemv8_launch(const void *q, const void *x, const void *s, void *y, int N, int K, int warps, int unroll,
                            int pdl, int dp4a, uintptr_t stream) {
    cudaStream_t st = (cudaStream_t)stream;
    if (warps < 1 || warps > 8) return -1;
#define CASE(U)                                                                                                  \
    if (unroll == U) {                                                                                           \
        if (dp4a) return pdl ? launch<U, true, true>(q, x, s, y, N, K, warps, st)                                \
                             : launch<U, false, true>(q, x, s, y, N, K, warps, st);                              \
        return pdl ? launch<U, true, false>(q, x, s, y, N, K, warps, st)                                         \
                   : launch<U, false, false>(q, x, s, y, N, K, warps, st);                                       \
    }
    CASE(2) CASE(4) CASE(8)
#undef CASE
    return -1;
}
