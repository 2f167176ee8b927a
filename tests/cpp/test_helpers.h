#pragma once
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <string>

namespace duquant_test {

// Relative Frobenius error ||a - b|| / ||b|| in float64.
inline double rel_err(const torch::Tensor& a, const torch::Tensor& b) {
  auto a64 = a.to(torch::kFloat64), b64 = b.to(torch::kFloat64);
  return ((a64 - b64).norm() / b64.norm()).item<double>();
}

// A weight whose columns carry a few large outliers, like real LLM/VLA layers.
inline torch::Tensor outlier_weight(int64_t n, int64_t k, uint64_t seed) {
  torch::manual_seed(seed);
  auto w = torch::randn({n, k}, torch::kFloat32) * 0.02;
  auto cols = torch::randperm(k).narrow(0, 0, std::max<int64_t>(1, k / 10));
  w.index_copy_(1, cols, w.index_select(1, cols) * 12.0);
  return w;
}

#define EXPECT_THROW_WITH(stmt, needle)                                                     \
  do {                                                                                      \
    bool thrown = false;                                                                    \
    try {                                                                                   \
      stmt;                                                                                 \
    } catch (const std::exception& e) {                                                     \
      thrown = true;                                                                        \
      EXPECT_NE(std::string(e.what()).find(needle), std::string::npos)                      \
          << "message: " << e.what() << "\nexpected to contain: " << (needle);              \
    }                                                                                       \
    EXPECT_TRUE(thrown) << "expected an exception containing: " << (needle);                \
  } while (0)

}  // namespace duquant_test
