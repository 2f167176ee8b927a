#include "duquant/io/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <limits>
#include <nlohmann/json.hpp>
#include <random>
#include <set>
#include <sstream>
#include <utility>

namespace duquant::io {
namespace {

using nlohmann::json;

struct DTypeInfo {
  DType dtype;
  const char* name;
  size_t size;
};

constexpr DTypeInfo kDTypes[] = {
    {DType::BOOL, "BOOL", 1},  {DType::U8, "U8", 1},        {DType::I8, "I8", 1},
    {DType::I16, "I16", 2},    {DType::U16, "U16", 2},      {DType::F16, "F16", 2},
    {DType::BF16, "BF16", 2},  {DType::I32, "I32", 4},      {DType::U32, "U32", 4},
    {DType::F32, "F32", 4},    {DType::F64, "F64", 8},      {DType::I64, "I64", 8},
    {DType::U64, "U64", 8},    {DType::F8_E4M3, "F8_E4M3", 1}, {DType::F8_E5M2, "F8_E5M2", 1},
};

const DTypeInfo* find_info(DType dtype) {
  for (const auto& info : kDTypes) {
    if (info.dtype == dtype) return &info;
  }
  return nullptr;
}

const DTypeInfo& info_of(DType dtype) {
  if (const DTypeInfo* info = find_info(dtype)) return *info;
  // Only reachable through a cast of an out-of-range integer to DType.
  throw std::invalid_argument("duquant::io: invalid DType value " +
                              std::to_string(static_cast<int>(dtype)));
}

constexpr const char* kMetadataKey = "__metadata__";

// Quotes untrusted text for error messages: keeps printable ASCII, escapes the
// rest so a hostile name cannot garble the message or the terminal.
std::string shown(std::string_view text) {
  constexpr size_t kMaxShown = 200;
  std::string out = "'";
  for (size_t i = 0; i < text.size() && i < kMaxShown; ++i) {
    const unsigned char c = static_cast<unsigned char>(text[i]);
    if (c == '\'' || c == '\\') {
      out += '\\';
      out += static_cast<char>(c);
    } else if (c >= 0x20 && c < 0x7f) {
      out += static_cast<char>(c);
    } else {
      static const char kHex[] = "0123456789abcdef";
      out += "\\x";
      out += kHex[c >> 4];
      out += kHex[c & 15];
    }
  }
  if (text.size() > kMaxShown) out += "...";
  out += "'";
  return out;
}

std::string shape_string(const std::vector<int64_t>& shape) {
  std::string out = "[";
  for (size_t i = 0; i < shape.size(); ++i) {
    if (i) out += ", ";
    out += std::to_string(shape[i]);
  }
  return out + "]";
}

[[noreturn]] void fail(const std::string& label, const std::string& message) {
  throw SafetensorsError(label + ": " + message);
}

// Offset of the first byte that breaks strict UTF-8 (no overlongs, no
// surrogates, nothing above U+10FFFF), or npos when the text is valid.
size_t find_invalid_utf8(const uint8_t* bytes, size_t size) {
  size_t i = 0;
  while (i < size) {
    const uint8_t lead = bytes[i];
    if (lead < 0x80) {
      ++i;
      continue;
    }
    size_t continuation_count;
    uint8_t second_min = 0x80, second_max = 0xBF;
    if (lead >= 0xC2 && lead <= 0xDF) {
      continuation_count = 1;
    } else if (lead >= 0xE0 && lead <= 0xEF) {
      continuation_count = 2;
      if (lead == 0xE0) second_min = 0xA0;  // overlong
      if (lead == 0xED) second_max = 0x9F;  // surrogates
    } else if (lead >= 0xF0 && lead <= 0xF4) {
      continuation_count = 3;
      if (lead == 0xF0) second_min = 0x90;  // overlong
      if (lead == 0xF4) second_max = 0x8F;  // above U+10FFFF
    } else {
      return i;
    }
    if (size - i <= continuation_count) return i;
    if (bytes[i + 1] < second_min || bytes[i + 1] > second_max) return i;
    for (size_t k = 2; k <= continuation_count; ++k) {
      if (bytes[i + k] < 0x80 || bytes[i + k] > 0xBF) return i;
    }
    i += continuation_count + 1;
  }
  return std::string::npos;
}

bool is_valid_utf8(std::string_view text) {
  return find_invalid_utf8(reinterpret_cast<const uint8_t*>(text.data()), text.size()) ==
         std::string::npos;
}

// numel * dtype_size with both multiplications overflow-checked. Any zero
// dimension makes the count zero regardless of the other dimensions.
enum class SizeStatus { kOk, kCountOverflow, kBytesOverflow };
SizeStatus byte_size_of(const std::vector<uint64_t>& dims, size_t element_size, uint64_t* bytes) {
  uint64_t count = 1;
  if (std::find(dims.begin(), dims.end(), 0) != dims.end()) {
    count = 0;
  } else {
    for (uint64_t dim : dims) {
      if (__builtin_mul_overflow(count, dim, &count)) return SizeStatus::kCountOverflow;
    }
  }
  uint64_t total;
  if (__builtin_mul_overflow(count, static_cast<uint64_t>(element_size), &total) ||
      total > std::numeric_limits<size_t>::max()) {
    return SizeStatus::kBytesOverflow;
  }
  *bytes = total;
  return SizeStatus::kOk;
}

const char* json_kind(const json& value) { return value.type_name(); }

// Reads a JSON value that must be a non-negative integer (as nlohmann parses
// them: unsigned, or signed "-0"); on failure fills `why` and returns false.
bool read_non_negative_integer(const json& value, uint64_t* out, std::string* why) {
  if (value.is_number_unsigned()) {
    *out = value.get<uint64_t>();
    return true;
  }
  if (value.is_number_integer()) {
    const int64_t signed_value = value.get<int64_t>();
    if (signed_value >= 0) {
      *out = static_cast<uint64_t>(signed_value);
      return true;
    }
    *why = "is negative (" + std::to_string(signed_value) + ")";
    return false;
  }
  if (value.is_number_float()) {
    *why = "is not an integer (got " + value.dump() + ")";
    return false;
  }
  *why = std::string("is not an integer (got ") + json_kind(value) + ")";
  return false;
}

struct ParsedEntry {
  std::string name;
  DType dtype;
  std::vector<int64_t> shape;
  uint64_t begin;
  uint64_t end;
};

ParsedEntry parse_tensor_entry(const std::string& label, const std::string& name,
                               const json& entry) {
  const std::string who = "tensor " + shown(name);
  if (name.empty()) fail(label, "tensor with an empty name; expected a non-empty name");
  if (!entry.is_object()) {
    fail(label, who + ": expected a JSON object with dtype, shape and data_offsets, got " +
                    json_kind(entry));
  }
  for (const auto& field : entry.items()) {
    const std::string& key = field.key();
    if (key != "dtype" && key != "shape" && key != "data_offsets") {
      fail(label, who + ": unexpected field " + shown(key) +
                      "; expected only dtype, shape and data_offsets");
    }
  }
  for (const char* required : {"dtype", "shape", "data_offsets"}) {
    if (!entry.contains(required)) fail(label, who + ": missing field '" + required + "'");
  }

  ParsedEntry parsed;
  parsed.name = name;

  const json& dtype_value = entry.at("dtype");
  if (!dtype_value.is_string()) {
    fail(label, who + ": field 'dtype' must be a string, got " + json_kind(dtype_value));
  }
  const std::string& dtype_text = dtype_value.get_ref<const std::string&>();
  const auto dtype = dtype_from_name(dtype_text);
  if (!dtype) fail(label, who + ": unknown dtype " + shown(dtype_text));
  parsed.dtype = *dtype;

  const json& shape_value = entry.at("shape");
  if (!shape_value.is_array()) {
    fail(label, who + ": field 'shape' must be an array of non-negative integers, got " +
                    json_kind(shape_value));
  }
  std::vector<uint64_t> dims;
  dims.reserve(shape_value.size());
  for (size_t i = 0; i < shape_value.size(); ++i) {
    uint64_t dim;
    std::string why;
    if (!read_non_negative_integer(shape_value[i], &dim, &why)) {
      fail(label, who + ": shape[" + std::to_string(i) + "] " + why +
                      "; expected a non-negative integer");
    }
    if (dim > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
      fail(label, who + ": shape[" + std::to_string(i) + "] = " + std::to_string(dim) +
                      " exceeds the int64 range");
    }
    dims.push_back(dim);
    parsed.shape.push_back(static_cast<int64_t>(dim));
  }

  const json& offsets_value = entry.at("data_offsets");
  if (!offsets_value.is_array() || offsets_value.size() != 2) {
    fail(label, who + ": field 'data_offsets' must be an array of two non-negative integers, got " +
                    (offsets_value.is_array() ? "an array of " + std::to_string(offsets_value.size())
                                              : std::string(json_kind(offsets_value))));
  }
  std::string why;
  if (!read_non_negative_integer(offsets_value[0], &parsed.begin, &why)) {
    fail(label, who + ": data_offsets[0] " + why + "; expected a non-negative integer");
  }
  if (!read_non_negative_integer(offsets_value[1], &parsed.end, &why)) {
    fail(label, who + ": data_offsets[1] " + why + "; expected a non-negative integer");
  }
  if (parsed.begin > parsed.end) {
    fail(label, who + ": data_offsets begin " + std::to_string(parsed.begin) + " > end " +
                    std::to_string(parsed.end) + "; expected begin <= end");
  }

  const size_t element_size = dtype_size(parsed.dtype);
  uint64_t expected_bytes = 0;
  switch (byte_size_of(dims, element_size, &expected_bytes)) {
    case SizeStatus::kCountOverflow:
      fail(label, who + ": element count of shape " + shape_string(parsed.shape) +
                      " overflows 64 bits");
    case SizeStatus::kBytesOverflow:
      fail(label, who + ": byte size of shape " + shape_string(parsed.shape) + " with dtype " +
                      dtype_text + " overflows 64 bits");
    case SizeStatus::kOk:
      break;
  }
  if (parsed.end - parsed.begin != expected_bytes) {
    fail(label, who + ": size mismatch: data_offsets [" + std::to_string(parsed.begin) + ", " +
                    std::to_string(parsed.end) + "] span " +
                    std::to_string(parsed.end - parsed.begin) + " bytes, but dtype " + dtype_text +
                    " with shape " + shape_string(parsed.shape) + " needs " +
                    std::to_string(expected_bytes) + " bytes");
  }
  return parsed;
}

// Parses the header while rejecting duplicate keys at any depth: nlohmann
// silently keeps the last duplicate, which would let two tensors claim a name.
json parse_header_json(const std::string& label, const uint8_t* begin, const uint8_t* end) {
  std::vector<std::set<std::string>> keys_per_open_object;
  std::string duplicate_message;
  auto on_event = [&](int /*depth*/, json::parse_event_t event, json& parsed) -> bool {
    switch (event) {
      case json::parse_event_t::object_start:
        keys_per_open_object.emplace_back();
        break;
      case json::parse_event_t::object_end:
        if (!keys_per_open_object.empty()) keys_per_open_object.pop_back();
        break;
      case json::parse_event_t::key: {
        if (keys_per_open_object.empty() || !duplicate_message.empty()) break;
        const std::string& key = parsed.get_ref<const std::string&>();
        if (!keys_per_open_object.back().insert(key).second) {
          if (keys_per_open_object.size() == 1) {
            duplicate_message = key == kMetadataKey
                                    ? std::string("duplicate '__metadata__' entry")
                                    : "duplicate tensor name " + shown(key);
          } else {
            duplicate_message = "duplicate key " + shown(key) + " inside a header object";
          }
        }
        break;
      }
      default:
        break;
    }
    return true;
  };

  json header;
  try {
    header = json::parse(begin, end, on_event, /*allow_exceptions=*/true,
                         /*ignore_comments=*/false);
  } catch (const json::exception& error) {
    fail(label, std::string("header is not valid JSON: ") + error.what());
  }
  if (!duplicate_message.empty()) fail(label, duplicate_message);
  return header;
}

}  // namespace

size_t dtype_size(DType dtype) { return info_of(dtype).size; }

const char* dtype_name(DType dtype) { return info_of(dtype).name; }

std::optional<DType> dtype_from_name(std::string_view name) {
  for (const auto& info : kDTypes) {
    if (name == info.name) return info.dtype;
  }
  return std::nullopt;
}

// ---------------------------------------------------------------- reading

SafetensorsFile SafetensorsFile::open(const std::string& path) {
  SafetensorsFile file;
  file.label_ = path;
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) fail(path, std::string("cannot open file: ") + std::strerror(errno));
  struct stat info {};
  if (::fstat(fd, &info) != 0) {
    const int saved = errno;
    ::close(fd);
    fail(path, std::string("cannot stat file: ") + std::strerror(saved));
  }
  if (!S_ISREG(info.st_mode)) {
    ::close(fd);
    fail(path, "not a regular file");
  }
  const auto size = static_cast<uint64_t>(info.st_size);
  if (size > std::numeric_limits<size_t>::max()) {
    ::close(fd);
    fail(path, "file too large to map");
  }
  // mmap rejects length 0; such a file is reported as truncated by parse().
  if (size > 0) {
    void* mapping = ::mmap(nullptr, static_cast<size_t>(size), PROT_READ, MAP_PRIVATE, fd, 0);
    const int saved = errno;
    ::close(fd);  // the mapping keeps its own reference to the file
    if (mapping == MAP_FAILED) fail(path, std::string("cannot mmap file: ") + std::strerror(saved));
    file.mapping_ = mapping;
    file.mapping_size_ = static_cast<size_t>(size);
    file.base_ = static_cast<const uint8_t*>(mapping);
  } else {
    ::close(fd);
  }
  file.file_size_ = static_cast<size_t>(size);
  file.parse();  // on throw, ~SafetensorsFile unmaps
  return file;
}

SafetensorsFile SafetensorsFile::from_bytes(std::vector<uint8_t> bytes, std::string label) {
  SafetensorsFile file;
  file.label_ = std::move(label);
  file.owned_ = std::move(bytes);
  file.base_ = file.owned_.data();
  file.file_size_ = file.owned_.size();
  file.parse();
  return file;
}

SafetensorsFile::SafetensorsFile(SafetensorsFile&& other) noexcept { *this = std::move(other); }

SafetensorsFile& SafetensorsFile::operator=(SafetensorsFile&& other) noexcept {
  if (this == &other) return *this;
  release();
  label_ = std::move(other.label_);
  base_ = std::exchange(other.base_, nullptr);
  file_size_ = std::exchange(other.file_size_, 0);
  mapping_ = std::exchange(other.mapping_, nullptr);
  mapping_size_ = std::exchange(other.mapping_size_, 0);
  // Moving a std::vector hands over its buffer, so base_ and every
  // TensorView::data stay valid.
  owned_ = std::move(other.owned_);
  metadata_ = std::move(other.metadata_);
  tensors_ = std::move(other.tensors_);
  index_by_name_ = std::move(other.index_by_name_);
  other.owned_.clear();
  other.metadata_.clear();
  other.tensors_.clear();
  other.index_by_name_.clear();
  return *this;
}

SafetensorsFile::~SafetensorsFile() { release(); }

void SafetensorsFile::release() noexcept {
  if (mapping_ != nullptr) ::munmap(mapping_, mapping_size_);
  mapping_ = nullptr;
  mapping_size_ = 0;
  base_ = nullptr;
  file_size_ = 0;
  owned_.clear();
  tensors_.clear();
  index_by_name_.clear();
  metadata_.clear();
}

void SafetensorsFile::parse() {
  const std::string& label = label_;
  if (file_size_ < 8) {
    fail(label, "truncated file: " + std::to_string(file_size_) +
                    " bytes, expected at least 8 bytes for the header length");
  }
  uint64_t header_size = 0;
  for (int i = 7; i >= 0; --i) header_size = (header_size << 8) | base_[i];
  if (header_size > kMaxHeaderBytes) {
    fail(label, "header too large: header length is " + std::to_string(header_size) +
                    " bytes, the limit is " + std::to_string(kMaxHeaderBytes));
  }
  if (8 + header_size > file_size_) {
    fail(label, "header length " + std::to_string(header_size) +
                    " points past the end of the file (file is " + std::to_string(file_size_) +
                    " bytes, header would end at byte " + std::to_string(8 + header_size) + ")");
  }
  const uint8_t* header_begin = base_ + 8;
  const uint8_t* header_end = header_begin + header_size;
  const size_t bad_byte = find_invalid_utf8(header_begin, static_cast<size_t>(header_size));
  if (bad_byte != std::string::npos) {
    fail(label, "header is not valid UTF-8 (first bad byte at header offset " +
                    std::to_string(bad_byte) + ")");
  }

  // nlohmann stops at a NUL byte as if the input ended there, which would
  // accept "{}\0<anything>"; a raw NUL is never valid JSON, so reject it here.
  if (const void* nul = std::memchr(header_begin, 0, static_cast<size_t>(header_size))) {
    fail(label, "header is not valid JSON: NUL byte at header offset " +
                    std::to_string(static_cast<const uint8_t*>(nul) - header_begin));
  }
  const json header = parse_header_json(label, header_begin, header_end);
  if (!header.is_object()) {
    fail(label, std::string("header is not a JSON object (got ") + json_kind(header) + ")");
  }

  std::vector<ParsedEntry> entries;
  entries.reserve(header.size());
  for (const auto& item : header.items()) {
    const std::string& key = item.key();
    const json& value = item.value();
    if (key == kMetadataKey) {
      if (!value.is_object()) {
        fail(label, std::string("'__metadata__' must be an object of strings, got ") +
                        json_kind(value));
      }
      for (const auto& meta : value.items()) {
        if (!meta.value().is_string()) {
          fail(label, "'__metadata__' value for key " + shown(meta.key()) +
                          " is not a string (got " + json_kind(meta.value()) + ")");
        }
        metadata_[meta.key()] = meta.value().get<std::string>();
      }
      continue;
    }
    entries.push_back(parse_tensor_entry(label, key, value));
  }

  // Zero-size tensors sort before a tensor starting at the same offset, which
  // is the only order in which they can tile.
  std::sort(entries.begin(), entries.end(), [](const ParsedEntry& a, const ParsedEntry& b) {
    if (a.begin != b.begin) return a.begin < b.begin;
    if (a.end != b.end) return a.end < b.end;
    return a.name < b.name;
  });

  const uint64_t data_size = file_size_ - 8 - header_size;
  uint64_t expected_begin = 0;
  for (size_t i = 0; i < entries.size(); ++i) {
    const ParsedEntry& entry = entries[i];
    if (entry.begin != expected_begin) {
      if (i == 0) {
        fail(label, "gap: first tensor " + shown(entry.name) + " begins at data offset " +
                        std::to_string(entry.begin) + "; expected 0");
      }
      const std::string& previous = entries[i - 1].name;
      if (entry.begin > expected_begin) {
        fail(label, "gap of " + std::to_string(entry.begin - expected_begin) +
                        " bytes between tensor " + shown(previous) + " (ends at " +
                        std::to_string(expected_begin) + ") and tensor " + shown(entry.name) +
                        " (begins at " + std::to_string(entry.begin) + ")");
      }
      fail(label, "overlap: tensor " + shown(entry.name) + " (begins at " +
                      std::to_string(entry.begin) + ") overlaps tensor " + shown(previous) +
                      " (ends at " + std::to_string(expected_begin) + ")");
    }
    expected_begin = entry.end;
  }
  if (expected_begin > data_size) {
    fail(label, "data buffer too short: tensor " + shown(entries.back().name) +
                    " ends at data offset " + std::to_string(expected_begin) +
                    " but the data buffer holds only " + std::to_string(data_size) + " bytes");
  }
  if (expected_begin < data_size) {
    const std::string after =
        entries.empty() ? std::string("the header (no tensors)")
                        : "the last tensor " + shown(entries.back().name);
    fail(label, "trailing bytes: " + std::to_string(data_size - expected_begin) +
                    " bytes after " + after + "; expected the file to end there");
  }

  // Every range is now known to lie inside the buffer.
  const uint8_t* data_start = header_end;
  tensors_.reserve(entries.size());
  for (auto& entry : entries) {
    index_by_name_.emplace(entry.name, tensors_.size());
    tensors_.push_back(TensorView{std::move(entry.name), entry.dtype, std::move(entry.shape),
                                  data_start + entry.begin,
                                  static_cast<size_t>(entry.end - entry.begin)});
  }
}

std::vector<std::string> SafetensorsFile::names() const {
  std::vector<std::string> out;
  out.reserve(tensors_.size());
  for (const auto& tensor : tensors_) out.push_back(tensor.name);
  return out;
}

bool SafetensorsFile::contains(const std::string& name) const {
  return index_by_name_.count(name) != 0;
}

const TensorView& SafetensorsFile::tensor(const std::string& name) const {
  const auto found = index_by_name_.find(name);
  if (found == index_by_name_.end()) {
    fail(label_, "no tensor named " + shown(name) + " (file has " +
                     std::to_string(tensors_.size()) + " tensors)");
  }
  return tensors_[found->second];
}

// ---------------------------------------------------------------- writing

namespace {

struct WritePlan {
  std::string prefix_and_header;  // 8-byte length + padded JSON header
  std::vector<const TensorToWrite*> order;  // data order (sorted by name)
  uint64_t data_size = 0;
};

WritePlan plan_write(const std::string& label, const std::vector<TensorToWrite>& tensors,
                     const std::map<std::string, std::string>& metadata) {
  const std::string cannot = "cannot write: ";
  WritePlan plan;
  plan.order.reserve(tensors.size());
  for (const auto& tensor : tensors) plan.order.push_back(&tensor);
  std::sort(plan.order.begin(), plan.order.end(),
            [](const TensorToWrite* a, const TensorToWrite* b) { return a->name < b->name; });

  for (size_t i = 0; i < plan.order.size(); ++i) {
    const TensorToWrite& tensor = *plan.order[i];
    const std::string who = "tensor " + shown(tensor.name);
    if (tensor.name.empty()) fail(label, cannot + "tensor with an empty name");
    if (tensor.name == kMetadataKey) {
      fail(label, cannot + "'__metadata__' is reserved and cannot be a tensor name");
    }
    if (i > 0 && plan.order[i - 1]->name == tensor.name) {
      fail(label, cannot + "duplicate tensor name " + shown(tensor.name));
    }
    if (!is_valid_utf8(tensor.name)) fail(label, cannot + who + ": name is not valid UTF-8");
    if (find_info(tensor.dtype) == nullptr) {
      fail(label, cannot + who + ": invalid dtype value " +
                      std::to_string(static_cast<int>(tensor.dtype)));
    }
    std::vector<uint64_t> dims;
    for (size_t d = 0; d < tensor.shape.size(); ++d) {
      if (tensor.shape[d] < 0) {
        fail(label, cannot + who + ": shape[" + std::to_string(d) + "] is negative (" +
                        std::to_string(tensor.shape[d]) + ")");
      }
      dims.push_back(static_cast<uint64_t>(tensor.shape[d]));
    }
    uint64_t expected_bytes = 0;
    if (byte_size_of(dims, dtype_size(tensor.dtype), &expected_bytes) != SizeStatus::kOk) {
      fail(label, cannot + who + ": byte size of shape " + shape_string(tensor.shape) +
                      " overflows 64 bits");
    }
    if (tensor.nbytes != expected_bytes) {
      fail(label, cannot + who + ": size mismatch: nbytes is " + std::to_string(tensor.nbytes) +
                      " but dtype " + dtype_name(tensor.dtype) + " with shape " +
                      shape_string(tensor.shape) + " needs " + std::to_string(expected_bytes) +
                      " bytes");
    }
    if (tensor.nbytes > 0 && tensor.data == nullptr) {
      fail(label, cannot + who + ": data is null but nbytes is " + std::to_string(tensor.nbytes));
    }
  }
  for (const auto& [key, value] : metadata) {
    if (!is_valid_utf8(key) || !is_valid_utf8(value)) {
      fail(label, cannot + "'__metadata__' entry " + shown(key) + " is not valid UTF-8");
    }
  }

  // Compact JSON, matching what the Python safetensors package emits.
  std::string header = "{";
  bool first = true;
  if (!metadata.empty()) {
    header += "\"__metadata__\":" + json(metadata).dump();
    first = false;
  }
  uint64_t offset = 0;
  for (const TensorToWrite* tensor : plan.order) {
    uint64_t end;
    if (__builtin_add_overflow(offset, static_cast<uint64_t>(tensor->nbytes), &end)) {
      fail(label, cannot + "total data size overflows 64 bits");
    }
    if (!first) header += ',';
    first = false;
    header += json(tensor->name).dump();
    header += ":{\"dtype\":\"";
    header += dtype_name(tensor->dtype);
    header += "\",\"shape\":[";
    for (size_t d = 0; d < tensor->shape.size(); ++d) {
      if (d) header += ',';
      header += std::to_string(tensor->shape[d]);
    }
    header += "],\"data_offsets\":[" + std::to_string(offset) + "," + std::to_string(end) + "]}";
    offset = end;
  }
  header += '}';
  // Pad so that 8 + header length is a multiple of 8: the data buffer then
  // starts 8-byte aligned in the file (and in an mmap of it).
  header.append((8 - header.size() % 8) % 8, ' ');
  if (header.size() > kMaxHeaderBytes) {
    fail(label, cannot + "header too large: " + std::to_string(header.size()) +
                    " bytes, the limit is " + std::to_string(kMaxHeaderBytes));
  }

  plan.data_size = offset;
  plan.prefix_and_header.resize(8);
  uint64_t length = header.size();
  for (int i = 0; i < 8; ++i) {
    plan.prefix_and_header[i] = static_cast<char>(length & 0xff);
    length >>= 8;
  }
  plan.prefix_and_header += header;
  return plan;
}

// Removes the temp file unless the rename succeeded; closes the descriptor on
// every path so a throw anywhere in write_safetensors cleans up.
class TempFile {
 public:
  TempFile(std::string path, int fd) : path_(std::move(path)), fd_(fd) {}
  ~TempFile() {
    if (fd_ >= 0) ::close(fd_);
    if (!committed_) ::unlink(path_.c_str());
  }
  TempFile(const TempFile&) = delete;
  TempFile& operator=(const TempFile&) = delete;
  int fd() const { return fd_; }
  const std::string& path() const { return path_; }
  // close() reports deferred write errors (e.g. NFS), so it is checked.
  int close_checked() {
    const int result = ::close(fd_);
    fd_ = -1;
    return result;
  }
  void commit() { committed_ = true; }

 private:
  std::string path_;
  int fd_;
  bool committed_ = false;
};

void write_all(const std::string& label, const TempFile& file, const void* data, size_t size) {
  const auto* cursor = static_cast<const uint8_t*>(data);
  while (size > 0) {
    const size_t chunk = std::min<size_t>(size, size_t{1} << 30);
    const ssize_t written = ::write(file.fd(), cursor, chunk);
    if (written < 0) {
      if (errno == EINTR) continue;
      fail(label, "cannot write temporary file '" + file.path() + "': " + std::strerror(errno));
    }
    cursor += written;
    size -= static_cast<size_t>(written);
  }
}

std::string temp_path_for(const std::string& target) {
  std::random_device entropy;
  std::ostringstream name;
  name << target << ".tmp." << ::getpid() << '.' << std::hex << entropy() << entropy();
  return name.str();
}

std::string parent_directory(const std::string& path) {
  const size_t slash = path.find_last_of('/');
  if (slash == std::string::npos) return ".";
  if (slash == 0) return "/";
  return path.substr(0, slash);
}

}  // namespace

std::vector<uint8_t> serialize_safetensors(const std::vector<TensorToWrite>& tensors,
                                           const std::map<std::string, std::string>& metadata) {
  const WritePlan plan = plan_write("<memory>", tensors, metadata);
  std::vector<uint8_t> bytes;
  bytes.reserve(plan.prefix_and_header.size() + static_cast<size_t>(plan.data_size));
  bytes.insert(bytes.end(), plan.prefix_and_header.begin(), plan.prefix_and_header.end());
  for (const TensorToWrite* tensor : plan.order) {
    const auto* data = static_cast<const uint8_t*>(tensor->data);
    if (tensor->nbytes > 0) bytes.insert(bytes.end(), data, data + tensor->nbytes);
  }
  return bytes;
}

void write_safetensors(const std::string& path, const std::vector<TensorToWrite>& tensors,
                       const std::map<std::string, std::string>& metadata) {
  // Validate everything before touching the filesystem.
  const WritePlan plan = plan_write(path, tensors, metadata);

  const std::string temp_path = temp_path_for(path);
  // O_EXCL: never reuse (or follow a symlink planted at) an existing name.
  const int fd = ::open(temp_path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
  if (fd < 0) {
    fail(path, "cannot create temporary file '" + temp_path + "': " + std::strerror(errno));
  }
  TempFile temp(temp_path, fd);

  // Keep the permissions of a file being replaced.
  struct stat existing {};
  if (::stat(path.c_str(), &existing) == 0 && S_ISREG(existing.st_mode)) {
    ::fchmod(temp.fd(), existing.st_mode & 07777);
  }

  write_all(path, temp, plan.prefix_and_header.data(), plan.prefix_and_header.size());
  for (const TensorToWrite* tensor : plan.order) {
    if (tensor->nbytes > 0) write_all(path, temp, tensor->data, tensor->nbytes);
  }
  if (::fsync(temp.fd()) != 0) {
    fail(path, "cannot fsync temporary file '" + temp_path + "': " + std::strerror(errno));
  }
  if (temp.close_checked() != 0) {
    fail(path, "cannot close temporary file '" + temp_path + "': " + std::strerror(errno));
  }
  if (::rename(temp_path.c_str(), path.c_str()) != 0) {
    fail(path, "cannot rename temporary file '" + temp_path + "' over the target: " +
                   std::strerror(errno));
  }
  temp.commit();

  // Persist the rename itself. Some filesystems cannot fsync directories
  // (EINVAL); the data is in place either way, so only real I/O errors throw.
  const std::string directory = parent_directory(path);
  const int dir_fd = ::open(directory.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dir_fd >= 0) {
    const int result = ::fsync(dir_fd);
    const int saved = errno;
    ::close(dir_fd);
    if (result != 0 && saved != EINVAL && saved != EROFS) {
      fail(path, "written, but cannot fsync directory '" + directory + "': " +
                     std::strerror(saved));
    }
  }
}

}  // namespace duquant::io
