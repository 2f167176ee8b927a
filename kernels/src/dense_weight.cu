// The weight-only layer as one dense matrix, for the weight-only path at large M (the torch glue
// multiplies it with cuBLAS). Written transposed, [K, N]: out[perm[j], c] = sum over c's output
// block of R_out[n, c] s_n sum over j's input block of R_in[j, i] q[n, i]. Then y = x out + bias is
// the layer: x~ R_in, the weights' scales and the restore all folded into the weights (DESIGN §2).
//
// A warp computes one 16 x 16 tile (16 output rows, one 16-position input block) at a time:
// - V^T = R_in[b] Q^T on mma.sync m16n8k8 tf32: the codes are exact in tf32, R_in goes in as two
//   tf32 halves (hi + lo, less than 2^-22 of it left out) for float32 out, one (2^-11) for 16-bit.
// - W = (diag(s) Ro)^T V, Ro the 16 x 16 block-diagonal restore over the tile's rows (without
//   r_out, V's columns are scaled by s_n instead). For float32 out in three tf32 products (hi·hi +
//   hi·lo + lo·hi), float32 accuracy; for 16-bit out in one (about 2^-11 of a weight: under
//   bf16's rounding that follows, near fp16's). The first
//   product's accumulators are the second's B operand as they lie: its k order is permuted
//   (fragment k = t is row 2t of a k step, k = t + 4 row 2t + 1), A's alike.
// - Transposed, a tile is 16 rows perm[j] of 16 consecutive outputs: 32 bytes each in 16-bit, so
//   it leaves through a warp's shared-memory slot in 16-byte stores however perm scatters, and every
//   tile is independent: the grid is as wide as the layer.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "act_common.cuh"
#include "duquant_kernels/kernels.h"
#include "launch.cuh"

namespace duquant {
namespace kernels {
namespace {

using act::mma_tf32;
using act::split_tf32;

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kRows = 16;               // output rows per CTA: one mma m-tile

template <typename OutT>
__device__ __forceinline__ OutT cast_out(float v);
template <>
__device__ __forceinline__ float cast_out<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half cast_out<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 cast_out<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Two's-complement field of BITS bits at bit `shift` of u, as the float32 pattern of its value
// (exact in tf32): with its sign bit flipped the field is value + 2^(BITS-1), which goes into the
// mantissa of 2^23, and the bias comes off in one add (no int-to-float conversion, which runs at a
// quarter of the rate).
template <int BITS>
__device__ __forceinline__ uint32_t field_tf32(uint32_t u, int shift) {
  constexpr uint32_t kMask = (1u << BITS) - 1, kSign = 1u << (BITS - 1);
  const uint32_t biased = ((u >> shift) & kMask) ^ (0x4B000000u | kSign);
  return __float_as_uint(__uint_as_float(biased) - (8388608.f + static_cast<float>(kSign)));
}

// What one tile reads from global memory, fetched a tile ahead: this lane's R_in[b] entries (rows
// g, g + 8; columns t, t + 4 of each k step), the weight codes of rows 8 nt + g for the block (8
// bytes of int4 or 16 of int8 each), and the destination row of its 16-byte piece, perm[16b + lane/2].
template <bool INT4>
struct TileLoads {
  using Codes = std::conditional_t<INT4, uint2, uint4>;
  float r[2][4];
  Codes codes[2];
  int64_t dest;
};

template <bool INT4>
__device__ __forceinline__ TileLoads<INT4> fetch_tile(const DenseWeightParams& p, int64_t n0, int64_t b, int g,
                                                      int t, int lane) {
  TileLoads<INT4> in;
  const float* r = p.transform.r_in + b * 256;
#pragma unroll
  for (int ks = 0; ks < 2; ++ks) {
    const int c = 8 * ks + t;
    in.r[ks][0] = __ldg(r + g * 16 + c);
    in.r[ks][1] = __ldg(r + (g + 8) * 16 + c);
    in.r[ks][2] = __ldg(r + g * 16 + c + 4);
    in.r[ks][3] = __ldg(r + (g + 8) * 16 + c + 4);
  }
#pragma unroll
  for (int nt = 0; nt < 2; ++nt) {
    const int64_t row = n0 + 8 * nt + g;
    using Codes = typename TileLoads<INT4>::Codes;
    if (row >= p.n) {
      in.codes[nt] = Codes{};  // zero codes past the layer's rows
    } else if constexpr (INT4) {
      in.codes[nt] = __ldg(reinterpret_cast<const uint2*>(static_cast<const uint8_t*>(p.w) + row * (p.k / 2) + 8 * b));
    } else {
      in.codes[nt] = __ldg(reinterpret_cast<const uint4*>(static_cast<const int8_t*>(p.w) + row * p.k + 16 * b));
    }
  }
  in.dest = p.transform.perm ? __ldg(p.transform.perm + 16 * b + lane / 2) : 16 * b + lane / 2;
  return in;
}

// Weight codes at positions 16b + {t, t + 4, 8 + t, 12 + t} of a row: the B fragments of
// V^T = R_in Q^T for the block's two k steps.
__device__ __forceinline__ void codes_tf32(uint2 w, int t, uint32_t (&v)[4]) {
  // nibble i of a block at bits 4i of its 8 bytes (column 2j low in byte j)
  v[0] = field_tf32<4>(w.x, 4 * t);
  v[1] = field_tf32<4>(w.x, 4 * t + 16);
  v[2] = field_tf32<4>(w.y, 4 * t);
  v[3] = field_tf32<4>(w.y, 4 * t + 16);
}
__device__ __forceinline__ void codes_tf32(uint4 w, int t, uint32_t (&v)[4]) {
  v[0] = field_tf32<8>(w.x, 8 * t);
  v[1] = field_tf32<8>(w.y, 8 * t);
  v[2] = field_tf32<8>(w.z, 8 * t);
  v[3] = field_tf32<8>(w.w, 8 * t);
}

// Entry (nl, cl) of the 16 x 16 block-diagonal restore over rows n0..n0+15 (Bo = 2^lg divides 16:
// shifts, not divisions, which cost a warp hundreds of instructions in 64 bits).
__device__ __forceinline__ float restore_entry(const DenseWeightParams& p, int lg, int64_t n0, int nl, int cl) {
  if ((nl >> lg) != (cl >> lg)) return 0.f;
  const int mask = (1 << lg) - 1;
  const int64_t blk = (n0 + nl) >> lg;
  if (blk >= (p.n + mask) >> lg) return nl == cl ? 1.f : 0.f;  // rows past the layer: never stored
  return __ldg(p.r_out + (((blk << lg) + (nl & mask)) << lg) + (cl & mask));
}

template <typename OutT, bool INT4, bool RESTORE>
__global__ void __launch_bounds__(kThreads, 4) dense_weight_kernel(const DenseWeightParams p, int tiles_per_warp) {
  constexpr bool kExact = sizeof(OutT) == 4;  // float32 out: the restore in three tf32 products
  __shared__ __align__(16) OutT stage_all[kWarps][16 * 16];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  OutT* stage = stage_all[warp];  // [j][c] of the warp's tile
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kRows;
  OutT* out = static_cast<OutT*>(p.out);

  if (p.bias && blockIdx.y == 0 && threadIdx.x < kRows && n0 + threadIdx.x < p.n)
    static_cast<OutT*>(p.bias_out)[n0 + threadIdx.x] = cast_out<OutT>(__ldg(p.bias + n0 + threadIdx.x));

  // s_n of the rows this lane's fragments touch: 8 nt + 2t and 8 nt + 2t + 1.
  float s[2][2];
#pragma unroll
  for (int nt = 0; nt < 2; ++nt)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t row = n0 + 8 * nt + 2 * t + h;
      s[nt][h] = row < p.n ? __ldg(p.w_scale + row) : 0.f;
    }
  // With a restore, diag(s) Ro as A operand of W = (diag(s) Ro)^T V (rows c, k = n in the permuted
  // order), in two tf32 halves; without one, V's columns are scaled instead.
  uint32_t ro_hi[2][4], ro_lo[2][4];
  if constexpr (RESTORE) {
    const int lg = __ffs(p.block_out) - 1;
#pragma unroll
    for (int ks = 0; ks < 2; ++ks) {
      const int nl = 8 * ks + 2 * t;
      split_tf32(restore_entry(p, lg, n0, nl, g) * s[ks][0], ro_hi[ks][0], ro_lo[ks][0]);
      split_tf32(restore_entry(p, lg, n0, nl, g + 8) * s[ks][0], ro_hi[ks][1], ro_lo[ks][1]);
      split_tf32(restore_entry(p, lg, n0, nl + 1, g) * s[ks][1], ro_hi[ks][2], ro_lo[ks][2]);
      split_tf32(restore_entry(p, lg, n0, nl + 1, g + 8) * s[ks][1], ro_hi[ks][3], ro_lo[ks][3]);
    }
  }
  // Vector stores need whole, 16-byte aligned runs of 16 outputs.
  const bool vec = n0 + kRows <= p.n && (p.n * sizeof(OutT)) % 16 == 0;

  const int64_t blocks = p.k / 16;
  const int64_t first = (static_cast<int64_t>(blockIdx.y) * kWarps + warp) * tiles_per_warp;
  const int64_t end = first + tiles_per_warp < blocks ? first + tiles_per_warp : blocks;
  TileLoads<INT4> next;
  if (first < end) next = fetch_tile<INT4>(p, n0, first, g, t, lane);
  for (int64_t b = first; b < end; ++b) {
    const TileLoads<INT4> in = next;
    if (b + 1 < end) next = fetch_tile<INT4>(p, n0, b + 1, g, t, lane);  // in flight while this one computes
    // R_in[b] as A (rows j, k = i): two tf32 halves for float32 out, one for 16-bit.
    uint32_t r_hi[2][4], r_lo[2][4];
#pragma unroll
    for (int ks = 0; ks < 2; ++ks)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        if constexpr (kExact) {
          split_tf32(in.r[ks][i], r_hi[ks][i], r_lo[ks][i]);
        } else {
          r_hi[ks][i] = act::to_tf32(in.r[ks][i]);
        }
      }
    uint32_t q[2][4];  // rows 8 nt + g
    codes_tf32(in.codes[0], t, q[0]);
    codes_tf32(in.codes[1], t, q[1]);
    const int64_t dest = in.dest;
    // v[nt]: V^T[j = g, g + 8][n = 8 nt + 2t, + 1] (scaled by s_n where no restore follows).
    float v[2][4] = {};
#pragma unroll
    for (int nt = 0; nt < 2; ++nt) {
#pragma unroll
      for (int ks = 0; ks < 2; ++ks) {
        if constexpr (kExact) mma_tf32(v[nt], r_lo[ks], q[nt][2 * ks], q[nt][2 * ks + 1]);
        mma_tf32(v[nt], r_hi[ks], q[nt][2 * ks], q[nt][2 * ks + 1]);
      }
      if constexpr (!RESTORE) {
        v[nt][0] *= s[nt][0];
        v[nt][1] *= s[nt][1];
        v[nt][2] *= s[nt][0];
        v[nt][3] *= s[nt][1];
      }
    }
    // w[nt2]: W[c = g, g + 8][j = 8 nt2 + 2t, + 1]; k step ks of this product is v[ks].
    float w[2][4];  // without a restore the tile is V itself, stored from v below
    if constexpr (RESTORE) {
#pragma unroll
      for (int nt2 = 0; nt2 < 2; ++nt2) {
        w[nt2][0] = w[nt2][1] = w[nt2][2] = w[nt2][3] = 0.f;
#pragma unroll
        for (int ks = 0; ks < 2; ++ks) {
          if constexpr (kExact) {
            uint32_t h0, l0, h1, l1;
            split_tf32(v[ks][2 * nt2], h0, l0);
            split_tf32(v[ks][2 * nt2 + 1], h1, l1);
            mma_tf32(w[nt2], ro_lo[ks], h0, h1);
            mma_tf32(w[nt2], ro_hi[ks], l0, l1);
            mma_tf32(w[nt2], ro_hi[ks], h0, h1);
          } else {
            mma_tf32(w[nt2], ro_hi[ks], act::to_tf32(v[ks][2 * nt2]), act::to_tf32(v[ks][2 * nt2 + 1]));
          }
        }
      }
    }
    // The tile into the warp's slot as [j][c], then out to rows perm[j].
    if constexpr (RESTORE) {
#pragma unroll
      for (int nt2 = 0; nt2 < 2; ++nt2) {
        const int j = 8 * nt2 + 2 * t;
        stage[j * 16 + g] = cast_out<OutT>(w[nt2][0]);
        stage[(j + 1) * 16 + g] = cast_out<OutT>(w[nt2][1]);
        stage[j * 16 + g + 8] = cast_out<OutT>(w[nt2][2]);
        stage[(j + 1) * 16 + g + 8] = cast_out<OutT>(w[nt2][3]);
      }
    } else {
#pragma unroll
      for (int nt = 0; nt < 2; ++nt) {
        const int c = 8 * nt + 2 * t;
        stage[g * 16 + c] = cast_out<OutT>(v[nt][0]);
        stage[g * 16 + c + 1] = cast_out<OutT>(v[nt][1]);
        stage[(g + 8) * 16 + c] = cast_out<OutT>(v[nt][2]);
        stage[(g + 8) * 16 + c + 1] = cast_out<OutT>(v[nt][3]);
      }
    }
    __syncwarp();
    constexpr int kVec = 16 / sizeof(OutT);       // outputs per 16-byte piece
    constexpr int kPieces = 16 * 16 / kVec / 32;  // pieces per lane: 1 (16-bit) or 2 (float32)
    if (vec) {
#pragma unroll
      for (int i = 0; i < kPieces; ++i) {
        // Row lane / 2 of the tile; 16-bit: half lane % 2 of it, float32: quarter 2 (lane % 2) + i.
        const int jrow = lane / 2, col = (kPieces == 1 ? lane % 2 : (lane % 2) * 2 + i) * kVec;
        *reinterpret_cast<uint4*>(out + dest * p.n + n0 + col) =
            *reinterpret_cast<const uint4*>(stage + jrow * 16 + col);
      }
    } else {
      for (int e = lane % 2; e < 16; e += 2) {  // this lane's row, every other output
        if (n0 + e < p.n) out[dest * p.n + n0 + e] = stage[(lane / 2) * 16 + e];
      }
    }
    __syncwarp();  // the slot is rewritten by the next tile
  }
}

template <typename OutT, bool INT4, bool RESTORE>
cudaError_t launch(const DenseWeightParams& p, int num_sms, cudaStream_t stream) {
  const int64_t row_blocks = (p.n + kRows - 1) / kRows, blocks = p.k / 16;
  // Tiles a warp walks: one while the tiles fill ~32 warps an SM, more past that.
  const int64_t warps_wanted = static_cast<int64_t>(num_sms) * 32;
  const int64_t per_warp = std::max<int64_t>(1, std::min<int64_t>(8, row_blocks * blocks / warps_wanted));
  const dim3 grid(static_cast<unsigned>(row_blocks),
                  static_cast<unsigned>((blocks + kWarps * per_warp - 1) / (kWarps * per_warp)));
  return launch_kernel(dense_weight_kernel<OutT, INT4, RESTORE>, grid, dim3(kThreads), 0, stream, /*chained=*/false,
                       p, static_cast<int>(per_warp));
}

template <typename OutT, bool INT4>
cudaError_t launch_restore(const DenseWeightParams& p, int num_sms, cudaStream_t stream) {
  return p.r_out ? launch<OutT, INT4, true>(p, num_sms, stream) : launch<OutT, INT4, false>(p, num_sms, stream);
}

template <typename OutT>
cudaError_t launch_dtype(const DenseWeightParams& p, int num_sms, cudaStream_t stream) {
  return p.wbits <= 4 ? launch_restore<OutT, true>(p, num_sms, stream) : launch_restore<OutT, false>(p, num_sms, stream);
}

}  // namespace

cudaError_t dense_weight(const DenseWeightParams& p, cudaStream_t stream) {
  if (p.n == 0 || p.k == 0) return cudaSuccess;
  if (!dense_weight_supported(p.transform.block, p.r_out != nullptr, p.block_out) || p.transform.smooth ||
      p.k % 32 != 0)
    return cudaErrorInvalidValue;
  const int sms = p.num_sms > 0 ? p.num_sms : 132;
  switch (p.out_dtype) {
    case DType::kFloat16: return launch_dtype<__half>(p, sms, stream);
    case DType::kBFloat16: return launch_dtype<__nv_bfloat16>(p, sms, stream);
    default: return launch_dtype<float>(p, sms, stream);
  }
}

}  // namespace kernels
}  // namespace duquant
