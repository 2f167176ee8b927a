// Python bindings of the CUDA fast path's status, used by DuQuantLinear.execution_path.
#include <torch/extension.h>

#include "duquant/fast_path.h"

namespace py = pybind11;

void bind_fast_path(py::module_& m) {
  m.def("fast_path_built", &duquant::fast_path_built, "True when the library was built with its CUDA kernels.");
  m.def("set_input_kernel", &duquant::set_input_kernel, py::arg("which"),
        "Which input kernels the fast path runs, process-wide: \"auto\" (default), \"rows\" (one kernel, "
        "whole rows in shared memory, wherever a row fits), \"split\" (two passes over column chunks), \"mma\" "
        "(the rotation on tensor cores, for float16/bfloat16 inputs, block size 16 and int8 codes; elsewhere "
        "\"auto\") or \"slices\" (the same inputs on Hopper: a permuted copy of x, then the rotation on tensor "
        "cores over slices of positions, 16-64 tokens a CTA; elsewhere \"auto\").");
  m.def("input_kernel", &duquant::input_kernel, "The input kernels set by set_input_kernel.");
  m.def("set_input_splits", &duquant::set_input_splits, py::arg("splits"),
        "How many CTAs of a cluster share each 16-token group in the tensor-core input kernel (\"mma\", "
        "Hopper), process-wide: 0 (default) picks by size, 1..8 forces that many (at most one block of "
        "positions per warp a CTA).");
  m.def("input_splits", &duquant::input_splits, "The input split count set by set_input_splits (0: by size).");
  m.def("set_gemm_tile", &duquant::set_gemm_tile, py::arg("which"),
        "Which GEMM tile shape the fast path runs, process-wide: \"auto\" (default), \"stream\" (16 tokens "
        "per CTA, k split over 8 warps), \"32x32\", \"64x64\", \"128x128\", \"wgmma128\" or \"wgmma256\" "
        "(Hopper, int4 weights: 128 or 256 tokens x 128 outputs), \"gemv\" (the skinny kernel, M <= 64) or \"gemv-direct\" (the same reading "
        "activation codes from L2, M <= 16); where the forced one cannot run (last_gemm_tile() says what "
        "ran), \"auto\".");
  m.def("wgmma_gemm_available", &duquant::wgmma_gemm_available,
        "True when the build has the wgmma GEMM (sm_90a code) and the current CUDA device can run it.");
  m.def("gemm_tile", &duquant::gemm_tile, "The GEMM tile shape set by set_gemm_tile.");
  m.def("last_gemm_tile", &duquant::last_gemm_tile,
        "The tile shape the last W4A8/W8A8 fast-path forward launched, as set_gemm_tile names them (never "
        "\"auto\"): what a forced choice really ran. \"\" before the first; CUDA graph replays do not count.");
  m.def("last_gemm_splits", &duquant::last_gemm_splits,
        "How many CTAs shared each output tile's k range in the last W4A8/W8A8 fast-path GEMM launch (1: none; "
        "0 before the first).");
  m.def("last_input_splits", &duquant::last_input_splits,
        "How many CTAs of a cluster shared each token group in the last fast-path input launch's tensor-core "
        "kernel, \"mma\" or \"slices\" (1: none; 0 where another input kernel ran, or before the first).");
  m.def("last_input_kernel", &duquant::last_input_kernel,
        "The input kernels the last fast-path forward launched, as set_input_kernel names them (never \"auto\"): "
        "what a forced choice really ran. \"\" before the first; CUDA graph replays do not count.");
  m.def("set_weight_only_path", &duquant::set_weight_only_path, py::arg("which"),
        "How weight-only layers (abits=0) run on CUDA, process-wide: \"auto\" (default: the fused W4A16 GEMM "
        "at small M, the dense weight from ~128 tokens), \"fused\" (the W4A16 GEMM, int4 weights and 16-bit "
        "input) or \"dense\" (the permutation, rotations, scales and restore folded into a dense weight in the "
        "input's dtype, then cuBLAS). Float32 input and wbits 5..8 always run the dense weight.");
  m.def("weight_only_path", &duquant::weight_only_path, "The weight-only path set by set_weight_only_path.");
  m.def("last_weight_only_path", &duquant::last_weight_only_path,
        "What the last weight-only fast-path forward ran, \"fused\" or \"dense\" (\"\" before the first; "
        "CUDA graph replays do not count).");
  m.def("set_gemm_splits", &duquant::set_gemm_splits, py::arg("splits"),
        "How many CTAs share each output tile's k range in the W4A8/W8A8 GEMM (64x64 tiles; the decode "
        "kernel, \"gemv\", and \"wgmma128\" over a cluster of at most 8 on Hopper, wgmma128 a power of two), "
        "process-wide: 0 (default) picks by size, 1..64 forces that many (at most one per pipeline stage, or "
        "per warp's k chunk for gemv).");
  m.def("gemm_splits", &duquant::gemm_splits, "The split-k count set by set_gemm_splits (0: by size).");
  m.def(
      "fast_path_blocker",
      [](int64_t in_features, int64_t out_features, const duquant::Config& config, py::dict tensors) {
        duquant::LayerPack p;
        p.config = config;
        p.in_features = in_features;
        p.out_features = out_features;
        auto get = [&](const char* key) {
          return tensors.contains(key) && !tensors[key].is_none() ? py::cast<torch::Tensor>(tensors[key])
                                                                  : torch::Tensor();
        };
        p.qweight = get("qweight");
        p.r_in = get("r_in");
        p.r_out = get("r_out");
        return duquant::fast_path_blocker(p);
      },
      py::arg("in_features"), py::arg("out_features"), py::arg("config"), py::arg("tensors"),
      "Why the CUDA fast path cannot run a layer with these buffers (\"\" when it can).");
}
