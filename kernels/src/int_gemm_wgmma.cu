// The W4A8 GEMM past M = 64 on Hopper's warpgroup MMA (wgmma, sm_90a only: this file is compiled
// for that architecture alone, kernels/CMakeLists.txt). Same contract and epilogue as int_gemm.cu's
// mma.sync kernels (y'' = s_t s_n acc, the output block restore, bias, cast); only int4 weights.
//
// Warp-specialised: one producer thread feeds a ring of shared-memory stages with the tensor memory
// accelerator (TMA), two consumer warpgroups multiply. A CTA computes 128 outputs x TN tokens
// (TN 128 or 256), k in stages of 128:
// - The weights are wgmma's A operand, from registers: each consumer warpgroup owns 64 output
//   rows; per stage its threads read their packed nibbles from shared memory (a 64-byte swizzle
//   keeps those reads free of bank conflicts) and unpack them straight into the A fragments. The
//   old kernel unpacked into a shared-memory int8 tile first; that traffic, plus every thread
//   copying and a full barrier per stage, held it to ~420 int8 TOPS on an H200.
// - The activation codes are B, read by the tensor cores from shared memory in the 128-byte
//   swizzled K-major layout the TMA writes.
// - Stage s's registers are refilled only after stage s-1's MMAs retire (wgmma.wait_group 1), and
//   while stage s's run; a stage's slot goes back to the producer the same way (an mbarrier).
// - Where the 128-token tiles are few, a cluster of 2-8 CTAs splits the k range and sums the
//   partial tiles through distributed shared memory (16384->2048 at M = 256: 108 -> 83 us).
// - Unsplit, with 16-byte aligned output rows, the outputs leave in 32 x 16 boxes by bulk copies
//   (restore16_tma_store).
// H200 (benchmarks/results/gemm_tiles_wgmma_h200.txt, linear_speed_h200.txt): 2048->16384 at
// M = 4096 in 335 us for the layer (the first version: 684). A variant without the producer
// warpgroup, its 128-token tiles two CTAs an SM so that one's epilogue overlaps the other's MMAs,
// measured no faster (2048->2048 at M = 1024: 38.0 against 27.8 us).
// Nibbles are unpacked into the high half of each byte (value x 16), and the sum is shifted back,
// as in int_gemm.cu. Integer sums are exact, so outputs equal the mma.sync kernels' bit for bit.
#include <cooperative_groups.h>
#include <cuda.h>  // CUtensorMap and its enums (types only: the encoder comes through the runtime)
#include <cudaTypedefs.h>

#include <cstdint>

#include "duquant_kernels/kernels.h"
#include "gemm_common.cuh"
#include "launch.cuh"

namespace duquant {
namespace kernels {
namespace gemm {
namespace {

constexpr int kFeat = 128;               // outputs (weight rows) per CTA: two warpgroups of 64
constexpr int kKs = 128;                 // k per stage: one 128-byte row of activation codes
constexpr int kWRow = kKs / 2;           // bytes of a packed weight row per stage
constexpr int kConsumers = 256;          // two warpgroups
constexpr int kThreads = kConsumers + 128;  // and the producer warpgroup (one thread issues copies)

// Shared-memory plan for TN tokens: the stages' activation tiles (1024-byte aligned for the
// 128-byte swizzle), their weight tiles, then the epilogue operands and the mbarriers. The
// epilogue's float tile reuses the stages.
template <int TN>
struct WgTile {
  static constexpr int kActBytes = TN * kKs;
  static constexpr int kWBytes = kFeat * kWRow;
  static constexpr int kStages = TN == 256 ? 4 : 6;
  static constexpr int kActOffset = 0;
  static constexpr int kWOffset = kStages * kActBytes;
  static constexpr int kPipeBytes = kWOffset + kStages * kWBytes;
  using Epi = Epilogue<TN, kFeat>;
  static constexpr int kBodyBytes = Epi::body_bytes(kPipeBytes);
  static constexpr int kBarOffset = Epi::smem_bytes(kPipeBytes);  // full[kStages], empty[kStages]
  static constexpr int kSmemBytes = kBarOffset + 2 * kStages * 8 + 1024;  // + slack to align the base
  static_assert(kSmemBytes <= kMaxSmemBytes, "wgmma tile needs more shared memory than an SM has");
  static_assert(kActBytes % 1024 == 0 && kWOffset % 1024 == 0 && kWBytes % 1024 == 0, "swizzle alignment");
};

// Shared-memory matrix descriptor of a K-major, 128-byte-swizzled operand: rows of 128 bytes, 8-row
// groups 1024 bytes apart (stride byte offset); the leading byte offset is unused for this layout.
__device__ __forceinline__ uint64_t smem_desc(uint32_t addr) {
  return static_cast<uint64_t>((addr >> 4) & 0x3FFF) | (static_cast<uint64_t>(1) << 16) |
         (static_cast<uint64_t>(1024 >> 4) << 32) | (static_cast<uint64_t>(1) << 62);
}

// Byte offset of byte b (0..63) of weight row r in a stage's tile as the TMA writes it with the
// 64-byte swizzle: 16-byte chunk c of row r sits at chunk c ^ ((r / 2) % 4).
__device__ __forceinline__ int w_swizzled(int r, int b) { return r * kWRow + ((((b >> 4) ^ (r >> 1)) & 3) << 4) + (b & 15); }

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  uint32_t done = 0;
  do {
    asm volatile(
        "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(bar), "r"(parity)
        : "memory");
  } while (!done);
}
// Box (c0, c1) of a 2-D tensor map into shared memory; completion counted in bytes on `bar`.
__device__ __forceinline__ void tma_load(uint32_t dst, const CUtensorMap* map, int c0, int c1, uint32_t bar) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(bar)
      : "memory");
}
// Registers move from the producer warpgroup to the consumers (the entry cap, 65536 / 384 rounded
// down per scheduler, is 168: too few for the 256-token accumulators and two fragment sets).
__device__ __forceinline__ void producer_registers() { asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n" ::: "memory"); }
__device__ __forceinline__ void consumer_registers() { asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n" ::: "memory"); }
__device__ __forceinline__ void named_sync_consumers() { asm volatile("bar.sync 1, %0;\n" ::"n"(kConsumers) : "memory"); }

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Keeps the compiler from moving accesses of the accumulators across the asynchronous MMAs.
template <int R>
__device__ __forceinline__ void fence_regs(int (&d)[R]) {
#pragma unroll
  for (int i = 0; i < R; ++i) asm volatile("" : "+r"(d[i])::"memory");
}

// d += A (64 x 32, registers: this thread's fragment a) * B (32 x 128, shared memory), s8 x s8 -> s32.
__device__ __forceinline__ void wgmma_rs_k32(int (&d)[64], const uint32_t (&a)[4], uint64_t db) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k32.s32.s8.s8 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, {%64, %65, %66, %67}, %68, p;\n}\n"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3]), "+r"(d[4]), "+r"(d[5]), "+r"(d[6]), "+r"(d[7]), "+r"(d[8]), "+r"(d[9]), "+r"(d[10]), "+r"(d[11]), "+r"(d[12]), "+r"(d[13]), "+r"(d[14]), "+r"(d[15]), "+r"(d[16]), "+r"(d[17]), "+r"(d[18]), "+r"(d[19]), "+r"(d[20]), "+r"(d[21]), "+r"(d[22]), "+r"(d[23]), "+r"(d[24]), "+r"(d[25]), "+r"(d[26]), "+r"(d[27]), "+r"(d[28]), "+r"(d[29]), "+r"(d[30]), "+r"(d[31]), "+r"(d[32]), "+r"(d[33]), "+r"(d[34]), "+r"(d[35]), "+r"(d[36]), "+r"(d[37]), "+r"(d[38]), "+r"(d[39]), "+r"(d[40]), "+r"(d[41]), "+r"(d[42]), "+r"(d[43]), "+r"(d[44]), "+r"(d[45]), "+r"(d[46]), "+r"(d[47]), "+r"(d[48]), "+r"(d[49]), "+r"(d[50]), "+r"(d[51]), "+r"(d[52]), "+r"(d[53]), "+r"(d[54]), "+r"(d[55]), "+r"(d[56]), "+r"(d[57]), "+r"(d[58]), "+r"(d[59]), "+r"(d[60]), "+r"(d[61]), "+r"(d[62]), "+r"(d[63])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db));
}
// d += A (64 x 32, registers: this thread's fragment a) * B (32 x 256, shared memory), s8 x s8 -> s32.
__device__ __forceinline__ void wgmma_rs_k32(int (&d)[128], const uint32_t (&a)[4], uint64_t db) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n256k32.s32.s8.s8 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}, {%128, %129, %130, %131}, %132, p;\n}\n"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3]), "+r"(d[4]), "+r"(d[5]), "+r"(d[6]), "+r"(d[7]), "+r"(d[8]), "+r"(d[9]), "+r"(d[10]), "+r"(d[11]), "+r"(d[12]), "+r"(d[13]), "+r"(d[14]), "+r"(d[15]), "+r"(d[16]), "+r"(d[17]), "+r"(d[18]), "+r"(d[19]), "+r"(d[20]), "+r"(d[21]), "+r"(d[22]), "+r"(d[23]), "+r"(d[24]), "+r"(d[25]), "+r"(d[26]), "+r"(d[27]), "+r"(d[28]), "+r"(d[29]), "+r"(d[30]), "+r"(d[31]), "+r"(d[32]), "+r"(d[33]), "+r"(d[34]), "+r"(d[35]), "+r"(d[36]), "+r"(d[37]), "+r"(d[38]), "+r"(d[39]), "+r"(d[40]), "+r"(d[41]), "+r"(d[42]), "+r"(d[43]), "+r"(d[44]), "+r"(d[45]), "+r"(d[46]), "+r"(d[47]), "+r"(d[48]), "+r"(d[49]), "+r"(d[50]), "+r"(d[51]), "+r"(d[52]), "+r"(d[53]), "+r"(d[54]), "+r"(d[55]), "+r"(d[56]), "+r"(d[57]), "+r"(d[58]), "+r"(d[59]), "+r"(d[60]), "+r"(d[61]), "+r"(d[62]), "+r"(d[63]), "+r"(d[64]), "+r"(d[65]), "+r"(d[66]), "+r"(d[67]), "+r"(d[68]), "+r"(d[69]), "+r"(d[70]), "+r"(d[71]), "+r"(d[72]), "+r"(d[73]), "+r"(d[74]), "+r"(d[75]), "+r"(d[76]), "+r"(d[77]), "+r"(d[78]), "+r"(d[79]), "+r"(d[80]), "+r"(d[81]), "+r"(d[82]), "+r"(d[83]), "+r"(d[84]), "+r"(d[85]), "+r"(d[86]), "+r"(d[87]), "+r"(d[88]), "+r"(d[89]), "+r"(d[90]), "+r"(d[91]), "+r"(d[92]), "+r"(d[93]), "+r"(d[94]), "+r"(d[95]), "+r"(d[96]), "+r"(d[97]), "+r"(d[98]), "+r"(d[99]), "+r"(d[100]), "+r"(d[101]), "+r"(d[102]), "+r"(d[103]), "+r"(d[104]), "+r"(d[105]), "+r"(d[106]), "+r"(d[107]), "+r"(d[108]), "+r"(d[109]), "+r"(d[110]), "+r"(d[111]), "+r"(d[112]), "+r"(d[113]), "+r"(d[114]), "+r"(d[115]), "+r"(d[116]), "+r"(d[117]), "+r"(d[118]), "+r"(d[119]), "+r"(d[120]), "+r"(d[121]), "+r"(d[122]), "+r"(d[123]), "+r"(d[124]), "+r"(d[125]), "+r"(d[126]), "+r"(d[127])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db));
}
#endif

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
// restore16_bias_store (the same operations in the same order: outputs bit for bit the same) with
// the outputs leaving by the tensor memory accelerator: warp w restores 16-column block w, 32 rows
// at a time, into its staging box (up to 2 KB; in the stages, past the float tile), which one bulk copy
// stores, clipped at the layer's edges. Against each lane's 8-byte stores, H200, layer us at
// M = 4096: 2048->16384 352.5 -> 338.5, 1024->4096 75.3 -> 71.9, 2048->2048 66.1 -> 64.2; long
// rows (16384->2048) unchanged.
template <int BM, int BN, int THREADS>
__device__ __forceinline__ void restore16_tma_store(const IntGemmParams& p, int64_t m0, int64_t n0,
                                                    const float* tile_f, const Epilogue<BM, BN>& ep,
                                                    unsigned char* staging, const CUtensorMap* y_map) {
  constexpr int STRIDE = Epilogue<BM, BN>::kStride;
  static_assert(BN / 16 == THREADS / 32 && BM % 32 == 0, "a warp a 16-column block, 32 rows a box");
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, quad = lane % 4, row_in = lane / 4;
  const int blk = warp;
  unsigned char* box = staging + warp * (32 * 16 * 4);
  const int esize = p.out_dtype == DType::kFloat32 ? 4 : 2;
  if (n0 + 16 * blk >= p.n) return;
  const Restore16Quad rs(p, ep, blk, quad);
  for (int r0 = 0; r0 < BM && m0 + r0 < p.m; r0 += 32) {
    if (lane == 0) asm volatile("cp.async.bulk.wait_group.read 0;\n" ::: "memory");  // the box is free
    __syncwarp();
#pragma unroll
    for (int pass = 0; pass < 4; ++pass) {
      const int rb = 8 * pass + row_in;
      float out[4];
      rs.row(tile_f + (r0 + rb) * STRIDE + 16 * blk, out);
      store_out4(box, p.out_dtype, rb * 16 + 4 * quad, out);
    }
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
    __syncwarp();
    if (lane == 0) {
      asm volatile(
          "cp.async.bulk.tensor.2d.global.shared::cta.bulk_group [%0, {%1, %2}], [%3];\n"
          "cp.async.bulk.commit_group;\n" ::"l"(reinterpret_cast<uint64_t>(y_map)),
          "r"(static_cast<int>((n0 + 16 * blk) * esize)), "r"(static_cast<int>(m0 + r0)), "r"(smem_addr(box))
          : "memory");
    }
  }
  if (lane == 0) asm volatile("cp.async.bulk.wait_group.read 0;\n" ::: "memory");  // before the CTA's memory goes
}
#endif

// SPLIT > 1: a cluster of SPLIT CTAs along grid z shares the output tile, each multiplying a run
// of k stages; their integer partial tiles are summed through distributed shared memory, each CTA
// adding up and finishing TN / SPLIT of the tile's tokens (exact: outputs equal the unsplit ones).
template <int TN, int SPLIT>
__global__ void __launch_bounds__(kThreads, 1)
    int_gemm_wgmma_kernel(const __grid_constant__ CUtensorMap act_map, const __grid_constant__ CUtensorMap w_map,
                          const __grid_constant__ CUtensorMap y_map, bool tma_out, IntGemmParams p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using T = WgTile<TN>;
  constexpr int kStages = T::kStages;
  using Epi = typename T::Epi;
  extern __shared__ unsigned char smem_raw[];
  unsigned char* smem = smem_raw + ((1024 - (smem_addr(smem_raw) & 1023)) & 1023);
  const int tid = threadIdx.x, warp = tid / 32, lane = tid & 31;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * kFeat;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * TN;
  // This CTA's k stages: [s0, s0 + num_stages), all of them unless split; split evenly, so that
  // every CTA has at least one (the launch asks for no more CTAs than stages).
  const int all_stages = static_cast<int>((p.k + kKs - 1) / kKs);
  namespace cg = cooperative_groups;
  const int rank = SPLIT > 1 ? static_cast<int>(cg::this_cluster().block_rank()) : 0;
  const int s0 = rank * all_stages / SPLIT;
  const int num_stages = (rank + 1) * all_stages / SPLIT - s0;
  const uint32_t bars = smem_addr(smem + T::kBarOffset);
  auto full = [&](int slot) { return bars + 8 * slot; };              // the producer's copies landed
  auto empty = [&](int slot) { return bars + 8 * (kStages + slot); };  // the consumers' 8 warps are done
  if (tid == 0) {
    for (int s = 0; s < kStages; ++s) {
      mbar_init(full(s), 1);
      mbar_init(empty(s), kConsumers / 32);
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();

  if (warp >= kConsumers / 32) {
    producer_registers();
    // The producer: one thread issues every copy. The first stages' weights before the chain wait
    // (layer constants), the activations (the input kernel's codes) after it.
    if (warp == kConsumers / 32 && lane == 0) {
      const uint32_t act0 = smem_addr(smem + T::kActOffset), w0 = smem_addr(smem + T::kWOffset);
      const int first = num_stages < kStages ? num_stages : kStages;
      for (int s = 0; s < first; ++s) {
        mbar_expect_tx(full(s), T::kActBytes + T::kWBytes);
        tma_load(w0 + s * T::kWBytes, &w_map, (s0 + s) * kWRow, static_cast<int>(n0), full(s));
      }
      pdl_wait();
      for (int s = 0; s < first; ++s)
        tma_load(act0 + s * T::kActBytes, &act_map, (s0 + s) * kKs, static_cast<int>(m0), full(s));
      for (int s = kStages; s < num_stages; ++s) {
        const int slot = s % kStages;
        mbar_wait(empty(slot), ((s / kStages) - 1) & 1);
        mbar_expect_tx(full(slot), T::kActBytes + T::kWBytes);
        tma_load(w0 + slot * T::kWBytes, &w_map, (s0 + s) * kWRow, static_cast<int>(n0), full(slot));
        tma_load(act0 + slot * T::kActBytes, &act_map, (s0 + s) * kKs, static_cast<int>(m0), full(slot));
      }
    }
    pdl_trigger();
    if constexpr (SPLIT > 1) {  // stays for the cluster's two barriers (exiting would also count as arrived)
      cg::this_cluster().sync();
      cg::this_cluster().sync();
    }
    return;
  }

  consumer_registers();
  // The consumers. Warp wq of warpgroup wg holds weight rows (outputs) wrow and wrow + 8 of the tile.
  const int wg = warp / 4, wq = warp % 4, g = lane >> 2, t = lane & 3;
  const int wrow = wg * 64 + wq * 16 + g;
  const Epi ep(smem + T::kBodyBytes);
  load_epilogue_constants<TN, kFeat, kConsumers>(p, n0, ep);
  pdl_wait();
  load_token_scales<TN, kConsumers>(p, m0, ep.st);
  cp_async_commit();

  int acc[TN / 2];
#pragma unroll
  for (int i = 0; i < TN / 2; ++i) acc[i] = 0;

  // A fragments of a stage (m64k32 each, j = k step): a[j][0] row wrow, k 32j + 4t..+3; [1] row
  // wrow + 8; [2], [3] the same rows at k + 16. 4 packed nibbles are 2 bytes at 16j + 2t (+ 8).
  auto convert = [&](int slot, uint32_t (&a)[4][4]) {
    const unsigned char* wt = smem + T::kWOffset + slot * T::kWBytes;
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int r = wrow + 8 * h;
        const uint32_t lo = *reinterpret_cast<const unsigned short*>(wt + w_swizzled(r, 16 * j + 2 * t));
        const uint32_t hi = *reinterpret_cast<const unsigned short*>(wt + w_swizzled(r, 16 * j + 8 + 2 * t));
        unpack_nibbles_x16(lo | (hi << 16), a[j][h], a[j][2 + h]);
      }
  };
  const uint32_t act_base = smem_addr(smem + T::kActOffset);
  auto mma_stage = [&](int s, const uint32_t (&a)[4][4]) {
    const uint32_t b = act_base + (s % kStages) * T::kActBytes;
    wgmma_fence();
    fence_regs(acc);
#pragma unroll
    for (int j = 0; j < 4; ++j) wgmma_rs_k32(acc, a[j], smem_desc(b + 32 * j));
    wgmma_commit();
    fence_regs(acc);
  };
  // After stage s is issued: once stage s-1's MMAs retire, its slot goes back to the producer and
  // its registers take stage s+1's weights (while stage s runs).
  auto refill = [&](int s, uint32_t (&next)[4][4]) {
    wgmma_wait<1>();
    fence_regs(acc);
    if (s > 0 && lane == 0) mbar_arrive(empty((s - 1) % kStages));
    if (s + 1 < num_stages) {
      mbar_wait(full((s + 1) % kStages), ((s + 1) / kStages) & 1);
      convert((s + 1) % kStages, next);
    }
  };
  uint32_t a0[4][4], a1[4][4];  // two register sets, used in turn (constant indices: no local memory)
  mbar_wait(full(0), 0);
  convert(0, a0);
  for (int s = 0; s < num_stages; s += 2) {
    mma_stage(s, a0);
    refill(s, a1);
    if (s + 1 < num_stages) {
      mma_stage(s + 1, a1);
      refill(s + 1, a0);
    }
  }
  wgmma_wait<0>();
  fence_regs(acc);
  pdl_trigger();
  cp_async_wait<0>();
  named_sync_consumers();  // every MMA retired: the stages may be overwritten; the operands landed

  // The tile is [token][output]. fn(token, output, sum) for each accumulator of m64nTN: warp wq
  // holds rows (outputs) 16wq + g and 16wq + g + 8, columns (tokens) 8j + 2t and 8j + 2t + 1 of
  // each n8 block j. The sums are multiples of 16 (nibbles read as x 16): shifted back exactly.
  float* tile_f = reinterpret_cast<float*>(smem);
  auto for_each_sum = [&](auto&& fn) {
#pragma unroll
    for (int j = 0; j < TN / 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e)
        fn(8 * j + 2 * t + (e & 1), wg * 64 + wq * 16 + g + (e >= 2 ? 8 : 0), acc[4 * j + e] >> 4);
  };
  if constexpr (SPLIT == 1) {
    // y'' = s_t s_n sum, the weight scales in registers and the tile declared apart from the token
    // scales: otherwise every store to it (which might alias them) forced both to be read again.
    const int f0 = wg * 64 + wq * 16 + g;
    const float sn[2] = {ep.sn[f0], ep.sn[f0 + 8]};
    const float* __restrict__ st = ep.st;
    float* __restrict__ out = tile_f;
    for_each_sum([&](int tok, int f, int sum) {
      out[tok * Epi::kStride + f] = static_cast<float>(sum) * st[tok] * sn[f == f0 ? 0 : 1];
    });
    named_sync_consumers();
    constexpr int kStaging = (Epi::kTileBytes + 127) / 128 * 128;  // after the float tile, in the stages
    static_assert(kStaging + 8 * 32 * 16 * 4 <= T::kPipeBytes, "the staging boxes fit beside the float tile");
    if (tma_out && p.r_out && p.block_out == 16)
      restore16_tma_store<TN, kFeat, kConsumers>(p, m0, n0, tile_f, ep, smem + kStaging, &y_map);
    else
      restore_bias_store_best<TN, kFeat, kConsumers>(p, m0, n0, tile_f, ep);
  } else {
    // The partial sums, then the cluster's meeting point.
    int* tile_i = reinterpret_cast<int*>(smem);
    for_each_sum([&](int tok, int f, int sum) { tile_i[tok * Epi::kStride + f] = sum; });
    cg::cluster_group cluster = cg::this_cluster();
    cluster.sync();  // every CTA's partials are in its shared memory
    // This CTA's TN / SPLIT tokens: every CTA's partials added (integers: any order is exact),
    // scaled into this CTA's tile in place (the others read only their own tokens' rows of it).
    constexpr int kRows = TN / SPLIT;
    const int r0 = rank * kRows;
    for (int it = tid; it < kRows * (kFeat / 4); it += kConsumers) {
      const int tok = r0 + it / (kFeat / 4), f = (it % (kFeat / 4)) * 4;
      const int at = tok * Epi::kStride + f;
      int4 sum = make_int4(0, 0, 0, 0);
#pragma unroll
      for (int q = 0; q < SPLIT; ++q) {
        const int4 v = *reinterpret_cast<const int4*>(cluster.map_shared_rank(tile_i + at, q));
        sum.x += v.x;
        sum.y += v.y;
        sum.z += v.z;
        sum.w += v.w;
      }
      const float st = ep.st[tok];
      *reinterpret_cast<float4*>(tile_f + at) =
          make_float4(static_cast<float>(sum.x) * st * ep.sn[f], static_cast<float>(sum.y) * st * ep.sn[f + 1],
                      static_cast<float>(sum.z) * st * ep.sn[f + 2], static_cast<float>(sum.w) * st * ep.sn[f + 3]);
    }
    named_sync_consumers();
    cluster.barrier_arrive();  // done reading the other CTAs' partials
    const Epilogue<kRows, kFeat> mine(ep.st + r0, ep.sn, ep.bias, ep.r);
    restore_bias_store_best<kRows, kFeat, kConsumers>(p, m0 + r0, n0, tile_f + r0 * Epi::kStride, mine);
    cluster.barrier_wait();  // and they with this one's: its shared memory may go
  }
#else
  __trap();  // never launched: wgmma_gemm_usable() is false without sm_90a code
#endif
}

// The driver's tensor-map encoder, through the runtime (no link against libcuda); null when the
// driver lacks it.
using EncodeTiled = PFN_cuTensorMapEncodeTiled_v12000;
EncodeTiled tensor_map_encoder() {
  static const EncodeTiled fn = [] {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult q{};
#if CUDART_VERSION >= 12050
    const cudaError_t e = cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault, &q);
#else  // the versioned query came with CUDA 12.5
    const cudaError_t e = cudaGetDriverEntryPoint("cuTensorMapEncodeTiled", &f, cudaEnableDefault, &q);
#endif
    if (e != cudaSuccess || q != cudaDriverEntryPointSuccess) {
      (void)cudaGetLastError();
      return static_cast<EncodeTiled>(nullptr);
    }
    return reinterpret_cast<EncodeTiled>(f);
  }();
  return fn;
}

// A 2-D byte matrix (rows x cols, `stride` bytes between rows) read in boxes of box_rows x
// box_cols; what lies outside it reads as zeros.
bool byte_matrix_map(CUtensorMap* map, const void* base, int64_t rows, int64_t cols, int64_t stride, int box_rows,
                     int box_cols, CUtensorMapSwizzle swizzle) {
  const EncodeTiled encode = tensor_map_encoder();
  if (encode == nullptr) return false;
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(cols), static_cast<cuuint64_t>(rows)};
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(stride)};
  const cuuint32_t box[2] = {static_cast<cuuint32_t>(box_cols), static_cast<cuuint32_t>(box_rows)};
  const cuuint32_t elem[2] = {1, 1};
  return encode(map, CU_TENSOR_MAP_DATA_TYPE_UINT8, 2, const_cast<void*>(base), dims, strides, box, elem,
                CU_TENSOR_MAP_INTERLEAVE_NONE, swizzle, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

}  // namespace

bool wgmma_gemm_usable(const IntGemmParams& p) {
  // The copy engine reads 16-byte aligned rows.
  if (p.wbits > 4 || reinterpret_cast<uintptr_t>(p.a) % 16 != 0 || p.a_stride % 16 != 0 ||
      reinterpret_cast<uintptr_t>(p.w) % 16 != 0 || p.k % 32 != 0)
    return false;
  static int usable[64] = {};  // 0 unknown, 1 yes, -1 no
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev >= 64) return false;
  if (usable[dev] == 0) {
    int major = 0, minor = 0;
    const bool ok = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) == cudaSuccess &&
                    cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev) == cudaSuccess;
    // sm_90a code runs on 9.0 alone.
    usable[dev] = ok && major == 9 && minor == 0 && tensor_map_encoder() != nullptr ? 1 : -1;
  }
  return usable[dev] > 0;
}

template <int TN, int SPLIT>
cudaError_t launch_wgmma(const IntGemmParams& p, cudaStream_t stream) {
  constexpr auto kernel = int_gemm_wgmma_kernel<TN, SPLIT>;
  constexpr int smem = WgTile<TN>::kSmemBytes;
  CUtensorMap act_map, w_map, y_map{};
  if (!byte_matrix_map(&act_map, p.a, p.m, p.k, p.a_stride, TN, kKs, CU_TENSOR_MAP_SWIZZLE_128B) ||
      !byte_matrix_map(&w_map, p.w, p.n, p.k / 2, p.k / 2, kFeat, kWRow, CU_TENSOR_MAP_SWIZZLE_64B))
    return cudaErrorInvalidValue;
  // Outputs by bulk copies (boxes of 32 rows x 16 outputs) where the restore is the 16-column one
  // and the output rows are 16-byte aligned; the map is encoded only then.
  const int64_t esize = p.out_dtype == DType::kFloat32 ? 4 : 2;
  const bool tma_out = SPLIT == 1 && p.r_out && p.block_out == 16 && reinterpret_cast<uintptr_t>(p.y) % 16 == 0 &&
                       (p.n * esize) % 16 == 0 &&
                       byte_matrix_map(&y_map, p.y, p.m, p.n * esize, p.n * esize, 32, 16 * static_cast<int>(esize),
                                       CU_TENSOR_MAP_SWIZZLE_NONE);
  if (cudaError_t e = allow_dynamic_smem<kernel>(smem); e != cudaSuccess) return e;
  const dim3 grid(static_cast<unsigned>((p.n + kFeat - 1) / kFeat), static_cast<unsigned>((p.m + TN - 1) / TN), SPLIT);
  return launch_kernel_clustered(kernel, grid, dim3(kThreads), smem, stream, p.chain, dim3(1, 1, SPLIT), act_map,
                                 w_map, y_map, tma_out, p);
}

cudaError_t int_gemm_wgmma(const IntGemmParams& p, int tokens, int splits, cudaStream_t stream) {
  if (splits > (p.k + kKs - 1) / kKs) return cudaErrorInvalidValue;  // a CTA without k stages would hang
  if (tokens == 256) return splits == 1 ? launch_wgmma<256, 1>(p, stream) : cudaErrorInvalidValue;
  switch (splits) {
    case 1: return launch_wgmma<128, 1>(p, stream);
    case 2: return launch_wgmma<128, 2>(p, stream);
    case 4: return launch_wgmma<128, 4>(p, stream);
    case 8: return launch_wgmma<128, 8>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace gemm
}  // namespace kernels
}  // namespace duquant
