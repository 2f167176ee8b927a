#include "duquant/config.h"
#include "test_helpers.h"

using duquant::ActMode;
using duquant::Config;
using duquant::RowRotation;

TEST(Config, DefaultsMatchDesign) {
  Config c;
  EXPECT_EQ(c.wbits, 4);
  EXPECT_EQ(c.abits, 8);
  EXPECT_EQ(c.block_size, 16);
  EXPECT_EQ(c.effective_block_out(), 16);
  EXPECT_TRUE(c.permute);
  EXPECT_DOUBLE_EQ(c.ls, 0.15);
  EXPECT_EQ(c.row_rot, RowRotation::kRestore);
  EXPECT_EQ(c.act, ActMode::kDynamic);
  EXPECT_DOUBLE_EQ(c.act_pct, 99.9);
  EXPECT_EQ(c.calib_steps, 32);
  EXPECT_NO_THROW(c.validate());
}

TEST(Config, JsonRoundTrip) {
  Config c;
  c.wbits = 3;
  c.abits = 6;
  c.block_size = 32;
  c.block_out = 8;
  c.permute = false;
  c.ls = 0.25;
  c.row_rot = RowRotation::kNone;
  c.act = ActMode::kStaticChannel;
  c.act_pct = 99.5;
  c.calib_steps = 7;
  EXPECT_EQ(Config::from_json(c.to_json()), c);
  EXPECT_NE(Config::from_json(Config().to_json()), c);
}

TEST(Config, ErrorsNameTheField) {
  auto bad = [](auto mutate, const std::string& needle) {
    Config c;
    mutate(c);
    EXPECT_THROW_WITH(c.validate(), needle);
  };
  bad([](Config& c) { c.wbits = 9; }, "wbits=9");
  bad([](Config& c) { c.wbits = 1; }, "wbits=1");
  bad([](Config& c) { c.abits = 12; }, "abits=12");
  bad([](Config& c) { c.block_size = 0; }, "block_size=0");
  bad([](Config& c) { c.block_out = -1; }, "block_out=-1");
  bad([](Config& c) { c.ls = 1.5; }, "ls=");
  bad([](Config& c) { c.act_pct = 0; }, "act_pct=");
  bad([](Config& c) { c.calib_steps = 0; }, "calib_steps=0");
  bad([](Config& c) { c.abits = 0; c.act = ActMode::kStatic; }, "act=static");
}

TEST(Config, NoQuantizationSettingsAreValid) {
  Config c;
  c.wbits = 16;
  c.abits = 0;
  EXPECT_NO_THROW(c.validate());
  EXPECT_FALSE(c.quantize_weights());
  EXPECT_FALSE(c.quantize_acts());
}

TEST(Config, PropagateIsRefusedWithReason) {
  EXPECT_THROW_WITH(duquant::row_rotation_from_string("propagate"), "row_rot=propagate is refused");
  EXPECT_THROW_WITH(duquant::row_rotation_from_string("sideways"), "restore|none");
  EXPECT_THROW_WITH(duquant::act_mode_from_string("per_tensor"), "dynamic|static|static_channel");
}

TEST(Config, JsonRejectsUnknownAndMistyped) {
  EXPECT_THROW_WITH(Config::from_json(R"({"wbit": 4})"), "unknown option 'wbit'");
  EXPECT_THROW_WITH(Config::from_json(R"({"wbits": "4"})"), "wbits");
  EXPECT_THROW_WITH(Config::from_json(R"({"row_rot": "propagate"})"), "refused");
  EXPECT_THROW_WITH(Config::from_json("[1,2]"), "must be an object");
  EXPECT_THROW_WITH(Config::from_json("{"), "not valid JSON");
  EXPECT_THROW_WITH(Config::from_json(R"({"wbits": 11})"), "wbits=11");
}
