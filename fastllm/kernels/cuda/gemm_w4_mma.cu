// y [M, N] = x [M, K] @ dequant(W)^T (+ bias) for a few tokens (up to 64 per CTA) and int4 weights in
// groups of 128 (fastllm.stages.quantizers.int4's storage: packed [N, Kp / 2], low nibble first, and
// its (scale, zero) pairs [N, ng2, 2]); x, y bf16. Tensor cores through mma.sync m16n8k16, the weight
// as the A operand straight from global memory into registers, x through shared memory.
//
// The Triton GEMM dequantizes each weight through fp32 (unpack, convert, subtract, multiply, convert:
// about seven instructions a weight, and at 64 tokens that work, not the bytes, sets its time).
// Here a pair of weights costs one lop3 and two bf16x2 fmas:
// - No unpacking into k order. A lane loads 16 bytes of a row (32 consecutive k) in one load, and the
//   order in which the k's meet the tensor core is chosen to suit those registers: the mma's k pairs
//   are (k, k + 4) of each 8-k word, taken by one lop3 (nibbles s and s + 4 of a word sit at bits 4 s
//   and 4 s + 16). x is put into the same order once per CTA and group in shared memory
//   (reorder_x: four byte_perms per 8 k of a token), so the sum is the same.
// - Each nibble becomes bf16 through its bits: 0x4300 | q is 128 + q exactly; adding -(128 + zero)
//   gives q - zero exactly (a whole number within +-15), and one fma by the bf16 scale rounds it once,
//   as CUTLASS's int4 GEMM (bf16 scale) forms it.
//
// Layout: a warp owns RT tiles of 16 weight rows (in each, rows lane / 4 and lane / 4 + 8) and all of
// the CTA's tokens (NT tiles of 8); lane % 4 (c) owns bytes [16 c, 16 c + 16) of each row's 64-byte
// group, loaded straight into registers two groups ahead. x reaches shared memory by cp.async,
// STAGES groups in flight (block_at), and is reordered for the mmas one group ahead (unit_at).
//
// Split-K: grid z splits K's groups; each CTA writes its fp32 partial sums to its slice of a
// workspace and counts itself in on its tile's counter; the last to arrive adds the slices in split
// order (the same bits every call), adds the bias, stores y and sets the counter back to zero (as
// fastllm.kernels.qgemm does).
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <stdint.h>

namespace {

constexpr int G = 128;       // k per group (the only group size this kernel takes)
constexpr int STAGES = 4;    // x's groups in flight through cp.async

__device__ __forceinline__ uint4 load_weights(const uint8_t *p) {  // streamed once: not kept in L1
    uint4 v;
    asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
        : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}

__device__ __forceinline__ uint32_t fma_bf16x2(uint32_t a, uint32_t b, uint32_t c) {  // (sm_80's bf16x2 arithmetic)
    uint32_t out;
    asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(out) : "r"(a), "r"(b), "r"(c));
    return out;
}

// The weights (q - zero) * scale of nibbles s and s + 4 of word w, as bf16x2: 0x4300 | q is 128 + q;
// adding -(128 + zero) is exact (a whole number within +-15), then one rounding by the bf16 scale.
__device__ __forceinline__ uint32_t dequant(uint32_t w, int s, uint32_t neg_zero, uint32_t scale) {
    uint32_t q;
    asm("lop3.b32 %0, %1, %2, %3, 0xea;" : "=r"(q) : "r"(w >> (4 * s)), "r"(0x000f000fu), "r"(0x43004300u));
    return fma_bf16x2(fma_bf16x2(q, 0x3f803f80u, neg_zero), scale, 0x80008000u);
}

__device__ __forceinline__ void mma(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0,
                                    uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t pack_bf16(float v) {
    const __nv_bfloat162 h = __float2bfloat162_rn(v);
    return *reinterpret_cast<const uint32_t *>(&h);
}

// x as cp.async lands it: a token's group is 16 blocks of 8 k (16 bytes), block b stored at
// b ^ (b >> 3) ^ 2 (row & 1), so 16-byte accesses of eight threads (blocks b of one row, or
// blocks 4 c + i of rows r, r + 1) meet no bank twice.
__device__ __forceinline__ int block_at(int row, int b) { return row * (G / 8) + (b ^ (b >> 3) ^ ((row & 1) << 1)); }

// x as the mmas read it: 32 units of four bf16 per token and group; block b = 4 c + i's units
// u = 2 b and 2 b + 1 hold (e0 e4 e1 e5) and (e2 e6 e3 e7). Unit u goes to 4 (u % 8) + u / 8 of a
// row of PERM_ROW units: the 8-byte loads of a half-warp (rows r .. r + 3, units 8 c + 2 i + h) meet
// no bank twice, and each lane's address is its own base plus a constant.
constexpr int PERM_ROW = G / 4 + 4;
__device__ __forceinline__ int unit_at(int row, int u) { return row * PERM_ROW + 4 * (u & 7) + (u >> 3); }

struct Args {
    const uint8_t *packed;  // [N, Kp / 2]
    const float2 *pairs;    // [N, ng2]: (scale, zero)
    const __nv_bfloat16 *x, *bias;
    __nv_bfloat16 *y;
    float *ws;     // [splits, M, N] when split
    int *counters; // one per (row block, token block), zero between products
    int M, N, K, Kp, ng2, ldx, ldy, groups_per_split;
};

// Request x's group `grp` of tokens t0 .. t0 + 8 NT into raw (zeros past M and past K; K % 8 == 0).
template <int NT, int THREADS>
__device__ __forceinline__ void request_x(const Args &a, uint4 *raw, int t0, int grp) {
#pragma unroll
    for (int i = 0; i < (NT * 128 + THREADS - 1) / THREADS; ++i) {
        const int idx = threadIdx.x + i * THREADS, t = idx >> 4, b = idx & 15, k = grp * G + b * 8;
        if (NT * 128 % THREADS == 0 || idx < NT * 128) {
            const bool ok = t0 + t < a.M && k < a.K;
            const __nv_bfloat16 *src = a.x + (ok ? (size_t)(t0 + t) * a.ldx + k : 0);
            const uint32_t dst = (uint32_t)__cvta_generic_to_shared(raw + block_at(t, b));
            asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(ok ? 16 : 0));
        }
    }
}

// raw's group into the mmas' order (perm), each thread a few blocks: one 16-byte load, four byte_perms.
template <int NT, int THREADS>
__device__ __forceinline__ void reorder_x(const uint4 *raw, uint2 *perm) {
#pragma unroll
    for (int i = 0; i < (NT * 128 + THREADS - 1) / THREADS; ++i) {
        const int idx = threadIdx.x + i * THREADS, t = idx >> 4, b = idx & 15;
        if (NT * 128 % THREADS == 0 || idx < NT * 128) {
            const uint4 v = raw[block_at(t, b)];  // (e0 e1) (e2 e3) (e4 e5) (e6 e7)
            perm[unit_at(t, 2 * b)] = make_uint2(__byte_perm(v.x, v.z, 0x5410), __byte_perm(v.x, v.z, 0x7632));
            perm[unit_at(t, 2 * b + 1)] = make_uint2(__byte_perm(v.y, v.w, 0x5410), __byte_perm(v.y, v.w, 0x7632));
        }
    }
}

// NT token tiles of 8, WARPS warps of RT x 16 weight rows each.
template <int NT, int WARPS, int RT>
__global__ void __launch_bounds__(WARPS * 32, (RT == 1 ? 512 : 256) / (WARPS * 32)) w4_mma_kernel(const Args a) {
    constexpr int THREADS = WARPS * 32, RAW = NT * 8 * (G / 8), PERM = NT * 8 * PERM_ROW;
    extern __shared__ uint4 smem[];  // raw [STAGES][RAW] (uint4), then perm [2][PERM] (uint2)
    uint4 *raw = smem;
    uint2 *perm = reinterpret_cast<uint2 *>(smem + STAGES * RAW);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, r = lane >> 2, c = lane & 3;
    const int t0 = blockIdx.y * NT * 8;
    const int row0 = (blockIdx.x * WARPS + warp) * 16 * RT;
    const int g_first = blockIdx.z * a.groups_per_split, g_last = min(g_first + a.groups_per_split, a.Kp / G);
    const uint8_t *w[2 * RT];  // rows row0 + 8 j + r, j < 2 RT (clamped: stores are masked)
    const float2 *p[2 * RT];
#pragma unroll
    for (int j = 0; j < 2 * RT; ++j) {
        const int row = min(row0 + 8 * j + r, a.N - 1);
        w[j] = a.packed + (size_t)row * (a.Kp / 2) + 16 * c, p[j] = a.pairs + (size_t)row * a.ng2;
    }

#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if (g_first + s < g_last) request_x<NT, THREADS>(a, raw + s * RAW, t0, g_first + s);
        asm volatile("cp.async.commit_group;");
    }
    float acc[RT][NT][4];
#pragma unroll
    for (int t = 0; t < RT; ++t)
#pragma unroll
        for (int n = 0; n < NT; ++n) acc[t][n][0] = acc[t][n][1] = acc[t][n][2] = acc[t][n][3] = 0.f;
    uint4 q0[2 * RT], q1[2 * RT];  // this group's and the next one's weights
    float2 sz0[2 * RT], sz1[2 * RT];
#pragma unroll
    for (int j = 0; j < 2 * RT; ++j) {
        q0[j] = load_weights(w[j] + g_first * (G / 2)), sz0[j] = p[j][g_first];
        if (g_first + 1 < g_last) q1[j] = load_weights(w[j] + (g_first + 1) * (G / 2)), sz1[j] = p[j][g_first + 1];
    }
    asm volatile("cp.async.wait_group %0;" ::"n"(STAGES - 2));
    __syncthreads();
    reorder_x<NT, THREADS>(raw, perm);

    for (int g = g_first; g < g_last; ++g) {
        const int j = g - g_first;
        // group g + 1's x landed (for this thread); g's reordered x visible to all; the buffers
        // read in the last step free
        asm volatile("cp.async.wait_group %0;" ::"n"(STAGES - 3));
        __syncthreads();
        if (g + STAGES - 1 < g_last) request_x<NT, THREADS>(a, raw + (j + STAGES - 1) % STAGES * RAW, t0, g + STAGES - 1);
        asm volatile("cp.async.commit_group;");
        if (g + 1 < g_last) reorder_x<NT, THREADS>(raw + (j + 1) % STAGES * RAW, perm + ((j + 1) & 1) * PERM);
        uint4 q[2 * RT];
        uint32_t nz[2 * RT], sc[2 * RT];
#pragma unroll
        for (int i = 0; i < 2 * RT; ++i) {
            q[i] = q0[i], q0[i] = q1[i];
            nz[i] = pack_bf16(-128.f - sz0[i].y), sc[i] = pack_bf16(sz0[i].x), sz0[i] = sz1[i];
            if (g + 2 < g_last) q1[i] = load_weights(w[i] + (g + 2) * (G / 2)), sz1[i] = p[i][g + 2];
        }
        const uint2 *buf = perm + (j & 1) * PERM;
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            uint32_t A[RT][2][4];  // step 2 i + h: nibble pairs 2 h (the mma's k 2c, 2c + 1) and 2 h + 1 (2c + 8, 2c + 9)
#pragma unroll
            for (int t = 0; t < RT; ++t)
#pragma unroll
                for (int h = 0; h < 2; ++h)
#pragma unroll
                    for (int e = 0; e < 4; ++e) {  // e: (row r, slot 0) (row r + 8, slot 0) (r, slot 1) (r + 8, slot 1)
                        const uint4 &v = q[2 * t + (e & 1)];
                        const uint32_t word = i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
                        A[t][h][e] = dequant(word, 2 * h + (e >> 1), nz[2 * t + (e & 1)], sc[2 * t + (e & 1)]);
                    }
#pragma unroll
            for (int h = 0; h < 2; ++h)
#pragma unroll
                for (int n = 0; n < NT; ++n) {
                    const uint2 b = buf[unit_at(n * 8 + r, 8 * c + 2 * i + h)];
#pragma unroll
                    for (int t = 0; t < RT; ++t) mma(acc[t][n], A[t][h][0], A[t][h][1], A[t][h][2], A[t][h][3], b.x, b.y);
                }
        }
    }
    asm volatile("cp.async.wait_group 0;");

    // c0 c1: row r, tokens 2c, 2c + 1 of each tile; c2 c3: row r + 8
    if (gridDim.z > 1) {
        float *ws = a.ws + (size_t)blockIdx.z * a.M * a.N;
#pragma unroll
        for (int t = 0; t < RT; ++t)
#pragma unroll
            for (int n = 0; n < NT; ++n)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int tok = t0 + n * 8 + 2 * c + (e & 1), row = row0 + 16 * t + r + (e >> 1) * 8;
                    if (tok < a.M && row < a.N) ws[(size_t)tok * a.N + row] = acc[t][n][e];
                }
        __threadfence();
        __syncthreads();
        __shared__ int last;
        const int tile = blockIdx.y * gridDim.x + blockIdx.x;
        if (threadIdx.x == 0) last = atomicAdd(a.counters + tile, 1) == (int)gridDim.z - 1;
        __syncthreads();
        if (!last) return;
        __threadfence();
        // the slices in split order, each split's loads issued together
#pragma unroll
        for (int t = 0; t < RT; ++t)
#pragma unroll
            for (int n = 0; n < NT; ++n) acc[t][n][0] = acc[t][n][1] = acc[t][n][2] = acc[t][n][3] = 0.f;
        for (int z = 0; z < (int)gridDim.z; ++z) {
            const float *slice = a.ws + (size_t)z * a.M * a.N;
#pragma unroll
            for (int t = 0; t < RT; ++t)
#pragma unroll
                for (int n = 0; n < NT; ++n)
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        const int tok = t0 + n * 8 + 2 * c + (e & 1), row = row0 + 16 * t + r + (e >> 1) * 8;
                        if (tok < a.M && row < a.N) acc[t][n][e] += __ldcg(slice + (size_t)tok * a.N + row);
                    }
        }
        if (threadIdx.x == 0) a.counters[tile] = 0;  // ready for the next product
    }
#pragma unroll
    for (int t = 0; t < RT; ++t)
#pragma unroll
        for (int n = 0; n < NT; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int tok = t0 + n * 8 + 2 * c + (e & 1), row = row0 + 16 * t + r + (e >> 1) * 8;
                if (tok < a.M && row < a.N) {
                    const float b = a.bias ? __bfloat162float(a.bias[row]) : 0.f;
                    a.y[(size_t)tok * a.ldy + row] = __float2bfloat16(acc[t][n][e] + b);
                }
            }
}

template <int NT, int WARPS, int RT>
int launch(const Args &a, int splits, cudaStream_t st) {
    const int smem = STAGES * NT * 8 * G * 2 + 2 * NT * 8 * PERM_ROW * 8;
    static unsigned configured = 0;  // devices (bits) told once that it takes more than 48 KB of shared memory
    int device = 0;
    if (cudaGetDevice(&device) != cudaSuccess || device >= 32 || !(configured >> device & 1u)) {
        const cudaError_t e = cudaFuncSetAttribute(w4_mma_kernel<NT, WARPS, RT>,
                                                   cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
        if (e != cudaSuccess) return (int)e;
        if (device < 32) configured |= 1u << device;
    }
    const int rows = WARPS * 16 * RT;
    const dim3 grid((a.N + rows - 1) / rows, (a.M + NT * 8 - 1) / (NT * 8), splits);
    w4_mma_kernel<NT, WARPS, RT><<<grid, WARPS * 32, smem, st>>>(a);
    return (int)cudaGetLastError();
}

}  // namespace

// Returns 0, a cudaError, or -2 for operands it does not take (the caller checks them first).
extern "C" int fastllm_w4_mma(const void *packed, const void *pairs, const void *x, const void *bias, void *y, void *ws,
                              void *counters, int M, int N, int K, int Kp, int ng2, int ldx, int ldy, int tokens_per_cta,
                              int warps, int row_tiles, int splits, uintptr_t stream) {
    if (K % 8 || Kp % G || K > Kp || splits < 1 || M < 1 || N < 1) return -2;
    const int ngroups = Kp / G;
    Args a{(const uint8_t *)packed, (const float2 *)pairs, (const __nv_bfloat16 *)x, (const __nv_bfloat16 *)bias,
           (__nv_bfloat16 *)y, (float *)ws, (int *)counters, M, N, K, Kp, ng2, ldx, ldy,
           (ngroups + splits - 1) / splits};
    splits = (ngroups + a.groups_per_split - 1) / a.groups_per_split;  // no empty split
    cudaStream_t st = (cudaStream_t)stream;
#define PICK(NT)                                                                                           \
    case NT:                                                                                               \
        return row_tiles == 1 ? (warps == 4 ? launch<NT, 4, 1>(a, splits, st) : launch<NT, 8, 1>(a, splits, st)) \
                              : (warps == 4 ? launch<NT, 4, 2>(a, splits, st) : launch<NT, 8, 2>(a, splits, st));
    if (warps != 4 && warps != 8 || row_tiles != 1 && row_tiles != 2) return -2;
    switch ((tokens_per_cta + 7) / 8) { PICK(1) PICK(2) PICK(3) PICK(4) PICK(5) PICK(6) PICK(7) PICK(8) }
#undef PICK
    return -2;
}
