#pragma once
// The pack file (DESIGN.md §4): quantized layers in one standard safetensors file.
//
// Per layer <name>: <name>.qweight, .w_scale, .perm, .r_in, .r_out, .bias, .act_scale, .calib_state
// (those the layer's config uses), plus any `extra` tensors under their own names. __metadata__:
//   format         = "duquant"
//   format_version = "1"
//   duquant        = JSON {"config": <global Config>, "layers": {<name>: {"in_features": K,
//                    "out_features": N, "bias": true|false, "config": <the layer's Config>}, ...}}
// plus caller-supplied entries. Layers keep the order they were written in.

#include <c10/util/Optional.h>
#include <torch/torch.h>

#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "duquant/config.h"
#include "duquant/layer_pack.h"

namespace duquant {

namespace io {
class SafetensorsFile;
}

constexpr int kPackFormatVersion = 1;

struct PackedLayer {
  std::string name;
  LayerPack pack;
};

// Writes the pack atomically (temp file, fsync, rename): on any error the target is untouched.
// Every pack is validate()d first; tensors are copied to CPU for writing. Throws
// std::invalid_argument (naming the file and the layer/tensor) for empty or duplicate layer
// names, an extra tensor whose name a layer owns (any "<layer>.<field>" name, used or not), or
// extra_metadata that tries to set "format", "format_version" or "duquant"; io::SafetensorsError
// for I/O failures and tensors safetensors cannot store.
void write_pack(const std::string& path, const std::vector<PackedLayer>& layers, const Config& global_config,
                const std::vector<std::pair<std::string, torch::Tensor>>& extra = {},
                const std::map<std::string, std::string>& extra_metadata = {});

// A validated, read-only pack file. open() checks the format, version and JSON metadata, and the
// dtype and shape of every layer tensor against its layer's size and config, from the header alone
// (no tensor data is read until a layer or tensor is asked for). Copyable: copies share the mapping.
class PackFile {
 public:
  // Throws std::invalid_argument starting with `path: ` for anything that is not a well-formed
  // duquant pack of a supported version, and io::SafetensorsError for a malformed safetensors file.
  static PackFile open(const std::string& path);

  const std::string& path() const { return path_; }
  int format_version() const { return format_version_; }
  const Config& config() const { return config_; }  // global config

  struct LayerInfo {
    std::string name;
    int64_t in_features;
    int64_t out_features;
    bool has_bias;
    Config config;
  };
  std::vector<std::string> layer_names() const;  // in file order
  bool has_layer(const std::string& name) const { return layer_index_.count(name) != 0; }
  const LayerInfo& layer(const std::string& name) const;  // throws std::invalid_argument naming the layer
  std::vector<std::string> extra_tensor_names() const { return extra_tensor_names_; }  // tensors of no layer
  std::vector<std::string> tensor_names() const;  // every tensor, in data order
  torch::Tensor tensor(const std::string& name) const;  // any tensor, copied to CPU
  // Bytes of a tensor in the file, or 0 when the file has no tensor of that name (no data is read).
  int64_t tensor_bytes(const std::string& name) const;
  const std::map<std::string, std::string>& metadata() const { return metadata_; }

  // The LayerPack (validate()d) for `name`, on `device`.
  LayerPack load_layer(const std::string& name, const torch::Device& device = torch::kCPU) const;
  // Same, after comparing the pack with what the caller expects; throws std::invalid_argument
  // naming the layer and every field that differs, e.g.
  //   "pack.safetensors: layer 'model.q_proj': wbits is 4 in the pack, 8 requested".
  // `requested` = nullopt accepts the pack's config. Config fields that cannot change the result
  // are not compared: ls (never changes the order), act_pct/calib_steps unless either side uses
  // static activation scales; wbits/abits 0 and 16 both mean "not quantized"; block_out is
  // compared after resolving 0 to block_size.
  LayerPack load_layer_checked(const std::string& name, int64_t in_features, int64_t out_features, bool has_bias,
                               const c10::optional<Config>& requested,
                               const torch::Device& device = torch::kCPU) const;
  // The differences load_layer_checked reports, one message per field; empty when it would load.
  std::vector<std::string> mismatches(const std::string& name, int64_t in_features, int64_t out_features,
                                      bool has_bias, const c10::optional<Config>& requested) const;

 private:
  PackFile() = default;
  std::string where(const std::string& layer) const;  // "<path>: layer '<layer>'"

  std::string path_;
  std::shared_ptr<const io::SafetensorsFile> file_;
  int format_version_ = 0;
  Config config_;
  std::vector<LayerInfo> layers_;
  std::map<std::string, size_t> layer_index_;
  std::vector<std::string> extra_tensor_names_;
  std::map<std::string, std::string> metadata_;
};

}  // namespace duquant
