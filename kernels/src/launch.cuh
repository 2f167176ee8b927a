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
