#pragma once
// Which tensors of a checkpoint duquant-pack quantizes, and with which settings. A layer is a 2-D
// "<name>.weight" tensor; "<name>.bias" goes with it when present. Names are matched like
// duquant_ext.quantize_ matches module names, with the same default patterns.

#include <optional>
#include <regex>
#include <string>
#include <utility>
#include <vector>

#include "checkpoint.h"
#include "duquant/config.h"

namespace duquant::tools {

// Kept equal to python/duquant_ext/quantize.py's DEFAULT_INCLUDE / DEFAULT_EXCLUDE (a test checks).
extern const char* const kDefaultInclude;
extern const char* const kDefaultExclude;

struct WbitsOverride {
  std::string pattern;  // an exact layer name, or a regular expression searched in the name
  std::regex regex;
  int64_t wbits;
};

struct SelectionRules {
  std::string include = kDefaultInclude;  // searched in the layer name; "" selects every layer
  std::string exclude = kDefaultExclude;  // searched in the layer name; "" excludes nothing
  std::string scope;                      // only layers at or under this dotted prefix; "" = all
  std::vector<WbitsOverride> wbits_for;   // later entries win
};

// Parses "PATTERN:BITS" (split at the last ':'); throws UsageError naming the flag value.
WbitsOverride parse_wbits_override(const std::string& spec);
// Compiles a user regex; throws UsageError naming `flag` when it is invalid.
std::regex compile_pattern(const std::string& pattern, const std::string& flag);

struct SelectedLayer {
  std::string name;                  // the layer: "<name>.weight" is its weight
  std::string weight_tensor;
  std::optional<std::string> bias_tensor;
  Config config;                     // the global config with this layer's --wbits-for applied
};

// The layers to quantize, sorted by name. Throws std::runtime_error naming the tensor when a
// selected weight is not F32/F16/BF16/F64, and UsageError when a --wbits-for pattern matches no
// selected layer (a typo there would otherwise do nothing) or gives an invalid bit width.
std::vector<SelectedLayer> select_layers(const Checkpoint& checkpoint, const SelectionRules& rules,
                                         const Config& global);

}  // namespace duquant::tools
