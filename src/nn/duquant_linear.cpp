#include "duquant/duquant_linear.h"

#include "duquant/act_quant.h"
#include "duquant/fast_path.h"
#include "duquant/pack_linear.h"
#include "duquant/reference_forward.h"

namespace duquant {

DuQuantLinearImpl::DuQuantLinearImpl(LayerPack pack) { register_pack(std::move(pack)); }

DuQuantLinearImpl::DuQuantLinearImpl(const torch::nn::Linear& linear, const Config& config) {
  auto bias = linear->options.bias() ? c10::optional<torch::Tensor>(linear->bias) : c10::nullopt;
  register_pack(pack_linear(linear->weight, bias, config, "Linear weight"));
}

void DuQuantLinearImpl::register_pack(LayerPack pack) {
  pack.validate("DuQuantLinear");
  config_ = pack.config;
  in_features_ = pack.in_features;
  out_features_ = pack.out_features;
  auto reg = [this](const char* name, torch::Tensor& slot, const torch::Tensor& t) {
    if (t.defined()) slot = register_buffer(name, t);
  };
  reg("qweight", qweight_, pack.qweight);
  reg("w_scale", w_scale_, pack.w_scale);
  reg("perm", perm_, pack.perm);
  reg("r_in", r_in_, pack.r_in);
  reg("r_out", r_out_, pack.r_out);
  reg("bias", bias_, pack.bias);
  reg("act_scale", act_scale_, pack.act_scale);
  reg("calib_state", calib_state_, pack.calib_state);
}

LayerPack DuQuantLinearImpl::pack() const {
  // Buffers are re-read by name: Module::to() replaces the registered tensors, not our members.
  LayerPack p;
  p.config = config_;
  p.in_features = in_features_;
  p.out_features = out_features_;
  for (const auto& item : named_buffers(/*recurse=*/false)) {
    const auto& k = item.key();
    const auto& v = item.value();
    if (k == "qweight") p.qweight = v;
    else if (k == "w_scale") p.w_scale = v;
    else if (k == "perm") p.perm = v;
    else if (k == "r_in") p.r_in = v;
    else if (k == "r_out") p.r_out = v;
    else if (k == "bias") p.bias = v;
    else if (k == "act_scale") p.act_scale = v;
    else if (k == "calib_state") p.calib_state = v;
  }
  return p;
}

bool DuQuantLinearImpl::calibrated() const {
  if (!config_.needs_calibration() || known_calibrated_) return true;
  known_calibrated_ = pack().calib_state[1].item<int64_t>() != 0;
  return known_calibrated_;
}

void DuQuantLinearImpl::finish_calibration() {
  if (!config_.needs_calibration()) return;
  auto state = pack().calib_state;
  duquant::finish_calibration(state, "DuQuantLinear");
  known_calibrated_ = true;
}

void DuQuantLinearImpl::reset_calibration() {
  if (!config_.needs_calibration()) return;
  auto p = pack();
  torch::NoGradGuard no_grad;
  p.act_scale.zero_();
  p.calib_state.zero_();
  known_calibrated_ = false;
}

torch::Tensor DuQuantLinearImpl::forward(const torch::Tensor& x) {
  auto layer = pack();
  if (calibrated()) return linear_forward(x, layer, /*quantize_acts=*/true);
  check_layer_input(x, layer);
  auto xt = input_transform(x.reshape({-1, in_features_}).to(torch::kFloat32), layer.perm, layer.r_in);
  observe_activations(xt, layer.act_scale, layer.calib_state, config_);
  auto out_shape = x.sizes().vec();
  out_shape.back() = out_features_;
  return linear_from_transformed(xt, layer, /*quantize_acts=*/false).reshape(out_shape).to(x.scalar_type());
}

std::string DuQuantLinearImpl::execution_path() const {
  const auto why = fast_path_blocker(pack());
  return why.empty() ? "cuda" : "reference (" + why + ")";
}

void DuQuantLinearImpl::pretty_print(std::ostream& stream) const {
  stream << "duquant::DuQuantLinear(in_features=" << in_features_ << ", out_features=" << out_features_
         << ", bias=" << (bias_.defined() ? "true" : "false") << ", " << config_.describe()
         << ", path=" << execution_path();
  if (config_.needs_calibration()) stream << ", calibrated=" << (known_calibrated_ ? "true" : "pending");
  stream << ")";
}

}  // namespace duquant
