// Weight-only int4 GEMM on Hopper through CUTLASS's mixed-input collective (sm_90a), for
// fastllm.stages.quantizers.int4's storage: y[M, N] = x[M, K] @ w[N, K]^T, w = (q - zero) * scale
// per group of G columns, x and y bf16.
//
// As gemm_w8a16.cu: computed transposed (y^T = w x^T) so that the packed weight (two 4-bit values
// per byte along K, the low nibble first: CUTLASS's uint4b_t order) is CUTLASS's A operand, widened
// in registers and fed to wgmma from there. The collective applies each group's scale and zero in
// registers as scale * q + zero', so the caller passes bf16 scales and zero' = -zero * scale,
// both [K / G, N] (N fastest). The epilogue rounds the fp32 sums to bf16 and writes y row-major.
#include "cutlass_common.cuh"

using namespace cute;

namespace {

using namespace fastllm_cutlass;
using Narrow = cutlass::uint4b_t;

template <class TileShape, class ClusterShape, class MainSchedule, class EpiSchedule>
struct W4A16 {
    using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
        cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
        cutlass::epilogue::collective::EpilogueTileAuto, float, float, void, ColumnMajor, 8, Wide, ColumnMajor, 8,
        EpiSchedule>::CollectiveOp;

    using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
        cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, cute::tuple<Narrow, Wide, Wide>, RowMajor, 32, Wide,
        ColumnMajor, 8, float, TileShape, ClusterShape,
        cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
        MainSchedule>::CollectiveOp;

    using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, Mainloop, Epilogue>;
    using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

    // packed [N, K / 2], x [M, K], y [M, N]; scale, zero [K / G, N]. Returns a cudaError_t, or -2
    // when CUTLASS refuses the shape.
    static int run(const void *packed, const void *scale, const void *zero, const void *x, void *y, int M, int N,
                   int K, int G, cudaStream_t stream) {
        using StrideA = typename Kernel::StrideA;
        using StrideB = typename Kernel::StrideB;
        using StrideD = typename Kernel::StrideD;
        using StrideS = typename Mainloop::StrideScale;
        typename Gemm::Arguments args{
            cutlass::gemm::GemmUniversalMode::kGemm,
            {N, M, K, 1},
            {static_cast<const Narrow *>(packed), cutlass::make_cute_packed_stride(StrideA{}, {N, K, 1}),
             static_cast<const Wide *>(x), cutlass::make_cute_packed_stride(StrideB{}, {M, K, 1}),
             static_cast<const Wide *>(scale), cutlass::make_cute_packed_stride(StrideS{}, {N, K / G, 1}), G,
             static_cast<const Wide *>(zero)},
            {{}, nullptr, {}, static_cast<Wide *>(y), cutlass::make_cute_packed_stride(StrideD{}, {N, M, 1})}};
        args.epilogue.thread.alpha = 1.f;
        args.epilogue.thread.beta = 0.f;
        return launch<Gemm>(args, stream);
    }
};

using Run = int (*)(const void *, const void *, const void *, const void *, void *, int, int, int, int, cudaStream_t);

// per config: (weight rows, tokens, K) per CTA, the cluster, the schedule
const Run RUN[] = {
    W4A16<Shape<_128, _128, _64>, Shape<_1, _1, _1>, Coop, CoopEpi>::run,
    W4A16<Shape<_128, _256, _64>, Shape<_1, _1, _1>, Coop, CoopEpi>::run,
    W4A16<Shape<_64, _128, _64>, Shape<_1, _1, _1>, Ping, PingEpi>::run,
    W4A16<Shape<_64, _256, _64>, Shape<_1, _1, _1>, Ping, PingEpi>::run,
    W4A16<Shape<_128, _256, _64>, Shape<_1, _2, _1>, Coop, CoopEpi>::run,
    W4A16<Shape<_256, _128, _64>, Shape<_1, _1, _1>, Coop, CoopEpi>::run,
};
constexpr int CONFIGS = sizeof(RUN) / sizeof(RUN[0]);

}  // namespace

extern "C" int fastllm_w4a16_configs() { return CONFIGS; }

// config: one of RUN's (0 .. CONFIGS - 1); G: a multiple of 64 (the K step) dividing K. Returns 0
// when launched on `stream`, -1 for an unknown config, -2 for a shape CUTLASS refuses, else a
// cudaError_t.
extern "C" int fastllm_w4a16(const void *packed, const void *scale, const void *zero, const void *x, void *y, int M,
                             int N, int K, int G, int config, uintptr_t stream) {
    if (config < 0 || config >= CONFIGS) return -1;
    return RUN[config](packed, scale, zero, x, y, M, N, K, G, (cudaStream_t)stream);
}
