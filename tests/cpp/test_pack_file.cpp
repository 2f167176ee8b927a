// Pack files (DESIGN.md §4): round trips of every config flavour, and every way a file can disagree
// with the layer it fills or with the format.
#include "duquant/io/pack_file.h"

#include <dirent.h>
#include <gtest/gtest.h>
#include <torch/torch.h>
#include <unistd.h>

#include <cstdlib>
#include <functional>
#include <string>
#include <vector>

#include "duquant/io/safetensors.h"
#include "duquant/io/safetensors_torch.h"
#include "duquant/pack_linear.h"
#include "test_helpers.h"

namespace {

using duquant::ActMode;
using duquant::Config;
using duquant::LayerPack;
using duquant::PackedLayer;
using duquant::PackFile;
using duquant::RowRotation;
using duquant_test::outlier_weight;

class PackFileTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const char* tmp = std::getenv("TMPDIR");
    std::string pattern = std::string(tmp && *tmp ? tmp : "/tmp") + "/duquant_pack_XXXXXX";
    ASSERT_NE(mkdtemp(pattern.data()), nullptr);
    dir_ = pattern;
  }
  void TearDown() override {
    for (const auto& name : entries()) ::unlink((dir_ + "/" + name).c_str());
    ::rmdir(dir_.c_str());
  }
  std::string path(const std::string& name) const { return dir_ + "/" + name; }
  std::vector<std::string> entries() const {
    std::vector<std::string> out;
    if (DIR* d = ::opendir(dir_.c_str())) {
      while (const dirent* e = ::readdir(d))
        if (std::string(e->d_name) != "." && std::string(e->d_name) != "..") out.push_back(e->d_name);
      ::closedir(d);
    }
    return out;
  }
  std::string dir_;
};

Config make_config(std::function<void(Config&)> edit) {
  Config c;
  edit(c);
  c.validate();
  return c;
}

LayerPack pack_of(int64_t n, int64_t k, bool bias, const Config& config, uint64_t seed) {
  auto w = outlier_weight(n, k, seed);
  c10::optional<torch::Tensor> b;
  if (bias) b = torch::randn({n});
  LayerPack p = duquant::pack_linear(w, b, config);
  if (config.needs_calibration()) {  // as if calibration had finished: scales are part of the pack
    p.act_scale = torch::rand(p.act_scale.sizes()) + 0.01;
    p.calib_state = torch::tensor({config.calib_steps, int64_t{1}}, torch::kInt64);
  }
  return p;
}

void expect_same_pack(const LayerPack& a, const LayerPack& b) {
  EXPECT_EQ(a.config, b.config);
  EXPECT_EQ(a.in_features, b.in_features);
  EXPECT_EQ(a.out_features, b.out_features);
  const std::pair<const char*, torch::Tensor LayerPack::*> fields[] = {
      {"qweight", &LayerPack::qweight}, {"w_scale", &LayerPack::w_scale}, {"perm", &LayerPack::perm},
      {"r_in", &LayerPack::r_in},       {"r_out", &LayerPack::r_out},     {"bias", &LayerPack::bias},
      {"act_scale", &LayerPack::act_scale}, {"calib_state", &LayerPack::calib_state}};
  for (const auto& [name, member] : fields) {
    const torch::Tensor& x = a.*member;
    const torch::Tensor& y = b.*member;
    ASSERT_EQ(x.defined(), y.defined()) << name;
    if (x.defined()) {
      EXPECT_EQ(x.scalar_type(), y.scalar_type()) << name;
      EXPECT_TRUE(torch::equal(x, y)) << name;
    }
  }
}

// Rewrites a safetensors file after `edit` changed its tensors or metadata (to build bad packs).
void rewrite(const std::string& path,
             const std::function<void(std::map<std::string, torch::Tensor>&, std::map<std::string, std::string>&)>& edit) {
  auto tensors = duquant::io::read_safetensors(path);
  auto metadata = duquant::io::SafetensorsFile::open(path).metadata();
  edit(tensors, metadata);
  std::vector<duquant::io::TorchTensorToWrite> keep;
  std::vector<duquant::io::TensorToWrite> views;
  for (const auto& [name, t] : tensors) keep.push_back(duquant::io::prepare_for_write(name, t));
  for (const auto& k : keep) views.push_back(k.view);
  duquant::io::write_safetensors(path, views, metadata);
}

std::string open_error(const std::string& path) {
  try {
    PackFile::open(path);
  } catch (const std::exception& e) {
    return e.what();
  }
  return "<no error>";
}

#define EXPECT_CONTAINS(text, needle) \
  EXPECT_NE(std::string(text).find(needle), std::string::npos) << "message: " << (text) << "\nexpected: " << (needle)

TEST_F(PackFileTest, RoundTripOfEveryConfigFlavour) {
  struct Flavour {
    std::string name;
    Config config;
    int64_t n, k;
    bool bias;
  };
  const std::vector<Flavour> flavours = {
      {"model.w4a8", Config{}, 48, 64, true},
      {"model.w8a8", make_config([](Config& c) { c.wbits = 8; }), 32, 48, true},
      {"model.w16", make_config([](Config& c) { c.wbits = 16; }), 24, 32, true},
      {"model.w4a16", make_config([](Config& c) { c.abits = 0; }), 32, 32, true},
      {"model.static", make_config([](Config& c) { c.act = ActMode::kStatic; c.calib_steps = 4; }), 32, 48, true},
      {"model.static_channel", make_config([](Config& c) { c.act = ActMode::kStaticChannel; c.act_pct = 99.0; }),
       40, 32, true},
      {"model.no_bias", Config{}, 32, 32, false},
      {"model.row_rot_none", make_config([](Config& c) { c.row_rot = RowRotation::kNone; }), 32, 32, true},
      {"model.no_permute", make_config([](Config& c) { c.permute = false; }), 32, 32, true},
      {"model.short_blocks", make_config([](Config& c) { c.block_size = 16; c.block_out = 8; }), 20, 40, true},
  };
  std::vector<PackedLayer> layers;
  for (size_t i = 0; i < flavours.size(); ++i)
    layers.push_back({flavours[i].name, pack_of(flavours[i].n, flavours[i].k, flavours[i].bias, flavours[i].config, i)});
  const Config global = make_config([](Config& c) { c.wbits = 8; });
  duquant::write_pack(path("pack.safetensors"), layers, global);

  const PackFile file = PackFile::open(path("pack.safetensors"));
  EXPECT_EQ(file.format_version(), duquant::kPackFormatVersion);
  EXPECT_EQ(file.config(), global);
  std::vector<std::string> names;
  for (const auto& f : flavours) names.push_back(f.name);
  EXPECT_EQ(file.layer_names(), names);  // file order is write order, not alphabetical
  EXPECT_TRUE(file.extra_tensor_names().empty());
  EXPECT_EQ(file.metadata().at("format"), "duquant");
  EXPECT_EQ(file.metadata().at("format_version"), "1");
  for (size_t i = 0; i < flavours.size(); ++i) {
    SCOPED_TRACE(flavours[i].name);
    const auto& info = file.layer(flavours[i].name);
    EXPECT_EQ(info.in_features, flavours[i].k);
    EXPECT_EQ(info.out_features, flavours[i].n);
    EXPECT_EQ(info.has_bias, flavours[i].bias);
    EXPECT_EQ(info.config, flavours[i].config);
    expect_same_pack(file.load_layer(flavours[i].name), layers[i].pack);
    expect_same_pack(file.load_layer_checked(flavours[i].name, flavours[i].k, flavours[i].n, flavours[i].bias,
                                             flavours[i].config),
                     layers[i].pack);
    // nullopt accepts the pack's own config.
    expect_same_pack(file.load_layer_checked(flavours[i].name, flavours[i].k, flavours[i].n, flavours[i].bias,
                                             c10::nullopt),
                     layers[i].pack);
  }
  EXPECT_EQ(entries(), std::vector<std::string>{"pack.safetensors"});  // no temp file left behind
}

TEST_F(PackFileTest, MismatchedConfigFieldIsNamed) {
  duquant::write_pack(path("pack.safetensors"), {{"model.q_proj", pack_of(32, 64, true, Config{}, 1)}}, Config{});
  const PackFile file = PackFile::open(path("pack.safetensors"));
  EXPECT_THROW_WITH(file.load_layer_checked("model.q_proj", 64, 32, true, make_config([](Config& c) { c.wbits = 8; })),
                    path("pack.safetensors") + ": layer 'model.q_proj': wbits is 4 in the pack, 8 requested");
  // Every differing field is listed, not just the first.
  const Config other = make_config([](Config& c) {
    c.abits = 0;
    c.block_size = 32;
    c.permute = false;
    c.row_rot = RowRotation::kNone;
  });
  try {
    file.load_layer_checked("model.q_proj", 64, 32, true, other);
    ADD_FAILURE() << "no error";
  } catch (const std::invalid_argument& e) {
    EXPECT_CONTAINS(e.what(), "abits is 8 in the pack, 0 requested");
    EXPECT_CONTAINS(e.what(), "block_size is 16 in the pack, 32 requested");
    EXPECT_CONTAINS(e.what(), "block_out is 16 in the pack, 32 requested");
    EXPECT_CONTAINS(e.what(), "permute is true in the pack, false requested");
    EXPECT_CONTAINS(e.what(), "row_rot is restore in the pack, none requested");
  }
  EXPECT_THROW_WITH(
      file.load_layer_checked("model.q_proj", 64, 32, true, make_config([](Config& c) { c.act = ActMode::kStatic; })),
      "act is dynamic in the pack, static requested");
}

TEST_F(PackFileTest, EquivalentConfigSpellingsAreAccepted) {
  const Config unquantized = make_config([](Config& c) { c.wbits = 16; c.abits = 16; });
  duquant::write_pack(path("pack.safetensors"), {{"l", pack_of(16, 32, false, unquantized, 2)}}, Config{});
  const PackFile file = PackFile::open(path("pack.safetensors"));
  // 0 and 16 both mean unquantized; block_out 0 means block_size; ls never changes the result.
  const Config same = make_config([](Config& c) { c.wbits = 0; c.abits = 0; c.block_out = 16; c.ls = 0.5; });
  EXPECT_TRUE(file.mismatches("l", 32, 16, false, same).empty());
  EXPECT_NO_THROW(file.load_layer_checked("l", 32, 16, false, same));
}

TEST_F(PackFileTest, MismatchedShapeAndBiasAreNamed) {
  duquant::write_pack(path("pack.safetensors"), {{"model.q_proj", pack_of(32, 64, true, Config{}, 3)}}, Config{});
  const PackFile file = PackFile::open(path("pack.safetensors"));
  EXPECT_THROW_WITH(file.load_layer_checked("model.q_proj", 128, 32, true, Config{}),
                    "layer 'model.q_proj': in_features is 64 in the pack, the model's layer has 128");
  EXPECT_THROW_WITH(file.load_layer_checked("model.q_proj", 64, 16, true, Config{}),
                    "out_features is 32 in the pack, the model's layer has 16");
  EXPECT_THROW_WITH(file.load_layer_checked("model.q_proj", 64, 32, false, Config{}),
                    "bias: the pack has one, the model's layer has none");
  EXPECT_THROW_WITH(file.layer("model.k_proj"), "no layer 'model.k_proj' in the pack");
  EXPECT_THROW_WITH(file.load_layer("model.k_proj"), "no layer 'model.k_proj'");
}

TEST_F(PackFileTest, ExtraTensorsAndMetadataRoundTrip) {
  const auto embed = torch::randn({10, 8}).to(torch::kBFloat16);
  const auto ids = torch::arange(5, torch::kInt32);
  const auto flag = torch::tensor(true);  // a 0-dim tensor
  duquant::write_pack(path("pack.safetensors"), {{"model.layers.0.mlp.down_proj", pack_of(16, 32, true, Config{}, 4)}},
                      Config{}, {{"model.embed_tokens.weight", embed}, {"ids", ids}, {"flag", flag}},
                      {{"source", "unit test"}, {"model", "tiny"}});
  const PackFile file = PackFile::open(path("pack.safetensors"));
  auto extra = file.extra_tensor_names();
  std::sort(extra.begin(), extra.end());
  EXPECT_EQ(extra, (std::vector<std::string>{"flag", "ids", "model.embed_tokens.weight"}));
  EXPECT_TRUE(torch::equal(file.tensor("model.embed_tokens.weight"), embed));
  EXPECT_EQ(file.tensor("model.embed_tokens.weight").scalar_type(), torch::kBFloat16);
  EXPECT_TRUE(torch::equal(file.tensor("ids"), ids));
  EXPECT_EQ(file.tensor("flag").dim(), 0);
  EXPECT_TRUE(file.tensor("flag").item<bool>());
  EXPECT_EQ(file.metadata().at("source"), "unit test");
  EXPECT_EQ(file.metadata().at("model"), "tiny");
  EXPECT_EQ(file.layer_names(), std::vector<std::string>{"model.layers.0.mlp.down_proj"});
}

TEST_F(PackFileTest, NameClashesAreRejectedAndNothingIsWritten) {
  const LayerPack p = pack_of(16, 32, true, Config{}, 5);
  const std::string target = path("pack.safetensors");
  EXPECT_THROW_WITH(duquant::write_pack(target, {{"m.q", p}}, Config{}, {{"m.q.qweight", torch::zeros({1})}}),
                    "tensor name 'm.q.qweight' of an extra tensor clashes with layer 'm.q'");
  // Names of fields the layer's config does not use are reserved too (readers rely on it).
  EXPECT_THROW_WITH(duquant::write_pack(target, {{"m.q", p}}, Config{}, {{"m.q.act_scale", torch::zeros({1})}}),
                    "clashes with layer 'm.q'");
  EXPECT_THROW_WITH(duquant::write_pack(target, {{"m.q", p}, {"m.q", p}}, Config{}), "layer 'm.q' appears twice");
  EXPECT_THROW_WITH(duquant::write_pack(target, {{"", p}}, Config{}), "empty name");
  EXPECT_THROW_WITH(duquant::write_pack(target, {{"m.q", p}}, Config{}, {}, {{"format", "pt"}}),
                    "extra metadata may not set 'format'");
  EXPECT_THROW_WITH(duquant::write_pack(target, {{"m.q", p}}, Config{}, {{"x", torch::zeros({2}, torch::kComplexFloat)}}),
                    "cannot be stored in safetensors");
  EXPECT_TRUE(entries().empty());
}

TEST_F(PackFileTest, FailedWriteLeavesExistingPackUntouched) {
  const std::string target = path("pack.safetensors");
  duquant::write_pack(target, {{"good", pack_of(16, 32, true, Config{}, 6)}}, Config{});
  LayerPack bad = pack_of(16, 32, true, Config{}, 7);
  bad.w_scale = torch::ones({3});  // wrong shape: validate() refuses it before anything is written
  EXPECT_THROW_WITH(duquant::write_pack(target, {{"bad", bad}}, Config{}), "layer 'bad': tensor 'w_scale' should be");
  EXPECT_EQ(PackFile::open(target).layer_names(), std::vector<std::string>{"good"});
  EXPECT_EQ(entries(), std::vector<std::string>{"pack.safetensors"});
}

TEST_F(PackFileTest, ForeignOrDamagedMetadataIsRejected) {
  const std::string target = path("pack.safetensors");
  auto fresh = [&] { duquant::write_pack(target, {{"m.q", pack_of(16, 32, true, Config{}, 8)}}, Config{}); };
  using Tensors = std::map<std::string, torch::Tensor>;
  using Meta = std::map<std::string, std::string>;

  fresh();
  rewrite(target, [](Tensors&, Meta& m) { m.clear(); });
  EXPECT_CONTAINS(open_error(target), target + ": not a duquant pack: __metadata__ has no 'format' entry");
  fresh();
  rewrite(target, [](Tensors&, Meta& m) { m["format"] = "pt"; });
  EXPECT_CONTAINS(open_error(target), "format is 'pt', expected \"duquant\"");
  fresh();
  rewrite(target, [](Tensors&, Meta& m) { m["format_version"] = "2"; });
  EXPECT_CONTAINS(open_error(target), "pack format_version 2 is not supported; this duquant reads 1..1 (the file "
                                      "was written by a newer duquant)");
  fresh();
  rewrite(target, [](Tensors&, Meta& m) { m["format_version"] = "one"; });
  EXPECT_CONTAINS(open_error(target), "format_version is 'one', expected a positive integer");
  fresh();
  rewrite(target, [](Tensors&, Meta& m) { m.erase("format_version"); });
  EXPECT_CONTAINS(open_error(target), "no 'format_version' entry");
  fresh();
  rewrite(target, [](Tensors&, Meta& m) { m["duquant"] = m["duquant"].substr(0, 20); });
  EXPECT_CONTAINS(open_error(target), "__metadata__ 'duquant' is not valid JSON");
  fresh();
  rewrite(target, [](Tensors&, Meta& m) { m["duquant"] = "{\"config\": {}, \"layers\": {}, \"layers\": {}}"; });
  EXPECT_CONTAINS(open_error(target), "has the key 'layers' twice");
  fresh();
  rewrite(target, [](Tensors&, Meta& m) { m["duquant"] = "[1, 2]"; });
  EXPECT_CONTAINS(open_error(target), "must be an object with exactly the keys 'config' and 'layers'");
  fresh();
  rewrite(target, [](Tensors&, Meta& m) {
    const auto at = m["duquant"].find("\"wbits\":4");
    ASSERT_NE(at, std::string::npos);
    m["duquant"].replace(at, 9, "\"wbits\":9");
  });
  EXPECT_CONTAINS(open_error(target), "wbits=9 is not allowed");
  fresh();
  rewrite(target, [](Tensors&, Meta& m) {
    const auto at = m["duquant"].find("\"in_features\":32");
    ASSERT_NE(at, std::string::npos);
    m["duquant"].replace(at, 16, "\"in_features\":\"32\"");
  });
  EXPECT_CONTAINS(open_error(target), "layer 'm.q': 'in_features' must be a positive integer");
  fresh();
  rewrite(target, [](Tensors&, Meta& m) {
    const auto at = m["duquant"].find("\"bias\":true");
    ASSERT_NE(at, std::string::npos);
    m["duquant"].insert(at, "\"colour\":1,");
  });
  EXPECT_CONTAINS(open_error(target), "layer 'm.q': unknown metadata key 'colour'");
}

TEST_F(PackFileTest, MissingExtraOrMisshapenLayerTensorsAreNamed) {
  const std::string target = path("pack.safetensors");
  auto fresh = [&] { duquant::write_pack(target, {{"m.q", pack_of(16, 32, true, Config{}, 9)}}, Config{}); };
  using Tensors = std::map<std::string, torch::Tensor>;
  using Meta = std::map<std::string, std::string>;

  fresh();
  rewrite(target, [](Tensors& t, Meta&) { t.erase("m.q.r_out"); });
  EXPECT_CONTAINS(open_error(target), "layer 'm.q': tensor 'm.q.r_out' is missing; the layer's config");
  fresh();
  rewrite(target, [](Tensors& t, Meta&) { t.erase("m.q.bias"); });
  EXPECT_CONTAINS(open_error(target), "tensor 'm.q.bias' is missing; the layer's metadata says bias=true");
  fresh();
  rewrite(target, [](Tensors& t, Meta&) { t["m.q.act_scale"] = torch::ones({1}); });
  EXPECT_CONTAINS(open_error(target), "tensor 'm.q.act_scale' should not be there; the layer's config");
  fresh();
  rewrite(target, [](Tensors& t, Meta&) { t["m.q.w_scale"] = t["m.q.w_scale"].to(torch::kFloat64); });
  EXPECT_CONTAINS(open_error(target), "layer 'm.q': tensor 'w_scale' should be Float [16], got Double [16]");
  fresh();
  rewrite(target, [](Tensors& t, Meta&) { t["m.q.qweight"] = torch::zeros({16, 32}, torch::kUInt8); });
  EXPECT_CONTAINS(open_error(target), "tensor 'qweight' should be Byte [16, 16], got Byte [16, 32]");
  fresh();
  rewrite(target, [](Tensors& t, Meta&) { t["m.q.perm"] = torch::arange(32, torch::kInt32); });
  EXPECT_CONTAINS(open_error(target), "tensor 'perm' should be Long [32], got Int [32]");
  // A tensor under a name of no layer is an extra tensor, not an error.
  fresh();
  rewrite(target, [](Tensors& t, Meta&) { t["m.k.weight"] = torch::ones({2}); });
  EXPECT_EQ(PackFile::open(target).extra_tensor_names(), std::vector<std::string>{"m.k.weight"});
}

TEST_F(PackFileTest, LoadsOntoTheRequestedDeviceAndCopiesData) {
  const LayerPack p = pack_of(16, 32, true, Config{}, 10);
  duquant::write_pack(path("pack.safetensors"), {{"l", p}}, Config{});
  const PackFile file = PackFile::open(path("pack.safetensors"));
  LayerPack loaded = file.load_layer("l", torch::kCPU);
  EXPECT_TRUE(loaded.qweight.device().is_cpu());
  // Loaded tensors are owned copies, writable and independent of the file's mapping.
  loaded.bias.add_(1.0);
  EXPECT_TRUE(torch::equal(file.load_layer("l").bias, p.bias));
}

}  // namespace
