#include "layer_selection.h"

#include <stdexcept>

#include "console.h"

namespace duquant::tools {

const char* const kDefaultInclude =
    R"((?:^|\.)(?:q_proj|k_proj|v_proj|o_proj|out_proj|fc1|fc2|gate_proj|up_proj|down_proj)(?:\.|$))";
const char* const kDefaultExclude = R"((?:^|\.)(?:norm|ln|layernorm|emb)(?:\.|$))";

namespace {

const std::string kWeightSuffix = ".weight";

bool in_scope(const std::string& name, const std::string& scope) {
  if (scope.empty()) return true;
  if (scope.back() == '.') return name.compare(0, scope.size(), scope) == 0;
  return name == scope || name.compare(0, scope.size() + 1, scope + ".") == 0;
}

bool is_float_dtype(io::DType d) {
  return d == io::DType::F32 || d == io::DType::F16 || d == io::DType::BF16 || d == io::DType::F64;
}

}  // namespace

std::regex compile_pattern(const std::string& pattern, const std::string& flag) {
  try {
    return std::regex(pattern, std::regex::ECMAScript);
  } catch (const std::regex_error& e) {
    throw UsageError(flag + " '" + pattern + "' is not a valid regular expression (" + e.what() + ")");
  }
}

WbitsOverride parse_wbits_override(const std::string& spec) {
  const auto colon = spec.rfind(':');
  if (colon == std::string::npos || colon == 0 || colon + 1 == spec.size())
    throw UsageError("--wbits-for '" + spec + "': expected PATTERN:BITS, e.g. 'down_proj:8'");
  const std::string pattern = spec.substr(0, colon), bits_text = spec.substr(colon + 1);
  int64_t bits = 0;
  try {
    size_t used = 0;
    bits = std::stoll(bits_text, &used);
    if (used != bits_text.size()) throw std::invalid_argument("trailing characters");
  } catch (const std::exception&) {
    throw UsageError("--wbits-for '" + spec + "': BITS '" + bits_text + "' is not an integer");
  }
  Config probe;
  probe.wbits = bits;
  try {
    probe.validate();
  } catch (const std::invalid_argument& e) {
    throw UsageError("--wbits-for '" + spec + "': " + e.what());
  }
  return WbitsOverride{pattern, compile_pattern(pattern, "--wbits-for"), bits};
}

std::vector<SelectedLayer> select_layers(const Checkpoint& checkpoint, const SelectionRules& rules,
                                         const Config& global) {
  const auto include = compile_pattern(rules.include, "--include");
  const auto exclude = compile_pattern(rules.exclude, "--exclude");
  std::vector<bool> override_used(rules.wbits_for.size(), false);
  std::vector<SelectedLayer> selected;
  for (const auto& tensor_name : checkpoint.names()) {
    if (tensor_name.size() <= kWeightSuffix.size() ||
        tensor_name.compare(tensor_name.size() - kWeightSuffix.size(), kWeightSuffix.size(), kWeightSuffix) != 0)
      continue;
    const auto& info = checkpoint.info(tensor_name);
    if (info.shape.size() != 2) continue;  // norms (1-D) and convolutions are not linear layers
    const std::string name = tensor_name.substr(0, tensor_name.size() - kWeightSuffix.size());
    if (!in_scope(name, rules.scope)) continue;
    if (!std::regex_search(name, include)) continue;
    if (!rules.exclude.empty() && std::regex_search(name, exclude)) continue;
    if (!is_float_dtype(info.dtype))
      throw std::runtime_error(checkpoint.file_of(tensor_name) + ": tensor '" + tensor_name + "' is selected but is " +
                               io::dtype_name(info.dtype) + "; expected F32, F16, BF16 or F64 (exclude it with "
                               "--exclude or narrow --include)");
    SelectedLayer layer{name, tensor_name, std::nullopt, global};
    if (checkpoint.contains(name + ".bias")) layer.bias_tensor = name + ".bias";
    for (size_t i = 0; i < rules.wbits_for.size(); ++i) {
      const auto& o = rules.wbits_for[i];
      if (name == o.pattern || std::regex_search(name, o.regex)) {
        layer.config.wbits = o.wbits;
        override_used[i] = true;
      }
    }
    try {
      layer.config.validate();
    } catch (const std::invalid_argument& e) {
      throw UsageError("layer '" + name + "' with its --wbits-for: " + e.what());
    }
    selected.push_back(std::move(layer));
  }
  for (size_t i = 0; i < rules.wbits_for.size(); ++i) {
    if (!override_used[i])
      throw UsageError("--wbits-for '" + rules.wbits_for[i].pattern + ":" + std::to_string(rules.wbits_for[i].wbits) +
                       "' matches no selected layer");
  }
  return selected;
}

}  // namespace duquant::tools
