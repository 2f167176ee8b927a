#pragma once
// Shared by the input kernels (act_quant.cu, act_quant_rows.cu, act_quant_mma.cu): element access,
// rounding, and the row and tensor-core kernels' entry points for act_quant()'s dispatch.
#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "duquant_kernels/kernels.h"
#include "launch.cuh"

namespace duquant {
namespace kernels {
namespace act {

__device__ __forceinline__ float load_as_float(const void* base, DType dt, int64_t idx) {
  switch (dt) {
    case DType::kFloat16: return __half2float(static_cast<const __half*>(base)[idx]);
    case DType::kBFloat16: return __bfloat162float(static_cast<const __nv_bfloat16*>(base)[idx]);
    default: return static_cast<const float*>(base)[idx];
  }
}

__device__ __forceinline__ void store_from_float(void* base, DType dt, int64_t idx, float v) {
  switch (dt) {
    case DType::kFloat16: static_cast<__half*>(base)[idx] = __float2half_rn(v); break;
    case DType::kBFloat16: static_cast<__nv_bfloat16*>(base)[idx] = __float2bfloat16_rn(v); break;
    default: static_cast<float*>(base)[idx] = v; break;
  }
}

__host__ __device__ constexpr int dtype_bytes(DType dt) { return dt == DType::kFloat32 ? 4 : 2; }

__device__ __forceinline__ int8_t to_code(float v, float scale, float qmax) {
  // Division (not a reciprocal multiply) and round-half-even, exactly as the reference.
  return static_cast<int8_t>(fminf(fmaxf(rintf(v / scale), -qmax - 1.f), qmax));
}

// Token scales of a CTA's `rows` tokens from row0 on, into scale_s (shared memory) and, by the
// first CTA of a cluster, p.scales. static_token_scales: the layer's static scale.
// token_scales_from_max: scale_s[0..rows) holds this CTA's max |x'| per token over its positions;
// the CTAs of a cluster along y (gridDim.y of them, sharing the tokens' positions) swap maxima
// through distributed shared memory, then s_t = max(max|x'| / qmax, 1e-8). Every thread of the
// CTA calls it (cluster barriers).
__device__ __forceinline__ void static_token_scales(const ActQuantParams& p, float* scale_s, int rows, int64_t row0) {
  const int t = threadIdx.x;
  if (t < rows) {
    scale_s[t] = __ldg(p.static_scale);
    if (p.scales && blockIdx.y == 0) p.scales[row0 + t] = scale_s[t];
  }
}

__device__ __forceinline__ void token_scales_from_max(const ActQuantParams& p, float* scale_s, int rows, int64_t row0,
                                                      float qmax) {
  const int t = threadIdx.x;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  const int split = gridDim.y;
  if (split > 1) {
    namespace cg = cooperative_groups;
    cg::cluster_group cluster = cg::this_cluster();
    cluster.sync();  // every CTA's max is in its shared memory
    float v = 0.f;
    if (t < rows)
      for (int q = 0; q < split; ++q) v = fmaxf(v, *cluster.map_shared_rank(&scale_s[t], q));
    cluster.sync();  // nobody overwrites (or exits with) a max another CTA still reads
    if (t < rows) scale_s[t] = v;
  }
#endif
  if (t < rows) {
    scale_s[t] = fmaxf(scale_s[t] / qmax, 1e-8f);
    if (p.scales && blockIdx.y == 0) p.scales[row0 + t] = scale_s[t];
  }
}

// Zeroes what the GEMM after the input kernels needs zeroed (its split-k arrival counters): the
// first CTA, after the chain wait (until then the memory may still be another kernel's).
__device__ __forceinline__ void clear_for_gemm(const ActQuantParams& p) {
  if (p.clear_count > 0 && blockIdx.x == 0 && blockIdx.y == 0)
    for (int i = threadIdx.x; i < p.clear_count; i += blockDim.x) p.clear[i] = 0;
}

}  // namespace act

// act_quant_rows.cu: the one-kernel input side for rows that fit on one SM. How it runs for given
// parameters: tokens per CTA (0: a row does not fit, the two-pass kernels run), and whether a
// cluster of `split` CTAs shares each row (1-2 tokens per CTA, Hopper).
struct RowsLaunch {
  int tokens = 0;
  bool cluster = false;
  int split = 1;
};
RowsLaunch act_quant_rows_plan(const ActQuantParams& p);
cudaError_t act_quant_rows(const ActQuantParams& p, const RowsLaunch& launch, bool chain, cudaStream_t stream);

// act_quant_mma.cu: the tensor-core input kernel (float16/bfloat16 x, B = 16, codes). How it runs:
// tokens per CTA (0: it does not apply), the CTAs of a cluster sharing each token group's
// positions (Hopper), and whether each warp holds its rotated blocks.
constexpr int kMmaTokens = 16;  // tokens a CTA takes, fewer only where long rows do not fit
struct MmaLaunch {
  int tokens = 0;
  int split = 1;
  bool hold = false;  // each warp's blocks fit its registers: rotated once, not twice
};
MmaLaunch act_quant_mma_plan(const ActQuantParams& p);
cudaError_t act_quant_mma(const ActQuantParams& p, const MmaLaunch& launch, bool chain, cudaStream_t stream);

}  // namespace kernels
}  // namespace duquant
