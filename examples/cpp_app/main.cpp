// A LibTorch application linking the installed duquant package: loads a pack file and runs its
// layers as duquant::DuQuantLinear modules.
//
//   duquant_cpp_app                       packs two random layers into a temporary pack file,
//                                         loads it back and checks the outputs against the float layers
//   duquant_cpp_app PACK [LAYER...]       loads PACK and runs every layer (or the named ones)
//
// Layers run on CUDA when available, else on the CPU.
#include <duquant/duquant.h>
#include <duquant/io/pack_file.h>

#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <iomanip>
#include <iostream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

namespace {

// The float layers behind the self-made pack, to compare the quantized outputs with.
using FloatLayers = std::map<std::string, torch::nn::Linear>;

std::string shape_of(const torch::Tensor& t) {
  std::ostringstream s;
  s << t.sizes();
  return s.str();
}

FloatLayers write_demo_pack(const std::string& path) {
  torch::manual_seed(0);
  FloatLayers linears{
      {"model.layers.0.self_attn.q_proj", torch::nn::Linear(torch::nn::LinearOptions(256, 256))},
      {"model.layers.0.mlp.down_proj", torch::nn::Linear(torch::nn::LinearOptions(512, 192).bias(false))},
  };
  duquant::Config config;  // W4A8, dynamic per-token activations, 16x16 block rotations
  std::vector<duquant::PackedLayer> layers;
  for (const auto& [name, linear] : linears) {
    c10::optional<torch::Tensor> bias;
    if (linear->bias.defined()) bias = linear->bias.detach();
    layers.push_back({name, duquant::pack_linear(linear->weight.detach(), bias, config, name)});
  }
  duquant::write_pack(path, layers, config);
  std::cout << "wrote " << layers.size() << " packed layers to " << path << "\n";
  return linears;
}

int run_pack(const std::string& path, std::vector<std::string> names, const FloatLayers& reference) {
  const auto device = torch::cuda::is_available() ? torch::Device(torch::kCUDA) : torch::Device(torch::kCPU);
  const auto pack = duquant::PackFile::open(path);
  if (names.empty()) names = pack.layer_names();
  std::cout << "pack " << pack.path() << ": format version " << pack.format_version() << ", "
            << pack.layer_names().size() << " layers, config " << pack.config().describe() << ", running on "
            << device << "\n";

  int failures = 0;
  for (const auto& name : names) {
    const auto& info = pack.layer(name);  // throws naming the layer when the pack lacks it
    duquant::DuQuantLinear layer(pack.load_layer(name, device));
    torch::NoGradGuard no_grad;
    auto x = torch::randn({4, info.in_features}, torch::TensorOptions().device(device));
    auto y = layer(x);
    std::cout << "  " << name << ": " << info.in_features << " -> " << info.out_features
              << (info.has_bias ? " +bias" : "") << ", " << info.config.describe() << ", x " << shape_of(x)
              << " -> y " << shape_of(y) << " " << y.dtype() << ", path " << layer->execution_path();
    auto float_layer = reference.find(name);
    if (float_layer != reference.end()) {
      auto linear = float_layer->second;
      linear->to(device);
      auto y_float = linear(x);
      double rel_err = ((y - y_float).norm() / y_float.norm()).item<double>();
      std::cout << ", relative error vs float " << std::setprecision(3) << rel_err;
      if (!(rel_err < 0.2)) {
        std::cout << " (too large: expected < 0.2 for W4A8 on Gaussian weights)";
        ++failures;
      }
    }
    std::cout << "\n";
  }
  return failures == 0 ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    if (argc >= 2) {
      std::string arg = argv[1];
      if (arg == "-h" || arg == "--help") {
        std::cout << "usage: " << argv[0] << " [PACK.safetensors [LAYER...]]\n"
                  << "Without arguments, packs two random layers into a temporary file and loads it.\n";
        return 0;
      }
      return run_pack(arg, std::vector<std::string>(argv + 2, argv + argc), {});
    }
    const auto path = (std::filesystem::temp_directory_path() /
                       ("duquant_cpp_app_" + std::to_string(::getpid()) + ".safetensors"))
                          .string();
    struct RemoveOnExit {
      std::string path;
      ~RemoveOnExit() { std::remove(path.c_str()); }
    } cleanup{path};
    auto reference = write_demo_pack(path);
    return run_pack(path, {}, reference);
  } catch (const std::exception& e) {
    std::cerr << "duquant_cpp_app: " << e.what() << "\n";
    return 1;
  }
}
