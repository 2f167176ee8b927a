"""Settings from environment variables: ``DUQUANT_*`` and the prototype's ``OPENPI_DUQUANT_*``.

Every variable exists under both prefixes; when both are set, ``DUQUANT_<X>`` wins over
``OPENPI_DUQUANT_<X>``.

Config (``dq.Config.from_env()``):

=============== =========================== =====================================================
suffix          Config field                values
=============== =========================== =====================================================
WBITS_DEFAULT   wbits                       2..8, or 0/16 (unquantized weights)
ABITS           abits                       2..8, or 0/16 (weight-only)
BLOCK           block_size                  1..1024
BLOCK_OUT       block_out                   1..1024, or 0 (= BLOCK)
LS              ls                          0..1
PERMUTE         permute                     1/0, true/false, yes/no, on/off
ACT             act                         dynamic | static | static_channel (not in the prototype)
ACT_PCT         act_pct                     (0, 100]
CALIB_STEPS     calib_steps                 >= 1
ROW_ROT         row_rot                     restore | none ("0" = none, the prototype's spelling)
=============== =========================== =====================================================

Selection (``dq.settings_from_env()``, used by ``dq.enable_from_env(model)``):

=============== =====================================================================================
ENABLE          1/0: switch on or off explicitly (not in the prototype; see enable_from_env)
PACKDIR         directory of pack files: reused when they match the model, written when they do not
SCOPE           only layers whose qualified name starts with this prefix (default: whole model)
LAYERS          comma-separated exact layer names; replaces INCLUDE/EXCLUDE
INCLUDE         regex searched in the layer name (default: the q/k/v/o/out_proj, fc1/fc2,
                gate/up/down_proj segments); empty = every nn.Linear
EXCLUDE         regex (default: norm/ln/layernorm/emb segments); empty = exclude nothing
WBITS           per-layer weight bits, "name:bits,name:bits"
DRYRUN          1: only list the layers that would be quantized
INCLUDE_ACTION_HEAD  1: allow layers named ``action_out_proj`` (skipped by default, as in the prototype)
=============== =====================================================================================

Deliberate differences from the prototype's env switch (each was a bug or a trap there):

- Only the variables above switch quantization on. The prototype switched on for *any*
  ``OPENPI_DUQUANT_*`` variable but PACKDIR, so ``OPENPI_DUQUANT_DEBUG=0`` or ``DRYRUN=0`` quantized
  the model. Here ``DRYRUN=0`` alone does not, and ``DUQUANT_ENABLE=0`` turns everything off.
- SCOPE defaults to the whole model; the prototype's default, ``policy.dit.``, is a path of one model
  and silently matched nothing in others.
- An empty EXCLUDE excludes nothing (the prototype's empty regex matched every name, so it excluded
  every layer); an empty INCLUDE includes every nn.Linear.
- Bad values raise, naming the variable and the allowed values (the prototype crashed on a bad
  number, treated "no" as true for PERMUTE and silently dropped malformed WBITS entries).
- WBITS and LAYERS entries must name selected nn.Linear layers; a typo raises instead of being ignored.
- PACKDIR packs are keyed by the layers' weights and configs, so changing the checkpoint or a
  setting never reuses a stale pack (the prototype cached rotations by layer name only, and kept
  using them after BLOCK or the checkpoint changed).
- ROW_ROT=propagate is refused (the prototype's propagate mode produced wrong outputs).
"""
import difflib
import hashlib
import os
import re
import sys
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Tuple

import torch
from torch import nn

from . import _C
from .nn import DuQuantLinear
from .pack import _most_common_config, load_pack
from .quantize import DEFAULT_EXCLUDE, DEFAULT_INCLUDE, _set_submodule, select_linear_layers
from ._report import LayerListReport

PREFIXES = ("DUQUANT_", "OPENPI_DUQUANT_")  # first wins
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")
_BITS_ALLOWED = "2..8, or 0/16"

_CONFIG_VARS = {  # suffix -> Config field
    "WBITS_DEFAULT": "wbits", "ABITS": "abits", "BLOCK": "block_size", "BLOCK_OUT": "block_out",
    "LS": "ls", "PERMUTE": "permute", "ACT": "act", "ACT_PCT": "act_pct", "CALIB_STEPS": "calib_steps",
    "ROW_ROT": "row_rot",
}
_SELECTION_VARS = ("ENABLE", "PACKDIR", "SCOPE", "LAYERS", "INCLUDE", "EXCLUDE", "WBITS", "DRYRUN",
                   "INCLUDE_ACTION_HEAD")
# Variables whose presence alone means "quantize" (the prototype's rule, minus its traps).
_ENABLING = tuple(_CONFIG_VARS) + ("SCOPE", "LAYERS", "INCLUDE", "EXCLUDE", "WBITS")
PACK_FILE_PREFIX = "duquant-"


class EnvError(ValueError):
    """A DUQUANT_* / OPENPI_DUQUANT_* variable has a value that is not allowed."""


@dataclass
class EnvSettings:
    """Everything the environment asks for. `sources` maps each variable suffix that was set
    ("ABITS", "WBITS", ...) to the variable it was read from ("DUQUANT_ABITS" or "OPENPI_DUQUANT_ABITS")."""

    config: _C.Config
    enabled: bool = False
    packdir: Optional[str] = None
    scope: str = ""
    layers: Optional[Tuple[str, ...]] = None
    include: Optional[str] = DEFAULT_INCLUDE
    exclude: Optional[str] = DEFAULT_EXCLUDE
    per_layer_wbits: Dict[str, int] = field(default_factory=dict)
    dry_run: bool = False
    include_action_head: bool = False
    sources: Dict[str, str] = field(default_factory=dict)


def _lookup(environ: Mapping[str, str], suffix: str) -> Optional[Tuple[str, str]]:
    for prefix in PREFIXES:
        if prefix + suffix in environ:
            return prefix + suffix, environ[prefix + suffix]
    return None


def _bad(var: str, value: str, allowed: str) -> EnvError:
    return EnvError(f"{var}={value!r} is not allowed; expected {allowed}")


def _parse_int(var: str, value: str, allowed: str) -> int:
    try:
        return int(value.strip())
    except ValueError:
        raise _bad(var, value, allowed) from None


def _parse_float(var: str, value: str, allowed: str) -> float:
    try:
        return float(value.strip())
    except ValueError:
        raise _bad(var, value, allowed) from None


def _parse_bool(var: str, value: str) -> bool:
    v = value.strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise _bad(var, value, "one of 1/0, true/false, yes/no, on/off")


def _parse_bits(var: str, value: str) -> int:
    bits = _parse_int(var, value, _BITS_ALLOWED)
    if not (bits in (0, 16) or 2 <= bits <= 8):
        raise _bad(var, value, _BITS_ALLOWED)
    return bits


def _parse_config_value(suffix: str, var: str, value: str):
    if suffix in ("WBITS_DEFAULT", "ABITS"):
        return _parse_bits(var, value)
    if suffix == "BLOCK":
        return _parse_int(var, value, "an integer in 1..1024")
    if suffix == "BLOCK_OUT":
        return _parse_int(var, value, "an integer in 1..1024, or 0 for the input block size")
    if suffix == "CALIB_STEPS":
        return _parse_int(var, value, "an integer >= 1")
    if suffix == "LS":
        return _parse_float(var, value, "a number in [0, 1]")
    if suffix == "ACT_PCT":
        return _parse_float(var, value, "a percentile in (0, 100]")
    if suffix == "PERMUTE":
        return _parse_bool(var, value)
    if suffix == "ACT":
        v = value.strip()
        if v not in ("dynamic", "static", "static_channel"):
            raise _bad(var, value, "one of dynamic, static, static_channel")
        return v
    if suffix == "ROW_ROT":
        v = value.strip()
        if v == "0":  # the prototype's spelling of "no output rotation"
            return "none"
        if v not in ("restore", "none", "propagate"):  # propagate: Config explains the refusal
            raise _bad(var, value, "one of restore, none (or 0)")
        return v
    raise AssertionError(suffix)


def _config_from(environ: Mapping[str, str], sources: Dict[str, str]) -> _C.Config:
    fields = {}
    for suffix, name in _CONFIG_VARS.items():
        found = _lookup(environ, suffix)
        if found is None:
            continue
        var, value = found
        fields[name] = _parse_config_value(suffix, var, value)
        try:
            _C.Config(**{name: fields[name]})  # range check of this field alone, to name its variable
        except ValueError as e:
            raise EnvError(f"{var}={value!r}: {e}") from None
        sources[suffix] = var
    try:
        return _C.Config(**fields)
    except ValueError as e:  # a combination, e.g. ACT=static with ABITS=0
        used = ", ".join(f"{v}={environ[v]!r}" for k, v in sources.items() if k in _CONFIG_VARS)
        raise EnvError(f"{e} (from {used})") from None


def _warn_unknown(environ: Mapping[str, str]) -> None:
    # Other DUQUANT_* variables exist (build and test knobs), so only near-misses of a setting's
    # name are reported: those are typos that would otherwise be silently ignored.
    known = list(_CONFIG_VARS) + list(_SELECTION_VARS)
    for key in environ:
        for prefix in PREFIXES:
            suffix = key[len(prefix):] if key.startswith(prefix) else None
            if suffix is None or suffix in known:
                continue
            close = difflib.get_close_matches(suffix, known, n=1, cutoff=0.8)
            if close:
                warnings.warn(f"{key} is not a duquant setting and is ignored; did you mean {prefix}{close[0]}?",
                              stacklevel=3)
            break


def config_from_env(environ: Optional[Mapping[str, str]] = None) -> _C.Config:
    """The Config part of the environment (see the module docstring); defaults for unset variables."""
    return _config_from(os.environ if environ is None else environ, {})


def _regex(var: str, value: str) -> Optional[str]:
    if value == "":
        return None
    try:
        re.compile(value)
    except re.error as e:
        raise EnvError(f"{var}={value!r} is not a valid regular expression: {e}") from None
    return value


def _per_layer_bits(var: str, value: str) -> Dict[str, int]:
    out: Dict[str, int] = {}
    for entry in (e.strip() for e in value.split(",")):
        if not entry:
            continue
        name, sep, bits = entry.rpartition(":")
        name = name.strip()
        if not sep or not name:
            raise EnvError(f"{var}: entry {entry!r} is not allowed; expected name:bits, e.g. "
                           f"'model.layers.0.mlp.down_proj:8'")
        if name in out:
            raise EnvError(f"{var}: layer {name!r} is given twice")
        out[name] = _parse_bits(f"{var} entry {name!r}", bits)
    return out


def settings_from_env(environ: Optional[Mapping[str, str]] = None) -> EnvSettings:
    """Reads every DUQUANT_* / OPENPI_DUQUANT_* setting (module docstring). Raises EnvError (a
    ValueError) naming the variable and the allowed values for a bad value."""
    environ = os.environ if environ is None else environ
    _warn_unknown(environ)
    sources: Dict[str, str] = {}
    s = EnvSettings(config=_config_from(environ, sources), sources=sources)

    def get(suffix):
        found = _lookup(environ, suffix)
        if found is not None:
            sources[suffix] = found[0]
        return found

    if (f := get("PACKDIR")) and f[1].strip():
        s.packdir = f[1].strip()
    if f := get("SCOPE"):
        s.scope = f[1].strip()
    if f := get("LAYERS"):
        names = tuple(n.strip() for n in f[1].split(",") if n.strip())
        s.layers = names or None
    if f := get("INCLUDE"):
        s.include = _regex(*f)
    if f := get("EXCLUDE"):
        s.exclude = _regex(*f)
    if f := get("WBITS"):
        s.per_layer_wbits = _per_layer_bits(*f)
    if f := get("DRYRUN"):
        s.dry_run = _parse_bool(*f)
    if f := get("INCLUDE_ACTION_HEAD"):
        s.include_action_head = _parse_bool(*f)
    explicit = get("ENABLE")
    if explicit is not None:
        s.enabled = _parse_bool(*explicit)
    else:
        s.enabled = s.dry_run or any(_lookup(environ, k) is not None for k in _ENABLING)
    return s


# ---- enable_from_env ------------------------------------------------------------------------------

@dataclass
class EnvLayer:
    name: str
    in_features: int
    out_features: int
    config: _C.Config


@dataclass
class EnvReport(LayerListReport):
    """What enable_from_env did. action: "dry_run" (listed only), "packed" or "loaded" (from pack_path)."""

    action: str
    settings: EnvSettings
    layers: List[EnvLayer] = field(default_factory=list)
    pack_path: Optional[str] = None
    saved: bool = False  # the pack was written to pack_path

    def __str__(self) -> str:
        verb = {"dry_run": "would quantize", "packed": "packed", "loaded": "loaded"}[self.action]
        head = f"duquant (env): {verb} {len(self.layers)} layer(s)"
        if self.action == "loaded":
            head += f" from {self.pack_path}"
        elif self.saved:
            head += f", saved to {self.pack_path}"
        lines = [head]
        for layer in self.layers:
            lines.append(f"  {layer.name:<40} {layer.in_features:>6} -> {layer.out_features:<6} "
                         f"{layer.config.describe()}")
        return "\n".join(lines)


def _select(model: nn.Module, s: EnvSettings) -> List[Tuple[str, nn.Linear]]:
    if s.layers is not None:
        linears = {n: m for n, m in model.named_modules() if type(m) is nn.Linear and n.startswith(s.scope)}
        for name in s.layers:
            if name not in linears:
                where = f" under scope {s.scope!r}" if s.scope else ""
                raise EnvError(f"{s.sources['LAYERS']}: {name!r} is not an nn.Linear of the "
                               f"model{where}")
        # Named explicitly: the action-head rule does not apply.
        return [(n, linears[n]) for n in s.layers]

    def scope_and_action_head(name: str, module: nn.Module) -> bool:
        if not name.startswith(s.scope):
            return False
        return s.include_action_head or name.rpartition(".")[2] != "action_out_proj"

    return select_linear_layers(model, s.include, s.exclude, filter_fn=scope_and_action_head)


def _hash_tensor(h, t: torch.Tensor) -> None:
    t = t.detach().contiguous().cpu().reshape(-1)
    h.update(f"{t.dtype}:{t.numel()};".encode())
    same_width_int = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    h.update(t.view(same_width_int).numpy().data)


def _source_digest(targets: List[Tuple[str, nn.Linear, _C.Config]]) -> str:
    """sha256 of what a pack is made from: names, shapes, configs and the float weights and biases."""
    h = hashlib.sha256()
    for name, linear, config in targets:
        h.update(f"{name}|{linear.in_features}|{linear.out_features}|{config.to_json()}|".encode())
        _hash_tensor(h, linear.weight)
        if linear.bias is not None:
            _hash_tensor(h, linear.bias)
        h.update(b"\n")
    return h.hexdigest()


_DIGEST_KEY = "duquant_env.source_sha256"


def enable_from_env(model: nn.Module, environ: Optional[Mapping[str, str]] = None,
                    verbose: bool = True) -> Optional[EnvReport]:
    """Quantizes `model` in place as the environment says (module docstring); the replacement for
    the prototype's env switch.

    Returns None and does nothing when no variable enables it. Otherwise selects nn.Linear layers
    (SCOPE prefix, then LAYERS or INCLUDE/EXCLUDE), applies per-layer WBITS, and then:

    - DRYRUN: lists the layers and their settings, changes nothing;
    - PACKDIR with a pack made from these very weights and settings (file
      ``PACKDIR/duquant-<sha256 of names, shapes, configs, weights>.safetensors``): loads it,
      recomputing nothing;
    - otherwise packs every selected layer and, if PACKDIR is set, writes that pack file.

    All layers are packed (or loaded, and checked) and the pack file written before any layer is
    swapped, so an error leaves the model untouched. A pack file that exists but cannot be used
    (damaged, or not from these weights) is rebuilt with a warning. For static activation modes
    the saved pack holds uncalibrated scales; calibration runs again after loading (save a
    calibrated model with dq.save_pack yourself to keep its scales).
    """
    s = settings_from_env(environ)
    if not s.enabled:
        return None
    selected = _select(model, s)
    selected_names = {n for n, _ in selected}
    for name in s.per_layer_wbits:
        if name not in selected_names:
            raise EnvError(f"{s.sources['WBITS']}: layer {name!r} is not among the {len(selected)} selected layers "
                           f"(check SCOPE/LAYERS/INCLUDE/EXCLUDE)")
    targets = [(n, m, s.config.replace(wbits=s.per_layer_wbits[n]) if n in s.per_layer_wbits else s.config)
               for n, m in selected]
    layers = [EnvLayer(n, m.in_features, m.out_features, c) for n, m, c in targets]
    if s.dry_run:
        return _finish(EnvReport("dry_run", s, layers), verbose)
    if not targets:
        warnings.warn("duquant (env): enabled, but no nn.Linear layer matched the selection", stacklevel=2)
        return _finish(EnvReport("packed", s, layers), verbose)

    pack_path, digest = None, None
    if s.packdir is not None:
        digest = _source_digest(targets)
        pack_path = os.path.join(s.packdir, f"{PACK_FILE_PREFIX}{digest[:20]}.safetensors")
        if os.path.exists(pack_path):
            try:
                pack_file = _C.PackFile.open(pack_path)
                if pack_file.metadata.get(_DIGEST_KEY) != digest:
                    raise ValueError("it was not made from these weights and settings")
                load_pack(model, pack_file, config={n: c for n, _, c in targets}, strict=True)
                return _finish(EnvReport("loaded", s, layers, pack_path), verbose)
            except ValueError as e:
                warnings.warn(f"duquant (env): cannot use {pack_path} ({e}); packing again and overwriting it",
                              stacklevel=2)

    # One grouped call, as in quantize_: layers of equal shape and config are packed together.
    with torch.no_grad():
        packs = _C.pack_linears([(n, m.weight.detach(), None if m.bias is None else m.bias.detach(), c)
                                 for n, m, c in targets])
    replacements = [(name, DuQuantLinear.from_pack(pack)) for name, pack in packs]
    saved = False
    if pack_path is not None:
        os.makedirs(s.packdir, exist_ok=True)
        _C.write_pack(pack_path, packs, _most_common_config([p.config for _, p in packs]), None,
                      {_DIGEST_KEY: digest})
        saved = True
    for name, module in replacements:
        _set_submodule(model, name, module)
    return _finish(EnvReport("packed", s, layers, pack_path, saved), verbose)


def _finish(report: EnvReport, verbose: bool) -> EnvReport:
    if verbose:
        print(report, file=sys.stderr)
    return report


__all__ = ["EnvSettings", "EnvReport", "EnvLayer", "EnvError", "settings_from_env", "config_from_env",
           "enable_from_env", "PREFIXES"]
