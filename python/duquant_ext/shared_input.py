"""Sibling layers that quantize their common input once.

q_proj, k_proj and v_proj of an attention block (gate_proj and up_proj of an MLP) read the same
activations. Packed as one input group (``quantize_(..., share_inputs=True)``, the default), they
get one input transform, computed from their weights stacked by rows, so the same ``x`` gives
all of them the same int8 activation codes. On the CUDA fast path the first of them to see an
input runs the input kernel once and all of their GEMMs, as one grouped launch where the plan
allows (small and medium M); the others return the outputs made for them. Per attention block
q/k/v take two launches instead of six, gate/up two instead of four.

Reuse is keyed on the input tensor itself (the same object, unchanged since: its version counter),
the stream and the CUDA-graph capture state, and on each layer's buffers (the same, unchanged);
each output is taken at most once. So a model that calls the layers in any order, or one of them
twice, still gets exactly its own answer: bit-identical to each layer run alone. Two limits:
inference tensors (``torch.inference_mode``) have no version counter, so an input changed in place
between two siblings' calls there is not noticed; and writes that bypass autograd's bookkeeping
(``x.data``, foreign kernels) are not seen either. Under ``torch.compile`` the layers run unshared
(the compiled graph sees each layer's whole op).
"""
import threading
from typing import List

import torch
from torch import nn


def _find_is_compiling():
    compiler = getattr(torch, "compiler", None)
    is_compiling = getattr(compiler, "is_compiling", None)
    if is_compiling is None:  # torch 2.1-2.2 have torch.compiler without it
        is_compiling = getattr(getattr(torch, "_dynamo", None), "is_compiling", None)
    return is_compiling


_IS_COMPILING = _find_is_compiling()  # looked up once: forward asks on every call


def _compiling() -> bool:
    return bool(_IS_COMPILING()) if _IS_COMPILING is not None else False


# The current stream and capture state as the C++ bindings give them (a plain value per stream):
# torch.cuda.current_stream() builds a Stream object on every member's call, a fifth of the sharing's
# Python time in an eager profile of the action expert. The public calls where a torch lacks them.
_CURRENT_STREAM = getattr(torch._C, "_cuda_getCurrentStream", None)
_CAPTURING = getattr(torch._C, "_cuda_isCurrentStreamCapturing", None)


def _version(x: torch.Tensor) -> int:
    # Inference tensors (torch.inference_mode) have no version counter: then only the tensor
    # object itself keys the reuse (see the module docstring).
    return -1 if x.is_inference() else x._version


class SharedInput:
    """A group of sibling layers with one input transform.

    Grouped mode (the start): the first member to see an input quantizes it once and runs every
    member's GEMM (one grouped launch where the kernels allow); the others take their outputs, each
    at most once. Where members turn out to read different inputs (cross-attention: q the decoder's
    states, k/v the encoder's), outputs made for a member that never took them would be wasted
    work: on the first such miss the group switches for good to codes mode, where the first member
    to see an input quantizes it and runs its own GEMM, and the others reuse the codes."""

    def __init__(self, members):
        self.members = list(members)
        self.grouped = True
        self._lock = threading.Lock()  # one caller at a time: the check and the take are one step
        self.forget()

    @property
    def size(self) -> int:
        return len(self.members)

    def forget(self) -> None:
        """Drops everything made for the last input (done when the members move or reload)."""
        self._x = None
        self._key = None
        self._outputs = {}  # id(member) -> its output for _x, not yet taken (grouped mode)
        self._codes = None  # (codes, scales) of _x, and the members that used them (codes mode)
        self._used = set()
        self._operands = {}  # id(member) -> its buffers when the outputs were made, and their versions

    def remove(self, layer: nn.Module) -> None:
        with self._lock:
            self.members = [m for m in self.members if m is not layer]
            self.forget()

    @staticmethod
    def _buffers(layer):
        # From the module's buffer table (nn.Module.__getattr__ per name cost more than the rest).
        b = layer._buffers
        return (b.get("qweight"), b.get("w_scale"), b.get("r_out"), b.get("bias"))

    @staticmethod
    def _stamp(layer):
        """The buffers a member's output was made from and their versions. Strong references:
        they are the member's own buffers, and forget() drops them once every output is taken."""
        bufs = SharedInput._buffers(layer)
        return bufs, tuple(None if t is None else _version(t) for t in bufs)

    def _unchanged(self, layer) -> bool:
        then = self._operands.get(id(layer))
        if then is None:
            return False
        bufs, versions = then
        now = self._buffers(layer)
        return all(a is b for a, b in zip(now, bufs)) and versions == tuple(
            None if t is None else _version(t) for t in now)

    @staticmethod
    def _context(x: torch.Tensor):
        # Outputs and codes are only handed out on the stream, and in the capture state, that made them.
        if _CURRENT_STREAM is None or _CAPTURING is None:
            return (_version(x), torch.cuda.current_stream(x.device), torch.cuda.is_current_stream_capturing())
        return (_version(x), _CURRENT_STREAM(x.get_device()), _CAPTURING())

    def forward(self, layer: nn.Module, x: torch.Tensor):
        """`layer`'s output for x, or None when layer is not a member (a DataParallel replica,
        say): the caller then runs the layer alone."""
        with self._lock:
            if not any(m is layer for m in self.members):
                return None
            key, context = id(layer), self._context(x)
            same = self._x is x and self._key == context
            if self.grouped:
                if same and key in self._outputs and self._unchanged(layer):
                    out = self._outputs.pop(key)
                    if not self._outputs:  # everyone had theirs: let the tensors go
                        self.forget()
                    return out
                if self._outputs:  # outputs nobody took: members read different inputs
                    self.grouped = False
                    self.forget()
                else:
                    return self._run_group(layer, x, context)
            if not (same and self._codes is not None and key not in self._used):
                self._codes = self._quantize(layer, x)
                self._x, self._key, self._used = x, context, set()
            self._used.add(key)
            codes, scales = self._codes
            wbits, abits, _ = layer._op_args
            return torch.ops.duquant.linear_codes_group(
                codes, scales, x, [layer.qweight], [layer.w_scale], layer.r_in, [layer.r_out], [layer.bias],
                layer.in_features, wbits, abits)[0]

    @staticmethod
    def _quantize(layer, x):
        return torch.ops.duquant.quantize_input(
            x.reshape(-1, layer.in_features), layer.perm, layer.r_in, None, layer._op_args[1])

    def _run_group(self, layer, x, context):
        codes, scales = self._quantize(layer, x)
        wbits, abits, _ = layer._op_args
        members = self.members
        outs = torch.ops.duquant.linear_codes_group(
            codes, scales, x, [m.qweight for m in members], [m.w_scale for m in members], layer.r_in,
            [m.r_out for m in members], [m.bias for m in members], layer.in_features, wbits, abits)
        self.forget()
        self._x, self._key = x, context
        self._outputs = {id(m): o for m, o in zip(members, outs) if m is not layer}
        self._operands = {id(m): self._stamp(m) for m in members if m is not layer}
        if not self._outputs:
            self.forget()
        return next(o for m, o in zip(members, outs) if m is layer)

    # A module holding a SharedInput may be deep-copied or pickled (with its siblings): the lock,
    # weak references and cached tensors are per process and per input, so they are not carried.
    def __getstate__(self):
        return {"members": self.members, "grouped": self.grouped}

    def __setstate__(self, state):
        self.members = state["members"]
        self.grouped = state["grouped"]
        self._lock = threading.Lock()
        self.forget()


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
    """Links sibling DuQuantLinear layers (children of one module in one of ``_C.sibling_sets()``,
    as duquant-pack and quantize_ group them) whose input transforms are equal and whose activation
    scales are dynamic, so they quantize a common input once; unlinks every other DuQuantLinear.
    quantize_ and load_pack call it; call it again after changing layers' transforms by hand.
    Returns the linked groups' qualified names."""
    from . import _C
    from .nn import DuQuantLinear

    groups = []
    for parent_name, parent in model.named_modules():
        children = [(n, m) for n, m in parent.named_children() if isinstance(m, DuQuantLinear)]
        for _, m in children:
            m._leave_input_share()
        sets = {}
        for n, m in children:
            s = _C.sibling_set_of(parent_name, n)
            if s >= 0 and can_share(m):
                sets.setdefault(s, []).append((n, m))
        for candidates in sets.values():
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
