#include "duquant/config.h"

#include <cmath>
#include <sstream>
#include <stdexcept>

#include <nlohmann/json.hpp>

namespace duquant {
namespace {

[[noreturn]] void bad_field(const std::string& field, const std::string& value, const std::string& allowed) {
  throw std::invalid_argument("duquant Config: " + field + "=" + value + " is not allowed; expected " + allowed);
}

bool valid_bits(int64_t b) { return b == 0 || b == 16 || (b >= 2 && b <= 8); }

}  // namespace

const char* to_string(RowRotation r) { return r == RowRotation::kRestore ? "restore" : "none"; }

const char* to_string(ActMode a) {
  switch (a) {
    case ActMode::kDynamic: return "dynamic";
    case ActMode::kStatic: return "static";
    case ActMode::kStaticChannel: return "static_channel";
  }
  return "?";
}

RowRotation row_rotation_from_string(const std::string& s) {
  if (s == "restore") return RowRotation::kRestore;
  if (s == "none") return RowRotation::kNone;
  if (s == "propagate")
    throw std::invalid_argument(
        "duquant Config: row_rot=propagate is refused: the prototype rotated the output rows and relied on the next "
        "layer to undo it, which no layer does, so outputs were wrong; use row_rot=restore (exact) or none");
  bad_field("row_rot", s, "one of restore|none");
}

ActMode act_mode_from_string(const std::string& s) {
  if (s == "dynamic") return ActMode::kDynamic;
  if (s == "static") return ActMode::kStatic;
  if (s == "static_channel") return ActMode::kStaticChannel;
  bad_field("act", s, "one of dynamic|static|static_channel");
}

void Config::validate() const {
  if (!valid_bits(wbits)) bad_field("wbits", std::to_string(wbits), "2..8, or 0/16 for unquantized weights");
  if (!valid_bits(abits)) bad_field("abits", std::to_string(abits), "2..8, or 0/16 for weight-only quantization");
  if (block_size < 1 || block_size > 1024) bad_field("block_size", std::to_string(block_size), "1..1024");
  if (block_out < 0 || block_out > 1024) bad_field("block_out", std::to_string(block_out), "1..1024, or 0 for block_size");
  if (!(ls >= 0.0 && ls <= 1.0)) bad_field("ls", std::to_string(ls), "a number in [0, 1]");
  if (!(act_pct > 0.0 && act_pct <= 100.0)) bad_field("act_pct", std::to_string(act_pct), "a percentile in (0, 100]");
  if (calib_steps < 1) bad_field("calib_steps", std::to_string(calib_steps), "at least 1");
  if (act != ActMode::kDynamic && !quantize_acts())
    bad_field("act", to_string(act),
              "dynamic when abits=" + std::to_string(abits) + " (static scales need quantized activations)");
}

std::string Config::to_json() const {
  nlohmann::json j = {{"wbits", wbits},         {"abits", abits},     {"block_size", block_size},
                      {"block_out", block_out}, {"permute", permute}, {"ls", ls},
                      {"row_rot", to_string(row_rot)}, {"act", to_string(act)}, {"act_pct", act_pct},
                      {"calib_steps", calib_steps}};
  return j.dump();
}

Config Config::from_json(const std::string& text) {
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(text);
  } catch (const nlohmann::json::exception& e) {
    throw std::invalid_argument(std::string("duquant Config: not valid JSON: ") + e.what());
  }
  if (!j.is_object()) throw std::invalid_argument("duquant Config: JSON must be an object, got " + j.dump());
  Config c;
  for (auto it = j.begin(); it != j.end(); ++it) {
    const std::string& key = it.key();
    const nlohmann::json& v = it.value();
    auto want = [&](bool ok, const char* type) {
      if (!ok) bad_field(key, v.dump(), type);
    };
    if (key == "wbits") { want(v.is_number_integer(), "an integer"); c.wbits = v.get<int64_t>(); }
    else if (key == "abits") { want(v.is_number_integer(), "an integer"); c.abits = v.get<int64_t>(); }
    else if (key == "block_size") { want(v.is_number_integer(), "an integer"); c.block_size = v.get<int64_t>(); }
    else if (key == "block_out") { want(v.is_number_integer(), "an integer"); c.block_out = v.get<int64_t>(); }
    else if (key == "calib_steps") { want(v.is_number_integer(), "an integer"); c.calib_steps = v.get<int64_t>(); }
    else if (key == "permute") { want(v.is_boolean(), "true or false"); c.permute = v.get<bool>(); }
    else if (key == "ls") { want(v.is_number(), "a number"); c.ls = v.get<double>(); }
    else if (key == "act_pct") { want(v.is_number(), "a number"); c.act_pct = v.get<double>(); }
    else if (key == "row_rot") { want(v.is_string(), "a string"); c.row_rot = row_rotation_from_string(v.get<std::string>()); }
    else if (key == "act") { want(v.is_string(), "a string"); c.act = act_mode_from_string(v.get<std::string>()); }
    else
      throw std::invalid_argument("duquant Config: unknown option '" + key +
                                  "'; known: wbits, abits, block_size, block_out, permute, ls, row_rot, act, "
                                  "act_pct, calib_steps");
  }
  c.validate();
  return c;
}

std::string Config::describe() const {
  std::ostringstream s;
  s << "W" << (quantize_weights() ? std::to_string(wbits) : "16") << "A" << (quantize_acts() ? std::to_string(abits) : "16");
  if (quantize_acts()) s << " " << to_string(act);
  s << ", B=" << block_size << ", Bo=" << effective_block_out() << (permute ? ", permute" : ", no permute")
    << ", row_rot=" << to_string(row_rot);
  if (needs_calibration()) s << ", act_pct=" << act_pct << ", calib_steps=" << calib_steps;
  return s.str();
}

bool Config::operator==(const Config& o) const {
  return wbits == o.wbits && abits == o.abits && block_size == o.block_size && block_out == o.block_out &&
         permute == o.permute && ls == o.ls && row_rot == o.row_rot && act == o.act && act_pct == o.act_pct &&
         calib_steps == o.calib_steps;
}

}  // namespace duquant
