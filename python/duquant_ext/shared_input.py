"""Sibling layers that quantize their common input once.

q_proj, k_proj and v_proj of an attention block (gate_proj and up_proj of an MLP) read the same
activations. Packed as one input group (``quantize_(..., share_inputs=True)``, the default), they
get one input transform, computed from their weights stacked by rows, so the same ``x`` gives
all of them the same int8 activation codes. On the CUDA fast path the first of them to see an
input runs the input kernel once and all of their GEMMs, as one grouped launch where the plan
allows (small and medium M); the others return the outputs made for them. Per attention block
q/k/v take two launches instead of six, gate/up two instead of four.

Reuse is keyed on the input tensor itself (the same object, unchanged since: its version counter)
and on each layer's buffers (the same, unchanged), and each output is taken at most once, so a
model that calls the layers in any order, or one of them twice, still gets exactly its own
answer: bit-identical to each layer run alone. Under ``torch.compile`` the layers run unshared
(the compiled graph sees each layer's whole op).
"""
from typing import List

import torch
from torch import nn


def _compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    is_compiling = getattr(compiler, "is_compiling", None)
    return bool(is_compiling()) if is_compiling is not None else False


class SharedInput:
    """A group of sibling layers with one input transform: the first of them to see an input
    quantizes it once and runs every member's GEMM (one grouped launch where the kernels allow);
    the others then take their outputs, each at most once."""

    def __init__(self, members):
        self.members = list(members)
        self.size = len(self.members)
        self._x = None
        self._version = -1
        self._outputs = {}  # id(member) -> its output for _x, not yet taken
        self._operands = {}  # id(member) -> its buffers and their versions when _outputs were made

    @staticmethod
    def _buffers(layer):
        return [t for t in (layer.qweight, layer.w_scale, layer.r_out, layer.bias) if t is not None]

    def _unchanged(self, layer) -> bool:
        then, now = self._operands.get(id(layer), []), self._buffers(layer)
        return len(then) == len(now) and all(a is b and v == b._version for (a, v), b in zip(then, now))

    def forward(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """`layer`'s output for x (layer is one of the members)."""
        key = id(layer)
        if self._x is x and self._version == x._version and key in self._outputs and self._unchanged(layer):
            out = self._outputs.pop(key)
            if not self._outputs:  # everyone had theirs: let the tensors go
                self._x = None
            return out
        wbits, abits, _ = layer._op_args
        codes, scales = torch.ops.duquant.quantize_input(
            x.reshape(-1, layer.in_features), layer.perm, layer.r_in, None, abits)
        members = self.members
        outs = torch.ops.duquant.linear_codes_group(
            codes, scales, x, [m.qweight for m in members], [m.w_scale for m in members], layer.r_in,
            [m.r_out for m in members], [m.bias for m in members], layer.in_features, wbits, abits)
        self._x, self._version = x, x._version
        self._outputs = {id(m): o for m, o in zip(members, outs) if m is not layer}
        self._operands = {id(m): [(t, t._version) for t in self._buffers(m)] for m in members}
        return outs[next(i for i, m in enumerate(members) if m is layer)]

    def forget(self) -> None:
        self._x = None
        self._outputs, self._operands = {}, {}


def can_share(layer: nn.Module) -> bool:
    """Whether `layer`'s activation quantization depends on nothing but its input transform."""
    cfg = layer.config
    return int(cfg.abits) > 0 and layer._op_args[2] == "dynamic" and layer.r_in is not None


def _same_transform(a: nn.Module, b: nn.Module) -> bool:
    if (a.in_features != b.in_features or a._op_args != b._op_args or a.r_in.shape != b.r_in.shape
            or a.r_in.device != b.r_in.device or (a.perm is None) != (b.perm is None)):
        return False
    if a.perm is not None and not torch.equal(a.perm, b.perm):
        return False
    return torch.equal(a.r_in, b.r_in)


def link_shared_inputs(model: nn.Module) -> List[List[str]]:
    """Links sibling DuQuantLinear layers (children of one module) whose input transforms are equal
    and whose activation scales are dynamic, so they quantize a common input once; unlinks every
    other DuQuantLinear. quantize_ and load_pack call it; call it again after changing layers'
    transforms by hand. Returns the linked groups' qualified names."""
    from .nn import DuQuantLinear

    groups = []
    for parent_name, parent in model.named_modules():
        children = [(n, m) for n, m in parent.named_children() if isinstance(m, DuQuantLinear)]
        for _, m in children:
            m._input_share = None
        candidates = [(n, m) for n, m in children if can_share(m)]
        while candidates:
            name, first = candidates[0]
            members = [(name, first)] + [(n, m) for n, m in candidates[1:] if _same_transform(first, m)]
            candidates = [c for c in candidates if all(c[1] is not m for _, m in members)]
            if len(members) < 2:
                continue
            share = SharedInput([m for _, m in members])
            for _, m in members:
                m._input_share = share
            groups.append([f"{parent_name}.{n}" if parent_name else n for n, _ in members])
    return groups


__all__ = ["SharedInput", "link_shared_inputs", "can_share"]
