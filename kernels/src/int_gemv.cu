// The decode-size W4A8 GEMM (M <= 16 tokens, int4 weights): y^T = W a^T on mma.sync m16n8k32 with
// the weights as the A operand (16 output features per MMA) and the tokens as B (8 per MMA), so a
// single token wastes nothing on the weight side. Same contract and epilogue as int_gemm.cu.
//
// Why a kernel of its own: at these M the layer is one pass over the weights, and the tile kernels
// staged them through shared memory with ~38 instructions per MMA (address arithmetic of
// zero-filled activation rows, a 16-row tile epilogue): 2048->16384 at M = 1 ran at 1.6 TB/s.
// Here each lane loads its 16-byte fragments straight from global memory into registers (U
// chunks of 128 k in flight per warp) and unpacks them in place: ~50 instructions per KB of
// weights.
//
// A CTA is 8 warps: RG groups of 16 output features x KS slices of the k range (RG * KS = 8);
// the slices' integer partial sums meet in shared memory. On Hopper a cluster of up to 8 CTAs can
// split the k range further (forced through the split count; by size it is not used yet), CTA 0
// adding the others' sums through distributed shared memory. Integer sums are exact, so outputs
// equal the tile kernels' bit for bit. Within each 128-wide k chunk lane t of a quad owns k values
// 32t..32t+31 for weights and activations alike (int_gemm.cu's order): one 16-byte load per
// weight row.
#include <cooperative_groups.h>

#include <cstdint>

#include "duquant_kernels/kernels.h"
#include "gemm_common.cuh"
#include "launch.cuh"

namespace duquant {
namespace kernels {
namespace gemm {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = 32 * kWarps;
constexpr int kChunk = 128;  // k per chunk: 64 bytes of a weight row, 128 of an activation row
constexpr int kMaxBo = 32;
constexpr int kMaxParts = 8;  // CTAs of a cluster sharing a k range (the portable cluster size)

// 16 bytes global -> registers. kWeights: read once, so kept out of L1. Otherwise activation codes,
// written by the input kernel and read after pdl_wait: .cg (L2 only), so no L1 line from an earlier
// kernel on this SM can be stale. Volatile, so they stay in program order around pdl_wait.
template <bool kWeights>
__device__ __forceinline__ uint4 load16(const unsigned char* p) {
  uint4 v;
  if constexpr (kWeights)
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  else
    asm volatile("ld.global.cg.v4.u32 {%0, %1, %2, %3}, [%4];\n" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
}

// TOK: tokens per MMA column block (8 for M <= 8, 16 for M <= 16); KS: k slices per CTA; U: chunks
// in flight per warp.
template <int TOK, int KS, int U>
__global__ void __launch_bounds__(kThreads, 2) int_gemv_kernel(IntGemmParams p) {
  constexpr int RG = kWarps / KS;
  constexpr int COLS = 16 * RG;   // output features per CTA
  constexpr int TB = TOK / 8;     // token blocks of 8
  __shared__ int red[kWarps][16][TOK];
  __shared__ int sums[COLS][TOK];
  __shared__ float tile[TOK][COLS + 1];
  __shared__ float st[TOK], sn[COLS], bias[COLS];
  __shared__ __align__(16) float rblk[COLS * kMaxBo];

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int g = lane >> 2, t = lane & 3;
  const int rg = warp / KS, ks = warp % KS;
  const int64_t n0 = static_cast<int64_t>(blockIdx.x) * COLS;
  const int64_t row_bytes = p.k / 2;
  // This CTA's chunks (its share when a cluster along y splits the k range), then this warp's.
  const int chunks = static_cast<int>(p.k / kChunk);
  const int per_cta = (chunks + gridDim.y - 1) / gridDim.y;
  const int cbeg = min(chunks, static_cast<int>(blockIdx.y) * per_cta), cend = min(chunks, cbeg + per_cta);
  const int per = (cend - cbeg + KS - 1) / KS;
  const int c0 = min(cend, cbeg + ks * per), c1 = min(cend, c0 + per);

  // Layer constants first (no kernel of a forward writes them): weight scales, bias, R_out blocks.
  const int bo = p.r_out ? p.block_out : 1;
  for (int i = threadIdx.x; i < COLS; i += kThreads) {
    const int64_t n = n0 + i;
    sn[i] = n < p.n ? p.w_scale[n] : 0.f;
    bias[i] = p.bias && n < p.n ? p.bias[n] : 0.f;
  }
  if (p.r_out) {
    const int64_t first = n0 * bo, total = (p.n + bo - 1) / bo * bo * bo;
    for (int i = threadIdx.x; i < COLS * bo; i += kThreads) rblk[i] = first + i < total ? p.r_out[first + i] : 0.f;
  }

  // This lane's two weight rows (features g and g + 8 of its group); rows past N stay zero.
  const int64_t na = n0 + rg * 16 + g, nb = na + 8;
  const bool va = na < p.n, vb = nb < p.n;
  const unsigned char* wa = static_cast<const unsigned char*>(p.w) + (va ? na : 0) * row_bytes + 16 * t;
  const unsigned char* wb = static_cast<const unsigned char*>(p.w) + (vb ? nb : 0) * row_bytes + 16 * t;
  // Its tokens g (and g + 8): 32 bytes of each per chunk.
  const unsigned char* arow[TB];
  bool vtok[TB];
#pragma unroll
  for (int b = 0; b < TB; ++b) {
    vtok[b] = g + 8 * b < p.m;
    arow[b] = reinterpret_cast<const unsigned char*>(p.a) + (vtok[b] ? g + 8 * b : 0) * p.a_stride + 32 * t;
  }

  uint4 w_a[U], w_b[U], a_lo[U][TB], a_hi[U][TB];
  auto load_weights = [&](int c) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const bool in = c + u < c1;
      const int64_t off = static_cast<int64_t>(c + u) * (kChunk / 2);
      w_a[u] = in && va ? load16<true>(wa + off) : make_uint4(0, 0, 0, 0);
      w_b[u] = in && vb ? load16<true>(wb + off) : make_uint4(0, 0, 0, 0);
    }
  };
  auto load_codes = [&](int c) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const bool in = c + u < c1;
      const int64_t off = static_cast<int64_t>(c + u) * kChunk;
#pragma unroll
      for (int b = 0; b < TB; ++b) {
        a_lo[u][b] = in && vtok[b] ? load16<false>(arow[b] + off) : make_uint4(0, 0, 0, 0);
        a_hi[u][b] = in && vtok[b] ? load16<false>(arow[b] + off + 16) : make_uint4(0, 0, 0, 0);
      }
    }
  };

  int acc[TB][4];
#pragma unroll
  for (int b = 0; b < TB; ++b)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[b][e] = 0;

  // The first chunks' weights are requested before the chain wait: they overlap the input kernel.
  load_weights(c0);
  pdl_wait();
  if (threadIdx.x < TOK) {
    const int i = threadIdx.x;
    st[i] = i >= p.m ? 0.f : !p.a_scale ? 1.f : __ldcg(p.a_scale_per_tensor ? p.a_scale : p.a_scale + i);
  }
  for (int c = c0; c < c1; c += U) {
    if (c != c0) load_weights(c);
    load_codes(c);
#pragma unroll
    for (int u = 0; u < U; ++u) {
#pragma unroll
      for (int s = 0; s < 4; ++s) {  // k step: this lane's k values 32t + 8s .. 32t + 8s + 7
        uint32_t ra0, ra2, rb0, rb2;  // weight rows g, g + 8; k slots 0-3 and 4-7 (x 16)
        unpack_nibbles_x16(word(w_a[u], s), ra0, ra2);
        unpack_nibbles_x16(word(w_b[u], s), rb0, rb2);
#pragma unroll
        for (int b = 0; b < TB; ++b) {
          const uint4& src = s < 2 ? a_lo[u][b] : a_hi[u][b];
          mma_s8(acc[b], ra0, rb0, ra2, rb2, word(src, 2 * (s & 1)), word(src, 2 * (s & 1) + 1));
        }
      }
    }
  }
  // Only the epilogue is left: the next kernel may launch (see run_pipeline).
  pdl_trigger();

  // C fragment: acc[b][0..1] feature g, tokens 8b + 2t, 8b + 2t + 1; acc[b][2..3] feature g + 8.
#pragma unroll
  for (int b = 0; b < TB; ++b)
#pragma unroll
    for (int e = 0; e < 4; ++e) red[warp][g + (e >= 2 ? 8 : 0)][8 * b + 2 * t + (e & 1)] = acc[b][e];
  __syncthreads();
  // Sum the k slices (integers: exact in any order).
  for (int i = threadIdx.x; i < COLS * TOK; i += kThreads) {
    const int tok = i % TOK, col = i / TOK, group = col / 16, row = col % 16;
    int sum = 0;
#pragma unroll
    for (int s = 0; s < KS; ++s) sum += red[group * KS + s][row][tok];
    sums[col][tok] = sum;
  }
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (gridDim.y > 1) {
    namespace cg = cooperative_groups;
    cg::cluster_group cluster = cg::this_cluster();
    cluster.sync();  // every CTA's sums are in its shared memory
    if (blockIdx.y == 0)
      for (int i = threadIdx.x; i < COLS * TOK; i += kThreads) {
        int sum = sums[i / TOK][i % TOK];
        for (unsigned q = 1; q < gridDim.y; ++q) sum += *cluster.map_shared_rank(&sums[i / TOK][i % TOK], q);
        sums[i / TOK][i % TOK] = sum;
      }
    cluster.sync();  // nobody exits while CTA 0 still reads its sums
    if (blockIdx.y != 0) return;
  }
#endif
  __syncthreads();
  // y'' = s_t s_n acc / 16 (nibbles were read as x 16), in int_gemm.cu's order of operations.
  for (int i = threadIdx.x; i < COLS * TOK; i += kThreads) {
    const int tok = i % TOK, col = i / TOK;
    tile[tok][col] = static_cast<float>(sums[col][tok] >> 4) * st[tok] * sn[col];
  }
  __syncthreads();
  // Restore (q ascending, as the tile kernels), bias, cast.
  for (int i = threadIdx.x; i < TOK * COLS; i += kThreads) {
    const int tok = i / COLS, col = i % COLS;
    const int64_t n = n0 + col;
    if (tok >= p.m || n >= p.n) continue;
    float v;
    if (p.r_out) {
      const int cb = col & ~(bo - 1), j = col - cb;
      const float* r = rblk + cb * bo + j;
      v = 0.f;
      for (int q = 0; q < bo; ++q) v = fmaf(tile[tok][cb + q], r[q * bo], v);
    } else {
      v = tile[tok][col];
    }
    if (p.bias) v += bias[col];
    store_out(p.y, p.out_dtype, tok * p.n + n, v);
  }
}

// k slices per CTA: the fewest that still give every SM two CTAs (weight streams in flight), at
// least enough that a CTA's columns hold whole R_out blocks.
int gemv_slices(const IntGemmParams& p) {
  const int bo = p.r_out ? p.block_out : 1;
  int ks = 1;
  while (ks < kWarps && (p.n + 16 * (kWarps / ks) - 1) / (16 * (kWarps / ks)) < 2 * p.num_sms) ks *= 2;
  while (ks > 1 && 16 * (kWarps / ks) < bo) ks /= 2;
  return ks;
}

template <int TOK, int KS>
cudaError_t launch_gemv(const IntGemmParams& p, int parts, cudaStream_t stream) {
  constexpr int cols = 16 * (kWarps / KS);
  const dim3 grid(static_cast<unsigned>((p.n + cols - 1) / cols), static_cast<unsigned>(parts));
  return launch_kernel_clustered(int_gemv_kernel<TOK, KS, 4>, grid, dim3(kThreads), 0, stream, p.chain,
                                 dim3(1, static_cast<unsigned>(parts), 1), p);
}

template <int TOK>
cudaError_t launch_tok(const IntGemmParams& p, int parts, cudaStream_t stream) {
  switch (gemv_slices(p)) {
    case 1: return launch_gemv<TOK, 1>(p, parts, stream);
    case 2: return launch_gemv<TOK, 2>(p, parts, stream);
    case 4: return launch_gemv<TOK, 4>(p, parts, stream);
    default: return launch_gemv<TOK, 8>(p, parts, stream);
  }
}

}  // namespace

bool gemv_usable(const IntGemmParams& p) {
  const int bo = p.r_out ? p.block_out : 1;
  return p.m >= 1 && p.m <= 16 && p.wbits <= 4 && p.k % kChunk == 0 && bo <= kMaxBo && p.a_stride % 16 == 0;
}

int gemv_parts(const IntGemmParams& p, int forced) {
  // At least one chunk per warp of each CTA, and no clusters without Hopper and sm_90 code.
  const int64_t chunks_per_cta_warps = p.k / kChunk / gemv_slices(p);
  int most = device_facts().clusters ? kMaxParts : 1;
  while (most > 1 && most > chunks_per_cta_warps) most /= 2;
  // By size: none yet. Forced (_C.set_gemm_splits) it is tested, and timed by
  // benchmarks/gemm_tile_sweep.py; whether and where it pays was not yet measured.
  return forced > 0 ? (forced < most ? forced : most) : 1;
}

cudaError_t int_gemv(const IntGemmParams& p, int parts, cudaStream_t stream) {
  if (!gemv_usable(p) || parts < 1 || parts > kMaxParts) return cudaErrorInvalidValue;
  // Without sm_90 code the cluster exchange compiles away: a plan made for another device.
  if (parts > 1 && !device_facts().clusters) return cudaErrorInvalidValue;
  return p.m <= 8 ? launch_tok<8>(p, parts, stream) : launch_tok<16>(p, parts, stream);
}

}  // namespace gemm
}  // namespace kernels
}  // namespace duquant
