"""_C.pack_linears and quantize_: packing all layers in one grouped call gives the per-layer result."""
import copy
import math

import pytest
import torch

import duquant_ext as dq
from duquant_ext import _C
from models import TinyLM, add_weight_outliers

BUFFERS = ("qweight", "w_scale", "perm", "r_in", "r_out", "bias", "act_scale", "calib_state")


def assert_same_buffers(got, want, name):
    for key in BUFFERS:
        a, b = getattr(got, key), getattr(want, key)
        assert (a is None) == (b is None), f"{name}.{key}"
        if b is not None:
            assert a.dtype == b.dtype and a.shape == b.shape, f"{name}.{key}"
            assert torch.equal(a, b), f"{name}.{key} differs"


@pytest.mark.parametrize("cfg", [dq.Config(), dq.Config(wbits=8, row_rot="none", block_size=8),
                                 dq.Config(wbits=3, act="static", permute=False)])
def test_quantize_equals_per_layer_pack_linear(cfg):
    # Three blocks: every projection shape occurs three times, so the grouped path stacks them.
    model = add_weight_outliers(TinyLM(layers=3, d=48, kv=16, h=80)).eval()
    reference = copy.deepcopy(model)
    report = dq.quantize_(model, cfg, share_inputs=False)  # siblings packed alone: test_shared_input.py
    assert len(report) == 21
    x = torch.randn(5, 48)
    per_layer = copy.deepcopy(reference)
    for name in report.names:
        alone = dq.DuQuantLinear.from_linear(reference.get_submodule(name), cfg, name=name)
        assert_same_buffers(model.get_submodule(name), alone, name)
        parent, _, child = name.rpartition(".")
        setattr(per_layer.get_submodule(parent), child, alone)
    # And so the model computes what the per-layer path computes.
    assert torch.equal(model(x), per_layer(x))


def test_quantize_handles_half_precision_models():
    model = add_weight_outliers(TinyLM(layers=2)).eval().to(torch.bfloat16)
    reference = copy.deepcopy(model)
    report = dq.quantize_(model, dq.Config(), share_inputs=False)
    for name in report.names:
        alone = dq.DuQuantLinear.from_linear(reference.get_submodule(name), dq.Config(), name=name)
        assert_same_buffers(model.get_submodule(name), alone, name)


def test_pack_linears_reports_progress_and_keeps_order():
    cfg, cfg8 = dq.Config(), dq.Config(wbits=8)
    layers = [(f"l{i}", torch.randn(32 if i % 2 else 24, 40), torch.randn(32 if i % 2 else 24) if i == 3 else None,
               cfg8 if i == 4 else cfg) for i in range(6)]
    seen = []
    out = _C.pack_linears(layers, progress=lambda done, total, name: seen.append((done, total, name)))
    assert [name for name, _ in out] == [name for name, *_ in layers]
    assert [d for d, _, _ in seen] == list(range(1, 7)) and all(t == 6 for _, t, _ in seen)
    assert sorted(n for _, _, n in seen) == sorted(name for name, *_ in layers)
    for (name, w, b, c), (_, pack) in zip(layers, out):
        want = dq.pack_linear(w, b, c, name)
        for key, t in want.tensors().items():
            assert torch.equal(pack.tensors()[key], t), f"{name}.{key}"
    # Stacks of one give the same packs.
    single = _C.pack_linears(layers, max_stack_bytes=1, device="cpu")
    for (_, a), (_, b) in zip(out, single):
        for key, t in a.tensors().items():
            assert torch.equal(b.tensors()[key], t)


def test_pack_linears_errors_name_the_layer():
    w = torch.randn(16, 32)
    bad = w.clone()
    bad[1, 2] = math.nan
    with pytest.raises(ValueError, match=r"second: weight contains NaN/Inf \(first at row 1, column 2\)"):
        _C.pack_linears([("first", w, None, dq.Config()), ("second", bad, None, dq.Config())])
    with pytest.raises(ValueError, match="'first' appears twice"):
        _C.pack_linears([("first", w, None, dq.Config()), ("first", w, None, dq.Config())])
    with pytest.raises(ValueError, match=r"layers\[0\] must be \(name, weight, bias or None, Config\[, input group\]\)"):
        _C.pack_linears([("first", w)])
    with pytest.raises(ValueError, match="x: bias must have shape \\[16\\]"):
        _C.pack_linears([("x", w, torch.randn(3), dq.Config())])


def test_progress_exceptions_propagate():
    def boom(done, total, name):
        raise KeyboardInterrupt("stop")
    with pytest.raises(KeyboardInterrupt):
        _C.pack_linears([("a", torch.randn(16, 16), None, dq.Config())], progress=boom)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: grouped GPU packing needs one")
def test_grouped_gpu_packing_tracks_per_layer_gpu_packing():
    # On CUDA, batched reductions may round differently from a stack of one, so packs agree to
    # rounding rather than bit for bit: a code may flip at a rounding boundary.
    torch.manual_seed(0)
    cfg = dq.Config()
    layers = [(f"l{i}", (torch.randn(256, 320) * (1 + 9 * (torch.rand(320) < 0.05))).cuda(), None, cfg)
              for i in range(5)]
    grouped = _C.pack_linears(layers)
    from_host = _C.pack_linears([(n, w.cpu(), b, c) for n, w, b, c in layers], device="cuda")
    x = torch.randn(9, 320, device="cuda")
    for (name, w, _, _), (_, g), (_, h) in zip(layers, grouped, from_host):
        alone = dq.pack_linear(w, None, cfg, name)
        assert g.qweight.is_cuda and h.qweight.is_cuda
        for pack in (g, h):
            assert torch.equal(pack.perm, alone.perm), name
            same = (pack.qweight == alone.qweight).float().mean().item()
            assert same >= 0.999, f"{name}: only {same:.5f} of weight bytes equal"
            assert torch.allclose(pack.w_scale, alone.w_scale, rtol=1e-6, atol=0), name
            y, y_alone = (dq.DuQuantLinear.from_pack(p)(x) for p in (pack, alone))
            assert ((y - y_alone).norm() / y_alone.norm()).item() < 1e-3, name
