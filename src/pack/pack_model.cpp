#include "duquant/pack_model.h"

#include <algorithm>
#include <cctype>
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

// Where a layer is packed: options.device, else where its weight lives.
torch::Device packing_device(const LinearToPack& l, const PackModelOptions& options) {
  return options.device ? *options.device : l.weight.device();
}

std::vector<Group> group_layers(const std::vector<LinearToPack>& layers, const PackModelOptions& options,
                                const std::vector<bool>& skip) {
  std::vector<Group> groups;
  for (size_t i = 0; i < layers.size(); ++i) {
    if (skip[i]) continue;  // packed with its input group
    const auto& l = layers[i];
    const torch::Device device = packing_device(l, options);
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

// Indices of equal non-empty keys, groups in order of first appearance.
std::vector<std::vector<size_t>> indices_by_key(const std::vector<std::string>& keys) {
  std::vector<std::vector<size_t>> groups;
  std::vector<std::string> seen;
  for (size_t i = 0; i < keys.size(); ++i) {
    if (keys[i].empty()) continue;
    const auto at = std::find(seen.begin(), seen.end(), keys[i]);
    if (at == seen.end()) {
      seen.push_back(keys[i]);
      groups.push_back({i});
    } else {
      groups[at - seen.begin()].push_back(i);
    }
  }
  return groups;
}

// Layers sharing an input transform, by input_group (explicit, else the sibling rule with
// options.share_inputs) in order of first appearance; groups of one
// layer are left out (its own transform is the shared one). Members must agree on what the
// transform depends on.
std::vector<std::vector<size_t>> input_groups(const std::vector<LinearToPack>& layers,
                                              const PackModelOptions& options) {
  std::vector<std::string> keys =
      options.share_inputs ? sibling_input_groups(layers, options) : std::vector<std::string>(layers.size());
  for (size_t i = 0; i < layers.size(); ++i)
    if (!layers[i].input_group.empty()) keys[i] = layers[i].input_group;
  std::vector<std::vector<size_t>> groups = indices_by_key(keys);
  for (const auto& g : groups) {
    const auto& a = layers[g[0]];
    for (size_t i : g) {
      const auto& b = layers[i];
      std::string why;
      if (b.weight.size(1) != a.weight.size(1))
        why = "in_features " + std::to_string(b.weight.size(1)) + " vs " + std::to_string(a.weight.size(1));
      else if (!(b.config == a.config))
        why = "configs differ";
      else if (packing_device(b, options) != packing_device(a, options))
        why = "devices differ";
      if (!why.empty())
        throw std::invalid_argument("pack_linears: input group of '" + a.name + "': '" + b.name +
                                    "' cannot share an input transform with '" + a.name + "' (" + why + ")");
    }
  }
  groups.erase(std::remove_if(groups.begin(), groups.end(), [](const auto& g) { return g.size() < 2; }), groups.end());
  return groups;
}

// Packs an input group: one transform from the members' weights stacked by rows, then each member
// with it (its own output rotations and weight codes).
std::vector<LayerPack> pack_input_group(const std::vector<LinearToPack>& layers, const std::vector<size_t>& idx,
                                        const PackModelOptions& options) {
  torch::NoGradGuard no_grad;
  const auto& first = layers[idx[0]];
  const torch::Device device = packing_device(first, options);
  std::vector<torch::Tensor> weights;
  for (size_t i : idx) weights.push_back(layers[i].weight.detach().to(device).to(torch::kFloat64));
  // Stacked in name order, so the transform (its float sums) does not depend on the callers' order:
  // duquant-pack (checkpoint order) and quantize_ (module order) pack the same bits.
  std::vector<size_t> order(idx.size());
  for (size_t j = 0; j < order.size(); ++j) order[j] = j;
  std::sort(order.begin(), order.end(), [&](size_t a, size_t b) { return layers[idx[a]].name < layers[idx[b]].name; });
  std::vector<torch::Tensor> sorted;
  for (size_t j : order) sorted.push_back(weights[j]);
  auto stacked = torch::cat(sorted, 0);
  if (!torch::isfinite(stacked).all().item<bool>()) {
    for (size_t i : idx) check_linear_weight(layers[i].weight, layers[i].bias, layers[i].name);
  }
  std::vector<LayerPack> packs;
  try {
    const SharedInputTransform transform = shared_input_transform(stacked, first.config);
    for (size_t j = 0; j < idx.size(); ++j) {
      const auto& l = layers[idx[j]];
      torch::Tensor bias = l.bias && l.bias->defined() ? l.bias->detach().to(device) : torch::Tensor();
      packs.push_back(pack_weight_stack(weights[j].unsqueeze(0), {bias}, first.config, &transform)[0]);
    }
  } catch (const std::invalid_argument& e) {
    throw std::invalid_argument(quoted_names(layers, idx) + ": " + e.what());
  } catch (const std::exception& e) {
    throw std::runtime_error(quoted_names(layers, idx) + ": " + e.what());
  }
  if (options.on_packed)
    for (size_t j = 0; j < idx.size(); ++j) options.on_packed(idx[j], weights[j], packs[j]);
  return packs;
}

}  // namespace

const std::vector<std::vector<std::string>> kSiblingSets = {
    {"q_proj", "k_proj", "v_proj"}, {"gate_proj", "up_proj"}, {"query", "key", "value"}, {"wq", "wk", "wv"}, {"w1", "w3"}};

int sibling_set_of(const std::string& parent, const std::string& child) {
  // Cross-attention reads two inputs (q the decoder's states, k/v the encoder's): not siblings.
  // The module's own name or its parent's (BERT: crossattention.self.query).
  std::string tail = parent;
  std::transform(tail.begin(), tail.end(), tail.begin(), [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  for (int level = 0; level < 2 && !tail.empty(); ++level) {
    const auto dot = tail.rfind('.');
    const std::string name = tail.substr(dot == std::string::npos ? 0 : dot + 1);
    if (name.find("cross") != std::string::npos || name == "encoder_attn") return -1;
    tail = dot == std::string::npos ? "" : tail.substr(0, dot);
  }
  for (size_t s = 0; s < kSiblingSets.size(); ++s)
    if (std::find(kSiblingSets[s].begin(), kSiblingSets[s].end(), child) != kSiblingSets[s].end())
      return static_cast<int>(s);
  return -1;
}

std::vector<std::string> sibling_input_groups(const std::vector<LinearToPack>& layers,
                                              const PackModelOptions& options) {
  std::vector<std::string> keys(layers.size());
  for (size_t i = 0; i < layers.size(); ++i) {
    const auto& l = layers[i];
    if (!l.config.quantize_acts() || l.config.act != ActMode::kDynamic || l.weight.dim() != 2) continue;
    const auto dot = l.name.rfind('.');
    const std::string parent = dot == std::string::npos ? "" : l.name.substr(0, dot);
    const std::string child = dot == std::string::npos ? l.name : l.name.substr(dot + 1);
    const int s = sibling_set_of(parent, child);
    if (s >= 0) {
      const auto& set = kSiblingSets[s];
      std::string joined;
      for (const auto& c : set) joined += (joined.empty() ? "" : "/") + c;
      const torch::Device device = packing_device(l, options);
      // Everything the shared transform must agree on is in the key; the rest is left alone.
      keys[i] = parent + ":" + joined + ":" + std::to_string(l.weight.size(1)) + ":" + device.str() + ":" +
                l.config.to_json();
    }
  }
  std::vector<std::string> group(layers.size());
  for (const auto& members : indices_by_key(keys))
    if (members.size() > 1)
      for (size_t i : members) group[i] = keys[i];
  return group;
}

std::vector<PackedLayer> pack_linears(const std::vector<LinearToPack>& layers, const PackProgress& progress,
                                      const PackModelOptions& options) {
  check_all(layers);
  if (options.max_stack_bytes < 0)
    throw std::invalid_argument("pack_linears: max_stack_bytes must be >= 0, got " +
                                std::to_string(options.max_stack_bytes));

  std::vector<PackedLayer> out(layers.size());
  size_t done = 0;
  std::vector<bool> in_group(layers.size(), false);
  for (const auto& idx : input_groups(layers, options)) {
    auto packs = pack_input_group(layers, idx, options);
    for (size_t j = 0; j < idx.size(); ++j) {
      in_group[idx[j]] = true;
      out[idx[j]] = PackedLayer{layers[idx[j]].name, std::move(packs[j])};
      ++done;
      if (progress) progress(done, layers.size(), layers[idx[j]].name);
    }
  }
  for (const Group& g : group_layers(layers, options, in_group)) {
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
