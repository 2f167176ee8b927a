// The skinny W4A8 GEMM (M <= 64 tokens, int4 weights): y^T = W a^T on mma.sync m16n8k32 with the
// weights as the A operand (16 output features per MMA) and the tokens as B (8 per MMA), so a
// single token wastes nothing on the weight side and 64 tokens share each unpacked weight
// fragment over 8 MMAs. Same contract and epilogue as int_gemm.cu; integer sums are exact, so
// outputs equal the tile kernels' bit for bit.
//
// Why a kernel of its own: at these M the layer is one pass over the weights, and the tile kernels
// staged them through shared memory with ~38 instructions per MMA (address arithmetic of
// zero-filled activation rows, a 16-row tile epilogue): 2048->16384 at M = 1 ran at 1.6 TB/s.
// Here each lane loads its 16-byte weight fragments straight from global memory into registers
// (U chunks of 128 k per round) and unpacks them in place.
//
// A CTA is 8 warps: RG groups of 16 output features x KS slices of its k range (RG * KS = 8); the
// slices' integer partial sums meet in shared memory. On Hopper a cluster of up to 8 CTAs splits
// the k range further; each CTA of it then finishes a share of the tokens, adding the others'
// partial sums through distributed shared memory.
//
// Activation codes, two ways:
// - staged (the default): after the chain wait the CTA copies its tokens' codes for its k range
//   into shared memory once (cp.async), and every warp reads its MMA fragments there. The RG
//   feature groups share them, so L2 serves each code N / (16 RG) times instead of N / 16 (M = 16
//   on 2048->16384: 32 MB of L2 reads per call the other way); weight rounds are double-buffered
//   in registers, the next one in flight while the current one multiplies.
// - direct ("gemv-direct", and where the staged copy does not fit in shared memory): each warp
//   loads its fragments from L2 along with each round of weights (M <= 16).
// Within each 128-wide k chunk lane t of a quad owns k values 32t..32t+31 for weights and
// activations alike (int_gemm.cu's order): one 16-byte load per weight row.
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
constexpr int kMaxParts = 8;    // CTAs of a cluster sharing a k range (the portable cluster size)
constexpr int kMaxTokens = 64;  // staged
constexpr int kMaxDirectTokens = 16;

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

__host__ __device__ constexpr int align16(int bytes) { return (bytes + 15) / 16 * 16; }

// Dynamic shared memory of one CTA (offsets in bytes, each 16-byte aligned):
//   sums  [TOK][COLS] int32: the CTA's partial sums, its k slices added (cluster peers read them)
//   body  the staged codes [rows][stride bytes]; then, reused once the products are done,
//         red [8 warps][16][TOK] int32 (KS > 1) and the scaled tile [TOK][COLS + 1] float
//   consts st[TOK], sn[COLS], bias[COLS], rblk[COLS][kMaxBo]
struct SmemLayout {
  int sums, body, consts, total;
  __host__ __device__ constexpr SmemLayout(int tok, int ks, int staged_bytes)
      : sums(0), body(align16(tok * 16 * (kWarps / ks) * 4)), consts(0), total(0) {
    const int cols = 16 * (kWarps / ks);
    const int red = ks > 1 ? kWarps * 16 * tok * 4 : 0;
    const int tile = tok * (cols + 1) * 4;
    const int body_bytes = align16(staged_bytes > red + tile ? staged_bytes : red + tile);
    consts = body + body_bytes;
    total = consts + align16((tok + 2 * cols + cols * kMaxBo) * 4);
  }
};

// Staged codes: row stride of the CTA's k range plus 16 bytes, so the 16-byte fragment reads of a
// quarter warp (tokens g, g + 1 x lanes t = 0..3, 32 bytes apart) hit distinct banks.
__host__ __device__ constexpr int staged_stride(int chunks_per_cta) { return chunks_per_cta * kChunk + 16; }

// TOK: tokens per CTA (8, 16, 32 or 64; blocks of 8 per MMA); KS: k slices per CTA; U: chunks per
// weight round; STAGED: codes from shared memory (above).
template <int TOK, int KS, int U, bool STAGED>
__global__ void __launch_bounds__(kThreads, 2) int_gemv_kernel(IntGemmParams p) {
  constexpr int RG = kWarps / KS;
  constexpr int COLS = 16 * RG;  // output features per CTA
  constexpr int TB = TOK / 8;    // token blocks of 8
  extern __shared__ __align__(16) unsigned char smem[];

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
  const int stride = staged_stride(per_cta);

  constexpr SmemLayout L(TOK, KS, 0);  // sums and the constants' sizes do not depend on the staging
  int* sums = reinterpret_cast<int*>(smem + L.sums);
  unsigned char* body = smem + L.body;
  const int rows = static_cast<int>(p.m < TOK ? p.m : TOK);  // tokens this CTA holds codes of
  const int consts_at = STAGED ? SmemLayout(TOK, KS, rows * stride).consts : L.consts;
  float* st = reinterpret_cast<float*>(smem + consts_at);
  float* sn = st + TOK;
  float* bias = sn + COLS;
  float* rblk = bias + COLS;

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
  // Its tokens g + 8b: 32 bytes of each per chunk.
  bool vtok[TB];
#pragma unroll
  for (int b = 0; b < TB; ++b) vtok[b] = g + 8 * b < p.m;

  struct Round {
    uint4 a[U], b[U];  // weight rows g and g + 8, U chunks
  };
  auto load_weights = [&](Round& r, int c) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const bool in = c + u < c1;
      const int64_t off = static_cast<int64_t>(c + u) * (kChunk / 2);
      r.a[u] = in && va ? load16<true>(wa + off) : make_uint4(0, 0, 0, 0);
      r.b[u] = in && vb ? load16<true>(wb + off) : make_uint4(0, 0, 0, 0);
    }
  };

  int acc[TB][4];
#pragma unroll
  for (int b = 0; b < TB; ++b)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[b][e] = 0;

  // Four k steps of one chunk: this lane's k values 32t + 8s .. 32t + 8s + 7, s = 2h + q; lo/hi:
  // the token blocks' codes of half h (16 bytes each).
  auto multiply_half = [&](const uint4& w_a, const uint4& w_b, int h, const uint4 (&codes)[TB]) {
#pragma unroll
    for (int q = 0; q < 2; ++q) {
      const int s = 2 * h + q;
      uint32_t ra0, ra2, rb0, rb2;  // weight rows g, g + 8; k slots 0-3 and 4-7 (x 16)
      unpack_nibbles_x16(word(w_a, s), ra0, ra2);
      unpack_nibbles_x16(word(w_b, s), rb0, rb2);
#pragma unroll
      for (int b = 0; b < TB; ++b) mma_s8(acc[b], ra0, rb0, ra2, rb2, word(codes[b], 2 * q), word(codes[b], 2 * q + 1));
    }
  };

  // The first round of weights is requested before the chain wait: it overlaps the input kernel.
  Round cur;
  load_weights(cur, c0);
  pdl_wait();
  if (threadIdx.x < TOK) {
    const int i = threadIdx.x;
    st[i] = i >= p.m ? 0.f : !p.a_scale ? 1.f : __ldcg(p.a_scale_per_tensor ? p.a_scale : p.a_scale + i);
  }

  if constexpr (STAGED) {
    // The CTA's tokens x its chunks, 16 bytes per copy; rows past M are never read (vtok).
    const int pieces = (cend - cbeg) * (kChunk / 16);
    const unsigned char* a = reinterpret_cast<const unsigned char*>(p.a) + static_cast<int64_t>(cbeg) * kChunk;
    for (int i = threadIdx.x; i < rows * pieces; i += kThreads) {
      const int r = i / pieces, col = (i % pieces) * 16;
      cp_async16(body + r * stride + col, a + r * p.a_stride + col, true);
    }
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
    const unsigned char* frag = body + g * stride + 32 * t;  // + token block, chunk, half
    for (int c = c0; c < c1; c += U) {
      Round next;
      if (c + U < c1) load_weights(next, c + U);
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (c + u >= c1) break;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          uint4 codes[TB];
#pragma unroll
          for (int b = 0; b < TB; ++b)
            codes[b] = vtok[b] ? *reinterpret_cast<const uint4*>(frag + 8 * b * stride + (c + u - cbeg) * kChunk + 16 * h)
                               : make_uint4(0, 0, 0, 0);
          multiply_half(cur.a[u], cur.b[u], h, codes);
        }
      }
      if (c + U < c1) cur = next;
    }
  } else {
    const unsigned char* arow[TB];
#pragma unroll
    for (int b = 0; b < TB; ++b)
      arow[b] = reinterpret_cast<const unsigned char*>(p.a) + (vtok[b] ? g + 8 * b : 0) * p.a_stride + 32 * t;
    for (int c = c0; c < c1; c += U) {
      if (c != c0) load_weights(cur, c);
      uint4 lo[U][TB], hi[U][TB];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const bool in = c + u < c1;
        const int64_t off = static_cast<int64_t>(c + u) * kChunk;
#pragma unroll
        for (int b = 0; b < TB; ++b) {
          lo[u][b] = in && vtok[b] ? load16<false>(arow[b] + off) : make_uint4(0, 0, 0, 0);
          hi[u][b] = in && vtok[b] ? load16<false>(arow[b] + off + 16) : make_uint4(0, 0, 0, 0);
        }
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        multiply_half(cur.a[u], cur.b[u], 0, lo[u]);
        multiply_half(cur.a[u], cur.b[u], 1, hi[u]);
      }
    }
  }
  // Only the epilogue is left: the next kernel may launch (see run_pipeline).
  pdl_trigger();

  // C fragment: acc[b][0..1] feature g, tokens 8b + 2t, 8b + 2t + 1; acc[b][2..3] feature g + 8.
  auto each_acc = [&](auto&& f) {
#pragma unroll
    for (int b = 0; b < TB; ++b)
#pragma unroll
      for (int e = 0; e < 4; ++e) f(g + (e >= 2 ? 8 : 0), 8 * b + 2 * t + (e & 1), acc[b][e]);
  };
  if constexpr (KS == 1) {
    each_acc([&](int row, int tok, int v) { sums[tok * COLS + rg * 16 + row] = v; });
  } else {
    int* red = reinterpret_cast<int*>(body);
    if constexpr (STAGED) __syncthreads();  // red reuses the staged codes other warps may still read
    each_acc([&](int row, int tok, int v) { red[(warp * 16 + row) * TOK + tok] = v; });
    __syncthreads();
    // Sum the k slices (integers: exact in any order).
    for (int i = threadIdx.x; i < COLS * TOK; i += kThreads) {
      const int tok = i % TOK, col = i / TOK, group = col / 16, row = col % 16;
      int sum = 0;
#pragma unroll
      for (int s = 0; s < KS; ++s) sum += red[((group * KS + s) * 16 + row) * TOK + tok];
      sums[tok * COLS + col] = sum;
    }
  }
  // This CTA finishes tokens [tok0, tok1): all of them, or its share of a cluster's.
  const int parts = gridDim.y, share = (rows + parts - 1) / parts;
  const int tok0 = min(TOK, static_cast<int>(blockIdx.y) * share);
  const int tok1 = min(rows, tok0 + share);
  float* tile = reinterpret_cast<float*>(body + (KS > 1 ? kWarps * 16 * TOK * 4 : 0));
  // y'' = s_t s_n acc / 16 (nibbles were read as x 16), in int_gemm.cu's order of operations.
  auto scale = [&](int tok, int col, int sum) {
    tile[tok * (COLS + 1) + col] = static_cast<float>(sum >> 4) * st[tok] * sn[col];
  };
  __syncthreads();
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (parts > 1) {
    namespace cg = cooperative_groups;
    cg::cluster_group cluster = cg::this_cluster();
    cluster.sync();  // every CTA's sums are in its shared memory
    for (int i = threadIdx.x; i < (tok1 - tok0) * COLS; i += kThreads) {
      const int tok = tok0 + i / COLS, col = i % COLS;
      int sum = 0;
      for (int q = 0; q < parts; ++q) sum += *cluster.map_shared_rank(&sums[tok * COLS + col], q);
      scale(tok, col, sum);
    }
    cluster.sync();  // nobody exits while another CTA still reads its sums
  } else
#endif
  {
    for (int i = threadIdx.x; i < (tok1 - tok0) * COLS; i += kThreads) {
      const int tok = tok0 + i / COLS, col = i % COLS;
      scale(tok, col, sums[tok * COLS + col]);
    }
    __syncthreads();
  }
  // Restore (q ascending, as the tile kernels), bias, cast.
  for (int i = threadIdx.x; i < (tok1 - tok0) * COLS; i += kThreads) {
    const int tok = tok0 + i / COLS, col = i % COLS;
    const int64_t n = n0 + col;
    if (n >= p.n) continue;
    const float* yrow = tile + tok * (COLS + 1);
    float v;
    if (p.r_out) {
      const int cb = col & ~(bo - 1), j = col - cb;
      const float* r = rblk + cb * bo + j;
      v = 0.f;
      for (int q = 0; q < bo; ++q) v = fmaf(yrow[cb + q], r[q * bo], v);
    } else {
      v = yrow[col];
    }
    if (p.bias) v += bias[col];
    store_out(p.y, p.out_dtype, tok * p.n + n, v);
  }
}

// ---- launch shapes ----------------------------------------------------------------------------

// One launch: tokens per CTA, k slices per CTA (of 8 warps), CTAs per cluster splitting the k
// range, codes staged or direct, dynamic shared memory; ks = 0 where none fits.
struct GemvShape {
  int tok = 0, ks = 0, parts = 0;
  bool staged = false;
  int smem = 0;
};

int tokens_for(int64_t m) { return m <= 8 ? 8 : m <= 16 ? 16 : m <= 32 ? 32 : 64; }
int64_t chunks_of(const IntGemmParams& p) { return p.k / kChunk; }
int out_block(const IntGemmParams& p) { return p.r_out ? p.block_out : 1; }
int most_parts() { return device_facts().clusters ? kMaxParts : 1; }

// Shared memory of a launch (see SmemLayout), with parts CTAs splitting the k range.
int smem_of(const IntGemmParams& p, int tok, int ks, int parts, bool staged) {
  const int64_t chunks = chunks_of(p);
  const int per_cta = static_cast<int>((chunks + parts - 1) / parts);
  const int rows = static_cast<int>(p.m < tok ? p.m : tok);
  return SmemLayout(tok, ks, staged ? rows * staged_stride(per_cta) : 0).total;
}

// Direct codes (M <= 16): k slices per CTA, the fewest that still give every SM two CTAs (weight
// streams in flight), at least enough that a CTA's columns hold whole R_out blocks; a cluster only
// where forced (the sweep found 1.1 us at most, 16384->2048 M = 1).
GemvShape direct_shape(const IntGemmParams& p, int forced_parts) {
  GemvShape s;
  if (p.m > kMaxDirectTokens) return s;
  int ks = 1;
  while (ks < kWarps && (p.n + 16 * (kWarps / ks) - 1) / (16 * (kWarps / ks)) < 2 * p.num_sms) ks *= 2;
  while (ks > 1 && 16 * (kWarps / ks) < out_block(p)) ks /= 2;
  int most = most_parts();  // at least one chunk per warp
  while (most > 1 && most > chunks_of(p) / ks) most /= 2;
  s.tok = tokens_for(p.m);
  s.ks = ks;
  s.parts = forced_parts > 0 ? (forced_parts < most ? forced_parts : most) : 1;
  s.smem = smem_of(p, s.tok, ks, s.parts, false);
  return s;
}

// Staged codes. Cluster size: forced, or by size the fewest CTAs whose staged codes still let two
// CTAs share an SM (else the fewest that fit at all): a cluster of 8 cost 16384->2048 at M = 1
// 4 us against 2 (H200), its clusters not all resident at once. Then the fewest k slices per CTA
// (the most feature groups sharing the codes: the least L2 traffic) that fill nearly every
// resident slot, as time follows each warp's chain of weight rounds; where none does (small N
// and K), the most CTAs.
GemvShape staged_shape(const IntGemmParams& p, int forced_parts) {
  const DeviceFacts& dev = device_facts();
  const int64_t chunks = chunks_of(p);
  const int tok = tokens_for(p.m);
  const int smem_limit = dev.smem_optin > 0 ? dev.smem_optin : 48 * 1024;
  constexpr int kTwoPerSm = 113 * 1024;  // an SM's 228 KB, 1 KB per CTA reserved
  // The best k-slice count for one cluster size (ks = 0: none fits).
  auto for_parts = [&](int parts) {
    GemvShape best;
    int64_t best_ctas = 0;
    for (int rg = kWarps; rg >= 1; rg /= 2) {
      const int ks = kWarps / rg;
      if (16 * rg < out_block(p)) continue;  // a CTA's columns must hold whole R_out blocks
      const int smem = smem_of(p, tok, ks, parts, true);
      if (smem > smem_limit) continue;
      const int64_t slots = static_cast<int64_t>(smem <= kTwoPerSm ? 2 : 1) * p.num_sms;
      const int64_t ctas = (p.n + 16 * rg - 1) / (16 * rg) * parts;
      const GemvShape shape{tok, ks, parts, true, smem};
      if (ctas <= slots && 8 * ctas >= 7 * slots) return shape;  // fills them
      if (best.ks == 0 || (ctas <= slots && ctas > best_ctas)) {
        best = shape;
        best_ctas = ctas;
      }
    }
    return best;
  };
  int most = most_parts();
  while (most > 1 && most > chunks) --most;  // every CTA a chunk
  if (forced_parts > 0) {
    const GemvShape s = for_parts(forced_parts < most ? forced_parts : most);
    if (s.ks != 0) return s;  // else the cluster is too small for the codes: by size
  }
  GemvShape fits;
  for (int parts = 1; parts <= most; ++parts) {
    const int per_cta = static_cast<int>((chunks + parts - 1) / parts);
    if ((chunks + per_cta - 1) / per_cta != parts) continue;  // a CTA would get no chunk
    const GemvShape s = for_parts(parts);
    if (s.ks != 0 && s.smem <= kTwoPerSm) return s;
    if (fits.ks == 0) fits = s;
  }
  return fits;
}

// Direct codes where forced (tile "gemv-direct"); by size up to M = 16 unless its CTAs would take
// two waves (N past ~8K: 2048->16384 at M = 1 12.6 us against 11.3 staged, H200); staged codes
// past M = 16, or where direct cannot run.
GemvShape gemv_shape(const IntGemmParams& p, bool direct, int forced_parts) {
  const int bo = out_block(p);
  if (p.m < 1 || p.m > kMaxTokens || p.wbits > 4 || p.k < kChunk || p.k % kChunk != 0 || bo > kMaxBo ||
      p.a_stride % 16 != 0)
    return GemvShape{};
  if (direct) return direct_shape(p, forced_parts);
  const GemvShape d = direct_shape(p, forced_parts);
  if (d.ks != 0 && (p.n + 16 * (kWarps / d.ks) - 1) / (16 * (kWarps / d.ks)) * d.parts <= 2 * p.num_sms) return d;
  const GemvShape s = staged_shape(p, forced_parts);
  return s.ks != 0 ? s : d;
}

template <int TOK, int KS, bool STAGED>
cudaError_t launch_gemv(const IntGemmParams& p, const GemvShape& s, cudaStream_t stream) {
  constexpr int cols = 16 * (kWarps / KS);
  constexpr int U = STAGED && TOK == 64 ? 2 : 4;
  constexpr auto kernel = int_gemv_kernel<TOK, KS, U, STAGED>;
  // The most any launch of it asks for: what the device offers (99 KB on sm_86/89), which the
  // shapes stay within.
  const int optin = device_facts().smem_optin;
  const int most = optin > 0 && optin < kMaxSmemBytes ? optin : kMaxSmemBytes;
  if (cudaError_t e = allow_dynamic_smem<kernel>(most); e != cudaSuccess) return e;
  const dim3 grid(static_cast<unsigned>((p.n + cols - 1) / cols), static_cast<unsigned>(s.parts));
  return launch_kernel_clustered(kernel, grid, dim3(kThreads), s.smem, stream, p.chain,
                                 dim3(1, static_cast<unsigned>(s.parts), 1), p);
}

template <int TOK, bool STAGED>
cudaError_t launch_tok(const IntGemmParams& p, const GemvShape& s, cudaStream_t stream) {
  switch (s.ks) {
    case 1: return launch_gemv<TOK, 1, STAGED>(p, s, stream);
    case 2: return launch_gemv<TOK, 2, STAGED>(p, s, stream);
    case 4: return launch_gemv<TOK, 4, STAGED>(p, s, stream);
    case 8: return launch_gemv<TOK, 8, STAGED>(p, s, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace

bool gemv_usable(const IntGemmParams& p, bool direct) { return gemv_shape(p, direct, 0).ks != 0; }

int gemv_parts(const IntGemmParams& p, bool direct, int forced) { return gemv_shape(p, direct, forced).parts; }

cudaError_t int_gemv(const IntGemmParams& p, bool direct, int parts, cudaStream_t stream) {
  if (parts < 1 || parts > kMaxParts) return cudaErrorInvalidValue;
  // Without sm_90 code the cluster exchange compiles away: a plan made for another device.
  if (parts > 1 && !device_facts().clusters) return cudaErrorInvalidValue;
  const GemvShape s = gemv_shape(p, direct, parts);
  if (s.ks == 0 || s.parts != parts) return cudaErrorInvalidValue;  // a plan made for other sizes
  if (!s.staged) return s.tok == 8 ? launch_tok<8, false>(p, s, stream) : launch_tok<16, false>(p, s, stream);
  switch (s.tok) {
    case 8: return launch_tok<8, true>(p, s, stream);
    case 16: return launch_tok<16, true>(p, s, stream);
    case 32: return launch_tok<32, true>(p, s, stream);
    default: return launch_tok<64, true>(p, s, stream);
  }
}

}  // namespace gemm
}  // namespace kernels
}  // namespace duquant
