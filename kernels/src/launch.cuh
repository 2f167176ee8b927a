#pragma once
// Programmatic dependent launch (Hopper): a kernel launched with `chained` may start while the
// kernel before it in the stream still runs; it must call pdl_wait() before touching anything
// that kernel writes (pdl_wait returns at once when there was no such launch, or before sm_90).
// A kernel calls pdl_trigger() to let its dependent start early. Only kernels of one layer's chain
// are chained: the chain's first kernel is ordered after earlier work as usual, so everything the
// others read before pdl_wait() (weights, scales, rotations) was complete before the chain began.
#include <cuda_runtime.h>

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

template <typename... Params, typename... Args>
cudaError_t launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                          bool chained, Args&&... args) {
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  config.attrs = attr;
  config.numAttrs = chained ? 1 : 0;
  return cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...);
}

}  // namespace kernels
}  // namespace duquant
