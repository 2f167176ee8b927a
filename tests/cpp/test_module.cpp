#include <sstream>

#include "duquant/duquant.h"
#include "test_helpers.h"

using duquant::ActMode;
using duquant::Config;
using duquant::DuQuantLinear;
using duquant_test::rel_err;

namespace {

torch::nn::Linear make_linear(int64_t k, int64_t n, bool bias, uint64_t seed) {
  torch::manual_seed(seed);
  torch::nn::Linear lin(torch::nn::LinearOptions(k, n).bias(bias));
  torch::NoGradGuard g;
  lin->weight.copy_(duquant_test::outlier_weight(n, k, seed));
  return lin;
}

// Activations with a few outlier channels (x20-x100) and one massive token (x1000).
torch::Tensor outlier_acts(int64_t t, int64_t k, uint64_t seed) {
  torch::manual_seed(seed);
  auto x = torch::randn({t, k});
  x.narrow(1, 0, 2).mul_(50.0);
  x[t / 2].mul_(1000.0);
  return x;
}

}  // namespace

TEST(DuQuantLinear, BuffersOnlyNoFloatWeight) {
  auto lin = make_linear(48, 40, true, 1);
  DuQuantLinear q(lin, Config());
  std::vector<std::string> names;
  for (const auto& b : q->named_buffers()) names.push_back(b.key());
  std::sort(names.begin(), names.end());
  EXPECT_EQ(names, (std::vector<std::string>{"bias", "perm", "qweight", "r_in", "r_out", "w_scale"}));
  EXPECT_TRUE(q->parameters().empty());
  EXPECT_EQ(q->named_buffers()["qweight"].scalar_type(), torch::kUInt8);
}

TEST(DuQuantLinear, DynamicW4A8TracksTheFloatLayer) {
  auto lin = make_linear(96, 64, true, 2);
  DuQuantLinear q(lin, Config());
  auto x = torch::randn({11, 96});
  auto y = q(x);
  EXPECT_EQ(y.sizes(), (std::vector<int64_t>{11, 64}));
  // 4-bit weights with x12 outlier columns: ~0.2 is the format's error here (plain RTN: ~0.21).
  EXPECT_LT(rel_err(y, lin(x)), 0.3);
  Config w8;
  w8.wbits = 8;
  EXPECT_LT(rel_err(DuQuantLinear(lin, w8)(x), lin(x)), 0.03);
}

TEST(DuQuantLinear, OutputHasInputDtypeAndShape) {
  auto lin = make_linear(32, 24, false, 3);
  DuQuantLinear q(lin, Config());
  auto x = torch::randn({2, 3, 32});
  auto ref = q(x);
  EXPECT_EQ(ref.sizes(), (std::vector<int64_t>{2, 3, 24}));
  for (auto dt : {torch::kFloat16, torch::kBFloat16}) {
    auto y = q(x.to(dt));
    EXPECT_EQ(y.scalar_type(), dt);
    EXPECT_LT(rel_err(y, ref), 0.05);
  }
}

TEST(DuQuantLinear, EveryActModeRuns) {
  auto lin = make_linear(64, 32, true, 4);
  auto x = outlier_acts(20, 64, 5);
  auto ref = lin(x);
  Config weight_only;
  weight_only.abits = 0;
  DuQuantLinear w4(lin, weight_only);
  auto y_w4 = w4(x);
  EXPECT_LT(rel_err(y_w4, ref), 1.0);
  for (auto mode : {ActMode::kDynamic, ActMode::kStatic, ActMode::kStaticChannel}) {
    Config c;
    c.act = mode;
    c.calib_steps = 1;
    DuQuantLinear q(lin, c);
    q(x);  // calibrates (static) or quantizes (dynamic)
    EXPECT_TRUE(q->calibrated());
    auto y = q(x);
    ASSERT_TRUE(torch::isfinite(y).all().item<bool>());
    // 8-bit activations add little on top of the 4-bit weights' error, even with outliers
    // (static scales clip the x1000 token, hence the looser bound).
    EXPECT_LT(rel_err(y, y_w4), mode == ActMode::kDynamic ? 0.05 : 0.5) << duquant::to_string(mode);
  }
}

TEST(DuQuantLinear, CalibrationCountsEveryBatch) {
  auto lin = make_linear(40, 16, false, 6);
  Config c;
  c.act = ActMode::kStaticChannel;
  c.calib_steps = 3;
  DuQuantLinear q(lin, c);
  Config float_acts = c;
  float_acts.abits = 0;
  float_acts.act = ActMode::kDynamic;
  auto p = q->pack();

  std::vector<torch::Tensor> batches;
  for (int i = 0; i < 3; ++i) batches.push_back(outlier_acts(9 + i, 40, 10 + i) * (i == 1 ? 3.0 : 1.0));
  for (int i = 0; i < 3; ++i) {
    EXPECT_FALSE(q->calibrated()) << "after " << i << " batches";
    auto y = q(batches[i]);
    // While calibrating, activations stay unquantized.
    EXPECT_TRUE(y.allclose(duquant::reference_forward(batches[i], p, /*quantize_acts=*/false)));
  }
  EXPECT_TRUE(q->calibrated());
  EXPECT_EQ(q->pack().calib_state[0].item<int64_t>(), 3);
  // The scale is the max over all three batches, not the first one's.
  auto expected = torch::zeros({40});
  for (auto& b : batches) {
    auto xt = duquant::input_transform(b, p.perm, p.r_in);
    expected = torch::maximum(expected, duquant::batch_static_scale(xt, c));
  }
  EXPECT_TRUE(q->pack().act_scale.allclose(expected));
  auto first_only = duquant::batch_static_scale(duquant::input_transform(batches[0], p.perm, p.r_in), c);
  EXPECT_FALSE(q->pack().act_scale.allclose(first_only));
}

TEST(DuQuantLinear, ExplicitFinishUsesBatchesSoFar) {
  auto lin = make_linear(32, 16, false, 7);
  Config c;
  c.act = ActMode::kStatic;
  DuQuantLinear q(lin, c);
  EXPECT_THROW_WITH(q->finish_calibration(), "no batch has been observed");
  q(torch::randn({4, 32}));
  EXPECT_FALSE(q->calibrated());
  q->finish_calibration();
  EXPECT_TRUE(q->calibrated());
  EXPECT_GT(q->pack().act_scale.item<float>(), 0.0f);
}

TEST(DuQuantLinear, BadInputIsNamed) {
  auto lin = make_linear(32, 16, false, 8);
  DuQuantLinear q(lin, Config());
  EXPECT_THROW_WITH(q(torch::randn({4, 31})), "in_features=32");
  EXPECT_THROW_WITH(q(torch::ones({4, 32}, torch::kInt64)), "float32, float16 or bfloat16");
  EXPECT_THROW_WITH(q(torch::randn({4, 32}, torch::kFloat64)), "got Double");
}

TEST(DuQuantLinear, SaveLoadRoundTrip) {
  auto lin = make_linear(50, 30, true, 9);
  Config c;
  c.act = ActMode::kStatic;
  c.calib_steps = 2;
  DuQuantLinear q(lin, c);
  q(torch::randn({6, 50}));
  q(torch::randn({6, 50}));
  std::stringstream buf;
  torch::save(q, buf);
  DuQuantLinear fresh(duquant::empty_layer_pack(50, 30, true, c));
  torch::load(fresh, buf);
  auto x = torch::randn({5, 50});
  EXPECT_TRUE(fresh->calibrated());
  EXPECT_TRUE(fresh(x).equal(q(x)));
}

TEST(DuQuantLinear, PrintsItsSettings) {
  DuQuantLinear q(make_linear(32, 16, true, 10), Config());
  std::ostringstream s;
  s << *q;
  EXPECT_NE(s.str().find("in_features=32"), std::string::npos) << s.str();
  EXPECT_NE(s.str().find("W4A8 dynamic"), std::string::npos) << s.str();
  EXPECT_NE(s.str().find("path=reference"), std::string::npos) << s.str();
}

TEST(DuQuantLinear, PackValidationNamesTheTensor) {
  auto p = duquant::empty_layer_pack(32, 16, true, Config());
  p.r_in = torch::zeros({2, 8, 8});
  EXPECT_THROW_WITH(DuQuantLinear{p}, "tensor 'r_in' should be Float [2, 16, 16]");
}
