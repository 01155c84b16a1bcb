// y [M, N] = x [M, K] @ dequant(W)^T (+ bias) for a few tokens (up to 64 per CTA) and int4 weights in
// groups of 128 (fastllm.stages.quantizers.int4's storage: packed [N, Kp / 2], low nibble first, and
// its (scale, zero) pairs [N, ng2, 2]); x, y bf16. Tensor cores through mma.sync m16n8k16, the weight
// as the A operand straight from global memory into registers, x through shared memory.
//
// Why not dequantize into bf16 weights first (the Triton GEMM): at 64 tokens that conversion, not the
// bytes, sets the time. Here each nibble costs about one instruction:
// - No unpacking into k order. A lane loads 16 bytes of a row (32 consecutive k) in one load, and the
//   order in which the k's meet the tensor core is chosen to suit those registers: the mma's logical
//   k pairs are (k, k + 4) of each 8-k word, taken by one lop3 each (nibbles 0 and 4 of a word at
//   bits 0 and 16). x is staged into shared memory in that same order, so the sum is the same.
// - Each nibble becomes bf16 through its bits: 0x4300 | q is 128 + q exactly, and adding
//   -(128 + zero) (one bf16x2 fma for two values) gives q - zero, a whole number within +-15,
//   exact in bf16. The mma sums (q - zero) * x over the group in fp32; the group's scale multiplies
//   that sum once (per group, not per weight). So the product is sum_g scale_g * sum_k (q - zero) x_k,
//   with no bf16 rounding of the dequantized weight at all.
//
// Layout: a warp owns 16 weight rows (lane / 4 and lane / 4 + 8) and all of the CTA's tokens (NT tiles
// of 8); lane % 4 (c) owns bytes [16 c, 16 c + 16) of each row's 64-byte group. x's group of 128 k
// per token sits in shared memory as 32 units of four bf16: 8-k block b = 4 c + i holds
// (e0, e4, e1, e5 | e2, e6, e3, e7), and unit u is stored at u ^ (token & 3) ^ (4 * (u >> 4)) so the
// 8-byte loads of a half-warp (tokens r, blocks c) fall in 16 different bank pairs.
//
// Split-K: grid z splits K's groups; each CTA writes its fp32 partial sums to its slice of a
// workspace and counts itself in on its tile's counter; the last to arrive adds the slices in split
// order (the same bits every call), adds the bias, stores y and sets the counter back to zero (as
// fastllm.kernels.qgemm does).
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <stdint.h>

namespace {

constexpr int WARPS = 8;          // 128 weight rows per CTA
constexpr int ROWS = 16 * WARPS;
constexpr int G = 128;            // k per group (the only group size this kernel takes)
constexpr int UNITS = G / 4;      // 8-byte units of x per token and group

__device__ __forceinline__ uint4 load_weights(const uint8_t *p) {  // streamed once: not kept in L1
    uint4 v;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}

__device__ __forceinline__ uint32_t nibbles(uint32_t w, int s) {  // bf16x2 (128 + n_s, 128 + n_{s+4})
    uint32_t out;
    asm("lop3.b32 %0, %1, %2, %3, 0xea;" : "=r"(out) : "r"(w >> (4 * s)), "r"(0x000f000fu), "r"(0x43004300u));
    return out;  // (a & b) | c
}

__device__ __forceinline__ uint32_t add_bf16x2(uint32_t a, uint32_t b) {  // a * 1 + b (sm_80's form of add)
    uint32_t out;
    asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(out) : "r"(a), "r"(0x3f803f80u), "r"(b));
    return out;
}

__device__ __forceinline__ void mma(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0,
                                    uint32_t b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
                 "{%0, %1, %2, %3};"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

__device__ __forceinline__ int unit_at(int token, int u) { return token * UNITS + (u ^ (token & 3) ^ ((u >> 4) << 2)); }

struct Args {
    const uint8_t *packed;  // [N, Kp / 2]
    const float2 *pairs;    // [N, ng2]: (scale, zero)
    const __nv_bfloat16 *x, *bias;
    __nv_bfloat16 *y;
    float *ws;     // [splits, M, N] when split
    int *counters; // one per (row block, token block), zero between products
    int M, N, K, Kp, ng2, ldx, ldy, groups_per_split;
};

// Stage x's group `grp` for tokens t0 .. t0 + 8 NT into shared memory, in the order described above
// (zeros past M and past K; K is a multiple of 8).
template <int NT>
__device__ __forceinline__ void load_x(const Args &a, int t0, int grp, uint4 (&xr)[(NT * 16 + WARPS * 32 - 1) / (WARPS * 32)]) {
#pragma unroll
    for (int i = 0; i < (NT * 16 + WARPS * 32 - 1) / (WARPS * 32); ++i) {
        const int idx = threadIdx.x + i * WARPS * 32, t = idx >> 4, k = grp * G + (idx & 15) * 8;
        xr[i] = make_uint4(0, 0, 0, 0);
        if (idx < NT * 128 && t0 + t < a.M && k < a.K)
            xr[i] = *reinterpret_cast<const uint4 *>(a.x + (size_t)(t0 + t) * a.ldx + k);
    }
}

template <int NT>
__device__ __forceinline__ void store_x(uint2 *sx, const uint4 (&xr)[(NT * 16 + WARPS * 32 - 1) / (WARPS * 32)]) {
#pragma unroll
    for (int i = 0; i < (NT * 16 + WARPS * 32 - 1) / (WARPS * 32); ++i) {
        const int idx = threadIdx.x + i * WARPS * 32, t = idx >> 4, b = idx & 15;
        if (idx < NT * 128) {
            const uint4 v = xr[i];  // (e0 e1) (e2 e3) (e4 e5) (e6 e7)
            sx[unit_at(t, 2 * b)] = make_uint2(__byte_perm(v.x, v.z, 0x5410), __byte_perm(v.x, v.z, 0x7632));
            sx[unit_at(t, 2 * b + 1)] = make_uint2(__byte_perm(v.y, v.w, 0x5410), __byte_perm(v.y, v.w, 0x7632));
        }
    }
}

template <int NT>
__global__ void __launch_bounds__(WARPS * 32) w4_mma_kernel(const Args a) {
    __shared__ uint2 sx[2][NT * 8 * UNITS];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, r = lane >> 2, c = lane & 3;
    const int t0 = blockIdx.y * NT * 8;
    const int row0 = blockIdx.x * ROWS + warp * 16;
    const int rowa = min(row0 + r, a.N - 1), rowb = min(row0 + r + 8, a.N - 1);  // (clamped: stores are masked)
    const int ngroups = a.Kp / G;
    const int g_first = blockIdx.z * a.groups_per_split, g_last = min(g_first + a.groups_per_split, ngroups);

    const uint8_t *wa = a.packed + (size_t)rowa * (a.Kp / 2) + 16 * c, *wb = a.packed + (size_t)rowb * (a.Kp / 2) + 16 * c;
    const float2 *pa = a.pairs + (size_t)rowa * a.ng2, *pb = a.pairs + (size_t)rowb * a.ng2;

    float acc[NT][4];
#pragma unroll
    for (int n = 0; n < NT; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.f;

    // two groups of weights ahead in registers; x one group ahead
    uint4 qa0, qb0, qa1, qb1;
    float2 sa0, sb0, sa1, sb1;
    if (g_first < g_last) {
        qa0 = load_weights(wa + g_first * (G / 2)), qb0 = load_weights(wb + g_first * (G / 2));
        sa0 = pa[g_first], sb0 = pb[g_first];
    }
    if (g_first + 1 < g_last) {
        qa1 = load_weights(wa + (g_first + 1) * (G / 2)), qb1 = load_weights(wb + (g_first + 1) * (G / 2));
        sa1 = pa[g_first + 1], sb1 = pb[g_first + 1];
    }
    uint4 xr[(NT * 16 + WARPS * 32 - 1) / (WARPS * 32)];
    load_x<NT>(a, t0, g_first, xr);

    for (int g = g_first; g < g_last; ++g) {
        uint2 *buf = sx[(g - g_first) & 1];
        store_x<NT>(buf, xr);
        if (g + 1 < g_last) load_x<NT>(a, t0, g + 1, xr);
        const uint4 qa = qa0, qb = qb0;
        const float2 sa = sa0, sb = sb0;
        qa0 = qa1, qb0 = qb1, sa0 = sa1, sb0 = sb1;
        if (g + 2 < g_last) {
            qa1 = load_weights(wa + (g + 2) * (G / 2)), qb1 = load_weights(wb + (g + 2) * (G / 2));
            sa1 = pa[g + 2], sb1 = pb[g + 2];
        }
        __syncthreads();

        const __nv_bfloat162 za2 = __float2bfloat162_rn(-128.f - sa.y), zb2 = __float2bfloat162_rn(-128.f - sb.y);
        const uint32_t za = *reinterpret_cast<const uint32_t *>(&za2), zb = *reinterpret_cast<const uint32_t *>(&zb2);
        float part[NT][4];
#pragma unroll
        for (int n = 0; n < NT; ++n) part[n][0] = part[n][1] = part[n][2] = part[n][3] = 0.f;
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const uint32_t wra = i == 0 ? qa.x : i == 1 ? qa.y : i == 2 ? qa.z : qa.w;
            const uint32_t wrb = i == 0 ? qb.x : i == 1 ? qb.y : i == 2 ? qb.z : qb.w;
#pragma unroll
            for (int h = 0; h < 2; ++h) {  // step 2 i + h: nibble pairs 2 h (slot 0) and 2 h + 1 (slot 1)
                const uint32_t a0 = add_bf16x2(nibbles(wra, 2 * h), za), a1 = add_bf16x2(nibbles(wrb, 2 * h), zb);
                const uint32_t a2 = add_bf16x2(nibbles(wra, 2 * h + 1), za), a3 = add_bf16x2(nibbles(wrb, 2 * h + 1), zb);
                const int u = 8 * c + 2 * i + h;
#pragma unroll
                for (int n = 0; n < NT; ++n) {
                    const uint2 b = buf[unit_at(n * 8 + r, u)];
                    mma(part[n], a0, a1, a2, a3, b.x, b.y);
                }
            }
        }
#pragma unroll
        for (int n = 0; n < NT; ++n) {
            acc[n][0] += sa.x * part[n][0], acc[n][1] += sa.x * part[n][1];
            acc[n][2] += sb.x * part[n][2], acc[n][3] += sb.x * part[n][3];
        }
    }

    // c0 c1: row r, tokens 2c, 2c + 1 of each tile; c2 c3: row r + 8
    const int ra = row0 + r, rb = row0 + r + 8;
    if (gridDim.z > 1) {
        float *ws = a.ws + (size_t)blockIdx.z * a.M * a.N;
#pragma unroll
        for (int n = 0; n < NT; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int t = t0 + n * 8 + 2 * c + (e & 1), row = e < 2 ? ra : rb;
                if (t < a.M && row < a.N) ws[(size_t)t * a.N + row] = acc[n][e];
            }
        __threadfence();
        __syncthreads();
        __shared__ int last;
        const int tile = blockIdx.y * gridDim.x + blockIdx.x;
        if (threadIdx.x == 0) last = atomicAdd(a.counters + tile, 1) == (int)gridDim.z - 1;
        __syncthreads();
        if (!last) return;
        __threadfence();
#pragma unroll
        for (int n = 0; n < NT; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int t = t0 + n * 8 + 2 * c + (e & 1), row = e < 2 ? ra : rb;
                float s = 0.f;
                if (t < a.M && row < a.N)
                    for (int z = 0; z < (int)gridDim.z; ++z) s += __ldcg(a.ws + ((size_t)z * a.M + t) * a.N + row);
                acc[n][e] = s;
            }
        if (threadIdx.x == 0) a.counters[tile] = 0;  // ready for the next product
    }
#pragma unroll
    for (int n = 0; n < NT; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int t = t0 + n * 8 + 2 * c + (e & 1), row = e < 2 ? ra : rb;
            if (t < a.M && row < a.N) {
                const float b = a.bias ? __bfloat162float(a.bias[row]) : 0.f;
                a.y[(size_t)t * a.ldy + row] = __float2bfloat16(acc[n][e] + b);
            }
        }
}

template <int NT>
int launch(const Args &a, int splits, cudaStream_t st) {
    const dim3 grid((a.N + ROWS - 1) / ROWS, (a.M + NT * 8 - 1) / (NT * 8), splits);
    w4_mma_kernel<NT><<<grid, WARPS * 32, 0, st>>>(a);
    return (int)cudaGetLastError();
}

}  // namespace

// Returns 0, a cudaError, or -2 for operands it does not take (the caller checks them first).
extern "C" int fastllm_w4_mma(const void *packed, const void *pairs, const void *x, const void *bias, void *y, void *ws,
                              void *counters, int M, int N, int K, int Kp, int ng2, int ldx, int ldy, int tokens_per_cta,
                              int splits, uintptr_t stream) {
    if (K % 8 || Kp % G || K > Kp || splits < 1 || M < 1 || N < 1) return -2;
    const int ngroups = Kp / G;
    Args a{(const uint8_t *)packed, (const float2 *)pairs, (const __nv_bfloat16 *)x, (const __nv_bfloat16 *)bias,
           (__nv_bfloat16 *)y, (float *)ws, (int *)counters, M, N, K, Kp, ng2, ldx, ldy,
           (ngroups + splits - 1) / splits};
    splits = (ngroups + a.groups_per_split - 1) / a.groups_per_split;  // no empty split
    cudaStream_t st = (cudaStream_t)stream;
    switch ((tokens_per_cta + 7) / 8) {
        case 1: return launch<1>(a, splits, st);
        case 2: return launch<2>(a, splits, st);
        case 3: return launch<3>(a, splits, st);
        case 4: return launch<4>(a, splits, st);
        case 5: return launch<5>(a, splits, st);
        case 6: return launch<6>(a, splits, st);
        case 7: return launch<7>(a, splits, st);
        case 8: return launch<8>(a, splits, st);
    }
    return -2;
}
