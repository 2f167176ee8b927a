#include "duquant/fast_path.h"

#include <array>
#include <atomic>
#include <cstdint>
#include <sstream>
#include <stdexcept>

#include "duquant/act_quant.h"
#include "duquant/reference_forward.h"

#ifdef DUQUANT_WITH_CUDA
#include "fast_path_cuda.h"
#endif

namespace duquant {

namespace {

// A process-wide choice among named kernels, for tests and benchmarks to force one; index 0 is
// "auto", and an index is the matching kernels:: enum value.
template <size_t N>
class KernelChoice {
 public:
  KernelChoice(const char* what, std::array<const char*, N> names) : what_(what), names_(names) {}
  void set(const std::string& which) {
    for (size_t i = 0; i < N; ++i)
      if (which == names_[i]) {
        index_ = static_cast<int>(i);
        return;
      }
    std::string allowed;
    for (size_t i = 0; i < N; ++i)
      allowed += std::string(i == 0 ? "" : i + 1 == N ? " or " : ", ") + "\"" + names_[i] + "\"";
    TORCH_CHECK(false, what_, " must be ", allowed, ", got \"", which, "\"");
  }
  std::string name() const { return names_[index_.load()]; }
  std::string name_of(int index) const { return index >= 0 && index < static_cast<int>(N) ? names_[index] : "?"; }
  int index() const { return index_.load(); }

 private:
  const char* what_;
  std::array<const char*, N> names_;
  std::atomic<int> index_{0};
};

KernelChoice<5> g_input_kernel("input kernel", {"auto", "split", "rows", "mma", "slices"});  // kernels::InputKernel
KernelChoice<3> g_weight_only_path("weight-only path", {"auto", "fused", "dense"});  // WeightOnlyPath
KernelChoice<9> g_gemm_tile("GEMM tile", {"auto", "stream", "32x32", "64x64", "128x128", "wgmma128",
                                          "wgmma256", "gemv", "gemv-direct"});  // kernels::GemmTile
// A process-wide split count for tests and benchmarks to force: 0 picks by size, 1..most forces.
class SplitCount {
 public:
  SplitCount(const char* what, int most) : what_(what), most_(most) {}
  void set(int64_t splits) {
    TORCH_CHECK(splits >= 0 && splits <= most_, what_, " must be 0 (picked by size) or 1..", most_, ", got ", splits);
    count_ = static_cast<int>(splits);
  }
  int get() const { return count_.load(); }

 private:
  const char* what_;
  int most_;
  std::atomic<int> count_{0};
};

SplitCount g_gemm_splits("GEMM splits", 64);
SplitCount g_input_splits("input splits", 8);
std::atomic<int> g_last_input_splits{0};  // the tensor-core input kernel's cluster size, last launch
std::atomic<int> g_last_input_kernel{-1};  // kernels::InputKernel of the last input launch, -1 before any
std::atomic<int> g_last_gemm_tile{-1};  // kernels::GemmTile of the last launch, -1 before any
std::atomic<int> g_last_gemm_splits{0};  // and the CTAs that shared each output tile's k range
std::atomic<int> g_last_weight_only_path{-1};  // WeightOnlyPath of the last weight-only forward, -1 before any

}  // namespace

void set_input_kernel(const std::string& which) { g_input_kernel.set(which); }
std::string input_kernel() { return g_input_kernel.name(); }
void set_input_splits(int64_t splits) { g_input_splits.set(splits); }
int input_splits() { return g_input_splits.get(); }
int input_kernel_index() { return g_input_kernel.index(); }

void set_gemm_tile(const std::string& which) { g_gemm_tile.set(which); }
std::string gemm_tile() { return g_gemm_tile.name(); }
int gemm_tile_index() { return g_gemm_tile.index(); }
void note_gemm_tile_launched(int tile, int splits) {
  g_last_gemm_tile = tile;
  g_last_gemm_splits = splits;
}
int last_gemm_splits() { return g_last_gemm_splits.load(); }
void note_input_launched(int kernel, int splits) {
  g_last_input_kernel = kernel;
  g_last_input_splits = splits;
}
int last_input_splits() { return g_last_input_splits.load(); }
std::string last_input_kernel() {
  const int k = g_last_input_kernel.load();
  return k < 0 ? std::string() : g_input_kernel.name_of(k);
}
std::string last_gemm_tile() {
  const int t = g_last_gemm_tile.load();
  return t < 0 ? std::string() : g_gemm_tile.name_of(t);
}

void set_weight_only_path(const std::string& which) { g_weight_only_path.set(which); }
std::string weight_only_path() { return g_weight_only_path.name(); }
int weight_only_path_index() { return g_weight_only_path.index(); }
void note_weight_only_launched(int path) { g_last_weight_only_path = path; }
std::string last_weight_only_path() {
  const int w = g_last_weight_only_path.load();
  return w < 0 ? std::string() : g_weight_only_path.name_of(w);
}

void set_gemm_splits(int64_t splits) { g_gemm_splits.set(splits); }
int gemm_splits() { return g_gemm_splits.get(); }

bool wgmma_gemm_available() {
#ifdef DUQUANT_WITH_CUDA
  return cuda_fast::wgmma_available();
#else
  return false;
#endif
}

bool fast_path_built() {
#ifdef DUQUANT_WITH_CUDA
  return true;
#else
  return false;
#endif
}

std::string fast_path_blocker(const LayerPack& layer, const torch::Tensor& x) {
  if (!fast_path_built()) return "built without CUDA kernels";
  const auto device = x.defined() ? x.device() : layer.qweight.device();
  if (!device.is_cuda()) return std::string("input on ") + device.str();
  if (x.defined()) {
    const auto dt = x.scalar_type();
    if (dt != torch::kFloat32 && dt != torch::kFloat16 && dt != torch::kBFloat16) return "input dtype";
  }
  const Config& c = layer.config;
  if (!c.quantize_weights()) return "unquantized weights (wbits=" + std::to_string(c.wbits) + ")";
#ifdef DUQUANT_WITH_CUDA
  if (!c.quantize_acts())
    if (auto why = cuda_fast::weight_only_blocker(layer, x); !why.empty()) return why;
#endif
  if (c.act == ActMode::kStaticChannel) return "static_channel scales are per input channel";
  if (layer.in_features % 32 != 0) return "in_features=" + std::to_string(layer.in_features) + " not a multiple of 32";
  if (layer.r_out.defined()) {
    const auto bo = c.effective_block_out();
    if (!(16 % bo == 0 || bo == 32)) return "block_out=" + std::to_string(bo) + " (kernels take 1-16 or 32)";
  }
#ifdef DUQUANT_WITH_CUDA
  return cuda_fast::device_blocker(layer, device);
#else
  return "built without CUDA kernels";
#endif
}

LayerPack kernel_operands(const LayerPack& layer, const std::string& where, bool* copied) {
  layer.validate(where, /*with_calibration_state=*/false);
  LayerPack out = layer;
  if (copied) *copied = false;
  for (const auto& field : kLayerTensorFields) {
    torch::Tensor& t = out.*field.member;
    if (!t.defined() || field.member == &LayerPack::calib_state) continue;  // a forward never reads it
    if (t.device() != layer.qweight.device())
      throw std::invalid_argument(where + ": tensor '" + field.name + "' is on " + t.device().str() +
                                  " but qweight is on " + layer.qweight.device().str());
    // 16-byte loads and copies: a view at an odd offset gets storage of its own.
    if (!t.is_contiguous()) t = t.contiguous();
    if (reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 != 0) t = t.clone();
    if (copied && !t.is_same(layer.*field.member)) *copied = true;
  }
  return out;
}

torch::Tensor linear_forward(const torch::Tensor& x, const LayerPack& layer, bool quantize_acts) {
#ifdef DUQUANT_WITH_CUDA
  // Weight-only layers have no activation quantization to skip, so calibration batches go fast too.
  if ((quantize_acts || !layer.config.quantize_acts()) && x.defined() && x.is_cuda() &&
      fast_path_blocker(layer, x).empty()) {
    check_layer_input(x, layer);
    // Kernels read a layer's constants before their chain wait (src/fast/fast_path_cuda.cpp): a
    // copy made just now is a kernel's output, so that call runs unchained.
    bool copied = false;
    const LayerPack operands = kernel_operands(layer, "duquant::linear", &copied);
    return cuda_fast::forward(x, operands, /*chain=*/!copied);
  }
#endif
  return reference_forward(x, layer, quantize_acts);
}

namespace {

// The checks linear_from_codes makes of its arguments against one layer.
void check_codes(const torch::Tensor& codes, const torch::Tensor& scales, const torch::Tensor& x,
                 const LayerPack& layer, const std::string& where) {
  check_layer_input(x, layer, where);
  const int64_t k = layer.in_features, t = x.numel() / k;
  if (!layer.config.quantize_acts())
    throw std::invalid_argument(where + ": the layer is weight-only (abits=0); it has no activation codes");
  if (!codes.defined() || codes.scalar_type() != torch::kInt8 || codes.dim() != 2 || codes.size(0) != t ||
      codes.size(1) != k || !scales.defined() || scales.scalar_type() != torch::kFloat32 || scales.dim() != 1 ||
      scales.size(0) != t) {
    std::ostringstream s;
    s << where << ": want int8 codes [" << t << ", " << k << "] and float32 scales [" << t << "] for input "
      << x.sizes() << ", got " << (codes.defined() ? codes.sizes() : c10::IntArrayRef{}) << " "
      << (codes.defined() ? c10::toString(codes.scalar_type()) : "undefined") << " and "
      << (scales.defined() ? scales.sizes() : c10::IntArrayRef{}) << " "
      << (scales.defined() ? c10::toString(scales.scalar_type()) : "undefined");
    throw std::invalid_argument(s.str());
  }
  if (codes.device() != x.device() || scales.device() != x.device())
    throw std::invalid_argument(where + ": codes, scales and input must be on one device");
}

// linear_from_codes on arguments check_codes has passed.
torch::Tensor linear_from_checked_codes(const torch::Tensor& codes, const torch::Tensor& scales,
                                        const torch::Tensor& x, const LayerPack& layer, const std::string& where) {
#ifdef DUQUANT_WITH_CUDA
  if (x.is_cuda() && fast_path_blocker(layer, x).empty()) {
    bool copied = false;
    const LayerPack operands = kernel_operands(layer, where, &copied);
    return cuda_fast::forward_codes(codes.contiguous(), scales.contiguous(), x, operands, /*chain=*/!copied);
  }
#endif
  auto out_shape = x.sizes().vec();
  out_shape.back() = layer.out_features;
  auto xt = codes.to(torch::kFloat32) * scales.unsqueeze(1);
  return linear_from_transformed(xt, layer, /*quantize_acts=*/false).reshape(out_shape).to(x.scalar_type());
}

}  // namespace

torch::Tensor linear_from_codes(const torch::Tensor& codes, const torch::Tensor& scales, const torch::Tensor& x,
                                const LayerPack& layer) {
  const std::string where = "duquant::linear_codes";
  check_codes(codes, scales, x, layer, where);
  return linear_from_checked_codes(codes, scales, x, layer, where);
}

std::vector<torch::Tensor> linear_from_codes_group(const torch::Tensor& codes, const torch::Tensor& scales,
                                                   const torch::Tensor& x, const std::vector<LayerPack>& layers) {
  const std::string where = "duquant::linear_codes_group";
  if (layers.empty()) throw std::invalid_argument(where + ": no layers");
  for (const auto& l : layers) check_codes(codes, scales, x, l, where);
#ifdef DUQUANT_WITH_CUDA
  const LayerPack& first = layers[0];
  auto block_out = [](const LayerPack& l) { return l.r_out.defined() ? l.r_out.size(1) : int64_t{0}; };
  bool together = x.is_cuda();
  for (const auto& l : layers)
    together = together && fast_path_blocker(l, x).empty() && l.config.wbits == first.config.wbits &&
               block_out(l) == block_out(first);
  if (together) {
    bool chain = true;
    std::vector<LayerPack> operands;
    for (const auto& l : layers) {
      bool copied = false;
      operands.push_back(kernel_operands(l, where, &copied));
      chain = chain && !copied;
    }
    return cuda_fast::forward_codes_group(codes.contiguous(), scales.contiguous(), x, operands, chain);
  }
#endif
  std::vector<torch::Tensor> out;
  for (const auto& l : layers) out.push_back(linear_from_checked_codes(codes, scales, x, l, where));
  return out;
}

std::tuple<torch::Tensor, torch::Tensor> quantize_input(const torch::Tensor& x, const torch::Tensor& perm,
                                                        const torch::Tensor& r_in, const torch::Tensor& static_scale,
                                                        int64_t abits) {
  TORCH_CHECK(x.dim() == 2, "quantize_input: x must be [tokens, in_features], got ", x.sizes());
  TORCH_CHECK(abits >= 2 && abits <= 8, "quantize_input: abits must be 2..8, got ", abits);
#ifdef DUQUANT_WITH_CUDA
  if (x.is_cuda()) return cuda_fast::quantize_input(x, perm, r_in, static_scale, abits);
#endif
  auto xt = input_transform(x.to(torch::kFloat32), perm, r_in);
  auto scale = static_scale.defined() ? static_scale.to(torch::kFloat32).expand({xt.size(0), 1})
                                      : dynamic_act_scales(xt, abits);
  auto codes = act_codes(xt, scale, abits).to(torch::kInt8);
  return {codes, scale.reshape({-1}).contiguous()};
}

}  // namespace duquant
