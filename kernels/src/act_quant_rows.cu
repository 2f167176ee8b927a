// The input side in one kernel, for rows that fit on one SM (K <= 32768 at B = 16): a CTA stages
// T whole token rows in shared memory with coalesced 16-byte loads, gathers the permutation from
// there (a gather from global memory reads a 32-byte sector per 2-byte element), rotates 512
// positions at a time into registers, reduces each token's max |x'| inside the CTA and writes the
// codes. No float32 round trip through global memory, no second kernel.
//
// T (tokens per CTA) trades rotation traffic against parallelism: every CTA reads the whole
// r_in (64 bytes per column at B = 16), so many tokens per CTA at large M, one at small M.
// At one token per CTA a CTA's chunks are a serial chain of L2 round trips (about 1 us each on
// an H200), so on Hopper a cluster of up to 8 CTAs shares a token's chunks and swaps the per-token
// maxima through distributed shared memory.
#include "act_common.cuh"
#include "duquant_kernels/kernels.h"
#include "launch.cuh"

namespace duquant {
namespace kernels {
namespace {

constexpr int kRowThreads = 512;
constexpr int kMaxVals = 64;  // rotated values one thread holds: tokens per CTA x 512-column chunks

// Chunks a thread holds at T tokens per CTA (64 values, fewer at 4 and 8 tokens: those spill).
__host__ __device__ constexpr int max_chunks(int tokens) { return (tokens == 4 ? 48 : tokens == 8 ? 56 : kMaxVals) / tokens; }

// A cluster CTA's chunks at most (its share of a row of up to 8 x 4 chunks): few registers, so
// an SM's registers hold two CTAs.
constexpr int kClusterChunks = 4;
constexpr int kMaxCluster = 8;  // the portable cluster size
// The kernels launched in clusters: 1 or 2 tokens per CTA (4 spill at two CTAs per SM), kClusterChunks chunks.
__host__ __device__ constexpr bool cluster_variant(int tokens, int chunks) {
  return tokens <= 2 && chunks == kClusterChunks;
}

__host__ __device__ constexpr int rows_chunk(int block) { return (kRowThreads / block) * block; }
__host__ __device__ constexpr int64_t rows_row_bytes(int64_t k, int esz) { return (k * esz + 15) / 16 * 16; }

size_t rows_smem_bytes(int tokens, int64_t k, DType dt) {
  return static_cast<size_t>(tokens) * (rows_row_bytes(k, act::dtype_bytes(dt)) + kRowThreads * sizeof(float));
}

// Room left for the dynamic shared memory under the static (at most 16 x 68 bytes).
constexpr int kStaticSmemRoom = 2048;

// Stages rows [row0, row0 + rows) of x into xs (row pitch `pitch` bytes). Rows are short here
// (K <= 32768): 32-bit indices.
template <DType DT>
__device__ __forceinline__ void stage_rows(const ActQuantParams& p, int64_t row0, int rows, unsigned char* xs,
                                           int pitch) {
  constexpr int ESZ = act::dtype_bytes(DT);
  const char* x = static_cast<const char*>(p.x) + row0 * p.x_stride * ESZ;
  const int64_t row_stride = p.x_stride * ESZ;
  const int k = static_cast<int>(p.k);
  if (reinterpret_cast<uintptr_t>(x) % 16 == 0 && row_stride % 16 == 0 && (k * ESZ) % 16 == 0) {
    const int per_row = k * ESZ / 16;
    const int total = rows * per_row;
#pragma unroll 4
    for (int i = threadIdx.x; i < total; i += kRowThreads) {
      const int r = i / per_row, c = i - r * per_row;
      reinterpret_cast<uint4*>(xs + r * pitch)[c] = __ldg(reinterpret_cast<const uint4*>(x + r * row_stride) + c);
    }
  } else {
    const int total = rows * k;
#pragma unroll 4
    for (int i = threadIdx.x; i < total; i += kRowThreads) {
      const int r = i / k, c = i - r * k;
      act::store_from_float(xs + r * pitch, DT, c, act::load_as_float(x + r * row_stride, DT, c));  // exact
    }
  }
}

// What a thread needs to produce position o of a chunk: its source channel, the smoothing divisor
// and (B = 16) its rotation column. All layer constants: fetched a chunk ahead.
template <int BS>
struct ChunkInputs {
  int src = 0;
  float smooth = 1.f;
  float w[BS > 0 ? BS : 1];
};

template <int BS>
__device__ __forceinline__ void fetch_chunk(const InputTransform& tr, int o, bool active, ChunkInputs<BS>& in) {
  in.src = active ? (tr.perm ? static_cast<int>(__ldg(tr.perm + o)) : o) : 0;
  if constexpr (BS > 0) {
    const float* rcol = tr.r_in + (o / BS) * BS * BS + o % BS;
#pragma unroll
    for (int i = 0; i < BS; ++i) in.w[i] = active ? __ldg(rcol + i * BS) : 0.f;
  }
}

// T tokens per CTA, at most NCH chunks per CTA.
template <int T, int NCH, int BS, DType DT>
__global__ void __launch_bounds__(kRowThreads, cluster_variant(T, NCH) ? 2 : 1) rotate_rows_kernel(ActQuantParams p) {
  constexpr int ESZ = act::dtype_bytes(DT);
  // Fetching the next chunk's inputs during this one's rotation hides an L2 round trip per chunk,
  // which is what a one-token CTA with a whole row waits on; elsewhere the registers spill.
  constexpr bool kPrefetch = T == 1 && NCH > kClusterChunks;
  extern __shared__ __align__(16) unsigned char smem[];
  __shared__ float red[T][kRowThreads / 32];
  __shared__ float scale_s[T];
  const int block = BS > 0 ? BS : p.transform.block;
  const int chunk = rows_chunk(block);
  const int k = static_cast<int>(p.k);
  const int nch = (k + chunk - 1) / chunk;
  const int pitch = static_cast<int>(rows_row_bytes(k, ESZ));
  unsigned char* xs = smem;                                // [T][pitch] the rows as read
  float* xp = reinterpret_cast<float*>(smem + T * pitch);  // [T][kRowThreads] one chunk of x~
  const int t = threadIdx.x;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * T;
  const int rows = p.m - row0 < T ? static_cast<int>(p.m - row0) : T;
  const InputTransform& tr = p.transform;
  // This CTA's chunks: all of them, or its share when a cluster (along y) splits the row.
  const int split = gridDim.y, per_cta = (nch + split - 1) / split;  // per_cta <= NCH (launch_rows)
  const int c_begin = blockIdx.y * per_cta;
  const int c_end = c_begin + per_cta < nch ? c_begin + per_cta : nch;

  constexpr int kPeerRows = cluster_variant(T, NCH) ? T : 1;  // only cluster variants swap maxima
  __shared__ act::MaxSwap<kPeerRows> swap;                      // (token_scales_pushed)
  act::swap_begin(swap, p.abits > 0 && !p.static_scale, rows);
  pdl_trigger();  // the GEMM may launch now; it waits for these codes itself
  // The first chunk's inputs are layer constants: fetched before waiting for the kernel that writes x.
  ChunkInputs<BS> cur, nxt;
  fetch_chunk<BS>(tr, c_begin * chunk + t, t < chunk && c_begin * chunk + t < k, cur);
  pdl_wait();
  act::clear_for_gemm(p);
  stage_rows<DT>(p, row0, rows, xs, pitch);

  // Rotated values accumulate in place (no per-chunk temporaries: 128 registers a thread at 512
  // threads is the budget).
  float vals[kMaxVals];
#pragma unroll
  for (int lc = 0; lc < NCH; ++lc) {
    const int c = c_begin + lc;
    if (c >= c_end) break;  // uniform: every thread runs the same chunks (the barriers need that)
    const int o = c * chunk + t;
    const bool active = t < chunk && o < k;
    if (!kPrefetch && lc > 0) fetch_chunk<BS>(tr, o, active, cur);
    if (active && tr.smooth) cur.smooth = __ldg(tr.smooth + cur.src);
    __syncthreads();  // rows staged (first chunk); the previous chunk's x~ consumed (later ones)
#pragma unroll
    for (int r = 0; r < T; ++r) {
      // positions past K (a short last block) are zeros: the block is embedded in an identity
      const float v = active && r < rows ? act::load_as_float(xs + r * pitch, DT, cur.src) : 0.f;
      xp[r * kRowThreads + t] = tr.smooth ? v / cur.smooth : v;
    }
    if (kPrefetch && c + 1 < c_end) fetch_chunk<BS>(tr, o + chunk, t < chunk && o + chunk < k, nxt);
    __syncthreads();
    float* out = vals + lc * T;
#pragma unroll
    for (int r = 0; r < T; ++r) out[r] = 0.f;
    if (active) {
      const int b0 = (t / block) * block;  // this block's first position inside the chunk
      if constexpr (BS == 16) {
#pragma unroll
        for (int r = 0; r < T; ++r) {
          const float4* xb = reinterpret_cast<const float4*>(xp + r * kRowThreads + b0);
#pragma unroll
          for (int q = 0; q < 4; ++q) {
            const float4 a = xb[q];
            out[r] = fmaf(a.x, cur.w[4 * q], out[r]);
            out[r] = fmaf(a.y, cur.w[4 * q + 1], out[r]);
            out[r] = fmaf(a.z, cur.w[4 * q + 2], out[r]);
            out[r] = fmaf(a.w, cur.w[4 * q + 3], out[r]);
          }
        }
      } else {
        const float* rcol = tr.r_in + static_cast<int64_t>(o / block) * block * block + o % block;
        for (int i = 0; i < block; ++i) {
          const float wi = __ldg(rcol + i * block);
#pragma unroll
          for (int r = 0; r < T; ++r) out[r] = fmaf(xp[r * kRowThreads + b0 + i], wi, out[r]);
        }
      }
    }
    if (kPrefetch) cur = nxt;
  }

  const float qmax = p.abits > 0 ? static_cast<float>((1 << (p.abits - 1)) - 1) : 0.f;
  if (p.abits > 0) {
    if (p.static_scale) {
      act::static_token_scales(p, scale_s, rows, row0);
    } else {
      const int lane = t & 31, warp = t >> 5;
#pragma unroll
      for (int r = 0; r < T; ++r) {
        float v = 0.f;  // positions past K hold zeros
#pragma unroll
        for (int lc = 0; lc < NCH; ++lc) {
          if (c_begin + lc >= c_end) break;
          v = fmaxf(v, fabsf(vals[lc * T + r]));
        }
        for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
        if (lane == 0) red[r][warp] = v;
      }
      __syncthreads();
      if (t < rows) {
        float v = 0.f;
#pragma unroll
        for (int i = 0; i < kRowThreads / 32; ++i) v = fmaxf(v, red[t][i]);
        scale_s[t] = v;  // this CTA's max
      }
      act::token_scales_pushed(p, scale_s, swap, rows, row0, qmax);
    }
    __syncthreads();
  }
#pragma unroll
  for (int lc = 0; lc < NCH; ++lc) {
    const int c = c_begin + lc;
    if (c >= c_end) break;
    const int o = c * chunk + t;
    if (t >= chunk || o >= k) continue;
#pragma unroll
    for (int r = 0; r < T; ++r) {
      if (r >= rows) break;
      const int64_t idx = (row0 + r) * k + o;
      if (p.abits == 0)
        act::store_from_float(p.x_out, DT, idx, vals[lc * T + r]);  // weight-only: x' in x's dtype
      else
        p.codes[idx] = act::to_code(vals[lc * T + r], scale_s[r], qmax);
    }
  }
}

template <int T, int NCH, int BS, DType DT>
cudaError_t launch_rows(const ActQuantParams& p, int split, bool chain, cudaStream_t stream) {
  constexpr auto kernel = rotate_rows_kernel<T, NCH, BS, DT>;
  // The opt-in covers the longest row any launch of this kernel takes, within what the device
  // offers (act_quant_rows_plan only picks launches that fit).
  const int64_t longest = static_cast<int64_t>(cluster_variant(T, NCH) ? kMaxCluster * NCH : NCH) * rows_chunk(16);
  const int most = static_cast<int>(rows_smem_bytes(T, longest, DT));
  const int room = device_facts().smem_optin - kStaticSmemRoom;
  if (cudaError_t e = allow_dynamic_smem<kernel>(most < room ? most : room); e != cudaSuccess) return e;
  const dim3 grid(static_cast<unsigned>((p.m + T - 1) / T), static_cast<unsigned>(split));
  return launch_kernel_clustered(kernel, grid, dim3(kRowThreads), rows_smem_bytes(T, p.k, DT), stream, chain,
                                 dim3(1, static_cast<unsigned>(split), 1), p);
}

template <int T, int NCH, int BS>
cudaError_t launch_rows_dtype(const ActQuantParams& p, int split, bool chain, cudaStream_t stream) {
  switch (p.x_dtype) {
    case DType::kFloat16: return launch_rows<T, NCH, BS, DType::kFloat16>(p, split, chain, stream);
    case DType::kBFloat16: return launch_rows<T, NCH, BS, DType::kBFloat16>(p, split, chain, stream);
    default: return launch_rows<T, NCH, BS, DType::kFloat32>(p, split, chain, stream);
  }
}

template <int T, int NCH = max_chunks(T)>
cudaError_t launch_rows_block(const ActQuantParams& p, int split, bool chain, cudaStream_t stream) {
  return p.transform.block == 16 ? launch_rows_dtype<T, NCH, 16>(p, split, chain, stream)
                                 : launch_rows_dtype<T, NCH, 0>(p, split, chain, stream);
}

}  // namespace

const DeviceFacts& device_facts() {
  static DeviceFacts facts[64];
  static const DeviceFacts none;
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev >= 64) return none;
  DeviceFacts& f = facts[dev];
  if (!f.known) {
    cudaFuncAttributes attr = {};
    if (cudaDeviceGetAttribute(&f.smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess ||
        cudaDeviceGetAttribute(&f.smem_per_sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, dev) != cudaSuccess ||
        cudaDeviceGetAttribute(&f.major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess ||
        cudaFuncGetAttributes(&attr, rotate_rows_kernel<1, kClusterChunks, 16, DType::kBFloat16>) != cudaSuccess)
      return none;
    f.clusters = f.major >= 9 && attr.ptxVersion >= 90;  // the virtual architecture it was compiled for
    f.known = true;
  }
  return f;
}

RowsLaunch act_quant_rows_plan(const ActQuantParams& p) {
  RowsLaunch none;
  const int block = p.transform.block;
  if (block < 1 || block > kRowThreads || p.m < 1) return none;
  const int64_t nch = (p.k + rows_chunk(block) - 1) / rows_chunk(block);
  // Rows staged must fit in the shared memory the device offers (fp32 rows of 16384 do not on sm_86/89).
  const DeviceFacts& dev = device_facts();
  auto smem_fits = [&](int tokens) {
    return rows_smem_bytes(tokens, p.k, p.x_dtype) + kStaticSmemRoom <= static_cast<size_t>(dev.smem_optin);
  };
  auto fits = [&](int tokens) { return nch <= max_chunks(tokens) && smem_fits(tokens); };
  // The most tokens per CTA that still gives every SM a CTA.
  for (int tokens : {16, 8, 4, 2})
    if (fits(tokens) && (p.m + tokens - 1) / tokens >= p.num_sms) return RowsLaunch{tokens, false, 1};
  // Fewer tokens than SMs: on Hopper a cluster of up to 8 CTAs splits each row, as evenly as it
  // goes, and a CTA takes one token, or two where one would need more CTAs than SMs (a second
  // wave: M = 64, K = 2048 took 6.3 us at one token per CTA, 4.0 at two on an H200).
  if (dev.clusters && nch <= kMaxCluster * kClusterChunks && smem_fits(1)) {
    const int64_t most = nch < kMaxCluster ? nch : kMaxCluster;
    const int64_t per_cta = (nch + most - 1) / most;
    const int split = static_cast<int>((nch + per_cta - 1) / per_cta);
    const bool two = p.m * split > p.num_sms && smem_fits(2);
    return RowsLaunch{two ? 2 : 1, true, split};
  }
  return fits(1) ? RowsLaunch{1, false, 1} : none;
}

cudaError_t act_quant_rows(const ActQuantParams& p, const RowsLaunch& launch, bool chain, cudaStream_t stream) {
  if (launch.cluster)
    return launch.tokens == 2 ? launch_rows_block<2, kClusterChunks>(p, launch.split, chain, stream)
                              : launch_rows_block<1, kClusterChunks>(p, launch.split, chain, stream);
  switch (launch.tokens) {
    case 16: return launch_rows_block<16>(p, 1, chain, stream);
    case 8: return launch_rows_block<8>(p, 1, chain, stream);
    case 4: return launch_rows_block<4>(p, 1, chain, stream);
    case 2: return launch_rows_block<2>(p, 1, chain, stream);
    case 1: return launch_rows_block<1>(p, 1, chain, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace kernels
}  // namespace duquant
