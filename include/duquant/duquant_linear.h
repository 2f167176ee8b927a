#pragma once
// duquant::DuQuantLinear: a drop-in replacement for torch::nn::Linear whose permutation, block
// rotations, pre-quantized weights and calibration state are registered buffers.

#include <torch/torch.h>

#include "duquant/config.h"
#include "duquant/layer_pack.h"

namespace duquant {

class DuQuantLinearImpl : public torch::nn::Module {
 public:
  explicit DuQuantLinearImpl(LayerPack pack);
  // Packs linear's weight (on its device) with `config`; no float copy of the weight is kept.
  DuQuantLinearImpl(const torch::nn::Linear& linear, const Config& config);

  // Static act modes: the first calib_steps calls observe activations and run without activation
  // quantization; later calls quantize with the calibrated scales.
  torch::Tensor forward(const torch::Tensor& x);

  bool calibrated() const;
  void finish_calibration();  // use the batches seen so far (at least one)
  void reset_calibration();

  const Config& config() const { return config_; }
  int64_t in_features() const { return in_features_; }
  int64_t out_features() const { return out_features_; }
  // The module's current buffers as a pack (shares storage).
  LayerPack pack() const;
  // Which implementation forward uses for inputs on the buffers' device: "cuda" (the fast kernels)
  // or "reference (<why not cuda>)".
  std::string execution_path() const;

  void pretty_print(std::ostream& stream) const override;

 private:
  void register_pack(LayerPack pack);

  Config config_;
  int64_t in_features_ = 0, out_features_ = 0;
  mutable bool known_calibrated_ = false;  // host mirror: avoids a device sync per forward once true
};

TORCH_MODULE(DuQuantLinear);

}  // namespace duquant
