#include "duquant/pack_model.h"

#include <algorithm>
#include <set>
#include <stdexcept>

#include "duquant/pack_linear.h"

namespace duquant {
namespace {

constexpr int64_t kCudaStackBytes = int64_t{1} << 30;
constexpr int64_t kOtherStackBytes = int64_t{256} << 20;

// Layers that can share one batched pass: same shape, same config, same target device.
struct Group {
  torch::Device device;
  int64_t out_features, in_features;
  Config config;
  std::vector<size_t> members;  // indices into the caller's list, in its order
};

std::string quoted_names(const std::vector<LinearToPack>& layers, const std::vector<size_t>& idx) {
  std::string s;
  for (size_t i : idx) s += (s.empty() ? "'" : ", '") + layers[i].name + "'";
  return s;
}

// Checks everything that needs no pass over the weights, for every layer, before any packing.
void check_all(const std::vector<LinearToPack>& layers) {
  std::set<std::string> seen;
  for (size_t i = 0; i < layers.size(); ++i) {
    const auto& l = layers[i];
    if (l.name.empty())
      throw std::invalid_argument("pack_linears: layer " + std::to_string(i) + " has an empty name");
    if (!seen.insert(l.name).second)
      throw std::invalid_argument("pack_linears: layer name '" + l.name + "' appears twice");
    try {
      l.config.validate();
    } catch (const std::invalid_argument& e) {
      throw std::invalid_argument(l.name + ": " + e.what());
    }
    check_linear_weight(l.weight, l.bias, l.name, /*check_weight_values=*/false);
  }
}

std::vector<Group> group_layers(const std::vector<LinearToPack>& layers, const PackModelOptions& options) {
  std::vector<Group> groups;
  for (size_t i = 0; i < layers.size(); ++i) {
    const auto& l = layers[i];
    const torch::Device device = options.device ? *options.device : l.weight.device();
    const int64_t n = l.weight.size(0), k = l.weight.size(1);
    bool placed = false;
    for (auto& g : groups) {
      if (g.device == device && g.out_features == n && g.in_features == k && g.config == l.config) {
        g.members.push_back(i);
        placed = true;
        break;
      }
    }
    if (!placed) groups.push_back(Group{device, n, k, l.config, {i}});
  }
  return groups;
}

// Packs one stack of a group's layers. Values are checked here, on the stacked copy, in one pass;
// only when that fails is each layer looked at, so the error names the culprit.
std::vector<LayerPack> pack_stack(const std::vector<LinearToPack>& layers, const std::vector<size_t>& idx,
                                  const Group& g, const PackModelOptions& options) {
  torch::NoGradGuard no_grad;
  const int64_t count = static_cast<int64_t>(idx.size());
  auto stack = torch::empty({count, g.out_features, g.in_features},
                            torch::TensorOptions().dtype(torch::kFloat64).device(g.device));
  std::vector<torch::Tensor> biases;
  biases.reserve(idx.size());
  for (int64_t j = 0; j < count; ++j) {
    const auto& l = layers[idx[j]];
    // Move in the stored dtype (bf16 crosses the bus at a quarter of float64's bytes), widen there.
    stack[j].copy_(l.weight.detach().to(g.device));
    biases.push_back(l.bias && l.bias->defined() ? l.bias->detach().to(g.device) : torch::Tensor());
  }
  if (!torch::isfinite(stack).all().item<bool>()) {
    for (size_t i : idx) check_linear_weight(layers[i].weight, layers[i].bias, layers[i].name);
  }
  std::vector<LayerPack> packs;
  try {
    packs = pack_weight_stack(stack, biases, g.config);
  } catch (const std::invalid_argument& e) {
    throw std::invalid_argument(quoted_names(layers, idx) + ": " + e.what());
  } catch (const std::exception& e) {
    // Out of memory, a solver that did not converge: name every layer of the stack.
    throw std::runtime_error(quoted_names(layers, idx) + ": " + e.what());
  }
  if (options.on_packed)
    for (int64_t j = 0; j < count; ++j) options.on_packed(idx[j], stack[j], packs[j]);
  return packs;
}

}  // namespace

std::vector<PackedLayer> pack_linears(const std::vector<LinearToPack>& layers, const PackProgress& progress,
                                      const PackModelOptions& options) {
  check_all(layers);
  if (options.max_stack_bytes < 0)
    throw std::invalid_argument("pack_linears: max_stack_bytes must be >= 0, got " +
                                std::to_string(options.max_stack_bytes));

  std::vector<PackedLayer> out(layers.size());
  size_t done = 0;
  for (const Group& g : group_layers(layers, options)) {
    const int64_t budget = options.max_stack_bytes > 0 ? options.max_stack_bytes
                           : g.device.is_cuda()       ? kCudaStackBytes
                                                      : kOtherStackBytes;
    const int64_t layer_bytes = g.out_features * g.in_features * static_cast<int64_t>(sizeof(double));
    const size_t per_stack = static_cast<size_t>(std::max<int64_t>(1, budget / layer_bytes));
    for (size_t first = 0; first < g.members.size(); first += per_stack) {
      const size_t last = std::min(g.members.size(), first + per_stack);
      const std::vector<size_t> idx(g.members.begin() + first, g.members.begin() + last);
      auto packs = pack_stack(layers, idx, g, options);
      for (size_t j = 0; j < idx.size(); ++j) {
        out[idx[j]] = PackedLayer{layers[idx[j]].name, std::move(packs[j])};
        ++done;
        if (progress) progress(done, layers.size(), layers[idx[j]].name);
      }
    }
  }
  return out;
}

}  // namespace duquant
