// Weight-only GEMM of the fast path (abits = 0): transformed activations in float16/bfloat16 x int4
// weight codes, on the tensor cores (mma.sync m16n8k16, float32 accumulation), with the same fused
// epilogue as the integer GEMM (weight scale, output block restore, bias, cast).
//
// Same k arrangement as int_gemm.cu: in each 128-wide k chunk, thread t of a quad owns k values
// 32t..32t+31, so one 16-byte shared-memory read gives it a chunk's worth of nibbles. A nibble v
// becomes a 16-bit float exactly: (v ^ 8) placed in the mantissa of 128.0 (bf16) or 1024.0 (fp16),
// minus 136 or 1032, gives the two's-complement value.
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

template <bool BF16>
__device__ __forceinline__ void mma_16bit(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                          uint32_t b0, uint32_t b1) {
  if constexpr (BF16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
}

// Two packed nibbles (bits 0-3 and 16-19 of u) -> a pair of 16-bit floats holding their values.
template <bool BF16>
__device__ __forceinline__ uint32_t nibble_pair(uint32_t u) {
  u ^= 0x00080008u;
  if constexpr (BF16) {
    const uint32_t biased = u | 0x43004300u;  // 128 + (v ^ 8)
    __nv_bfloat162 r = __hsub2(*reinterpret_cast<const __nv_bfloat162*>(&biased), __floats2bfloat162_rn(136.f, 136.f));
    return *reinterpret_cast<uint32_t*>(&r);
  } else {
    const uint32_t biased = u | 0x64006400u;  // 1024 + (v ^ 8)
    __half2 r = __hsub2(*reinterpret_cast<const __half2*>(&biased), __floats2half2_rn(1032.f, 1032.f));
    return *reinterpret_cast<uint32_t*>(&r);
  }
}

template <int BM_, int BN_, int WM, int WN, int WK, int STAGES>
struct WoTile {
  static constexpr int BM = BM_, BN = BN_;
  static constexpr int kThreads = 32 * WM * WN * WK;
  static constexpr int KS = 128 * WK;
  static constexpr int A_ROW = 2 * KS;  // bytes of an activation row per stage
  static constexpr int MT = BM / WM / 16;
  static constexpr int NT = BN / WN / 8;
  static constexpr int A_STRIDE = 2 * KS + 32;  // bytes; rows land on distinct bank groups
  static constexpr int B_ROW = KS / 2;
  static constexpr int B_STRIDE = B_ROW % 128 == 64 ? B_ROW : B_ROW + 64;
  static constexpr int A_BYTES = BM * A_STRIDE;
  static constexpr int STAGE_BYTES = A_BYTES + BN * B_STRIDE;
  static constexpr int PIPE_BYTES = STAGES * STAGE_BYTES;
  using Epi = Epilogue<BM, BN>;
  static constexpr int BODY_BYTES = Epi::body_bytes(PIPE_BYTES);  // the epilogue operands start here
  static constexpr int SMEM_BYTES = Epi::smem_bytes(PIPE_BYTES);
  static_assert(MT >= 1 && NT >= 1 && BM % (16 * WM) == 0 && BN % (8 * WN) == 0, "tile shape");
};

template <int BM, int BN, int WM, int WN, int WK, int STAGES, bool BF16>
__global__ void __launch_bounds__(WoTile<BM, BN, WM, WN, WK, STAGES>::kThreads) wo_gemm_kernel(IntGemmParams p) {
  using T = WoTile<BM, BN, WM, WN, WK, STAGES>;
  extern __shared__ __align__(16) unsigned char smem[];
  const int tid = threadIdx.x;
  const int warp = tid >> 5, lane = tid & 31;
  const int g = lane >> 2, t = lane & 3;
  const int wm = warp % WM, wn = (warp / WM) % WN, wk = warp / (WM * WN);
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * BM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * BN;
  const int64_t w_row_bytes = p.k / 2;
  const auto* a_g = static_cast<const unsigned char*>(p.a16);
  const auto* w_g = static_cast<const unsigned char*>(p.w);
  const int num_stages = static_cast<int>((p.k + T::KS - 1) / T::KS);

  // Activations are 2 bytes each: rows of 2 K bytes, KS activations (2 KS bytes) per stage.
  auto load_a = [&](int stage, int slot) { load_stage_a<T>(smem, a_g, 2 * p.a_stride, 2 * p.k, p.m, m0, stage, slot); };
  auto load_b = [&](int stage, int slot) { load_stage_b<T>(smem, w_g, w_row_bytes, p.n, n0, stage, slot); };

  const Epilogue<BM, BN> ep(smem + T::BODY_BYTES);

  float acc[T::MT][T::NT][4];
#pragma unroll
  for (int i = 0; i < T::MT; ++i)
#pragma unroll
    for (int j = 0; j < T::NT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;

  load_epilogue_constants<BM, BN, T::kThreads>(p, n0, ep);
  run_pipeline<STAGES>(
      num_stages, load_a, load_b, [&] { load_token_scales<BM, T::kThreads>(p, m0, ep.st); },
      [&](int slot) {
        const unsigned char* sa = smem + slot * T::STAGE_BYTES;
        const unsigned char* sb = sa + T::A_BYTES;
        const unsigned char* a_base = sa + (wm * (BM / WM) + g) * T::A_STRIDE + wk * 256 + 64 * t;
        const unsigned char* b_base = sb + (wn * (BN / WN) + g) * T::B_STRIDE + wk * 64 + 16 * t;
        uint4 b4[T::NT];
#pragma unroll
        for (int j = 0; j < T::NT; ++j) b4[j] = *reinterpret_cast<const uint4*>(b_base + j * 8 * T::B_STRIDE);
#pragma unroll
        for (int h = 0; h < 4; ++h) {
          uint4 alo[T::MT], ahi[T::MT];
#pragma unroll
          for (int i = 0; i < T::MT; ++i) {
            alo[i] = *reinterpret_cast<const uint4*>(a_base + (i * 16) * T::A_STRIDE + 16 * h);
            ahi[i] = *reinterpret_cast<const uint4*>(a_base + (i * 16 + 8) * T::A_STRIDE + 16 * h);
          }
#pragma unroll
          for (int q = 0; q < 2; ++q) {  // k step 2h + q: nibbles 8h + 4q .. 8h + 4q + 3
#pragma unroll
            for (int j = 0; j < T::NT; ++j) {
              const uint32_t w16 = (word(b4[j], h) >> (16 * q)) & 0xFFFFu;
              const uint32_t b0 = nibble_pair<BF16>((w16 & 0xFu) | ((w16 & 0xF0u) << 12));
              const uint32_t b1 = nibble_pair<BF16>(((w16 >> 8) & 0xFu) | ((w16 & 0xF000u) << 4));
#pragma unroll
              for (int i = 0; i < T::MT; ++i)
                mma_16bit<BF16>(acc[i][j], word(alo[i], 2 * q), word(ahi[i], 2 * q), word(alo[i], 2 * q + 1),
                                word(ahi[i], 2 * q + 1), b0, b1);
            }
          }
        }
      });


  // ---- epilogue: k-split partials summed in a fixed order (deterministic), scale, restore ----
  float* tile_f = reinterpret_cast<float*>(smem);
  for (int e = tid; e < BM * T::Epi::kStride; e += T::kThreads) tile_f[e] = 0.f;
  __syncthreads();
#pragma unroll 1
  for (int turn = 0; turn < WK; ++turn) {
    if (wk == turn) {
      for_each_acc<BM, BN, WM, WN, T::MT, T::NT>(wm, wn, g, t, [&](int r, int c, int i, int j, int e) {
        tile_f[r * T::Epi::kStride + c] += acc[i][j][e];
      });
    }
    __syncthreads();
  }
  for (int e = tid; e < BM * BN; e += T::kThreads) {
    const int r = e / BN, c = e % BN;
    const bool ok = m0 + r < p.m && n0 + c < p.n;
    float& v = tile_f[r * T::Epi::kStride + c];
    v = ok ? v * ep.sn[c] : 0.f;
  }
  __syncthreads();
  restore_bias_store<BM, BN, T::kThreads>(p, m0, n0, tile_f, ep);
}

template <int BM, int BN, int WM, int WN, int WK, int STAGES>
cudaError_t launch(const IntGemmParams& p, cudaStream_t stream) {
  using T = WoTile<BM, BN, WM, WN, WK, STAGES>;
  static_assert(T::SMEM_BYTES <= kMaxSmemBytes, "tile needs more shared memory than an SM has");
  return p.a16_dtype == DType::kBFloat16
             ? launch_gemm<wo_gemm_kernel<BM, BN, WM, WN, WK, STAGES, true>, BM, BN>(T::SMEM_BYTES, T::kThreads, p, stream, 1)
             : launch_gemm<wo_gemm_kernel<BM, BN, WM, WN, WK, STAGES, false>, BM, BN>(T::SMEM_BYTES, T::kThreads, p,
                                                                                        stream, 1);
}

}  // namespace

bool wo_gemm_supported(int64_t n, int64_t k, int wbits, bool has_r_out, int block_out) {
  return wbits >= 2 && wbits <= 4 && int_gemm_supported(n, k, wbits, has_r_out, block_out);
}

cudaError_t wo_gemm(const IntGemmParams& p, cudaStream_t stream) {
  if (p.m == 0 || p.n == 0) return cudaSuccess;
  auto ctas = [&](int64_t bm, int64_t bn) { return ((p.m + bm - 1) / bm) * ((p.n + bn - 1) / bn); };
  GemmTile tile = p.tile;
  if (tile == GemmTile::kWgmma128 || tile == GemmTile::kWgmma256 || tile == GemmTile::kGemv ||
      tile == GemmTile::kGemvDirect)
    tile = GemmTile::kAuto;  // integer kernels only
  if (tile == GemmTile::kAuto) {
    tile = p.m <= 16                                    ? GemmTile::kStream
           : ctas(128, 128) >= p.num_sms                ? GemmTile::kTile128
           : ctas(64, 64) >= p.num_sms || p.m > 256     ? GemmTile::kTile64
                                                        : GemmTile::kTile32;
  }
  switch (tile) {
    case GemmTile::kStream: {
      const int bo = p.r_out ? p.block_out : 1;
      const bool wide = bo > 16 || (p.n + 31) / 32 >= p.num_sms;
      // 16-bit activations make a stage twice the integer GEMM's: fewer of them fit.
      constexpr int kDeep32 = deepest_stages<WoTile<16, 32, 1, 1, 8, 3>>();
      constexpr int kDeep16 = deepest_stages<WoTile<16, 16, 1, 1, 8, 3>>();
      using Deep32 = WoTile<16, 32, 1, 1, 8, kDeep32>;
      using Deep16 = WoTile<16, 16, 1, 1, 8, kDeep16>;
      if (p.k >= 8192 && (wide ? fits_device<Deep32>() : fits_device<Deep16>()))
        return wide ? launch<16, 32, 1, 1, 8, kDeep32>(p, stream) : launch<16, 16, 1, 1, 8, kDeep16>(p, stream);
      return wide ? launch<16, 32, 1, 1, 8, 3>(p, stream) : launch<16, 16, 1, 1, 8, 3>(p, stream);
    }
    case GemmTile::kTile32: return launch<32, 32, 2, 1, 4, 3>(p, stream);
    case GemmTile::kTile64: return launch<64, 64, 2, 2, 2, 3>(p, stream);
    case GemmTile::kTile128: return launch<128, 128, 2, 4, 1, 3>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace kernels
}  // namespace duquant
