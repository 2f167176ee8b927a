#pragma once
// duquant::Config: every knob of the DuQuant numerics (DESIGN.md §2).

#include <cstdint>
#include <string>

namespace duquant {

enum class RowRotation { kNone, kRestore };
enum class ActMode { kDynamic, kStatic, kStaticChannel };

struct Config {
  int64_t wbits = 4;         // 2..8; 0 or 16 = weights kept in float (transformed)
  int64_t abits = 8;         // 2..8; 0 or 16 = no activation quantization (weight-only)
  int64_t block_size = 16;   // input rotation block B
  int64_t block_out = 0;     // output rotation block Bo; 0 = same as block_size
  bool permute = true;       // energy-interleaving permutation of input channels
  double ls = 0.15;          // energy smoothing; does not change the order (kept for compatibility)
  RowRotation row_rot = RowRotation::kRestore;
  ActMode act = ActMode::kDynamic;
  double act_pct = 99.9;     // percentile for static scales, in (0, 100]
  int64_t calib_steps = 32;  // batches observed before static scales are final

  // Throws std::invalid_argument naming the field, its value and what is allowed.
  void validate() const;

  bool quantize_weights() const { return wbits >= 2 && wbits <= 8; }
  bool quantize_acts() const { return abits >= 2 && abits <= 8; }
  bool needs_calibration() const { return quantize_acts() && act != ActMode::kDynamic; }
  int64_t effective_block_out() const { return block_out > 0 ? block_out : block_size; }

  std::string to_json() const;
  // Unknown keys and wrong types are errors, so a typo never silently falls back to a default.
  static Config from_json(const std::string& json);
  // Human-readable one-liner, e.g. "W4A8 dynamic, B=16, Bo=16, permute, restore".
  std::string describe() const;

  bool operator==(const Config& other) const;
  bool operator!=(const Config& other) const { return !(*this == other); }
};

const char* to_string(RowRotation r);
const char* to_string(ActMode a);
RowRotation row_rotation_from_string(const std::string& s);  // throws on unknown, explains "propagate"
ActMode act_mode_from_string(const std::string& s);          // throws on unknown

}  // namespace duquant
