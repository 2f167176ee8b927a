// CPU backend of the batched symmetric eigensolver: Eigen, one block per task, blocks in parallel.
#include <array>
#include <mutex>

#include <ATen/Parallel.h>
#include <Eigen/Dense>

#include "duquant/eigensolver.h"

namespace duquant {
namespace {

using RowMatrix = Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;

torch::Tensor eigen_cpu(const torch::Tensor& gram_in) {
  auto gram = gram_in.contiguous();
  const int64_t batch = gram.size(0), n = gram.size(1);
  auto out = torch::empty_like(gram);
  const double* src = gram.data_ptr<double>();
  double* dst = out.data_ptr<double>();
  at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      Eigen::Map<const RowMatrix> g(src + b * n * n, n, n);
      Eigen::SelfAdjointEigenSolver<Eigen::MatrixXd> solver(g);
      // Eigen sorts ascending; the contract is descending.
      Eigen::Map<RowMatrix> v(dst + b * n * n, n, n);
      v = solver.eigenvectors().rowwise().reverse();
    }
  });
  return out;
}

struct Registry {
  std::mutex mu;
  std::array<SymmetricEigensolver, static_cast<size_t>(c10::DeviceType::COMPILE_TIME_MAX_DEVICE_TYPES)> solvers;
};

Registry& registry() {
  static Registry r;
  return r;
}

const bool cpu_registered = [] {
  register_symmetric_eigensolver(c10::DeviceType::CPU, eigen_cpu);
  return true;
}();

}  // namespace

void register_symmetric_eigensolver(c10::DeviceType device, SymmetricEigensolver solver) {
  std::lock_guard<std::mutex> lock(registry().mu);
  registry().solvers.at(static_cast<size_t>(device)) = std::move(solver);
}

torch::Tensor symmetric_eigenvectors_descending(const torch::Tensor& gram) {
  TORCH_CHECK(gram.dim() == 3 && gram.size(1) == gram.size(2) && gram.scalar_type() == torch::kFloat64,
              "symmetric eigensolver wants float64 [b, n, n], got ", gram.sizes(), " ", gram.scalar_type());
  SymmetricEigensolver solver;
  {
    std::lock_guard<std::mutex> lock(registry().mu);
    solver = registry().solvers.at(static_cast<size_t>(gram.device().type()));
  }
  if (!solver)
    throw std::invalid_argument(std::string("duquant: no packer backend for device ") + gram.device().str() +
                                " (this build has none for it); move the weight to the CPU or build with CUDA");
  return solver(gram);
}

}  // namespace duquant
