// The input side on tensor cores, for float16/bfloat16 x, blocks of 16 and int8 codes (the case
// models run). The float32 kernels (act_quant_rows.cu) spend ~114 instructions per element: 16
// FMAs and their shared-memory operands for the rotation, a gather, an IEEE division. Here a warp
// rotates a 16 x 16 block for 16 tokens with 8 mma.sync (m16n8k8, tf32 in, float32 accumulate):
//
// - x in 16-bit floats is exact in tf32 (11-bit significand), so only the rotation is split:
//   R = hi + lo, each rounded to tf32, x·R = x·lo + x·hi. What is left of R is below 2^-22 of it,
//   the order of float32's own summation error: the codes are the reference's but for values on a
//   rounding boundary (DESIGN §2), like the float32 kernels'.
// - A CTA stages whole token rows in shared memory (the permutation reads anywhere in the row).
//   Pass 1 finds each token's max |x'|; pass 2 writes codes. Where a warp's share of the row is at
//   most 8 blocks (64 values a lane) it keeps them rotated in registers between the passes;
//   otherwise pass 2 rotates again, bit for bit the same. On Hopper a cluster of CTAs can share a
//   row's positions (for parallelism at small M), swapping per-token maxima through distributed
//   shared memory.
// - The division by the scale is a reciprocal multiply with one exact correction step: the
//   correctly rounded quotient in three instructions. No conversion instructions in the loops
//   (tf32 rounding and float-to-int are bit tricks): they run at a quarter of the FMA rate.
//
// Measured on an H200 (benchmarks/fast_path_breakdown.py): M = 4096, K = 1024 in 10.5 us, K = 2048
// in 24 (the row kernel: 45), K = 4096 in 61 (130). It is bound by latency and instruction issue,
// not memory (x and the codes alone would take ~6 us at K = 2048): one wave of CTAs, 4 warps a
// scheduler, 0.7 of them eligible (ncu, K = 1024); per block and lane a rotation pass runs ~100
// instructions (SASS) for 8 values, most of them the rotation's loads and tf32 splits and the gather
// addresses; quantizing and storing a value ~9.
#include <algorithm>
#include <map>
#include <mutex>
#include <tuple>

#include "act_common.cuh"
#include "duquant_kernels/kernels.h"
#include "launch.cuh"

namespace duquant {
namespace kernels {
namespace {

using act::code_bits;
using act::mma_tf32;

constexpr int kMmaBlock = 16;  // the block size this kernel takes
constexpr int kMaxMmaCluster = 8;

// Row pitch in shared memory: 16 bytes past a multiple of 128, so the 8 rows a fragment load
// touches start 4 banks apart.
__host__ __device__ constexpr int mma_pitch(int64_t k, int esz) {
  return static_cast<int>((k * esz + 127) / 128 * 128 + 16);
}

// One 16-bit element of a staged row, as the tf32 (float32) bit pattern of its exact value.
template <DType DT>
__device__ __forceinline__ uint32_t load_tf32(const unsigned char* p) {
  const unsigned short u = *reinterpret_cast<const unsigned short*>(p);
  if constexpr (DT == DType::kBFloat16) return static_cast<uint32_t>(u) << 16;
  else return __float_as_uint(__half2float(__ushort_as_half(u)));
}

// Block b's rotation entries of this lane's B fragments (x'_j = sum_i x~_i R[i][j]:
// b0 = R[8ks + c][8nt + g], b1 = R[8ks + c + 4][8nt + g]), as loaded.
struct BlockRot {
  float r[2][2][2];  // [ks][nt][h]
};

__device__ __forceinline__ BlockRot fetch_rot(const float* r_in, int b, int lane) {
  const int g = lane >> 2, c = lane & 3;
  const float* rb = r_in + static_cast<int64_t>(b) * (kMmaBlock * kMmaBlock);
  BlockRot in;
#pragma unroll
  for (int ks = 0; ks < 2; ++ks)
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) in.r[ks][nt][h] = __ldg(rb + (8 * ks + c + 4 * h) * kMmaBlock + 8 * nt + g);
  return in;
}

// x'[rows, 16b .. 16b+15] for the warp's MT m-tiles: acc[mt][nt][i] is the mma.sync C fragment
// (rows g, g+8 of m-tile mt; columns 8nt + 2c, +1). row_off: byte offsets of the rows this lane
// reads (rows past the CTA's tokens read its first: their results are never used). src: the byte
// offsets in a row of this lane's four source channels, 16 bits each: (ks 0, h 0 | h 1), (ks 1, ...).
template <int MT, DType DT>
__device__ __forceinline__ void rotate_block(const unsigned char* xs, const BlockRot& in, uint2 src,
                                             const int (&row_off)[MT][2], float (&acc)[MT][2][4]) {
  uint32_t hi[2][2][2], lo[2][2][2];
#pragma unroll
  for (int ks = 0; ks < 2; ++ks)
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        act::split_tf32(in.r[ks][nt][h], hi[ks][nt][h], lo[ks][nt][h]);
      }
  const int off[2][2] = {{static_cast<int>(src.x & 0xffffu), static_cast<int>(src.x >> 16)},
                         {static_cast<int>(src.y & 0xffffu), static_cast<int>(src.y >> 16)}};
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int nt = 0; nt < 2; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[mt][nt][i] = 0.f;
#pragma unroll
    for (int ks = 0; ks < 2; ++ks) {
      const uint32_t a[4] = {load_tf32<DT>(xs + row_off[mt][0] + off[ks][0]),
                             load_tf32<DT>(xs + row_off[mt][1] + off[ks][0]),
                             load_tf32<DT>(xs + row_off[mt][0] + off[ks][1]),
                             load_tf32<DT>(xs + row_off[mt][1] + off[ks][1])};
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) {
        mma_tf32(acc[mt][nt], a, lo[ks][nt][0], lo[ks][nt][1]);
        mma_tf32(acc[mt][nt], a, hi[ks][nt][0], hi[ks][nt][1]);
      }
    }
  }
}

// Rotates the warp's blocks first, first + WARPS, ... < end and hands each to fn(b, acc). Two
// blocks' rotations load (an L2 round trip) while two are rotated, in two register sets used in
// turn (a loop-carried copy cost 12 moves a block). srcs: the CTA's source-offset table from
// b_begin on, 4 entries a block (one per lane column c).
template <int MT, int WARPS, DType DT, typename Fn>
__device__ __forceinline__ void for_warp_blocks(const unsigned char* xs, const uint2* srcs, const float* r_in,
                                                int b_begin, int first, int end, int lane,
                                                const int (&row_off)[MT][2], Fn&& fn) {
  if (first >= end) return;
  constexpr int W = WARPS;
  const int c = lane & 3;
  auto at = [&](int b) { return fetch_rot(r_in, b < end ? b : end - 1, lane); };  // past the end: a valid dummy
  auto step = [&](const BlockRot& r, int b) {
    float acc[MT][2][4];
    rotate_block<MT, DT>(xs, r, srcs[(b - b_begin) * 4 + c], row_off, acc);
    fn(b, acc);
  };
  BlockRot a0 = at(first), a1 = at(first + W);
  for (int b = first;;) {
    const BlockRot n0 = at(b + 2 * W), n1 = at(b + 3 * W);
    step(a0, b);
    if (b + W < end) step(a1, b + W);
    b += 2 * W;
    if (b >= end) break;
    a0 = at(b + 2 * W);
    a1 = at(b + 3 * W);
    step(n0, b);
    if (b + W < end) step(n1, b + W);
    b += 2 * W;
    if (b >= end) break;
  }
}

// The codes staged in shared memory before they leave in 16-byte stores: a row holds the CTA's
// positions plus 16 bytes, so the 8 rows one 2-byte store instruction touches fall in distinct
// banks (an even number of blocks a CTA, which K % 32 == 0 gives).
__host__ __device__ constexpr int codes_pitch(int blocks_per_cta) { return blocks_per_cta * kMmaBlock + 16; }

constexpr int kStaticSmemRoom = 2048;  // the static shared memory (8 x 16 + 16 + 8 x 16 floats) and slack

// Dynamic shared memory: the rows as read, [tokens][pitch], then the source-offset table of the
// CTA's blocks (8 bytes per block and lane column), then (two passes) the codes, [tokens][codes_pitch].
// codes_at: where the codes are staged, in bytes; -1: written straight to global memory. With one
// pass the codes take the rows' place (the barrier after the scales follows every warp's last read
// of the rows); with two they need room of their own, taken only where it costs no CTA an SM (at K
// = 3072 on Hopper or K = 2048 on Ampere it would halve them).
struct MmaSmem {
  size_t bytes = 0;
  int codes_at = -1;
};
inline MmaSmem mma_smem(int tokens, int64_t k, int esz, int blocks_per_cta, bool hold, bool stage,
                        const DeviceFacts& dev) {
  const size_t base =
      static_cast<size_t>(tokens) * mma_pitch(k, esz) + static_cast<size_t>(blocks_per_cta) * 4 * sizeof(uint2);
  if (!stage) return MmaSmem{base, -1};
  if (hold) return MmaSmem{base, 0};
  const size_t at = (base + 15) / 16 * 16;
  const size_t with = at + static_cast<size_t>(tokens) * codes_pitch(blocks_per_cta);
  auto per_sm = [&](size_t bytes) { return std::min<int64_t>(2, dev.smem_per_sm / (bytes + kStaticSmemRoom)); };
  const bool fits = static_cast<int64_t>(with) <= dev.smem_optin - kStaticSmemRoom && per_sm(with) >= per_sm(base);
  return fits ? MmaSmem{with, static_cast<int>(at)} : MmaSmem{base, -1};
}

// Grid: (token groups of `tokens`, split); clusters of `split` CTAs along y share a token group.
// MT m-tiles (16 tokens each) per warp, WARPS warps; HOLD > 0: a warp has at most HOLD blocks and
// keeps them rotated in registers (one rotation pass), 0: any number, rotated twice.
template <int MT, int WARPS, DType DT, int HOLD>
__global__ void __launch_bounds__(WARPS * 32, 2) rotate_mma_kernel(ActQuantParams p, int tokens, int codes_at) {
  constexpr int ESZ = act::dtype_bytes(DT);
  constexpr int TM = 16 * MT;
  constexpr int NT = WARPS * 32;
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ float warp_max[WARPS][TM];
  __shared__ float scale_s[TM];
  __shared__ act::MaxSwap<TM> swap;  // (token_scales_pushed)
  const int k = static_cast<int>(p.k);
  const int pitch = mma_pitch(k, ESZ);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * tokens;
  const int rows = p.m - row0 < tokens ? static_cast<int>(p.m - row0) : tokens;
  act::swap_begin(swap, !p.static_scale, rows);
  // This CTA's blocks of positions: all, or its share of the cluster's.
  const int nb = k / kMmaBlock, split = gridDim.y;
  const int per_cta = (nb + split - 1) / split;
  const int b_begin = blockIdx.y * per_cta;
  const int b_end = b_begin + per_cta < nb ? b_begin + per_cta : nb;
  uint2* srcs = reinterpret_cast<uint2*>(smem + static_cast<size_t>(tokens) * pitch);

  // The source table: position 16b + 8ks + c + 4h's source channel, as a byte offset in a row, at
  // 16-bit slot 2ks + h of entry (b - b_begin, c). Layer constants: built before the chain wait.
  {
    const InputTransform& tr = p.transform;
    unsigned short* slots = reinterpret_cast<unsigned short*>(srcs);
    for (int i = tid; i < (b_end - b_begin) * kMmaBlock; i += NT) {
      const int pos = b_begin * kMmaBlock + i, j = i % kMmaBlock;
      const int ks = j >> 3, c = j & 3, h = (j >> 2) & 1;
      const int src = tr.perm ? static_cast<int>(__ldg(tr.perm + pos)) : pos;
      slots[((i / kMmaBlock) * 4 + c) * 4 + 2 * ks + h] = static_cast<unsigned short>(src * ESZ);
    }
  }

  // HOLD: the warp's first two blocks' rotations (layer constants) are fetched before the wait; the
  // rest two blocks ahead (one ahead left the rotation waiting on its L2 round trip; ncu, H200).
  const float* r_in = p.transform.r_in;
  const int first = b_begin + warp;
  BlockRot ring[HOLD > 0 ? 3 : 1];
  if constexpr (HOLD > 0) {
    const int last = b_end - 1;  // >= b_begin: a CTA has blocks
    ring[0] = fetch_rot(r_in, first < last ? first : last, lane);
    if constexpr (HOLD > 1) ring[1] = fetch_rot(r_in, first + WARPS < last ? first + WARPS : last, lane);
  }

  pdl_trigger();  // the GEMM may launch now; it waits for these codes itself
  pdl_wait();
  act::clear_for_gemm(p);

  // Stage the rows: 16-byte asynchronous copies where x allows, else element by element.
  const char* xg = static_cast<const char*>(p.x) + row0 * p.x_stride * ESZ;
  const int64_t row_stride = p.x_stride * ESZ;
  act::stage_rows16<NT>(smem, pitch, reinterpret_cast<const unsigned char*>(xg), row_stride, rows, k * ESZ);
  __syncthreads();

  const int g = lane >> 2, c = lane & 3;
  int row_off[MT][2];
  bool valid[MT][2];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = 16 * mt + g + 8 * h;
      valid[mt][h] = r < rows;
      row_off[mt][h] = (valid[mt][h] ? r : 0) * pitch;
    }
  const float qmax = static_cast<float>((1 << (p.abits - 1)) - 1);

  float mx[MT][2] = {};  // this lane's max |x'| of rows g, g+8 of each m-tile
  auto track_max = [&](const float (&acc)[MT][2][4]) {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) {
        mx[mt][0] = fmaxf(mx[mt][0], fmaxf(fabsf(acc[mt][nt][0]), fabsf(acc[mt][nt][1])));
        mx[mt][1] = fmaxf(mx[mt][1], fmaxf(fabsf(acc[mt][nt][2]), fabsf(acc[mt][nt][3])));
      }
  };
  float s[MT][2], inv[MT][2];  // the scales of rows g, g+8 (set once they are known)
  // Codes two adjacent per 2-byte store: into shared memory (codes_at >= 0; they leave in 16-byte
  // stores at the end) or straight to global memory. Staged, the stores' addresses are 32-bit and
  // the global writes whole sectors: 2-byte global stores with 64-bit addresses were a third of
  // the kernel's issue slots at M = 4096 (ncu, H200).
  const int cpitch = codes_pitch(per_cta);
  unsigned char* codes_s = smem + max(codes_at, 0);
  auto store_codes = [&](int b, const float (&acc)[MT][2][4]) {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        if (!valid[mt][h]) continue;
        const int r = 16 * mt + g + 8 * h;
        unsigned char* out =
            codes_at >= 0 ? codes_s + r * cpitch + (b - b_begin) * kMmaBlock + 2 * c
                          : reinterpret_cast<unsigned char*>(p.codes + (row0 + r) * p.k + b * kMmaBlock + 2 * c);
#pragma unroll
        for (int nt = 0; nt < 2; ++nt) {
          const uint32_t lo = code_bits(acc[mt][nt][2 * h], s[mt][h], inv[mt][h], qmax);
          const uint32_t hi = code_bits(acc[mt][nt][2 * h + 1], s[mt][h], inv[mt][h], qmax);
          *reinterpret_cast<unsigned short*>(out + 8 * nt) = static_cast<unsigned short>(__byte_perm(lo, hi, 0x0040));
        }
      }
  };

  // HOLD: the warp's blocks (at most HOLD) are rotated once and kept in registers until the scale
  // is known. Otherwise pass 1 rotates them for the max and pass 2 again for the codes.
  float held[HOLD > 0 ? HOLD : 1][MT][2][4];
  if constexpr (HOLD > 0) {
    const int last = b_end - 1;
#pragma unroll
    for (int i = 0; i < HOLD; ++i) {
      const int b = first + i * WARPS;
      if (i + 2 < HOLD) ring[(i + 2) % 3] = fetch_rot(r_in, b + 2 * WARPS < last ? b + 2 * WARPS : last, lane);
      if (b < b_end) {
        rotate_block<MT, DT>(smem, ring[i % 3], srcs[(b - b_begin) * 4 + c], row_off, held[i]);
        track_max(held[i]);
      }
    }
  } else if (!p.static_scale) {
    for_warp_blocks<MT, WARPS, DT>(smem, srcs, r_in, b_begin, first, b_end, lane, row_off,
                                   [&](int, const float (&acc)[MT][2][4]) { track_max(acc); });
  }

  if (p.static_scale) {
    act::static_token_scales(p, scale_s, rows, row0);
  } else {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        float v = mx[mt][h];  // the four lanes of a row hold its columns
        v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
        v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
        if (c == 0) warp_max[warp][16 * mt + g + 8 * h] = v;
      }
    __syncthreads();
    if (tid < rows) {
      float v = 0.f;
#pragma unroll
      for (int w = 0; w < WARPS; ++w) v = fmaxf(v, warp_max[w][tid]);
      scale_s[tid] = v;  // this CTA's max
    }
    act::token_scales_pushed(p, scale_s, swap, rows, row0, qmax);
  }
  __syncthreads();
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      s[mt][h] = scale_s[valid[mt][h] ? 16 * mt + g + 8 * h : 0];
      inv[mt][h] = 1.f / s[mt][h];
    }

  if constexpr (HOLD > 0) {
#pragma unroll
    for (int i = 0; i < HOLD; ++i)
      if (first + i * WARPS < b_end) store_codes(first + i * WARPS, held[i]);
  } else {
    for_warp_blocks<MT, WARPS, DT>(smem, srcs, r_in, b_begin, first, b_end, lane, row_off, store_codes);
  }
  if (codes_at >= 0) {  // the staged codes leave in 16-byte stores (K % 16 == 0, codes 16-byte aligned)
    __syncthreads();
    const int chunks = (b_end - b_begin) * kMmaBlock / 16;
    int8_t* dst = p.codes + row0 * p.k + b_begin * kMmaBlock;
    for (int i = tid; i < rows * chunks; i += NT) {
      const int r = i / chunks, q = i - r * chunks;
      const uint4 v = *reinterpret_cast<const uint4*>(codes_s + r * cpitch + 16 * q);
      *reinterpret_cast<uint4*>(dst + r * p.k + 16 * q) = v;
    }
  }
}

// One m-tile (16 tokens, kMmaTokens) a warp, 8 warps. Two m-tiles and 16 warps (the rotation's
// loads and splits serving 32 tokens) measured slower on an H200: one CTA an SM, 25 -> 33 us at
// M = 4096, K = 2048.
constexpr int kMmaWarps = 8;

// Blocks a warp keeps rotated in registers (64 values a lane) where a CTA has at most this many
// per warp: one rotation pass instead of two.
constexpr int kMmaHold = 8;

// Whether the codes are staged in shared memory and leave in 16-byte stores (16-byte aligned rows
// needed). Only where no cluster splits the rows: on Hopper that is where the CTAs fill the SMs and
// the stores' issue slots count (M = 4096, K = 1024: 13.0 -> 10.5 us on an H200); a cluster's few
// CTAs wait on latency instead, and the barrier before the copy added 0.8 us (M = 1024). Ampere
// (no clusters) stages at any M: not measured there.
inline bool stage_codes(const ActQuantParams& p, int split) {
  return split == 1 && reinterpret_cast<uintptr_t>(p.codes) % 16 == 0;
}

template <DType DT, int HOLD>
cudaError_t launch_mma(const ActQuantParams& p, const MmaLaunch& l, bool chain, cudaStream_t stream) {
  constexpr auto kernel = rotate_mma_kernel<1, kMmaWarps, DT, HOLD>;
  if (cudaError_t e = allow_dynamic_smem<kernel>(device_facts().smem_optin - kStaticSmemRoom); e != cudaSuccess)
    return e;
  const int nb = static_cast<int>(p.k / kMmaBlock);
  const MmaSmem smem = mma_smem(l.tokens, p.k, act::dtype_bytes(DT), (nb + l.split - 1) / l.split, HOLD > 0,
                                stage_codes(p, l.split), device_facts());
  const dim3 grid(static_cast<unsigned>((p.m + l.tokens - 1) / l.tokens), static_cast<unsigned>(l.split));
  return launch_kernel_clustered(kernel, grid, dim3(kMmaWarps * 32), smem.bytes, stream, chain,
                                 dim3(1, static_cast<unsigned>(l.split), 1), p, l.tokens, smem.codes_at);
}

template <DType DT>
cudaError_t launch_mma_hold(const ActQuantParams& p, const MmaLaunch& l, bool chain, cudaStream_t stream) {
  return l.hold ? launch_mma<DT, kMmaHold>(p, l, chain, stream) : launch_mma<DT, 0>(p, l, chain, stream);
}

// max_active_clusters of the tensor-core kernel's variant `Kernel`, clusters of `split`.
template <auto Kernel>
int mma_active_clusters(int split, size_t smem) {
  if (allow_dynamic_smem<Kernel>(device_facts().smem_optin - kStaticSmemRoom) != cudaSuccess) return 0;
  return max_active_clusters(Kernel, dim3(kMmaWarps * 32), smem, dim3(1, static_cast<unsigned>(split), 1));
}

// The same for the kernel a launch of these sizes runs: an H200 runs 15 clusters of 8 or 30 of 4
// at >= 114 KB a CTA, 120 of its 132 SMs. Asked once per launch shape (a host query per forward
// would cost); 0 where the query fails, and then no split.
int mma_active_clusters(DType dt, bool hold, int split, size_t smem) {
  static std::mutex mu;
  static std::map<std::tuple<int, int, bool, int, size_t>, int> known;
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return 0;
  const auto key = std::make_tuple(dev, static_cast<int>(dt), hold, split, smem);
  std::lock_guard<std::mutex> lock(mu);
  if (auto it = known.find(key); it != known.end()) return it->second;
  constexpr int W = kMmaWarps, H = kMmaHold;
  const int n = dt == DType::kFloat16
                    ? (hold ? mma_active_clusters<rotate_mma_kernel<1, W, DType::kFloat16, H>>(split, smem)
                            : mma_active_clusters<rotate_mma_kernel<1, W, DType::kFloat16, 0>>(split, smem))
                    : (hold ? mma_active_clusters<rotate_mma_kernel<1, W, DType::kBFloat16, H>>(split, smem)
                            : mma_active_clusters<rotate_mma_kernel<1, W, DType::kBFloat16, 0>>(split, smem));
  if (n > 0) known.emplace(key, n);  // a failed query (0: no split) is asked again next time
  return n;
}

}  // namespace

MmaLaunch act_quant_mma_plan(const ActQuantParams& p) {
  MmaLaunch none;
  // Source offsets are 16-bit byte offsets: K <= 32768.
  if (p.x_dtype == DType::kFloat32 || p.transform.block != kMmaBlock || p.transform.smooth != nullptr ||
      p.abits < 2 || p.abits > 8 || p.k % kMmaBlock != 0 || p.m < 1 || p.k < kMmaBlock || p.k > 32768)
    return none;
  const DeviceFacts& dev = device_facts();
  if (!dev.known || dev.major < 8) return none;  // mma.sync tf32 and cp.async: Ampere on
  const int nb = static_cast<int>(p.k / kMmaBlock);
  const int64_t room = dev.smem_optin - kStaticSmemRoom;
  auto holds = [&](int split) { return (nb + split - 1) / split <= kMmaHold * kMmaWarps; };
  auto smem = [&](int tokens, int split) {
    return static_cast<int64_t>(
        mma_smem(tokens, p.k, 2, (nb + split - 1) / split, holds(split), stage_codes(p, split), dev).bytes);
  };
  // Tokens per CTA: 16, or what fits of long rows (one CTA an SM).
  int tokens = 0;
  for (int t = kMmaTokens; t >= 1 && tokens == 0; --t)
    if (smem(t, 1) <= room) tokens = t;
  if (tokens < 1) return none;
  // Fewer token groups than SMs: on Hopper a cluster shares each group's blocks of positions, at
  // least one block per warp a CTA. Where a CTA's share then fits the warps' registers, they hold
  // it: one rotation pass (M = 1024, K = 2048: 14.1 -> 11.9 us on an H200). By size: the largest
  // cluster of 8, 4 or 2 whose CTAs number at most the SMs and whose clusters all run at once.
  // Measured on an H200 (benchmarks/results/input_splits_h200.txt), against the rule before (as
  // many CTAs as reach the SM count, clusters of 3 included): K = 4096, M = 256 16.4 -> 10.5 us (16
  // clusters of 8 made two waves), M = 1024 29.0 -> 18.6, K = 2048 M = 1024 12.2 -> 10.2. Long rows
  // (fewer than 16 tokens a CTA) split in two at any M (K = 16384: M = 1024 172 -> 142 us, M = 4096
  // 541 -> 515). Splitting only to fill the SMs costs more than the pass saves (M = 4096, K = 2048:
  // 25.8 -> 30.2 us; every CTA of a cluster stages the whole rows).
  const int64_t groups = (p.m + tokens - 1) / tokens;
  const int most = static_cast<int>(std::min<int64_t>(std::max<int64_t>(1, nb / kMmaWarps), kMaxMmaCluster));
  int split = 1;
  if (dev.clusters && p.splits > 0) {
    split = std::min(p.splits, most);
  } else if (dev.clusters) {
    for (int s = kMaxMmaCluster; s >= 2 && split == 1; s /= 2) {
      if (s > most || groups * s > p.num_sms) continue;
      if (groups <= mma_active_clusters(p.x_dtype, holds(s), s, static_cast<size_t>(smem(tokens, s)))) split = s;
    }
    if (split == 1 && tokens < kMmaTokens && most >= 2) split = 2;
  }
  return MmaLaunch{tokens, split, holds(split)};
}

cudaError_t act_quant_mma(const ActQuantParams& p, const MmaLaunch& l, bool chain, cudaStream_t stream) {
  // A launch its plan would not make (a hand-built one): refused, not run with blocks unwritten.
  const int64_t nb = p.k / kMmaBlock, per_cta = (nb + l.split - 1) / std::max(l.split, 1);
  if (l.tokens < 1 || l.tokens > kMmaTokens || l.split < 1 || l.split > kMaxMmaCluster || p.k % kMmaBlock != 0 ||
      p.k > 32768 || p.x_dtype == DType::kFloat32 || (l.hold && per_cta > int64_t{kMmaHold} * kMmaWarps) ||
      reinterpret_cast<uintptr_t>(p.codes) % 2 != 0)
    return cudaErrorInvalidValue;
  return p.x_dtype == DType::kFloat16 ? launch_mma_hold<DType::kFloat16>(p, l, chain, stream)
                                      : launch_mma_hold<DType::kBFloat16>(p, l, chain, stream);
}

}  // namespace kernels
}  // namespace duquant
