// libFuzzer target: parse arbitrary bytes as a safetensors file. Any input must
// either parse or throw SafetensorsError; anything else (crash, sanitizer
// report, other exception) is a bug. Accepted files are also read in full and
// round-tripped through the writer, which must reproduce the same tensors.
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <vector>

#include "duquant/io/safetensors.h"

using duquant::io::SafetensorsError;
using duquant::io::SafetensorsFile;
using duquant::io::TensorToWrite;

namespace {

void check_round_trip(const SafetensorsFile& file) {
  std::vector<TensorToWrite> tensors;
  unsigned checksum = 0;
  for (const auto& view : file.tensors()) {
    // Touch every byte so ASan flags any view that escapes the buffer.
    for (size_t i = 0; i < view.nbytes; ++i) checksum += view.data[i];
    tensors.push_back({view.name, view.dtype, view.shape, view.data, view.nbytes});
  }
  // Everything the reader accepts, the writer must accept and reproduce.
  const auto rewritten = duquant::io::serialize_safetensors(tensors, file.metadata());
  const auto reread = SafetensorsFile::from_bytes(rewritten);
  if (reread.metadata() != file.metadata() || reread.size() != file.size()) std::abort();
  for (const auto& view : file.tensors()) {
    const auto& other = reread.tensor(view.name);
    if (other.dtype != view.dtype || other.shape != view.shape || other.nbytes != view.nbytes ||
        (view.nbytes && std::memcmp(other.data, view.data, view.nbytes) != 0)) {
      std::abort();
    }
  }
  // Keep the checksum loop from being optimised away.
  volatile unsigned sink = checksum;
  (void)sink;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::optional<SafetensorsFile> file;
  try {
    file.emplace(SafetensorsFile::from_bytes(std::vector<uint8_t>(data, data + size)));
  } catch (const SafetensorsError&) {
    return 0;  // rejection is the expected outcome for most inputs
  }
  try {
    check_round_trip(*file);
  } catch (...) {
    std::abort();  // the writer or re-reader refused what the reader accepted
  }
  return 0;
}
