#pragma once
// The packer: from a float nn.Linear weight to a LayerPack (DESIGN.md §2).

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

// ---- pieces of the packer, exposed for tests and for other backends ----

// Energy-interleaving permutation (int64 [K]) of the columns of w (float64 [N, K]).
torch::Tensor channel_permutation(const torch::Tensor& w, double ls);

// For blocks of `block` consecutive columns of m (float64 [R, C]): eigenvectors of each block's
// Gram matrix m_blk^T m_blk, descending eigenvalue, canonical signs; a short last block is embedded
// in a block x block identity. Returns float64 [ceil(C/block), block, block].
torch::Tensor column_block_rotations(const torch::Tensor& m, int64_t block);

// m (float64 [R, C]) times blockdiag(rot) on the right: every column block multiplied by its rotation.
torch::Tensor rotate_column_blocks(const torch::Tensor& m, const torch::Tensor& rot);

// Flips each column's sign so that its entry of largest magnitude is positive (ties: lowest row).
torch::Tensor canonical_signs(const torch::Tensor& vecs);

}  // namespace duquant
