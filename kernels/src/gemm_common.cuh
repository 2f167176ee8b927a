#pragma once
// Pieces shared by the GEMM kernels (int_gemm.cu, wo_gemm.cu): async copies, and the fused
// epilogue (operands staged in shared memory, output block restore, bias, cast).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "duquant_kernels/kernels.h"
#include "launch.cuh"

namespace duquant {
namespace kernels {
namespace gemm {

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared, asynchronously; src_bytes = 0 zero-fills without reading.
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool valid) {
  const int n = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src), "r"(n));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void cp_async4(void* dst, const void* src, bool valid) {
  const int n = valid ? 4 : 0;
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_addr(dst)), "l"(src), "r"(n));
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}


// Rows [row0, row0 + ROWS) x bytes [col0, col0 + ROW_BYTES) of a row-major byte matrix (rows x
// row_bytes, ld bytes between rows) into shared memory with STRIDE bytes between rows, 16 bytes per
// cp.async; what lies outside the matrix is zero-filled. Every operand load of both GEMMs. The
// 64-bit arithmetic is done once per call, 32-bit per chunk: with 64-bit indices per chunk these
// loads were a third of the streaming tiles' instructions (ncu, H200, 4096->1024 at M = 50). A
// tile's rows then lie within 2^31 bytes of its first: rows of up to 2^22 elements (the fast path
// takes in_features up to kMaxKernelInFeatures).
template <int ROWS, int ROW_BYTES, int STRIDE, int THREADS>
__device__ __forceinline__ void load_tile_async(unsigned char* dst, const unsigned char* src, int64_t ld,
                                                int64_t rows, int64_t row_bytes, int64_t row0, int64_t col0) {
  constexpr int CHUNKS = ROWS * ROW_BYTES / 16;
  const unsigned char* base = src + row0 * ld + col0;
  const int ld32 = static_cast<int>(ld);
  const int rows_left = static_cast<int>(rows - row0 < ROWS ? rows - row0 : ROWS);
  const int bytes_left = static_cast<int>(row_bytes - col0 < ROW_BYTES ? row_bytes - col0 : ROW_BYTES);
#pragma unroll
  for (int i = 0; i < (CHUNKS + THREADS - 1) / THREADS; ++i) {
    const int c = static_cast<int>(threadIdx.x) + i * THREADS;
    if (CHUNKS % THREADS != 0 && c >= CHUNKS) break;
    const int r = c / (ROW_BYTES / 16), col = (c % (ROW_BYTES / 16)) * 16;
    const bool ok = r < rows_left && col < bytes_left;
    cp_async16(dst + r * STRIDE + col, ok ? base + r * ld32 + col : src, ok);
  }
}

// f(row, col, i, j, e) for each accumulator element acc[i][j][e] a thread holds, at its tile
// position in the mma m16n8 C layout (warp (wm, wn) of WM x WN, lane = 4 g + t).
template <int BM, int BN, int WM, int WN, int MT, int NT, class F>
__device__ __forceinline__ void for_each_acc(int wm, int wn, int g, int t, F&& f) {
#pragma unroll
  for (int i = 0; i < MT; ++i)
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e)
        f(wm * (BM / WM) + i * 16 + g + (e >= 2 ? 8 : 0), wn * (BN / WN) + j * 8 + 2 * t + (e & 1), i, j, e);
}

// D = A B + D on the tensor cores, int8 x int8 -> int32, m16n8k32 (A row-major, B column-major).
__device__ __forceinline__ void mma_s8(int (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3, uint32_t b0,
                                       uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// 8 packed nibbles (k = 0..7, low nibble first) -> two int8x4 registers holding 16 x value.
__device__ __forceinline__ void unpack_nibbles_x16(uint32_t w, uint32_t& lo, uint32_t& hi) {
  const uint32_t even = (w << 4) & 0xF0F0F0F0u;  // nibbles 0, 2, 4, 6 in the high halves of bytes 0..3
  const uint32_t odd = w & 0xF0F0F0F0u;          // nibbles 1, 3, 5, 7
  lo = __byte_perm(even, odd, 0x5140);           // k 0, 1, 2, 3
  hi = __byte_perm(even, odd, 0x7362);           // k 4, 5, 6, 7
}

__device__ __forceinline__ uint32_t word(const uint4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

__device__ __forceinline__ void store_out(void* y, DType dt, int64_t idx, float v) {
  switch (dt) {
    case DType::kFloat16: static_cast<__half*>(y)[idx] = __float2half_rn(v); break;
    case DType::kBFloat16: static_cast<__nv_bfloat16*>(y)[idx] = __float2bfloat16_rn(v); break;
    default: static_cast<float*>(y)[idx] = v; break;
  }
}

__device__ __forceinline__ __half2 to_pair(float a, float b, const __half2*) { return __floats2half2_rn(a, b); }
__device__ __forceinline__ __nv_bfloat162 to_pair(float a, float b, const __nv_bfloat162*) {
  return __floats2bfloat162_rn(a, b);
}

// Four 16-bit outputs (Pair: two of them) at element idx of y with one 8-byte store.
template <class Pair>
__device__ __forceinline__ void store4_16bit(void* y, int64_t idx, const float (&v)[4]) {
  const Pair a = to_pair(v[0], v[1], static_cast<const Pair*>(nullptr));
  const Pair b = to_pair(v[2], v[3], static_cast<const Pair*>(nullptr));
  uint2 u;
  u.x = *reinterpret_cast<const uint32_t*>(&a);
  u.y = *reinterpret_cast<const uint32_t*>(&b);
  *reinterpret_cast<uint2*>(static_cast<unsigned char*>(y) + 2 * idx) = u;
}

// Four consecutive outputs (idx a multiple of 4, the row length too) with one store.
__device__ __forceinline__ void store_out4(void* y, DType dt, int64_t idx, const float (&v)[4]) {
  switch (dt) {
    case DType::kFloat16: store4_16bit<__half2>(y, idx, v); break;
    case DType::kBFloat16: store4_16bit<__nv_bfloat162>(y, idx, v); break;
    default: *reinterpret_cast<float4*>(static_cast<float*>(y) + idx) = make_float4(v[0], v[1], v[2], v[3]); break;
  }
}

// One pipeline stage's operand tiles for a tile shape T (int_gemm.cu's Tile, wo_gemm.cu's WoTile):
// BM activation rows of T::A_ROW bytes and BN weight rows of T::B_ROW bytes, at k stage `stage`,
// into shared-memory slot `slot`. Activation rows are `a_row_bytes` long (K x element size), `lda`
// bytes apart; weight rows are `w_row_bytes` long and dense.
template <class T>
__device__ __forceinline__ void load_stage_a(unsigned char* smem, const unsigned char* a, int64_t lda,
                                             int64_t a_row_bytes, int64_t m, int64_t m0, int stage, int slot) {
  load_tile_async<T::BM, T::A_ROW, T::A_STRIDE, T::kThreads>(smem + slot * T::STAGE_BYTES, a, lda, m, a_row_bytes, m0,
                                                             static_cast<int64_t>(stage) * T::A_ROW);
}
template <class T>
__device__ __forceinline__ void load_stage_b(unsigned char* smem, const unsigned char* w, int64_t w_row_bytes,
                                             int64_t n, int64_t n0, int stage, int slot) {
  load_tile_async<T::BN, T::B_ROW, T::B_STRIDE, T::kThreads>(smem + slot * T::STAGE_BYTES + T::A_BYTES, w,
                                                             w_row_bytes, n, w_row_bytes, n0,
                                                             static_cast<int64_t>(stage) * T::B_ROW);
}

// The cp.async pipeline of both GEMMs. The first stages' weights are requested before the chain
// wait (they do not depend on the input kernels, which may still be running), as are the
// epilogue's constants by the caller (load_epilogue_constants); then `after_wait` (the token
// scales) and the activations. Per stage: wait for it, refill the slot the previous stage freed,
// compute(slot). Ends with every copy landed and a barrier, so the epilogue may reuse the
// pipeline's shared memory.
template <int STAGES, class LoadA, class LoadB, class AfterWait, class Compute>
__device__ __forceinline__ void run_pipeline(int num_stages, LoadA&& load_a, LoadB&& load_b, AfterWait&& after_wait,
                                             Compute&& compute) {
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s)
    if (s < num_stages) load_b(s, s);
  pdl_wait();
  after_wait();
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < num_stages) load_a(s, s);
    cp_async_commit();
  }
  for (int stage = 0; stage < num_stages; ++stage) {
    cp_async_wait<STAGES - 2>();
    __syncthreads();  // stage `stage` has landed for everyone; slot (stage-1) % STAGES is free again
    const int next = stage + STAGES - 1;
    if (next < num_stages) {
      load_a(next, next % STAGES);
      load_b(next, next % STAGES);
    }
    cp_async_commit();
    compute(stage % STAGES);
  }
  // Only the epilogue is left: the next layer's first kernel may launch and look up its constants
  // (triggering at the start let whole next layers prefetch weights into this one's bandwidth).
  pdl_trigger();
  cp_async_wait<0>();
  __syncthreads();
}

// Shared memory of the epilogue. The y'' tile [BM][kStride] floats reuses the pipeline's buffers;
// the operands get their own region after them, fetched asynchronously with the first stages, so
// the epilogue touches no global memory but its output (dependent global loads there cost more
// than the whole main loop): st[BM] token scales (1 when there are none), sn[BN] weight scales,
// bias[BN], r: the tile's R_out blocks, one contiguous run since BN % Bo == 0.
template <int BM, int BN>
struct Epilogue {
  static constexpr int kStride = BN + 4;
  static constexpr int kTileBytes = BM * kStride * 4;
  static constexpr int kMaxBo = 32;
  static constexpr int kOperandBytes = (BM + 2 * BN + BN * kMaxBo) * 4;
  // Where the operand region starts, and the kernel's whole dynamic shared memory.
  static constexpr int body_bytes(int pipe_bytes) { return pipe_bytes > kTileBytes ? pipe_bytes : kTileBytes; }
  static constexpr int smem_bytes(int pipe_bytes) { return body_bytes(pipe_bytes) + kOperandBytes; }

  float* st;
  float* sn;
  float* bias;
  float* r;
  __device__ explicit Epilogue(unsigned char* operands)
      : st(reinterpret_cast<float*>(operands)), sn(st + BM), bias(sn + BN), r(bias + BN) {}
  // A view of another tile's operands (a run of its rows: st points at the first).
  __device__ Epilogue(float* token_scales, float* weight_scales, float* bias_row, float* r_blocks)
      : st(token_scales), sn(weight_scales), bias(bias_row), r(r_blocks) {}
};

// The epilogue's layer constants: weight scales, bias, the tile's R_out blocks. No kernel of a
// forward writes them, so they are requested before the chain wait, with the first weights, and
// their HBM round trips overlap the input kernel instead of following it.
template <int BM, int BN, int THREADS>
__device__ __forceinline__ void load_epilogue_constants(const IntGemmParams& p, int64_t n0, const Epilogue<BM, BN>& ep) {
  const int tid = threadIdx.x;
  const int bo = p.r_out ? p.block_out : 1;
  for (int i = tid; i < BN; i += THREADS) {
    const int64_t gn = n0 + i;
    const bool ok = gn < p.n;
    cp_async4(ep.sn + i, p.w_scale + (ok ? gn : 0), ok);
    cp_async4(ep.bias + i, p.bias ? p.bias + (ok ? gn : 0) : p.w_scale, ok && p.bias);
  }
  if (p.r_out) {
    const int64_t first = n0 * bo, total = (p.n + bo - 1) / bo * bo * bo;
    for (int i = tid; i < BN * bo / 4; i += THREADS) {
      const int64_t src = first + 4 * static_cast<int64_t>(i);
      const bool ok = src < total;
      cp_async16(ep.r + 4 * i, p.r_out + (ok ? src : 0), ok);
    }
  }
}

// The token scales (the input kernel's, where there are any): after the chain wait.
template <int BM, int THREADS>
__device__ __forceinline__ void load_token_scales(const IntGemmParams& p, int64_t m0, float* st) {
  for (int i = threadIdx.x; i < BM; i += THREADS) {
    const int64_t gm = m0 + i;
    const bool ok = gm < p.m;
    if (p.a_scale) cp_async4(st + i, p.a_scale_per_tensor ? p.a_scale : p.a_scale + (ok ? gm : 0), ok);
    else st[i] = 1.f;
  }
}

// Restore of RPT rows x 4 columns (one Bo block, Bo >= 4) at tile position (r0, c0), into out:
// out[i][j] = sum_q y''[r0 + i RSTEP][cb + q] * R[q][c0 - cb + j], q ascending from 0 (the scalar order),
// cb the block's first column. Operands come as 16-byte shared-memory reads: 5 FMAs per read at
// RPT = 2, where one output at a time costs two reads per FMA and made the epilogue as slow as
// the main loop at large M and short K.
// Rows r0, r0 + RSTEP, ...
template <int RPT, int STRIDE, int RSTEP>
__device__ __forceinline__ void restore_quad(const float* tile_f, const float* r_blocks, int bo, int r0, int c0,
                                             float (&out)[RPT][4]) {
  const int cb = c0 & ~(bo - 1);
  const float* rq = r_blocks + cb * bo + (c0 - cb);  // row q of the block, columns c0..c0+3
#pragma unroll
  for (int i = 0; i < RPT; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) out[i][j] = 0.f;
  for (int q4 = 0; q4 < bo; q4 += 4) {
    float4 y[RPT], r[4];
#pragma unroll
    for (int i = 0; i < RPT; ++i) y[i] = *reinterpret_cast<const float4*>(tile_f + (r0 + i * RSTEP) * STRIDE + cb + q4);
#pragma unroll
    for (int s = 0; s < 4; ++s) r[s] = *reinterpret_cast<const float4*>(rq + (q4 + s) * bo);
#pragma unroll
    for (int i = 0; i < RPT; ++i) {
      const float ys[4] = {y[i].x, y[i].y, y[i].z, y[i].w};
#pragma unroll
      for (int s = 0; s < 4; ++s) {
        out[i][0] = fmaf(ys[s], r[s].x, out[i][0]);
        out[i][1] = fmaf(ys[s], r[s].y, out[i][1]);
        out[i][2] = fmaf(ys[s], r[s].z, out[i][2]);
        out[i][3] = fmaf(ys[s], r[s].w, out[i][3]);
      }
    }
  }
}

// One lane's share of a 16-column block's restore at Bo = 16 (restore16_bias_store, and the wgmma
// kernel's variant that stores by bulk copies): R_out columns 4 quad..+3 of block blk and their
// bias in registers; row() turns one row's 16 y'' values into those 4 outputs, q ascending from 0
// (restore_quad's order), then the bias.
struct Restore16Quad {
  float4 r[16];  // R_out[q][4 quad .. + 3]
  float b[4] = {0.f, 0.f, 0.f, 0.f};
  bool bias;
  template <int BM, int BN>
  __device__ __forceinline__ Restore16Quad(const IntGemmParams& p, const Epilogue<BM, BN>& ep, int blk, int quad)
      : bias(p.bias != nullptr) {
#pragma unroll
    for (int q = 0; q < 16; ++q) r[q] = *reinterpret_cast<const float4*>(ep.r + 16 * 16 * blk + 16 * q + 4 * quad);
    if (bias) {
#pragma unroll
      for (int j = 0; j < 4; ++j) b[j] = ep.bias[16 * blk + 4 * quad + j];
    }
  }
  __device__ __forceinline__ void row(const float* y_row, float (&out)[4]) const {
    const float4* y = reinterpret_cast<const float4*>(y_row);
    out[0] = out[1] = out[2] = out[3] = 0.f;
#pragma unroll
    for (int q4 = 0; q4 < 4; ++q4) {
      const float4 v = y[q4];
      const float ys[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
      for (int s = 0; s < 4; ++s) {
        const float4 rq = r[4 * q4 + s];
        out[0] = fmaf(ys[s], rq.x, out[0]);
        out[1] = fmaf(ys[s], rq.y, out[1]);
        out[2] = fmaf(ys[s], rq.z, out[2]);
        out[3] = fmaf(ys[s], rq.w, out[3]);
      }
    }
    if (bias) {
#pragma unroll
      for (int j = 0; j < 4; ++j) out[j] += b[j];
    }
  }
};

// The restore at Bo = 16 (the default block) with each thread's R_out columns in registers, for
// tiles of many rows (the wgmma kernel, the 64x64 and 128x128 mma.sync tiles). A warp
// owns one 16-column block and walks its rows 8 at a time, lane = 4 x row + column quad: a row's
// 16 y'' values are 4 broadcast float4 reads (the 8 rows in distinct banks), then 64 FMAs, q
// ascending as in restore_quad, so the outputs are bit for bit those of restore_bias_store. Its
// per-item index arithmetic and R_out re-reads made the 128 x 256 wgmma tile's epilogue take
// longer than its main loop (2048->16384 at M = 4096 on an H200: 154 of 384 us restoring).
// tile_f and ep as restore_bias_store; rows past p.m are skipped.
template <int BM, int BN, int THREADS>
__device__ __forceinline__ void restore16_bias_store(const IntGemmParams& p, int64_t m0, int64_t n0,
                                                     const float* tile_f, const Epilogue<BM, BN>& ep) {
  constexpr int STRIDE = Epilogue<BM, BN>::kStride;
  constexpr int WARPS = THREADS / 32, BLOCKS = BN / 16;
  static_assert(BN % 16 == 0 && BM % 8 == 0 && (WARPS % BLOCKS == 0 || BLOCKS % WARPS == 0),
                "warps split evenly over the tile's 16-column blocks");
  constexpr int WPB = WARPS >= BLOCKS ? WARPS / BLOCKS : 1;  // warps sharing a block's rows
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int quad = lane % 4, row_in = lane / 4;
  const bool whole = p.n % 4 == 0;  // then 4 outputs in one aligned store
  for (int blk = warp / WPB; blk < BLOCKS; blk += WARPS / WPB) {
    const int c0 = 16 * blk + 4 * quad;
    const Restore16Quad rs(p, ep, blk, quad);
    const int64_t gn0 = n0 + c0;
    if (gn0 >= p.n) continue;
    const bool full = whole && gn0 + 3 < p.n;
#pragma unroll 2
    for (int row = 8 * (warp % WPB) + row_in; row < BM; row += 8 * WPB) {
      const int64_t gm = m0 + row;
      if (gm >= p.m) break;  // rows ascend
      float out[4];
      rs.row(tile_f + row * STRIDE + 16 * blk, out);
      if (full) {
        store_out4(p.y, p.out_dtype, gm * p.n + gn0, out);
      } else {
        for (int j = 0; j < 4 && gn0 + j < p.n; ++j) store_out(p.y, p.out_dtype, gm * p.n + gn0 + j, out[j]);
      }
    }
  }
}

// tile_f[BM][kStride] holds y'' (padding rows/columns exact zeros); writes
// y = restore(y'') + bias in the output dtype.
template <int BM, int BN, int THREADS>
__device__ __forceinline__ void restore_bias_store(const IntGemmParams& p, int64_t m0, int64_t n0,
                                                   const float* tile_f, const Epilogue<BM, BN>& ep) {
  constexpr int EPI_STRIDE = Epilogue<BM, BN>::kStride;
  const int bo = p.r_out ? p.block_out : 1;
  if (bo >= 4) {
    // Items of RPT rows x 4 columns; 2 rows each where the tile has enough items for every thread
    // (4 rows pushed the 64x64 tile past 128 registers, to one CTA per SM).
    constexpr int RPT = (BM / 2) * (BN / 4) >= THREADS ? 2 : 1;
    constexpr int ITEMS = (BM / RPT) * (BN / 4);
    // A warp takes 8 consecutive rows (step 8 between a thread's rows) x 16 columns: its R_out
    // reads are 64 bytes every lane shares, its y'' reads 8 rows in distinct banks, its stores
    // 32-byte runs. Lanes along columns (the other way) read R_out 512 bytes at a time: the
    // epilogue of the 256 x 128 wgmma tile was bound by those shared-memory reads.
    constexpr int RSTEP = 8;
    static_assert(BM % (8 * RPT) == 0 && BN % 16 == 0, "every GEMM tile is 8 x RPT rows by 16 columns whole");
    for (int it = threadIdx.x; it < ITEMS; it += THREADS) {
      const int lo = it % 4, rg = (it / 4) % 8, rest = it / 32, row_blocks = BM / (8 * RPT);
      const int r0 = (rest % row_blocks) * 8 * RPT + rg;
      const int c0 = ((rest / row_blocks) * 4 + lo) * 4;
      float out[RPT][4];
      restore_quad<RPT, EPI_STRIDE, RSTEP>(tile_f, ep.r, bo, r0, c0, out);
      const int64_t gn0 = n0 + c0;
      const bool whole = p.n % 4 == 0 && gn0 + 3 < p.n;  // then 4 outputs in one aligned store
#pragma unroll
      for (int i = 0; i < RPT; ++i) {
        const int64_t gm = m0 + r0 + i * RSTEP;
        if (gm >= p.m) continue;
        if (p.bias) {
#pragma unroll
          for (int j = 0; j < 4; ++j) out[i][j] += ep.bias[c0 + j];
        }
        if (whole) {
          store_out4(p.y, p.out_dtype, gm * p.n + gn0, out[i]);
        } else {
          for (int j = 0; j < 4 && gn0 + j < p.n; ++j) store_out(p.y, p.out_dtype, gm * p.n + gn0 + j, out[i][j]);
        }
      }
    }
    return;
  }
  for (int e = threadIdx.x; e < BM * BN; e += THREADS) {
    const int r = e / BN, c = e % BN;
    const int64_t gm = m0 + r, gn = n0 + c;
    if (gm >= p.m || gn >= p.n) continue;
    float v;
    if (p.r_out) {
      // y[:, blk] = y''[:, blk] * R_out[blk]; Bo 1 or 2.
      const int cb = c & (bo - 1), c0 = c - cb;
      const float* rcol = ep.r + c0 * bo + cb;
      const float* yrow = tile_f + r * EPI_STRIDE + c0;
      v = 0.f;
      for (int q = 0; q < bo; ++q) v = fmaf(yrow[q], rcol[q * bo], v);
    } else {
      v = tile_f[r * EPI_STRIDE + c];
    }
    if (p.bias) v += ep.bias[c];
    store_out(p.y, p.out_dtype, gm * p.n + gn, v);
  }
}

// restore_bias_store, the way that suits the tile: R_out in registers (restore16_bias_store) for
// Bo = 16 where each thread restores 2 rows or more, the quads (restore_bias_store) elsewhere: in
// smaller tiles a thread would load its 16 R_out rows for one output row. Bit for bit the same.
template <int BM, int BN, int THREADS>
__device__ __forceinline__ void restore_bias_store_best(const IntGemmParams& p, int64_t m0, int64_t n0,
                                                        const float* tile_f, const Epilogue<BM, BN>& ep) {
  constexpr int WARPS = THREADS / 32, BLOCKS = BN / 16;
  constexpr bool kFits = BN % 16 == 0 && BM % 8 == 0 && (WARPS % BLOCKS == 0 || BLOCKS % WARPS == 0);
  constexpr int kRowsPerThread = kFits ? BM / (8 * (WARPS >= BLOCKS ? WARPS / BLOCKS : 1)) : 0;
  if constexpr (kRowsPerThread >= 2) {
    if (p.r_out && p.block_out == 16) {
      restore16_bias_store<BM, BN, THREADS>(p, m0, n0, tile_f, ep);
      return;
    }
  }
  restore_bias_store<BM, BN, THREADS>(p, m0, n0, tile_f, ep);
}

// Split-k: the CTAs along grid z share an output tile's k range, `stages` pipeline stages each.
struct SplitK {
  int stages = 0;
  int* counters = nullptr;  // [tiles] arrivals per output tile, zero at launch
  int* partials = nullptr;  // [splits][tiles][BM * BN] integer partial sums
};

// Split-k's meeting point, for a CTA holding its partial sums in tile_i (BM x BN ints, STRIDE per
// row): writes them to the workspace; the CTA that arrives last for this output tile then adds
// every slice's partial into tile_i and gets true, the others false (they are done). Integer sums:
// exact whichever CTA comes last. The fences are the threadFenceReduction pattern of the CUDA
// programming guide: partials visible device-wide before the arrival is counted.
template <int BM, int BN, int STRIDE, int THREADS>
__device__ __forceinline__ bool split_k_gather(const SplitK& sk, int* tile_i) {
  __shared__ int last;
  const int64_t tiles = static_cast<int64_t>(gridDim.x) * gridDim.y;
  const int64_t tile = static_cast<int64_t>(blockIdx.y) * gridDim.x + blockIdx.x;
  int* mine = sk.partials + (blockIdx.z * tiles + tile) * (BM * BN);
  for (int e = threadIdx.x; e < BM * BN; e += THREADS) __stcg(mine + e, tile_i[(e / BN) * STRIDE + e % BN]);
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) last = atomicAdd(sk.counters + tile, 1) == static_cast<int>(gridDim.z) - 1;
  __syncthreads();
  if (!last) return false;
  __threadfence();
  for (int e = threadIdx.x; e < BM * BN; e += THREADS) {
    int sum = 0;
    for (unsigned z = 0; z < gridDim.z; ++z) sum += __ldcg(sk.partials + (z * tiles + tile) * (BM * BN) + e);
    tile_i[(e / BN) * STRIDE + e % BN] = sum;
  }
  __syncthreads();
  return true;
}

// int_gemm_wgmma.cu: the large-M kernel on Hopper's warpgroup MMA, in builds with sm_90a code
// (DUQUANT_KERNELS_WGMMA). Usable on compute capability 9.0 with int4 weights.
bool wgmma_gemm_usable(const IntGemmParams& p);
// Output tiles of `tokens` (128 or 256) x 128 outputs; 128-token tiles may split k over a cluster of
// `splits` (2, 4 or 8) CTAs.
cudaError_t int_gemm_wgmma(const IntGemmParams& p, int tokens, int splits, cudaStream_t stream);

// int_gemv.cu: the skinny kernel (M <= 64, int4 weights, K a multiple of 128; direct codes: M <=
// 16). gemv_parts: the CTAs of a cluster that share each k range: `forced` (> 0) as far as the
// device and sizes allow, else by size.
bool gemv_usable(const IntGemmParams& p, bool direct);
int gemv_parts(const IntGemmParams& p, bool direct, int forced);
cudaError_t int_gemv(const IntGemmParams& p, bool direct, int parts, cudaStream_t stream);

// Shared memory one CTA may have on sm_90 (227 KB; an A100 offers 163: the deep pipelines sized
// by deepest_stages step down there, fits_device).
constexpr int kMaxSmemBytes = 227 * 1024;

// Whether tile T's shared memory fits this device: the deep pipelines are measured on Hopper and
// step down elsewhere. True when the device is unknown.
template <class T>
bool fits_device() {
  const DeviceFacts& dev = device_facts();
  return !dev.known || T::SMEM_BYTES <= dev.smem_optin;
}

// The deepest pipeline, up to 6 stages, whose shared memory fits in kMaxSmemBytes, for the tile
// shape of T (any stage count), for long rows, where the weight stream needs many stages in flight.
template <class T>
constexpr int deepest_stages() {
  const int s = (kMaxSmemBytes - T::Epi::kOperandBytes) / T::STAGE_BYTES;
  return s > 6 ? 6 : s;
}

// Column tiles of BN outputs over a group's segments, in turn.
template <int BN>
__host__ __device__ __forceinline__ int64_t column_tiles(const GemmGroup& g) {
  int64_t tiles = 0;
#pragma unroll
  for (int s = 0; s < kMaxGemmSegments; ++s)
    if (s < g.segments) tiles += (g.segment[s].n + BN - 1) / BN;
  return tiles;
}

// In a grouped launch, makes p the segment that column tile `tile` falls in (its weights, epilogue
// operands, output and width) and returns the tile's index within it; otherwise returns `tile`.
// Static indices only, so the segment table stays in parameter space.
template <int BN>
__device__ __forceinline__ int64_t use_segment(IntGemmParams& p, const GemmGroup& g, int64_t tile) {
  if (g.segments == 0) return tile;
  int64_t first = 0, local = tile;
  int chosen = 0;
#pragma unroll
  for (int s = 0; s < kMaxGemmSegments; ++s) {
    if (s < g.segments) {
      if (tile >= first) {
        chosen = s;
        local = tile - first;
      }
      first += (g.segment[s].n + BN - 1) / BN;
    }
  }
#pragma unroll
  for (int s = 0; s < kMaxGemmSegments; ++s) {
    if (s == chosen) {
      p.w = g.segment[s].w;
      p.w_scale = g.segment[s].w_scale;
      p.r_out = g.segment[s].r_out;
      p.bias = g.segment[s].bias;
      p.y = g.segment[s].y;
      p.n = g.segment[s].n;
    }
  }
  return local;
}

// Launches a GEMM kernel with `smem` bytes of dynamic shared memory (fixed per kernel) on a grid of
// BM x BN tiles, `splits` deep along z; `extra` follows the parameters as kernel arguments.
template <auto Kernel, int BM, int BN, typename... Extra>
cudaError_t launch_gemm(int smem, int threads, const IntGemmParams& p, cudaStream_t stream, unsigned splits,
                        const Extra&... extra) {
  if (cudaError_t e = allow_dynamic_smem<Kernel>(smem); e != cudaSuccess) return e;
  const dim3 grid(static_cast<unsigned>((p.n + BN - 1) / BN), static_cast<unsigned>((p.m + BM - 1) / BM), splits);
  return launch_kernel(Kernel, grid, dim3(threads), smem, stream, p.chain, p, extra...);
}

}  // namespace gemm
}  // namespace kernels
}  // namespace duquant
