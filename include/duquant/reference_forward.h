#pragma once
// The reference path: plain torch ops in float32 on any device. It defines the result (DESIGN.md §2).

#include <torch/torch.h>

#include "duquant/layer_pack.h"

namespace duquant {

// x~ = x[:, perm]; x' = x~ * blockdiag(r_in). x: float32 [T, K].
torch::Tensor input_transform(const torch::Tensor& x, const torch::Tensor& perm, const torch::Tensor& r_in);

// y[:, rows_j] = y''[:, rows_j] * r_out[j]. y: float32 [T, N].
torch::Tensor restore_rows(const torch::Tensor& y, const torch::Tensor& r_out);

// Everything after the input transform: activation quantization, matmul, restore, bias.
// xt: float32 [T, K] (output of input_transform) -> float32 [T, N].
torch::Tensor linear_from_transformed(const torch::Tensor& xt, const LayerPack& layer, bool quantize_acts);

// Full layer: x [..., K] float32/float16/bfloat16 -> [..., N] in x's dtype. With
// quantize_acts=false the activations stay in float (used while calibrating).
torch::Tensor reference_forward(const torch::Tensor& x, const LayerPack& layer, bool quantize_acts);

// Checks x against the layer (floating dtype, last dim = in_features, same device as the buffers);
// throws std::invalid_argument naming `where`.
void check_layer_input(const torch::Tensor& x, const LayerPack& layer, const std::string& where = "DuQuantLinear");

}  // namespace duquant
