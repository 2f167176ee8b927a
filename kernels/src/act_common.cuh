#pragma once
// Shared by the input kernels (act_quant.cu, act_quant_rows.cu, act_quant_mma.cu): element access,
// rounding, and the row and tensor-core kernels' entry points for act_quant()'s dispatch.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "duquant_kernels/kernels.h"

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
struct MmaLaunch {
  int tokens = 0;
  int split = 1;
  bool hold = false;  // each warp's blocks fit its registers: rotated once, not twice
};
MmaLaunch act_quant_mma_plan(const ActQuantParams& p);
cudaError_t act_quant_mma(const ActQuantParams& p, const MmaLaunch& launch, bool chain, cudaStream_t stream);

}  // namespace kernels
}  // namespace duquant
