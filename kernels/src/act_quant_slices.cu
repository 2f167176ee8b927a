// The input side for many tokens on tensor cores (float16/bfloat16 x, B = 16, codes), in two
// kernels that each do one thing at its own speed:
//
// 1. permute_rows_kernel writes x~ = x[:, perm] (x's dtype) to scratch: rows staged in shared
//    memory with 16-byte loads, gathered there through a 16-bit copy of the permutation, stored
//    with 16-byte stores. A copy at memory speed; skipped where there is no permutation.
// 2. rotate_slices_kernel: a CTA takes TM tokens and a slice of the positions (a cluster of S CTAs
//    along y covers the row, Hopper), stages that contiguous slice of x~ and rotates each 16 x 16
//    block for all TM tokens on the tensor cores with the tokens as the mma's n dimension:
//    x'^T = R^T x~^T, m16n8k8 tf32, R^T (one block's rotation, hi and lo tf32 halves, exact as in
//    act_quant_mma.cu) as the A operand loaded once per block and warp, x~ as B fragments read
//    straight from the staged slice. Pass 1 finds each token's max |x'| (swapped over the cluster
//    through distributed shared memory), pass 2 rotates again and writes the codes in place of the
//    block's x~ in shared memory, from where they go out in 16-byte stores.
//
// Why: the one-kernel designs (act_quant_rows.cu, act_quant_mma.cu) stage whole rows, because the
// permutation reads anywhere in a row. At K = 16384 that leaves 5-6 tokens a CTA: each CTA reads
// the whole r_in (1 MB) for them and its 16-token mma tiles run mostly empty (H200, M = 4096: 513
// us for x of 128 MB, which the memory moves in 27). Here the slice is contiguous, a CTA holds
// 16-64 tokens (16 at K = 16384; none fit past K ~ 28000: the plan then returns none), and a
// warp's rotation fragments serve all of them.
//
// The mma's k order within each 8-position step is permuted, A and B alike (logical k c <->
// position 2c, c + 4 <-> 2c + 1), so a lane's two B values are one 32-bit word of x~.
#include <algorithm>

#include "act_common.cuh"
#include "duquant_kernels/kernels.h"
#include "launch.cuh"

namespace duquant {
namespace kernels {
namespace {

using act::code_bits;
using act::mma_tf32;

constexpr int kBlock = 16;  // the block size this path takes
constexpr int kWarps = 8;
constexpr int kThreads = kWarps * 32;
constexpr int kMaxCluster = 8;      // the portable cluster size
constexpr int kPermRowBytes = 32 * 1024;  // rows of x a permute CTA stages per step (at least one)

// ---- kernel 1: x~ = x[:, perm] ---------------------------------------------------------------

__host__ __device__ constexpr int64_t round16(int64_t bytes) { return (bytes + 15) / 16 * 16; }

__host__ __device__ inline int perm_rows_per_step(int64_t k) {
  const int64_t rows = kPermRowBytes / (2 * k);
  return rows < 1 ? 1 : rows > 16 ? 16 : static_cast<int>(rows);
}

__host__ __device__ inline size_t perm_smem_bytes(int64_t k) {
  return static_cast<size_t>(round16(2 * k) + 2 * perm_rows_per_step(k) * 2 * k);  // table + two row slots
}

// Grid-stride over steps of `rows` rows (a CTA builds the permutation table once), the next step's
// rows loading while this one's are gathered. 16-bit elements; K % 8 == 0 (16-byte stores).
__global__ void __launch_bounds__(kThreads) permute_rows_kernel(ActQuantParams p, unsigned short* xt) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int k = static_cast<int>(p.k);
  const int rows = perm_rows_per_step(k);
  unsigned short* table = reinterpret_cast<unsigned short*>(smem);
  unsigned short* slots = reinterpret_cast<unsigned short*>(smem + round16(2 * k));  // two of rows * k each
  auto slot = [&](int i) { return slots + i * rows * k; };
  for (int j = threadIdx.x; j < k; j += kThreads) table[j] = static_cast<unsigned short>(__ldg(p.transform.perm + j));
  pdl_trigger();
  pdl_wait();  // x may come from the kernel before

  const auto* x = static_cast<const unsigned short*>(p.x);
  const bool vec = reinterpret_cast<uintptr_t>(x) % 16 == 0 && p.x_stride % 8 == 0;
  const int64_t steps = (p.m + rows - 1) / rows;
  auto load = [&](int64_t step, unsigned short* dst) {
    const int64_t row0 = step * rows;
    const int n = p.m - row0 < rows ? static_cast<int>(p.m - row0) : rows;
    if (vec) {
      const int per_row = k / 8;
      for (int i = threadIdx.x; i < n * per_row; i += kThreads) {
        const int r = i / per_row, c = i - r * per_row;
        const unsigned d = static_cast<unsigned>(__cvta_generic_to_shared(dst + r * k + 8 * c));
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(d), "l"(x + (row0 + r) * p.x_stride + 8 * c));
      }
    } else {
      for (int i = threadIdx.x; i < n * k; i += kThreads) dst[i] = x[(row0 + i / k) * p.x_stride + i % k];
    }
    asm volatile("cp.async.commit_group;\n" ::: "memory");
  };
  int cur = 0;
  if (blockIdx.x < steps) load(blockIdx.x, slot(0));
  for (int64_t step = blockIdx.x; step < steps; step += gridDim.x) {
    const int64_t next = step + gridDim.x;
    if (next < steps) {
      load(next, slot(cur ^ 1));
      asm volatile("cp.async.wait_group 1;\n" ::: "memory");
    } else {
      asm volatile("cp.async.wait_group 0;\n" ::: "memory");
    }
    __syncthreads();
    const int64_t row0 = step * rows;
    const int n = p.m - row0 < rows ? static_cast<int>(p.m - row0) : rows;
    const int per_row = k / 8;
    for (int i = threadIdx.x; i < n * per_row; i += kThreads) {
      const int r = i / per_row, c = i - r * per_row;
      const unsigned short* src = slot(cur) + r * k;
      const uint4 idx = *reinterpret_cast<const uint4*>(table + 8 * c);
      const uint32_t w[4] = {idx.x, idx.y, idx.z, idx.w};
      uint32_t o[4];
#pragma unroll
      for (int q = 0; q < 4; ++q) o[q] = src[w[q] & 0xffffu] | (static_cast<uint32_t>(src[w[q] >> 16]) << 16);
      *reinterpret_cast<uint4*>(xt + (row0 + r) * k + 8 * c) = make_uint4(o[0], o[1], o[2], o[3]);
    }
    __syncthreads();  // the slot is loaded again two steps on
    cur ^= 1;
  }
}

// ---- kernel 2: rotate and quantize a slice of positions for TM tokens -------------------------

// One block's R^T as this lane's A fragments of both k steps, as loaded (split when used):
// a0 = R[8ks + 2c][g], a1 = R[8ks + 2c][g + 8], a2 = R[8ks + 2c + 1][g], a3 = R[8ks + 2c + 1][g + 8].
struct RotFrag {
  float r[2][4];
};

__device__ __forceinline__ RotFrag fetch_rot(const float* r_in, int b, int lane) {
  const int g = lane >> 2, c = lane & 3;
  const float* rb = r_in + static_cast<int64_t>(b) * (kBlock * kBlock);
  RotFrag f;
#pragma unroll
  for (int ks = 0; ks < 2; ++ks) {
    const float* row = rb + (8 * ks + 2 * c) * kBlock + g;
    f.r[ks][0] = __ldg(row);
    f.r[ks][1] = __ldg(row + 8);
    f.r[ks][2] = __ldg(row + kBlock);
    f.r[ks][3] = __ldg(row + kBlock + 8);
  }
  return f;
}

struct SplitRot {
  uint32_t hi[2][4], lo[2][4];
};

__device__ __forceinline__ SplitRot split_rot(const RotFrag& f) {
  SplitRot s;
#pragma unroll
  for (int ks = 0; ks < 2; ++ks)
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      act::split_tf32(f.r[ks][i], s.hi[ks][i], s.lo[ks][i]);
    }
  return s;
}

// The two 16-bit values of a word of x~ (positions 2c, 2c + 1 of a k step) as exact tf32 bits.
template <DType DT>
__device__ __forceinline__ void word_to_tf32(uint32_t w, uint32_t& b0, uint32_t& b1) {
  if constexpr (DT == DType::kBFloat16) {
    b0 = w << 16;
    b1 = w & 0xffff0000u;
  } else {
    const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&w));
    b0 = __float_as_uint(f.x);
    b1 = __float_as_uint(f.y);
  }
}

// x' of one block (local jb) for the 8 tokens of n-tile nt: c[0] = (position g, token 2c),
// c[1] = (g, 2c + 1), c[2] = (g + 8, 2c), c[3] = (g + 8, 2c + 1).
template <DType DT>
__device__ __forceinline__ void rotate_tile(const unsigned char* xs, int pitch, int jb, int nt, int lane,
                                            const SplitRot& r, float (&c)[4]) {
  const int g = lane >> 2, q = lane & 3;
  const unsigned char* row = xs + (8 * nt + g) * pitch + jb * (2 * kBlock) + 4 * q;
  c[0] = c[1] = c[2] = c[3] = 0.f;
#pragma unroll
  for (int ks = 0; ks < 2; ++ks) {
    uint32_t b0, b1;
    word_to_tf32<DT>(*reinterpret_cast<const uint32_t*>(row + 16 * ks), b0, b1);
    mma_tf32(c, r.lo[ks], b0, b1);
    mma_tf32(c, r.hi[ks], b0, b1);
  }
}

// Shared memory of a CTA: its TM rows of the slice, rows padded by 16 bytes (the B fragment reads
// of a warp then hit 32 distinct banks).
__host__ __device__ constexpr int slice_pitch(int positions) { return 2 * positions + 16; }
__host__ __device__ inline int slice_blocks(int64_t k, int split) {
  return static_cast<int>((k / kBlock + split - 1) / split);
}

// Grid: (token groups of TM, S); clusters of S CTAs along y share a group's row. xt: x~ (or x
// where there is no permutation), row stride xt_stride elements.
template <DType DT, int TM>
__global__ void __launch_bounds__(kThreads, 2) rotate_slices_kernel(ActQuantParams p, const void* xt, int64_t xt_stride) {
  constexpr int NT = TM / 8;
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ float warp_max[kWarps][TM];
  __shared__ float scale_s[TM];
  __shared__ act::MaxSwap<TM> swap;  // (token_scales_pushed)
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, c = lane & 3;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * TM;
  const int rows = static_cast<int>(p.m - row0 < TM ? p.m - row0 : TM);
  act::swap_begin(swap, !p.static_scale, rows);
  const int nb = static_cast<int>(p.k / kBlock);
  const int per_cta = slice_blocks(p.k, gridDim.y);
  const int b_begin = blockIdx.y * per_cta;
  const int nblk = max(0, min(per_cta, nb - b_begin));
  const int pitch = slice_pitch(per_cta * kBlock);
  const float* r_in = p.transform.r_in;
  // A warp's rotations load two blocks ahead of their use (an L2 round trip each); the first two
  // before the chain wait and the staging (layer constants). Past the CTA's blocks: a valid dummy.
  auto fetch = [&](int jb) { return fetch_rot(r_in, jb < nblk ? b_begin + jb : 0, lane); };
  RotFrag f0 = fetch(warp), f1 = fetch(warp + kWarps);

  pdl_trigger();  // the GEMM may launch now; it waits for these codes itself
  pdl_wait();
  act::clear_for_gemm(p);

  // Stage the slice: 16-byte asynchronous copies (x~ is ours, 16-byte aligned; x where there is no
  // permutation may not be: element copies then).
  {
    const auto* src = static_cast<const unsigned char*>(xt) + (row0 * xt_stride + b_begin * kBlock) * 2;
    act::stage_rows16<kThreads>(smem, pitch, src, xt_stride * 2, rows, nblk * kBlock * 2);
  }
  __syncthreads();
  // Rows past the tokens are read by the B fragments of the last n-tiles: their columns of x' are
  // never used, but keep them finite (and the reads defined) by zeroing them.
  for (int i = tid; i < (TM - rows) * (nblk * 2); i += kThreads) {
    const int r = rows + i / (nblk * 2), q = i % (nblk * 2);
    *reinterpret_cast<uint4*>(smem + r * pitch + 16 * q) = make_uint4(0, 0, 0, 0);
  }
  __syncthreads();

  const float qmax = static_cast<float>((1 << (p.abits - 1)) - 1);
  if (p.static_scale) {
    act::static_token_scales(p, scale_s, rows, row0);
  } else {
    float mx[NT][2] = {};  // this lane's max |x'| of tokens 8nt + 2c, 8nt + 2c + 1
    for (int jb = warp; jb < nblk; jb += kWarps) {
      const SplitRot r = split_rot(f0);
      f0 = f1;
      if (jb + 2 * kWarps < nblk) f1 = fetch(jb + 2 * kWarps);  // in flight meanwhile
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        float v[4];
        rotate_tile<DT>(smem, pitch, jb, nt, lane, r, v);
        mx[nt][0] = fmaxf(mx[nt][0], fmaxf(fabsf(v[0]), fabsf(v[2])));
        mx[nt][1] = fmaxf(mx[nt][1], fmaxf(fabsf(v[1]), fabsf(v[3])));
      }
    }
    f0 = fetch(warp);  // pass 2's first two, loading while the scales are settled
    f1 = fetch(warp + kWarps);
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        float v = mx[nt][e];  // the 8 lanes g = 0..7 hold the token's positions
        v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 4));
        v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 8));
        v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 16));
        if (g == 0) warp_max[warp][8 * nt + 2 * c + e] = v;
      }
    __syncthreads();
    if (tid < rows) {
      float v = 0.f;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) v = fmaxf(v, warp_max[w][tid]);
      scale_s[tid] = v;  // this CTA's max
    }
    act::token_scales_pushed(p, scale_s, swap, rows, row0, qmax);
  }
  __syncthreads();

  // Pass 2: codes, written over the block's x~ (only this warp reads that block, and an n-tile's
  // codes land in its own rows, which no later n-tile reads).
  {
    float s[NT][2], inv[NT][2];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int t = 8 * nt + 2 * c + e;
        s[nt][e] = t < rows ? scale_s[t] : 1.f;
        inv[nt][e] = 1.f / s[nt][e];
      }
    for (int jb = warp; jb < nblk; jb += kWarps) {
      const SplitRot r = split_rot(f0);
      f0 = f1;
      if (jb + 2 * kWarps < nblk) f1 = fetch(jb + 2 * kWarps);
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        float v[4];
        rotate_tile<DT>(smem, pitch, jb, nt, lane, r, v);
        __syncwarp();  // every lane has read this n-tile's rows of the block
        unsigned char* out = smem + (8 * nt + 2 * c) * pitch + jb * (2 * kBlock) + g;
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          out[e * pitch] = static_cast<unsigned char>(code_bits(v[e], s[nt][e], inv[nt][e], qmax) & 0xffu);
          out[e * pitch + 8] = static_cast<unsigned char>(code_bits(v[2 + e], s[nt][e], inv[nt][e], qmax) & 0xffu);
        }
      }
    }
  }
  __syncthreads();
  // The codes: 16 per block, at the start of the block's 32 bytes of each row.
  for (int i = tid; i < rows * nblk; i += kThreads) {
    const int r = i / nblk, jb = i - r * nblk;
    *reinterpret_cast<uint4*>(p.codes + (row0 + r) * p.k + (b_begin + jb) * kBlock) =
        *reinterpret_cast<const uint4*>(smem + r * pitch + jb * (2 * kBlock));
  }
}

// Dynamic shared memory a CTA of the rotation takes at most: two CTAs an SM (with the static
// warp and peer maxima, and the 1 KB the SM reserves a CTA, of Hopper's 228 KB), so one CTA's
// staging overlaps the other's rotation.
constexpr int kSliceSmemBudget = 108 * 1024;
constexpr int kTokenTiles[] = {64, 32, 16};
constexpr int kSliceStaticSmem = (kWarps + 1 + act::kMaxPeers) * 64 * static_cast<int>(sizeof(float));  // TM = 64
static_assert(2 * (kSliceSmemBudget + kSliceStaticSmem + 1024) <= 228 * 1024, "two rotation CTAs an SM");

size_t slice_smem_bytes(int tokens, int64_t k, int split) {
  return static_cast<size_t>(tokens) * slice_pitch(slice_blocks(k, split) * kBlock);
}

template <DType DT, int TM>
cudaError_t launch_slices(const ActQuantParams& p, const SliceLaunch& l, const void* xt, int64_t xt_stride,
                          bool chain, cudaStream_t stream) {
  constexpr auto kernel = rotate_slices_kernel<DT, TM>;
  if (cudaError_t e = allow_dynamic_smem<kernel>(kSliceSmemBudget); e != cudaSuccess) return e;
  const dim3 grid(static_cast<unsigned>((p.m + TM - 1) / TM), static_cast<unsigned>(l.split));
  return launch_kernel_clustered(kernel, grid, dim3(kThreads), slice_smem_bytes(TM, p.k, l.split), stream, chain,
                                 dim3(1, static_cast<unsigned>(l.split), 1), p, xt, xt_stride);
}

template <DType DT>
cudaError_t launch_slices_tm(const ActQuantParams& p, const SliceLaunch& l, const void* xt, int64_t xt_stride,
                             bool chain, cudaStream_t stream) {
  switch (l.tokens) {
    case 64: return launch_slices<DT, 64>(p, l, xt, xt_stride, chain, stream);
    case 32: return launch_slices<DT, 32>(p, l, xt, xt_stride, chain, stream);
    default: return launch_slices<DT, 16>(p, l, xt, xt_stride, chain, stream);
  }
}

// The parameters the slice kernels take: 16-bit x, B = 16, no smoothing, codes (16-byte aligned).
bool slices_take(const ActQuantParams& p) {
  return p.x_dtype != DType::kFloat32 && p.transform.block == kBlock && p.transform.smooth == nullptr &&
         p.transform.r_in != nullptr && p.abits >= 2 && p.abits <= 8 && p.codes != nullptr && p.k % kBlock == 0 &&
         p.k >= kBlock && p.k <= 32768 && p.m >= 1 && reinterpret_cast<uintptr_t>(p.codes) % 16 == 0;
}

}  // namespace

// Tokens per CTA and cluster size: the most tokens (64, 32, 16: fewer fetches and splits of the
// rotation per code) whose slice fits two CTAs an SM at the smallest cluster, while the CTAs
// still number at least the SMs. Else the most CTAs (fewer tokens on a tie), the row spread over
// a larger cluster (at least a block per warp) toward the SM count. A larger cluster for 64 or 32
// tokens before trying fewer lost where measured (K = 1024, M = 4096: 64 x 4 27 us, 16 x 1 18).
SliceLaunch act_quant_slices_plan(const ActQuantParams& p) {
  if (!slices_take(p)) return SliceLaunch{};
  const DeviceFacts& dev = device_facts();
  if (!dev.known || !dev.clusters) return SliceLaunch{};  // Hopper: long rows need a cluster to fit
  SliceLaunch best;
  int64_t best_ctas = 0;
  for (int tm : kTokenTiles) {
    int split = 1;
    while (split <= kMaxCluster && slice_smem_bytes(tm, p.k, split) > static_cast<size_t>(kSliceSmemBudget)) split *= 2;
    if (split > kMaxCluster) continue;
    const int64_t ctas = (p.m + tm - 1) / tm * split;
    if (ctas >= p.num_sms) return SliceLaunch{tm, split};
    if (ctas >= best_ctas) {
      best_ctas = ctas;
      best = SliceLaunch{tm, split};
    }
  }
  while (best.tokens > 0 && best_ctas < p.num_sms && 2 * best.split <= kMaxCluster &&
         slice_blocks(p.k, 2 * best.split) >= kWarps) {
    best.split *= 2;
    best_ctas *= 2;
  }
  return best;
}

size_t act_quant_slices_workspace(const ActQuantParams& p) {
  return p.transform.perm ? static_cast<size_t>(round16(p.m * p.k * 2)) : 0;
}

cudaError_t act_quant_slices(const ActQuantParams& p, const SliceLaunch& l, bool chain_first, cudaStream_t stream) {
  // A launch its plan would not make (a hand-built one): refused, not run with blocks unwritten.
  const bool permute = p.transform.perm != nullptr;
  if (!slices_take(p) || l.split < 1 || l.split > kMaxCluster || (l.tokens != 16 && l.tokens != 32 && l.tokens != 64) ||
      (permute && (p.workspace == nullptr || reinterpret_cast<uintptr_t>(p.workspace) % 16 != 0)) ||
      slice_smem_bytes(l.tokens, p.k, l.split) > static_cast<size_t>(kSliceSmemBudget))
    return cudaErrorInvalidValue;
  const void* xt = p.x;
  int64_t xt_stride = p.x_stride;
  bool chain = chain_first;
  if (permute) {
    constexpr auto kernel = permute_rows_kernel;
    const size_t smem = perm_smem_bytes(p.k);
    if (cudaError_t e = allow_dynamic_smem<kernel>(static_cast<int>(perm_smem_bytes(32768))); e != cudaSuccess)
      return e;
    const int64_t steps = (p.m + perm_rows_per_step(p.k) - 1) / perm_rows_per_step(p.k);
    const unsigned grid = static_cast<unsigned>(std::min<int64_t>(steps, 2 * p.num_sms));
    auto* out = static_cast<unsigned short*>(p.workspace);
    if (cudaError_t e = launch_kernel(kernel, dim3(grid), dim3(kThreads), smem, stream, chain_first, p, out);
        e != cudaSuccess)
      return e;
    xt = out;
    xt_stride = p.k;
    chain = p.chain;  // the second kernel of the layer's chain
  }
  return p.x_dtype == DType::kFloat16 ? launch_slices_tm<DType::kFloat16>(p, l, xt, xt_stride, chain, stream)
                                      : launch_slices_tm<DType::kBFloat16>(p, l, xt, xt_stride, chain, stream);
}

}  // namespace kernels
}  // namespace duquant
