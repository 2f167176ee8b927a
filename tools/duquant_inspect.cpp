// duquant-inspect: what a duquant pack file holds (format, config, layers, sizes), as text or JSON.
#include <CLI/CLI.hpp>

#include <cstdio>
#include <filesystem>
#include <iostream>
#include <map>
#include <nlohmann/json.hpp>

#include "console.h"
#include "duquant/io/pack_file.h"

using namespace duquant::tools;

namespace {

constexpr const char* kTool = "duquant-inspect";

constexpr const char* kDescription = R"(duquant-inspect: describe a duquant pack file.

Example:
  duquant-inspect model.duquant.safetensors          # a table
  duquant-inspect model.duquant.safetensors --json   # the same, machine-readable

Shows the format version, the global config, each layer (name, shape out x in, weight/activation
bits, activation mode, bias, bytes), the extra tensors (those of no layer, e.g. from
duquant-pack --copy-rest) and the sizes. The file is validated as it is opened.

Exit status: 0 ok; 1 failure (missing, malformed or not a duquant pack); 2 usage error.)";

struct LayerRow {
  duquant::PackFile::LayerInfo info;
  int64_t bytes = 0;
};

std::string bits_text(int64_t bits) { return (bits >= 2 && bits <= 8) ? std::to_string(bits) : "float"; }

int run(int argc, char** argv) {
  std::string path;
  bool as_json = false;
  CLI::App app(kDescription, kTool);
  app.add_option("FILE", path, "a pack file written by duquant-pack or duquant_ext")->required();
  app.add_flag("--json", as_json, "print JSON instead of a table");
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    if (e.get_exit_code() == 0) return app.exit(e);  // --help
    throw UsageError(e.what());
  }
  if (!std::filesystem::exists(path)) throw std::runtime_error(path + ": no such file");

  const auto pack = duquant::PackFile::open(path);  // byte sizes come from its header: no tensor data is read

  std::vector<LayerRow> rows;
  int64_t layer_total = 0;
  for (const auto& name : pack.layer_names()) {
    LayerRow row{pack.layer(name), 0};
    for (const auto& field : duquant::kLayerTensorFields) row.bytes += pack.tensor_bytes(name + "." + field.name);
    layer_total += row.bytes;
    rows.push_back(row);
  }
  const auto extra_names = pack.extra_tensor_names();
  int64_t extra_total = 0;
  for (const auto& name : extra_names) extra_total += pack.tensor_bytes(name);
  const auto file_bytes = static_cast<int64_t>(std::filesystem::file_size(path));
  std::map<std::string, std::string> user_metadata;
  for (const auto& [k, v] : pack.metadata())
    if (k != "format" && k != "format_version" && k != "duquant") user_metadata[k] = v;

  if (as_json) {
    nlohmann::ordered_json j;
    j["file"] = path;
    j["format_version"] = pack.format_version();
    j["config"] = nlohmann::json::parse(pack.config().to_json());
    j["layers"] = nlohmann::ordered_json::array();
    for (const auto& r : rows) {
      nlohmann::ordered_json l;
      l["name"] = r.info.name;
      l["out_features"] = r.info.out_features;
      l["in_features"] = r.info.in_features;
      l["wbits"] = r.info.config.wbits;
      l["abits"] = r.info.config.abits;
      l["act"] = duquant::to_string(r.info.config.act);
      l["has_bias"] = r.info.has_bias;
      l["bytes"] = r.bytes;
      l["config"] = nlohmann::json::parse(r.info.config.to_json());
      j["layers"].push_back(l);
    }
    j["extra_tensors"] = {{"count", extra_names.size()}, {"bytes", extra_total}, {"names", extra_names}};
    j["bytes"] = {{"layers", layer_total}, {"extra", extra_total}, {"file", file_bytes}};
    j["metadata"] = user_metadata;
    std::cout << j.dump(2) << "\n";
    return kExitOk;
  }

  std::printf("%s: duquant pack, format version %d\n", path.c_str(), pack.format_version());
  std::printf("config: %s\n", pack.config().describe().c_str());
  for (const auto& [k, v] : user_metadata) std::printf("metadata: %s = %s\n", k.c_str(), v.c_str());
  std::printf("\n%-56s %-14s %5s %5s %-15s %-4s %12s\n", "layer", "out x in", "wbits", "abits", "act", "bias", "bytes");
  for (const auto& r : rows) {
    const auto& c = r.info.config;
    const std::string shape = std::to_string(r.info.out_features) + " x " + std::to_string(r.info.in_features);
    std::printf("%-56s %-14s %5s %5s %-15s %-4s %12s\n", r.info.name.c_str(), shape.c_str(), bits_text(c.wbits).c_str(),
                bits_text(c.abits).c_str(), c.quantize_acts() ? duquant::to_string(c.act) : "-",
                r.info.has_bias ? "yes" : "no", format_bytes(r.bytes).c_str());
  }
  std::printf("\nlayers: %zu (%s)\n", rows.size(), format_bytes(layer_total).c_str());
  std::printf("extra tensors: %zu (%s)\n", extra_names.size(), format_bytes(extra_total).c_str());
  std::printf("file: %s\n", format_bytes(file_bytes).c_str());
  return kExitOk;
}

}  // namespace

int main(int argc, char** argv) {
  return run_tool(kTool, [&] { return run(argc, argv); });
}
