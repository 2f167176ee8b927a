#include "duquant/io/safetensors_torch.h"

#include <cstring>

namespace duquant::io {
namespace {

// safetensors stores little-endian data and we copy bytes verbatim.
static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "duquant's safetensors I/O assumes a little-endian host");

struct DTypePair {
  DType file;
  torch::ScalarType torch;
};

// Only the dtypes every supported LibTorch (1.13 and later) has.
const DTypePair kPairs[] = {
    {DType::BOOL, torch::kBool}, {DType::U8, torch::kUInt8},   {DType::I8, torch::kInt8},
    {DType::I16, torch::kInt16}, {DType::F16, torch::kFloat16}, {DType::BF16, torch::kBFloat16},
    {DType::I32, torch::kInt32}, {DType::F32, torch::kFloat32}, {DType::F64, torch::kFloat64},
    {DType::I64, torch::kInt64},
};

}  // namespace

torch::ScalarType torch_dtype(DType dtype, const std::string& where) {
  for (const auto& p : kPairs)
    if (p.file == dtype) return p.torch;
  throw SafetensorsError(where + ": dtype " + dtype_name(dtype) + " has no torch equivalent in this LibTorch build");
}

DType safetensors_dtype(torch::ScalarType dtype, const std::string& where) {
  for (const auto& p : kPairs)
    if (p.torch == dtype) return p.file;
  throw SafetensorsError(where + ": torch dtype " + std::string(c10::toString(dtype)) +
                         " cannot be stored in safetensors; expected bool, (u)int8, int16/32/64, float16/32/64 "
                         "or bfloat16");
}

torch::Tensor copy_to_torch(const TensorView& view, const std::string& label) {
  auto out = torch::empty(view.shape, torch::TensorOptions().dtype(torch_dtype(view.dtype, label + ": tensor '" + view.name + "'")));
  // The size was checked by the reader (numel * dtype size == span); memcpy has no alignment needs.
  TORCH_CHECK(static_cast<size_t>(out.nbytes()) == view.nbytes, label, ": tensor '", view.name, "' byte size mismatch");
  if (view.nbytes > 0) std::memcpy(out.data_ptr(), view.data, view.nbytes);
  return out;
}

torch::Tensor meta_like(const TensorView& view, const std::string& label) {
  return torch::empty(view.shape, torch::TensorOptions()
                                      .dtype(torch_dtype(view.dtype, label + ": tensor '" + view.name + "'"))
                                      .device(torch::kMeta));
}

TorchTensorToWrite prepare_for_write(const std::string& name, const torch::Tensor& tensor) {
  if (!tensor.defined()) throw SafetensorsError("tensor '" + name + "' is undefined; expected a tensor to write");
  TorchTensorToWrite out;
  out.storage = tensor.detach().to(torch::kCPU).contiguous();
  std::vector<int64_t> shape(out.storage.sizes().begin(), out.storage.sizes().end());
  out.view = TensorToWrite{name, safetensors_dtype(out.storage.scalar_type(), "tensor '" + name + "'"), std::move(shape),
                           out.storage.data_ptr(), static_cast<size_t>(out.storage.nbytes())};
  return out;
}

std::map<std::string, torch::Tensor> read_safetensors(const std::string& path) {
  const auto file = SafetensorsFile::open(path);
  std::map<std::string, torch::Tensor> out;
  for (const auto& view : file.tensors()) out.emplace(view.name, copy_to_torch(view, path));
  return out;
}

}  // namespace duquant::io
