#pragma once
// Activation quantization (DESIGN.md §2): dynamic per-token scales, static scales from calibration.

#include <torch/torch.h>

#include "duquant/config.h"

namespace duquant {

inline double qmax_for_bits(int64_t bits) { return static_cast<double>((int64_t{1} << (bits - 1)) - 1); }

// Per-token scales of x' (float32 [T, K]) -> float32 [T, 1]: max|x'_t| / qmax, floor 1e-8.
torch::Tensor dynamic_act_scales(const torch::Tensor& xt, int64_t abits);

// Codes round(x'/s) (half to even), clamped to [-2^(a-1), 2^(a-1)-1], as float32 (exact integers).
// `scale` broadcasts: [T, 1] per token, [1] per layer, [K] per channel.
torch::Tensor act_codes(const torch::Tensor& xt, const torch::Tensor& scale, int64_t abits);

// Linear-interpolated percentile along `dim` (as torch.quantile, no size limit); q in [0, 1].
torch::Tensor percentile(const torch::Tensor& values, double q, int64_t dim);
torch::Tensor percentile_all(const torch::Tensor& values, double q);

// The static scale one calibration batch asks for: float32 [1] (static) or [K] (static_channel).
torch::Tensor batch_static_scale(const torch::Tensor& xt, const Config& config);

// Folds one batch into the running calibration state in place: act_scale = max(act_scale, batch
// scale) (the scale is monotone in the percentile, so this is the max over batches), counts the
// batch, and marks the state finished once calib_steps batches were seen.
void observe_activations(const torch::Tensor& xt, torch::Tensor& act_scale, torch::Tensor& calib_state,
                         const Config& config);

// Marks calibration finished with the batches seen so far; throws if none was seen.
void finish_calibration(torch::Tensor& calib_state, const std::string& where = "layer");

}  // namespace duquant
