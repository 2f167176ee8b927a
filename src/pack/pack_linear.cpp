#include "duquant/pack_linear.h"

#include <sstream>

#include "duquant/weight_quant.h"

namespace duquant {

void check_linear_weight(const torch::Tensor& weight, const c10::optional<torch::Tensor>& bias,
                         const std::string& where, bool check_weight_values) {
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
  if (check_weight_values && !torch::isfinite(weight).all().item<bool>()) {
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

SharedInputTransform shared_input_transform(const torch::Tensor& w, const Config& config) {
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == torch::kFloat64,
              "shared_input_transform wants float64 [N, K] (the siblings' weights stacked by rows), got ", w.sizes(),
              " ", w.scalar_type());
  torch::NoGradGuard no_grad;
  SharedInputTransform t;
  torch::Tensor w_perm = w;
  if (config.permute) {
    t.perm = channel_permutation(w, config.ls);
    w_perm = w.index_select(1, t.perm);
  }
  t.r_in = column_block_rotations(w_perm, config.block_size);
  return t;
}

std::vector<LayerPack> pack_weight_stack(const torch::Tensor& w, const std::vector<torch::Tensor>& biases,
                                         const Config& config, const SharedInputTransform* shared) {
  TORCH_CHECK(w.dim() == 3 && w.scalar_type() == torch::kFloat64, "pack_weight_stack wants float64 [L, N, K], got ",
              w.sizes(), " ", w.scalar_type());
  const int64_t layers = w.size(0), n = w.size(1), k = w.size(2);
  TORCH_CHECK(static_cast<int64_t>(biases.size()) == layers, "pack_weight_stack: ", layers, " weights but ",
              biases.size(), " biases");
  torch::NoGradGuard no_grad;

  // All packing math in float64 on the weights' device; only the stored results are narrowed.
  torch::Tensor perm, w_perm = w, r_in;
  if (shared) {
    TORCH_CHECK(shared->r_in.defined() && shared->perm.defined() == config.permute &&
                    (!config.permute || shared->perm.size(0) == k) &&
                    shared->r_in.size(0) == (k + config.block_size - 1) / config.block_size,
                "pack_weight_stack: the shared input transform does not fit these layers");
    if (config.permute) {
      perm = shared->perm.to(w.device()).unsqueeze(0).expand({layers, k}).contiguous();
      w_perm = w.index_select(2, perm[0]);
    }
    r_in = shared->r_in.to(w.device()).unsqueeze(0).expand({layers, -1, -1, -1}).contiguous();
  } else if (config.permute) {
    // Per layer (a handful of small ops each); the expensive steps below run on the whole stack.
    std::vector<torch::Tensor> perms;
    perms.reserve(layers);
    for (int64_t l = 0; l < layers; ++l) perms.push_back(channel_permutation(w[l], config.ls));
    perm = torch::stack(perms);  // [L, K]
    w_perm = w.gather(2, perm.unsqueeze(1).expand({layers, n, k}));
  }
  if (!shared) r_in = column_block_rotations(w_perm, config.block_size);  // [L, nb, B, B]
  auto w_t = rotate_column_blocks(w_perm, r_in);                   // W' = W~ * blockdiag(R_in)

  torch::Tensor r_out;
  if (config.row_rot == RowRotation::kRestore) {
    // R_out[j] = U of svd(W[rows_j, :]) = eigenvectors of the Gram matrix of W^T's column block j.
    r_out = column_block_rotations(w.transpose(1, 2), config.effective_block_out());
    // W''[rows_j] = R_out[j] * W'[rows_j]  <=>  W''^T = W'^T * blockdiag(R_out^T).
    w_t = rotate_column_blocks(w_t.transpose(1, 2), r_out.transpose(2, 3)).transpose(1, 2).contiguous();
  }

  torch::Tensor qweight, w_scale;
  if (config.quantize_weights()) {
    // Rows are independent: the stack is just more rows.
    auto q = quantize_rows(w_t.reshape({layers * n, k}), config.wbits);
    auto codes = config.wbits <= 4 ? pack_int4(q.codes) : q.codes;
    qweight = codes.reshape({layers, n, codes.size(1)});
    w_scale = q.scales.reshape({layers, n});
  } else {
    qweight = w_t.to(torch::kFloat32);
  }
  auto r_in32 = r_in.to(torch::kFloat32);
  auto r_out32 = r_out.defined() ? r_out.to(torch::kFloat32) : r_out;

  // Each layer owns its tensors: a view into the stack would keep the whole stack alive.
  auto own = [&](const torch::Tensor& t, int64_t l) {
    if (!t.defined()) return t;
    return layers == 1 ? t[0] : t[l].clone();
  };
  std::vector<LayerPack> packs(layers);
  for (int64_t l = 0; l < layers; ++l) {
    LayerPack& pack = packs[l];
    pack.config = config;
    pack.out_features = n;
    pack.in_features = k;
    pack.perm = own(perm, l);
    pack.r_in = own(r_in32, l);
    pack.r_out = own(r_out32, l);
    pack.qweight = own(qweight, l);
    pack.w_scale = own(w_scale, l);
    if (biases[l].defined()) pack.bias = biases[l].detach().to(w.device(), torch::kFloat32).contiguous();
    if (config.needs_calibration()) {
      const int64_t n_scales = config.act == ActMode::kStaticChannel ? k : 1;
      pack.act_scale = torch::zeros({n_scales}, w.options().dtype(torch::kFloat32));
      pack.calib_state = torch::zeros({2}, w.options().dtype(torch::kInt64));
    }
  }
  return packs;
}

LayerPack pack_linear(const torch::Tensor& weight, const c10::optional<torch::Tensor>& bias, const Config& config,
                      const std::string& where) {
  config.validate();
  check_linear_weight(weight, bias, where);
  torch::NoGradGuard no_grad;
  auto w = weight.detach().to(torch::kFloat64).contiguous().unsqueeze(0);
  return pack_weight_stack(w, {bias && bias->defined() ? *bias : torch::Tensor()}, config)[0];
}

}  // namespace duquant
