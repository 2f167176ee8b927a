"""save_pack / load_pack: a model's DuQuantLinear layers to and from one pack file.

A pack file is a standard safetensors file (DESIGN.md section 4): per layer ``<name>.qweight``,
``.w_scale``, ``.perm``, ``.r_in``, ``.r_out``, ``.bias``, ``.act_scale``, ``.calib_state``, and
metadata with the config and shape of every layer. Loading recomputes nothing.

    dq.quantize_(model, dq.Config())
    dq.save_pack(model, "model.duquant.safetensors")
    ...
    fresh = build_model()                                  # float weights not needed
    print(dq.load_pack(fresh, "model.duquant.safetensors"))  # swaps the named nn.Linear layers
"""
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from . import _C
from .nn import _BUFFERS, DuQuantLinear
from .quantize import _set_submodule
from .shared_input import link_shared_inputs
from ._report import LayerListReport

PathLike = Union[str, "os.PathLike[str]"]
ConfigRequest = Union[None, _C.Config, Mapping[str, _C.Config]]


def _layer_pack(name: str, module: DuQuantLinear) -> _C.LayerPack:
    tensors = {b: getattr(module, b) for b in _BUFFERS if getattr(module, b) is not None}
    return _C.make_layer_pack(module.in_features, module.out_features, module.config, tensors, name)


def _most_common_config(configs: Sequence[_C.Config]) -> _C.Config:
    # The global config is informational (every layer carries its own); the most common one
    # describes the file best. Ties go to the first layer's.
    counts = Counter(c.to_json() for c in configs)
    best = max(counts.values())
    return next(c for c in configs if counts[c.to_json()] == best)


def write_layers(path: PathLike, layers: Sequence[Tuple[str, DuQuantLinear]],
                 extra_metadata: Optional[Mapping[str, str]] = None) -> None:
    """Writes the given (qualified name, DuQuantLinear) pairs to a pack file, atomically."""
    path = os.fspath(path)
    metadata = dict(extra_metadata or {})
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(f"{path}: extra_metadata must map str to str; {key!r}: {value!r} does not")
    if not layers:
        raise ValueError(f"{path}: nothing to write: no DuQuantLinear layers (quantize the model first, "
                         f"e.g. dq.quantize_(model, dq.Config()))")
    packs = [(name, _layer_pack(name, module)) for name, module in layers]
    _C.write_pack(path, packs, _most_common_config([p.config for _, p in packs]), None, metadata)


def save_pack(model: nn.Module, path: PathLike, extra_metadata: Optional[Mapping[str, str]] = None,
              layers: Optional[Iterable[str]] = None) -> List[str]:
    """Writes every DuQuantLinear of `model` (or only those named in `layers`) to a pack file under
    its qualified module name, with its config, shapes and calibrated activation scales.

    The write is atomic: a temporary file next to `path` is renamed over it when complete, so an
    error leaves any existing file untouched. `extra_metadata` ({str: str}) is stored in the
    safetensors ``__metadata__``. Returns the names written, in file order.
    """
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, DuQuantLinear)]
    if layers is not None:
        wanted = list(layers)
        by_name = dict(found)
        missing = [n for n in wanted if n not in by_name]
        if missing:
            raise ValueError(f"{os.fspath(path)}: cannot save: no DuQuantLinear named {missing[0]!r} in the model"
                             + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        found = [(n, by_name[n]) for n in wanted]
    write_layers(path, found, extra_metadata)
    return [n for n, _ in found]


@dataclass
class LoadedLayer:
    name: str
    in_features: int
    out_features: int
    config: _C.Config
    action: str  # "swapped" (was nn.Linear) or "refilled" (was a DuQuantLinear, now holds the pack's tensors)
    device: str


@dataclass
class LoadReport(LayerListReport):
    """What load_pack did: the layers it filled, and the pack layers it skipped (strict=False)."""

    path: str
    layers: List[LoadedLayer] = field(default_factory=list)
    skipped: List[str] = field(default_factory=list)

    def __str__(self) -> str:
        lines = [f"duquant: loaded {len(self.layers)} layer(s) from {self.path}"]
        for layer in self.layers:
            lines.append(f"  {layer.name:<40} {layer.in_features:>6} -> {layer.out_features:<6} "
                         f"{layer.config.describe()} [{layer.action}, {layer.device}]")
        if self.skipped:
            lines.append(f"  skipped {len(self.skipped)} pack layer(s) not in the model: "
                         + ", ".join(self.skipped[:5]) + (" ..." if len(self.skipped) > 5 else ""))
        return "\n".join(lines)


def _module_device(module: nn.Module) -> torch.device:
    for t in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
        if t is not None:
            # A skeleton model built on the meta device gets real tensors: load those on the CPU.
            return torch.device("cpu") if t.device.type == "meta" else t.device
    return torch.device("cpu")


def _requested_config(config: ConfigRequest, name: str) -> Optional[_C.Config]:
    if config is None or isinstance(config, _C.Config):
        return config
    return config.get(name)  # a mapping: layers it does not name accept the pack's config


def load_pack(model: nn.Module, path: Union[PathLike, _C.PackFile], config: ConfigRequest = None,
              strict: bool = True, device: Union[None, str, torch.device] = None) -> LoadReport:
    """Fills `model` from a pack file (`path`, or a `PackFile` already open): each pack layer's
    nn.Linear (by qualified name) is swapped for a DuQuantLinear built from the pack, and an existing
    DuQuantLinear is refilled in place. Nothing is recomputed; tensors land on the layer's current
    device (or `device`).

    Every layer is checked before any is changed, so a failure leaves the model untouched: the pack
    must match each layer's in/out features and bias, and `config` if given (a Config for every
    layer, or {name: Config}; None accepts the pack's). A mismatch raises ValueError naming the layer
    and the field, e.g. "layer 'q_proj': wbits is 4 in the pack, 8 requested". With strict=True
    (default) every pack layer must exist in the model as nn.Linear or DuQuantLinear; strict=False
    skips those that do not and lists them in the report.
    """
    pack_file = path if isinstance(path, _C.PackFile) else None
    path = pack_file.path if pack_file is not None else os.fspath(path)
    if not isinstance(model, nn.Module):
        raise TypeError(f"load_pack: model must be an nn.Module, got {type(model).__name__}")
    if pack_file is None:
        pack_file = _C.PackFile.open(path)
    modules = dict(model.named_modules())
    report = LoadReport(path=path)

    # 1. Check every layer against the model (all problems at once), touching nothing.
    plan, problems = [], []
    for name in pack_file.layer_names():
        module = modules.get(name)
        if not isinstance(module, (nn.Linear, DuQuantLinear)):
            if strict:
                what = "no such module" if module is None else f"it is a {type(module).__name__}"
                problems.append(f"layer {name!r}: the model has no nn.Linear or DuQuantLinear there ({what})")
            else:
                report.skipped.append(name)
            continue
        requested = _requested_config(config, name)
        diffs = pack_file.mismatches(name, module.in_features, module.out_features, module.bias is not None,
                                     requested)
        if diffs:
            problems.append(f"layer {name!r}: " + "; ".join(diffs))
            continue
        plan.append((name, module))
    if problems:
        shown = problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else [])
        raise ValueError(f"{path}: the pack does not match the model:\n  " + "\n  ".join(shown))

    # 2. Read every layer (may still fail on I/O), still touching nothing.
    loaded = []
    for name, module in plan:
        target = torch.device(device) if device is not None else _module_device(module)
        loaded.append((name, module, pack_file.load_layer(name, str(target)), target))

    # 3. Swap.
    for name, module, pack, target in loaded:
        if isinstance(module, DuQuantLinear):
            module._set_pack(pack)
            action = "refilled"
        else:
            _set_submodule(model, name, DuQuantLinear.from_pack(pack))
            action = "swapped"
        report.layers.append(LoadedLayer(name, pack.in_features, pack.out_features, pack.config, action, str(target)))
    if loaded:
        link_shared_inputs(model)  # siblings packed with one input transform quantize their input once
    return report


__all__ = ["save_pack", "load_pack", "write_layers", "LoadReport", "LoadedLayer"]
