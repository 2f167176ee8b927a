#pragma once
// duquant's CUDA kernels: torch-free entry points (parameter structs, raw device pointers, a stream).
// The torch glue in src/fast/ checks shapes and dtypes, allocates and picks the stream; these
// functions trust their parameters and only launch. Layouts are documented in kernels/README.md.

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace duquant {
namespace kernels {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Shared memory a CTA may opt in to that the kernels' fixed tiles need (the largest, int8 128x128,
// takes 161.5 KB): an A100 offers 163 KB, Hopper 227; the deeper pipelines step down where they do
// not fit. Devices with less (sm_86/89: 99 KB) run the reference path.
constexpr size_t kMinSharedMemPerBlock = 163 * 1024;

// ---- input side: x -> permute -> block rotations -> per-token (or static) scale -> int8 codes ----
// The transform is a list of stages so DESIGN §3's general form (per-channel smoothing, a second
// permutation and rotation) can be appended without changing the kernel's structure.
struct InputTransform {
  const float* smooth = nullptr;    // [K] divide x by it first (DESIGN §3); nullptr = no smoothing
  const int64_t* perm = nullptr;    // [K] x~[:, j] = x[:, perm[j]]; nullptr = identity
  const float* r_in = nullptr;      // [ceil(K/B), B, B] row-major blocks; a short last block sits in identity
  int block = 16;                   // B
};

// Which input kernels run: one kernel with whole rows in shared memory where a row fits on an SM
// (kRows), the two passes spread over column chunks (kSplit), or the rotation on tensor cores
// (kMma: float16/bfloat16 x, B = 16, codes; where it does not apply, kMma picks as kAuto does);
// kSlices: a permuted copy of x, then the rotation on tensor cores over slices of positions with
// the tokens as the mma's n dimension (the same inputs, Hopper; elsewhere as kAuto); kAuto picks
// (act_quant.cu).
enum class InputKernel : int { kAuto = 0, kSplit = 1, kRows = 2, kMma = 3, kSlices = 4 };

struct ActQuantParams {
  const void* x = nullptr;          // [M, K] row-major, row stride x_stride elements
  DType x_dtype = DType::kFloat32;
  int64_t x_stride = 0;
  int64_t m = 0, k = 0;
  InputTransform transform;
  int abits = 8;                    // codes in [-2^(a-1), 2^(a-1)-1]
  const float* static_scale = nullptr;  // [1] act=static; nullptr = dynamic per-token scales
  int8_t* codes = nullptr;          // [M, K] out
  float* scales = nullptr;          // [M] out: the scale each token was quantized with
  // Weight-only path: the transformed activations in the input's 16-bit dtype instead of codes.
  void* x_out = nullptr;            // [M, K] (x_dtype), used when abits == 0
  // Hopper: start early, wait in-kernel: the two-pass path's second kernel always, the first input
  // kernel at M <= 64 (launch.cuh)
  bool chain = false;
  InputKernel kernel = InputKernel::kAuto;
  int splits = 0;                   // the tensor-core kernel's CTAs per token group (Hopper); 0 = by size
  int num_sms = 132;                // for picking tokens per CTA
  // Ints the GEMM launched after these kernels needs zeroed (its split-k counters, IntGemmPlan);
  // cleared once the input is ready to read.
  int* clear = nullptr;
  int clear_count = 0;
  // Scratch of ActQuantPlan::workspace_bytes: the two-pass kernels' rotated values and per-chunk
  // maxima between the passes, or the slice kernels' permuted copy of x.
  void* workspace = nullptr;
};

// True for block sizes the input kernels take (B <= 256: a chunk holds whole blocks).
bool act_quant_supported(int block);

// What act_quant launches for given parameters, and the scratch it needs: decided once per call
// (it consults the device's facts), then passed to act_quant.
struct ActQuantPlan {
  int row_tokens = 0;          // tokens per CTA of the one-kernel row path; 0 = the two passes
  bool row_cluster = false;    // the row path's cluster variant (1-2 tokens per CTA, Hopper)
  int row_split = 1;           // CTAs of a cluster sharing each row
  int mma_tokens = 0;          // tokens per CTA of the tensor-core kernel; 0 = not that one
  int mma_split = 1;           // its CTAs of a cluster sharing each token group
  bool mma_hold = false;       // its warps keep their rotated blocks in registers (one pass)
  int slice_tokens = 0;        // tokens per CTA of the slice kernels (act_quant_slices.cu); 0 = not those
  int slice_split = 1;         // their CTAs of a cluster sharing each token group's row
  size_t workspace_bytes = 0;  // scratch: the two passes' with dynamic scales, or x~ (else 0)
};
ActQuantPlan act_quant_plan(const ActQuantParams& p);

// Launches the input kernel(s) `plan` names (act_quant_plan of the same parameters); returns the
// launch status.
cudaError_t act_quant(const ActQuantParams& p, const ActQuantPlan& plan, cudaStream_t stream);

// ---- integer GEMM with the DuQuant epilogue ----
// Which tile shape the GEMMs run: kAuto picks by M, N and the SM count (int_gemm.cu, wo_gemm.cu);
// the others force one, for tests and benchmarks. kStream: 16 tokens x 16 or 32 outputs per CTA,
// the k range split over 8 warps (weight streaming at small M); kTileMxN: M x N tiles (mma.sync);
// kWgmma128/256: 128 or 256 tokens x 128 outputs on Hopper's warpgroup MMA, fed by the tensor
// memory accelerator (int4 weights, compute capability 9.0, builds with sm_90a code:
// wgmma_gemm_available(); 16-byte aligned codes and weights; where it cannot run, forcing one picks
// by size); kGemv: the skinny kernel, weights streamed straight into registers and the tokens'
// codes staged in shared memory (M <= 64, int4 weights, K a multiple of 128; elsewhere forcing it
// picks by size); kGemvDirect: the same with each warp reading the codes from L2 (M <= 16), for
// comparison.
enum class GemmTile : int {
  kAuto = 0, kStream = 1, kTile32 = 2, kTile64 = 3, kTile128 = 4, kWgmma128 = 5, kWgmma256 = 6, kGemv = 7,
  kGemvDirect = 8
};

// True when this build has the wgmma kernel and the current device can run it.
bool wgmma_gemm_available();

// y[m, n] = restore( s_t[m] * s_n[n] * sum_k a[m, k] * w[n, k] ) + bias[n], cast to out_dtype.
// a: int8 codes [M, a_stride].
// w: wbits <= 4: uint8 [N, K/2], two's-complement nibbles, column 2j in the low nibble (the pack's
//    own layout, DESIGN §4); wbits 5..8: int8 [N, K]. K must be a multiple of 32 (16-byte rows).
struct IntGemmParams {
  const int8_t* a = nullptr;
  int64_t a_stride = 0;
  const float* a_scale = nullptr;   // [M] per-token, or [1] when a_scale_per_tensor
  bool a_scale_per_tensor = false;
  const void* w = nullptr;
  int wbits = 4;
  const float* w_scale = nullptr;   // [N]
  const float* r_out = nullptr;     // [ceil(N/Bo), Bo, Bo] or nullptr (row_rot=none)
  int block_out = 16;               // Bo
  const float* bias = nullptr;      // [N] or nullptr
  void* y = nullptr;                // [M, N] row-major, out_dtype
  DType out_dtype = DType::kBFloat16;
  int64_t m = 0, n = 0, k = 0;
  int num_sms = 132;                // for picking the tile shape
  GemmTile tile = GemmTile::kAuto;
  int splits = 0;                   // CTAs sharing each output tile's k range (64x64 tiles; gemv and
                                    // wgmma128: a cluster of up to 8, Hopper); 0 = by size
  // Split-k scratch of IntGemmPlan::workspace_bytes: per-tile arrival counters (zero when the
  // GEMM starts: the input kernels clear them) followed by the k slices' partial sums.
  void* workspace = nullptr;
  bool chain = false;               // launched right after the input kernels: start early, wait in-kernel
  // Weight-only GEMM (wo_gemm): the transformed activations in float16/bfloat16 instead of codes;
  // a_scale is then nullptr.
  const void* a16 = nullptr;
  DType a16_dtype = DType::kBFloat16;
};

// A grouped GEMM launch: layers that read the same activation codes (q/k/v, gate/up sharing an
// input transform) side by side along N, each with its own weights, epilogue operands and output
// [M, n]. Given to int_gemm_plan and int_gemm with IntGemmParams describing the first layer but
// n = the segments' sum; same K, wbits, Bo and output dtype for all. A separate struct (its own
// kernel argument) so the other kernels' parameters stay as they were.
constexpr int kMaxGemmSegments = 4;
struct GemmSegment {
  const void* w = nullptr;
  const float* w_scale = nullptr;
  const float* r_out = nullptr;
  const float* bias = nullptr;
  void* y = nullptr;
  int64_t n = 0;
};
struct GemmGroup {
  int segments = 0;
  GemmSegment segment[kMaxGemmSegments];
};

// The longest rows the GEMM kernels take: their tiles' rows (up to 256, of up to 2 bytes an
// element) lie within 2^31 bytes of each other, so they index them in 32 bits.
constexpr int64_t kMaxKernelInFeatures = int64_t{1} << 22;

// True when the GEMM kernels can run these sizes (K % 32 == 0, Bo divides a tile width).
bool int_gemm_supported(int64_t n, int64_t k, int wbits, bool has_r_out, int block_out);

// How int_gemm runs for given parameters (decided once per call, passed to int_gemm). Where the
// tiles alone leave SMs idle, `splits` CTAs share each output tile's k range. On 64x64 tiles each
// writes its integer partial sums to the workspace, and the last to arrive adds them up (exact)
// and runs the epilogue; the workspace's first `counters` ints must be zero at launch. The skinny
// kernel and the wgmma kernel split over a cluster and sum through distributed shared memory (no
// workspace).
struct IntGemmPlan {
  GemmTile tile = GemmTile::kStream;
  int splits = 1;
  int stages_per_split = 0;  // pipeline stages (k chunks) per slice of 64x64 tiles (the wgmma
                             // kernel deals them out evenly itself)
  int counters = 0;          // output tiles of split 64x64 tiles (else 0)
  size_t workspace_bytes = 0;
  bool grouped = false;      // a grouped launch (a GemmGroup) can run this plan; else launch each
                             // segment on its own
};
IntGemmPlan int_gemm_plan(const IntGemmParams& p, const GemmGroup* group = nullptr);
cudaError_t int_gemm(const IntGemmParams& p, const IntGemmPlan& plan, cudaStream_t stream,
                     const GemmGroup* group = nullptr);

// Weight-only: y = restore( s_n[n] * sum_k a16[m, k] * w[n, k] ) + bias, int4 weights (wbits 2..4).
bool wo_gemm_supported(int64_t n, int64_t k, int wbits, bool has_r_out, int block_out);
cudaError_t wo_gemm(const IntGemmParams& p, cudaStream_t stream);

// ---- weight-only at large M: the layer as one dense matrix, for a cuBLAS GEMM ----
// out[perm[j], c] = sum over c's output block of R_out[n, c] s_n sum over j's input block of
// R_in[j, i] q[n, i], i.e. the layer's weight transposed ([K, N]) with the permutation, input
// rotation, weight scales and restore folded in, so y = x out + bias (in x's basis) is the layer
// (dense_weight.cu). Float32 accuracy before the cast to out_dtype for float32 out; for 16-bit out
// the rotations' products in tf32: about 2^-11 of a weight, under bf16's rounding, near fp16's.
struct DenseWeightParams {
  const void* w = nullptr;          // the pack's codes, as IntGemmParams::w (int4 packed or int8)
  int wbits = 4;
  const float* w_scale = nullptr;   // [N]
  const float* r_out = nullptr;     // [ceil(N/Bo), Bo, Bo] or nullptr (row_rot=none)
  int block_out = 16;               // Bo: 1, 2, 4, 8 or 16
  InputTransform transform;         // perm (or nullptr), r_in with block 16; no smoothing
  const float* bias = nullptr;      // [N] or nullptr
  int64_t n = 0, k = 0;             // K a multiple of 32
  void* out = nullptr;              // [K, N] row-major, out_dtype; 16-byte aligned
  void* bias_out = nullptr;         // [N] out_dtype: bias cast, where bias is given
  DType out_dtype = DType::kBFloat16;
  int num_sms = 132;                // for sizing the grid
};

// True for the transforms dense_weight takes: blocks of 16, and Bo dividing 16 (or no restore).
inline bool dense_weight_supported(int block, bool has_r_out, int block_out) {
  return block == 16 && (!has_r_out || (block_out >= 1 && block_out <= 16 && 16 % block_out == 0));
}
cudaError_t dense_weight(const DenseWeightParams& p, cudaStream_t stream);

}  // namespace kernels
}  // namespace duquant
