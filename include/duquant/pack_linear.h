#pragma once
// The packer: from a float nn.Linear weight to a LayerPack (DESIGN.md §2).

#include <vector>

#include <c10/util/Optional.h>
#include <torch/torch.h>

#include "duquant/config.h"
#include "duquant/layer_pack.h"

namespace duquant {

// weight: [N, K] float32/float16/bfloat16/float64 on any device with a registered eigensolver.
// bias: [N] or undefined. All work runs on the weight's device; the pack lands there too.
// Throws std::invalid_argument on bad input (rank, dtype, NaN/Inf, bias shape), naming `where`.
LayerPack pack_linear(const torch::Tensor& weight, const c10::optional<torch::Tensor>& bias, const Config& config,
                      const std::string& where = "weight");

// One input transform for sibling layers that read the same activations (q/k/v, gate/up): the
// permutation and input block rotations (float64, [K] and [nb, B, B]) computed from their weights
// stacked by rows. Each sibling packed with it (pack_weight_stack's `shared`) quantizes the same x
// to the same codes, so the fast path can quantize x once for all of them.
struct SharedInputTransform {
  torch::Tensor perm;  // int64 [K], undefined without config.permute
  torch::Tensor r_in;  // float64 [ceil(K/B), B, B]
};
// w: float64 [N1 + N2 + ..., K], the siblings' weights concatenated along rows.
SharedInputTransform shared_input_transform(const torch::Tensor& w, const Config& config);

// The packer over a stack of L layers of one shape and config: weights float64 [L, N, K] on one
// device, `biases` L tensors [N] or undefined. Every step runs batched over the stack (one eigensolver
// call per side and block width), so grouping equal layers costs one pass instead of L. A layer's
// pack is bit-identical whether it is packed alone (pack_linear is the L = 1 case) or in a stack on
// the CPU; on CUDA, batched reductions may round differently. Packs land on the weights' device.
// Inputs are not checked here: run check_linear_weight on every layer first.
// With `shared`, every layer of the stack takes that input transform instead of its own.
std::vector<LayerPack> pack_weight_stack(const torch::Tensor& weights, const std::vector<torch::Tensor>& biases,
                                         const Config& config, const SharedInputTransform* shared = nullptr);

// What pack_linear refuses, without packing: rank, dtype, empty weight, bias shape/dtype/device,
// NaN/Inf in the bias and (when check_weight_values) in the weight. Throws std::invalid_argument
// starting with `where`. check_weight_values=false skips the one pass over the weight's values,
// for callers that check a whole stack at once (check_weight_values=true then names the culprit).
void check_linear_weight(const torch::Tensor& weight, const c10::optional<torch::Tensor>& bias,
                         const std::string& where, bool check_weight_values = true);

// ---- pieces of the packer, exposed for tests and for other backends ----

// Energy-interleaving permutation (int64 [K]) of the columns of w (float64 [N, K]).
torch::Tensor channel_permutation(const torch::Tensor& w, double ls);

// For blocks of `block` consecutive columns of m (float64 [R, C]): eigenvectors of each block's
// Gram matrix m_blk^T m_blk, descending eigenvalue, canonical signs; a short last block is embedded
// in a block x block identity. Returns float64 [ceil(C/block), block, block]. A stack m [L, R, C]
// gives [L, ceil(C/block), block, block] from one eigensolver call (two with a short block).
torch::Tensor column_block_rotations(const torch::Tensor& m, int64_t block);

// m (float64 [R, C]) times blockdiag(rot) on the right: every column block multiplied by its rotation.
// Also takes a stack: m [L, R, C] with rot [L, nb, B, B].
torch::Tensor rotate_column_blocks(const torch::Tensor& m, const torch::Tensor& rot);

// Flips each column's sign so that its entry of largest magnitude is positive (ties: lowest row).
torch::Tensor canonical_signs(const torch::Tensor& vecs);

}  // namespace duquant
