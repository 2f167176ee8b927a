// kernel_operands: what the CUDA kernels are handed. They read raw pointers with 16-byte loads, so a
// view passed to torch.ops.duquant.linear (non-contiguous, or at an odd offset) must come back as a
// dense, aligned copy, and a wrong shape, dtype or device must be refused by name, not read past.
// Runs on the CPU: the checks and copies are device-independent.
#include <cstdint>

#include "duquant/duquant.h"
#include "duquant/fast_path.h"
#include "test_helpers.h"

using duquant::ActMode;
using duquant::Config;
using duquant::LayerPack;
using duquant::kernel_operands;

namespace {

LayerPack packed(int64_t k, int64_t n, const Config& config = Config()) {
  return duquant::pack_linear(duquant_test::outlier_weight(n, k, 7), torch::randn({n}), config);
}

bool aligned(const torch::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

}  // namespace

TEST(KernelOperands, DenseAlignedTensorsComeBackAsTheyAre) {
  const auto layer = packed(256, 96);
  const auto out = kernel_operands(layer);
  for (const auto& field : duquant::kLayerTensorFields) {
    const auto& before = layer.*field.member;
    if (!before.defined()) continue;
    EXPECT_EQ((out.*field.member).data_ptr(), before.data_ptr()) << field.name << " was copied";
  }
}

TEST(KernelOperands, NonContiguousViewIsCopiedDense) {
  auto layer = packed(256, 96);
  const auto dense = layer.qweight.clone();
  layer.qweight = dense.t().contiguous().t();  // same values, column-major strides
  ASSERT_FALSE(layer.qweight.is_contiguous());
  const auto out = kernel_operands(layer);
  EXPECT_TRUE(out.qweight.is_contiguous());
  EXPECT_TRUE(aligned(out.qweight));
  EXPECT_TRUE(torch::equal(out.qweight, dense));
}

TEST(KernelOperands, ViewAtAnOddOffsetIsCopiedAligned) {
  auto layer = packed(256, 96);
  const auto dense = layer.qweight.clone();
  const int64_t bytes = dense.numel();
  auto storage = torch::empty({bytes + 1}, dense.options());
  layer.qweight = storage.narrow(0, 1, bytes).view(dense.sizes());  // contiguous, one byte off
  layer.qweight.copy_(dense);
  ASSERT_TRUE(layer.qweight.is_contiguous());
  ASSERT_FALSE(aligned(layer.qweight));
  const auto out = kernel_operands(layer);
  EXPECT_TRUE(aligned(out.qweight));
  EXPECT_TRUE(torch::equal(out.qweight, dense));
}

TEST(KernelOperands, WrongShapeOrDtypeIsRefusedByName) {
  auto layer = packed(256, 96);
  layer.w_scale = torch::ones({95});
  EXPECT_THROW_WITH(kernel_operands(layer), "'w_scale' should be Float [96]");
  layer = packed(256, 96);
  layer.bias = layer.bias.to(torch::kFloat16);
  EXPECT_THROW_WITH(kernel_operands(layer), "'bias' should be Float [96], got Half");
}

TEST(KernelOperands, TensorOnAnotherDeviceIsRefusedByName) {
  auto layer = packed(256, 96);
  layer.r_out = torch::empty(layer.r_out.sizes(), layer.r_out.options().device(torch::kMeta));
  EXPECT_THROW_WITH(kernel_operands(layer, "my_layer"), "my_layer: tensor 'r_out' is on meta but qweight is on cpu");
}

TEST(KernelOperands, StaticScalesNeedNoCalibrationState) {
  Config config;
  config.act = ActMode::kStatic;
  auto layer = packed(256, 96, config);
  layer.calib_state = torch::Tensor();  // the op is handed act_scale, never the calibration state
  EXPECT_NO_THROW(kernel_operands(layer));
  layer.act_scale = torch::Tensor();
  EXPECT_THROW_WITH(kernel_operands(layer), "'act_scale' is missing");
}
