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

// The cp.async pipeline of both GEMMs. The first stages' weights are requested before the chain
// wait (they do not depend on the input kernels, which may still be running); then `after_wait`
// (the epilogue operands, token scales among them) and the activations. Per stage: wait for it,
// refill the slot the previous stage freed, compute(slot). Ends with every copy landed and a
// barrier, so the epilogue may reuse the pipeline's shared memory.
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
  cp_async_wait<0>();
  __syncthreads();
}

// Epilogue operands get their own shared-memory region, fetched asynchronously with the first
// stage, so the epilogue touches no global memory but its output (dependent global loads there
// cost more than the whole main loop). st_s[BM] token scales (1 when there are none), sn_s[BN]
// weight scales, bias_s[BN], r_s: the tile's R_out blocks, one contiguous run since BN % Bo == 0.
template <int BM, int BN, int THREADS>
__device__ __forceinline__ void load_epilogue_operands(const IntGemmParams& p, int64_t m0, int64_t n0, float* st_s,
                                                       float* sn_s, float* bias_s, float* r_s) {
  const int tid = threadIdx.x;
  const int bo = p.r_out ? p.block_out : 1;
  for (int i = tid; i < BM; i += THREADS) {
    const int64_t gm = m0 + i;
    const bool ok = gm < p.m;
    if (p.a_scale) cp_async4(st_s + i, p.a_scale_per_tensor ? p.a_scale : p.a_scale + (ok ? gm : 0), ok);
    else st_s[i] = 1.f;
  }
  for (int i = tid; i < BN; i += THREADS) {
    const int64_t gn = n0 + i;
    const bool ok = gn < p.n;
    cp_async4(sn_s + i, p.w_scale + (ok ? gn : 0), ok);
    cp_async4(bias_s + i, p.bias ? p.bias + (ok ? gn : 0) : p.w_scale, ok && p.bias);
  }
  if (p.r_out) {
    const int64_t first = n0 * bo, total = (p.n + bo - 1) / bo * bo * bo;
    for (int i = tid; i < BN * bo / 4; i += THREADS) {
      const int64_t src = first + 4 * static_cast<int64_t>(i);
      const bool ok = src < total;
      cp_async16(r_s + 4 * i, p.r_out + (ok ? src : 0), ok);
    }
  }
}

// tile_f[BM][EPI_STRIDE] holds y'' (padding rows/columns exact zeros); writes
// y = restore(y'') + bias in the output dtype.
template <int BM, int BN, int EPI_STRIDE, int THREADS>
__device__ __forceinline__ void restore_bias_store(const IntGemmParams& p, int64_t m0, int64_t n0,
                                                   const float* tile_f, const float* bias_s, const float* r_s) {
  const int bo = p.r_out ? p.block_out : 1;
  for (int e = threadIdx.x; e < BM * BN; e += THREADS) {
    const int r = e / BN, c = e % BN;
    const int64_t gm = m0 + r, gn = n0 + c;
    if (gm >= p.m || gn >= p.n) continue;
    float v;
    if (p.r_out) {
      // y[:, blk] = y''[:, blk] * R_out[blk]; Bo a power of 2.
      const int cb = c & (bo - 1), c0 = c - cb;
      const float* rcol = r_s + c0 * bo + cb;
      const float* yrow = tile_f + r * EPI_STRIDE + c0;
      v = 0.f;
      for (int q = 0; q < bo; ++q) v = fmaf(yrow[q], rcol[q * bo], v);
    } else {
      v = tile_f[r * EPI_STRIDE + c];
    }
    if (p.bias) v += bias_s[c];
    store_out(p.y, p.out_dtype, gm * p.n + gn, v);
  }
}

}  // namespace gemm
}  // namespace kernels
}  // namespace duquant
