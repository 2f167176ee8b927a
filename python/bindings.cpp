// duquant_ext._C: Config, LayerPack and the packer for Python. The forward path is reached through
// the dispatcher ops (torch.ops.duquant.*) registered by the core library.
#include <algorithm>
#include <iterator>

#include <pybind11/operators.h>
#include <torch/extension.h>

#include "duquant/duquant.h"

namespace py = pybind11;
using duquant::Config;
using duquant::LayerPack;

namespace {

Config make_config(py::kwargs kwargs) {
  // Keyword-only and strict: an unknown option is an error, never silently ignored.
  static const char* known[] = {"wbits", "abits", "block_size", "block_out", "permute",
                                "ls", "row_rot", "act", "act_pct", "calib_steps"};
  Config c;
  for (auto item : kwargs) {
    const auto key = py::cast<std::string>(item.first);
    py::handle v = item.second;
    if (key == "wbits") c.wbits = py::cast<int64_t>(v);
    else if (key == "abits") c.abits = py::cast<int64_t>(v);
    else if (key == "block_size") c.block_size = py::cast<int64_t>(v);
    else if (key == "block_out") c.block_out = v.is_none() ? 0 : py::cast<int64_t>(v);
    else if (key == "permute") c.permute = py::cast<bool>(v);
    else if (key == "ls") c.ls = py::cast<double>(v);
    else if (key == "row_rot") c.row_rot = duquant::row_rotation_from_string(py::cast<std::string>(v));
    else if (key == "act") c.act = duquant::act_mode_from_string(py::cast<std::string>(v));
    else if (key == "act_pct") c.act_pct = py::cast<double>(v);
    else if (key == "calib_steps") c.calib_steps = py::cast<int64_t>(v);
    else {
      std::string names;
      for (const char* k : known) names += std::string(names.empty() ? "" : ", ") + k;
      throw py::type_error("duquant Config: unknown option '" + key + "'; known: " + names);
    }
  }
  c.validate();
  return c;
}

py::object optional_tensor(const torch::Tensor& t) { return t.defined() ? py::cast(t) : py::none(); }

// A LayerPack from buffer-name -> tensor (None entries skipped), not yet validated.
LayerPack layer_pack_from_tensors(int64_t in_features, int64_t out_features, const Config& config, py::dict tensors,
                                  const std::string& where) {
  LayerPack p;
  p.config = config;
  p.in_features = in_features;
  p.out_features = out_features;
  for (auto item : tensors) {
    const auto key = py::cast<std::string>(item.first);
    if (item.second.is_none()) continue;
    const auto* field = std::find_if(std::begin(duquant::kLayerTensorFields), std::end(duquant::kLayerTensorFields),
                                     [&](const duquant::LayerTensorField& f) { return key == f.name; });
    if (field == std::end(duquant::kLayerTensorFields)) throw py::value_error(where + ": unknown tensor '" + key + "'");
    p.*field->member = py::cast<torch::Tensor>(item.second);
  }
  return p;
}

torch::Device device_from(py::object device) {
  return device.is_none() ? torch::Device(torch::kCPU) : torch::Device(py::cast<std::string>(py::str(device)));
}

}  // namespace

void bind_pack_file(py::module_& m);  // below
void bind_fast_path(py::module_& m);  // bind_fast_path.cpp

void bind_batch_pack(py::module_& m);  // bind_batch_pack.cpp

PYBIND11_MODULE(_C, m) {
  bind_batch_pack(m);
  bind_fast_path(m);
  m.doc() = "duquant compiled core: Config, LayerPack, pack_linear";

  py::class_<Config>(m, "Config", R"doc(DuQuant settings (DESIGN.md section 2).

Keyword arguments: wbits=4, abits=8, block_size=16, block_out=0 (=block_size), permute=True,
ls=0.15, row_rot="restore"|"none", act="dynamic"|"static"|"static_channel", act_pct=99.9,
calib_steps=32. Unknown or invalid values raise with the field named.)doc")
      .def(py::init(&make_config))
      .def_readonly("wbits", &Config::wbits)
      .def_readonly("abits", &Config::abits)
      .def_readonly("block_size", &Config::block_size)
      .def_readonly("block_out", &Config::block_out)
      .def_readonly("permute", &Config::permute)
      .def_readonly("ls", &Config::ls)
      .def_property_readonly("row_rot", [](const Config& c) { return std::string(duquant::to_string(c.row_rot)); })
      .def_property_readonly("act", [](const Config& c) { return std::string(duquant::to_string(c.act)); })
      .def_readonly("act_pct", &Config::act_pct)
      .def_readonly("calib_steps", &Config::calib_steps)
      .def_property_readonly("quantize_weights", &Config::quantize_weights)
      .def_property_readonly("quantize_acts", &Config::quantize_acts)
      .def_property_readonly("needs_calibration", &Config::needs_calibration)
      .def_property_readonly("effective_block_out", &Config::effective_block_out)
      .def("to_json", &Config::to_json)
      .def_static("from_json", &Config::from_json)
      .def("describe", &Config::describe)
      .def_static("from_env",
                  [](py::object environ) {
                    return py::module_::import("duquant_ext.env").attr("config_from_env")(environ);
                  },
                  py::arg("environ") = py::none(),
                  "The Config set by DUQUANT_* / OPENPI_DUQUANT_* variables of `environ` (default os.environ); "
                  "see duquant_ext.env.")
      .def("replace", [](const Config& c, py::kwargs changes) {
             py::dict merged = py::module_::import("json").attr("loads")(c.to_json());
             for (auto item : changes) merged[item.first] = item.second;
             return make_config(py::kwargs(merged));
           }, "A copy with some fields changed, e.g. cfg.replace(wbits=8).")
      .def(py::self == py::self)
      .def(py::self != py::self)
      .def("__repr__", [](const Config& c) {
        std::ostringstream s;
        s << "Config(wbits=" << c.wbits << ", abits=" << c.abits << ", block_size=" << c.block_size
          << ", block_out=" << c.block_out << ", permute=" << (c.permute ? "True" : "False") << ", ls=" << c.ls
          << ", row_rot='" << duquant::to_string(c.row_rot) << "', act='" << duquant::to_string(c.act)
          << "', act_pct=" << c.act_pct << ", calib_steps=" << c.calib_steps << ")";
        return s.str();
      })
      .def(py::pickle([](const Config& c) { return c.to_json(); },
                      [](const std::string& s) { return Config::from_json(s); }));

  py::class_<LayerPack>(m, "LayerPack", "The tensors of one packed layer; see DESIGN.md section 2.")
      .def_readonly("config", &LayerPack::config)
      .def_readonly("in_features", &LayerPack::in_features)
      .def_readonly("out_features", &LayerPack::out_features)
      .def_property_readonly("perm", [](const LayerPack& p) { return optional_tensor(p.perm); })
      .def_property_readonly("r_in", [](const LayerPack& p) { return optional_tensor(p.r_in); })
      .def_property_readonly("r_out", [](const LayerPack& p) { return optional_tensor(p.r_out); })
      .def_property_readonly("qweight", [](const LayerPack& p) { return optional_tensor(p.qweight); })
      .def_property_readonly("w_scale", [](const LayerPack& p) { return optional_tensor(p.w_scale); })
      .def_property_readonly("bias", [](const LayerPack& p) { return optional_tensor(p.bias); })
      .def_property_readonly("act_scale", [](const LayerPack& p) { return optional_tensor(p.act_scale); })
      .def_property_readonly("calib_state", [](const LayerPack& p) { return optional_tensor(p.calib_state); })
      .def("tensors", [](const LayerPack& p) {
        py::dict d;
        for (const auto& field : duquant::kLayerTensorFields)
          if ((p.*field.member).defined()) d[field.name] = p.*field.member;
        return d;
      }, "The defined tensors by buffer name.")
      .def("__repr__", [](const LayerPack& p) {
        return "LayerPack(in_features=" + std::to_string(p.in_features) +
               ", out_features=" + std::to_string(p.out_features) + ", " + p.config.describe() + ")";
      });

  // Defaults are None rather than Config() objects: pybind11 3 reprs default values while the
  // module is still initialising, which crashed on PyTorch 2.11.
  {
    py::tuple names(std::size(duquant::kLayerTensorFields));
    for (size_t i = 0; i < std::size(duquant::kLayerTensorFields); ++i) names[i] = duquant::kLayerTensorFields[i].name;
    m.attr("LAYER_TENSOR_NAMES") = names;  // a layer's tensors in pack order (DESIGN §4): DuQuantLinear's buffers
  }
  m.def("pack_linear",
        [](const torch::Tensor& weight, c10::optional<torch::Tensor> bias, py::object config,
           const std::string& name) {
          return duquant::pack_linear(weight, bias, config.is_none() ? Config() : py::cast<Config>(config), name);
        },
        py::arg("weight"), py::arg("bias") = py::none(), py::arg("config") = py::none(), py::arg("name") = "weight",
        "Packs an [out, in] weight (and optional bias) into a LayerPack on the weight's device.");
  m.def("empty_layer_pack",
        [](int64_t in_features, int64_t out_features, bool has_bias, const Config& config, py::object device) {
          return duquant::empty_layer_pack(in_features, out_features, has_bias, config, device_from(device));
        },
        py::arg("in_features"), py::arg("out_features"), py::arg("has_bias"), py::arg("config"),
        py::arg("device") = py::none());
  m.def("validate_tensors",
        [](int64_t in_features, int64_t out_features, const Config& config, py::dict tensors, const std::string& where) {
          layer_pack_from_tensors(in_features, out_features, config, tensors, where).validate(where);
        },
        "Checks a layer's tensors against its shape and config; raises naming the tensor that differs.");
  m.def("make_layer_pack",
        [](int64_t in_features, int64_t out_features, const Config& config, py::dict tensors, const std::string& where) {
          LayerPack p = layer_pack_from_tensors(in_features, out_features, config, tensors, where);
          p.validate(where);
          return p;
        },
        py::arg("in_features"), py::arg("out_features"), py::arg("config"), py::arg("tensors"),
        py::arg("where") = "layer",
        "A validated LayerPack from its tensors by buffer name (as LayerPack.tensors() returns them).");
  bind_pack_file(m);
  m.def("channel_permutation", &duquant::channel_permutation, py::arg("weight_f64"), py::arg("ls") = 0.15);
  m.def("canonical_signs", &duquant::canonical_signs);
  m.def("column_block_rotations", &duquant::column_block_rotations);
  m.def("quantize_rows", [](const torch::Tensor& w, int64_t bits) {
    auto q = duquant::quantize_rows(w, bits);
    return py::make_tuple(q.codes, q.scales);
  });
  m.def("pack_int4", &duquant::pack_int4);
  m.def("unpack_int4", &duquant::unpack_int4);
  m.def("finish_calibration", [](torch::Tensor calib_state, const std::string& where) {
    duquant::finish_calibration(calib_state, where);
  });
}

namespace {

using duquant::PackFile;

// Paths may be str or os.PathLike (pathlib.Path), as everywhere in Python.
std::string fs_path(const py::object& path) {
  return py::cast<std::string>(py::module_::import("os").attr("fspath")(path));
}

py::dict tensors_to_dict(const std::map<std::string, torch::Tensor>& tensors) {
  py::dict d;
  for (const auto& [name, t] : tensors) d[py::str(name)] = t;
  return d;
}

}  // namespace

// Pack files (DESIGN.md section 4) and the safetensors reader they are built on.
void bind_pack_file(py::module_& m) {
  py::register_exception<duquant::io::SafetensorsError>(m, "SafetensorsError", PyExc_ValueError);

  m.def("read_safetensors",
        [](py::object path) { return tensors_to_dict(duquant::io::read_safetensors(fs_path(path))); },
        py::arg("path"), "Every tensor of a safetensors file as {name: CPU tensor}; validates the whole file first.");
  m.def("safetensors_metadata",
        [](py::object path) { return duquant::io::SafetensorsFile::open(fs_path(path)).metadata(); }, py::arg("path"),
        "The __metadata__ of a safetensors file as {str: str}.");

  m.def("write_pack",
        [](py::object path_like, const std::vector<std::pair<std::string, LayerPack>>& layers,
           const Config& global_config, py::object extra, const std::map<std::string, std::string>& extra_metadata) {
          std::vector<duquant::PackedLayer> packed;
          packed.reserve(layers.size());
          for (const auto& [name, pack] : layers) packed.push_back({name, pack});
          std::vector<std::pair<std::string, torch::Tensor>> extra_tensors;
          if (!extra.is_none())
            for (auto item : py::cast<py::dict>(extra))
              extra_tensors.emplace_back(py::cast<std::string>(item.first), py::cast<torch::Tensor>(item.second));
          const std::string path = fs_path(path_like);
          py::gil_scoped_release release;  // the write is pure I/O
          duquant::write_pack(path, packed, global_config, extra_tensors, extra_metadata);
        },
        py::arg("path"), py::arg("layers"), py::arg("config"), py::arg("extra") = py::none(),
        py::arg("extra_metadata") = std::map<std::string, std::string>{},
        "Writes [(name, LayerPack)] (plus {name: tensor} extra tensors) to a pack file, atomically.");

  py::class_<PackFile::LayerInfo>(m, "PackLayerInfo", "A layer's entry in a pack file's metadata.")
      .def_readonly("name", &PackFile::LayerInfo::name)
      .def_readonly("in_features", &PackFile::LayerInfo::in_features)
      .def_readonly("out_features", &PackFile::LayerInfo::out_features)
      .def_readonly("has_bias", &PackFile::LayerInfo::has_bias)
      .def_readonly("config", &PackFile::LayerInfo::config)
      .def("__repr__", [](const PackFile::LayerInfo& l) {
        return "PackLayerInfo(name='" + l.name + "', in_features=" + std::to_string(l.in_features) +
               ", out_features=" + std::to_string(l.out_features) + ", has_bias=" + (l.has_bias ? "True" : "False") +
               ", " + l.config.describe() + ")";
      });

  py::class_<PackFile>(m, "PackFile", R"doc(A duquant pack file opened for reading (validated on open).

    pf = dq.PackFile.open("model.duquant.safetensors")
    pf.layer_names(); pf.layer("model.q_proj").config; pf.tensor("model.q_proj.qweight")
)doc")
      .def_static("open", [](py::object path) { return PackFile::open(fs_path(path)); }, py::arg("path"))
      .def_property_readonly("path", &PackFile::path)
      .def_property_readonly("format_version", &PackFile::format_version)
      .def_property_readonly("config", &PackFile::config, "The global config.")
      .def("layer_names", &PackFile::layer_names)
      .def("layer", &PackFile::layer, py::arg("name"), py::return_value_policy::copy)
      .def("extra_tensor_names", &PackFile::extra_tensor_names)
      .def("tensor_names", &PackFile::tensor_names)
      .def("tensor", &PackFile::tensor, py::arg("name"))
      .def_property_readonly("metadata", &PackFile::metadata)
      .def("load_layer",
           [](const PackFile& f, const std::string& name, py::object device) {
             return f.load_layer(name, device_from(device));
           },
           py::arg("name"), py::arg("device") = py::none())
      .def("load_layer_checked",
           [](const PackFile& f, const std::string& name, int64_t in_features, int64_t out_features, bool has_bias,
              c10::optional<Config> config, py::object device) {
             return f.load_layer_checked(name, in_features, out_features, has_bias, config, device_from(device));
           },
           py::arg("name"), py::arg("in_features"), py::arg("out_features"), py::arg("has_bias"),
           py::arg("config") = py::none(), py::arg("device") = py::none())
      .def("mismatches", &PackFile::mismatches, py::arg("name"), py::arg("in_features"), py::arg("out_features"),
           py::arg("has_bias"), py::arg("config") = py::none(),
           "What load_layer_checked would report, one message per field; [] when the layer matches.")
      .def("__contains__", &PackFile::has_layer)
      .def("__len__", [](const PackFile& f) { return f.layer_names().size(); })
      .def("__repr__", [](const PackFile& f) {
        return "PackFile('" + f.path() + "', format_version=" + std::to_string(f.format_version()) + ", " +
               std::to_string(f.layer_names().size()) + " layers, " + std::to_string(f.extra_tensor_names().size()) +
               " extra tensors, " + f.config().describe() + ")";
      });
}
