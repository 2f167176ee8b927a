#include <cmath>

#include "duquant/duquant.h"
#include "test_helpers.h"

using duquant::Config;
using duquant_test::outlier_weight;
using duquant_test::rel_err;

namespace {

// Float64 SVD reference for one block: U of svd(a), canonical signs.
torch::Tensor svd_u(const torch::Tensor& a) {
  auto u = std::get<0>(torch::linalg_svd(a.to(torch::kFloat64), /*full_matrices=*/true));
  return duquant::canonical_signs(u.unsqueeze(0))[0];
}

Config no_quant() {
  Config c;
  c.wbits = 0;
  c.abits = 0;
  return c;
}

}  // namespace

TEST(CanonicalSigns, LargestEntryPositiveTiesLowestRow) {
  auto v = torch::tensor({{-0.8, 0.6}, {0.6, 0.8}}, torch::kFloat64).unsqueeze(0);
  auto c = duquant::canonical_signs(v)[0];
  EXPECT_DOUBLE_EQ(c[0][0].item<double>(), 0.8);   // column 0 flipped: -0.8 was its largest
  EXPECT_DOUBLE_EQ(c[1][0].item<double>(), -0.6);
  EXPECT_DOUBLE_EQ(c[1][1].item<double>(), 0.8);   // column 1 kept
  // Tie in magnitude: the lowest row decides.
  auto t = torch::tensor({{-0.5}, {0.5}}, torch::kFloat64).unsqueeze(0);
  auto ct = duquant::canonical_signs(t)[0];
  EXPECT_DOUBLE_EQ(ct[0][0].item<double>(), 0.5);
  EXPECT_DOUBLE_EQ(ct[1][0].item<double>(), -0.5);
}

TEST(Permutation, InterleavesLargestAndSmallest) {
  // Column energies: c0=4, c1=1, c2=9, c3=0.25, c4=16 -> descending order 4,2,0,1,3.
  auto w = torch::tensor({{2.0, 1.0, 3.0, 0.5, 4.0}}, torch::kFloat64);
  auto p = duquant::channel_permutation(w, 0.15);
  std::vector<int64_t> got(p.data_ptr<int64_t>(), p.data_ptr<int64_t>() + 5);
  EXPECT_EQ(got, (std::vector<int64_t>{4, 3, 2, 1, 0}));
  // Equal energies keep their original order (stable sort).
  auto flat = torch::ones({3, 4}, torch::kFloat64);
  auto q = duquant::channel_permutation(flat, 0.0);
  std::vector<int64_t> got2(q.data_ptr<int64_t>(), q.data_ptr<int64_t>() + 4);
  EXPECT_EQ(got2, (std::vector<int64_t>{0, 3, 1, 2}));
}

TEST(Rotations, MatchFloat64SvdPerBlock) {
  const int64_t n = 96, k = 70, b = 16;  // 70 = 4 full blocks + a short one of 6
  auto w = outlier_weight(n, k, 1).to(torch::kFloat64);
  auto rot = duquant::column_block_rotations(w, b);
  ASSERT_EQ(rot.sizes(), (std::vector<int64_t>{5, 16, 16}));
  for (int64_t i = 0; i < 5; ++i) {
    const int64_t r = std::min<int64_t>(b, k - i * b);
    auto ref = svd_u(w.narrow(1, i * b, r).t());  // U of the r x N block
    auto got = rot[i].narrow(0, 0, r).narrow(1, 0, r);
    EXPECT_LT((got - ref).abs().max().item<double>(), 1e-9) << "block " << i;
  }
  // The short block is embedded in an identity.
  auto last = rot[4];
  EXPECT_TRUE(last.narrow(0, 6, 10).narrow(1, 6, 10).equal(torch::eye(10, torch::kFloat64)));
  EXPECT_EQ(last.narrow(0, 0, 6).narrow(1, 6, 10).abs().max().item<double>(), 0.0);
  // Orthogonal.
  auto eye = torch::eye(b, torch::kFloat64).expand({5, b, b});
  EXPECT_LT((torch::bmm(rot.transpose(1, 2), rot) - eye).abs().max().item<double>(), 1e-12);
}

TEST(PackLinear, LayoutMatchesContract) {
  const int64_t n = 40, k = 37;
  auto w = outlier_weight(n, k, 2);
  auto bias = torch::randn({n});
  Config c;
  c.block_out = 8;
  auto p = duquant::pack_linear(w, bias, c);
  EXPECT_NO_THROW(p.validate());
  EXPECT_EQ(p.qweight.scalar_type(), torch::kUInt8);
  EXPECT_EQ(p.qweight.sizes(), (std::vector<int64_t>{n, 19}));
  EXPECT_EQ(p.r_in.sizes(), (std::vector<int64_t>{3, 16, 16}));
  EXPECT_EQ(p.r_out.sizes(), (std::vector<int64_t>{5, 8, 8}));
  EXPECT_EQ(p.w_scale.sizes(), (std::vector<int64_t>{n}));
  EXPECT_TRUE(p.bias.equal(bias));
  EXPECT_FALSE(p.act_scale.defined());  // dynamic needs no static scales
  // R_out[j] is U of svd(W[rows_j, :]).
  auto ref = svd_u(w.narrow(0, 8, 8));
  EXPECT_LT((p.r_out[1].to(torch::kFloat64) - ref).abs().max().item<double>(), 1e-6);
  // The permutation is a permutation.
  EXPECT_TRUE(std::get<0>(p.perm.sort()).equal(torch::arange(k)));

  Config c8 = c;
  c8.wbits = 8;
  auto p8 = duquant::pack_linear(w, bias, c8);
  EXPECT_EQ(p8.qweight.scalar_type(), torch::kInt8);
  EXPECT_EQ(p8.qweight.sizes(), (std::vector<int64_t>{n, k}));
}

TEST(PackLinear, RestoreIsExactWithoutQuantization) {
  // Odd sizes and short blocks on both sides, with and without permutation and bias.
  for (bool permute : {true, false}) {
    for (int64_t bo : {0, 8, 5}) {
      const int64_t n = 45, k = 53;
      auto w = outlier_weight(n, k, 3);
      auto bias = torch::randn({n});
      auto c = no_quant();
      c.permute = permute;
      c.block_out = bo;
      auto p = duquant::pack_linear(w, bias, c);
      auto x = torch::randn({7, k}) * 3.0;
      auto y = duquant::reference_forward(x, p, true);
      auto ref = torch::addmm(bias, x, w.t());
      EXPECT_LE(rel_err(y, ref), 1e-5) << "permute=" << permute << " block_out=" << bo;
    }
  }
}

TEST(PackLinear, RowRotNoneStillReproducesTheLayer) {
  auto c = no_quant();
  c.row_rot = duquant::RowRotation::kNone;
  auto w = outlier_weight(33, 48, 4);
  auto p = duquant::pack_linear(w, c10::nullopt, c);
  EXPECT_FALSE(p.r_out.defined());
  auto x = torch::randn({5, 48});
  EXPECT_LE(rel_err(duquant::reference_forward(x, p, true), torch::mm(x, w.t())), 1e-5);
}

TEST(PackLinear, BadInputIsNamed) {
  Config c;
  EXPECT_THROW_WITH(duquant::pack_linear(torch::randn({4}), c10::nullopt, c, "blk.q_proj"), "blk.q_proj: weight must be 2-D");
  EXPECT_THROW_WITH(duquant::pack_linear(torch::ones({4, 4}, torch::kInt32), c10::nullopt, c), "float32");
  auto w = torch::randn({8, 16});
  w[3][5] = std::nan("");
  EXPECT_THROW_WITH(duquant::pack_linear(w, c10::nullopt, c, "L"), "NaN/Inf (first at row 3, column 5)");
  auto w2 = torch::randn({8, 16});
  w2[0][0] = INFINITY;
  EXPECT_THROW_WITH(duquant::pack_linear(w2, c10::nullopt, c), "NaN/Inf");
  EXPECT_THROW_WITH(duquant::pack_linear(torch::randn({8, 16}), torch::randn({7}), c), "bias must have shape [8]");
  Config bad;
  bad.wbits = 12;
  EXPECT_THROW_WITH(duquant::pack_linear(torch::randn({8, 16}), c10::nullopt, bad), "wbits=12");
}

TEST(PackLinear, AcceptsEveryFloatDtype) {
  auto w = outlier_weight(24, 32, 5);
  auto ref = duquant::pack_linear(w, c10::nullopt, Config());
  for (auto dt : {torch::kFloat16, torch::kBFloat16, torch::kFloat64}) {
    auto p = duquant::pack_linear(w.to(dt).to(torch::kFloat32).to(dt), c10::nullopt, Config());
    EXPECT_EQ(p.qweight.sizes(), ref.qweight.sizes());
    EXPECT_EQ(p.w_scale.scalar_type(), torch::kFloat32);
  }
}
