// Op schemas of the library, registered with the dispatcher so Python (torch.ops.duquant.*),
// TorchScript and torch.compile see one set of entry points.
#include <torch/library.h>

#include <stdexcept>
#include <string>

#include "duquant/act_quant.h"
#include "duquant/fast_path.h"
#include "duquant/reference_forward.h"

namespace duquant {
namespace {

LayerPack layer_from_args(const at::Tensor& qweight, const c10::optional<at::Tensor>& w_scale,
                          const c10::optional<at::Tensor>& perm, const at::Tensor& r_in,
                          const c10::optional<at::Tensor>& r_out, const c10::optional<at::Tensor>& bias,
                          const c10::optional<at::Tensor>& act_scale, int64_t in_features, int64_t wbits,
                          int64_t abits, c10::string_view act) {
  LayerPack p;
  p.config.wbits = wbits;
  p.config.abits = abits;
  p.config.act = act_mode_from_string(std::string(act));
  p.config.block_size = r_in.size(1);
  p.config.permute = perm.has_value();
  p.config.row_rot = r_out.has_value() ? RowRotation::kRestore : RowRotation::kNone;
  if (r_out) p.config.block_out = r_out->size(1);
  p.in_features = in_features;
  p.out_features = qweight.size(0);
  p.qweight = qweight;
  p.r_in = r_in;
  if (w_scale) p.w_scale = *w_scale;
  if (perm) p.perm = *perm;
  if (r_out) p.r_out = *r_out;
  if (bias) p.bias = *bias;
  if (act_scale) p.act_scale = *act_scale;
  return p;
}

at::Tensor linear_op(const at::Tensor& x, const at::Tensor& qweight, const c10::optional<at::Tensor>& w_scale,
                     const c10::optional<at::Tensor>& perm, const at::Tensor& r_in,
                     const c10::optional<at::Tensor>& r_out, const c10::optional<at::Tensor>& bias,
                     const c10::optional<at::Tensor>& act_scale, int64_t in_features, int64_t wbits, int64_t abits,
                     c10::string_view act, bool quantize_acts) {
  auto layer = layer_from_args(qweight, w_scale, perm, r_in, r_out, bias, act_scale, in_features, wbits, abits, act);
  return linear_forward(x, layer, quantize_acts);
}

// Shapes only: lets torch.compile / FakeTensor trace the op without running it.
at::Tensor linear_meta(const at::Tensor& x, const at::Tensor& qweight, const c10::optional<at::Tensor>&,
                       const c10::optional<at::Tensor>&, const at::Tensor&, const c10::optional<at::Tensor>&,
                       const c10::optional<at::Tensor>&, const c10::optional<at::Tensor>&, int64_t in_features,
                       int64_t, int64_t, c10::string_view, bool) {
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == in_features, "duquant::linear: input's last dimension must be ",
              in_features, ", got ", x.sizes());
  auto shape = x.sizes().vec();
  shape.back() = qweight.size(0);
  return at::empty(shape, x.options());
}

// The layers of linear_codes_group, from its lists (one entry per layer).
std::vector<LayerPack> group_from_args(at::TensorList qweights, const c10::List<c10::optional<at::Tensor>>& w_scales,
                                       const at::Tensor& r_in, const c10::List<c10::optional<at::Tensor>>& r_outs,
                                       const c10::List<c10::optional<at::Tensor>>& biases, int64_t in_features,
                                       int64_t wbits, int64_t abits) {
  const size_t n = qweights.size();
  if (w_scales.size() != n || r_outs.size() != n || biases.size() != n)
    throw std::invalid_argument("duquant::linear_codes_group: " + std::to_string(n) + " qweights but " +
                                std::to_string(w_scales.size()) + " w_scales, " + std::to_string(r_outs.size()) +
                                " r_outs and " + std::to_string(biases.size()) + " biases");
  std::vector<LayerPack> layers;
  for (size_t i = 0; i < n; ++i)
    layers.push_back(layer_from_args(qweights[i], w_scales.get(i), c10::nullopt, r_in, r_outs.get(i), biases.get(i),
                                     c10::nullopt, in_features, wbits, abits, "dynamic"));
  return layers;
}

std::vector<at::Tensor> linear_codes_group_op(const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& x,
                                              at::TensorList qweights,
                                              const c10::List<c10::optional<at::Tensor>>& w_scales,
                                              const at::Tensor& r_in,
                                              const c10::List<c10::optional<at::Tensor>>& r_outs,
                                              const c10::List<c10::optional<at::Tensor>>& biases, int64_t in_features,
                                              int64_t wbits, int64_t abits) {
  return linear_from_codes_group(
      codes, scales, x, group_from_args(qweights, w_scales, r_in, r_outs, biases, in_features, wbits, abits));
}

std::vector<at::Tensor> linear_codes_group_meta(const at::Tensor&, const at::Tensor&, const at::Tensor& x,
                                                at::TensorList qweights, const c10::List<c10::optional<at::Tensor>>&,
                                                const at::Tensor&, const c10::List<c10::optional<at::Tensor>>&,
                                                const c10::List<c10::optional<at::Tensor>>&, int64_t in_features,
                                                int64_t, int64_t) {
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == in_features,
              "duquant::linear_codes_group: input's last dimension must be ", in_features, ", got ", x.sizes());
  std::vector<at::Tensor> out;
  for (const auto& w : qweights) {
    auto shape = x.sizes().vec();
    shape.back() = w.size(0);
    out.push_back(at::empty(shape, x.options()));
  }
  return out;
}

std::tuple<at::Tensor, at::Tensor> quantize_input_op(const at::Tensor& x, const c10::optional<at::Tensor>& perm,
                                                     const at::Tensor& r_in,
                                                     const c10::optional<at::Tensor>& static_scale, int64_t abits) {
  return quantize_input(x, perm ? *perm : at::Tensor(), r_in, static_scale ? *static_scale : at::Tensor(), abits);
}

std::tuple<at::Tensor, at::Tensor> quantize_input_meta(const at::Tensor& x, const c10::optional<at::Tensor>&,
                                                       const at::Tensor&, const c10::optional<at::Tensor>&, int64_t) {
  return {at::empty(x.sizes(), x.options().dtype(at::kChar)), at::empty({x.size(0)}, x.options().dtype(at::kFloat))};
}

void observe_op(const at::Tensor& x, const c10::optional<at::Tensor>& perm, const at::Tensor& r_in,
                at::Tensor& act_scale, at::Tensor& calib_state, int64_t abits, c10::string_view act, double act_pct,
                int64_t calib_steps) {
  Config cfg;
  cfg.abits = abits;
  cfg.act = act_mode_from_string(std::string(act));
  cfg.act_pct = act_pct;
  cfg.calib_steps = calib_steps;
  const int64_t k = act_scale.size(0) > 1 ? act_scale.size(0) : x.size(-1);
  auto xt = input_transform(x.reshape({-1, k}).to(torch::kFloat32), perm ? *perm : at::Tensor(), r_in);
  observe_activations(xt, act_scale, calib_state, cfg);
}

}  // namespace

TORCH_LIBRARY(duquant, m) {
  m.def(
      "linear(Tensor x, Tensor qweight, Tensor? w_scale, Tensor? perm, Tensor r_in, Tensor? r_out, Tensor? bias, "
      "Tensor? act_scale, int in_features, int wbits, int abits, str act, bool quantize_acts) -> Tensor");
  m.def("quantize_input(Tensor x, Tensor? perm, Tensor r_in, Tensor? static_scale, int abits) -> (Tensor, Tensor)");
  // The GEMM half of linear for sibling layers sharing an input transform (q/k/v, gate/up), from
  // quantize_input's codes and scales: one output each, one GEMM launch where it can. r_in only
  // gives the block size; x the outputs' dtype and shape.
  m.def(
      "linear_codes_group(Tensor codes, Tensor scales, Tensor x, Tensor[] qweights, Tensor?[] w_scales, Tensor r_in, "
      "Tensor?[] r_outs, Tensor?[] biases, int in_features, int wbits, int abits) -> Tensor[]");
  m.def(
      "observe_activations(Tensor x, Tensor? perm, Tensor r_in, Tensor(a!) act_scale, Tensor(b!) calib_state, "
      "int abits, str act, float act_pct, int calib_steps) -> ()",
      &observe_op);
}

// One implementation for every backend (it picks the CUDA kernels itself), a shape-only one for Meta.
TORCH_LIBRARY_IMPL(duquant, CompositeExplicitAutograd, m) {
  m.impl("linear", &linear_op);
  m.impl("quantize_input", &quantize_input_op);
  m.impl("linear_codes_group", &linear_codes_group_op);
}

TORCH_LIBRARY_IMPL(duquant, Meta, m) {
  m.impl("linear", &linear_meta);
  m.impl("quantize_input", &quantize_input_meta);
  m.impl("linear_codes_group", &linear_codes_group_meta);
}

}  // namespace duquant
