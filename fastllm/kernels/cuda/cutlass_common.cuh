// Shared by fastllm's CUTLASS GEMMs (gemm_w8a16.cu, gemm_w4a16.cu): includes, element and layout
// names, the schedules their tiles use, and the launch through CUTLASS's device adapter.
#pragma once
#include <cuda_runtime.h>
#include <stdint.h>

#include "cute/tensor.hpp"
#include "cutlass/cutlass.h"
#include "cutlass/epilogue/collective/collective_builder.hpp"
#include "cutlass/gemm/collective/collective_builder.hpp"
#include "cutlass/gemm/device/gemm_universal_adapter.h"
#include "cutlass/gemm/kernel/gemm_universal.hpp"
#include "cutlass/util/packed_stride.hpp"

namespace fastllm_cutlass {

using Wide = cutlass::bfloat16_t;
using RowMajor = cutlass::layout::RowMajor;
using ColumnMajor = cutlass::layout::ColumnMajor;
using Coop = cutlass::gemm::KernelTmaWarpSpecializedCooperative;
using CoopEpi = cutlass::epilogue::TmaWarpSpecializedCooperative;
using Ping = cutlass::gemm::KernelTmaWarpSpecializedPingpong;
using PingEpi = cutlass::epilogue::TmaWarpSpecialized;

// Launch `args` on `stream`: 0, or -2 when CUTLASS refuses the shape (or it would need a
// workspace: the tile schedulers used need none), else a cudaError_t (-3 if CUTLASS failed
// without one).
template <class Gemm>
int launch(const typename Gemm::Arguments &args, cudaStream_t stream) {
    Gemm gemm;
    if (gemm.can_implement(args) != cutlass::Status::kSuccess) return -2;
    if (Gemm::get_workspace_size(args) != 0) return -2;
    if (gemm.initialize(args, nullptr, stream) != cutlass::Status::kSuccess) return -2;
    if (gemm.run(stream) != cutlass::Status::kSuccess) return (int)cudaGetLastError() ?: -3;
    return (int)cudaGetLastError();
}

}  // namespace fastllm_cutlass
