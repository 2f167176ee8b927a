// CUDA backend of the batched symmetric eigensolver: one cuSOLVER call for all blocks of a layer.
// syevjBatched (Jacobi, n <= 32) or XsyevBatched (any n); DUQUANT_CUDA_EIGENSOLVER=syevj|xsyev
// picks one, otherwise syevj where it applies. Both leave eigenvalues ascending, vectors in
// columns of column-major matrices.
#include <cstdlib>
#include <string>
#include <vector>

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cusolverDn.h>

#include "duquant/eigensolver.h"

namespace duquant {
namespace {

void check(cusolverStatus_t status, const char* what) {
  TORCH_CHECK(status == CUSOLVER_STATUS_SUCCESS, "duquant: ", what, " failed with cuSOLVER status ",
              static_cast<int>(status));
}

// One handle per thread and device, made on first use (torch's own solver handle is not exported
// from libtorch_cuda in every release).
cusolverDnHandle_t solver_handle(c10::DeviceIndex device) {
  struct Handles {
    std::vector<cusolverDnHandle_t> by_device;
    ~Handles() {
      for (auto h : by_device)
        if (h) cusolverDnDestroy(h);
    }
  };
  thread_local Handles handles;
  if (static_cast<size_t>(device) >= handles.by_device.size()) handles.by_device.resize(device + 1, nullptr);
  auto& h = handles.by_device[device];
  if (!h) check(cusolverDnCreate(&h), "cusolverDnCreate");
  check(cusolverDnSetStream(h, c10::cuda::getCurrentCUDAStream(device).stream()), "cusolverDnSetStream");
  return h;
}

std::string choice() {
  const char* env = std::getenv("DUQUANT_CUDA_EIGENSOLVER");
  return env ? std::string(env) : std::string();
}

void syevj_batched(cusolverDnHandle_t handle, torch::Tensor& a, torch::Tensor& w, torch::Tensor& info) {
  const int n = static_cast<int>(a.size(1)), batch = static_cast<int>(a.size(0));
  syevjInfo_t params = nullptr;
  check(cusolverDnCreateSyevjInfo(&params), "cusolverDnCreateSyevjInfo");
  // Tolerance at double precision and enough sweeps that nearly-equal eigenvalues still converge.
  cusolverDnXsyevjSetTolerance(params, 1e-14);
  cusolverDnXsyevjSetMaxSweeps(params, 100);
  int lwork = 0;
  auto status = cusolverDnDsyevjBatched_bufferSize(handle, CUSOLVER_EIG_MODE_VECTOR, CUBLAS_FILL_MODE_LOWER, n,
                                                   a.data_ptr<double>(), n, w.data_ptr<double>(), &lwork, params,
                                                   batch);
  if (status == CUSOLVER_STATUS_SUCCESS) {
    auto work = torch::empty({std::max(lwork, 1)}, a.options());
    status = cusolverDnDsyevjBatched(handle, CUSOLVER_EIG_MODE_VECTOR, CUBLAS_FILL_MODE_LOWER, n,
                                     a.data_ptr<double>(), n, w.data_ptr<double>(), work.data_ptr<double>(), lwork,
                                     info.data_ptr<int>(), params, batch);
  }
  cusolverDnDestroySyevjInfo(params);
  check(status, "cusolverDnDsyevjBatched");
}

void xsyev_batched(cusolverDnHandle_t handle, torch::Tensor& a, torch::Tensor& w, torch::Tensor& info) {
  const int64_t n = a.size(1), batch = a.size(0);
  cusolverDnParams_t params = nullptr;
  check(cusolverDnCreateParams(&params), "cusolverDnCreateParams");
  size_t device_bytes = 0, host_bytes = 0;
  auto status = cusolverDnXsyevBatched_bufferSize(handle, params, CUSOLVER_EIG_MODE_VECTOR, CUBLAS_FILL_MODE_LOWER, n,
                                                  CUDA_R_64F, a.data_ptr(), n, CUDA_R_64F, w.data_ptr(), CUDA_R_64F,
                                                  &device_bytes, &host_bytes, batch);
  if (status == CUSOLVER_STATUS_SUCCESS) {
    auto device_ws = torch::empty({static_cast<int64_t>(std::max<size_t>(device_bytes, 1))},
                                  a.options().dtype(torch::kUInt8));
    std::vector<uint8_t> host_ws(std::max<size_t>(host_bytes, 1));
    status = cusolverDnXsyevBatched(handle, params, CUSOLVER_EIG_MODE_VECTOR, CUBLAS_FILL_MODE_LOWER, n, CUDA_R_64F,
                                    a.data_ptr(), n, CUDA_R_64F, w.data_ptr(), CUDA_R_64F, device_ws.data_ptr(),
                                    device_bytes, host_ws.data(), host_bytes, info.data_ptr<int>(), batch);
  }
  cusolverDnDestroyParams(params);
  check(status, "cusolverDnXsyevBatched");
}

torch::Tensor eigen_cuda(const torch::Tensor& gram) {
  c10::cuda::CUDAGuard guard(gram.device());
  const int64_t batch = gram.size(0), n = gram.size(1);
  // Symmetric input: row-major equals column-major. cuSOLVER overwrites it with the vectors.
  auto a = gram.contiguous().clone();
  auto w = torch::empty({batch, n}, gram.options());
  auto info = torch::zeros({batch}, gram.options().dtype(torch::kInt32));
  auto handle = solver_handle(gram.device().index());

  const std::string pick = choice();
  const bool use_syevj = pick == "syevj" || (pick.empty() && n <= 32);
  TORCH_CHECK(!(use_syevj && n > 32), "duquant: syevjBatched handles blocks up to 32, got ", n);
  if (use_syevj)
    syevj_batched(handle, a, w, info);
  else
    xsyev_batched(handle, a, w, info);
  // One synchronisation per call (per layer side), not per block.
  TORCH_CHECK(info.eq(0).all().item<bool>(), "duquant: cuSOLVER eigensolver did not converge for some blocks");
  // Column-major vectors read row-major are transposed; ascending -> descending.
  return a.transpose(1, 2).flip({2}).contiguous();
}

const bool cuda_registered = [] {
  register_symmetric_eigensolver(c10::DeviceType::CUDA, eigen_cuda);
  return true;
}();

}  // namespace
}  // namespace duquant
