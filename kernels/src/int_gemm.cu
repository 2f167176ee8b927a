// Integer GEMM of the fast path: int8 activation codes x int4 (or int8) weight codes on the tensor
// cores (mma.sync m16n8k32, int32 accumulation), with DuQuant's epilogue fused: y'' = s_t s_n acc,
// the output block restore (a Bo x Bo rotation per group of Bo output columns), bias, cast.
//
// Weights are read in the pack's own layout ([N, K/2] bytes, low nibble = even column), so a pack
// file needs no kernel-specific copy. Within each 128-wide k chunk, thread t of a quad owns the 32
// consecutive k values 32t..32t+31; the MMA's logical k order is a permutation of that, applied to
// activations and weights alike, which leaves the dot product unchanged and lets every thread fetch
// its operands with 16-byte shared-memory reads and unpack 8 nibbles with two byte permutes.
// Nibbles are unpacked into the high half of each byte (value x 16), and the sum is shifted back.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>

#include "duquant_kernels/kernels.h"
#include "gemm_common.cuh"
#include "launch.cuh"

namespace duquant {
namespace kernels {
namespace {
using namespace gemm;

// BM x BN output tile per CTA; WM x WN x WK warps (WK > 1 splits each stage's k range among warps
// and sums their partial tiles in shared memory); STAGES-deep cp.async pipeline.
template <int BM_, int BN_, int WM, int WN, int WK, int STAGES, int WBITS>
struct Tile {
  static constexpr int BM = BM_, BN = BN_;
  static constexpr int kThreads = 32 * WM * WN * WK;
  static constexpr int KS = 128 * WK;  // k per stage
  static constexpr int A_ROW = KS;     // bytes of an activation row per stage
  static constexpr int MT = BM / WM / 16;
  static constexpr int NT = BN / WN / 8;
  static constexpr bool kInt4 = WBITS <= 4;
  // Row strides chosen so the 16-byte fragment reads of a quarter warp hit distinct banks.
  static constexpr int A_STRIDE = KS + 16;
  static constexpr int B_ROW = kInt4 ? KS / 2 : KS;
  static constexpr int B_STRIDE = kInt4 ? (B_ROW % 128 == 64 ? B_ROW : B_ROW + 64) : B_ROW + 16;
  static constexpr int A_BYTES = BM * A_STRIDE;
  static constexpr int STAGE_BYTES = A_BYTES + BN * B_STRIDE;
  static constexpr int PIPE_BYTES = STAGES * STAGE_BYTES;
  using Epi = Epilogue<BM, BN>;
  static constexpr int BODY_BYTES = Epi::body_bytes(PIPE_BYTES);  // the epilogue operands start here
  static constexpr int SMEM_BYTES = Epi::smem_bytes(PIPE_BYTES);
  static_assert(MT >= 1 && NT >= 1 && BM % (16 * WM) == 0 && BN % (8 * WN) == 0, "tile shape");
};

// SPLIT: a split-k variant (grid z > 1 slices the k range); compiled apart so the plain kernels
// keep their registers (the runtime branch cost the streaming tiles 16 registers and up to 3 us).
// GROUPED: a grouped launch's variant (`group` holds the layers); apart for the same reason (its
// segment's pointers stay in registers: 32x32 tiles 90 -> 112, 128x128 140 -> 174 for int4).
template <int BM, int BN, int WM, int WN, int WK, int STAGES, int WBITS, bool SPLIT, bool GROUPED>
__global__ void __launch_bounds__(Tile<BM, BN, WM, WN, WK, STAGES, WBITS>::kThreads)
    int_gemm_kernel(IntGemmParams p, SplitK sk, GemmGroup group) {
  using T = Tile<BM, BN, WM, WN, WK, STAGES, WBITS>;
  int64_t col_tile = blockIdx.x;
  if constexpr (GROUPED) col_tile = use_segment<BN>(p, group, col_tile);  // p is now this CTA's layer
  extern __shared__ __align__(16) unsigned char smem[];
  const int tid = threadIdx.x;
  const int warp = tid >> 5, lane = tid & 31;
  const int g = lane >> 2, t = lane & 3;
  const int wm = warp % WM, wn = (warp / WM) % WN, wk = warp / (WM * WN);
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * BM;
  const int64_t n0 = col_tile * BN;
  const int64_t w_row_bytes = T::kInt4 ? p.k / 2 : p.k;
  const auto* a_g = reinterpret_cast<const unsigned char*>(p.a);
  const auto* w_g = static_cast<const unsigned char*>(p.w);
  // Split-k: this CTA's slice of the k range, sk.stages stages from stage0.
  const int all_stages = static_cast<int>((p.k + T::KS - 1) / T::KS);
  const int stage0 = SPLIT ? static_cast<int>(blockIdx.z) * sk.stages : 0;
  const int num_stages = SPLIT ? min(sk.stages, all_stages - stage0) : all_stages;

  auto load_a = [&](int stage, int slot) {
    load_stage_a<T>(smem, a_g, p.a_stride, p.k, p.m, m0, stage0 + stage, slot);
  };
  auto load_b = [&](int stage, int slot) { load_stage_b<T>(smem, w_g, w_row_bytes, p.n, n0, stage0 + stage, slot); };

  const Epilogue<BM, BN> ep(smem + T::BODY_BYTES);

  int acc[T::MT][T::NT][4];
#pragma unroll
  for (int i = 0; i < T::MT; ++i)
#pragma unroll
    for (int j = 0; j < T::NT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0;

  load_epilogue_constants<BM, BN, T::kThreads>(p, n0, ep);
  run_pipeline<STAGES>(
      num_stages, load_a, load_b, [&] { load_token_scales<BM, T::kThreads>(p, m0, ep.st); },
      [&](int slot) {
        const unsigned char* sa = smem + slot * T::STAGE_BYTES;
        const unsigned char* sb = sa + T::A_BYTES;
        const unsigned char* a_base = sa + (wm * (BM / WM) + g) * T::A_STRIDE + wk * 128 + 32 * t;
        const unsigned char* b_base = sb + (wn * (BN / WN) + g) * T::B_STRIDE + wk * (T::kInt4 ? 64 : 128) +
                                      (T::kInt4 ? 16 : 32) * t;
        uint4 b4[T::NT];
        if constexpr (T::kInt4) {
#pragma unroll
          for (int j = 0; j < T::NT; ++j) b4[j] = *reinterpret_cast<const uint4*>(b_base + j * 8 * T::B_STRIDE);
        }
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          uint4 alo[T::MT], ahi[T::MT];
#pragma unroll
          for (int i = 0; i < T::MT; ++i) {
            alo[i] = *reinterpret_cast<const uint4*>(a_base + (i * 16) * T::A_STRIDE + 16 * h);
            ahi[i] = *reinterpret_cast<const uint4*>(a_base + (i * 16 + 8) * T::A_STRIDE + 16 * h);
          }
          uint4 b8[T::NT];
          if constexpr (!T::kInt4) {
#pragma unroll
            for (int j = 0; j < T::NT; ++j) b8[j] = *reinterpret_cast<const uint4*>(b_base + j * 8 * T::B_STRIDE + 16 * h);
          }
#pragma unroll
          for (int q = 0; q < 2; ++q) {  // k step s = 2h + q
#pragma unroll
            for (int j = 0; j < T::NT; ++j) {
              uint32_t b0, b1;
              if constexpr (T::kInt4) {
                unpack_nibbles_x16(word(b4[j], 2 * h + q), b0, b1);
              } else {
                b0 = word(b8[j], 2 * q);
                b1 = word(b8[j], 2 * q + 1);
              }
#pragma unroll
              for (int i = 0; i < T::MT; ++i)
                mma_s8(acc[i][j], word(alo[i], 2 * q), word(ahi[i], 2 * q), word(alo[i], 2 * q + 1),
                       word(ahi[i], 2 * q + 1), b0, b1);
            }
          }
        }
      });

  // ---- epilogue: sum k-split partials, scale, restore, bias, cast ----
  // Padding rows/columns must come out exact zeros (the restore sums over them): their operands
  // were zero-filled, s_t and s_n included.
  int* tile_i = reinterpret_cast<int*>(smem);
  float* tile_f = reinterpret_cast<float*>(smem);
  auto scaled = [&](int raw, int r, int c) {
    return static_cast<float>(T::kInt4 ? (raw >> 4) : raw) * ep.st[r] * ep.sn[c];
  };
  if constexpr (WK == 1 && !SPLIT) {
    // One partial per output: scaled straight from the registers.
    for_each_acc<BM, BN, WM, WN, T::MT, T::NT>(wm, wn, g, t, [&](int r, int c, int i, int j, int e) {
      tile_f[r * T::Epi::kStride + c] = scaled(acc[i][j][e], r, c);
    });
  } else {
    if constexpr (WK == 1) {
      for_each_acc<BM, BN, WM, WN, T::MT, T::NT>(wm, wn, g, t, [&](int r, int c, int i, int j, int e) {
        tile_i[r * T::Epi::kStride + c] = acc[i][j][e];
      });
    } else {
      for (int e = tid; e < BM * T::Epi::kStride; e += T::kThreads) tile_i[e] = 0;
      __syncthreads();
      for_each_acc<BM, BN, WM, WN, T::MT, T::NT>(wm, wn, g, t, [&](int r, int c, int i, int j, int e) {
        atomicAdd(&tile_i[r * T::Epi::kStride + c], acc[i][j][e]);
      });
    }
    __syncthreads();
    if constexpr (SPLIT) {
      if (!split_k_gather<BM, BN, T::Epi::kStride, T::kThreads>(sk, tile_i)) return;  // not the last slice
    }
    for (int e = tid; e < BM * BN; e += T::kThreads) {
      const int r = e / BN, c = e % BN;
      tile_f[r * T::Epi::kStride + c] = scaled(tile_i[r * T::Epi::kStride + c], r, c);
    }
  }
  __syncthreads();
  restore_bias_store_best<BM, BN, T::kThreads>(p, m0, n0, tile_f, ep);  // 64x64, 128x128: R_out in registers
}

// The wgmma kernel where this build has it (int_gemm_wgmma.cu) and the device and weights suit it.
bool wgmma_usable(const IntGemmParams& p) {
#ifdef DUQUANT_KERNELS_WGMMA
  return wgmma_gemm_usable(p);
#else
  (void)p;
  return false;
#endif
}

// Counters come first in the split-k workspace, padded so the partial sums start 256-byte aligned.
constexpr int64_t split_counter_ints(int64_t counters) { return (counters + 63) / 64 * 64; }

template <int BM, int BN, int WM, int WN, int WK, int STAGES, int WBITS, bool SPLIT = false, bool GROUPED = false>
cudaError_t launch(const IntGemmParams& p_in, const IntGemmPlan& plan, cudaStream_t stream,
                   const GemmGroup& group = GemmGroup()) {
  IntGemmParams p = p_in;
  if constexpr (GROUPED) p.n = column_tiles<BN>(group) * BN;  // the grid: every segment's column tiles
  using T = Tile<BM, BN, WM, WN, WK, STAGES, WBITS>;
  static_assert(T::SMEM_BYTES <= kMaxSmemBytes, "tile needs more shared memory than an SM has");
  SplitK sk;
  if constexpr (SPLIT) {
    sk.stages = plan.stages_per_split;
    sk.counters = static_cast<int*>(p.workspace);
    sk.partials = sk.counters + split_counter_ints(plan.counters);
  }
  return launch_gemm<int_gemm_kernel<BM, BN, WM, WN, WK, STAGES, WBITS, SPLIT, GROUPED>, BM, BN>(
      T::SMEM_BYTES, T::kThreads, p, stream, static_cast<unsigned>(plan.splits), sk, group);
}

// The weight-streaming tile is 32 outputs wide where Bo needs it or 16-wide tiles would exceed one per SM.
bool stream_wide(const IntGemmParams& p) {
  const int bo = p.r_out ? p.block_out : 1;
  return bo > 16 || (p.n + 31) / 32 >= p.num_sms;
}

// Output rows and columns per CTA, and k per pipeline stage, of each tile shape (dispatch below).
struct TileGeometry {
  int bm, bn, ks;
};
TileGeometry geometry(GemmTile tile, const IntGemmParams& p) {
  switch (tile) {
    case GemmTile::kStream: return {16, stream_wide(p) ? 32 : 16, 1024};
    case GemmTile::kTile32: return {32, 32, 512};
    case GemmTile::kTile64: return {64, 64, 256};
    case GemmTile::kWgmma256: return {256, 128, 128};  // 256 tokens x 128 outputs
    default: return {128, 128, 128};  // kTile128, kWgmma128
  }
}

constexpr int64_t kMaxWgmmaSplits = 8;  // a portable cluster

// CTAs a cluster of the wgmma kernel's 128-token tiles splits k over, by size: as many as keep
// the CTAs to half the SMs (up to 8), and 2 where the tiles alone reach a wave of at most half the
// SMs. Measured on an H200 (benchmarks/results/gemm_tiles_wgmma_split_h200.txt, layer us): with
// 2-8 tiles 8 (2048->256 at M = 512 23.8 -> 16.5), 16 tiles 4 (16384->2048 at M = 64 78.9 ->
// 37.8; 8: 43.4), 32 tiles 2 (2048->2048 at M = 256 22.2 -> 18.1; 4: 23.0), 64 tiles 2
// (4096->1024 at M = 1024 50.4 -> 43.8), 128 tiles none (2048->2048 at M = 1024 28.0; 2: 34.5).
// Where a larger cluster lost, its clusters did not all fit at once: an H200 runs 15 clusters of 8
// or 30 of 4 of this kernel's size (16 tiles x 8, 32 x 4 make a second wave); the act_quant_mma.cu
// rule asks cudaOccupancyMaxActiveClusters, which would pick 8 at 9-15 tiles and 4 at 17-30 (not
// measured yet).
int64_t wgmma_auto_splits(const IntGemmParams& p, int64_t tiles) {
  int64_t splits = 1;
  while (2 * splits <= kMaxWgmmaSplits && 2 * splits * tiles <= p.num_sms / 2) splits *= 2;
  if (splits == 1 && 2 * tiles <= p.num_sms) splits = 2;
  return splits;
}

// Where the wgmma kernel (Hopper, int4 weights) beats the mma.sync tiles and the decode kernel,
// measured on an H200 (gemm_tiles_wgmma_split_h200.txt): past M = 64 with its k split, except on
// narrow layers (N <= 256) up to M = 256 or with short rows (1024->256 at M = 1024: 16.0 against
// 14.9 for 32x32 tiles); past M = 32 on long rows or wide layers (16384->2048 at M = 64: 37.8
// against 46.8 for split-k 64x64; 2048->16384: 19.7 against 23.8).
bool wgmma_wins(const IntGemmParams& p) {
  if (p.m > 32 && (p.k >= 8192 || p.n >= 8192)) return true;
  return p.m > 64 && (p.n > 256 || (p.m > 256 && p.k >= 2048));
}

// The tile shape kAuto runs for these sizes.
GemmTile auto_tile(const IntGemmParams& p) {
  auto ctas = [&](int64_t bm, int64_t bn) { return ((p.m + bm - 1) / bm) * ((p.n + bn - 1) / bn); };
  // Weight streaming: narrow tiles so even N = 2048 spreads over every SM, k split over 8 warps.
  // Also up to M = 256 where 32x32 tiles would leave half the SMs idle (N <= 1024 at M = 64, N <= 2048
  // at M = 32, N <= 256 at M = 256): 1.5-4 us faster per layer there on an H200, slower where 32x32
  // tiles fill the GPU.
  if (p.m <= 16 || (p.m <= 256 && 2 * ctas(32, 32) <= p.num_sms)) return GemmTile::kStream;
  // Otherwise the largest tile that still gives every SM a CTA: a 128x128 tile on a quarter of the
  // SMs is slower than 32x32 tiles on all of them.
  if (ctas(128, 128) >= p.num_sms) return GemmTile::kTile128;
  // Up to M = 512, 32x32 tiles on every SM beat 64x64 tiles on nearly all of them (H200, M = 512:
  // 4096->1024 28 us against 34, 2048->256 9 against 20); past it too where 64x64 tiles would
  // leave half the SMs idle (M = 1024, N = 256: 2048->256 30.8 us against 38.6, 1024->256 18.8
  // against 25.0, benchmarks/results/gemm_tiles_h200.txt).
  if (ctas(64, 64) >= p.num_sms || (p.m > 512 && 2 * ctas(64, 64) >= p.num_sms)) return GemmTile::kTile64;
  return GemmTile::kTile32;
}

template <int WBITS>
cudaError_t dispatch(const IntGemmParams& p, const IntGemmPlan& plan, cudaStream_t stream) {
  switch (plan.tile) {
    case GemmTile::kStream: {
      const bool wide = stream_wide(p);
      // Long rows (down_proj) keep one CTA per SM busy only with more stages in flight.
      constexpr int kDeep32 = deepest_stages<Tile<16, 32, 1, 1, 8, 3, WBITS>>();
      constexpr int kDeep16 = deepest_stages<Tile<16, 16, 1, 1, 8, 3, WBITS>>();
      using Deep32 = Tile<16, 32, 1, 1, 8, kDeep32, WBITS>;
      using Deep16 = Tile<16, 16, 1, 1, 8, kDeep16, WBITS>;
      if (p.k >= 8192 && (wide ? fits_device<Deep32>() : fits_device<Deep16>()))
        return wide ? launch<16, 32, 1, 1, 8, kDeep32, WBITS>(p, plan, stream)
                    : launch<16, 16, 1, 1, 8, kDeep16, WBITS>(p, plan, stream);
      // Rows of 2048-8192 at 17-64 tokens (down_proj, 4096 -> 1024 at 50): 32-wide tiles, one CTA
      // an SM, 5 stages so a row of 4096 is in flight at once (4 weight stages fetched before the
      // chain wait). Inside the action expert's graph 6.8 -> 5.7 us a call (H200; 4 stages 5.8, 32
      // wide with 16 warps and 2048-wide stages 5.6; 16-wide with 4 stages 6.7, with 5: 8.9, two
      // waves). int8 weights: 5 such stages exceed shared memory, so they stay below.
      using Row4096 = Tile<16, 32, 1, 1, 8, 5, WBITS>;
      if constexpr (WBITS <= 4)
        if (!wide && p.m > 16 && p.m <= 64 && p.k > 2048 && p.k < 8192 && fits_device<Row4096>())
          return launch<16, 32, 1, 1, 8, 5, WBITS>(p, plan, stream);
      return wide ? launch<16, 32, 1, 1, 8, 3, WBITS>(p, plan, stream) : launch<16, 16, 1, 1, 8, 3, WBITS>(p, plan, stream);
    }
    case GemmTile::kTile32: return launch<32, 32, 2, 1, 4, 3, WBITS>(p, plan, stream);
    case GemmTile::kTile64:
      return plan.splits > 1 ? launch<64, 64, 2, 2, 2, 3, WBITS, true>(p, plan, stream)
                             : launch<64, 64, 2, 2, 2, 3, WBITS>(p, plan, stream);
    case GemmTile::kTile128: return launch<128, 128, 2, 4, 1, 4, WBITS>(p, plan, stream);
    default: return cudaErrorInvalidValue;
  }
}

// The tiles a grouped launch runs (grouped_plan picks only these, unsplit).
template <int WBITS>
cudaError_t dispatch_grouped(const IntGemmParams& p, const IntGemmPlan& plan, cudaStream_t stream,
                             const GemmGroup& g) {
  switch (plan.tile) {
    case GemmTile::kStream:
      return stream_wide(p) ? launch<16, 32, 1, 1, 8, 3, WBITS, false, true>(p, plan, stream, g)
                            : launch<16, 16, 1, 1, 8, 3, WBITS, false, true>(p, plan, stream, g);
    case GemmTile::kTile32: return launch<32, 32, 2, 1, 4, 3, WBITS, false, true>(p, plan, stream, g);
    case GemmTile::kTile64:
      // One row of tiles with short rows (the action expert's gate/up, 1024 -> 2 x 4096 at 50
      // tokens): twice the warps, each with half the k range, 2 stages of 512. A CTA's chain of
      // MMAs and its share of the restore halve; 11.2 -> 8.0 us per call inside the action expert
      // and 16.0 -> 12.5 us alone with its input kernel (H200; 3 stages: 8.6 us inside).
      static_assert(size_t{Tile<64, 64, 2, 2, 4, 2, WBITS>::SMEM_BYTES} <= kMinSharedMemPerBlock,
                    "fits every GPU the fast path runs on: no step-down needed");
      if (p.m <= 64 && p.k <= 1024) return launch<64, 64, 2, 2, 4, 2, WBITS, false, true>(p, plan, stream, g);
      return launch<64, 64, 2, 2, 2, 3, WBITS, false, true>(p, plan, stream, g);
    case GemmTile::kTile128: return launch<128, 128, 2, 4, 1, 4, WBITS, false, true>(p, plan, stream, g);
    default: return cudaErrorInvalidValue;
  }
}

bool is_mma_sync_tile(GemmTile t) {
  return t == GemmTile::kStream || t == GemmTile::kTile32 || t == GemmTile::kTile64 || t == GemmTile::kTile128;
}

// A grouped launch (layers sharing activation codes, side by side along N) runs the mma.sync
// tiles, sized for the whole group: one launch instead of one per layer (~2.5 us each in a CUDA
// graph at small M). Measured on an H200 (benchmarks/sibling_groups.py --tiles, µs per group call;
// results/sibling_groups_h200.txt): streaming tiles up to M = 16; 32x32 tiles up to M = 32 and
// where 64x64 tiles would leave SMs idle (action expert q/k/v 1024->2560 at M = 50: 10.6 against
// 15.3); 64x64 tiles past M = 32 where they give nearly every SM one (gate/up 1024->8192 at M = 50
// 16.3 against 16.8, 12.2 since its 16-warp variant in dispatch_grouped; at M = 128 18.1 against
// 28.4; q/k/v at M = 256 18.0 against 22.0). Where the widest layer alone would run the wgmma
// kernel the group still launches once up to M x N = 128 x 8192 (gate/up 1024->8192 at M = 128:
// 18.1 against 20.7 per layer; q/k/v at M = 256: 18.0 against 21.2), past it per layer
// (2048->32768 at M = 50: 31.8 per layer against 42.6 grouped). Split-k (long rows) and, at
// K >= 8192, the skinny kernel stay per layer (its edge there was 21.5 -> 14.7 us on 16384->2048
// at M = 1, gemv_sweep_h200.txt); below, one grouped streaming launch beat the skinny kernel per
// layer (4096-wide q/k/v 4096->6144 at M = 1 11.9 against 16.3 us, at M = 16 15.3 against 20.8;
// gate/up 4096->22016 at M = 16 31.5 against 39.9).
IntGemmPlan grouped_plan(const IntGemmParams& p, const GemmGroup& group) {
  IntGemmParams widest = p, whole = p;
  widest.n = whole.n = 0;
  for (int s = 0; s < group.segments && s < kMaxGemmSegments; ++s) {
    widest.n = std::max(widest.n, group.segment[s].n);
    whole.n += group.segment[s].n;
  }
  const IntGemmPlan alone = int_gemm_plan(widest);
  const bool forced = p.tile != GemmTile::kAuto;
  const bool skinny_edge = alone.tile == GemmTile::kGemv && !forced && p.k < 8192;
  const bool wgmma_alone = alone.tile == GemmTile::kWgmma128 || alone.tile == GemmTile::kWgmma256;
  const bool small_group = !forced && p.m * whole.n <= int64_t{128} * 8192;
  const bool mma_alone = is_mma_sync_tile(alone.tile) && alone.splits == 1;
  if (group.segments > kMaxGemmSegments || !(mma_alone || skinny_edge || (wgmma_alone && small_group))) return alone;
  IntGemmPlan plan;
  plan.grouped = true;
  if (is_mma_sync_tile(p.tile)) {
    plan.tile = p.tile;
    return plan;
  }
  const int64_t ctas32 = ((p.m + 31) / 32) * ((whole.n + 31) / 32);
  const int64_t ctas64 = ((p.m + 63) / 64) * ((whole.n + 63) / 64);
  plan.tile = p.m <= 16 || 2 * ctas32 <= p.num_sms       ? GemmTile::kStream
              : p.m > 32 && 10 * ctas64 >= 9 * p.num_sms ? GemmTile::kTile64
                                                         : GemmTile::kTile32;
  return plan;
}

}  // namespace

IntGemmPlan int_gemm_plan(const IntGemmParams& p, const GemmGroup* group) {
  if (group && group->segments > 0) return grouped_plan(p, *group);
  IntGemmPlan plan;
  auto tiles_of = [&](const TileGeometry& g) { return ((p.m + g.bm - 1) / g.bm) * ((p.n + g.bn - 1) / g.bn); };
  // Long rows past the streaming tiles' M (down_proj-like, K >= 8192) where 64x64 tiles leave SMs
  // idle: 64x64 tiles with the k range split as far as two CTAs per SM stay resident, at most 8
  // ways: time follows each CTA's chain of stages (benchmarks/gemm_tile_sweep.py, H200,
  // 16384->2048: M = 50 57.5 -> 38.9 us at 8 slices, 48.8 at 7; M = 64 65.6 -> 47.0; M = 256
  // 143.8 -> 122.6 at 2). Elsewhere splitting measured no faster, or slower.
  const TileGeometry g64 = geometry(GemmTile::kTile64, p);
  const bool long_rows = p.m > 16 && p.k >= 8192 && tiles_of(g64) < p.num_sms;
  // A forced wgmma tile that cannot run here (device, build, weights) means "auto".
  const bool wgmma_ok = wgmma_usable(p);
  GemmTile forced = p.tile;
  if ((forced == GemmTile::kWgmma128 || forced == GemmTile::kWgmma256) && !wgmma_ok) forced = GemmTile::kAuto;
  const bool gemv_ok = gemv_usable(p, false);
  if ((forced == GemmTile::kGemv && !gemv_ok) || (forced == GemmTile::kGemvDirect && !gemv_usable(p, true)))
    forced = GemmTile::kAuto;
  // Decode sizes: one pass over the weights, streamed into registers (int_gemv.cu). Against the
  // streaming tiles (benchmarks/results/gemv_sweep_h200.txt, H200, layer us): faster at K >= 4096
  // for every M <= 16 (16384->2048 21.5 -> 14.7 at M = 1, 22.8 -> 19.6 at 16; 4096->1024 7.3 ->
  // 5.7), faster or even at M <= 4 elsewhere except 1024->4096 and 1024->2048 at M = 1 (0.1-0.5 us
  // slower); at M = 8-16 with K <= 2048 the tiles were as fast or faster (2048->16384 at 16: 15.6
  // against 17.4). Past M = 16 (codes staged in shared memory) only for long rows, K >= 8192, at
  // M <= 32 (benchmarks/results/gemv_staged_sweep_h200.txt, 16384->2048 against split-k 64x64
  // tiles: M = 17 36.2 -> 28.9, M = 32 37.9 -> 31.9): at M = 64, and on shorter rows, the tiles
  // were as fast or faster (1024->4096 at 64: 9.7 against 14.1; 2048->16384 at 32: 21.8 against 23.2).
  const bool gemv_wins = gemv_ok && (p.m <= 16 ? p.m <= 4 || p.k >= 4096 : p.m <= 32 && p.k >= 8192);
  plan.tile = forced != GemmTile::kAuto ? forced
              : gemv_wins               ? GemmTile::kGemv
              : long_rows               ? GemmTile::kTile64
                                        : auto_tile(p);
  // Hopper, int4 weights, where it wins (wgmma_wins): the wgmma kernel, past M = 128 with 256-token
  // tiles where they give nearly every SM one (benchmarks/results/gemm_tiles_wgmma_h200.txt, H200,
  // 2048->16384 at M = 4096 410 us against 1151 for 64x64 mma.sync tiles), else with 128-token
  // tiles, k split over a cluster where they are few (wgmma_auto_splits).
  if (forced == GemmTile::kAuto && wgmma_ok && wgmma_wins(p)) {
    plan.tile = p.m > 128 && 8 * tiles_of(geometry(GemmTile::kWgmma256, p)) >= 7 * p.num_sms ? GemmTile::kWgmma256
                                                                                              : GemmTile::kWgmma128;
  }
  if (plan.tile == GemmTile::kGemv || plan.tile == GemmTile::kGemvDirect) {  // a cluster shares the k range
    plan.splits = gemv_parts(p, plan.tile == GemmTile::kGemvDirect, p.splits);
    return plan;
  }
  const TileGeometry g = geometry(plan.tile, p);
  const int64_t tiles = tiles_of(g);
  const int64_t stages = (p.k + g.ks - 1) / g.ks;
  if (plan.tile == GemmTile::kWgmma128 || plan.tile == GemmTile::kWgmma256) {
    // 128-token tiles split k over a cluster (2, 4 or 8 CTAs, none without stages); no workspace.
    int splits = 1;
    if (plan.tile == GemmTile::kWgmma128) {
      const int64_t want = p.splits > 0 ? p.splits : wgmma_auto_splits(p, tiles);
      while (2 * splits <= std::min<int64_t>({want, stages, kMaxWgmmaSplits})) splits *= 2;
    }
    plan.splits = splits;
    return plan;
  }
  // Only 64x64 tiles have a split-k variant; by size they split for long rows alone.
  const int64_t want = plan.tile != GemmTile::kTile64 ? 1
                       : p.splits > 0                ? p.splits
                       : long_rows && tiles > 0      ? std::min<int64_t>(8, 2 * p.num_sms / tiles)
                                                     : 1;
  // Forced counts stay within 256 MB of partial sums (64 slices of a large layer would take GBs).
  const int64_t tile_bytes = std::max<int64_t>(1, tiles * g.bm * g.bn * static_cast<int64_t>(sizeof(int)));
  const int64_t most = std::max<int64_t>(1, (int64_t{256} << 20) / tile_bytes);
  const int64_t splits = std::max<int64_t>(1, std::min<int64_t>({want, stages, most, 65535}));
  plan.stages_per_split = static_cast<int>((stages + splits - 1) / splits);
  plan.splits = static_cast<int>((stages + plan.stages_per_split - 1) / plan.stages_per_split);  // none empty
  if (plan.splits > 1) {
    plan.counters = static_cast<int>(tiles);
    plan.workspace_bytes =
        static_cast<size_t>(split_counter_ints(tiles) + plan.splits * tiles * g.bm * g.bn) * sizeof(int);
  }
  return plan;
}

bool int_gemm_supported(int64_t n, int64_t k, int wbits, bool has_r_out, int block_out) {
  if (k <= 0 || n <= 0 || k % 32 != 0 || k > kMaxKernelInFeatures || wbits < 2 || wbits > 8) return false;
  // Bo a power of two up to 32 (the epilogue keeps a tile's R_out blocks in shared memory).
  if (has_r_out && !(block_out >= 1 && (16 % block_out == 0 || block_out == 32))) return false;
  return true;
}

bool wgmma_gemm_available() {
  IntGemmParams p;
  return wgmma_usable(p);
}

cudaError_t int_gemm(const IntGemmParams& p, const IntGemmPlan& plan, cudaStream_t stream, const GemmGroup* group) {
  if (p.m == 0 || p.n == 0) return cudaSuccess;
  if (group && group->segments > 0 && (!plan.grouped || group->segments > kMaxGemmSegments))
    return cudaErrorInvalidValue;
  if (plan.grouped && !(group && group->segments > 0)) return cudaErrorInvalidValue;
  if (plan.tile == GemmTile::kGemv || plan.tile == GemmTile::kGemvDirect)  // its split needs no workspace
    return int_gemv(p, plan.tile == GemmTile::kGemvDirect, plan.splits, stream);
#ifdef DUQUANT_KERNELS_WGMMA
  if (plan.tile == GemmTile::kWgmma128 || plan.tile == GemmTile::kWgmma256) {  // its split needs no workspace
    if (!wgmma_usable(p)) return cudaErrorInvalidValue;  // a plan made for other weights or another device
    return int_gemm_wgmma(p, plan.tile == GemmTile::kWgmma256 ? 256 : 128, plan.splits, stream);
  }
#endif
  if (plan.splits > 1 && p.workspace == nullptr) return cudaErrorInvalidValue;
  if (plan.grouped)
    return p.wbits <= 4 ? dispatch_grouped<4>(p, plan, stream, *group) : dispatch_grouped<8>(p, plan, stream, *group);
  return p.wbits <= 4 ? dispatch<4>(p, plan, stream) : dispatch<8>(p, plan, stream);
}

}  // namespace kernels
}  // namespace duquant
