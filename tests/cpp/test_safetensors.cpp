#include "duquant/io/safetensors.h"

#include <dirent.h>
#include <fcntl.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

namespace {

using duquant::io::DType;
using duquant::io::SafetensorsError;
using duquant::io::SafetensorsFile;
using duquant::io::TensorToWrite;
using duquant::io::TensorView;

const DType kAllDTypes[] = {DType::BOOL, DType::U8,  DType::I8,      DType::I16,    DType::U16,
                            DType::F16,  DType::BF16, DType::I32,    DType::U32,    DType::F32,
                            DType::F64,  DType::I64, DType::U64,     DType::F8_E4M3, DType::F8_E5M2};

// An 8-byte little-endian length followed by the header text and `data_size`
// filler bytes; `declared_length` lets tests lie about the header size.
std::vector<uint8_t> make_file(const std::string& header, size_t data_size = 0,
                               uint64_t declared_length = UINT64_MAX) {
  if (declared_length == UINT64_MAX) declared_length = header.size();
  std::vector<uint8_t> bytes;
  for (int i = 0; i < 8; ++i) bytes.push_back(static_cast<uint8_t>(declared_length >> (8 * i)));
  bytes.insert(bytes.end(), header.begin(), header.end());
  for (size_t i = 0; i < data_size; ++i) bytes.push_back(static_cast<uint8_t>(i));
  return bytes;
}

// The message of the SafetensorsError that parsing `bytes` throws.
std::string parse_error(const std::vector<uint8_t>& bytes) {
  try {
    SafetensorsFile::from_bytes(bytes);
  } catch (const SafetensorsError& error) {
    return error.what();
  }
  return "<no error>";
}

#define EXPECT_REJECTED(bytes, phrase)                                            \
  do {                                                                            \
    const std::string message = parse_error(bytes);                               \
    EXPECT_EQ(message.rfind("<memory>: ", 0), 0u) << message;                     \
    EXPECT_NE(message.find(phrase), std::string::npos)                            \
        << "expected phrase: " << (phrase) << "\n  actual message: " << message; \
  } while (0)

std::string entry(const std::string& name, const std::string& dtype, const std::string& shape,
                  uint64_t begin, uint64_t end) {
  return "\"" + name + "\":{\"dtype\":\"" + dtype + "\",\"shape\":" + shape +
         ",\"data_offsets\":[" + std::to_string(begin) + "," + std::to_string(end) + "]}";
}

std::vector<uint8_t> read_whole_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::vector<uint8_t>(std::istreambuf_iterator<char>(in), {});
}

std::vector<std::string> list_directory(const std::string& dir) {
  std::vector<std::string> names;
  if (DIR* handle = opendir(dir.c_str())) {
    while (dirent* item = readdir(handle)) {
      const std::string name = item->d_name;
      if (name != "." && name != "..") names.push_back(name);
    }
    closedir(handle);
  }
  std::sort(names.begin(), names.end());
  return names;
}

class TempDirTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const char* tmp = std::getenv("TMPDIR");
    std::string pattern = std::string(tmp && *tmp ? tmp : "/tmp") + "/duquant_st_XXXXXX";
    ASSERT_NE(mkdtemp(pattern.data()), nullptr);
    dir_ = pattern;
  }
  void TearDown() override { remove_tree(dir_); }

  static void remove_tree(const std::string& path) {
    struct stat info {};
    if (lstat(path.c_str(), &info) != 0) return;
    if (S_ISDIR(info.st_mode)) {
      for (const auto& name : list_directory(path)) remove_tree(path + "/" + name);
      rmdir(path.c_str());
    } else {
      unlink(path.c_str());
    }
  }

  std::string dir_;
};

// ---------------------------------------------------------------- round trips

TEST(SafetensorsDType, NamesAndSizes) {
  for (DType dtype : kAllDTypes) {
    const auto parsed = duquant::io::dtype_from_name(duquant::io::dtype_name(dtype));
    ASSERT_TRUE(parsed.has_value());
    EXPECT_EQ(*parsed, dtype);
  }
  EXPECT_EQ(duquant::io::dtype_size(DType::BF16), 2u);
  EXPECT_EQ(duquant::io::dtype_size(DType::F64), 8u);
  EXPECT_EQ(duquant::io::dtype_size(DType::F8_E4M3), 1u);
  EXPECT_FALSE(duquant::io::dtype_from_name("f32").has_value());
  EXPECT_FALSE(duquant::io::dtype_from_name("").has_value());
}

struct EveryDTypeFixture {
  std::vector<std::vector<uint8_t>> buffers;
  std::vector<TensorToWrite> tensors;

  EveryDTypeFixture() {
    buffers.reserve(64);
    uint8_t seed = 1;
    for (DType dtype : kAllDTypes) {
      const std::string name = duquant::io::dtype_name(dtype);
      const size_t element = duquant::io::dtype_size(dtype);
      auto add = [&](const std::string& tensor_name, std::vector<int64_t> shape, size_t count) {
        buffers.emplace_back(count * element);
        for (auto& byte : buffers.back()) byte = seed++;
        tensors.push_back({tensor_name, dtype, std::move(shape),
                           count ? buffers.back().data() : nullptr, count * element});
      };
      add(name + ".matrix", {3, 2}, 6);
      add(name + ".empty", {0, 4}, 0);
      add(name + ".scalar", {}, 1);
    }
  }

  void expect_matches(const SafetensorsFile& file) const {
    ASSERT_EQ(file.size(), tensors.size());
    for (const auto& expected : tensors) {
      SCOPED_TRACE(expected.name);
      ASSERT_TRUE(file.contains(expected.name));
      const TensorView& view = file.tensor(expected.name);
      EXPECT_EQ(view.name, expected.name);
      EXPECT_EQ(view.dtype, expected.dtype);
      EXPECT_EQ(view.shape, expected.shape);
      ASSERT_EQ(view.nbytes, expected.nbytes);
      if (expected.nbytes) {
        EXPECT_EQ(std::memcmp(view.data, expected.data, view.nbytes), 0);
      }
    }
  }
};

TEST(SafetensorsRoundTrip, EveryDTypeInMemory) {
  const EveryDTypeFixture fixture;
  const auto bytes = duquant::io::serialize_safetensors(fixture.tensors, {});
  const auto file = SafetensorsFile::from_bytes(bytes);
  fixture.expect_matches(file);
  EXPECT_TRUE(file.metadata().empty());
  // Written sorted by name, so data order is name order.
  auto names = file.names();
  EXPECT_TRUE(std::is_sorted(names.begin(), names.end()));
}

TEST_F(TempDirTest, EveryDTypeThroughFileAndMmap) {
  const EveryDTypeFixture fixture;
  const std::string path = dir_ + "/every.safetensors";
  duquant::io::write_safetensors(path, fixture.tensors, {{"format", "pt"}});
  auto file = SafetensorsFile::open(path);
  EXPECT_EQ(file.label(), path);
  fixture.expect_matches(file);
  // Header padding keeps the start of the data buffer 8-byte aligned in the
  // mapping (later tensors follow name order, so only the start is aligned).
  EXPECT_EQ(reinterpret_cast<uintptr_t>(file.tensors().front().data) % 8, 0u);
  // Moving keeps the mapping and the views alive.
  SafetensorsFile moved = std::move(file);
  fixture.expect_matches(moved);
  EXPECT_EQ(list_directory(dir_), std::vector<std::string>{"every.safetensors"});
}

TEST(SafetensorsRoundTrip, MetadataRoundTrip) {
  const std::map<std::string, std::string> metadata = {
      {"format", "pt"}, {"empty", ""}, {"unicode", "h\xc3\xa9llo \xe2\x9c\x93"},
      {"quote\"and\\slash", "line\nbreak\ttab"}};
  const float values[2] = {1.5f, -2.0f};
  const auto bytes =
      duquant::io::serialize_safetensors({{"w", DType::F32, {2}, values, sizeof(values)}}, metadata);
  const auto file = SafetensorsFile::from_bytes(bytes);
  EXPECT_EQ(file.metadata(), metadata);
  float read_back[2];
  std::memcpy(read_back, file.tensor("w").data, sizeof(read_back));
  EXPECT_EQ(read_back[0], 1.5f);
  EXPECT_EQ(read_back[1], -2.0f);
}

TEST(SafetensorsRoundTrip, EmptyTensorListAndHeaderAlignment) {
  const auto bytes = duquant::io::serialize_safetensors({}, {});
  EXPECT_EQ(bytes.size() % 8, 0u);
  EXPECT_EQ(SafetensorsFile::from_bytes(bytes).size(), 0u);
}

// Exactly the bytes the Python safetensors package writes for
// save({"t": torch.tensor([1.0, 2.0])}): compact JSON padded with spaces.
TEST(SafetensorsPythonCompat, ReadsHandBuiltPythonFile) {
  std::string header = R"({"t":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})";
  header.append((8 - header.size() % 8) % 8, ' ');
  ASSERT_EQ(header.size() % 8, 0u);
  auto bytes = make_file(header);
  const float values[2] = {1.0f, 2.0f};
  const auto* raw = reinterpret_cast<const uint8_t*>(values);
  bytes.insert(bytes.end(), raw, raw + sizeof(values));

  const auto file = SafetensorsFile::from_bytes(bytes);
  ASSERT_EQ(file.names(), std::vector<std::string>{"t"});
  const TensorView& t = file.tensor("t");
  EXPECT_EQ(t.dtype, DType::F32);
  EXPECT_EQ(t.shape, std::vector<int64_t>{2});
  ASSERT_EQ(t.nbytes, 8u);
  EXPECT_EQ(std::memcmp(t.data, values, 8), 0);

  // The writer produces the identical byte string.
  EXPECT_EQ(duquant::io::serialize_safetensors({{"t", DType::F32, {2}, values, 8}}, {}), bytes);
}

TEST(SafetensorsPythonCompat, ReadsMetadataFirstAndFieldsInAnyOrder) {
  const std::string header =
      R"({"__metadata__":{"format":"pt"},"b":{"data_offsets":[2,4],"shape":[1],"dtype":"BF16"},)"
      R"("a":{"shape":[1,1],"dtype":"U8","data_offsets":[0,2]}} )";
  // "a" is U8 [1,1] = 1 byte but spans 2: must be rejected; fix and re-check.
  EXPECT_REJECTED(make_file(header, 4), "size mismatch");
  std::string fixed = header;
  fixed.replace(fixed.find("\"shape\":[1,1]"), 13, "\"shape\":[2,1]");
  const auto file = SafetensorsFile::from_bytes(make_file(fixed, 4));
  EXPECT_EQ(file.names(), (std::vector<std::string>{"a", "b"}));
  EXPECT_EQ(file.metadata().at("format"), "pt");
}

TEST(SafetensorsRead, ZeroSizeTensorsAreAllowedAnywhere) {
  const std::string header = "{" + entry("z0", "F32", "[0]", 0, 0) + "," +
                             entry("a", "U8", "[4]", 0, 4) + "," +
                             entry("z1", "I64", "[3,0]", 4, 4) + "," +
                             entry("b", "U8", "[2]", 4, 6) + "," + entry("z2", "U8", "[0]", 6, 6) +
                             "}";
  const auto file = SafetensorsFile::from_bytes(make_file(header, 6));
  EXPECT_EQ(file.names(), (std::vector<std::string>{"z0", "a", "z1", "b", "z2"}));
  EXPECT_EQ(file.tensor("z1").nbytes, 0u);
}

// ---------------------------------------------------------------- rejections

TEST(SafetensorsReject, TruncatedBelowEightBytes) {
  EXPECT_REJECTED(std::vector<uint8_t>{}, "truncated");
  EXPECT_REJECTED((std::vector<uint8_t>{1, 2, 3, 4, 5}), "truncated");
}

TEST(SafetensorsReject, HeaderLengthPastTheFile) {
  EXPECT_REJECTED(make_file("{}", 0, 100), "points past the end of the file");
  // At the limit is not "too large", just past the end.
  EXPECT_REJECTED(make_file("{}", 0, 100'000'000), "points past the end of the file");
}

TEST(SafetensorsReject, HeaderTooLarge) {
  EXPECT_REJECTED(make_file("{}", 0, 100'000'001), "header too large");
  EXPECT_REJECTED(make_file("{}", 0, UINT64_MAX - 1), "header too large");
}

TEST(SafetensorsReject, HeaderNotUtf8) {
  EXPECT_REJECTED(make_file("{\"t\xff\":{}}"), "not valid UTF-8");
  EXPECT_REJECTED(make_file("{\"\xc0\xaf\":{}}"), "not valid UTF-8");      // overlong '/'
  EXPECT_REJECTED(make_file("{\"\xed\xa0\x80\":{}}"), "not valid UTF-8");  // surrogate
  EXPECT_REJECTED(make_file("{\"\xe2\x9c\":{}}"), "not valid UTF-8");      // cut short
}

TEST(SafetensorsReject, HeaderNotJson) {
  EXPECT_REJECTED(make_file(R"({"t":{"dtype":"F32",)"), "not valid JSON");
  EXPECT_REJECTED(make_file(""), "not valid JSON");
  EXPECT_REJECTED(make_file(std::string("{}\0", 3)), "not valid JSON");
  EXPECT_REJECTED(make_file("{} // comment"), "not valid JSON");
}

TEST(SafetensorsReject, TopLevelNotObject) {
  EXPECT_REJECTED(make_file("[1,2]"), "header is not a JSON object");
  EXPECT_REJECTED(make_file("\"text\"  "), "header is not a JSON object");
}

TEST(SafetensorsReject, EntryNotObject) {
  EXPECT_REJECTED(make_file(R"({"t":[1]})"), "tensor 't': expected a JSON object");
}

TEST(SafetensorsReject, MissingExtraAndMistypedFields) {
  EXPECT_REJECTED(make_file(R"({"t":{"dtype":"F32","data_offsets":[0,0]}})"),
                  "tensor 't': missing field 'shape'");
  EXPECT_REJECTED(
      make_file(R"({"t":{"dtype":"F32","shape":[0],"data_offsets":[0,0],"extra":1}})"),
      "tensor 't': unexpected field 'extra'");
  EXPECT_REJECTED(make_file(R"({"t":{"dtype":4,"shape":[0],"data_offsets":[0,0]}})"),
                  "field 'dtype' must be a string");
  EXPECT_REJECTED(make_file(R"({"t":{"dtype":"F32","shape":3,"data_offsets":[0,0]}})"),
                  "field 'shape' must be an array");
  EXPECT_REJECTED(make_file(R"({"t":{"dtype":"F32","shape":[0],"data_offsets":[0]}})"),
                  "field 'data_offsets' must be an array of two");
  EXPECT_REJECTED(make_file(R"({"t":{"dtype":"F32","shape":[0],"data_offsets":{}}})"),
                  "field 'data_offsets' must be an array of two");
}

TEST(SafetensorsReject, UnknownDtype) {
  EXPECT_REJECTED(make_file("{" + entry("t", "F33", "[1]", 0, 4) + "}", 4),
                  "tensor 't': unknown dtype 'F33'");
  EXPECT_REJECTED(make_file("{" + entry("t", "f32", "[1]", 0, 4) + "}", 4), "unknown dtype");
}

TEST(SafetensorsReject, BadShapeEntries) {
  EXPECT_REJECTED(make_file("{" + entry("t", "U8", "[2,-3]", 0, 0) + "}"),
                  "tensor 't': shape[1] is negative (-3)");
  EXPECT_REJECTED(make_file("{" + entry("t", "U8", "[2.0]", 0, 2) + "}", 2),
                  "shape[0] is not an integer");
  EXPECT_REJECTED(make_file("{" + entry("t", "U8", "[\"2\"]", 0, 2) + "}", 2),
                  "shape[0] is not an integer");
  EXPECT_REJECTED(make_file("{" + entry("t", "U8", "[1e3]", 0, 1000) + "}", 1000),
                  "shape[0] is not an integer");
  EXPECT_REJECTED(make_file("{" + entry("t", "U8", "[9223372036854775808]", 0, 0) + "}"),
                  "exceeds the int64 range");
  // Beyond uint64 nlohmann falls back to a float: still "not an integer".
  EXPECT_REJECTED(make_file("{" + entry("t", "U8", "[18446744073709551616]", 0, 0) + "}"),
                  "shape[0] is not an integer");
}

TEST(SafetensorsReject, BadDataOffsets) {
  EXPECT_REJECTED(make_file(R"({"t":{"dtype":"U8","shape":[1],"data_offsets":[-1,0]}})"),
                  "data_offsets[0] is negative");
  EXPECT_REJECTED(make_file(R"({"t":{"dtype":"U8","shape":[1],"data_offsets":[0,0.5]}})"),
                  "data_offsets[1] is not an integer");
  EXPECT_REJECTED(make_file("{" + entry("t", "U8", "[0]", 8, 0) + "}", 8),
                  "data_offsets begin 8 > end 0");
}

TEST(SafetensorsReject, SizeMismatch) {
  EXPECT_REJECTED(make_file("{" + entry("t", "F32", "[2]", 0, 4) + "}", 4),
                  "tensor 't': size mismatch: data_offsets [0, 4] span 4 bytes, but dtype F32 "
                  "with shape [2] needs 8 bytes");
}

TEST(SafetensorsReject, ShapeOverflowing64Bits) {
  EXPECT_REJECTED(
      make_file("{" + entry("t", "U8", "[4294967296,4294967296,2]", 0, 0) + "}"),
      "element count of shape [4294967296, 4294967296, 2] overflows 64 bits");
  // Count fits, bytes do not.
  EXPECT_REJECTED(make_file("{" + entry("t", "F32", "[4611686018427387904]", 0, 0) + "}"),
                  "byte size of shape [4611686018427387904] with dtype F32 overflows 64 bits");
  // A zero dimension makes the product zero whatever comes before it.
  EXPECT_NO_THROW(SafetensorsFile::from_bytes(
      make_file("{" + entry("t", "U8", "[4294967296,4294967296,0]", 0, 0) + "}")));
}

TEST(SafetensorsReject, DuplicateTensorName) {
  const std::string header =
      "{" + entry("a", "U8", "[4]", 0, 4) + "," + entry("a", "U8", "[4]", 4, 8) + "}";
  EXPECT_REJECTED(make_file(header, 8), "duplicate tensor name 'a'");
  EXPECT_REJECTED(make_file(R"({"__metadata__":{},"__metadata__":{}})"),
                  "duplicate '__metadata__'");
  EXPECT_REJECTED(make_file(R"({"t":{"dtype":"U8","dtype":"U8","shape":[0],"data_offsets":[0,0]}})"),
                  "duplicate key 'dtype'");
  EXPECT_REJECTED(make_file(R"({"__metadata__":{"k":"1","k":"2"}})"), "duplicate key 'k'");
}

TEST(SafetensorsReject, EmptyTensorName) {
  EXPECT_REJECTED(make_file("{" + entry("", "U8", "[0]", 0, 0) + "}"), "empty name");
}

TEST(SafetensorsReject, GapBetweenTensors) {
  const std::string header =
      "{" + entry("a", "U8", "[4]", 0, 4) + "," + entry("b", "U8", "[4]", 8, 12) + "}";
  EXPECT_REJECTED(make_file(header, 12),
                  "gap of 4 bytes between tensor 'a' (ends at 4) and tensor 'b' (begins at 8)");
  EXPECT_REJECTED(make_file("{" + entry("a", "U8", "[4]", 4, 8) + "}", 8),
                  "gap: first tensor 'a' begins at data offset 4; expected 0");
}

TEST(SafetensorsReject, OverlappingTensors) {
  const std::string header =
      "{" + entry("a", "U8", "[8]", 0, 8) + "," + entry("b", "U8", "[8]", 4, 12) + "}";
  EXPECT_REJECTED(make_file(header, 12),
                  "overlap: tensor 'b' (begins at 4) overlaps tensor 'a' (ends at 8)");
  // Same range twice.
  EXPECT_REJECTED(make_file("{" + entry("a", "U8", "[8]", 0, 8) + "," +
                                entry("b", "U8", "[8]", 0, 8) + "}",
                            8),
                  "overlap: tensor 'b'");
  // A zero-size tensor strictly inside another one.
  EXPECT_REJECTED(make_file("{" + entry("a", "U8", "[8]", 0, 8) + "," +
                                entry("z", "U8", "[0]", 4, 4) + "}",
                            8),
                  "overlap: tensor 'z' (begins at 4) overlaps tensor 'a'");
}

TEST(SafetensorsReject, TrailingBytes) {
  EXPECT_REJECTED(make_file("{" + entry("a", "U8", "[4]", 0, 4) + "}", 6),
                  "trailing bytes: 2 bytes after the last tensor 'a'");
  EXPECT_REJECTED(make_file("{}", 3), "trailing bytes: 3 bytes after the header (no tensors)");
}

TEST(SafetensorsReject, DataBufferTooShort) {
  EXPECT_REJECTED(make_file("{" + entry("a", "U8", "[8]", 0, 8) + "}", 4),
                  "data buffer too short: tensor 'a' ends at data offset 8 but the data buffer "
                  "holds only 4 bytes");
  // Offsets near 2^64 must not wrap around.
  EXPECT_REJECTED(
      make_file("{" + entry("a", "U8", "[9223372036854775807]", 0, 9223372036854775807u) + "," +
                entry("b", "U8", "[9223372036854775808]", 9223372036854775807u,
                      18446744073709551615u) + "}"),
      "exceeds the int64 range");
  EXPECT_REJECTED(
      make_file("{" + entry("a", "U8", "[9223372036854775807]", 0, 9223372036854775807u) + "," +
                entry("b", "U8", "[4611686018427387904,2]", 9223372036854775807u,
                      18446744073709551615u) + "}"),
      "data buffer too short: tensor 'b' ends at data offset 18446744073709551615");
}

TEST(SafetensorsReject, MetadataValueNotString) {
  EXPECT_REJECTED(make_file(R"({"__metadata__":{"format":"pt","epoch":3}})"),
                  "'__metadata__' value for key 'epoch' is not a string");
  EXPECT_REJECTED(make_file(R"({"__metadata__":["pt"]})"), "'__metadata__' must be an object");
}

TEST(SafetensorsReject, HostileNamesAreEscapedInMessages) {
  const std::string message = parse_error(make_file(R"({"a\u001b[31m":[]})"));
  EXPECT_NE(message.find("tensor 'a\\x1b[31m'"), std::string::npos) << message;
}

TEST_F(TempDirTest, OpenErrorsNameThePath) {
  const std::string missing = dir_ + "/missing.safetensors";
  try {
    SafetensorsFile::open(missing);
    FAIL() << "expected an error";
  } catch (const SafetensorsError& error) {
    EXPECT_EQ(std::string(error.what()).rfind(missing + ": cannot open file", 0), 0u)
        << error.what();
  }
  const std::string empty = dir_ + "/empty.safetensors";
  std::ofstream(empty).close();
  try {
    SafetensorsFile::open(empty);
    FAIL() << "expected an error";
  } catch (const SafetensorsError& error) {
    EXPECT_EQ(std::string(error.what()).rfind(empty + ": truncated", 0), 0u) << error.what();
  }
  try {
    SafetensorsFile::open(dir_);
    FAIL() << "expected an error";
  } catch (const SafetensorsError& error) {
    EXPECT_NE(std::string(error.what()).find("not a regular file"), std::string::npos);
  }
}

TEST(SafetensorsRead, MissingTensorNamesTheFileAndTensor) {
  const uint8_t byte = 7;
  const auto file = SafetensorsFile::from_bytes(
      duquant::io::serialize_safetensors({{"present", DType::U8, {1}, &byte, 1}}, {}),
      "model.safetensors");
  EXPECT_FALSE(file.contains("absent"));
  try {
    file.tensor("absent");
    FAIL() << "expected an error";
  } catch (const SafetensorsError& error) {
    EXPECT_STREQ(error.what(), "model.safetensors: no tensor named 'absent' (file has 1 tensors)");
  }
}

// ---------------------------------------------------------------- writing

TEST(SafetensorsWriteValidation, RejectsBadTensorLists) {
  const uint8_t data[8] = {};
  auto error_of = [](const std::vector<TensorToWrite>& tensors) -> std::string {
    try {
      duquant::io::serialize_safetensors(tensors, {});
    } catch (const SafetensorsError& error) {
      return error.what();
    }
    return "<no error>";
  };
  EXPECT_NE(error_of({{"a", DType::U8, {1}, data, 1}, {"a", DType::U8, {1}, data, 1}})
                .find("<memory>: cannot write: duplicate tensor name 'a'"),
            std::string::npos);
  EXPECT_NE(error_of({{"", DType::U8, {1}, data, 1}}).find("empty name"), std::string::npos);
  EXPECT_NE(error_of({{"__metadata__", DType::U8, {1}, data, 1}}).find("reserved"),
            std::string::npos);
  EXPECT_NE(error_of({{"w", DType::F32, {2}, data, 4}})
                .find("tensor 'w': size mismatch: nbytes is 4 but dtype F32 with shape [2] "
                      "needs 8 bytes"),
            std::string::npos);
  EXPECT_NE(error_of({{"w", DType::U8, {-1}, data, 0}}).find("shape[0] is negative"),
            std::string::npos);
  EXPECT_NE(error_of({{"w", DType::U8, {2}, nullptr, 2}}).find("data is null"), std::string::npos);
  EXPECT_NE(error_of({{"bad\xff", DType::U8, {1}, data, 1}}).find("not valid UTF-8"),
            std::string::npos);
  try {
    duquant::io::serialize_safetensors({}, {{"k", "\xc3"}});
    FAIL() << "expected an error";
  } catch (const SafetensorsError& error) {
    EXPECT_NE(std::string(error.what()).find("not valid UTF-8"), std::string::npos);
  }
}

TEST_F(TempDirTest, WriteIntoMissingDirectoryFailsCleanly) {
  const std::string missing_dir = dir_ + "/no/such/dir";
  const std::string path = missing_dir + "/model.safetensors";
  const uint8_t byte = 1;
  try {
    duquant::io::write_safetensors(path, {{"t", DType::U8, {1}, &byte, 1}}, {});
    FAIL() << "expected an error";
  } catch (const SafetensorsError& error) {
    const std::string message = error.what();
    EXPECT_EQ(message.rfind(path + ": cannot create temporary file", 0), 0u) << message;
  }
  struct stat info {};
  EXPECT_NE(stat((dir_ + "/no").c_str(), &info), 0);
  EXPECT_TRUE(list_directory(dir_).empty());
}

TEST_F(TempDirTest, FailedWriteLeavesExistingTargetUntouched) {
  const std::string path = dir_ + "/model.safetensors";
  const float old_values[3] = {1, 2, 3};
  duquant::io::write_safetensors(path, {{"old", DType::F32, {3}, old_values, 12}}, {{"v", "1"}});
  const auto before = read_whole_file(path);

  const float new_values[2] = {4, 5};
  const std::vector<std::vector<TensorToWrite>> invalid_lists = {
      {{"w", DType::F32, {2}, new_values, 8}, {"w", DType::F32, {2}, new_values, 8}},
      {{"w", DType::F32, {3}, new_values, 8}},
      {{"__metadata__", DType::F32, {2}, new_values, 8}},
      {{"", DType::F32, {2}, new_values, 8}},
  };
  for (const auto& tensors : invalid_lists) {
    EXPECT_THROW(duquant::io::write_safetensors(path, tensors, {}), SafetensorsError);
    EXPECT_EQ(read_whole_file(path), before);
    EXPECT_EQ(list_directory(dir_), std::vector<std::string>{"model.safetensors"});
  }
}

TEST_F(TempDirTest, FailedRenameRemovesTempFile) {
  // A directory as the target: everything succeeds except the rename.
  const std::string target = dir_ + "/is_a_dir";
  ASSERT_EQ(mkdir(target.c_str(), 0755), 0);
  const uint8_t byte = 1;
  try {
    duquant::io::write_safetensors(target, {{"t", DType::U8, {1}, &byte, 1}}, {});
    FAIL() << "expected an error";
  } catch (const SafetensorsError& error) {
    EXPECT_NE(std::string(error.what()).find("cannot rename"), std::string::npos) << error.what();
  }
  EXPECT_EQ(list_directory(dir_), std::vector<std::string>{"is_a_dir"});
}

TEST_F(TempDirTest, OverwriteReplacesContentAndKeepsPermissions) {
  const std::string path = dir_ + "/model.safetensors";
  const uint8_t a = 1, b = 2;
  duquant::io::write_safetensors(path, {{"a", DType::U8, {1}, &a, 1}}, {});
  ASSERT_EQ(chmod(path.c_str(), 0640), 0);
  duquant::io::write_safetensors(path, {{"b", DType::U8, {}, &b, 1}}, {});
  const auto file = SafetensorsFile::open(path);
  EXPECT_EQ(file.names(), std::vector<std::string>{"b"});
  EXPECT_EQ(file.tensor("b").data[0], 2);
  struct stat info {};
  ASSERT_EQ(stat(path.c_str(), &info), 0);
  EXPECT_EQ(info.st_mode & 0777, 0640u);
  EXPECT_EQ(list_directory(dir_), std::vector<std::string>{"model.safetensors"});
}

// SIGKILL during write_safetensors: the target must parse and hold either the
// old content or (if the child got all the way through the rename) the
// complete new content, never a mix. A killed writer may leave its
// "<target>.tmp.<pid>.<random>" file behind; that is documented behaviour, so
// the test removes such leftovers itself.
TEST_F(TempDirTest, KilledWriteLeavesOldFileIntact) {
  const std::string name = "model.safetensors";
  const std::string path = dir_ + "/" + name;
  const float old_values[4] = {1, 2, 3, 4};
  auto write_old = [&] {
    duquant::io::write_safetensors(path, {{"old", DType::F32, {4}, old_values, 16}},
                                   {{"version", "old"}});
  };
  write_old();

  constexpr size_t kTensorBytes = 4u << 20;  // 16 tensors x 4 MiB = 64 MiB
  constexpr int kTensorCount = 16;
  int interrupted = 0, completed = 0, leftover_temp_files = 0;
  for (int delay_us : {0, 200, 1000, 3000, 8000, 20000, 60000}) {
    SCOPED_TRACE("delay_us=" + std::to_string(delay_us));
    int ready[2];
    ASSERT_EQ(pipe(ready), 0);
    const pid_t child = fork();
    ASSERT_GE(child, 0);
    if (child == 0) {
      close(ready[0]);
      std::vector<uint8_t> payload(kTensorBytes * kTensorCount, 0xAB);
      std::vector<TensorToWrite> tensors;
      for (int i = 0; i < kTensorCount; ++i) {
        tensors.push_back({"big." + std::to_string(100 + i), DType::U8,
                           {static_cast<int64_t>(kTensorBytes)},
                           payload.data() + i * kTensorBytes, kTensorBytes});
      }
      const char go = 'g';
      if (write(ready[1], &go, 1) != 1) _exit(2);
      try {
        duquant::io::write_safetensors(path, tensors, {{"version", "new"}});
      } catch (...) {
        _exit(1);
      }
      _exit(0);
    }
    close(ready[1]);
    char go = 0;
    ASSERT_EQ(read(ready[0], &go, 1), 1);  // payload is built; write starts now
    close(ready[0]);
    usleep(static_cast<useconds_t>(delay_us));
    kill(child, SIGKILL);
    int status = 0;
    ASSERT_EQ(waitpid(child, &status, 0), child);

    const auto file = SafetensorsFile::open(path);
    if (file.metadata().at("version") == "old") {
      ++interrupted;
      ASSERT_EQ(file.names(), std::vector<std::string>{"old"});
      EXPECT_EQ(std::memcmp(file.tensor("old").data, old_values, 16), 0);
    } else {
      ++completed;
      ASSERT_EQ(file.size(), static_cast<size_t>(kTensorCount));
      for (const auto& view : file.tensors()) {
        ASSERT_EQ(view.nbytes, kTensorBytes);
        for (size_t i = 0; i < view.nbytes; i += 4093) ASSERT_EQ(view.data[i], 0xAB);
      }
      write_old();
    }

    for (const auto& entry_name : list_directory(dir_)) {
      if (entry_name.rfind(name + ".tmp.", 0) == 0) {
        ++leftover_temp_files;
        unlink((dir_ + "/" + entry_name).c_str());
      }
    }
    EXPECT_EQ(list_directory(dir_), std::vector<std::string>{name});
  }
  std::printf(
      "[          ] kills that interrupted the write: %d, that came too late: %d, "
      "leftover temp files removed: %d\n",
      interrupted, completed, leftover_temp_files);
  EXPECT_GT(interrupted, 0);
}

}  // namespace
