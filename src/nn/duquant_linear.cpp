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
  for (const auto& field : kLayerTensorFields)
    if ((pack.*field.member).defined()) register_buffer(field.name, pack.*field.member);
}

LayerPack DuQuantLinearImpl::pack() const {
  // Buffers are re-read by name: Module::to() replaces the registered tensors, not our members.
  LayerPack p;
  p.config = config_;
  p.in_features = in_features_;
  p.out_features = out_features_;
  for (const auto& item : named_buffers(/*recurse=*/false))
    for (const auto& field : kLayerTensorFields)
      if (item.key() == field.name) p.*field.member = item.value();
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
         << ", bias=" << (named_buffers(/*recurse=*/false).contains("bias") ? "true" : "false") << ", " << config_.describe()
         << ", path=" << execution_path();
  if (config_.needs_calibration()) stream << ", calibrated=" << (known_calibrated_ ? "true" : "pending");
  stream << ")";
}

}  // namespace duquant
