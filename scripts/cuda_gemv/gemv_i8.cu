// A probe, not part of the package: the int8 weight-only GEMV of a batch-1 decode step written in
// CUDA, to learn whether the 8-bit weight stream's 2.6 TB/s (every Triton kernel tried, against
// bf16's 3.0 on an H100) is Triton's limit or the format's. scripts/cuda_gemv_probe.py builds
// this file with nvcc into a shared library, calls it through ctypes and times it in the chain of
// scripts/chain_gpu.py.
//
// y[n] = (sum_k q[n, k] x[k]) * s[n]: q int8 [N, K] row-major (K % 16 == 0), x bf16 [K], s fp32 [N],
// y bf16 [N]. Each warp owns RPW rows; each lane reads 16-byte chunks c = lane + 32 i of them,
// UNROLL chunks per row at a time, all requested before any is used (and, with PDL, the first
// UNROLL before griddepcontrol.wait: the weights do not depend on the kernel before). A byte
// becomes fp32 32896 + q in one PRMT (q + 128 in the mantissa of 2^15); the sum of x times 32896
// comes off at the end, as fastllm.kernels.gemv_bytes does.
#include "../../fastllm/kernels/cuda/common.cuh"  // load_stream, launch_kernel

#define WARPS 4

__device__ __forceinline__ float byte_f32(uint32_t t, uint32_t sel) {
    return __uint_as_float(__byte_perm(t, 0x47000000u, sel));  // 32768 + (q + 128)
}

// acc[r] += the 16 weights of word quad w[r] times x (16 values, as 8 bf16 pairs xv); xs += sum x
template <int RPW>
__device__ __forceinline__ void chunk_fma(float (&acc)[RPW], float &xs, const uint4 (&w)[RPW], const uint4 (&xv)[2]) {
    float xf[16];
    const uint32_t *xw = reinterpret_cast<const uint32_t *>(&xv[0]);
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        xf[2 * i] = __uint_as_float(xw[i] << 16);
        xf[2 * i + 1] = __uint_as_float(xw[i] & 0xffff0000u);
    }
#pragma unroll
    for (int i = 0; i < 16; ++i) xs += xf[i];
#pragma unroll
    for (int r = 0; r < RPW; ++r) {
        const uint32_t *ww = reinterpret_cast<const uint32_t *>(&w[r]);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            uint32_t t = ww[j] ^ 0x80808080u;
            acc[r] = fmaf(byte_f32(t, 0x7504), xf[4 * j], acc[r]);
            acc[r] = fmaf(byte_f32(t, 0x7514), xf[4 * j + 1], acc[r]);
            acc[r] = fmaf(byte_f32(t, 0x7524), xf[4 * j + 2], acc[r]);
            acc[r] = fmaf(byte_f32(t, 0x7534), xf[4 * j + 3], acc[r]);
        }
    }
}

// COMPUTE false: the weights are loaded and xor-folded, no arithmetic (wrong results: times the
// stream alone, for the question whether the per-byte work limits the rate)
template <int RPW, int UNROLL, bool PDL, bool COMPUTE>
__global__ void __launch_bounds__(WARPS * 32) gemv_i8(const int8_t *__restrict__ q, const __nv_bfloat16 *__restrict__ x,
                                                      const float *__restrict__ s, __nv_bfloat16 *__restrict__ y,
                                                      int N, int K) {
    const int lane = threadIdx.x & 31;
    const int row0 = (blockIdx.x * WARPS + (threadIdx.x >> 5)) * RPW;
    const int chunks = K >> 4;
    const uint4 *xr = reinterpret_cast<const uint4 *>(x);
    const uint4 *wr[RPW];
#pragma unroll
    for (int r = 0; r < RPW; ++r)
        wr[r] = reinterpret_cast<const uint4 *>(q + (size_t)min(row0 + r, N - 1) * K);
    float acc[RPW];
#pragma unroll
    for (int r = 0; r < RPW; ++r) acc[r] = 0.f;
    float xs = 0.f;
    uint4 w[UNROLL][RPW];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
        const int c = lane + 32 * u;
#pragma unroll
        for (int r = 0; r < RPW; ++r)
            if (c < chunks) w[u][r] = load_stream(wr[r] + c);
    }
    pdl_wait<PDL>();
    for (int base = 0;;) {
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            const int c = base + lane + 32 * u;
            if (c < chunks) {
                if (COMPUTE) {
                    uint4 xv[2] = {__ldg(xr + 2 * c), __ldg(xr + 2 * c + 1)};
                    chunk_fma<RPW>(acc, xs, w[u], xv);
                } else {
#pragma unroll
                    for (int r = 0; r < RPW; ++r)
                        acc[r] += __uint_as_float((w[u][r].x ^ w[u][r].y ^ w[u][r].z ^ w[u][r].w) & 0x3f7fffffu);
                }
            }
        }
        base += 32 * UNROLL;
        if (base >= chunks) break;
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            const int c = base + lane + 32 * u;
#pragma unroll
            for (int r = 0; r < RPW; ++r)
                if (c < chunks) w[u][r] = load_stream(wr[r] + c);
        }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        xs += __shfl_xor_sync(0xffffffffu, xs, o);
#pragma unroll
        for (int r = 0; r < RPW; ++r) acc[r] += __shfl_xor_sync(0xffffffffu, acc[r], o);
    }
    if (lane == 0) {
#pragma unroll
        for (int r = 0; r < RPW; ++r)
            if (row0 + r < N) y[row0 + r] = __float2bfloat16((acc[r] - 32896.f * xs) * s[row0 + r]);
    }
}

template <int RPW, int UNROLL, bool PDL, bool COMPUTE>
static int launch(const void *q, const void *x, const void *s, void *y, int N, int K, cudaStream_t stream) {
    return launch_kernel(gemv_i8<RPW, UNROLL, PDL, COMPUTE>, (N + WARPS * RPW - 1) / (WARPS * RPW), WARPS * 32, 0, PDL,
                         stream, (const int8_t *)q, (const __nv_bfloat16 *)x, (const float *)s, (__nv_bfloat16 *)y, N,
                         K);
}

// variant: RPW (1, 2, 4) x UNROLL (4, 8) x PDL (x stream alone, for RPW 1 and 2); returns a
// cudaError_t (0: launched), -1: unknown variant
extern "C" int gemv_i8_launch(const void *q, const void *x, const void *s, void *y, int N, int K, int rpw, int unroll,
                              int pdl, int compute, uintptr_t stream) {
    cudaStream_t st = (cudaStream_t)stream;
#define CASE(R, U, C)                                                                                \
    if (rpw == R && unroll == U && compute == C)                                                     \
        return pdl ? launch<R, U, true, C>(q, x, s, y, N, K, st) : launch<R, U, false, C>(q, x, s, y, N, K, st);
    CASE(1, 4, 1) CASE(1, 8, 1) CASE(2, 4, 1) CASE(2, 8, 1) CASE(4, 4, 1) CASE(4, 8, 1)
    CASE(1, 4, 0) CASE(1, 8, 0) CASE(2, 4, 0) CASE(2, 8, 0)
#undef CASE
    return -1;
}
