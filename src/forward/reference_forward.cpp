#include "duquant/reference_forward.h"

#include <sstream>

#include "duquant/act_quant.h"
#include "duquant/pack_linear.h"
#include "duquant/weight_quant.h"

namespace duquant {

torch::Tensor input_transform(const torch::Tensor& x, const torch::Tensor& perm, const torch::Tensor& r_in) {
  auto xp = perm.defined() ? x.index_select(1, perm) : x;
  return rotate_column_blocks(xp, r_in);
}

torch::Tensor restore_rows(const torch::Tensor& y, const torch::Tensor& r_out) {
  return r_out.defined() ? rotate_column_blocks(y, r_out) : y;
}

void check_layer_input(const torch::Tensor& x, const LayerPack& layer, const std::string& where) {
  if (!x.defined()) throw std::invalid_argument(where + ": input is undefined");
  const auto dt = x.scalar_type();
  if (dt != torch::kFloat32 && dt != torch::kFloat16 && dt != torch::kBFloat16)
    throw std::invalid_argument(where + ": input must be float32, float16 or bfloat16, got " +
                                std::string(c10::toString(dt)));
  if (x.dim() < 1 || x.size(-1) != layer.in_features) {
    std::ostringstream s;
    s << where << ": input's last dimension must be in_features=" << layer.in_features << ", got shape "
      << x.sizes();
    throw std::invalid_argument(s.str());
  }
  if (x.device() != layer.qweight.device())
    throw std::invalid_argument(where + ": input is on " + x.device().str() + " but the layer is on " +
                                layer.qweight.device().str() + "; move one of them (.to(device))");
}

torch::Tensor linear_from_transformed(const torch::Tensor& xt_in, const LayerPack& layer, bool quantize_acts) {
  const Config& cfg = layer.config;
  auto xt = xt_in;
  if (quantize_acts && cfg.quantize_acts()) {
    torch::Tensor scale;
    if (cfg.act == ActMode::kDynamic) {
      scale = dynamic_act_scales(xt, cfg.abits);
    } else {
      TORCH_CHECK(layer.act_scale.defined(), "static activation scales are missing");
      scale = layer.act_scale;
    }
    xt = act_codes(xt, scale, cfg.abits) * scale;
  }
  auto w = dequantize_weight(layer.qweight, layer.w_scale, cfg.wbits, layer.in_features);
  auto y = restore_rows(torch::mm(xt, w.t()), layer.r_out);
  if (layer.bias.defined()) y = y + layer.bias;
  return y;
}

torch::Tensor reference_forward(const torch::Tensor& x, const LayerPack& layer, bool quantize_acts) {
  check_layer_input(x, layer);
  auto out_shape = x.sizes().vec();
  out_shape.back() = layer.out_features;
  auto xt = input_transform(x.reshape({-1, layer.in_features}).to(torch::kFloat32), layer.perm, layer.r_in);
  return linear_from_transformed(xt, layer, quantize_acts).reshape(out_shape).to(x.scalar_type());
}

}  // namespace duquant
