#include "duquant/duquant.h"
#include "test_helpers.h"

using duquant::Config;
using duquant_test::outlier_weight;

TEST(ScaleSearch, HandWorkedRowAlphaOne) {
  // Row [0.7, 0.35], 4 bits: base scale 0.1. MSEs: a=0.5 0.00625, 0.75 0.0018, 1 0.00125,
  // 1.25 0.01025, 1.5 0.0273 -> a=1, codes [7, round(3.5)=4 (half to even)].
  auto q = duquant::quantize_rows(torch::tensor({{0.7, 0.35}}, torch::kFloat64), 4);
  EXPECT_EQ(q.codes[0][0].item<int>(), 7);
  EXPECT_EQ(q.codes[0][1].item<int>(), 4);
  EXPECT_NEAR(q.scales[0].item<float>(), 0.1f, 1e-7);
}

TEST(ScaleSearch, HandWorkedRowAlphaOneAndAHalf) {
  // Row [1, .5, .5, .5], 2 bits (codes -2..1): MSEs 0.4375, 0.215, 0.1875, 0.0775, 0.0486
  // -> a=1.5, scale 2/3, codes all 1.
  auto q = duquant::quantize_rows(torch::tensor({{1.0, 0.5, 0.5, 0.5}}, torch::kFloat64), 2);
  for (int i = 0; i < 4; ++i) EXPECT_EQ(q.codes[0][i].item<int>(), 1);
  EXPECT_NEAR(q.scales[0].item<float>(), 2.0f / 3.0f, 1e-7);
}

TEST(ScaleSearch, NegativeExtremeUsesTheLowCode) {
  // Row [-0.8, 0.1], 4 bits: a=1 (MSE 1e-4) beats a=1.25 (2.4e-3, where -8.75 clamps to -8).
  auto q = duquant::quantize_rows(torch::tensor({{-0.8, 0.1}}, torch::kFloat64), 4);
  EXPECT_EQ(q.codes[0][0].item<int>(), -7);
  EXPECT_EQ(q.codes[0][1].item<int>(), 1);
}

TEST(ScaleSearch, ZeroRowUsesTheFloor) {
  auto q = duquant::quantize_rows(torch::zeros({2, 5}, torch::kFloat64), 4);
  EXPECT_FLOAT_EQ(q.scales[0].item<float>(), 1e-8f);
  EXPECT_EQ(q.codes.abs().max().item<int>(), 0);
}

TEST(ScaleSearch, MatchesBruteForceOnRandomRows) {
  auto w = outlier_weight(64, 50, 7).to(torch::kFloat64);
  for (int64_t bits : {2, 3, 4, 5, 8}) {
    auto q = duquant::quantize_rows(w, bits);
    const double qmax = std::pow(2.0, bits - 1) - 1;
    for (int64_t r = 0; r < w.size(0); ++r) {
      auto row = w[r];
      double best = 1e300, best_s = 0;
      for (double a : {0.5, 0.75, 1.0, 1.25, 1.5}) {
        double s = std::max(row.abs().max().item<double>() / qmax / a, 1e-8);
        double err = ((row / s).round().clamp(-qmax - 1, qmax) * s - row).square().mean().item<double>();
        if (err < best) best = err, best_s = s;
      }
      ASSERT_NEAR(q.scales[r].item<float>(), static_cast<float>(best_s), 1e-7 * best_s) << "bits " << bits;
      auto codes = (row / best_s).round().clamp(-qmax - 1, qmax).to(torch::kInt8);
      ASSERT_TRUE(q.codes[r].equal(codes)) << "row " << r << " bits " << bits;
    }
  }
}

TEST(Int4, PackRoundTripAndNibbleOrder) {
  auto codes = torch::tensor({{-1, 7, -8, 3, 5}}, torch::kInt8);
  auto packed = duquant::pack_int4(codes);
  ASSERT_EQ(packed.sizes(), (std::vector<int64_t>{1, 3}));
  EXPECT_EQ(packed[0][0].item<int>(), 0x7F);  // -1 low, 7 high
  EXPECT_EQ(packed[0][1].item<int>(), 0x38);  // -8 low, 3 high
  EXPECT_EQ(packed[0][2].item<int>(), 0x05);  // odd K: high nibble zero
  EXPECT_TRUE(duquant::unpack_int4(packed, 5).equal(codes));
  torch::manual_seed(3);
  for (int64_t k : {1, 2, 31, 64}) {
    auto c = torch::randint(-8, 8, {9, k}, torch::kInt8);
    EXPECT_TRUE(duquant::unpack_int4(duquant::pack_int4(c), k).equal(c)) << "K=" << k;
  }
}

TEST(ActQuant, DynamicPerTokenCodes) {
  auto x = torch::tensor({{1.0f, -2.54f, 0.0f}, {0.0f, 0.0f, 0.0f}});
  auto s = duquant::dynamic_act_scales(x, 8);
  EXPECT_FLOAT_EQ(s[0][0].item<float>(), 2.54f / 127.0f);
  EXPECT_FLOAT_EQ(s[1][0].item<float>(), 1e-8f);  // floor
  auto c = duquant::act_codes(x, s, 8);
  EXPECT_EQ(c[0][1].item<float>(), -127.0f);
  EXPECT_EQ(c[0][0].item<float>(), 50.0f);  // 1/0.02 = 50
  // Clamping reaches the low code with a static scale.
  auto c2 = duquant::act_codes(torch::tensor({-1000.0f, 1000.0f}), torch::tensor({1.0f}), 8);
  EXPECT_EQ(c2[0].item<float>(), -128.0f);
  EXPECT_EQ(c2[1].item<float>(), 127.0f);
}

TEST(ActQuant, PercentileMatchesTorchQuantile) {
  torch::manual_seed(11);
  auto v = torch::randn({257, 13}).abs();
  for (double q : {0.0, 0.5, 0.9, 0.999, 1.0}) {
    auto ours = duquant::percentile(v, q, 0);
    auto ref = torch::quantile(v, q, /*dim=*/0);
    // torch.quantile computes the rank in float32; we do it in float64.
    EXPECT_LT(((ours - ref).abs() / ref.abs().clamp_min(1e-3)).max().item<float>(), 1e-5) << q;
    auto ours_all = duquant::percentile_all(v, q);
    auto ref_all = torch::quantile(v.reshape({-1}), q);
    EXPECT_LT((ours_all - ref_all).abs().item<float>() / std::max(ref_all.abs().item<float>(), 1e-3f), 1e-5) << q;
  }
}

TEST(ActQuant, StaticScalesFollowTheirRules) {
  torch::manual_seed(12);
  auto xt = torch::randn({100, 6});
  Config c;
  c.act = duquant::ActMode::kStatic;
  auto s = duquant::batch_static_scale(xt, c);
  ASSERT_EQ(s.sizes(), (std::vector<int64_t>{1}));
  EXPECT_FLOAT_EQ(s.item<float>(), torch::quantile(xt.abs().reshape({-1}), 0.999).item<float>() / 127.0f);
  c.act = duquant::ActMode::kStaticChannel;
  auto sc = duquant::batch_static_scale(xt, c);
  auto ref = torch::quantile(xt.abs(), 0.999, 0).clamp_min(1e-6) / 127.0;
  EXPECT_LT((sc - ref).abs().max().item<float>(), 1e-7);
  // Dead channel: floored at 1e-6.
  auto dead = torch::zeros({10, 2});
  EXPECT_FLOAT_EQ(duquant::batch_static_scale(dead, c)[0].item<float>(), 1e-6f);
}
