#pragma once
// Internal: the CUDA side of the fast path (src/fast/fast_path_cuda.cpp, built with DUQUANT_WITH_CUDA).

#include <string>
#include <tuple>
#include <vector>

#include <torch/torch.h>

#include "duquant/layer_pack.h"

namespace duquant {

// set_input_kernel()'s choice as a kernels::InputKernel value (src/fast/fast_path.cpp).
int input_kernel_index();
// set_gemm_tile()'s choice as a kernels::GemmTile value.
int gemm_tile_index();
// Records the kernels::GemmTile an integer GEMM launch ran and its split count (last_gemm_tile(),
// last_gemm_splits()).
void note_gemm_tile_launched(int tile, int splits);
// Records the kernels::InputKernel an input launch ran and its tensor-core kernel's cluster size, 0
// for the other kernels (last_input_kernel(), last_input_splits()).
void note_input_launched(int kernel, int splits);

// set_weight_only_path()'s choice, and what a weight-only forward ran (last_weight_only_path()).
enum class WeightOnlyPath : int { kAuto = 0, kFused = 1, kDense = 2 };
int weight_only_path_index();
void note_weight_only_launched(int path);

namespace cuda_fast {

// Limits of the device and the kernels (compute capability, block size); "" when the layer fits.
std::string device_blocker(const LayerPack& layer, const torch::Device& device);
// Why a weight-only layer cannot run on CUDA with input x ("" when it can): the fused GEMM takes
// int4 weights and 16-bit input, the dense weight any wbits and dtype but blocks of 16 and Bo | 16.
std::string weight_only_blocker(const LayerPack& layer, const torch::Tensor& x);
// chain = false launches the layer's kernels without programmatic dependent launch (operands that
// a kernel just wrote: reads of them may not start before that kernel is done).
torch::Tensor forward(const torch::Tensor& x, const LayerPack& layer, bool chain = true);
// The GEMM half of forward: y = layer(x) from x's activation codes [T, K] and per-token scales [T],
// as quantize_input made them with this layer's transform. x gives the output's dtype and shape.
torch::Tensor forward_codes(const torch::Tensor& codes, const torch::Tensor& scales, const torch::Tensor& x,
                            const LayerPack& layer, bool chain = true);
// forward_codes for layers that share x's codes (same K, wbits, Bo; at most
// kernels::kMaxGemmSegments): one grouped GEMM launch where the plan allows it, else one per layer.
std::vector<torch::Tensor> forward_codes_group(const torch::Tensor& codes, const torch::Tensor& scales,
                                               const torch::Tensor& x, const std::vector<LayerPack>& layers,
                                               bool chain = true);
std::tuple<torch::Tensor, torch::Tensor> quantize_input(const torch::Tensor& x2d, const torch::Tensor& perm,
                                                        const torch::Tensor& r_in, const torch::Tensor& static_scale,
                                                        int64_t abits);
// True when the build has the wgmma GEMM and the current CUDA device can run it.
bool wgmma_available();

}  // namespace cuda_fast
}  // namespace duquant
