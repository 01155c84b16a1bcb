// Helpers shared by fastllm's CUDA GEMVs (gemv_int8.cu, gemv_int4.cu).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>
#include <stdint.h>

// A weight chunk streamed once: read-only, not kept in L1.
__device__ __forceinline__ uint4 load_stream(const uint4 *p) {
    uint4 v;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}

// dp4a_XY(a, b, c): c + the dot product of a's and b's four bytes, X / Y: a's / b's bytes signed (s)
// or unsigned (u)
#define FASTLLM_DP4A(NAME, A, B)                                                  \
    __device__ __forceinline__ int NAME(uint32_t a, uint32_t b, int c) {          \
        int d;                                                                    \
        asm("dp4a." A "." B " %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c)); \
        return d;                                                                 \
    }
FASTLLM_DP4A(dp4a_ss, "s32", "s32")
FASTLLM_DP4A(dp4a_su, "s32", "u32")
FASTLLM_DP4A(dp4a_us, "u32", "s32")
FASTLLM_DP4A(dp4a_uu, "u32", "u32")
#undef FASTLLM_DP4A

// Under PDL (sm_90+): wait for the kernel before (its output is this kernel's input), then let the
// next one launch.
template <bool PDL>
__device__ __forceinline__ void pdl_wait() {
#if __CUDA_ARCH__ >= 900
    if (PDL) {
        asm volatile("griddepcontrol.wait;" ::: "memory");
        asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
    }
#endif
}

// bf16(silu(g) * u) for bf16 values g, u, as fastllm.kernels.fused.silu_and_mul rounds it.
__device__ __forceinline__ float silu_mul(float g, float u) {
    return __bfloat162float(__float2bfloat16(g / (1.f + __expf(-g)) * u));
}

// The layer input value k as the unfused ops round it: x[k], or with SILU bf16(silu(x[k]) * x[K + k]).
template <bool SILU>
__device__ __forceinline__ float input_at(const __nv_bfloat16 *x, int K, int k) {
    const float g = __bfloat162float(x[k]);
    return SILU ? silu_mul(g, __bfloat162float(x[K + k])) : g;
}

// 16-bit fixed point of v against scale sc's reciprocal inv, as (signed high byte, unsigned low byte)
__device__ __forceinline__ int fixed16(float v, float inv) {
    return max(-32767, min(32767, __float2int_rn(v * inv)));
}

// 16 inputs in 16-bit fixed point against their largest magnitude: signed high bytes into hw, low
// bytes into lw (word j holds inputs 4j .. 4j+3); returns the scale (largest / 32767, or 1 for zeros).
__device__ __forceinline__ float fixed16_planes(const float (&v)[16], uint32_t (&hw)[4], uint32_t (&lw)[4]) {
    float m = 0.f;
#pragma unroll
    for (int i = 0; i < 16; ++i) m = fmaxf(m, fabsf(v[i]));
    const float sc = m > 0.f ? m / 32767.f : 1.f, inv = 1.f / sc;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        hw[j] = 0, lw[j] = 0;
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int xi = fixed16(v[4 * j + e], inv);
            hw[j] |= (uint32_t)((xi >> 8) & 0xff) << (8 * e);
            lw[j] |= (uint32_t)(xi & 0xff) << (8 * e);
        }
    }
    return sc;
}

// A warp's stream of weight batches: rows row0, row0 + stride, ... below N, each in batches of
// `step` chunks (base: a batch's first chunk, the same for the whole warp). The batch in `a`, then
// in `b`, in turn, is used (use(buf, base)) after the one after it (this row's next, else the next
// row's first) was requested into the other set (load(buf, row, base)), so a warp always has loads
// in flight; the two sets are never copied (a copy would wait on the loads). finish(row) after a
// row's last batch. The caller has loaded (row0, 0) into `a`; row0 < N.
template <class Buf, class Load, class Use, class Finish>
__device__ __forceinline__ void stream_rows(Buf &a, Buf &b, int row0, int N, int chunks, int stride, int step,
                                            Load load, Use use, Finish finish) {
    auto next = [&](int &row, int &base) {
        base += step;
        if (base >= chunks) row += stride, base = 0;
    };
    for (int row = row0, base = 0;;) {
        int nrow = row, nbase = base;
        next(nrow, nbase);
        if (nrow < N) load(b, nrow, nbase);
        use(a, base);
        if (nrow != row) finish(row);
        row = nrow, base = nbase;
        if (row >= N) break;
        next(nrow, nbase);
        if (nrow < N) load(a, nrow, nbase);
        use(b, base);
        if (nrow != row) finish(row);
        row = nrow, base = nbase;
        if (row >= N) break;
    }
}

// Launch on `stream`, as a programmatic dependent of the kernel before when pdl.
template <typename Kernel, typename... Args>
static int launch_kernel(Kernel kernel, int grid, int block, size_t smem, bool pdl, cudaStream_t stream, Args... args) {
    if (smem > 48 * 1024)  // shared memory past 48 KiB needs the opt-in
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(grid);
    cfg.blockDim = dim3(block);
    cfg.dynamicSmemBytes = smem;
    cfg.stream = stream;
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    cfg.attrs = attr;
    cfg.numAttrs = pdl ? 1 : 0;
    cudaLaunchKernelEx(&cfg, kernel, args...);
    return (int)cudaGetLastError();
}

// Two e4m3 bytes (the low one first) as an f16 pair, exactly (one cvt on sm_89 and later).
__device__ __forceinline__ __half2 e4m3x2_to_half2(uint32_t two) {
    const __half2_raw r = __nv_cvt_fp8x2_to_halfraw2((__nv_fp8x2_storage_t)two, __NV_E4M3);
    return *reinterpret_cast<const __half2 *>(&r);
}

__device__ __forceinline__ __half2 as_half2(uint32_t w) { return *reinterpret_cast<const __half2 *>(&w); }

// 16 inputs over a power-of-two scale (the smallest above their largest magnitude, so each is in
// (-1, 1)) as f16 pairs: inputs 0-7 into lo_pairs, 8-15 into hi_pairs (word j: inputs 2j, 2j + 1);
// returns the scale. bf16 inputs are exact in f16 after the scale, down to 2^-24 of it.
__device__ __forceinline__ float half_pairs(const float (&v)[16], uint32_t (&lo_pairs)[4], uint32_t (&hi_pairs)[4]) {
    float m = 0.f;
#pragma unroll
    for (int i = 0; i < 16; ++i) m = fmaxf(m, fabsf(v[i]));
    int e = 0;
    frexpf(m, &e);  // m = f 2^e, f in [0.5, 1) (e = 0 for m = 0)
    const float sc = ldexpf(1.f, e), inv = ldexpf(1.f, -e);
#pragma unroll
    for (int j = 0; j < 8; ++j) {
        const __half2 p = __floats2half2_rn(v[2 * j] * inv, v[2 * j + 1] * inv);
        (j < 4 ? lo_pairs[j] : hi_pairs[j - 4]) = *reinterpret_cast<const uint32_t *>(&p);
    }
    return sc;
}
