// Safetensors reader and writer that validates every field of untrusted files.
//
// Format: 8-byte little-endian u64 N, N bytes of UTF-8 JSON header (may be
// padded with trailing spaces), then the raw little-endian data buffer. The
// header maps tensor names to {"dtype", "shape", "data_offsets"} and may hold an
// "__metadata__" object of string values. Offsets are relative to the data
// buffer, and the tensors must tile it exactly.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

namespace duquant::io {

enum class DType { BOOL, U8, I8, I16, U16, F16, BF16, I32, U32, F32, F64, I64, U64, F8_E4M3, F8_E5M2 };

// Bytes per element.
size_t dtype_size(DType dtype);
// Name as spelled in safetensors headers ("F32", "BF16", "F8_E4M3", ...).
const char* dtype_name(DType dtype);
// Inverse of dtype_name; nullopt for unknown (case-sensitive) names.
std::optional<DType> dtype_from_name(std::string_view name);

// Header limit shared with the reference implementation: anything larger is
// treated as hostile rather than parsed.
constexpr uint64_t kMaxHeaderBytes = 100'000'000;

// A tensor inside an open file. `data` points into the file's mapping and stays
// valid for the lifetime of the SafetensorsFile (moves keep it valid).
struct TensorView {
  std::string name;
  DType dtype;
  std::vector<int64_t> shape;  // [] is a scalar (one element)
  const uint8_t* data;
  size_t nbytes;
};

// Every message starts with the file path (or the label given to from_bytes,
// "<memory>" by default) followed by ": ", then names the tensor or field at
// fault and what was expected.
class SafetensorsError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// A validated, read-only safetensors file. Construction fully validates the
// header and layout, so every TensorView handed out is in bounds.
class SafetensorsFile {
 public:
  // Memory-maps `path` (PROT_READ, MAP_PRIVATE). Note: if another process
  // truncates the file while it is mapped, touching the data raises SIGBUS;
  // that cannot be validated away.
  static SafetensorsFile open(const std::string& path);
  // Parses an in-memory copy; `label` replaces the path in error messages.
  static SafetensorsFile from_bytes(std::vector<uint8_t> bytes, std::string label = "<memory>");

  SafetensorsFile(SafetensorsFile&& other) noexcept;
  SafetensorsFile& operator=(SafetensorsFile&& other) noexcept;
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;
  ~SafetensorsFile();

  // The path passed to open(), or the label passed to from_bytes().
  const std::string& label() const { return label_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  // Tensor names in data-offset order.
  std::vector<std::string> names() const;
  // All tensors in data-offset order.
  const std::vector<TensorView>& tensors() const { return tensors_; }
  size_t size() const { return tensors_.size(); }
  bool contains(const std::string& name) const;
  // Throws SafetensorsError naming the file and the missing tensor.
  const TensorView& tensor(const std::string& name) const;

 private:
  SafetensorsFile() = default;
  void parse();  // validates base_/file_size_ and fills the tables
  void release() noexcept;

  std::string label_;
  const uint8_t* base_ = nullptr;
  size_t file_size_ = 0;
  void* mapping_ = nullptr;  // non-null when backed by mmap
  size_t mapping_size_ = 0;
  std::vector<uint8_t> owned_;  // backing store for from_bytes
  std::map<std::string, std::string> metadata_;
  std::vector<TensorView> tensors_;           // sorted by data offset
  std::map<std::string, size_t> index_by_name_;  // name -> position in tensors_
};

struct TensorToWrite {
  std::string name;
  DType dtype;
  std::vector<int64_t> shape;
  const void* data;  // may be null only when nbytes == 0
  size_t nbytes;
};

// Builds the whole file in memory. Tensors are laid out sorted by name; the
// header is padded with spaces to a multiple of 8 so the data buffer starts
// 8-byte aligned. Throws SafetensorsError ("<memory>: ...") when names are
// empty, duplicated, "__metadata__" or not UTF-8, or when nbytes does not match
// the shape and dtype.
std::vector<uint8_t> serialize_safetensors(const std::vector<TensorToWrite>& tensors,
                                           const std::map<std::string, std::string>& metadata);

// Same layout as serialize_safetensors, written atomically: a uniquely named
// temp file next to `path` is written, fsynced and renamed over `path`, then
// the directory is fsynced. On any failure the temp file is removed, `path` is
// left as it was, and SafetensorsError is thrown. If the process is killed
// mid-write a "<path>.tmp.<pid>.<random>" file may be left behind; the target
// itself is never partially written.
void write_safetensors(const std::string& path, const std::vector<TensorToWrite>& tensors,
                       const std::map<std::string, std::string>& metadata);

}  // namespace duquant::io
