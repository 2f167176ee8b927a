// duquant-pack: quantizes the linear layers of a safetensors checkpoint into a duquant pack file.
#include <CLI/CLI.hpp>

#include <cstdio>
#include <filesystem>
#include <iostream>
#include <map>
#include <set>

#include <ATen/CPUGeneratorImpl.h>
#include <torch/torch.h>

#include "checkpoint.h"
#include "console.h"
#include "duquant/io/pack_file.h"
#include "duquant/pack_model.h"
#include "duquant/reference_forward.h"
#include "layer_selection.h"

namespace fs = std::filesystem;
using namespace duquant::tools;

namespace {

constexpr const char* kTool = "duquant-pack";
constexpr int64_t kProbeTokens = 16;

constexpr const char* kDescription = R"(duquant-pack: quantize the linear layers of a checkpoint into a duquant pack file.

Example:
  duquant-pack model.safetensors.index.json -o model.duquant.safetensors --device cuda \
      --wbits-for 'down_proj:8' --copy-rest

IN is a .safetensors file or a sharded checkpoint's *.index.json. A layer is a 2-D "<name>.weight"
tensor (F32, F16, BF16 or F64); "<name>.bias" is packed with it. A layer is quantized when its name
matches --include, does not match --exclude (both regular expressions, searched in the name, as
duquant_ext.quantize_ does) and lies under --scope. The checkpoint has no module types, so an
embedding or lm_head matched by a broad --include is quantized like a linear layer.
--wbits-for PATTERN:BITS (repeatable) sets a layer's weight bits: PATTERN is an exact layer name or
a regular expression searched in it; when several match, the last one given wins; one that matches
no selected layer is an error.

OUT is written atomically (a temporary file renamed over it when complete): on any error it is left
as it was. IN is only read. The closing table gives each layer's relative output error
||y_q - y_f|| / ||y_f|| on a random probe input through the reference forward (weights only for the
static act modes, which calibrate after loading).

Exit status: 0 ok; 1 failure (bad or unreadable file, bad weight, I/O, device unavailable);
2 usage error (unknown flag, bad value, IN missing).)";

struct Options {
  std::string in, out;
  SelectionRules rules;
  std::vector<std::string> wbits_for;
  duquant::Config config;
  std::string row_rot = "restore", act = "dynamic", device = "cpu";
  bool no_permute = false, dry_run = false, copy_rest = false, no_share_inputs = false;
};

duquant::Config config_from(const Options& o) {
  duquant::Config c = o.config;
  c.permute = !o.no_permute;
  try {
    c.row_rot = duquant::row_rotation_from_string(o.row_rot);
    c.act = duquant::act_mode_from_string(o.act);
    c.validate();
  } catch (const std::invalid_argument& e) {
    throw UsageError(e.what());
  }
  return c;
}

torch::Device device_from(const std::string& text) {
  if (text != "cpu" && text.rfind("cuda", 0) != 0)
    throw UsageError("--device '" + text + "': expected cpu, cuda or cuda:N");
  torch::Device device(torch::kCPU);
  try {
    device = torch::Device(text);
  } catch (const std::exception&) {
    throw UsageError("--device '" + text + "': expected cpu, cuda or cuda:N");
  }
  if (device.is_cuda()) {
#ifdef DUQUANT_WITH_CUDA
    if (!torch::cuda::is_available())
      throw std::runtime_error("--device " + text + ": no CUDA GPU is visible to this process");
    const auto count = static_cast<int64_t>(torch::cuda::device_count());
    if (device.has_index() && device.index() >= count)
      throw std::runtime_error("--device " + text + ": this machine has " + std::to_string(count) + " CUDA device(s)");
#else
    throw std::runtime_error("--device " + text +
                             ": this duquant-pack was built without CUDA (rebuild against a CUDA LibTorch with "
                             "-DDUQUANT_WITH_CUDA=ON, or use --device cpu)");
#endif
  }
  return device;
}

// Refuses an OUT that is one of the input files: replacing it would modify IN.
void check_output_is_not_input(const std::string& out, const Checkpoint& checkpoint) {
  std::error_code ec;
  if (!fs::exists(out, ec)) return;
  for (const auto& file : checkpoint.files()) {
    if (fs::equivalent(out, file, ec))
      throw UsageError("-o " + out + " is an input file (" + file + "); write the pack elsewhere");
  }
}

std::string bits_label(const duquant::Config& c) {
  std::string w = c.quantize_weights() ? "W" + std::to_string(c.wbits) : "Wf";
  std::string a = c.quantize_acts() ? "A" + std::to_string(c.abits) : "Af";
  return w + a;
}

int64_t pack_bytes(const duquant::LayerPack& p) {
  int64_t total = 0;
  for (const auto* t : {&p.qweight, &p.w_scale, &p.perm, &p.r_in, &p.r_out, &p.bias, &p.act_scale, &p.calib_state})
    if (t->defined()) total += t->numel() * t->element_size();
  return total;
}

// ||y_q - y_f|| / ||y_f|| on a random probe x (seeded by the layer's position), y_f = x W^T + b with
// the weight as packed, on the packing device. float32 is ample for errors of 1e-3 and up and keeps
// this cheap next to the packing on a CPU.
double probe_error(size_t index, const duquant::LayerPack& pack, const torch::Tensor& weight,
                   const c10::optional<torch::Tensor>& bias) {
  torch::NoGradGuard no_grad;
  const auto device = weight.device();
  auto gen = at::detail::createCPUGenerator(static_cast<uint64_t>(index));
  auto x = torch::randn({kProbeTokens, pack.in_features}, gen, torch::kFloat32).to(device);
  auto y_f = torch::matmul(x, weight.to(torch::kFloat32).t());
  if (bias) y_f = y_f + bias->to(device, torch::kFloat32);
  auto y_q = duquant::reference_forward(x, pack, /*quantize_acts=*/!pack.config.needs_calibration());
  const double ref = y_f.norm().item<double>();
  const double err = (y_q - y_f).norm().item<double>();
  return ref > 0 ? err / ref : err;
}

void print_dry_run(const std::vector<SelectedLayer>& layers, const Checkpoint& checkpoint) {
  std::printf("%-56s %-16s %-5s %-6s %s\n", "layer", "shape", "dtype", "bits", "bias");
  int64_t bytes = 0;
  for (const auto& l : layers) {
    const auto& info = checkpoint.info(l.weight_tensor);
    bytes += static_cast<int64_t>(info.nbytes);
    std::printf("%-56s %-16s %-5s %-6s %s\n", l.name.c_str(), format_shape(info.shape).c_str(),
                duquant::io::dtype_name(info.dtype), bits_label(l.config).c_str(), l.bias_tensor ? "yes" : "no");
  }
  std::printf("dry run: %zu layer(s) would be quantized (%s of weights); nothing written\n", layers.size(),
              format_bytes(bytes).c_str());
}

int run(int argc, char** argv) {
  Options o;
  CLI::App app(kDescription, kTool);
  app.get_formatter()->column_width(34);
  app.add_option("IN", o.in, "a .safetensors file or a sharded checkpoint's *.index.json")
      ->required()
      ->check(CLI::ExistingFile);
  app.add_option("-o,--output", o.out, "the pack file to write (required unless --dry-run)")->type_name("OUT");
  app.add_option("--include", o.rules.include, "regex: layers to quantize ('' = every 2-D .weight)")
      ->type_name("REGEX")
      ->capture_default_str();
  app.add_option("--exclude", o.rules.exclude, "regex: layers to leave alone ('' = none)")
      ->type_name("REGEX")
      ->capture_default_str();
  app.add_option("--scope", o.rules.scope, "only layers at or under this dotted name prefix")->type_name("PREFIX");
  app.add_option("--wbits-for", o.wbits_for, "PATTERN:BITS, per-layer weight bits (repeatable; see above)")
      ->type_name("PATTERN:BITS")
      ->allow_extra_args(false);
  app.add_option("--wbits", o.config.wbits, "weight bits 2..8; 0 or 16 keep float weights")->capture_default_str();
  app.add_option("--abits", o.config.abits, "activation bits 2..8; 0 or 16 = weight-only")->capture_default_str();
  app.add_option("--block", o.config.block_size, "input rotation block size B")->capture_default_str();
  app.add_option("--block-out", o.config.block_out, "output rotation block size (0 = B)")->capture_default_str();
  app.add_flag("--no-permute", o.no_permute, "no energy-interleaving channel permutation");
  app.add_flag("--no-share-inputs", o.no_share_inputs,
               "pack q/k/v_proj, gate/up_proj (siblings reading one input) alone, not with one shared input "
               "transform (shared: their input is quantized once at run time)");
  app.add_option("--ls", o.config.ls, "energy smoothing (kept for compatibility)")->capture_default_str();
  app.add_option("--row-rot", o.row_rot, "restore | none")->capture_default_str();
  app.add_option("--act", o.act, "dynamic | static | static_channel")->capture_default_str();
  app.add_option("--act-pct", o.config.act_pct, "percentile for static scales")->capture_default_str();
  app.add_option("--calib-steps", o.config.calib_steps, "calibration batches for static modes")->capture_default_str();
  app.add_option("--device", o.device, "cpu | cuda | cuda:N: where packing runs")->capture_default_str();
  app.add_flag("--dry-run", o.dry_run, "list what would be quantized (name, shape, bits); write nothing");
  app.add_flag("--copy-rest", o.copy_rest, "also copy every other tensor, so OUT is a complete checkpoint");
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    if (e.get_exit_code() == 0) return app.exit(e);  // --help
    throw UsageError(e.what());
  }

  const auto start = std::chrono::steady_clock::now();
  const duquant::Config global = config_from(o);
  for (const auto& spec : o.wbits_for) o.rules.wbits_for.push_back(parse_wbits_override(spec));
  if (!o.dry_run && o.out.empty()) throw UsageError("-o OUT is required (or --dry-run)");
  const torch::Device device = device_from(o.device);

  const auto checkpoint = Checkpoint::open(o.in);
  if (!o.dry_run) check_output_is_not_input(o.out, checkpoint);
  const auto selected = select_layers(checkpoint, o.rules, global);
  if (o.dry_run) {
    print_dry_run(selected, checkpoint);
    return kExitOk;
  }
  if (selected.empty())
    throw std::runtime_error(o.in + ": no layer selected (include '" + o.rules.include + "', exclude '" +
                             o.rules.exclude + "'" + (o.rules.scope.empty() ? "" : ", scope '" + o.rules.scope + "'") +
                             "); try --dry-run with other patterns");

  std::vector<duquant::LinearToPack> todo;
  std::set<std::string> packed_tensors;
  for (const auto& l : selected) {
    duquant::LinearToPack item{l.name, checkpoint.tensor(l.weight_tensor), c10::nullopt, l.config, ""};
    if (l.bias_tensor) item.bias = checkpoint.tensor(*l.bias_tensor);
    packed_tensors.insert(l.weight_tensor);
    if (l.bias_tensor) packed_tensors.insert(*l.bias_tensor);
    todo.push_back(std::move(item));
  }

  ProgressBar bar("packed", todo.size());
  duquant::PackModelOptions pack_options;
  pack_options.device = device;
  pack_options.share_inputs = !o.no_share_inputs;
  std::vector<double> errors(todo.size(), 0.0);
  // Measured while each weight is still on the device, not after (that would move it twice).
  pack_options.on_packed = [&](size_t i, const torch::Tensor& weight, const duquant::LayerPack& pack) {
    errors[i] = probe_error(i, pack, weight, todo[i].bias);
  };
  auto packed = duquant::pack_linears(
      todo, [&](size_t done, size_t, const std::string& name) { bar.update(done, name); }, pack_options);
  bar.finish();

  std::vector<std::pair<std::string, torch::Tensor>> extra;
  if (o.copy_rest) {
    for (const auto& name : checkpoint.names())
      if (!packed_tensors.count(name)) extra.emplace_back(name, checkpoint.tensor(name));
  }
  std::map<std::string, std::string> metadata{{"source", fs::path(o.in).filename().string()},
                                              {"created_by", kTool}};
  duquant::write_pack(o.out, packed, global, extra, metadata);

  // The closing table: what each layer became.
  std::printf("%-56s %-16s %-6s %12s %12s %10s\n", "layer", "shape", "bits", "before", "after", "rel.err");
  int64_t before_total = 0, after_total = 0;
  for (size_t i = 0; i < packed.size(); ++i) {
    const auto& l = selected[i];
    const auto& info = checkpoint.info(l.weight_tensor);
    const int64_t before = static_cast<int64_t>(info.nbytes) +
                           (l.bias_tensor ? static_cast<int64_t>(checkpoint.info(*l.bias_tensor).nbytes) : 0);
    const int64_t after = pack_bytes(packed[i].pack);
    before_total += before;
    after_total += after;
    std::printf("%-56s %-16s %-6s %12s %12s %10.4f%s\n", l.name.c_str(), format_shape(info.shape).c_str(),
                bits_label(l.config).c_str(), format_bytes(before).c_str(), format_bytes(after).c_str(), errors[i],
                l.config.needs_calibration() ? " (weights only)" : "");
  }
  int64_t extra_bytes = 0;
  for (const auto& [name, t] : extra) extra_bytes += t.numel() * t.element_size();
  std::error_code ec;
  const auto out_size = fs::file_size(o.out, ec);
  std::printf("total: %zu layer(s) %s -> %s (%.3fx)", packed.size(), format_bytes(before_total).c_str(),
              format_bytes(after_total).c_str(), before_total ? double(after_total) / double(before_total) : 0.0);
  if (o.copy_rest) std::printf(", %zu other tensor(s) copied (%s)", extra.size(), format_bytes(extra_bytes).c_str());
  if (global.needs_calibration())  // --wbits-for changes weight bits only
    std::printf("\nnote: static activation scales are not in the pack yet; layers calibrate on their first "
                "calib_steps forward calls after loading");
  std::printf("\nwrote %s (%s) in %.2f s on %s\n", o.out.c_str(), ec ? "?" : format_bytes(out_size).c_str(),
              seconds_since(start), device.str().c_str());
  return kExitOk;
}

}  // namespace

int main(int argc, char** argv) {
  return run_tool(kTool, [&] { return run(argc, argv); });
}
