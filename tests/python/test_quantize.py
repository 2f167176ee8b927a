import copy
import io
import math

import pytest
import torch
from torch import nn

import duquant_ext as dq
import emulation as em
from models import TinyLM, add_weight_outliers, outlier_acts


def rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def make_model(**kw):
    return add_weight_outliers(TinyLM(**kw)).eval()


def test_quantize_swaps_default_layers_and_reports_sizes():
    model = make_model()
    report = dq.quantize_(model, dq.Config())
    swapped = {n for n, m in model.named_modules() if isinstance(m, dq.DuQuantLinear)}
    expected = {f"layers.{i}.{p}" for i in range(2) for p in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    assert swapped == expected
    assert set(report.names) == expected
    assert isinstance(model.lm_head, nn.Linear)  # not in the default include list
    assert 0 < report.bytes_after < report.bytes_before
    assert "swapped 14 layer(s)" in str(report)
    # No float copy of the weight anywhere in a swapped layer.
    q = model.layers[0].self_attn.q_proj
    assert list(q.parameters()) == []
    assert q.qweight.dtype == torch.uint8


def test_memory_shrinks_on_realistic_widths():
    model = TinyLM(layers=1, d=512, kv=128, h=1024)
    report = dq.quantize_(model, dq.Config())
    # float32 weights -> int4 codes (1/8) + scales + 16x16 rotations (16 floats per channel).
    assert report.bytes_after < 0.2 * report.bytes_before


def test_include_exclude_patterns():
    model = make_model()
    report = dq.quantize_(model, dq.Config(), include=r"mlp\.", exclude=r"down_proj")
    assert sorted(report.names) == sorted(f"layers.{i}.mlp.{p}" for i in range(2) for p in ("gate_proj", "up_proj"))
    everything = dq.select_linear_layers(make_model(), include=None, exclude=None)
    assert len(everything) == 15  # 14 + lm_head
    with pytest.raises(ValueError, match="invalid regular expression"):
        dq.quantize_(make_model(), dq.Config(), include="(")


def test_default_exclude_matches_whole_segments():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.ModuleDict({"q_proj": nn.Linear(16, 16)})
            self.normal = nn.ModuleDict({"q_proj": nn.Linear(16, 16)})
    names = [n for n, _ in dq.select_linear_layers(M())]
    assert names == ["normal.q_proj"]


@pytest.mark.parametrize("cfg", [
    dict(),
    dict(wbits=3, block_size=8, block_out=4),
    dict(wbits=8, abits=0),
    dict(permute=False, row_rot="none"),
    dict(wbits=2, block_size=32),
])
def test_matches_float64_emulation_of_the_design(cfg):
    torch.manual_seed(1)
    n, k = 40, 53  # odd sizes: short blocks on both sides
    lin = nn.Linear(k, n)
    with torch.no_grad():
        lin.weight[:, :4] *= 15.0
    config = dq.Config(**cfg)
    layer = dq.DuQuantLinear.from_linear(lin, config)
    x = outlier_acts(17, k)
    pk = em.pack(lin.weight.detach(), lin.bias.detach(), wbits=config.wbits, block=config.block_size,
                 block_out=config.effective_block_out, permute=config.permute, row_rot=config.row_rot)
    ref = em.forward(x, pk, abits=config.abits)
    assert rel(layer(x), ref) < 1e-4
    # The stored rotations are the emulation's (the SVD's U with canonical signs).
    assert torch.allclose(layer.r_in.double(), torch.stack(pk["r_in"]), atol=1e-5)


def test_static_channel_matches_emulation_with_calibrated_scales():
    torch.manual_seed(2)
    lin = nn.Linear(64, 24)
    config = dq.Config(act="static_channel", calib_steps=4)
    layer = dq.DuQuantLinear.from_linear(lin, config)
    pk = em.pack(lin.weight.detach(), lin.bias.detach())
    batches = [outlier_acts(9, 64) * (1 + i) for i in range(4)]
    scales = []
    for i, b in enumerate(batches):
        assert not layer.calibrated
        y = layer(b)
        assert rel(y, em.forward(b, pk, abits=0)) < 1e-5  # unquantized activations while calibrating
        xt = em.transform(b, pk).abs()
        scales.append((torch.quantile(xt, 0.999, dim=0).clamp_min(1e-6) / 127).clamp_min(1e-6))
    assert layer.calibrated and layer.calib_batches == 4
    expected = torch.stack(scales).amax(0)
    assert torch.allclose(layer.act_scale.double(), expected, rtol=1e-5)
    x = outlier_acts(11, 64)
    assert rel(layer(x), em.forward(x, pk, abits=8, act_scale=expected)) < 1e-4


def test_restore_is_exact_without_quantization():
    model = make_model()
    x = torch.randn(3, 5, 48)
    ref = model(x)
    dq.quantize_(model, dq.Config(wbits=16, abits=16), include=None)
    assert rel(model(x), ref) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_input_dtypes(dtype):
    lin = nn.Linear(40, 24)
    layer = dq.DuQuantLinear.from_linear(lin, dq.Config())
    x = torch.randn(2, 7, 40)
    y = layer(x.to(dtype))
    assert y.dtype == dtype and y.shape == (2, 7, 24)
    tol = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    assert rel(y, layer(x)) < tol + 0.02 * (dtype != torch.float32)


def test_state_dict_round_trip_into_fresh_model():
    model = make_model()
    cfg = dq.Config(act="static", calib_steps=2)
    dq.quantize_(model, cfg)
    x = torch.randn(2, 6, 48)
    model(x)
    model(x * 2)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)

    fresh = make_model()  # different random weights
    dq.quantize_(fresh, cfg)
    fresh.load_state_dict(torch.load(buf))
    assert fresh.layers[1].mlp.down_proj.calibrated
    assert torch.equal(fresh(x), model(x))


def test_buffers_are_the_pack_fields():
    """DuQuantLinear's buffers are the library's list of a layer's tensors (the pack's fields), so a
    state_dict and a pack file name the same tensors."""
    assert dq._C.LAYER_TENSOR_NAMES == ("qweight", "w_scale", "perm", "r_in", "r_out", "bias", "act_scale",
                                        "calib_state")
    layer = dq.DuQuantLinear.from_linear(torch.nn.Linear(64, 32), dq.Config(act="static"))
    assert tuple(name for name, _ in layer.named_buffers()) == dq._C.LAYER_TENSOR_NAMES
    pack_tensors = set(dq._C.empty_layer_pack(64, 32, True, dq.Config(act="static"), None).tensors())
    assert {name for name, b in layer.named_buffers() if b is not None} == pack_tensors


def test_empty_layer_loads_state_dict_and_rejects_mismatches():
    lin = nn.Linear(32, 16)
    src = dq.DuQuantLinear.from_linear(lin, dq.Config())
    empty = dq.DuQuantLinear(32, 16, dq.Config())
    empty.load_state_dict(src.state_dict())
    x = torch.randn(3, 32)
    assert torch.equal(empty(x), src(x))
    wrong = dq.DuQuantLinear(32, 16, dq.Config(block_size=8))
    with pytest.raises(RuntimeError, match="r_in"):
        wrong.load_state_dict(src.state_dict())


def test_to_half_keeps_float32_buffers_and_repr():
    model = make_model()
    dq.quantize_(model, dq.Config())
    model.half()
    q = model.layers[0].mlp.up_proj
    assert q.r_in.dtype == torch.float32 and q.w_scale.dtype == torch.float32
    assert q.qweight.dtype == torch.uint8
    text = repr(q)
    assert "DuQuantLinear(in_features=48, out_features=80" in text
    assert "W4A8 dynamic" in text and "path=reference" in text


def test_deepcopy_and_pickle_config():
    import pickle
    cfg = dq.Config(wbits=3, act="static", abits=6)
    assert pickle.loads(pickle.dumps(cfg)) == cfg
    assert dq.Config.from_json(cfg.to_json()) == cfg
    assert cfg.replace(wbits=8).wbits == 8
    model = make_model()
    dq.quantize_(model, cfg)
    twin = copy.deepcopy(model)
    assert isinstance(twin.layers[0].self_attn.q_proj, dq.DuQuantLinear)


def test_calibration_counts_every_batch_then_quantizes():
    model = make_model()
    dq.quantize_(model, dq.Config(act="static", calib_steps=3))
    layer = model.layers[0].self_attn.q_proj
    for i in range(3):
        assert not layer.calibrated
        model(torch.randn(2, 4, 48))
    assert layer.calibrated and layer.calib_batches == 3
    assert "calibrated=true" in repr(layer)


def test_finish_calibration_early_and_errors():
    model = make_model()
    dq.quantize_(model, dq.Config(act="static_channel"))
    layer = model.layers[0].mlp.down_proj
    with pytest.raises(ValueError, match="no batch has been observed"):
        layer.finish_calibration()
    model(torch.randn(1, 3, 48))
    assert dq.finish_calibration(model) == 14
    assert layer.calibrated and layer.calib_batches == 1


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="wbits=9"):
        dq.Config(wbits=9)
    with pytest.raises(ValueError, match="propagate is refused"):
        dq.Config(row_rot="propagate")
    with pytest.raises(TypeError, match="unknown option 'wbit'"):
        dq.Config(wbit=4)
    with pytest.raises(ValueError, match="act=static"):
        dq.Config(abits=0, act="static")
    with pytest.raises(ValueError, match="unknown option 'bogus'"):
        dq.Config.from_json('{"bogus": 1}')


def test_bad_weights_and_inputs_are_named_and_lose_nothing():
    model = make_model()
    with torch.no_grad():
        model.layers[1].mlp.up_proj.weight[2, 3] = math.nan
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"layers\.1\.mlp\.up_proj: weight contains NaN/Inf \(first at row 2, column 3\)"):
        dq.quantize_(model, dq.Config())
    # Nothing was swapped: the error came before any change.
    assert not any(isinstance(m, dq.DuQuantLinear) for m in model.modules())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) | torch.isnan(before[k]).any() for k in before)

    layer = dq.DuQuantLinear.from_linear(nn.Linear(32, 8), dq.Config())
    with pytest.raises(ValueError, match="in_features=32"):
        layer(torch.randn(4, 31))
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        layer(torch.ones(4, 32, dtype=torch.int64))
    with pytest.raises(ValueError, match="2-D"):
        dq.pack_linear(torch.randn(4, 4, 4))
    with pytest.raises(TypeError, match="expected nn.Linear"):
        dq.DuQuantLinear.from_linear(nn.Conv1d(3, 3, 1), dq.Config())
