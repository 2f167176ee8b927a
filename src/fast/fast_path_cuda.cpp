// Torch glue of the CUDA fast path: checks, allocation, the current stream, dispatch to kernels/.
#include "fast_path_cuda.h"

#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <cstdlib>
#include <string>

#include "duquant/fast_path.h"
#include "duquant/reference_forward.h"
#include "duquant_kernels/kernels.h"

namespace duquant {
namespace cuda_fast {
namespace {

kernels::DType kernel_dtype(torch::ScalarType t) {
  switch (t) {
    case torch::kFloat16: return kernels::DType::kFloat16;
    case torch::kBFloat16: return kernels::DType::kBFloat16;
    case torch::kFloat32: return kernels::DType::kFloat32;
    default: TORCH_CHECK(false, "duquant fast path: unsupported dtype ", t);
  }
}

void check(cudaError_t e, const char* what) {
  if (e == cudaSuccess) return;
  cudaGetLastError();  // a failed launch also leaves its error pending: clear it, or the next check reports it
  TORCH_CHECK(false, "duquant fast path: ", what, " failed: ", cudaGetErrorString(e));
}

const float* f32_or_null(const torch::Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; }

// Programmatic dependent launch between a layer's kernels (Hopper and newer); DUQUANT_CHAIN_KERNELS=0
// turns it off, for comparing.
bool chain_kernels(const torch::Device& device) {
  static const bool enabled = [] {
    const char* v = std::getenv("DUQUANT_CHAIN_KERNELS");
    return !(v && std::string(v) == "0");
  }();
  return enabled && at::cuda::getDeviceProperties(device.index())->major >= 9;
}

// What every launch of one call needs from its device, looked up once per call.
struct LaunchContext {
  cudaStream_t stream;
  int num_sms;
  bool chain;
};

LaunchContext launch_context(const torch::Device& device) {
  return {at::cuda::getCurrentCUDAStream(device.index()).stream(),
          at::cuda::getDeviceProperties(device.index())->multiProcessorCount, chain_kernels(device)};
}

// Input kernel for x2d [T, K] (rows contiguous). Fills codes [T, K] and scales [T]; with abits = 0
// it fills x_out [T, K] (x's dtype) with the transformed activations instead. Also zeroes
// clear[0, clear_count) for the GEMM after it.
void run_input_kernel(const torch::Tensor& x2d, const torch::Tensor& perm, const torch::Tensor& r_in,
                      const torch::Tensor& static_scale, int64_t abits, torch::Tensor& codes, torch::Tensor& scales,
                      const LaunchContext& ctx, const torch::Tensor& x_out = torch::Tensor(), int* clear = nullptr,
                      int clear_count = 0) {
  kernels::ActQuantParams p;
  p.x = x2d.data_ptr();
  p.x_dtype = kernel_dtype(x2d.scalar_type());
  p.x_stride = x2d.stride(0);
  p.m = x2d.size(0);
  p.k = x2d.size(1);
  p.transform.perm = perm.defined() ? perm.data_ptr<int64_t>() : nullptr;
  p.transform.r_in = r_in.data_ptr<float>();
  p.transform.block = static_cast<int>(r_in.size(1));
  p.abits = static_cast<int>(abits);
  p.static_scale = f32_or_null(static_scale);
  if (abits > 0) {
    p.codes = codes.data_ptr<int8_t>();
    p.scales = scales.data_ptr<float>();
  } else {
    p.x_out = x_out.data_ptr();
  }
  p.chain = ctx.chain;
  p.kernel = static_cast<kernels::InputKernel>(input_kernel_index());
  p.splits = input_splits();
  p.clear = clear;
  p.clear_count = clear_count;
  p.num_sms = ctx.num_sms;
  const kernels::ActQuantPlan plan = kernels::act_quant_plan(p);
  torch::Tensor workspace;  // from the caching allocator: no cudaMalloc on the hot path, graph-safe
  if (plan.workspace_bytes > 0) {
    workspace = torch::empty({static_cast<int64_t>(plan.workspace_bytes)}, x2d.options().dtype(torch::kUInt8));
    p.workspace = workspace.data_ptr();
  }
  check(kernels::act_quant(p, plan, ctx.stream), "input kernel launch");
  if (p.m == 0) return;  // nothing launched
  using kernels::InputKernel;
  const InputKernel ran = plan.slice_tokens > 0 ? InputKernel::kSlices
                          : plan.mma_tokens > 0 ? InputKernel::kMma
                          : plan.row_tokens > 0 ? InputKernel::kRows
                                                : InputKernel::kSplit;
  note_input_launched(static_cast<int>(ran), plan.slice_tokens > 0 ? plan.slice_split
                                             : plan.mma_tokens > 0 ? plan.mma_split
                                                                   : 0);
}

torch::Tensor output_view(const torch::Tensor& y, const torch::Tensor& x, int64_t n) {
  auto out_shape = x.sizes().vec();
  out_shape.back() = n;
  return y.view(out_shape);
}

torch::Tensor rows_contiguous(const torch::Tensor& x, int64_t k) {
  auto x2 = x.reshape({-1, k});
  return x2.stride(1) == 1 ? x2 : x2.contiguous();
}

}  // namespace

std::string device_blocker(const LayerPack& layer, const torch::Device& device) {
  const auto* prop = at::cuda::getDeviceProperties(device.index() < 0 ? at::cuda::current_device() : device.index());
  if (prop->major < 8) return "needs compute capability 8.0+ (int8 mma.sync)";
  // The GEMM tiles are sized for an A100's or H100's shared memory (163 / 227 KB a block); on
  // consumer Ampere and Ada cards (99 KB) several of them could not launch.
  if (prop->sharedMemPerBlockOptin < kernels::kMinSharedMemPerBlock)
    return "needs " + std::to_string(kernels::kMinSharedMemPerBlock / 1024) +
           " KB of shared memory a block (A100, H100); this GPU offers " +
           std::to_string(prop->sharedMemPerBlockOptin / 1024) + " KB";
  const int64_t block = layer.r_in.defined() ? layer.r_in.size(1) : layer.config.block_size;
  if (layer.in_features > kernels::kMaxKernelInFeatures)
    return "in_features=" + std::to_string(layer.in_features) + " above the kernels' 2^22";
  if (!kernels::act_quant_supported(static_cast<int>(block)))
    return "block_size=" + std::to_string(block) + " (the input kernels take up to 256)";
  return "";
}

namespace {

bool fused_weight_only(const LayerPack& layer, const torch::Tensor& x) {
  return layer.config.wbits <= 4 && !(x.defined() && x.scalar_type() == torch::kFloat32);
}

bool dense_weight_fits(const LayerPack& layer) {
  const int64_t block = layer.r_in.defined() ? layer.r_in.size(1) : layer.config.block_size;
  const bool restore = layer.r_out.defined();
  return kernels::dense_weight_supported(static_cast<int>(block), restore,
                                         restore ? static_cast<int>(layer.r_out.size(1)) : 1);
}

}  // namespace

std::string weight_only_blocker(const LayerPack& layer, const torch::Tensor& x) {
  if (fused_weight_only(layer, x) || dense_weight_fits(layer)) return "";
  return std::string("weight-only ") + (layer.config.wbits > 4 ? "wbits 5..8" : "float32 input") +
         " runs the dense-weight kernel, which takes block_size 16 and block_out dividing 16";
}

namespace {

// Where the dense weight and cuBLAS beat the fused W4A16 GEMM: from this many tokens on
// (benchmarks/results/wo_dense_sweep_h200.txt). Rebuilding the weight costs the same at any M and
// the fused GEMM's deficit grows with M, so the crossing is at a similar M on every shape.
constexpr int64_t kDenseMinTokens = 128;

// Whether a weight-only call runs the dense weight (forward_dense) rather than the fused GEMM.
bool runs_dense(const LayerPack& layer, const torch::Tensor& x, int64_t m) {
  if (!dense_weight_fits(layer)) return false;
  if (!fused_weight_only(layer, x)) return true;  // float32 input or int8 weights: only this path
  switch (static_cast<WeightOnlyPath>(weight_only_path_index())) {
    case WeightOnlyPath::kFused: return false;
    case WeightOnlyPath::kDense: return true;
    default: return m >= kDenseMinTokens;
  }
}

// Weight-only at large M: the layer's dense weight (and bias) in x's dtype, made by one kernel into
// scratch as large as the bf16 weight (caching allocator, freed after the call), then
// y = x W^T + bias on cuBLAS (at::addmm, the current stream).
torch::Tensor forward_dense(const torch::Tensor& x2d, const torch::Tensor& x, const LayerPack& layer,
                            const LaunchContext& ctx) {
  const int64_t k = layer.in_features, n = layer.out_features, m = x2d.size(0);
  const bool bias = layer.bias.defined();
  note_weight_only_launched(static_cast<int>(WeightOnlyPath::kDense));
  if (m == 0) return output_view(torch::empty({0, n}, x.options()), x, n);
  auto scratch = torch::empty({k * n + (bias ? n : 0)}, x.options());
  kernels::DenseWeightParams p;
  p.w = layer.qweight.data_ptr();
  p.wbits = static_cast<int>(layer.config.wbits);
  p.w_scale = layer.w_scale.data_ptr<float>();
  p.r_out = f32_or_null(layer.r_out);
  p.block_out = static_cast<int>(layer.r_out.defined() ? layer.r_out.size(1) : 1);
  p.transform.perm = layer.perm.defined() ? layer.perm.data_ptr<int64_t>() : nullptr;
  p.transform.r_in = layer.r_in.data_ptr<float>();
  p.transform.block = static_cast<int>(layer.r_in.size(1));
  p.bias = f32_or_null(layer.bias);
  p.n = n;
  p.k = k;
  p.out = scratch.data_ptr();
  p.out_dtype = kernel_dtype(x.scalar_type());
  p.num_sms = ctx.num_sms;
  auto wt = scratch.narrow(0, 0, k * n).view({k, n});  // the weight transposed
  torch::Tensor b;
  if (bias) {
    b = scratch.narrow(0, k * n, n);
    p.bias_out = b.data_ptr();
  }
  check(kernels::dense_weight(p, ctx.stream), "dense weight launch");
  return output_view(bias ? at::addmm(b, x2d, wt) : at::mm(x2d, wt), x, n);
}

// One layer's GEMM launch: the kernels' parameters and plan, and the split-k scratch they point into.
struct GemmLaunch {
  kernels::IntGemmParams p;
  kernels::IntGemmPlan plan;
  torch::Tensor workspace;
};

// The GEMM of `layer` for m tokens into y [m, n] (`out`: its dtype and device): reading int8 codes
// and per-token scales (a, a_scale) or, weight-only, the transformed activations a16. Split-k
// scratch comes from the caching allocator (stream-ordered, graph-safe); its counters still need
// zeroing (plan.counters ints). plan = false leaves the plan to the caller (a grouped launch plans
// for the whole group).
GemmLaunch plan_gemm(const LayerPack& layer, const void* a, const float* a_scale, const void* a16, void* y,
                     const torch::TensorOptions& out, int64_t m, const LaunchContext& ctx, bool plan = true) {
  const Config& cfg = layer.config;
  GemmLaunch g;
  kernels::IntGemmParams& p = g.p;
  if (a16) {
    p.a16 = a16;
    p.a16_dtype = kernel_dtype(out.dtype().toScalarType());
  } else {
    p.a = static_cast<const int8_t*>(a);
    p.a_scale = a_scale;
    p.a_scale_per_tensor = false;  // the input kernel writes the static scale per token too
  }
  p.a_stride = layer.in_features;
  p.w = layer.qweight.data_ptr();
  p.wbits = static_cast<int>(cfg.wbits);
  p.w_scale = layer.w_scale.data_ptr<float>();
  p.r_out = f32_or_null(layer.r_out);
  p.block_out = static_cast<int>(layer.r_out.defined() ? layer.r_out.size(1) : 1);
  p.bias = f32_or_null(layer.bias);
  p.y = y;
  p.out_dtype = kernel_dtype(out.dtype().toScalarType());
  p.m = m;
  p.n = layer.out_features;
  p.k = layer.in_features;
  p.num_sms = ctx.num_sms;
  p.tile = static_cast<kernels::GemmTile>(gemm_tile_index());
  p.splits = gemm_splits();
  p.chain = ctx.chain;
  if (!a16 && plan) g.plan = kernels::int_gemm_plan(p);
  if (g.plan.workspace_bytes > 0) {
    g.workspace = torch::empty({static_cast<int64_t>(g.plan.workspace_bytes)}, out.dtype(torch::kUInt8));
    p.workspace = g.workspace.data_ptr();
  }
  return g;
}

void launch_gemm(const GemmLaunch& g, const LaunchContext& ctx, const kernels::GemmGroup* group = nullptr) {
  const bool weight_only = g.p.a16 != nullptr;
  check(weight_only ? kernels::wo_gemm(g.p, ctx.stream) : kernels::int_gemm(g.p, g.plan, ctx.stream, group),
        "GEMM launch");
  if (!weight_only) note_gemm_tile_launched(static_cast<int>(g.plan.tile), g.plan.splits);
}

}  // namespace

torch::Tensor forward(const torch::Tensor& x, const LayerPack& layer, bool chain) {
  const c10::cuda::CUDAGuard guard(x.device());
  LaunchContext ctx = launch_context(x.device());
  ctx.chain = ctx.chain && chain;
  const int64_t k = layer.in_features, n = layer.out_features;
  auto x2d = rows_contiguous(x, k);
  const int64_t m = x2d.size(0);
  const Config& cfg = layer.config;
  const bool per_tensor = cfg.act == ActMode::kStatic;

  const bool weight_only = !cfg.quantize_acts();
  if (weight_only && runs_dense(layer, x, m)) return forward_dense(x2d, x, layer, ctx);
  if (weight_only) note_weight_only_launched(static_cast<int>(WeightOnlyPath::kFused));
  torch::Tensor codes, scales, xt;
  if (weight_only) {
    xt = torch::empty({m, k}, x.options());
  } else {
    codes = torch::empty({m, k}, x.options().dtype(torch::kInt8));
    scales = torch::empty({m}, x.options().dtype(torch::kFloat32));
  }
  auto y = torch::empty({m, n}, x.options());
  const GemmLaunch g = plan_gemm(layer, weight_only ? nullptr : codes.data_ptr(),
                                 weight_only ? nullptr : scales.data_ptr<float>(),
                                 weight_only ? xt.data_ptr() : nullptr, y.data_ptr(), y.options(), m, ctx);
  // The input kernel zeroes the split-k counters, so no memset joins the chain of kernels.
  run_input_kernel(x2d, layer.perm, layer.r_in, per_tensor ? layer.act_scale : torch::Tensor(),
                   weight_only ? 0 : cfg.abits, codes, scales, ctx, xt, static_cast<int*>(g.p.workspace),
                   g.plan.counters);
  launch_gemm(g, ctx);
  return output_view(y, x, n);
}

torch::Tensor forward_codes(const torch::Tensor& codes, const torch::Tensor& scales, const torch::Tensor& x,
                            const LayerPack& layer, bool chain) {
  const c10::cuda::CUDAGuard guard(codes.device());
  LaunchContext ctx = launch_context(codes.device());
  ctx.chain = ctx.chain && chain;
  const int64_t m = codes.size(0), n = layer.out_features;
  auto y = torch::empty({m, n}, x.options());
  const GemmLaunch g =
      plan_gemm(layer, codes.data_ptr(), scales.data_ptr<float>(), nullptr, y.data_ptr(), y.options(), m, ctx);
  if (g.plan.counters > 0 && m > 0) {  // no input kernel of ours zeroes them here
    g.workspace.narrow(0, 0, static_cast<int64_t>(g.plan.counters) * static_cast<int64_t>(sizeof(int))).zero_();
  }
  launch_gemm(g, ctx);
  return output_view(y, x, n);
}

std::vector<torch::Tensor> forward_codes_group(const torch::Tensor& codes, const torch::Tensor& scales,
                                               const torch::Tensor& x, const std::vector<LayerPack>& layers,
                                               bool chain) {
  const c10::cuda::CUDAGuard guard(codes.device());
  LaunchContext ctx = launch_context(codes.device());
  ctx.chain = ctx.chain && chain;
  const int64_t m = codes.size(0);
  auto each_alone = [&] {
    std::vector<torch::Tensor> out;
    for (const auto& l : layers) out.push_back(forward_codes(codes, scales, x, l, chain));
    return out;
  };
  if (layers.size() == 1 || layers.size() > static_cast<size_t>(kernels::kMaxGemmSegments)) return each_alone();
  // Planned for the whole group first: outputs are made only for the path that runs.
  GemmLaunch g = plan_gemm(layers[0], codes.data_ptr(), scales.data_ptr<float>(), nullptr, nullptr, x.options(), m,
                           ctx, /*plan=*/false);
  kernels::IntGemmParams& p = g.p;
  kernels::GemmGroup group;
  group.segments = static_cast<int>(layers.size());
  p.n = 0;
  for (size_t s = 0; s < layers.size(); ++s) {
    kernels::GemmSegment& seg = group.segment[s];
    seg.w = layers[s].qweight.data_ptr();
    seg.w_scale = layers[s].w_scale.data_ptr<float>();
    seg.r_out = f32_or_null(layers[s].r_out);
    seg.bias = f32_or_null(layers[s].bias);
    seg.n = layers[s].out_features;
    p.n += seg.n;
  }
  g.plan = kernels::int_gemm_plan(p, &group);
  if (!g.plan.grouped) return each_alone();  // one launch per layer (see int_gemm_plan's grouped rule)
  std::vector<torch::Tensor> out;
  for (size_t s = 0; s < layers.size(); ++s) {
    auto y = torch::empty({m, layers[s].out_features}, x.options());
    group.segment[s].y = y.data_ptr();
    out.push_back(output_view(y, x, layers[s].out_features));
  }
  p.y = group.segment[0].y;
  launch_gemm(g, ctx, &group);
  return out;
}

std::tuple<torch::Tensor, torch::Tensor> quantize_input(const torch::Tensor& x2d_in, const torch::Tensor& perm,
                                                        const torch::Tensor& r_in, const torch::Tensor& static_scale,
                                                        int64_t abits) {
  const c10::cuda::CUDAGuard guard(x2d_in.device());
  auto x2d = rows_contiguous(x2d_in, x2d_in.size(1));
  auto codes = torch::empty({x2d.size(0), x2d.size(1)}, x2d.options().dtype(torch::kInt8));
  auto scales = torch::empty({x2d.size(0)}, x2d.options().dtype(torch::kFloat32));
  auto st = static_scale.defined() ? static_scale.to(torch::kFloat32).contiguous() : static_scale;
  run_input_kernel(x2d, perm.defined() ? perm.contiguous() : perm, r_in.contiguous(), st, abits, codes, scales,
                   launch_context(x2d.device()));
  return {codes, scales};
}

bool wgmma_available() { return torch::cuda::is_available() && kernels::wgmma_gemm_available(); }

}  // namespace cuda_fast
}  // namespace duquant
