"""DuQuantLinear: the nn.Module that replaces nn.Linear.

A thin Python shell over the compiled core: every tensor the forward needs is a registered buffer
(so state_dict, .to(), .cuda() work as for any module) and the math runs in the library's
dispatcher ops ``torch.ops.duquant.linear`` / ``torch.ops.duquant.observe_activations``.
"""
import torch
from torch import nn

from . import _C
from .shared_input import _compiling

_BUFFERS = tuple(_C.LAYER_TENSOR_NAMES)  # the library's one list (kLayerTensorFields, layer_pack.h)
# Buffers whose dtype is part of the format: .half()/.to(dtype) must not convert them.
_FLOAT32_BUFFERS = ("qweight", "w_scale", "r_in", "r_out", "bias", "act_scale")
_INPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class DuQuantLinear(nn.Module):
    """A DuQuant-quantized linear layer: ``y = x W^T + b`` with the weight stored as int codes.

    Build it with :meth:`from_linear` (packs now) or :meth:`from_pack`; the plain constructor
    makes an empty layer of the right shapes for ``load_state_dict`` to fill.
    """

    _input_share = None  # a SharedInput when siblings share this input transform (shared_input.py)
    _fast = None  # whether the fast path runs this layer (None: not looked up since the buffers changed)

    def __init__(self, in_features: int, out_features: int, config: _C.Config, bias: bool = True,
                 device=None):
        super().__init__()
        pack = _C.empty_layer_pack(in_features, out_features, bias, config, device)
        self._set_pack(pack)

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_pack(cls, pack: _C.LayerPack) -> "DuQuantLinear":
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._set_pack(pack)
        return self

    @classmethod
    def from_linear(cls, linear: nn.Linear, config: _C.Config, name: str = "weight") -> "DuQuantLinear":
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"{name}: expected nn.Linear, got {type(linear).__name__}")
        with torch.no_grad():
            pack = _C.pack_linear(linear.weight.detach(), None if linear.bias is None else linear.bias.detach(),
                                  config, name)
        return cls.from_pack(pack)

    @property
    def config(self) -> _C.Config:
        return self._config

    @config.setter
    def config(self, config: _C.Config) -> None:
        self._config = config
        # Plain Python values for forward: torch.compile traces these, not a pybind11 object.
        self._op_args = (int(config.wbits), int(config.abits), str(config.act))

    def _set_pack(self, pack: _C.LayerPack) -> None:
        self.config = pack.config
        self.in_features = pack.in_features
        self.out_features = pack.out_features
        for name in _BUFFERS:
            self.register_buffer(name, getattr(pack, name))
        self._known_calibrated = not self.config.needs_calibration
        self._leave_input_share()

    # ---- calibration (static act modes) --------------------------------------------------------
    @property
    def calibrated(self) -> bool:
        if not self._known_calibrated:
            self._known_calibrated = bool(self.calib_state[1].item())
        return self._known_calibrated

    @property
    def calib_batches(self) -> int:
        return 0 if self.calib_state is None else int(self.calib_state[0].item())

    def finish_calibration(self) -> None:
        """Use the calibration batches seen so far (at least one) and start quantizing."""
        if self.config.needs_calibration:
            _C.finish_calibration(self.calib_state, "DuQuantLinear")
            self._known_calibrated = True

    def reset_calibration(self) -> None:
        if self.config.needs_calibration:
            with torch.no_grad():
                self.act_scale.zero_()
                self.calib_state.zero_()
            self._known_calibrated = False

    # ---- forward ------------------------------------------------------------------------------
    def _runs_fast(self) -> bool:
        """execution_path == "cuda", remembered until the buffers move or change."""
        if self._fast is None:
            self._fast = self.execution_path == "cuda"
        return self._fast

    @property
    def execution_path(self) -> str:
        """``"cuda"`` when forward runs the fast kernels for inputs on this layer's device, else
        ``"reference (<why>)"``."""
        why = _C.fast_path_blocker(self.in_features, self.out_features, self.config,
                                   {n: getattr(self, n) for n in ("qweight", "r_in", "r_out")})
        return "cuda" if not why else f"reference ({why})"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        quantize_acts = True
        if not self._known_calibrated and not self.calibrated:
            torch.ops.duquant.observe_activations(
                x.detach(), self.perm, self.r_in, self.act_scale, self.calib_state, self.config.abits,
                self.config.act, self.config.act_pct, self.config.calib_steps)
            quantize_acts = False  # this batch was a calibration batch
        wbits, abits, act = self._op_args
        share = self._input_share
        if (share is not None and not _compiling() and quantize_acts and x.is_cuda and x.dtype in _INPUT_DTYPES
                and x.dim() >= 1 and x.shape[-1] == self.in_features and self._runs_fast()):
            # Siblings with this input transform (q/k/v, gate/up) quantize a common input once.
            y = share.forward(self, x)
            if y is not None:
                return y
        return torch.ops.duquant.linear(
            x, self.qweight, self.w_scale, self.perm, self.r_in, self.r_out, self.bias, self.act_scale,
            self.in_features, wbits, abits, act, quantize_acts)

    # ---- nn.Module plumbing -------------------------------------------------------------------
    def _apply(self, fn, *args, **kwargs):
        # .half()/.to(torch.bfloat16) on a model must move our buffers but keep their formats:
        # scales and rotations are float32 by contract.
        super()._apply(fn, *args, **kwargs)
        for name in _FLOAT32_BUFFERS:
            t = getattr(self, name)
            if t is not None and t.is_floating_point() and t.dtype != torch.float32:
                setattr(self, name, t.float())
        self._fast = None
        if self._input_share is not None:
            self._input_share.forget()  # outputs made on the old device
        return self

    def _leave_input_share(self) -> None:
        """Quantizes alone from now on (link_shared_inputs links again where transforms match)."""
        if self._input_share is not None:
            self._input_share.remove(self)
        self._input_share = None
        self._fast = None

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        tensors = {n: state_dict.get(prefix + n) for n in _BUFFERS if getattr(self, n) is not None}
        if all(t is not None for t in tensors.values()):
            try:
                _C.validate_tensors(self.in_features, self.out_features, self.config, tensors,
                                    prefix.rstrip(".") or "DuQuantLinear")
            except ValueError as e:
                error_msgs.append(str(e))
                return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        self._known_calibrated = not self.config.needs_calibration
        # The loaded transform may differ from the siblings': quantize alone (link_shared_inputs relinks).
        self._leave_input_share()

    def extra_repr(self) -> str:
        s = (f"in_features={self.in_features}, out_features={self.out_features}, "
             f"bias={self.bias is not None}, {self.config.describe()}, path={self.execution_path}")
        if self.config.needs_calibration:
            s += ", calibrated=" + ("true" if self._known_calibrated else "pending")
        if self._input_share is not None:
            s += f", input transform shared by {self._input_share.size} sibling layers"
        return s

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.buffers(recurse=False))


def layer_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(module.parameters(recurse=False)) +
               list(module.buffers(recurse=False)))


__all__ = ["DuQuantLinear", "layer_bytes"]
