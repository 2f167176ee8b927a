#include "duquant/io/pack_file.h"

#include <cstdio>
#include <nlohmann/json.hpp>
#include <set>
#include <stdexcept>

#include "duquant/io/safetensors.h"
#include "duquant/io/safetensors_torch.h"

namespace duquant {
namespace {

// ordered_json keeps the layers in the order they were written.
using ojson = nlohmann::ordered_json;

constexpr const char* kFormatKey = "format";
constexpr const char* kFormatName = "duquant";
constexpr const char* kVersionKey = "format_version";
constexpr const char* kDuquantKey = "duquant";


// Whether a layer with this config (and bias or not) stores `field`; mirrors LayerPack::validate.
bool field_used(const std::string& field, const Config& c, bool has_bias) {
  if (field == "qweight" || field == "r_in") return true;
  if (field == "w_scale") return c.quantize_weights();
  if (field == "perm") return c.permute;
  if (field == "r_out") return c.row_rot == RowRotation::kRestore;
  if (field == "bias") return has_bias;
  return c.needs_calibration();  // act_scale, calib_state
}

std::string in_quotes(const std::string& s) { return "'" + s + "'"; }

std::string format_double(double v) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.10g", v);
  return buf;
}

// nlohmann keeps one of two duplicate keys silently; in a pack that would hide a layer entry.
ojson parse_json_rejecting_duplicates(const std::string& text, const std::string& what_for_errors) {
  std::vector<std::set<std::string>> open_objects;
  std::string duplicate;
  auto on_event = [&](int, ojson::parse_event_t event, ojson& parsed) -> bool {
    if (event == ojson::parse_event_t::object_start) open_objects.emplace_back();
    else if (event == ojson::parse_event_t::object_end && !open_objects.empty()) open_objects.pop_back();
    else if (event == ojson::parse_event_t::key && !open_objects.empty() && duplicate.empty()) {
      const auto& key = parsed.get_ref<const std::string&>();
      if (!open_objects.back().insert(key).second) duplicate = key;
    }
    return true;
  };
  ojson j;
  try {
    j = ojson::parse(text, on_event);
  } catch (const ojson::exception& e) {
    throw std::invalid_argument(what_for_errors + " is not valid JSON: " + e.what());
  }
  if (!duplicate.empty()) throw std::invalid_argument(what_for_errors + " has the key " + in_quotes(duplicate) + " twice");
  return j;
}

Config config_from_json_object(const ojson& j, const std::string& where) {
  if (!j.is_object()) throw std::invalid_argument(where + ": config must be a JSON object, got " + j.dump());
  try {
    return Config::from_json(j.dump());
  } catch (const std::invalid_argument& e) {
    throw std::invalid_argument(where + ": " + e.what());
  }
}

int64_t positive_integer(const ojson& entry, const char* key, const std::string& where) {
  const ojson& v = entry.at(key);
  if (!v.is_number_integer() || v.get<int64_t>() < 1)
    throw std::invalid_argument(where + ": '" + key + "' must be a positive integer, got " + v.dump());
  return v.get<int64_t>();
}

int parse_format_version(const std::string& text, const std::string& path) {
  const bool digits = !text.empty() && text.size() <= 9 && text.find_first_not_of("0123456789") == std::string::npos;
  if (!digits)
    throw std::invalid_argument(path + ": __metadata__ format_version is " + in_quotes(text) +
                                ", expected a positive integer such as \"" + std::to_string(kPackFormatVersion) + "\"");
  const int version = std::stoi(text);
  if (version < 1 || version > kPackFormatVersion)
    throw std::invalid_argument(path + ": pack format_version " + text + " is not supported; this duquant reads 1.." +
                                std::to_string(kPackFormatVersion) +
                                (version > kPackFormatVersion ? " (the file was written by a newer duquant)" : ""));
  return version;
}

// A LayerPack with a layer entry's sizes and config and no tensors yet.
LayerPack pack_for(const PackFile::LayerInfo& info) {
  LayerPack p;
  p.config = info.config;
  p.in_features = info.in_features;
  p.out_features = info.out_features;
  return p;
}

}  // namespace

// ---------------------------------------------------------------- writing

void write_pack(const std::string& path, const std::vector<PackedLayer>& layers, const Config& global_config,
                const std::vector<std::pair<std::string, torch::Tensor>>& extra,
                const std::map<std::string, std::string>& extra_metadata) {
  const std::string cannot = path + ": cannot write pack: ";
  try {
    global_config.validate();
  } catch (const std::invalid_argument& e) {
    throw std::invalid_argument(cannot + "global config: " + e.what());
  }
  for (const char* reserved : {kFormatKey, kVersionKey, kDuquantKey})
    if (extra_metadata.count(reserved))
      throw std::invalid_argument(cannot + "extra metadata may not set " + in_quotes(reserved) +
                                  "; duquant writes that entry itself");

  std::map<std::string, std::string> owner_of;  // tensor name -> who claimed it, for clash messages
  auto claim = [&](const std::string& tensor, const std::string& who) {
    const auto [it, inserted] = owner_of.emplace(tensor, who);
    if (!inserted)
      throw std::invalid_argument(cannot + "tensor name " + in_quotes(tensor) + " of " + who + " clashes with " +
                                  it->second);
  };
  std::vector<io::TorchTensorToWrite> prepared;
  ojson layers_json = ojson::object();
  for (const auto& layer : layers) {
    if (layer.name.empty()) throw std::invalid_argument(cannot + "a layer has an empty name");
    if (layers_json.contains(layer.name))
      throw std::invalid_argument(cannot + "layer " + in_quotes(layer.name) + " appears twice");
    layer.pack.validate(path + ": layer " + in_quotes(layer.name));
    for (const auto& field : kLayerTensorFields) {
      const std::string tensor_name = layer.name + "." + field.name;
      claim(tensor_name, "layer " + in_quotes(layer.name));
      const torch::Tensor& t = layer.pack.*field.member;
      if (t.defined()) prepared.push_back(io::prepare_for_write(tensor_name, t));
    }
    layers_json[layer.name] = ojson{{"in_features", layer.pack.in_features},
                                    {"out_features", layer.pack.out_features},
                                    {"bias", layer.pack.bias.defined()},
                                    {"config", ojson::parse(layer.pack.config.to_json())}};
  }
  for (const auto& [name, tensor] : extra) {
    if (name.empty()) throw std::invalid_argument(cannot + "an extra tensor has an empty name");
    if (!tensor.defined()) throw std::invalid_argument(cannot + "extra tensor " + in_quotes(name) + " is undefined");
    claim(name, "an extra tensor");
    prepared.push_back(io::prepare_for_write(name, tensor));
  }

  std::map<std::string, std::string> metadata = extra_metadata;
  metadata[kFormatKey] = kFormatName;
  metadata[kVersionKey] = std::to_string(kPackFormatVersion);
  metadata[kDuquantKey] = ojson{{"config", ojson::parse(global_config.to_json())}, {"layers", layers_json}}.dump();

  std::vector<io::TensorToWrite> views;
  views.reserve(prepared.size());
  for (const auto& p : prepared) views.push_back(p.view);
  io::write_safetensors(path, views, metadata);
}

// ---------------------------------------------------------------- reading

PackFile PackFile::open(const std::string& path) {
  PackFile pack;
  pack.path_ = path;
  pack.file_ = std::make_shared<const io::SafetensorsFile>(io::SafetensorsFile::open(path));
  const io::SafetensorsFile& file = *pack.file_;
  pack.metadata_ = file.metadata();
  const auto& md = pack.metadata_;

  const auto format = md.find(kFormatKey);
  if (format == md.end())
    throw std::invalid_argument(path + ": not a duquant pack: __metadata__ has no 'format' entry (expected \"" +
                                kFormatName + "\"); a float checkpoint is packed with duquant-pack first");
  if (format->second != kFormatName)
    throw std::invalid_argument(path + ": not a duquant pack: __metadata__ format is " + in_quotes(format->second) +
                                ", expected \"" + kFormatName + "\"");
  const auto version = md.find(kVersionKey);
  if (version == md.end()) throw std::invalid_argument(path + ": __metadata__ has no 'format_version' entry");
  pack.format_version_ = parse_format_version(version->second, path);

  const auto body = md.find(kDuquantKey);
  if (body == md.end()) throw std::invalid_argument(path + ": __metadata__ has no 'duquant' entry (the layer table)");
  const ojson root = parse_json_rejecting_duplicates(body->second, path + ": __metadata__ 'duquant'");
  if (!root.is_object() || !root.contains("config") || !root.contains("layers") || root.size() != 2)
    throw std::invalid_argument(path + ": __metadata__ 'duquant' must be an object with exactly the keys "
                                "'config' and 'layers'");
  pack.config_ = config_from_json_object(root.at("config"), path + ": global config");
  const ojson& layers = root.at("layers");
  if (!layers.is_object())
    throw std::invalid_argument(path + ": __metadata__ 'duquant' layers must be an object of layer entries");

  std::set<std::string> claimed;
  for (const auto& item : layers.items()) {
    const std::string& name = item.key();
    const ojson& entry = item.value();
    const std::string where = pack.where(name);
    if (name.empty()) throw std::invalid_argument(path + ": a layer entry has an empty name");
    if (!entry.is_object()) throw std::invalid_argument(where + ": metadata entry must be a JSON object");
    for (const auto& field : entry.items()) {
      const std::string& key = field.key();
      if (key != "in_features" && key != "out_features" && key != "bias" && key != "config")
        throw std::invalid_argument(where + ": unknown metadata key " + in_quotes(key) +
                                    "; expected in_features, out_features, bias, config");
    }
    for (const char* required : {"in_features", "out_features", "bias", "config"})
      if (!entry.contains(required)) throw std::invalid_argument(where + ": metadata has no '" + required + "'");
    if (!entry.at("bias").is_boolean())
      throw std::invalid_argument(where + ": 'bias' must be true or false, got " + entry.at("bias").dump());
    LayerInfo info{name, positive_integer(entry, "in_features", where), positive_integer(entry, "out_features", where),
                   entry.at("bias").get<bool>(), config_from_json_object(entry.at("config"), where)};

    // Presence, then dtype and shape through LayerPack::validate on data-less meta tensors.
    LayerPack shapes = pack_for(info);
    for (const auto& field : kLayerTensorFields) {
      const std::string tensor_name = name + "." + field.name;
      claimed.insert(tensor_name);
      const bool used = field_used(field.name, info.config, info.has_bias);
      const bool present = file.contains(tensor_name);
      if (used && !present)
        throw std::invalid_argument(where + ": tensor " + in_quotes(tensor_name) + " is missing; the layer's " +
                                    (std::string(field.name) == "bias" ? std::string("metadata says bias=true")
                                                                       : "config (" + info.config.describe() +
                                                                             ") needs it"));
      if (!used && present)
        throw std::invalid_argument(where + ": tensor " + in_quotes(tensor_name) + " should not be there; the layer's " +
                                    (std::string(field.name) == "bias" ? std::string("metadata says bias=false")
                                                                       : "config (" + info.config.describe() +
                                                                             ") has no use for it"));
      if (present) shapes.*field.member = io::meta_like(file.tensor(tensor_name), path);
    }
    shapes.validate(where);
    pack.layer_index_.emplace(name, pack.layers_.size());
    pack.layers_.push_back(std::move(info));
  }
  for (const auto& view : file.tensors())
    if (!claimed.count(view.name)) pack.extra_tensor_names_.push_back(view.name);
  return pack;
}

std::string PackFile::where(const std::string& layer) const { return path_ + ": layer " + in_quotes(layer); }

std::vector<std::string> PackFile::layer_names() const {
  std::vector<std::string> out;
  out.reserve(layers_.size());
  for (const auto& l : layers_) out.push_back(l.name);
  return out;
}

const PackFile::LayerInfo& PackFile::layer(const std::string& name) const {
  const auto it = layer_index_.find(name);
  if (it == layer_index_.end())
    throw std::invalid_argument(path_ + ": no layer " + in_quotes(name) + " in the pack (it has " +
                                std::to_string(layers_.size()) + " layers)");
  return layers_[it->second];
}

std::vector<std::string> PackFile::tensor_names() const { return file_->names(); }

torch::Tensor PackFile::tensor(const std::string& name) const { return io::copy_to_torch(file_->tensor(name), path_); }

int64_t PackFile::tensor_bytes(const std::string& name) const {
  return file_->contains(name) ? static_cast<int64_t>(file_->tensor(name).nbytes) : 0;
}

LayerPack PackFile::load_layer(const std::string& name, const torch::Device& device) const {
  LayerPack p = pack_for(layer(name));
  // open() checked that exactly the used tensors are present, with the right dtypes and shapes.
  for (const auto& field : kLayerTensorFields) {
    const std::string tensor_name = name + "." + field.name;
    if (file_->contains(tensor_name)) p.*field.member = tensor(tensor_name).to(device);
  }
  p.validate(where(name));
  return p;
}

std::vector<std::string> PackFile::mismatches(const std::string& name, int64_t in_features, int64_t out_features,
                                              bool has_bias, const c10::optional<Config>& requested) const {
  const LayerInfo& info = layer(name);
  std::vector<std::string> out;
  if (info.in_features != in_features)
    out.push_back("in_features is " + std::to_string(info.in_features) + " in the pack, the model's layer has " +
                  std::to_string(in_features));
  if (info.out_features != out_features)
    out.push_back("out_features is " + std::to_string(info.out_features) + " in the pack, the model's layer has " +
                  std::to_string(out_features));
  if (info.has_bias != has_bias)
    out.push_back(info.has_bias ? "bias: the pack has one, the model's layer has none"
                                : "bias: the pack has none, the model's layer has one");
  if (!requested) return out;

  const Config& have = info.config;
  const Config& want = *requested;
  auto differ = [&](const char* field, const std::string& in_pack, const std::string& asked) {
    if (in_pack != asked) out.push_back(std::string(field) + " is " + in_pack + " in the pack, " + asked + " requested");
  };
  // 0 and 16 bits both mean "not quantized": compare the meaning, report the values.
  if (have.quantize_weights() != want.quantize_weights() || (have.quantize_weights() && have.wbits != want.wbits))
    differ("wbits", std::to_string(have.wbits), std::to_string(want.wbits));
  if (have.quantize_acts() != want.quantize_acts() || (have.quantize_acts() && have.abits != want.abits))
    differ("abits", std::to_string(have.abits), std::to_string(want.abits));
  differ("block_size", std::to_string(have.block_size), std::to_string(want.block_size));
  differ("block_out", std::to_string(have.effective_block_out()), std::to_string(want.effective_block_out()));
  differ("permute", have.permute ? "true" : "false", want.permute ? "true" : "false");
  differ("row_rot", to_string(have.row_rot), to_string(want.row_rot));
  differ("act", to_string(have.act), to_string(want.act));
  if (have.needs_calibration() || want.needs_calibration()) {
    differ("act_pct", format_double(have.act_pct), format_double(want.act_pct));
    differ("calib_steps", std::to_string(have.calib_steps), std::to_string(want.calib_steps));
  }
  return out;
}

LayerPack PackFile::load_layer_checked(const std::string& name, int64_t in_features, int64_t out_features,
                                       bool has_bias, const c10::optional<Config>& requested,
                                       const torch::Device& device) const {
  const auto diffs = mismatches(name, in_features, out_features, has_bias, requested);
  if (!diffs.empty()) {
    std::string message = where(name) + ": ";
    for (size_t i = 0; i < diffs.size(); ++i) message += (i ? "; " : "") + diffs[i];
    throw std::invalid_argument(message);
  }
  return load_layer(name, device);
}

}  // namespace duquant
