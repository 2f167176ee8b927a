#pragma once
// Packing a whole model: many linear layers at once. Layers of equal shape, config and device are
// stacked and packed in one batched pass (one eigensolver call per side on the GPU instead of one
// per layer), which is what makes packing a large checkpoint take seconds.

#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include <c10/util/Optional.h>
#include <torch/torch.h>

#include "duquant/config.h"
#include "duquant/io/pack_file.h"  // PackedLayer
#include "duquant/layer_pack.h"

namespace duquant {

struct LinearToPack {
  std::string name;                   // e.g. "model.layers.0.self_attn.q_proj"; errors and progress use it
  torch::Tensor weight;               // [N, K] float32/float16/bfloat16/float64, any device
  c10::optional<torch::Tensor> bias;  // [N] or none
  Config config;
  // Layers with the same non-empty input_group read the same activations (q/k/v of one attention,
  // gate/up of one MLP): they get one input transform, computed from their weights stacked by rows
  // (shared_input_transform), so the fast path quantizes their input once. They must agree on
  // in_features, config and device.
  std::string input_group;
};

struct PackModelOptions {
  // Where the packing runs and the packs land; none = each weight's own device. Weights are moved
  // there one stack at a time, so a checkpoint on the host never has to fit on the GPU at once.
  c10::optional<torch::Device> device;
  // Bytes of float64 weights packed in one batched pass (peak memory is a few times this).
  // 0 = 1 GiB on CUDA, 256 MiB elsewhere. A layer larger than this is packed alone.
  int64_t max_stack_bytes = 0;
  // Called for each layer right after its stack is packed, with its weight as packed (float64
  // [N, K] on the packing device) and its pack: lets a caller check the result against the float
  // weight (duquant-pack's output error) without moving the weight to the device a second time.
  std::function<void(size_t index, const torch::Tensor& weight, const LayerPack& pack)> on_packed;
  // Layers without an input_group that are siblings reading one input (kSiblingSets: children of
  // one module named q_proj/k_proj/v_proj, gate_proj/up_proj, ...) with equal in_features, config
  // and device, and dynamic activation quantization, are packed as one input group. Children of a
  // cross-attention module (its name or its parent's contains "cross", or is "encoder_attn") read
  // two inputs and are left alone.
  bool share_inputs = false;
};

// Names of children of one module that read the same input, one set per line of model code that
// feeds them: attention projections and gated MLPs in the common naming schemes.
extern const std::vector<std::vector<std::string>> kSiblingSets;

// Which of kSiblingSets the child `child` of the module `parent` (dotted names) belongs to, -1 for
// none (and for every child of a cross-attention module). The one rule for packing and linking.
int sibling_set_of(const std::string& parent, const std::string& child);

// The input groups share_inputs forms from names: "" for layers in none, else "<parent>:<set>".
std::vector<std::string> sibling_input_groups(const std::vector<LinearToPack>& layers, const PackModelOptions& options);

// Called after each layer is packed: (layers done, total layers, name of the layer just done).
using PackProgress = std::function<void(size_t done, size_t total, const std::string& name)>;

// Packs every layer; the result is in the order of `layers`, each pack (outside input groups) equal to
// pack_linear(weight, bias, config, name) (bit-identical on the CPU; on CUDA within the rounding of
// batched reductions). All layers are checked (shapes, dtypes, configs, unique names) before any
// packing starts. Errors are std::invalid_argument (bad input) or std::runtime_error (a failure
// while packing, e.g. out of memory) whose message starts with the layer's name.
std::vector<PackedLayer> pack_linears(const std::vector<LinearToPack>& layers, const PackProgress& progress = {},
                                      const PackModelOptions& options = {});

}  // namespace duquant
