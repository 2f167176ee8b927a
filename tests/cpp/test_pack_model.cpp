// pack_linears: grouped packing gives exactly pack_linear's result per layer, and names bad layers;
// siblings (share_inputs) get the input transform of their stacked weights.
#include <algorithm>
#include <functional>
#include <limits>

#include "duquant/duquant.h"
#include "duquant/fast_path.h"
#include "duquant/pack_linear.h"
#include "duquant/pack_model.h"
#include "test_helpers.h"

using duquant::Config;
using duquant::LayerPack;
using duquant::LinearToPack;
using duquant_test::outlier_weight;

namespace {

void expect_same_tensor(const torch::Tensor& got, const torch::Tensor& want, const std::string& what) {
  ASSERT_EQ(got.defined(), want.defined()) << what;
  if (!want.defined()) return;
  EXPECT_EQ(got.scalar_type(), want.scalar_type()) << what;
  ASSERT_EQ(got.sizes(), want.sizes()) << what;
  EXPECT_TRUE(torch::equal(got, want)) << what << " differs; max abs diff "
                                       << (got.to(torch::kFloat64) - want.to(torch::kFloat64)).abs().max().item<double>();
}

void expect_same_pack(const LayerPack& got, const LayerPack& want, const std::string& name) {
  EXPECT_EQ(got.config, want.config) << name;
  EXPECT_EQ(got.in_features, want.in_features) << name;
  EXPECT_EQ(got.out_features, want.out_features) << name;
  expect_same_tensor(got.perm, want.perm, name + ".perm");
  expect_same_tensor(got.r_in, want.r_in, name + ".r_in");
  expect_same_tensor(got.r_out, want.r_out, name + ".r_out");
  expect_same_tensor(got.qweight, want.qweight, name + ".qweight");
  expect_same_tensor(got.w_scale, want.w_scale, name + ".w_scale");
  expect_same_tensor(got.bias, want.bias, name + ".bias");
  expect_same_tensor(got.act_scale, want.act_scale, name + ".act_scale");
  expect_same_tensor(got.calib_state, want.calib_state, name + ".calib_state");
}

Config with(std::function<void(Config&)> change) {
  Config c;
  change(c);
  return c;
}

// Mixed shapes (short input and output blocks included), configs, dtypes and biases; several layers
// share a shape and config so they are stacked.
std::vector<LinearToPack> mixed_layers() {
  const Config w4 = Config{};
  const Config w8_norot = with([](Config& c) { c.wbits = 8; c.row_rot = duquant::RowRotation::kNone; });
  const Config w3_nopermute_static = with([](Config& c) {
    c.wbits = 3; c.permute = false; c.act = duquant::ActMode::kStatic; c.block_out = 8;
  });
  const Config unquantized = with([](Config& c) { c.wbits = 0; c.abits = 0; c.block_size = 8; });
  std::vector<LinearToPack> layers;
  uint64_t seed = 10;
  auto add = [&](const std::string& name, int64_t n, int64_t k, const Config& cfg, torch::ScalarType dtype,
                 bool bias) {
    auto w = outlier_weight(n, k, seed++).to(dtype);
    c10::optional<torch::Tensor> b;
    if (bias) b = torch::randn({n}).to(dtype);
    layers.push_back(LinearToPack{name, w, b, cfg, ""});
  };
  for (int i = 0; i < 4; ++i) add("blocks." + std::to_string(i) + ".q_proj", 48, 70, w4, torch::kFloat32, false);
  add("blocks.0.o_proj", 48, 70, w4, torch::kBFloat16, true);  // same group, other dtype, a bias
  for (int i = 0; i < 3; ++i) add("blocks." + std::to_string(i) + ".up_proj", 37, 64, w8_norot, torch::kFloat16, i == 1);
  add("blocks.0.k_proj", 48, 70, w8_norot, torch::kFloat32, false);  // same shape, other config
  for (int i = 0; i < 2; ++i) add("blocks." + std::to_string(i) + ".fc1", 50, 33, w3_nopermute_static, torch::kFloat32, true);
  add("blocks.0.fc2", 24, 20, unquantized, torch::kFloat64, true);
  return layers;
}

}  // namespace

TEST(PackLinears, GroupedEqualsPackLinearPerLayerExactly) {
  const auto layers = mixed_layers();
  std::vector<size_t> seen_done;
  std::vector<std::string> seen_names;
  auto packed = duquant::pack_linears(layers, [&](size_t done, size_t total, const std::string& name) {
    EXPECT_EQ(total, layers.size());
    seen_done.push_back(done);
    seen_names.push_back(name);
  });
  ASSERT_EQ(packed.size(), layers.size());
  for (size_t i = 0; i < layers.size(); ++i) {
    const auto& l = layers[i];
    EXPECT_EQ(packed[i].name, l.name);  // input order, whatever the grouping
    expect_same_pack(packed[i].pack, duquant::pack_linear(l.weight, l.bias, l.config, l.name), l.name);
    packed[i].pack.validate(l.name);
  }
  // Progress once per layer, counting up, each name once.
  ASSERT_EQ(seen_done.size(), layers.size());
  for (size_t i = 0; i < seen_done.size(); ++i) EXPECT_EQ(seen_done[i], i + 1);
  std::sort(seen_names.begin(), seen_names.end());
  EXPECT_EQ(std::unique(seen_names.begin(), seen_names.end()), seen_names.end());
}

TEST(PackLinears, SmallStacksGiveTheSameResult) {
  const auto layers = mixed_layers();
  duquant::PackModelOptions one_by_one, pairs;
  one_by_one.max_stack_bytes = 1;                    // every layer alone
  pairs.max_stack_bytes = 2 * 48 * 70 * 8;           // the 48x70 group in stacks of two
  auto all = duquant::pack_linears(layers);
  auto single = duquant::pack_linears(layers, {}, one_by_one);
  auto paired = duquant::pack_linears(layers, {}, pairs);
  for (size_t i = 0; i < layers.size(); ++i) {
    expect_same_pack(single[i].pack, all[i].pack, layers[i].name + " (stacks of one)");
    expect_same_pack(paired[i].pack, all[i].pack, layers[i].name + " (stacks of two)");
  }
}

TEST(PackLinears, PacksAreIndependentTensors) {
  // A layer's tensors must not be views into its stack (that would keep every layer alive).
  auto layers = mixed_layers();
  auto packed = duquant::pack_linears(layers);
  const auto& q = packed[1].pack.qweight;
  EXPECT_EQ(q.storage().nbytes(), static_cast<size_t>(q.numel() * q.element_size()));
}

TEST(PackLinears, DeviceOptionPacksThereFromHostWeights) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device: the device option is checked on the GPU machine";
  const auto layers = mixed_layers();  // weights in host memory
  duquant::PackModelOptions on_gpu;
  on_gpu.device = torch::Device(torch::kCUDA);
  const auto packed = duquant::pack_linears(layers, {}, on_gpu);
  const auto reference = duquant::pack_linears(layers);
  ASSERT_EQ(packed.size(), reference.size());
  for (size_t i = 0; i < packed.size(); ++i) {
    const auto& gpu = packed[i].pack;
    const auto& cpu = reference[i].pack;
    EXPECT_TRUE(gpu.qweight.is_cuda()) << packed[i].name;
    if (cpu.perm.defined()) EXPECT_TRUE(torch::equal(gpu.perm.cpu(), cpu.perm)) << packed[i].name;
    if (cpu.w_scale.defined())
      EXPECT_TRUE(torch::allclose(gpu.w_scale.cpu(), cpu.w_scale, 1e-5, 0)) << packed[i].name;
  }
}

TEST(PackLinears, OnPackedSeesEachWeightAsPackedAndItsPack) {
  const auto layers = mixed_layers();
  std::vector<int> calls(layers.size(), 0);
  std::vector<torch::Tensor> seen_qweight(layers.size());
  duquant::PackModelOptions options;
  options.on_packed = [&](size_t i, const torch::Tensor& weight, const LayerPack& pack) {
    ++calls.at(i);
    EXPECT_EQ(weight.scalar_type(), torch::kFloat64);
    EXPECT_TRUE(torch::equal(weight, layers[i].weight.to(torch::kFloat64))) << layers[i].name;
    seen_qweight[i] = pack.qweight;
  };
  auto packed = duquant::pack_linears(layers, {}, options);
  for (size_t i = 0; i < layers.size(); ++i) {
    EXPECT_EQ(calls[i], 1) << layers[i].name;
    EXPECT_TRUE(torch::equal(seen_qweight[i], packed[i].pack.qweight)) << layers[i].name;
  }
}

TEST(PackLinears, ErrorsNameTheLayer) {
  auto layers = mixed_layers();
  // NaN in the third layer of a stacked group: found in the stack, reported for that layer.
  auto bad_nan = layers;
  bad_nan[2].weight = bad_nan[2].weight.clone();
  bad_nan[2].weight[5][7] = std::numeric_limits<float>::quiet_NaN();
  EXPECT_THROW_WITH(duquant::pack_linears(bad_nan), "blocks.2.q_proj: weight contains NaN/Inf (first at row 5, column 7)");

  auto bad_rank = layers;
  bad_rank[6].weight = torch::randn({37});
  EXPECT_THROW_WITH(duquant::pack_linears(bad_rank), "blocks.1.up_proj: weight must be 2-D");

  auto bad_bias = layers;
  bad_bias[4].bias = torch::randn({3});
  EXPECT_THROW_WITH(duquant::pack_linears(bad_bias), "blocks.0.o_proj: bias must have shape [48]");

  auto bad_config = layers;
  bad_config[9].config.block_size = 0;
  EXPECT_THROW_WITH(duquant::pack_linears(bad_config), "blocks.0.fc1: ");
  EXPECT_THROW_WITH(duquant::pack_linears(bad_config), "block_size");

  auto duplicate = layers;
  duplicate[3].name = duplicate[0].name;
  EXPECT_THROW_WITH(duquant::pack_linears(duplicate), "layer name 'blocks.0.q_proj' appears twice");

  auto int_weight = layers;
  int_weight[11].weight = torch::ones({24, 20}, torch::kInt32);
  EXPECT_THROW_WITH(duquant::pack_linears(int_weight), "blocks.0.fc2: weight must be float32/float16/bfloat16/float64");

  duquant::PackModelOptions negative;
  negative.max_stack_bytes = -1;
  EXPECT_THROW_WITH(duquant::pack_linears(layers, {}, negative), "max_stack_bytes");
}

TEST(PackLinears, ChecksEveryLayerBeforePacking) {
  // A bad last layer stops the call before the first layer's progress is reported.
  auto layers = mixed_layers();
  layers.back().weight = torch::randn({2, 3, 4});
  size_t calls = 0;
  EXPECT_THROW_WITH(duquant::pack_linears(layers, [&](size_t, size_t, const std::string&) { ++calls; }),
                    "blocks.0.fc2: weight must be 2-D");
  EXPECT_EQ(calls, 0u);
}

TEST(PackLinears, EmptyListGivesNothing) {
  EXPECT_TRUE(duquant::pack_linears({}).empty());
}

TEST(PackLinears, SiblingsShareTheTransformOfTheirStackedWeights) {
  const Config cfg;
  std::vector<LinearToPack> layers;
  uint64_t seed = 40;
  for (const char* name : {"blocks.0.q_proj", "blocks.0.k_proj", "blocks.0.v_proj", "blocks.0.o_proj", "blocks.1.q_proj"}) {
    const int64_t n = std::string(name).find("k_proj") != std::string::npos ||
                              std::string(name).find("v_proj") != std::string::npos
                          ? 16
                          : 48;
    layers.push_back(LinearToPack{name, outlier_weight(n, 70, seed++), c10::nullopt, cfg, ""});
  }
  duquant::PackModelOptions options;
  options.share_inputs = true;
  const auto groups = duquant::sibling_input_groups(layers, options);
  EXPECT_FALSE(groups[0].empty());
  EXPECT_EQ(groups[0], groups[1]);
  EXPECT_EQ(groups[0], groups[2]);
  EXPECT_TRUE(groups[3].empty() && groups[4].empty());  // o_proj is no sibling; blocks.1 has no k/v
  const auto packed = duquant::pack_linears(layers, {}, options);

  // The transform of [W_k; W_q; W_v] (name order), whatever order the caller lists them in.
  const auto stacked = torch::cat({layers[1].weight, layers[0].weight, layers[2].weight}).to(torch::kFloat64);
  const auto t = duquant::shared_input_transform(stacked, cfg);
  for (size_t i = 0; i < 3; ++i) {
    expect_same_tensor(packed[i].pack.perm, t.perm, layers[i].name + ".perm");
    expect_same_tensor(packed[i].pack.r_in, t.r_in.to(torch::kFloat32), layers[i].name + ".r_in");
    // Its own output rotation: the one it gets alone.
    const auto alone = duquant::pack_linear(layers[i].weight, c10::nullopt, cfg, layers[i].name);
    expect_same_tensor(packed[i].pack.r_out, alone.r_out, layers[i].name + ".r_out");
    packed[i].pack.validate(layers[i].name);
  }
  for (size_t i = 3; i < 5; ++i)
    expect_same_pack(packed[i].pack, duquant::pack_linear(layers[i].weight, c10::nullopt, cfg, layers[i].name),
                     layers[i].name);

  // One set of codes serves all three: the group's outputs are each layer's own (CPU: the reference).
  const auto x = torch::randn({5, 70});
  auto [codes, scales] = duquant::quantize_input(x, packed[0].pack.perm, packed[0].pack.r_in, torch::Tensor(), 8);
  const auto ys = duquant::linear_from_codes_group(codes, scales, x, {packed[0].pack, packed[1].pack, packed[2].pack});
  ASSERT_EQ(ys.size(), 3u);
  for (size_t i = 0; i < 3; ++i)
    expect_same_tensor(ys[i], duquant::linear_forward(x, packed[i].pack), layers[i].name + " output");
  EXPECT_THROW(duquant::linear_from_codes_group(codes.narrow(0, 0, 4), scales, x, {packed[0].pack}),
               std::invalid_argument);
}
