#include "checkpoint.h"

#include <cstdint>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>
#include <stdexcept>

#include "duquant/io/safetensors_torch.h"

namespace duquant::tools {
namespace {

namespace fs = std::filesystem;

bool is_index_path(const std::string& path) {
  const std::string suffix = ".json";
  return path.size() >= suffix.size() && path.compare(path.size() - suffix.size(), suffix.size(), suffix) == 0;
}

nlohmann::json read_index(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error(path + ": cannot open the index file");
  std::stringstream buffer;
  buffer << in.rdbuf();
  try {
    return nlohmann::json::parse(buffer.str());
  } catch (const nlohmann::json::exception& e) {
    throw std::runtime_error(path + ": not valid JSON (" + e.what() + ")");
  }
}

}  // namespace

Checkpoint Checkpoint::open(const std::string& path) {
  Checkpoint ck;
  if (!is_index_path(path)) {
    ck.shards_.push_back(std::make_shared<io::SafetensorsFile>(io::SafetensorsFile::open(path)));
    ck.files_.push_back(path);
    for (const auto& view : ck.shards_[0]->tensors()) ck.entries_[view.name] = Entry{ck.shards_[0].get(), &view};
  } else {
    const auto index = read_index(path);
    if (!index.is_object() || !index.contains("weight_map") || !index["weight_map"].is_object())
      throw std::runtime_error(path + ": a sharded checkpoint index needs a \"weight_map\" object "
                                      "(tensor name -> shard file)");
    const auto& weight_map = index["weight_map"];
    if (weight_map.empty()) throw std::runtime_error(path + ": \"weight_map\" is empty");
    ck.files_.push_back(path);
    const fs::path folder = fs::path(path).parent_path();
    std::map<std::string, std::shared_ptr<io::SafetensorsFile>> by_shard;
    std::map<std::string, std::string> shard_of;
    for (const auto& [name, value] : weight_map.items()) {
      if (!value.is_string() || value.get<std::string>().empty())
        throw std::runtime_error(path + ": weight_map[\"" + name + "\"] must be a shard file name, got " +
                                 value.dump());
      const std::string shard = value.get<std::string>();
      if (fs::path(shard).is_absolute())
        throw std::runtime_error(path + ": weight_map[\"" + name + "\"] = \"" + shard +
                                 "\" must be relative to the index's folder");
      if (!by_shard.count(shard)) {
        const std::string shard_path = (folder / shard).string();
        if (!fs::exists(shard_path))
          throw std::runtime_error(path + ": shard \"" + shard + "\" (for tensor '" + name + "') does not exist at " +
                                   shard_path);
        by_shard[shard] = std::make_shared<io::SafetensorsFile>(io::SafetensorsFile::open(shard_path));
        ck.shards_.push_back(by_shard[shard]);
        ck.files_.push_back(shard_path);
      }
      shard_of[name] = shard;
      const auto& file = *by_shard[shard];
      if (!file.contains(name))
        throw std::runtime_error(path + ": weight_map puts tensor '" + name + "' in shard \"" + shard + "\" (" +
                                 file.label() + "), which does not hold it");
      ck.entries_[name] = Entry{&file, &file.tensor(name)};
    }
    // A shard tensor the index does not list would silently drop out of the output.
    for (const auto& [shard, file] : by_shard) {
      for (const auto& view : file->tensors()) {
        auto it = shard_of.find(view.name);
        if (it == shard_of.end() || it->second != shard)
          throw std::runtime_error(path + ": shard \"" + shard + "\" holds tensor '" + view.name +
                                   "', which weight_map " +
                                   (it == shard_of.end() ? std::string("does not list")
                                                         : "puts in shard \"" + it->second + "\""));
      }
    }
  }
  for (const auto& [name, entry] : ck.entries_) ck.names_.push_back(name);
  return ck;
}

const io::TensorView& Checkpoint::info(const std::string& name) const {
  auto it = entries_.find(name);
  if (it == entries_.end()) throw std::runtime_error(files_.front() + ": no tensor '" + name + "'");
  return *it->second.view;
}

const std::string& Checkpoint::file_of(const std::string& name) const {
  info(name);
  return entries_.at(name).file->label();
}

torch::Tensor Checkpoint::tensor(const std::string& name) const {
  const auto& view = info(name);
  const std::string& label = file_of(name);
  const auto dtype = io::torch_dtype(view.dtype, label + ": tensor '" + name + "'");
  const size_t element = io::dtype_size(view.dtype);
  if (reinterpret_cast<uintptr_t>(view.data) % element != 0) return io::copy_to_torch(view, label);
  // The mapping is read-only and outlives the tensor (it lives as long as this Checkpoint).
  return torch::from_blob(const_cast<uint8_t*>(view.data), view.shape, torch::TensorOptions().dtype(dtype));
}

}  // namespace duquant::tools
