// The input side of the fast path: read x once, apply the transform stages (smoothing,
// permutation, block rotations), find each token's scale, write int8 codes (or, weight-only, the
// transformed activations in x's dtype). act_quant() picks between the one-kernel row path
// (act_quant_rows.cu) and the two passes here, which take rows too long for it.
//
// Two passes, each spread over many CTAs so that one token's row is not one CTA's serial work:
// rotate_chunk_kernel (grid: column chunks x groups of 16 tokens) rotates a chunk of whole blocks,
// reading each rotation column once for 16 tokens, and stores the rotated values with the chunk's
// max |x'| per token; quantize_chunk_kernel (grid: tokens x column ranges) reduces those maxima to
// the token's scale and writes codes. With a static scale (or none, weight-only) pass 1 writes the
// result directly.
#include "act_common.cuh"
#include "duquant_kernels/kernels.h"
#include "launch.cuh"

namespace duquant {
namespace kernels {
namespace {

using act::load_as_float;
using act::store_from_float;
using act::to_code;

constexpr int kThreads = 256;

// out[r] = sum_k xs[r][blk*B + k] * R[blk][k][j] for output column o = blk*B + j, for all ROWS rows.
// Summation in k order, float32, like the reference's bmm up to its own summation order.
// BS > 0 is the block size known at compile time: the rotation column is fetched into registers
// with all its loads in flight at once (the loop-carried version waits on each in turn).
template <int ROWS, int BS>
__device__ __forceinline__ void rotate_column(const float* xs, int64_t xs_stride, const float* r_in, int block,
                                              int64_t o, float (&out)[ROWS]) {
  const int64_t blk = o / block;
  const int j = static_cast<int>(o - blk * block);
  const float* rcol = r_in + blk * block * block + j;
  const float* xblk = xs + blk * block;
#pragma unroll
  for (int r = 0; r < ROWS; ++r) out[r] = 0.f;
  if constexpr (BS > 0) {
    float w[BS];
#pragma unroll
    for (int k = 0; k < BS; ++k) w[k] = __ldg(rcol + k * BS);
#pragma unroll
    for (int k = 0; k < BS; ++k)
#pragma unroll
      for (int r = 0; r < ROWS; ++r) out[r] = fmaf(xblk[r * xs_stride + k], w[k], out[r]);
  } else {
    for (int k = 0; k < block; ++k) {
      const float w = __ldg(rcol + k * block);
#pragma unroll
      for (int r = 0; r < ROWS; ++r) out[r] = fmaf(xblk[r * xs_stride + k], w, out[r]);
    }
  }
}

constexpr int kSplitRows = 16;  // tokens per pass-1 CTA

struct SplitLayout {
  int64_t chunk;     // columns per pass-1 CTA: whole blocks, at most kThreads
  int64_t nchunks;
  float* rotated;    // [M, K]
  float* chunk_max;  // [M, nchunks]
};

__host__ __device__ inline SplitLayout split_layout(void* ws, int64_t m, int64_t k, int block) {
  SplitLayout l;
  l.chunk = (kThreads / block) * block;
  l.nchunks = (k + l.chunk - 1) / l.chunk;
  l.rotated = static_cast<float*>(ws);
  l.chunk_max = l.rotated + ((m * k + 63) / 64) * 64;
  return l;
}

template <int BS, DType DT>
__global__ void __launch_bounds__(kThreads) rotate_chunk_kernel(ActQuantParams p) {
  __shared__ float xs[kSplitRows][kThreads];
  __shared__ float row_max[kSplitRows];
  const int block = p.transform.block;
  const SplitLayout l = split_layout(p.workspace, p.m, p.k, block);
  const int64_t c0 = static_cast<int64_t>(blockIdx.x) * l.chunk;
  const int64_t row0 = static_cast<int64_t>(blockIdx.y) * kSplitRows;
  const int rows = p.m - row0 < kSplitRows ? static_cast<int>(p.m - row0) : kSplitRows;
  const int t = threadIdx.x;
  const int64_t o = c0 + t;
  const bool active = t < l.chunk && o < p.k;
  pdl_trigger();  // the next kernel may start; it waits for this one's results itself
  {
    // One permutation lookup per column (the layer's constants: before waiting for the previous
    // kernel, which may still be writing x), then every token's load in flight at once.
    const int64_t src = active ? (p.transform.perm ? __ldg(p.transform.perm + o) : o) : 0;
    const float smooth = active && p.transform.smooth ? __ldg(p.transform.smooth + src) : 1.f;
    pdl_wait();
    act::clear_for_gemm(p);
    float v[kSplitRows];
#pragma unroll
    for (int r = 0; r < kSplitRows; ++r)
      v[r] = active && r < rows ? load_as_float(p.x, DT, (row0 + r) * p.x_stride + src) : 0.f;
#pragma unroll
    for (int r = 0; r < kSplitRows; ++r) xs[r][t] = p.transform.smooth ? v[r] / smooth : v[r];
  }
  if (t < kSplitRows) row_max[t] = 0.f;
  __syncthreads();
  float out[kSplitRows];
  if (active) {
    // Column t of this chunk is column j of block (c0 + t) / B; xs holds the chunk's blocks from 0.
    const int64_t blk = o / block;
    const float* r_shift = p.transform.r_in + (blk - t / block) * block * block;  // block 0 of the chunk
    rotate_column<kSplitRows, BS>(&xs[0][0], kThreads, r_shift, block, t, out);
  }
  if (p.abits == 0) {
    // Weight-only: the transformed activations themselves, in the input's dtype.
#pragma unroll
    for (int r = 0; r < kSplitRows; ++r)
      if (active && r < rows) store_from_float(p.x_out, DT, (row0 + r) * p.k + o, out[r]);
    return;
  }
  if (p.static_scale) {
    // Calibrated scale: codes right away, no second pass.
    const float s = __ldg(p.static_scale);
    const float qmax = static_cast<float>((1 << (p.abits - 1)) - 1);
#pragma unroll
    for (int r = 0; r < kSplitRows; ++r)
      if (active && r < rows) p.codes[(row0 + r) * p.k + o] = to_code(out[r], s, qmax);
    if (blockIdx.x == 0 && t < rows && p.scales) p.scales[row0 + t] = s;
    return;
  }
#pragma unroll
  for (int r = 0; r < kSplitRows; ++r) {  // compile-time index: `out` stays in registers
    if (r >= rows) break;                 // uniform across the CTA, so the shuffles stay converged
    float v = active ? fabsf(out[r]) : 0.f;
    if (active) l.rotated[(row0 + r) * p.k + o] = out[r];
    for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
    if ((t & 31) == 0) atomicMax(reinterpret_cast<int*>(&row_max[r]), __float_as_int(v));
  }
  __syncthreads();
  if (t < rows) l.chunk_max[(row0 + t) * l.nchunks + blockIdx.x] = row_max[t];
}

// The layer's first kernel is chained to the kernel before it (the previous layer's GEMM triggers
// once its main loop is done) at small batches, where its launch and permutation lookups then hide
// behind that GEMM's epilogue: 0.5-1.3 us of a 8-15 us layer at M <= 16 on an H200. At M = 256
// its many early CTAs only took SM slots from that epilogue (up to 2 us slower): launched plainly.
constexpr int64_t kChainFirstKernelMaxM = 64;

template <int BS>
cudaError_t launch_rotate_chunk(const ActQuantParams& p, dim3 grid, cudaStream_t stream) {
  const bool chain = p.chain && p.m <= kChainFirstKernelMaxM;
  switch (p.x_dtype) {
    case DType::kFloat16:
      return launch_kernel(rotate_chunk_kernel<BS, DType::kFloat16>, grid, dim3(kThreads), 0, stream, chain, p);
    case DType::kBFloat16:
      return launch_kernel(rotate_chunk_kernel<BS, DType::kBFloat16>, grid, dim3(kThreads), 0, stream, chain, p);
    default:
      return launch_kernel(rotate_chunk_kernel<BS, DType::kFloat32>, grid, dim3(kThreads), 0, stream, chain, p);
  }
}

// Columns one pass-2 CTA quantizes: 16 per thread, as four 16-byte loads, so the per-CTA cost of
// reducing the token's scale is spread over enough codes (4 per thread left this pass at a third
// of the memory bandwidth at M = 4096).
constexpr int kQuantColsPerCta = kThreads * 16;

template <bool VEC4>  // K % 4 == 0: float4 loads and char4 stores
__global__ void __launch_bounds__(kThreads) quantize_chunk_kernel(ActQuantParams p) {
  __shared__ float scale_s;
  pdl_trigger();
  pdl_wait();  // the rotated values come from rotate_chunk_kernel
  const SplitLayout l = split_layout(p.workspace, p.m, p.k, p.transform.block);
  const int64_t row = blockIdx.x;
  const float qmax = static_cast<float>((1 << (p.abits - 1)) - 1);
  if (threadIdx.x < 32) {
    float v = 0.f;
    for (int64_t c = threadIdx.x; c < l.nchunks; c += 32) v = fmaxf(v, l.chunk_max[row * l.nchunks + c]);
    for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
    if (threadIdx.x == 0) {
      const float s = fmaxf(v / qmax, 1e-8f);
      scale_s = s;
      if (blockIdx.y == 0 && p.scales) p.scales[row] = s;
    }
  }
  __syncthreads();
  const float s = scale_s;
  const int64_t begin = static_cast<int64_t>(blockIdx.y) * kQuantColsPerCta;
  const int64_t end = begin + kQuantColsPerCta < p.k ? begin + kQuantColsPerCta : p.k;
  const float* src = l.rotated + row * p.k;
  int8_t* dst = p.codes + row * p.k;
  if constexpr (VEC4) {
    for (int64_t o = begin + 4 * threadIdx.x; o < end; o += 4 * kThreads) {
      const float4 v = *reinterpret_cast<const float4*>(src + o);
      *reinterpret_cast<char4*>(dst + o) =
          make_char4(to_code(v.x, s, qmax), to_code(v.y, s, qmax), to_code(v.z, s, qmax), to_code(v.w, s, qmax));
    }
  } else {
    for (int64_t o = begin + threadIdx.x; o < end; o += kThreads) dst[o] = to_code(src[o], s, qmax);
  }
}

}  // namespace

bool act_quant_supported(int block) { return block >= 1 && block <= kThreads; }

// Under kAuto the tensor-core kernel runs from M x K = 2^19 on, where 16 tokens fit a CTA (rows of
// up to ~6900 16-bit values). Measured on an H200 (benchmarks/fast_path_breakdown.py): below that
// the row kernel's single pass is quicker (K = 1024, M = 256: 5.1 us against 7.6); past it the
// float32 kernels lose (K = 2048, M = 4096: 45 us against 25; K = 4096: 130 against 60). Longer rows
// leave it fewer tokens a CTA (5 at K = 16384): split over clusters of two it wins from a token
// group per SM (M = 1024: 142 us against 158 for the two passes; M = 4096: 515 against 582) and
// ties below (M = 256: 47.2 against 47.4; benchmarks/results/input_splits_h200.txt).
constexpr int64_t kMmaMinElements = int64_t{1} << 19;
constexpr int64_t kMmaLongRowGroupsPerSm = 1;

// The row kernel reads x once and writes codes once; under kAuto it runs where a row fits except
// where, measured on an H200 (benchmarks/fast_path_breakdown.py), the two passes win: fewer tokens
// than 2 per SM past M = 128 with rows longer than 1024 (M = 256, K = 4096: 21.3 us against 15.8).
// The slice kernels (a permuted copy, then tokens as the mma's n dimension) under kAuto: for rows
// too long for 16 tokens a CTA of the tensor-core kernel, from M = 256 on. Measured on an H200
// (benchmarks/fast_path_breakdown.py), K = 16384: M = 256 47 us -> 35, M = 1024 141 -> 76, M =
// 4096 513 -> 239; M = 64 31 against 18 for the row kernel. On shorter rows the mma kernel stays
// faster (K = 2048, M = 4096: 26 against 38; K = 4096: 60 against 68): the copy alone takes 9.5
// and 18 us there (3.5 TB/s), and the slice kernel issues on under half its cycles (ncu: 0.46 a
// cycle per scheduler at K = 2048).
constexpr int64_t kSliceMinTokens = 256;

bool slices_by_size(const ActQuantParams& p) {
  return p.m >= kSliceMinTokens && p.m * p.k >= kMmaMinElements && act_quant_mma_plan(p).tokens < kMmaTokens;
}

ActQuantPlan act_quant_plan(const ActQuantParams& p) {
  ActQuantPlan plan;
  if (p.kernel == InputKernel::kSlices || (p.kernel == InputKernel::kAuto && slices_by_size(p))) {
    const SliceLaunch s = act_quant_slices_plan(p);
    if (s.tokens > 0) {
      plan.slice_tokens = s.tokens;
      plan.slice_split = s.split;
      plan.workspace_bytes = act_quant_slices_workspace(p);
      return plan;
    }
  }
  // Where the slice kernels do not apply, a request for them picks as kAuto does.
  const InputKernel kind = p.kernel == InputKernel::kSlices ? InputKernel::kAuto : p.kernel;
  if (kind == InputKernel::kMma || (kind == InputKernel::kAuto && p.m * p.k >= kMmaMinElements)) {
    const MmaLaunch mma = act_quant_mma_plan(p);
    const bool auto_ok = mma.tokens == kMmaTokens ||
                         (mma.tokens > 0 && p.m >= kMmaLongRowGroupsPerSm * mma.tokens * p.num_sms);
    if (mma.tokens > 0 && (kind == InputKernel::kMma || auto_ok)) {
      plan.mma_tokens = mma.tokens;
      plan.mma_split = mma.split;
      plan.mma_hold = mma.hold;
      return plan;
    }
  }
  if (kind != InputKernel::kSplit) {
    const RowsLaunch rows = act_quant_rows_plan(p);
    const bool low_m = rows.cluster || rows.tokens == 1;
    if (rows.tokens > 0 && !(kind == InputKernel::kAuto && low_m && p.m > 128 && p.k > 1024)) {
      plan.row_tokens = rows.tokens;
      plan.row_cluster = rows.cluster;
      plan.row_split = rows.split;
      return plan;
    }
  }
  if (p.static_scale || p.abits == 0 || !act_quant_supported(p.transform.block)) return plan;
  const SplitLayout l = split_layout(nullptr, p.m, p.k, p.transform.block);
  plan.workspace_bytes = static_cast<size_t>(((p.m * p.k + 63) / 64) * 64 + p.m * l.nchunks) * sizeof(float);
  return plan;
}

cudaError_t act_quant(const ActQuantParams& p, const ActQuantPlan& plan, cudaStream_t stream) {
  if (p.m == 0) return cudaSuccess;
  const int block = p.transform.block;
  if (plan.slice_tokens > 0)
    return act_quant_slices(p, SliceLaunch{plan.slice_tokens, plan.slice_split},
                            p.chain && p.m <= kChainFirstKernelMaxM, stream);
  if (plan.mma_tokens > 0)
    return act_quant_mma(p, MmaLaunch{plan.mma_tokens, plan.mma_split, plan.mma_hold},
                         p.chain && p.m <= kChainFirstKernelMaxM, stream);
  if (plan.row_tokens > 0)
    return act_quant_rows(p, RowsLaunch{plan.row_tokens, plan.row_cluster, plan.row_split},
                          p.chain && p.m <= kChainFirstKernelMaxM, stream);
  const bool one_pass = p.static_scale != nullptr || p.abits == 0;
  if (!act_quant_supported(block) || (!one_pass && p.workspace == nullptr)) return cudaErrorInvalidValue;
  const SplitLayout l = split_layout(p.workspace, p.m, p.k, block);
  const dim3 grid1(static_cast<unsigned>(l.nchunks), static_cast<unsigned>((p.m + kSplitRows - 1) / kSplitRows));
  cudaError_t e = block == 16 ? launch_rotate_chunk<16>(p, grid1, stream) : launch_rotate_chunk<0>(p, grid1, stream);
  if (e != cudaSuccess || one_pass) return e;
  const dim3 grid2(static_cast<unsigned>(p.m), static_cast<unsigned>((p.k + kQuantColsPerCta - 1) / kQuantColsPerCta));
  // float4 rows need K % 4 == 0 and 16-byte aligned bases (the workspace is; codes rows then are 4-byte aligned)
  const bool vec4 = p.k % 4 == 0 && reinterpret_cast<uintptr_t>(p.codes) % 4 == 0;
  return vec4 ? launch_kernel(quantize_chunk_kernel<true>, grid2, dim3(kThreads), 0, stream, p.chain, p)
              : launch_kernel(quantize_chunk_kernel<false>, grid2, dim3(kThreads), 0, stream, p.chain, p);
}

}  // namespace kernels
}  // namespace duquant
