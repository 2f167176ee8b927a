"""quantize_: swap a model's nn.Linear layers for DuQuantLinear in place."""
import re
import sys
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Tuple, Union

import torch
from torch import nn

from . import _C
from .nn import DuQuantLinear, layer_bytes
from .shared_input import link_shared_inputs
from ._report import LayerListReport

# The prototype's selection. Patterns match whole dotted path segments of the module's name.
DEFAULT_INCLUDE = r"(?:^|\.)(?:q_proj|k_proj|v_proj|o_proj|out_proj|fc1|fc2|gate_proj|up_proj|down_proj)(?:\.|$)"
DEFAULT_EXCLUDE = r"(?:^|\.)(?:norm|ln|layernorm|emb)(?:\.|$)"

Pattern = Union[str, "re.Pattern[str]", None]


@dataclass
class LayerReport:
    name: str
    in_features: int
    out_features: int
    bytes_before: int
    bytes_after: int


@dataclass
class QuantizeReport(LayerListReport):
    """What quantize_ did: the swapped layers and the memory they take before and after."""

    config: _C.Config
    layers: List[LayerReport] = field(default_factory=list)
    shared_inputs: List[List[str]] = field(default_factory=list)  # layers that quantize one input once

    @property
    def bytes_before(self) -> int:
        return sum(layer.bytes_before for layer in self.layers)

    @property
    def bytes_after(self) -> int:
        return sum(layer.bytes_after for layer in self.layers)

    def __str__(self) -> str:
        ratio = self.bytes_after / self.bytes_before if self.bytes_before else float("nan")
        lines = [f"duquant: swapped {len(self.layers)} layer(s), {self.config.describe()}"]
        for layer in self.layers:
            lines.append(f"  {layer.name:<40} {layer.in_features:>6} -> {layer.out_features:<6} "
                         f"{layer.bytes_before / 1e6:9.3f} MB -> {layer.bytes_after / 1e6:8.3f} MB")
        lines.append(f"  total {self.bytes_before / 1e6:.3f} MB -> {self.bytes_after / 1e6:.3f} MB "
                     f"({ratio:.3f}x)")
        if self.shared_inputs:
            lines.append(f"  {len(self.shared_inputs)} group(s) of sibling layers share an input transform, e.g. "
                         + ", ".join(self.shared_inputs[0]))
        return "\n".join(lines)


def _compile(pattern: Pattern) -> Optional["re.Pattern[str]"]:
    if pattern is None or isinstance(pattern, re.Pattern):
        return pattern
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ValueError(f"invalid regular expression {pattern!r}: {e}") from None


def select_linear_layers(model: nn.Module, include: Pattern = DEFAULT_INCLUDE, exclude: Pattern = DEFAULT_EXCLUDE,
                         filter_fn: Optional[Callable[[str, nn.Module], bool]] = None) -> List[Tuple[str, nn.Linear]]:
    """The (name, module) pairs quantize_ would swap: nn.Linear layers whose qualified name matches
    `include` (re.search) and not `exclude`; `filter_fn(name, module)` can veto further."""
    inc, exc = _compile(include), _compile(exclude)
    chosen = []
    for name, module in model.named_modules():
        if type(module) is not nn.Linear:  # subclasses may carry semantics we would drop
            continue
        if inc is not None and not inc.search(name):
            continue
        if exc is not None and exc.search(name):
            continue
        if filter_fn is not None and not filter_fn(name, module):
            continue
        chosen.append((name, module))
    return chosen


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def quantize_(model: nn.Module, config: Optional[_C.Config] = None, include: Pattern = DEFAULT_INCLUDE,
              exclude: Pattern = DEFAULT_EXCLUDE, filter_fn: Optional[Callable[[str, nn.Module], bool]] = None,
              verbose: bool = False, share_inputs: bool = True) -> QuantizeReport:
    """Swaps matching nn.Linear layers of `model` for DuQuantLinear, in place.

    Each layer is packed on the device its weight lives on; layers of equal shape are stacked and
    packed in one batched pass (same result as packing each alone). All layers are packed before any
    is swapped, so an error (a NaN weight, say) leaves the model untouched. Pass include=None to
    consider every nn.Linear. Returns a QuantizeReport (print it for a table).

    share_inputs (default True): sibling layers that read the same input (q_proj/k_proj/v_proj,
    gate_proj/up_proj, ...: ``_C.sibling_sets()``), with dynamic activation scales, get one input
    transform, computed from their
    weights stacked by rows, so on the fast path their common input is quantized once (fewer kernel
    launches per block: see shared_input.py). Each layer keeps its own output rotation and weight
    codes; False packs every layer alone.
    """
    config = config if config is not None else _C.Config()
    if not isinstance(model, nn.Module):
        raise TypeError(f"quantize_: model must be an nn.Module, got {type(model).__name__}")
    if isinstance(model, nn.Linear):
        raise TypeError("quantize_: model is itself an nn.Linear; wrap it or use DuQuantLinear.from_linear")
    targets = select_linear_layers(model, include, exclude, filter_fn)
    report = QuantizeReport(config=config)

    def progress(done: int, total: int, name: str) -> None:
        print(f"\r[duquant] packed {done}/{total} {name}", end="", file=sys.stderr, flush=True)

    # One call for all layers: layers of equal shape are stacked and packed together.
    with torch.no_grad():
        packed = _C.pack_linears(
            [(name, linear.weight.detach(), None if linear.bias is None else linear.bias.detach(), config)
             for name, linear in targets],
            progress=progress if verbose else None, share_inputs=share_inputs)
    if verbose and targets:
        print(file=sys.stderr)
    replacements = []
    for (name, linear), (_, pack) in zip(targets, packed):
        q = DuQuantLinear.from_pack(pack)
        replacements.append((name, q))
        report.layers.append(LayerReport(name, linear.in_features, linear.out_features, layer_bytes(linear),
                                         q.nbytes()))
    for name, q in replacements:
        _set_submodule(model, name, q)
    if share_inputs:
        report.shared_inputs = link_shared_inputs(model)
    return report


def finish_calibration(model: nn.Module) -> int:
    """Ends calibration of every DuQuantLinear in `model` that is still calibrating; returns how many."""
    n = 0
    for module in model.modules():
        if isinstance(module, DuQuantLinear) and module.config.needs_calibration and not module.calibrated:
            module.finish_calibration()
            n += 1
    return n


__all__ = ["quantize_", "QuantizeReport", "LayerReport", "select_linear_layers", "finish_calibration",
           "DEFAULT_INCLUDE", "DEFAULT_EXCLUDE"]
