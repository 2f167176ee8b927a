// The input side of the fast path, one kernel: read x once, apply the transform stages
// (smoothing, permutation, block rotations), find each token's scale, write int8 codes.
//
// A CTA owns ROWS tokens. It stages their permuted (and smoothed) rows in shared memory as float32,
// then runs the block rotation twice: once for the per-token max (dynamic scales), once to write
// codes. Recomputing is cheaper than keeping the rotated rows: B multiply-adds per element against
// shared memory that would otherwise double, and it leaves room for K up to ~28k at one row per CTA.
// Every rotation column is read from global memory (L1/L2) once per CTA and used for all its rows.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>

#include "duquant_kernels/kernels.h"

namespace duquant {
namespace kernels {
namespace {

constexpr int kThreads = 256;

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

// out[r] = sum_k xs[r][blk*B + k] * R[blk][k][j] for output column o = blk*B + j, for all ROWS rows.
// Summation in k order, float32, like the reference's bmm up to its own summation order.
template <int ROWS>
__device__ __forceinline__ void rotate_column(const float* xs, int64_t kpad, const float* r_in, int block, int64_t o,
                                              float (&out)[ROWS]) {
  const int64_t blk = o / block;
  const int j = static_cast<int>(o - blk * block);
  const float* rcol = r_in + blk * block * block + j;
  const float* xblk = xs + blk * block;
#pragma unroll
  for (int r = 0; r < ROWS; ++r) out[r] = 0.f;
  for (int k = 0; k < block; ++k) {
    const float w = __ldg(rcol + k * block);
#pragma unroll
    for (int r = 0; r < ROWS; ++r) out[r] = fmaf(xblk[r * kpad + k], w, out[r]);
  }
}

template <int ROWS>
__global__ void __launch_bounds__(kThreads) act_quant_kernel(ActQuantParams p) {
  extern __shared__ float xs[];  // [ROWS][kpad]
  __shared__ float row_max[ROWS];
  __shared__ float row_scale[ROWS];
  const int block = p.transform.block;
  const int64_t nblocks = (p.k + block - 1) / block;
  const int64_t kpad = nblocks * block;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * ROWS;
  const int rows = p.m - row0 < ROWS ? static_cast<int>(p.m - row0) : ROWS;

  // 1. Stage x~ = (x / smooth)[:, perm], zero-padded to whole blocks (the short block's identity tail).
  for (int r = 0; r < ROWS; ++r) {
    for (int64_t c = threadIdx.x; c < kpad; c += kThreads) {
      float v = 0.f;
      if (r < rows && c < p.k) {
        const int64_t src = p.transform.perm ? __ldg(p.transform.perm + c) : c;
        v = load_as_float(p.x, p.x_dtype, (row0 + r) * p.x_stride + src);
        if (p.transform.smooth) v = v / __ldg(p.transform.smooth + src);
      }
      xs[r * kpad + c] = v;
    }
  }
  if (threadIdx.x < ROWS) row_max[threadIdx.x] = 0.f;
  __syncthreads();

  const bool quantize = p.abits > 0;
  const float qmax = quantize ? static_cast<float>((1 << (p.abits - 1)) - 1) : 0.f;
  float out[ROWS];

  // 2. Per-token scale: max |x'| over the row's K real columns (dynamic), or the calibrated one.
  if (quantize && p.static_scale == nullptr) {
    float local[ROWS];
#pragma unroll
    for (int r = 0; r < ROWS; ++r) local[r] = 0.f;
    for (int64_t o = threadIdx.x; o < p.k; o += kThreads) {
      rotate_column<ROWS>(xs, kpad, p.transform.r_in, block, o, out);
#pragma unroll
      for (int r = 0; r < ROWS; ++r) local[r] = fmaxf(local[r], fabsf(out[r]));
    }
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      float v = local[r];
      for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
      // Non-negative floats order like their bit patterns: an integer atomic max is exact.
      if ((threadIdx.x & 31) == 0) atomicMax(reinterpret_cast<int*>(&row_max[r]), __float_as_int(v));
    }
    __syncthreads();
  }
  if (threadIdx.x < ROWS && static_cast<int>(threadIdx.x) < rows) {
    float s = 1.f;
    if (quantize) s = p.static_scale ? __ldg(p.static_scale) : fmaxf(row_max[threadIdx.x] / qmax, 1e-8f);
    row_scale[threadIdx.x] = s;
    if (p.scales) p.scales[row0 + threadIdx.x] = s;
  }
  __syncthreads();

  // 3. Codes (or the transformed 16-bit activations for the weight-only path); zero padding to
  //    codes_stride so the GEMM can read whole 16-byte chunks.
  const int64_t width = p.k > p.codes_stride ? p.k : p.codes_stride;
  for (int64_t o = threadIdx.x; o < width; o += kThreads) {
    if (o < p.k) rotate_column<ROWS>(xs, kpad, p.transform.r_in, block, o, out);
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      if (r >= rows || o >= p.codes_stride) continue;
      const int64_t dst = (row0 + r) * p.codes_stride + o;
      if (quantize) {
        // Division (not a reciprocal multiply) and round-half-even, exactly as the reference.
        const float q = o < p.k ? fminf(fmaxf(rintf(out[r] / row_scale[r]), -qmax - 1.f), qmax) : 0.f;
        p.codes[dst] = static_cast<int8_t>(q);
      } else {
        store_from_float(p.x_out, p.x_dtype, dst, o < p.k ? out[r] : 0.f);
      }
    }
  }
}

template <int ROWS>
cudaError_t launch(const ActQuantParams& p, int64_t kpad, cudaStream_t stream) {
  const size_t smem = static_cast<size_t>(ROWS) * kpad * sizeof(float);
  auto kernel = act_quant_kernel<ROWS>;
  if (smem > 48 * 1024) {
    cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (e != cudaSuccess) return e;
  }
  const unsigned grid = static_cast<unsigned>((p.m + ROWS - 1) / ROWS);
  kernel<<<grid, kThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace

cudaError_t act_quant(const ActQuantParams& p, cudaStream_t stream) {
  if (p.m == 0) return cudaSuccess;
  const int block = p.transform.block;
  const int64_t kpad = (p.k + block - 1) / block * block;
  // More rows per CTA share the rotation reads; fewer keep every SM busy at small M.
  const int64_t budget = 96 * 1024;
  const int64_t fit = std::max<int64_t>(1, budget / (kpad * static_cast<int64_t>(sizeof(float))));
  const int64_t want = std::max<int64_t>(1, p.m / 264);
  const int64_t rows = std::min<int64_t>(fit, want);
  if (rows >= 8) return launch<8>(p, kpad, stream);
  if (rows >= 4) return launch<4>(p, kpad, stream);
  if (rows >= 2) return launch<2>(p, kpad, stream);
  return launch<1>(p, kpad, stream);
}

}  // namespace kernels
}  // namespace duquant
