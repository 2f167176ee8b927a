#include "duquant/pack_linear.h"

#include <sstream>

#include "duquant/weight_quant.h"

namespace duquant {
namespace {

void check_weight(const torch::Tensor& weight, const c10::optional<torch::Tensor>& bias, const std::string& where) {
  auto fail = [&](const std::string& msg) { throw std::invalid_argument(where + ": " + msg); };
  if (!weight.defined()) fail("weight is undefined");
  if (weight.dim() != 2) {
    std::ostringstream s;
    s << "weight must be 2-D [out_features, in_features], got shape " << weight.sizes();
    fail(s.str());
  }
  if (!weight.is_floating_point())
    fail(std::string("weight must be float32/float16/bfloat16/float64, got ") + c10::toString(weight.scalar_type()));
  if (weight.numel() == 0) fail("weight is empty");
  if (!torch::isfinite(weight).all().item<bool>()) {
    auto bad = torch::nonzero(~torch::isfinite(weight))[0];
    std::ostringstream s;
    s << "weight contains NaN/Inf (first at row " << bad[0].item<int64_t>() << ", column " << bad[1].item<int64_t>()
      << ")";
    fail(s.str());
  }
  if (bias && bias->defined()) {
    if (bias->dim() != 1 || bias->size(0) != weight.size(0)) {
      std::ostringstream s;
      s << "bias must have shape [" << weight.size(0) << "], got " << bias->sizes();
      fail(s.str());
    }
    if (!bias->is_floating_point()) fail("bias must be floating point");
    if (!torch::isfinite(*bias).all().item<bool>()) fail("bias contains NaN/Inf");
    if (bias->device() != weight.device()) fail("bias and weight are on different devices");
  }
}

}  // namespace

LayerPack pack_linear(const torch::Tensor& weight, const c10::optional<torch::Tensor>& bias, const Config& config,
                      const std::string& where) {
  config.validate();
  check_weight(weight, bias, where);
  torch::NoGradGuard no_grad;

  LayerPack pack;
  pack.config = config;
  pack.out_features = weight.size(0);
  pack.in_features = weight.size(1);

  // All packing math in float64 on the weight's device; only the stored results are narrowed.
  auto w = weight.detach().to(torch::kFloat64).contiguous();
  auto w_perm = w;
  if (config.permute) {
    pack.perm = channel_permutation(w, config.ls);
    w_perm = w.index_select(1, pack.perm);
  }
  auto r_in = column_block_rotations(w_perm, config.block_size);
  auto w_t = rotate_column_blocks(w_perm, r_in);  // W' = W~ * blockdiag(R_in)
  pack.r_in = r_in.to(torch::kFloat32);

  if (config.row_rot == RowRotation::kRestore) {
    // R_out[j] = U of svd(W[rows_j, :]) = eigenvectors of the Gram matrix of W^T's column block j.
    auto r_out = column_block_rotations(w.t(), config.effective_block_out());
    // W''[rows_j] = R_out[j] * W'[rows_j]  <=>  W''^T = W'^T * blockdiag(R_out^T).
    w_t = rotate_column_blocks(w_t.t(), r_out.transpose(1, 2)).t().contiguous();
    pack.r_out = r_out.to(torch::kFloat32);
  }

  if (config.quantize_weights()) {
    auto q = quantize_rows(w_t, config.wbits);
    pack.qweight = config.wbits <= 4 ? pack_int4(q.codes) : q.codes;
    pack.w_scale = q.scales;
  } else {
    pack.qweight = w_t.to(torch::kFloat32);
  }
  if (bias && bias->defined()) pack.bias = bias->detach().to(torch::kFloat32).contiguous();

  if (config.needs_calibration()) {
    const int64_t n_scales = config.act == ActMode::kStaticChannel ? pack.in_features : 1;
    pack.act_scale = torch::zeros({n_scales}, w.options().dtype(torch::kFloat32));
    pack.calib_state = torch::zeros({2}, w.options().dtype(torch::kInt64));
  }
  return pack;
}

}  // namespace duquant
