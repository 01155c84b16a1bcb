// Weight-only int8 GEMM on Hopper through CUTLASS's mixed-input collective (sm_90a):
// y[M, N] = (x[M, K] @ q[N, K]^T) * scale[N], x and y bf16, q int8, scale fp32.
//
// Computed transposed, y^T = q x^T, so that the int8 weight is CUTLASS's A operand: the collective
// widens it to bf16 in registers (exactly: every int8 is a bf16) and feeds it to wgmma from there,
// with x (K-major, as CUTLASS's B) and the weight both brought into shared memory by TMA, in a
// warp-specialized pipeline (a producer warp loading, consumer warpgroups multiplying). The fp32
// accumulators are scaled per weight row (a column broadcast in the transposed product) and
// rounded to bf16 once, in the epilogue, which writes y^T column-major: y row-major.
//
// Needs CUTLASS's headers (the nvidia-cutlass package) and nvcc with sm_90a.
#include "cutlass/epilogue/fusion/sm90_callbacks_tma_warpspecialized.hpp"
#include "cutlass_common.cuh"

using namespace cute;

namespace {

using namespace fastllm_cutlass;
using Narrow = int8_t;

template <class TileShape, class ClusterShape, class MainSchedule, class EpiSchedule>
struct W8A16 {
    // D = scale (one per row of the transposed product) * accumulator, rounded to bf16
    using RowScale = cutlass::epilogue::fusion::Sm90ColBroadcast<0, TileShape, float, float, Stride<_1, _0, int64_t>>;
    using Mul = cutlass::epilogue::fusion::Sm90Compute<cutlass::multiplies, Wide, float,
                                                       cutlass::FloatRoundStyle::round_to_nearest>;
    using Fusion = cutlass::epilogue::fusion::Sm90EVT<Mul, RowScale, cutlass::epilogue::fusion::Sm90AccFetch>;

    using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
        cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, TileShape, ClusterShape,
        cutlass::epilogue::collective::EpilogueTileAuto, float, float, void, ColumnMajor, 8, Wide, ColumnMajor, 8,
        EpiSchedule, Fusion>::CollectiveOp;

    using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
        cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Narrow, RowMajor, 16, Wide, ColumnMajor, 8, float,
        TileShape, ClusterShape,
        cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
        MainSchedule>::CollectiveOp;

    using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, Mainloop, Epilogue>;
    using Gemm = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;

    // q [N, K], x [M, K], y [M, N], all packed; returns a cudaError_t, or -2 when CUTLASS refuses the shape
    static int run(const void *q, const float *scale, const void *x, void *y, int M, int N, int K,
                   cudaStream_t stream) {
        using StrideA = typename Kernel::StrideA;
        using StrideB = typename Kernel::StrideB;
        using StrideD = typename Kernel::StrideD;
        typename Gemm::Arguments args{
            cutlass::gemm::GemmUniversalMode::kGemm,
            {N, M, K, 1},
            {static_cast<const Narrow *>(q), cutlass::make_cute_packed_stride(StrideA{}, {N, K, 1}),
             static_cast<const Wide *>(x), cutlass::make_cute_packed_stride(StrideB{}, {M, K, 1})},
            {{}, nullptr, {}, static_cast<Wide *>(y), cutlass::make_cute_packed_stride(StrideD{}, {N, M, 1})}};
        args.epilogue.thread = {{scale, 0.f, {}}, {}, {}};
        return launch<Gemm>(args, stream);
    }
};


using Run = int (*)(const void *, const float *, const void *, void *, int, int, int, cudaStream_t);

// per config: (weight rows, tokens, K) per CTA, the cluster, the schedule
const Run RUN[] = {
    W8A16<Shape<_128, _128, _64>, Shape<_1, _1, _1>, Coop, CoopEpi>::run,
    W8A16<Shape<_128, _256, _64>, Shape<_1, _1, _1>, Coop, CoopEpi>::run,
    W8A16<Shape<_64, _128, _64>, Shape<_1, _1, _1>, Ping, PingEpi>::run,
    W8A16<Shape<_128, _64, _64>, Shape<_1, _1, _1>, Coop, CoopEpi>::run,
    W8A16<Shape<_128, _128, _64>, Shape<_2, _1, _1>, Coop, CoopEpi>::run,
    W8A16<Shape<_64, _256, _64>, Shape<_1, _1, _1>, Ping, PingEpi>::run,
    W8A16<Shape<_128, _256, _64>, Shape<_1, _2, _1>, Coop, CoopEpi>::run,
    W8A16<Shape<_256, _128, _64>, Shape<_1, _1, _1>, Coop, CoopEpi>::run,
};
constexpr int CONFIGS = sizeof(RUN) / sizeof(RUN[0]);

}  // namespace

extern "C" int fastllm_w8a16_configs() { return CONFIGS; }

// config: one of RUN's (0 .. CONFIGS - 1). Returns 0 when launched on `stream`, -1 for an unknown
// config, -2 for a shape CUTLASS refuses, else a cudaError_t.
extern "C" int fastllm_w8a16(const void *q, const float *scale, const void *x, void *y, int M, int N, int K, int config,
                             uintptr_t stream) {
    if (config < 0 || config >= CONFIGS) return -1;
    return RUN[config](q, scale, x, y, M, N, K, (cudaStream_t)stream);
}
