#include "duquant/weight_quant.h"

#include "duquant/act_quant.h"

namespace duquant {

QuantizedRows quantize_rows(const torch::Tensor& w, int64_t bits) {
  TORCH_CHECK(bits >= 2 && bits <= 8, "quantize_rows: bits must be 2..8, got ", bits);
  const double qmax = qmax_for_bits(bits), qmin = -qmax - 1.0;
  auto base = w.abs().amax(1, /*keepdim=*/true) / qmax;
  torch::Tensor best_err, best_scale;
  // Candidates in the contract's order; strict "<" keeps the first on ties.
  for (double a : {0.5, 0.75, 1.0, 1.25, 1.5}) {
    auto scale = (base / a).clamp_min(1e-8);
    auto deq = (w / scale).round().clamp(qmin, qmax) * scale;
    auto err = (deq - w).square().mean(1, /*keepdim=*/true);
    if (!best_err.defined()) {
      best_err = err;
      best_scale = scale;
    } else {
      auto better = err < best_err;
      best_err = torch::where(better, err, best_err);
      best_scale = torch::where(better, scale, best_scale);
    }
  }
  QuantizedRows out;
  out.codes = (w / best_scale).round().clamp(qmin, qmax).to(torch::kInt8);
  out.scales = best_scale.squeeze(1).to(torch::kFloat32);
  return out;
}

torch::Tensor dequantize_weight(const torch::Tensor& qweight, const torch::Tensor& w_scale, int64_t wbits,
                                int64_t in_features) {
  if (!(wbits >= 2 && wbits <= 8)) return qweight.to(torch::kFloat32);
  auto codes = wbits <= 4 ? unpack_int4(qweight, in_features) : qweight;
  return codes.to(torch::kFloat32) * w_scale.to(torch::kFloat32).unsqueeze(1);
}

}  // namespace duquant
