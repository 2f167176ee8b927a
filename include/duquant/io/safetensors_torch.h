#pragma once
// Bridges the torch-free safetensors reader/writer (io/safetensors.h) and torch::Tensor.

#include <torch/torch.h>

#include <map>
#include <string>
#include <vector>

#include "duquant/io/safetensors.h"

namespace duquant::io {

// The torch dtype of a safetensors dtype. Throws SafetensorsError naming `where` when this
// LibTorch has no equivalent (U16/U32/U64/F8 on LibTorch 1.13).
torch::ScalarType torch_dtype(DType dtype, const std::string& where);
// The safetensors dtype of a torch dtype; throws SafetensorsError naming `where` for dtypes
// safetensors cannot store (complex, quantized).
DType safetensors_dtype(torch::ScalarType dtype, const std::string& where);

// A CPU copy of the tensor's bytes (safe for any alignment of the view's data). `label` is the
// file the view came from, used in error messages.
torch::Tensor copy_to_torch(const TensorView& view, const std::string& label);
// A meta-device tensor with the view's dtype and shape and no data: lets shape/dtype checks that
// take tensors (LayerPack::validate) run on a file's header without reading or copying data.
torch::Tensor meta_like(const TensorView& view, const std::string& label);

// A tensor prepared for write_safetensors: a contiguous CPU copy kept alive by `storage`.
struct TorchTensorToWrite {
  torch::Tensor storage;
  TensorToWrite view;
};
TorchTensorToWrite prepare_for_write(const std::string& name, const torch::Tensor& tensor);

// Every tensor of a safetensors file, copied to CPU torch tensors (name -> tensor).
std::map<std::string, torch::Tensor> read_safetensors(const std::string& path);

}  // namespace duquant::io
