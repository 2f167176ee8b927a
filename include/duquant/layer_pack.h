#pragma once
// LayerPack: everything one quantized linear layer needs at run time (DESIGN.md §2, §4).

#include <torch/torch.h>

#include "duquant/config.h"

namespace duquant {

struct LayerPack {
  Config config;
  int64_t in_features = 0;   // K
  int64_t out_features = 0;  // N

  torch::Tensor perm;     // int64 [K], x~ = x[:, perm]; undefined when !config.permute
  torch::Tensor r_in;     // float32 [ceil(K/B), B, B]; a short last block sits in a B x B identity
  torch::Tensor r_out;    // float32 [ceil(N/Bo), Bo, Bo]; undefined when row_rot=none
  // Quantized weights (wbits 2..8): codes of W'' per row. wbits <= 4: uint8 [N, ceil(K/2)],
  // two's-complement nibbles, column 2j in the low nibble, 2j+1 in the high one; wbits 5..8:
  // int8 [N, K]. Unquantized (wbits 0/16): the transformed weight W'' in float32 [N, K].
  torch::Tensor qweight;
  torch::Tensor w_scale;  // float32 [N]; undefined when weights are unquantized
  torch::Tensor bias;     // float32 [N]; undefined when the layer has none
  // Static activation scales (float32 [1] for act=static, [K] for static_channel) and the
  // calibration state int64 [2] = {batches observed, finished}; undefined for dynamic/no act quant.
  torch::Tensor act_scale;
  torch::Tensor calib_state;

  // Checks every tensor against the config and shapes; throws std::invalid_argument naming the
  // tensor, the expected and the actual value. `where` prefixes the message (e.g. a layer name).
  // with_calibration_state = false leaves calib_state out (a forward does not read it).
  void validate(const std::string& where = "layer", bool with_calibration_state = true) const;
};

// The tensors a layer owns, by buffer and pack-field name (DESIGN.md §4), in pack order: the one
// list the module's buffers, the pack file, the Python bindings and duquant-inspect walk. A pack
// file reserves "<layer>.<field>" for every field, used by the config or not, so that reading a
// file never has to guess who owns a tensor.
struct LayerTensorField {
  const char* name;
  torch::Tensor LayerPack::*member;
};
inline constexpr LayerTensorField kLayerTensorFields[] = {
    {"qweight", &LayerPack::qweight}, {"w_scale", &LayerPack::w_scale}, {"perm", &LayerPack::perm},
    {"r_in", &LayerPack::r_in},       {"r_out", &LayerPack::r_out},     {"bias", &LayerPack::bias},
    {"act_scale", &LayerPack::act_scale}, {"calib_state", &LayerPack::calib_state},
};

// Shapes and dtypes of the tensors of a pack for this layer size and config, all zero-filled
// (calib_state/act_scale too). Used to build empty modules that a state_dict or pack file fills.
LayerPack empty_layer_pack(int64_t in_features, int64_t out_features, bool has_bias, const Config& config,
                           const torch::Device& device = torch::kCPU);

}  // namespace duquant
