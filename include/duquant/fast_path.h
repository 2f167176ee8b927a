#pragma once
// The CUDA fast path (DESIGN.md §2, "two execution paths, one answer"): int8 activation codes from one
// fused input kernel, an integer GEMM with the scale/restore/bias epilogue fused in. linear_forward()
// is what every entry point calls: it takes the fast path when it can and the reference otherwise.

#include <string>
#include <tuple>
#include <vector>

#include <torch/torch.h>

#include "duquant/layer_pack.h"

namespace duquant {

// True when the library was built with its CUDA kernels.
bool fast_path_built();

// Why the fast path cannot run `layer` ("" when it can). With x defined, x's device and dtype are
// checked too; without, only the layer (its buffers' device included). Reasons are short phrases
// for a repr, e.g. "reference: static_channel scales are per input channel".
std::string fast_path_blocker(const LayerPack& layer, const torch::Tensor& x = torch::Tensor());

// The layer's tensors as the CUDA kernels read them, through raw pointers: checked against the
// config and shapes (LayerPack::validate, calib_state aside), all on qweight's device, and each
// contiguous and 16-byte aligned: a tensor that is not (a view handed to torch.ops.duquant.linear)
// is copied, one that is comes back as is (`copied`, when given, says whether any was). Throws
// std::invalid_argument naming the tensor. linear_forward runs it before the fast path.
LayerPack kernel_operands(const LayerPack& layer, const std::string& where = "duquant::linear",
                          bool* copied = nullptr);

// y = layer(x), fast path when fast_path_blocker(layer, x) is empty and activations are quantized,
// reference path otherwise. x: [..., K] float32/float16/bfloat16; the result has x's dtype.
torch::Tensor linear_forward(const torch::Tensor& x, const LayerPack& layer, bool quantize_acts = true);

// y = layer(x) from x's activation codes [T, K] int8 and per-token scales [T] float32, as
// quantize_input made them with this layer's input transform (T = x's tokens; x gives the output's
// dtype and shape). Lets layers with one shared input transform (pack_linears' input groups)
// quantize their common input once. Fast path on CUDA where the layer allows it, otherwise the
// reference's matmul, restore and bias on the dequantized codes. Throws std::invalid_argument on
// shapes, dtypes or devices that do not fit, and for weight-only layers.
torch::Tensor linear_from_codes(const torch::Tensor& codes, const torch::Tensor& scales, const torch::Tensor& x,
                                const LayerPack& layer);

// linear_from_codes for several layers reading the same codes (siblings sharing an input transform),
// one output each, in order. On CUDA, where the layers agree on wbits and Bo and the plan allows
// (mma.sync tiles: small and medium M), their GEMMs run as one grouped launch; bit-identical to
// linear_from_codes per layer either way.
std::vector<torch::Tensor> linear_from_codes_group(const torch::Tensor& codes, const torch::Tensor& scales,
                                                   const torch::Tensor& x, const std::vector<LayerPack>& layers);

// Which input kernels the fast path runs, process-wide, for comparing them in tests and benchmarks:
// "auto" (the default: one kernel holding whole rows in shared memory where a row fits on an SM,
// the two-pass kernels otherwise, the tensor-core kernels at large M), "rows" (the one-kernel path
// wherever it fits), "split" (the two passes always), "mma" (the rotation on tensor cores, whole
// rows a CTA) or "slices" (a permuted copy of x, then the rotation on tensor cores over slices of
// positions; Hopper). The last two take float16/bfloat16 x, block size 16 and int8 codes; elsewhere
// they pick as "auto" does. Anything else throws.
void set_input_kernel(const std::string& which);
std::string input_kernel();
// How many CTAs of a cluster share each 16-token group's blocks in the tensor-core input kernel
// ("mma", Hopper), process-wide, for tests and benchmarks: 0 (the default) picks by size, 1..8
// forces that many (at most one block of positions per warp a CTA). Anything else throws.
void set_input_splits(int64_t splits);
int input_splits();

// Which GEMM tile shape the fast path runs, process-wide, for comparing them in tests and
// benchmarks: "auto" (the default: picked by M, N and the GPU's SM count), "stream" (16 tokens x
// 16-32 outputs per CTA, k split over 8 warps: weight streaming), "32x32", "64x64", "128x128"
// (mma.sync), "wgmma128" or "wgmma256" (128 or 256 tokens x 128 outputs on Hopper's warpgroup
// MMA, int4 weights; where they cannot run, see wgmma_gemm_available(), or codes and weights are
// not 16-byte aligned, the choice falls back to "auto"), "gemv" (the
// skinny kernel: M <= 64, int4 weights, K a multiple of 128, weights streamed into registers, the
// tokens' codes staged in shared memory; elsewhere "auto"), "gemv-direct" (the same with the codes
// read from L2 by each warp, M <= 16). Anything else throws.
void set_gemm_tile(const std::string& which);
std::string gemm_tile();
// The tile shape the last W4A8/W8A8 fast-path forward launched (on any thread), named as
// set_gemm_tile names them but never "auto": what a forced choice really ran, since one that cannot
// run falls back to picking by size. "" before the first. CUDA graph replays launch nothing here.
std::string last_gemm_tile();
// How many CTAs shared each output tile's k range in that launch (1: no split; 0 before the first).
int last_gemm_splits();
// How many CTAs of a cluster shared each token group in the last fast-path forward's tensor-core
// input kernel, "mma" or "slices" (1: none), 0 where that forward ran another input kernel or
// before the first.
int last_input_splits();
// The input kernels the last fast-path forward ran, named as set_input_kernel names them but never
// "auto" ("" before the first): what a forced choice really ran.
std::string last_input_kernel();
// True when this build has the wgmma GEMM kernel (sm_90a code) and the current CUDA device
// (compute capability 9.0) can run it.
bool wgmma_gemm_available();

// How many CTAs share each output tile's k range in the W4A8/W8A8 GEMM (split-k on 64x64 tiles;
// on the skinny kernel and the 128-token wgmma tiles a cluster of at most 8, Hopper only, the
// wgmma tiles' a power of two: 3 runs as 2; the others ignore it), process-wide, for tests and
// benchmarks: 0 (the default) picks by size, 1..64 forces that many (at most one per pipeline stage
// of k). Anything else throws.
void set_gemm_splits(int64_t splits);
int gemm_splits();

// How weight-only layers (abits=0) run on CUDA, process-wide, for comparing in tests and
// benchmarks: "auto" (the default: the fused W4A16 GEMM below ~128 tokens, the dense weight above),
// "fused" (the W4A16 GEMM: int4 weights, 16-bit activations rotated by the input kernel, restore
// in its epilogue) or "dense" (one kernel folds the permutation, rotations, scales and restore into
// a dense weight in x's dtype, scratch the size of the bf16 weight, and cuBLAS multiplies).
// Float32 input and wbits 5..8 always take the dense weight. Anything else throws.
void set_weight_only_path(const std::string& which);
std::string weight_only_path();
// What the last weight-only fast-path forward ran, "fused" or "dense" ("" before the first).
std::string last_weight_only_path();

// The fast path's input kernel alone, for tests: x [T, K] -> (int8 codes [T, K], float32 scales [T]).
// On CPU tensors it runs the reference's transform and quantizer, so the two can be compared.
std::tuple<torch::Tensor, torch::Tensor> quantize_input(const torch::Tensor& x, const torch::Tensor& perm,
                                                        const torch::Tensor& r_in, const torch::Tensor& static_scale,
                                                        int64_t abits);

}  // namespace duquant
