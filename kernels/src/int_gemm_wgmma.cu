// The W4A8 GEMM for large M on Hopper's warpgroup MMA (wgmma, sm_90a only: this file is compiled
// for that architecture alone, kernels/CMakeLists.txt). Same contract and epilogue as int_gemm.cu's
// mma.sync kernels (y'' = s_t s_n acc, the output block restore, bias, cast); only int4 weights.
//
// One 128 x BN output tile per CTA (BN 128 or 256), two warpgroups (64 token rows each), k in
// stages of 128.
// Per stage the activation codes are copied (cp.async) straight into the 128-byte-swizzled
// K-major layout wgmma reads from shared memory; the packed weights are copied raw, then
// unpacked by the same threads into a swizzled int8 tile while the previous stage's MMAs run.
// Nibbles are unpacked into the high half of each byte (value x 16), and the sum is shifted back,
// as in int_gemm.cu. Integer sums are exact, so outputs equal the mma.sync kernels' bit for bit.
#include <cstdint>

#include "duquant_kernels/kernels.h"
#include "gemm_common.cuh"
#include "launch.cuh"

namespace duquant {
namespace kernels {
namespace gemm {
namespace {

constexpr int kBM = 128;
constexpr int kBK = 128;  // k per stage (bytes of int8 codes per activation row)
constexpr int kThreads = 256;  // two warpgroups

// Shared-memory plan of a 128 x BN tile: STAGES activation and raw-weight stages, two unpacked
// weight tiles (one converted ahead), the epilogue operands after them.
template <int BN>
struct WgTile {
  static constexpr int kStages = BN == 256 ? 3 : 4;
  static constexpr int kATile = kBM * kBK;         // activation codes, swizzled
  static constexpr int kB8Tile = BN * kBK;         // unpacked weights, swizzled
  static constexpr int kBRawTile = BN * kBK / 2;   // packed weights as read
  static constexpr int kAOffset = 0;
  static constexpr int kB8Offset = kAOffset + kStages * kATile;
  static constexpr int kBRawOffset = kB8Offset + 2 * kB8Tile;
  static constexpr int kPipeBytes = kBRawOffset + kStages * kBRawTile;
  using Epi = Epilogue<kBM, BN>;
  static constexpr int kBodyBytes = Epi::body_bytes(kPipeBytes);
  static constexpr int kSmemBytes = Epi::smem_bytes(kPipeBytes) + 1024;  // + slack to align the base to 1024
  static_assert(kSmemBytes <= kMaxSmemBytes, "wgmma tile needs more shared memory than an SM has");
};

// The 128-byte swizzle wgmma (and TMA) use: in each 1024-byte group of eight 128-byte rows, 16-byte
// chunk c of row r sits at chunk c ^ (r % 8). Offsets are relative to a 1024-byte aligned base.
__device__ __forceinline__ int swizzle128(int r, int c) { return r * 128 + ((c ^ (r & 7)) << 4); }

// Shared-memory matrix descriptor of a K-major, 128-byte-swizzled operand: rows of 128 bytes, 8-row
// groups 1024 bytes apart (stride byte offset); the leading byte offset is unused for this layout.
__device__ __forceinline__ uint64_t smem_desc(uint32_t addr) {
  return static_cast<uint64_t>((addr >> 4) & 0x3FFF) | (static_cast<uint64_t>(1) << 16) |
         (static_cast<uint64_t>(1024 >> 4) << 32) | (static_cast<uint64_t>(1) << 62);
}

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_wait_all() { asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory"); }
// Generic-proxy writes to shared memory (cp.async, st.shared) made visible to wgmma's async proxy.
__device__ __forceinline__ void fence_async_smem() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

// d += A (64 x 32, shared memory) * B (32 x N, shared memory), s8 x s8 -> s32; N/2 registers of d.
__device__ __forceinline__ void wgmma_k32(int (&d)[64], uint64_t da, uint64_t db) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k32.s32.s8.s8 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, %64, %65, p;\n}\n"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3]), "+r"(d[4]), "+r"(d[5]), "+r"(d[6]), "+r"(d[7]), "+r"(d[8]), "+r"(d[9]), "+r"(d[10]), "+r"(d[11]), "+r"(d[12]), "+r"(d[13]), "+r"(d[14]), "+r"(d[15]), "+r"(d[16]), "+r"(d[17]), "+r"(d[18]), "+r"(d[19]), "+r"(d[20]), "+r"(d[21]), "+r"(d[22]), "+r"(d[23]), "+r"(d[24]), "+r"(d[25]), "+r"(d[26]), "+r"(d[27]), "+r"(d[28]), "+r"(d[29]), "+r"(d[30]), "+r"(d[31]), "+r"(d[32]), "+r"(d[33]), "+r"(d[34]), "+r"(d[35]), "+r"(d[36]), "+r"(d[37]), "+r"(d[38]), "+r"(d[39]), "+r"(d[40]), "+r"(d[41]), "+r"(d[42]), "+r"(d[43]), "+r"(d[44]), "+r"(d[45]), "+r"(d[46]), "+r"(d[47]), "+r"(d[48]), "+r"(d[49]), "+r"(d[50]), "+r"(d[51]), "+r"(d[52]), "+r"(d[53]), "+r"(d[54]), "+r"(d[55]), "+r"(d[56]), "+r"(d[57]), "+r"(d[58]), "+r"(d[59]), "+r"(d[60]), "+r"(d[61]), "+r"(d[62]), "+r"(d[63])
      : "l"(da), "l"(db));
}
__device__ __forceinline__ void wgmma_k32(int (&d)[128], uint64_t da, uint64_t db) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n256k32.s32.s8.s8 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}, %128, %129, p;\n}\n"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3]), "+r"(d[4]), "+r"(d[5]), "+r"(d[6]), "+r"(d[7]), "+r"(d[8]), "+r"(d[9]), "+r"(d[10]), "+r"(d[11]), "+r"(d[12]), "+r"(d[13]), "+r"(d[14]), "+r"(d[15]), "+r"(d[16]), "+r"(d[17]), "+r"(d[18]), "+r"(d[19]), "+r"(d[20]), "+r"(d[21]), "+r"(d[22]), "+r"(d[23]), "+r"(d[24]), "+r"(d[25]), "+r"(d[26]), "+r"(d[27]), "+r"(d[28]), "+r"(d[29]), "+r"(d[30]), "+r"(d[31]), "+r"(d[32]), "+r"(d[33]), "+r"(d[34]), "+r"(d[35]), "+r"(d[36]), "+r"(d[37]), "+r"(d[38]), "+r"(d[39]), "+r"(d[40]), "+r"(d[41]), "+r"(d[42]), "+r"(d[43]), "+r"(d[44]), "+r"(d[45]), "+r"(d[46]), "+r"(d[47]), "+r"(d[48]), "+r"(d[49]), "+r"(d[50]), "+r"(d[51]), "+r"(d[52]), "+r"(d[53]), "+r"(d[54]), "+r"(d[55]), "+r"(d[56]), "+r"(d[57]), "+r"(d[58]), "+r"(d[59]), "+r"(d[60]), "+r"(d[61]), "+r"(d[62]), "+r"(d[63]), "+r"(d[64]), "+r"(d[65]), "+r"(d[66]), "+r"(d[67]), "+r"(d[68]), "+r"(d[69]), "+r"(d[70]), "+r"(d[71]), "+r"(d[72]), "+r"(d[73]), "+r"(d[74]), "+r"(d[75]), "+r"(d[76]), "+r"(d[77]), "+r"(d[78]), "+r"(d[79]), "+r"(d[80]), "+r"(d[81]), "+r"(d[82]), "+r"(d[83]), "+r"(d[84]), "+r"(d[85]), "+r"(d[86]), "+r"(d[87]), "+r"(d[88]), "+r"(d[89]), "+r"(d[90]), "+r"(d[91]), "+r"(d[92]), "+r"(d[93]), "+r"(d[94]), "+r"(d[95]), "+r"(d[96]), "+r"(d[97]), "+r"(d[98]), "+r"(d[99]), "+r"(d[100]), "+r"(d[101]), "+r"(d[102]), "+r"(d[103]), "+r"(d[104]), "+r"(d[105]), "+r"(d[106]), "+r"(d[107]), "+r"(d[108]), "+r"(d[109]), "+r"(d[110]), "+r"(d[111]), "+r"(d[112]), "+r"(d[113]), "+r"(d[114]), "+r"(d[115]), "+r"(d[116]), "+r"(d[117]), "+r"(d[118]), "+r"(d[119]), "+r"(d[120]), "+r"(d[121]), "+r"(d[122]), "+r"(d[123]), "+r"(d[124]), "+r"(d[125]), "+r"(d[126]), "+r"(d[127])
      : "l"(da), "l"(db));
}
#endif

template <int BN>
__global__ void __launch_bounds__(kThreads, 1) int_gemm_wgmma_kernel(IntGemmParams p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using T = WgTile<BN>;
  constexpr int kStages = T::kStages, kATile = T::kATile, kB8Tile = T::kB8Tile, kBRawTile = T::kBRawTile;
  constexpr int kAOffset = T::kAOffset, kB8Offset = T::kB8Offset, kBRawOffset = T::kBRawOffset;
  constexpr int kBN = BN;
  using Epi = typename T::Epi;
  extern __shared__ unsigned char smem_raw[];
  unsigned char* smem = smem_raw + ((1024 - (smem_addr(smem_raw) & 1023)) & 1023);
  const int tid = threadIdx.x;
  const int wg = tid / 128, warp = (tid % 128) / 32, lane = tid & 31;
  const int g = lane >> 2, t = lane & 3;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kBM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kBN;
  const int64_t w_row_bytes = p.k / 2;
  const auto* a_g = reinterpret_cast<const unsigned char*>(p.a);
  const auto* w_g = static_cast<const unsigned char*>(p.w);
  const int num_stages = static_cast<int>((p.k + kBK - 1) / kBK);

  auto load_a = [&](int stage, int slot) {
    unsigned char* dst = smem + kAOffset + slot * kATile;
    const int64_t k0 = static_cast<int64_t>(stage) * kBK;
    for (int u = tid; u < kBM * 8; u += kThreads) {
      const int r = u >> 3, c = u & 7;
      const int64_t gr = m0 + r, gk = k0 + 16 * c;
      const bool ok = gr < p.m && gk < p.k;
      cp_async16(dst + swizzle128(r, c), ok ? a_g + gr * p.a_stride + gk : a_g, ok);
    }
  };
  auto load_b = [&](int stage, int slot) {
    unsigned char* dst = smem + kBRawOffset + slot * kBRawTile;
    const int64_t b0 = static_cast<int64_t>(stage) * (kBK / 2);
    for (int u = tid; u < kBN * 4; u += kThreads) {
      const int r = u >> 2, c = u & 3;
      const int64_t gn = n0 + r, gb = b0 + 16 * c;
      const bool ok = gn < p.n && gb < w_row_bytes;
      cp_async16(dst + r * (kBK / 2) + 16 * c, ok ? w_g + gn * w_row_bytes + gb : w_g, ok);
    }
  };
  // Raw weights of `slot` -> int8 (x 16) into swizzled buffer `buf`: 8 packed bytes (16 k) a chunk.
  auto convert_b = [&](int slot, int buf) {
    const unsigned char* src = smem + kBRawOffset + slot * kBRawTile;
    unsigned char* dst = smem + kB8Offset + buf * kB8Tile;
    for (int u = tid; u < kBN * 8; u += kThreads) {
      const int r = u >> 3, c = u & 7;
      const uint2 w = *reinterpret_cast<const uint2*>(src + r * (kBK / 2) + 8 * c);
      uint4 o;
      unpack_nibbles_x16(w.x, o.x, o.y);
      unpack_nibbles_x16(w.y, o.z, o.w);
      *reinterpret_cast<uint4*>(dst + swizzle128(r, c)) = o;
    }
  };

  const Epilogue<kBM, kBN> ep(smem + T::kBodyBytes);
  int acc[kBN / 2];
#pragma unroll
  for (int i = 0; i < kBN / 2; ++i) acc[i] = 0;

  // Weights of the first stages before the chain wait (layer constants), then the epilogue
  // operands and the activations (written by the input kernel).
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s)
    if (s < num_stages) load_b(s, s);
  pdl_wait();
  load_epilogue_operands<kBM, kBN, kThreads>(p, m0, n0, ep);
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < num_stages) load_a(s, s);
    cp_async_commit();
  }
  cp_async_wait<kStages - 2>();
  __syncthreads();
  if (num_stages > 0) convert_b(0, 0);
  fence_async_smem();
  __syncthreads();

  const uint32_t a_base = smem_addr(smem + kAOffset) + wg * 64 * kBK;
  const uint32_t b_base = smem_addr(smem + kB8Offset);
  for (int s = 0; s < num_stages; ++s) {
    const int slot = s % kStages, buf = s & 1;
    wgmma_fence();
#pragma unroll
    for (int j = 0; j < kBK / 32; ++j)
      wgmma_k32(acc, smem_desc(a_base + slot * kATile + 32 * j), smem_desc(b_base + buf * kB8Tile + 32 * j));
    wgmma_commit();
    // While the tensor cores run: refill the slot stage s-1 freed, land stage s+1, unpack its weights.
    const int next = s + kStages - 1;
    if (next < num_stages) {
      load_a(next, next % kStages);
      load_b(next, next % kStages);
    }
    cp_async_commit();
    cp_async_wait<kStages - 2>();
    __syncthreads();
    if (s + 1 < num_stages) convert_b((s + 1) % kStages, buf ^ 1);
    fence_async_smem();
    wgmma_wait_all();
    __syncthreads();  // stage s's operands free for the refill in the next iteration
  }
  pdl_trigger();
  cp_async_wait<0>();
  __syncthreads();

  // Accumulator layout of m64nN: warp w of the warpgroup holds rows 16w + g and 16w + g + 8,
  // columns 8j + 2t and 8j + 2t + 1 of each n8 block j.
  float* tile_f = reinterpret_cast<float*>(smem);
  const int row = wg * 64 + warp * 16 + g;
#pragma unroll
  for (int j = 0; j < kBN / 8; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int r = row + (e >= 2 ? 8 : 0), c = 8 * j + 2 * t + (e & 1);
      tile_f[r * Epi::kStride + c] = static_cast<float>(acc[4 * j + e] >> 4) * ep.st[r] * ep.sn[c];
    }
  __syncthreads();
  restore_bias_store<kBM, kBN, kThreads>(p, m0, n0, tile_f, ep);
#else
  __trap();  // never launched: wgmma_gemm_usable() is false without sm_90a code
#endif
}

}  // namespace

bool wgmma_gemm_usable(const IntGemmParams& p) {
  if (p.wbits > 4) return false;
  static int usable[64] = {};  // 0 unknown, 1 yes, -1 no
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev >= 64) return false;
  if (usable[dev] == 0) {
    int major = 0, minor = 0;
    const bool ok = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) == cudaSuccess &&
                    cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev) == cudaSuccess;
    usable[dev] = ok && major == 9 && minor == 0 ? 1 : -1;  // sm_90a code runs on 9.0 alone
  }
  return usable[dev] > 0;
}

template <int BN>
cudaError_t launch_wgmma(const IntGemmParams& p, cudaStream_t stream) {
  constexpr auto kernel = int_gemm_wgmma_kernel<BN>;
  constexpr int smem = WgTile<BN>::kSmemBytes;
  if (cudaError_t e = allow_dynamic_smem<kernel>(smem); e != cudaSuccess) return e;
  const dim3 grid(static_cast<unsigned>((p.n + BN - 1) / BN), static_cast<unsigned>((p.m + kBM - 1) / kBM));
  return launch_kernel(kernel, grid, dim3(kThreads), smem, stream, p.chain, p);
}

cudaError_t int_gemm_wgmma(const IntGemmParams& p, int bn, cudaStream_t stream) {
  return bn == 256 ? launch_wgmma<256>(p, stream) : launch_wgmma<128>(p, stream);
}

}  // namespace gemm
}  // namespace kernels
}  // namespace duquant
