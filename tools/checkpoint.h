#pragma once
// A checkpoint to quantize, read-only: one .safetensors file, or a sharded checkpoint given by its
// "*.index.json" (a "weight_map" from tensor name to shard file, relative to the index's folder).
// Every file is validated on open; tensors are handed out as CPU tensors that view the mapped
// files without copying (a copy only where a tensor's data is misaligned for its dtype).

#include <map>
#include <memory>
#include <string>
#include <vector>

#include <torch/torch.h>

#include "duquant/io/safetensors.h"

namespace duquant::tools {

class Checkpoint {
 public:
  // Throws std::runtime_error naming the file (and the tensor or index entry) on anything malformed:
  // unreadable files, invalid safetensors, an index that is not JSON or lacks "weight_map", a shard
  // that is missing, a tensor the index maps to a shard that does not hold it, or a shard tensor
  // that the index does not list.
  static Checkpoint open(const std::string& path);

  // Tensor names, sorted.
  const std::vector<std::string>& names() const { return names_; }
  bool contains(const std::string& name) const { return entries_.count(name) != 0; }
  // Dtype, shape and byte size from the header; throws naming the tensor if absent.
  const io::TensorView& info(const std::string& name) const;
  // The file that holds `name`.
  const std::string& file_of(const std::string& name) const;
  // A CPU tensor of `name`, viewing the mapping: valid while this Checkpoint lives, never to be
  // written to. Throws for dtypes LibTorch lacks (U16/U32/U64/F8 on LibTorch 1.13).
  torch::Tensor tensor(const std::string& name) const;
  // Every file the checkpoint was read from (the index first for a sharded checkpoint).
  const std::vector<std::string>& files() const { return files_; }

 private:
  struct Entry {
    const io::SafetensorsFile* file;
    const io::TensorView* view;
  };
  std::vector<std::shared_ptr<io::SafetensorsFile>> shards_;
  std::map<std::string, Entry> entries_;
  std::vector<std::string> names_;
  std::vector<std::string> files_;
};

}  // namespace duquant::tools
