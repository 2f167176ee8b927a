"""Sibling layers that quantize their common input once.

q_proj, k_proj and v_proj of an attention block (gate_proj and up_proj of an MLP) read the same
activations. Packed as one input group (``quantize_(..., share_inputs=True)``, the default), they
get one input transform, computed from their weights stacked by rows, so the same ``x`` gives
all of them the same int8 activation codes. On the CUDA fast path the first of them to see an
input runs the input kernel; the others reuse its codes and run only their GEMM: per attention
block two launches fewer.

Reuse is keyed on the input tensor itself (the same object, unchanged since: its version counter)
and each layer takes the codes at most once, so a model that calls the layers in any order, or
one of them twice, still gets exactly its own answer. Under ``torch.compile`` the layers run
unshared (the compiled graph sees each layer's whole op).
"""
from typing import List

import torch
from torch import nn


def _compiling() -> bool:
    compiler = getattr(torch, "compiler", None)
    is_compiling = getattr(compiler, "is_compiling", None)
    return bool(is_compiling()) if is_compiling is not None else False


class SharedInput:
    """The activation codes of the last input one of a group of layers quantized."""

    def __init__(self, size: int):
        self.size = size
        self._x = None
        self._version = -1
        self._codes = None
        self._scales = None
        self._taken = set()

    def codes_for(self, layer: nn.Module, x: torch.Tensor):
        """(codes [T, K] int8, scales [T] float32) of x under `layer`'s input transform."""
        key = id(layer)
        if self._x is x and self._version == x._version and key not in self._taken:
            self._taken.add(key)
            codes, scales = self._codes, self._scales
            if len(self._taken) == self.size:  # everyone had them: let the tensors go
                self._x = self._codes = self._scales = None
            return codes, scales
        abits = layer._op_args[1]
        codes, scales = torch.ops.duquant.quantize_input(
            x.reshape(-1, layer.in_features), layer.perm, layer.r_in, None, abits)
        self._x, self._version, self._codes, self._scales = x, x._version, codes, scales
        self._taken = {key}
        return codes, scales

    def forget(self) -> None:
        self._x = self._codes = self._scales = None
        self._taken = set()


def can_share(layer: nn.Module) -> bool:
    """Whether `layer`'s activation quantization depends on nothing but its input transform."""
    cfg = layer.config
    return int(cfg.abits) > 0 and layer._op_args[2] == "dynamic" and layer.r_in is not None


def _same_transform(a: nn.Module, b: nn.Module) -> bool:
    if (a.in_features != b.in_features or a._op_args[1] != b._op_args[1] or a.r_in.shape != b.r_in.shape
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
            share = SharedInput(len(members))
            for _, m in members:
                m._input_share = share
            groups.append([f"{parent_name}.{n}" if parent_name else n for n, _ in members])
    return groups


__all__ = ["SharedInput", "link_shared_inputs", "can_share"]
