#pragma once
// Shared by the input kernels (act_quant.cu, act_quant_rows.cu, act_quant_mma.cu): element access,
// rounding, and the row and tensor-core kernels' entry points for act_quant()'s dispatch.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "duquant_kernels/kernels.h"
#include "launch.cuh"

namespace duquant {
namespace kernels {
namespace act {

__device__ __forceinline__ float load_as_float(const void* base, DType dt, int64_t idx) {
  switch (dt) {
    case DType::kFloat16: return __half2float(static_cast<const __half*>(base)[idx]);
    case DType::kBFloat16: return __bfloat162float(static_cast<const __nv_bfloat16*>(base)[idx]);
    default: return static_cast<const float*>(base)[idx];
  }
}

__device__ __forceinline__ void store_from_float(void* base, DType dt, int64_t idx, float v) {
  switch (dt) {
    case DType::kFloat16: static_cast<__half*>(base)[idx] = __float2half_rn(v); break;
    case DType::kBFloat16: static_cast<__nv_bfloat16*>(base)[idx] = __float2bfloat16_rn(v); break;
    default: static_cast<float*>(base)[idx] = v; break;
  }
}

__host__ __device__ constexpr int dtype_bytes(DType dt) { return dt == DType::kFloat32 ? 4 : 2; }

__device__ __forceinline__ int8_t to_code(float v, float scale, float qmax) {
  // Division (not a reciprocal multiply) and round-half-even, exactly as the reference.
  return static_cast<int8_t>(fminf(fmaxf(rintf(v / scale), -qmax - 1.f), qmax));
}

// ---- the tensor-core input kernels (act_quant_mma.cu, act_quant_slices.cu) ----

// v rounded to tf32 (nearest, ties away from zero, as cvt.rna.tf32.f32), in two integer
// instructions: the conversion instruction runs on the quarter-rate conversion unit, and a block
// needs 16 of them per lane.
__device__ __forceinline__ uint32_t to_tf32(float v) { return (__float_as_uint(v) + 0x1000u) & 0xffffe000u; }

// A rotation entry as two tf32 parts, v = hi + lo up to 2^-22 of v: x·R = x·lo + x·hi on tf32 MMAs.
__device__ __forceinline__ void split_tf32(float v, uint32_t& hi, uint32_t& lo) {
  hi = to_tf32(v);
  lo = to_tf32(v - __uint_as_float(hi));
}

// Stages `rows` rows of 16-bit values, `row_bytes` each (`stride` bytes apart from src), into shared
// memory `pitch` bytes apart, by the CTA's THREADS threads: 16-byte asynchronous copies where src
// allows, else element by element. Returns once they have landed (the caller syncs the CTA).
template <int THREADS>
__device__ __forceinline__ void stage_rows16(unsigned char* dst, int pitch, const unsigned char* src, int64_t stride,
                                             int rows, int row_bytes) {
  const int tid = threadIdx.x;
  if (reinterpret_cast<uintptr_t>(src) % 16 == 0 && stride % 16 == 0 && row_bytes % 16 == 0) {
    const int chunks = row_bytes / 16;
    for (int i = tid; i < rows * chunks; i += THREADS) {
      const int r = i / chunks, q = i - r * chunks;
      const unsigned d = static_cast<unsigned>(__cvta_generic_to_shared(dst + r * pitch + 16 * q));
      asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(d), "l"(src + r * stride + 16 * q));
    }
    asm volatile("cp.async.commit_group;\ncp.async.wait_group 0;\n" ::: "memory");
  } else {
    const int elems = row_bytes / 2;
    for (int i = tid; i < rows * elems; i += THREADS) {
      const int r = i / elems, q = i - r * elems;
      reinterpret_cast<unsigned short*>(dst + r * pitch)[q] = reinterpret_cast<const unsigned short*>(src + r * stride)[q];
    }
  }
}

__device__ __forceinline__ void mma_tf32(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// v / s, correctly rounded (as the reference divides), from the reciprocal and one residual.
__device__ __forceinline__ float div_by_scale(float v, float s, float inv) {
  const float q = v * inv;
  return fmaf(fmaf(-q, s, v), inv, q);
}

// The code of v as the low byte of a float's bits: adding 1.5 * 2^23 rounds to an integer, half to
// even like rintf, and leaves it two's-complement in the low mantissa bits (no float-to-int
// conversion, another quarter-rate instruction).
__device__ __forceinline__ uint32_t code_bits(float v, float s, float inv, float qmax) {
  return __float_as_uint(fminf(fmaxf(div_by_scale(v, s, inv), -qmax - 1.f), qmax) + 12582912.f);
}

// Token scales of a CTA's `rows` tokens from row0 on, into scale_s (shared memory) and, by the
// first CTA of a cluster, p.scales. static_token_scales: the layer's static scale.
// token_scales_pushed (below): scale_s[0..rows) holds this CTA's max |x'| per token over its
// positions; the CTAs of a cluster along y (gridDim.y of them, sharing the tokens' positions) swap
// maxima through distributed shared memory, then s_t = max(max|x'| / qmax, 1e-8). Every thread of
// the CTA calls it (a cluster barrier, an mbarrier wait and a CTA barrier).
__device__ __forceinline__ void static_token_scales(const ActQuantParams& p, float* scale_s, int rows, int64_t row0) {
  const int t = threadIdx.x;
  if (t < rows) {
    scale_s[t] = __ldg(p.static_scale);
    if (p.scales && blockIdx.y == 0) p.scales[row0 + t] = scale_s[t];
  }
}

// The swap: every CTA stores its maxima straight into each peer's `MaxSwap::peer` with `st.async`,
// whose bytes each receiving CTA counts on its own mbarrier, so a CTA goes on as soon as its
// peers' maxima have landed; no cluster barrier follows the stores. (It was `cluster.sync()` after
// plain remote stores: 0.05-0.10 ms slower per action-expert policy call, H200, 2026-11-22.) A CTA
// cannot exit while its peers still store into it: it waits for all of their bytes first.
// Distributed shared memory may only be written once every CTA of the cluster runs and has set up
// its barrier: the kernel calls swap_begin() at its start (every thread), and the swap waits on
// that early arrival before storing.
constexpr int kMaxPeers = 8;  // the portable cluster size

template <int ROWS>
struct MaxSwap {
  float peer[kMaxPeers][ROWS];  // peer[q][r]: cluster CTA q's max of token r
  uint64_t bar;                 // counts the peers' bytes
};

// `exchange`: whether this launch will call token_scales_pushed (uniform over the grid); `rows`:
// the CTA's tokens (the same for every CTA of a cluster).
template <int ROWS>
__device__ __forceinline__ void swap_begin(MaxSwap<ROWS>& s, bool exchange, int rows) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (!exchange || gridDim.y == 1) return;
  if (threadIdx.x == 0) {
    const unsigned bar = static_cast<unsigned>(__cvta_generic_to_shared(&s.bar));
    const unsigned bytes = (gridDim.y - 1) * rows * sizeof(float);
    asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;\n" ::"r"(bar) : "memory");
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  asm volatile("barrier.cluster.arrive.relaxed.aligned;\n" ::: "memory");
#else
  (void)s;
  (void)exchange;
  (void)rows;
#endif
}

template <int ROWS>
__device__ __forceinline__ void token_scales_pushed(const ActQuantParams& p, float* scale_s, MaxSwap<ROWS>& s,
                                                    int rows, int64_t row0, float qmax) {
  const int t = threadIdx.x;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  const int split = gridDim.y;
  if (split > 1) {
    asm volatile("barrier.cluster.wait.aligned;\n" ::: "memory");  // every CTA runs, its barrier set
    unsigned rank;
    asm volatile("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(rank));
    const unsigned bar = static_cast<unsigned>(__cvta_generic_to_shared(&s.bar));
    if (t < rows) {
      const float v = scale_s[t];
      s.peer[rank][t] = v;
      const unsigned slot = static_cast<unsigned>(__cvta_generic_to_shared(&s.peer[rank][t]));
      for (int q = 0; q < split; ++q) {
        if (q == static_cast<int>(rank)) continue;
        unsigned remote_slot, remote_bar;
        asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(remote_slot) : "r"(slot), "r"(q));
        asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(remote_bar) : "r"(bar), "r"(q));
        asm volatile("st.async.shared::cluster.mbarrier::complete_tx::bytes.b32 [%0], %1, [%2];\n" ::"r"(remote_slot),
                     "r"(__float_as_uint(v)), "r"(remote_bar)
                     : "memory");
      }
    }
    for (unsigned landed = 0; !landed;)
      asm volatile(
          "{\n .reg .pred done;\n"
          " mbarrier.try_wait.parity.acquire.cluster.shared::cta.b64 done, [%1], 0;\n"
          " selp.u32 %0, 1, 0, done;\n}\n"
          : "=r"(landed)
          : "r"(bar)
          : "memory");
    __syncthreads();  // this CTA's own maxima (plain stores) too
    if (t < rows) {
      float v = 0.f;
      for (int q = 0; q < split; ++q) v = fmaxf(v, s.peer[q][t]);
      scale_s[t] = v;
    }
  }
#else
  (void)s;
#endif
  if (t < rows) {  // s_t = max(max|x'| / qmax, 1e-8)
    scale_s[t] = fmaxf(scale_s[t] / qmax, 1e-8f);
    if (p.scales && blockIdx.y == 0) p.scales[row0 + t] = scale_s[t];
  }
}

// Zeroes what the GEMM after the input kernels needs zeroed (its split-k arrival counters): the
// first CTA, after the chain wait (until then the memory may still be another kernel's).
__device__ __forceinline__ void clear_for_gemm(const ActQuantParams& p) {
  if (p.clear_count > 0 && blockIdx.x == 0 && blockIdx.y == 0)
    for (int i = threadIdx.x; i < p.clear_count; i += blockDim.x) p.clear[i] = 0;
}

}  // namespace act

// act_quant_rows.cu: the one-kernel input side for rows that fit on one SM. How it runs for given
// parameters: tokens per CTA (0: a row does not fit, the two-pass kernels run), and whether a
// cluster of `split` CTAs shares each row (1-2 tokens per CTA, Hopper).
struct RowsLaunch {
  int tokens = 0;
  bool cluster = false;
  int split = 1;
};
RowsLaunch act_quant_rows_plan(const ActQuantParams& p);
cudaError_t act_quant_rows(const ActQuantParams& p, const RowsLaunch& launch, bool chain, cudaStream_t stream);

// act_quant_mma.cu: the tensor-core input kernel (float16/bfloat16 x, B = 16, codes). How it runs:
// tokens per CTA (0: it does not apply), the CTAs of a cluster sharing each token group's
// positions (Hopper), and whether each warp holds its rotated blocks.
constexpr int kMmaTokens = 16;  // tokens a CTA takes, fewer only where long rows do not fit
struct MmaLaunch {
  int tokens = 0;
  int split = 1;
  bool hold = false;  // each warp's blocks fit its registers: rotated once, not twice
};
MmaLaunch act_quant_mma_plan(const ActQuantParams& p);
cudaError_t act_quant_mma(const ActQuantParams& p, const MmaLaunch& launch, bool chain, cudaStream_t stream);

// act_quant_slices.cu: the tensor-core input side for many tokens (float16/bfloat16 x, B = 16,
// codes, Hopper): x~ = x[:, perm] copied to scratch (where there is a permutation), then TM tokens
// a CTA and a slice of the positions, a cluster of `split` CTAs covering the row. tokens = 0: it
// does not apply.
struct SliceLaunch {
  int tokens = 0;
  int split = 1;
};
SliceLaunch act_quant_slices_plan(const ActQuantParams& p);
size_t act_quant_slices_workspace(const ActQuantParams& p);  // x~'s bytes
cudaError_t act_quant_slices(const ActQuantParams& p, const SliceLaunch& launch, bool chain_first, cudaStream_t stream);

}  // namespace kernels
}  // namespace duquant
