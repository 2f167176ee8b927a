#include "duquant/layer_pack.h"

#include <sstream>

namespace duquant {
namespace {

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

struct Expect {
  const std::string& where;
  void operator()(const char* name, const torch::Tensor& t, bool should_exist, std::vector<int64_t> shape,
                  torch::ScalarType dtype) const {
    if (!should_exist) {
      if (t.defined()) throw std::invalid_argument(where + ": tensor '" + name + "' is present but the config has no use for it");
      return;
    }
    if (!t.defined()) throw std::invalid_argument(where + ": tensor '" + name + "' is missing");
    if (t.sizes() != c10::IntArrayRef(shape) || t.scalar_type() != dtype) {
      std::ostringstream s;
      s << where << ": tensor '" << name << "' should be " << c10::toString(dtype) << " " << c10::IntArrayRef(shape)
        << ", got " << c10::toString(t.scalar_type()) << " " << t.sizes();
      throw std::invalid_argument(s.str());
    }
  }
};

}  // namespace

void LayerPack::validate(const std::string& where, bool with_calibration_state) const {
  config.validate();
  if (in_features < 1 || out_features < 1)
    throw std::invalid_argument(where + ": in_features and out_features must be positive");
  const int64_t k = in_features, n = out_features, b = config.block_size, bo = config.effective_block_out();
  Expect expect{where};
  expect("perm", perm, config.permute, {k}, torch::kInt64);
  expect("r_in", r_in, true, {ceil_div(k, b), b, b}, torch::kFloat32);
  expect("r_out", r_out, config.row_rot == RowRotation::kRestore, {ceil_div(n, bo), bo, bo}, torch::kFloat32);
  if (!config.quantize_weights())
    expect("qweight", qweight, true, {n, k}, torch::kFloat32);
  else if (config.wbits <= 4)
    expect("qweight", qweight, true, {n, ceil_div(k, 2)}, torch::kUInt8);
  else
    expect("qweight", qweight, true, {n, k}, torch::kInt8);
  expect("w_scale", w_scale, config.quantize_weights(), {n}, torch::kFloat32);
  if (bias.defined()) expect("bias", bias, true, {n}, torch::kFloat32);
  const bool calib = config.needs_calibration();
  expect("act_scale", act_scale, calib, {config.act == ActMode::kStaticChannel ? k : 1}, torch::kFloat32);
  if (with_calibration_state) expect("calib_state", calib_state, calib, {2}, torch::kInt64);
}

LayerPack empty_layer_pack(int64_t in_features, int64_t out_features, bool has_bias, const Config& config,
                           const torch::Device& device) {
  config.validate();
  const int64_t k = in_features, n = out_features, b = config.block_size, bo = config.effective_block_out();
  auto f32 = torch::TensorOptions().dtype(torch::kFloat32).device(device);
  LayerPack p;
  p.config = config;
  p.in_features = k;
  p.out_features = n;
  if (config.permute) p.perm = torch::arange(k, f32.dtype(torch::kInt64));
  p.r_in = torch::eye(b, f32).repeat({ceil_div(k, b), 1, 1});
  if (config.row_rot == RowRotation::kRestore) p.r_out = torch::eye(bo, f32).repeat({ceil_div(n, bo), 1, 1});
  if (!config.quantize_weights())
    p.qweight = torch::zeros({n, k}, f32);
  else if (config.wbits <= 4)
    p.qweight = torch::zeros({n, ceil_div(k, 2)}, f32.dtype(torch::kUInt8));
  else
    p.qweight = torch::zeros({n, k}, f32.dtype(torch::kInt8));
  if (config.quantize_weights()) p.w_scale = torch::ones({n}, f32);
  if (has_bias) p.bias = torch::zeros({n}, f32);
  if (config.needs_calibration()) {
    p.act_scale = torch::zeros({config.act == ActMode::kStaticChannel ? k : 1}, f32);
    p.calib_state = torch::zeros({2}, f32.dtype(torch::kInt64));
  }
  return p;
}

}  // namespace duquant
