#pragma once
// Batched symmetric eigensolvers, one per device type. The CPU one (Eigen) is always there; a GPU
// backend registers itself when the library is built with CUDA.

#include <functional>

#include <torch/torch.h>

namespace duquant {

// gram: float64 [b, n, n] symmetric. Returns float64 [b, n, n] whose columns are eigenvectors,
// descending eigenvalue; signs are left to the caller (canonical_signs).
using SymmetricEigensolver = std::function<torch::Tensor(const torch::Tensor& gram)>;

void register_symmetric_eigensolver(c10::DeviceType device, SymmetricEigensolver solver);

// Dispatches on gram's device; throws naming the device when no solver is registered for it.
torch::Tensor symmetric_eigenvectors_descending(const torch::Tensor& gram);

}  // namespace duquant
