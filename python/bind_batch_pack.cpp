// Python binding of pack_linears: a model's layers packed in one call, equal-shaped layers stacked.
#include <torch/extension.h>

#include "duquant/pack_model.h"

namespace py = pybind11;

void bind_batch_pack(py::module_& m) {
  m.def(
      "pack_linears",
      [](py::sequence layers, py::object progress, py::object device, int64_t max_stack_bytes, bool share_inputs) {
        std::vector<duquant::LinearToPack> todo;
        todo.reserve(py::len(layers));
        for (size_t i = 0; i < py::len(layers); ++i) {
          auto item = py::reinterpret_borrow<py::sequence>(layers[i]);
          if (py::len(item) != 4 && py::len(item) != 5)
            throw py::value_error("pack_linears: layers[" + std::to_string(i) +
                                  "] must be (name, weight, bias or None, Config[, input group])");
          duquant::LinearToPack l;
          l.name = py::cast<std::string>(item[0]);
          l.weight = py::cast<torch::Tensor>(item[1]);
          if (!item[2].is_none()) l.bias = py::cast<torch::Tensor>(item[2]);
          l.config = py::cast<duquant::Config>(item[3]);
          if (py::len(item) == 5 && !item[4].is_none()) l.input_group = py::cast<std::string>(item[4]);
          todo.push_back(std::move(l));
        }
        duquant::PackModelOptions options;
        if (!device.is_none()) options.device = torch::Device(py::cast<std::string>(py::str(device)));
        options.max_stack_bytes = max_stack_bytes;
        options.share_inputs = share_inputs;
        duquant::PackProgress report;
        if (!progress.is_none()) {
          report = [&progress](size_t done, size_t total, const std::string& name) {
            py::gil_scoped_acquire gil;
            progress(done, total, name);
          };
        }
        std::vector<duquant::PackedLayer> packed;
        {
          py::gil_scoped_release no_gil;  // packing takes a while; let other Python threads run
          packed = duquant::pack_linears(todo, report, options);
        }
        py::list out;
        for (auto& p : packed) out.append(py::make_tuple(p.name, std::move(p.pack)));
        return out;
      },
      py::arg("layers"), py::arg("progress") = py::none(), py::arg("device") = py::none(),
      py::arg("max_stack_bytes") = 0, py::arg("share_inputs") = false,
      R"doc(Packs many layers in one call: [(name, weight, bias or None, Config[, input group]), ...] -> [(name, LayerPack), ...].

Layers of equal shape, config and device are stacked and packed together (one batched eigensolver
call per side on CUDA); each pack equals pack_linear on that layer. progress(done, total, name) is
called after each layer. device: where to pack (default: each weight's device). max_stack_bytes:
float64 bytes per stacked pass (0 = 1 GiB on CUDA, 256 MiB otherwise). Layers given the same input
group (a str; None or "" for none) share one input transform computed from their weights stacked by
rows, so the fast path quantizes their common input once. share_inputs: also group siblings by name
(q_proj/k_proj/v_proj, gate_proj/up_proj, ... children of one module; see sibling_sets()).
Errors name the layer.)doc");
  m.def("sibling_sets", [] { return duquant::kSiblingSets; },
        "Names of children of one module that read the same input (what share_inputs groups).");
  m.def("sibling_set_of", &duquant::sibling_set_of, py::arg("parent"), py::arg("child"),
        "Index into sibling_sets() of the child `child` of module `parent` (dotted names), -1 for none "
        "(and for children of cross-attention modules).");
}
