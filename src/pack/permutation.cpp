#include <vector>

#include "duquant/pack_linear.h"

namespace duquant {

torch::Tensor channel_permutation(const torch::Tensor& w, double ls) {
  const int64_t k = w.size(1);
  auto energy = w.square().mean(0);
  // Smoothing toward the mean is monotone, so it keeps the order; applied for config fidelity.
  energy = (1.0 - ls) * energy + ls * energy.mean();
  auto order = std::get<1>(torch::sort(energy, /*stable=*/true, /*dim=*/0, /*descending=*/true));

  // Interleave from both ends: largest, smallest, 2nd largest, 2nd smallest, ...
  std::vector<int64_t> pick(k);
  for (int64_t j = 0; j < k; ++j) pick[j] = (j % 2 == 0) ? j / 2 : k - 1 - j / 2;
  auto pick_t = torch::tensor(pick, torch::dtype(torch::kInt64)).to(order.device());
  return order.index_select(0, pick_t).contiguous();
}

}  // namespace duquant
