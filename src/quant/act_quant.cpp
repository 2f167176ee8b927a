#include "duquant/act_quant.h"

#include <algorithm>
#include <cmath>

namespace duquant {

torch::Tensor dynamic_act_scales(const torch::Tensor& xt, int64_t abits) {
  return (xt.abs().amax(-1, /*keepdim=*/true) / qmax_for_bits(abits)).clamp_min(1e-8);
}

torch::Tensor act_codes(const torch::Tensor& xt, const torch::Tensor& scale, int64_t abits) {
  const double qmax = qmax_for_bits(abits);
  return (xt / scale).round().clamp(-qmax - 1.0, qmax);
}

torch::Tensor percentile(const torch::Tensor& values, double q, int64_t dim) {
  TORCH_CHECK(q >= 0.0 && q <= 1.0, "percentile: q must be in [0, 1], got ", q);
  const int64_t n = values.size(dim);
  TORCH_CHECK(n > 0, "percentile of an empty dimension");
  // Same interpolation as torch.quantile (linear between order statistics); kthvalue avoids
  // torch.quantile's input-size limit and a full sort.
  const double rank = q * static_cast<double>(n - 1);
  const int64_t below = static_cast<int64_t>(std::floor(rank));
  const int64_t above = std::min<int64_t>(below + 1, n - 1);
  const double weight = rank - static_cast<double>(below);
  auto lo = std::get<0>(values.kthvalue(below + 1, dim));
  if (weight == 0.0 || above == below) return lo;
  auto hi = std::get<0>(values.kthvalue(above + 1, dim));
  return torch::lerp(lo, hi, weight);
}

torch::Tensor percentile_all(const torch::Tensor& values, double q) { return percentile(values.reshape({-1}), q, 0); }

torch::Tensor batch_static_scale(const torch::Tensor& xt, const Config& config) {
  const double qmax = qmax_for_bits(config.abits), q = config.act_pct / 100.0;
  auto mag = xt.abs();
  if (config.act == ActMode::kStaticChannel) {
    // The prototype's per-channel rule: max(p_c, 1e-6) / qmax, floored at 1e-6.
    return (percentile(mag, q, 0).clamp_min(1e-6) / qmax).clamp_min(1e-6);
  }
  return (percentile_all(mag, q) / qmax).clamp_min(1e-8).reshape({1});
}

void observe_activations(const torch::Tensor& xt, torch::Tensor& act_scale, torch::Tensor& calib_state,
                         const Config& config) {
  torch::NoGradGuard no_grad;
  auto scale = batch_static_scale(xt, config);
  act_scale.copy_(torch::maximum(act_scale, scale));
  // Device-side bookkeeping: no host synchronisation per batch.
  auto seen = calib_state.narrow(0, 0, 1);
  seen.add_(1);
  calib_state.narrow(0, 1, 1).copy_((seen >= config.calib_steps).to(torch::kInt64).maximum(calib_state.narrow(0, 1, 1)));
}

void finish_calibration(torch::Tensor& calib_state, const std::string& where) {
  if (calib_state[0].item<int64_t>() == 0)
    throw std::invalid_argument(where + ": cannot finish calibration: no batch has been observed yet; run "
                                "forward on calibration data first");
  calib_state[1].fill_(1);
}

}  // namespace duquant
