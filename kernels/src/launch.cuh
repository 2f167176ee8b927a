#pragma once
// Programmatic dependent launch (Hopper): a kernel launched with `chained` may start while the
// kernel before it in the stream still runs; it must call pdl_wait() before touching anything
// that kernel writes (pdl_wait returns at once when there was no such launch, or before sm_90).
// A kernel calls pdl_trigger() to let its dependent start early. Every kernel of a layer's chain is
// launched chained, at small batches its first one too, to whatever came before it (the previous
// layer's GEMM, or a torch kernel, which never triggers early: then it starts when that one ends). Before
// pdl_wait() a kernel only reads the layer's own constants (weights, scales, rotations, the
// permutation), which no kernel of a forward writes, and writes nothing: memory the caching
// allocator hands out again may still be in use by the kernel before.
#include <cuda_runtime.h>

#include <atomic>

namespace duquant {
namespace kernels {

__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}

__device__ __forceinline__ void pdl_trigger() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

// Facts of the current device the kernels' launch choices need; asked once per device
// (act_quant_rows.cu). known = false where the queries failed.
struct DeviceFacts {
  bool known = false;
  int major = 0;              // compute capability
  int smem_optin = 0;         // shared memory a CTA may opt in to (99 KB on sm_86/89, 227 KB on sm_90)
  int smem_per_sm = 0;        // an SM's shared memory (CTAs a launch fits per SM)
  bool clusters = false;      // Hopper or newer, and the kernels built for it (a binary without sm_90
                              // code would run the cluster variants without their cluster exchanges)
};
const DeviceFacts& device_facts();

// A cudaLaunchKernelEx configuration: chained (see above) when `chained`, in clusters of `cluster`
// CTAs when that is more than one. Holds its attributes, so it must outlive the launch or query.
struct LaunchConfig {
  cudaLaunchConfig_t config = {};
  cudaLaunchAttribute attr[2];
  LaunchConfig(dim3 grid, dim3 block, size_t smem, cudaStream_t stream, bool chained, dim3 cluster) {
    config.gridDim = grid;
    config.blockDim = block;
    config.dynamicSmemBytes = smem;
    config.stream = stream;
    unsigned n = 0;
    if (chained) {
      attr[n].id = cudaLaunchAttributeProgrammaticStreamSerialization;
      attr[n++].val.programmaticStreamSerializationAllowed = 1;
    }
    if (cluster.x * cluster.y * cluster.z > 1) {
      attr[n].id = cudaLaunchAttributeClusterDimension;
      attr[n].val.clusterDim.x = cluster.x;
      attr[n].val.clusterDim.y = cluster.y;
      attr[n++].val.clusterDim.z = cluster.z;
    }
    config.attrs = attr;
    config.numAttrs = n;
  }
  LaunchConfig(const LaunchConfig&) = delete;  // config.attrs points into this object
  LaunchConfig& operator=(const LaunchConfig&) = delete;
};

// Launches `kernel` with cudaLaunchKernelEx as LaunchConfig describes.
template <typename... Params, typename... Args>
cudaError_t launch_kernel_clustered(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                                    bool chained, dim3 cluster, Args&&... args) {
  const LaunchConfig c(grid, block, smem, stream, chained, cluster);
  return cudaLaunchKernelEx(&c.config, kernel, std::forward<Args>(args)...);
}

// How many clusters of `cluster` CTAs (block threads, smem bytes of dynamic shared memory each)
// the device runs at once: a GPC holds whole clusters, so fewer than SMs / cluster size. 0 where
// the query fails. A query, not stream work: allowed while a graph is captured (the first call of
// a launch shape may come then), made in relaxed mode whatever mode the capture uses. The kernel
// must already allow `smem` (allow_dynamic_smem).
template <typename... Params>
int max_active_clusters(void (*kernel)(Params...), dim3 block, size_t smem, dim3 cluster) {
  const LaunchConfig c(cluster, block, smem, nullptr, false, cluster);
  cudaStreamCaptureMode mode = cudaStreamCaptureModeRelaxed;
  (void)cudaThreadExchangeStreamCaptureMode(&mode);
  int n = 0;
  const cudaError_t e = cudaOccupancyMaxActiveClusters(&n, kernel, &c.config);
  (void)cudaThreadExchangeStreamCaptureMode(&mode);
  if (e != cudaSuccess) {
    (void)cudaGetLastError();
    return 0;
  }
  return n;
}

template <typename... Params, typename... Args>
cudaError_t launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                          bool chained, Args&&... args) {
  return launch_kernel_clustered(kernel, grid, block, smem, stream, chained, dim3(1, 1, 1), std::forward<Args>(args)...);
}

// Lets Kernel take up to `bytes` of dynamic shared memory (past 48 KB that needs opting in). A host
// call, so done once per kernel and device, off the hot path: `bytes` must be the most any launch
// of Kernel asks for. Templated on the kernel so each one keeps its own flags.
template <auto Kernel>
cudaError_t allow_dynamic_smem(int bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  static std::atomic<bool> raised[64] = {};  // callers on several threads (planners and launches)
  int dev = 0;
  cudaError_t e = cudaGetDevice(&dev);
  if (e != cudaSuccess) return e;
  if (dev < 64 && raised[dev]) return cudaSuccess;
  e = cudaFuncSetAttribute(Kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (e == cudaSuccess && dev < 64) raised[dev] = true;
  return e;
}

}  // namespace kernels
}  // namespace duquant
