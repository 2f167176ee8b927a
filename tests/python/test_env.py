"""dq.Config.from_env / dq.settings_from_env / dq.enable_from_env (DUQUANT_* and OPENPI_DUQUANT_*)."""
import copy
import os
import warnings

import pytest
import torch
from torch import nn

import duquant_ext as dq
from models import TinyLM, add_weight_outliers


def float_model(**kw):
    return add_weight_outliers(TinyLM(**kw)).eval()


def quantized_names(model):
    return sorted(n for n, m in model.named_modules() if isinstance(m, dq.DuQuantLinear))


ALL_DEFAULT = sorted(f"layers.{i}.{p}" for i in range(2) for p in (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"))


# ---- parsing ---------------------------------------------------------------------------------------

def test_no_variables_give_the_default_config():
    assert dq.Config.from_env({}) == dq.Config()
    assert dq.config_from_env({}) == dq.Config()
    assert not dq.settings_from_env({}).enabled


def test_prototype_names_set_every_config_field():
    env = {
        "OPENPI_DUQUANT_WBITS_DEFAULT": "8", "OPENPI_DUQUANT_ABITS": "6", "OPENPI_DUQUANT_BLOCK": "32",
        "OPENPI_DUQUANT_BLOCK_OUT": "8", "OPENPI_DUQUANT_LS": "0.25", "OPENPI_DUQUANT_PERMUTE": "0",
        "OPENPI_DUQUANT_ACT_PCT": "99.5", "OPENPI_DUQUANT_CALIB_STEPS": "4", "OPENPI_DUQUANT_ROW_ROT": "0",
        "DUQUANT_ACT": "static_channel",
    }
    c = dq.Config.from_env(env)
    assert (c.wbits, c.abits, c.block_size, c.block_out) == (8, 6, 32, 8)
    assert (c.ls, c.permute, c.act_pct, c.calib_steps) == (0.25, False, 99.5, 4)
    assert (c.row_rot, c.act) == ("none", "static_channel")
    s = dq.settings_from_env(env)
    assert s.config == c and s.enabled
    assert s.sources["ABITS"] == "OPENPI_DUQUANT_ABITS" and s.sources["ACT"] == "DUQUANT_ACT"


def test_duquant_prefix_wins_over_openpi_prefix():
    env = {"OPENPI_DUQUANT_ABITS": "0", "DUQUANT_ABITS": "8", "OPENPI_DUQUANT_SCOPE": "a.", "DUQUANT_SCOPE": "b."}
    s = dq.settings_from_env(env)
    assert s.config.abits == 8 and s.sources["ABITS"] == "DUQUANT_ABITS"
    assert s.scope == "b."


@pytest.mark.parametrize("var,value,message", [
    ("OPENPI_DUQUANT_ABITS", "eight", "OPENPI_DUQUANT_ABITS='eight' is not allowed; expected 2..8, or 0/16"),
    ("DUQUANT_WBITS_DEFAULT", "9", "DUQUANT_WBITS_DEFAULT='9' is not allowed; expected 2..8, or 0/16"),
    ("DUQUANT_BLOCK", "0", "DUQUANT_BLOCK='0': duquant Config: block_size=0 is not allowed; expected 1..1024"),
    ("DUQUANT_BLOCK_OUT", "x", "DUQUANT_BLOCK_OUT='x' is not allowed; expected an integer in 1..1024, or 0"),
    ("DUQUANT_LS", "2", "DUQUANT_LS='2': duquant Config: ls="),
    ("DUQUANT_ACT_PCT", "0", "DUQUANT_ACT_PCT='0': duquant Config: act_pct="),
    ("DUQUANT_CALIB_STEPS", "-1", "DUQUANT_CALIB_STEPS='-1': duquant Config: calib_steps=-1 is not allowed"),
    ("OPENPI_DUQUANT_PERMUTE", "maybe", "OPENPI_DUQUANT_PERMUTE='maybe' is not allowed; expected one of 1/0"),
    ("OPENPI_DUQUANT_ROW_ROT", "1", "OPENPI_DUQUANT_ROW_ROT='1' is not allowed; expected one of restore, none"),
    ("OPENPI_DUQUANT_ROW_ROT", "propagate", "OPENPI_DUQUANT_ROW_ROT='propagate': duquant Config: row_rot=propagate "
                                            "is refused"),
    ("DUQUANT_ACT", "percentile", "DUQUANT_ACT='percentile' is not allowed; expected one of dynamic, static"),
    ("OPENPI_DUQUANT_DRYRUN", "perhaps", "OPENPI_DUQUANT_DRYRUN='perhaps' is not allowed"),
    ("DUQUANT_ENABLE", "2", "DUQUANT_ENABLE='2' is not allowed"),
    ("OPENPI_DUQUANT_INCLUDE", "(", "OPENPI_DUQUANT_INCLUDE='(' is not a valid regular expression"),
    ("OPENPI_DUQUANT_WBITS", "a.q_proj", "OPENPI_DUQUANT_WBITS: entry 'a.q_proj' is not allowed; expected name:bits"),
    ("OPENPI_DUQUANT_WBITS", "a.q_proj:x", "OPENPI_DUQUANT_WBITS entry 'a.q_proj'='x' is not allowed; expected 2..8"),
    ("OPENPI_DUQUANT_WBITS", "a:8,a:4", "OPENPI_DUQUANT_WBITS: layer 'a' is given twice"),
])
def test_bad_values_name_the_variable_and_the_allowed_values(var, value, message):
    with pytest.raises(ValueError) as info:
        dq.settings_from_env({var: value})
    assert message in str(info.value)
    assert isinstance(info.value, dq.EnvError)


def test_bad_combination_names_both_variables():
    with pytest.raises(dq.EnvError, match=r"act=static.*DUQUANT_ABITS='0'.*DUQUANT_ACT='static'"):
        dq.Config.from_env({"DUQUANT_ABITS": "0", "DUQUANT_ACT": "static"})


def test_selection_settings():
    s = dq.settings_from_env({
        "OPENPI_DUQUANT_PACKDIR": "/tmp/packs", "OPENPI_DUQUANT_SCOPE": "model.", "OPENPI_DUQUANT_LAYERS": " a, b ,,",
        "OPENPI_DUQUANT_INCLUDE": "", "OPENPI_DUQUANT_EXCLUDE": "", "OPENPI_DUQUANT_WBITS": "a:8, b:16",
        "OPENPI_DUQUANT_DRYRUN": "1",
    })
    assert s.packdir == "/tmp/packs" and s.scope == "model." and s.layers == ("a", "b")
    assert s.include is None and s.exclude is None  # empty means "everything" / "nothing"
    assert s.per_layer_wbits == {"a": 8, "b": 16} and s.dry_run
    d = dq.settings_from_env({"DUQUANT_ABITS": "8"})
    assert d.include == dq.DEFAULT_INCLUDE and d.exclude == dq.DEFAULT_EXCLUDE and d.scope == ""
    assert d.packdir is None and d.layers is None and not d.dry_run


@pytest.mark.parametrize("env,enabled", [
    ({}, False),
    ({"OPENPI_DUQUANT_PACKDIR": "/tmp/x"}, False),        # a cache location alone does not quantize
    ({"OPENPI_DUQUANT_DEBUG": "1"}, False),               # prototype switches we do not read
    ({"OPENPI_DUQUANT_DRYRUN": "0"}, False),
    ({"OPENPI_DUQUANT_DRYRUN": "1"}, True),
    ({"OPENPI_DUQUANT_ABITS": "8"}, True),
    ({"OPENPI_DUQUANT_INCLUDE": "mlp"}, True),
    ({"DUQUANT_WBITS_DEFAULT": "4"}, True),
    ({"DUQUANT_ENABLE": "1"}, True),
    ({"DUQUANT_ENABLE": "0", "OPENPI_DUQUANT_ABITS": "8"}, False),
    ({"OPENPI_DUQUANT_ENABLE": "off", "OPENPI_DUQUANT_WBITS_DEFAULT": "4"}, False),
])
def test_what_enables_it(env, enabled):
    assert dq.settings_from_env(env).enabled is enabled


def test_misspelt_setting_warns():
    with pytest.warns(UserWarning, match="DUQUANT_WBIT is not a duquant setting and is ignored; did you mean "
                                         "DUQUANT_WBITS"):
        dq.settings_from_env({"DUQUANT_WBIT": "4"})
    with pytest.warns(UserWarning, match="did you mean OPENPI_DUQUANT_CALIB_STEPS"):
        dq.settings_from_env({"OPENPI_DUQUANT_CALIB_STEP": "4"})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        # Other duquant variables and prototype-only switches are not settings and pass quietly.
        dq.settings_from_env({"OPENPI_DUQUANT_BACKEND": "x", "DUQUANT_PYTHON_DIR": "/x", "OPENPI_DUQUANT_DEBUG": "1"})


def test_reads_os_environ_by_default(monkeypatch):
    for k in list(os.environ):
        if k.startswith(("DUQUANT_", "OPENPI_DUQUANT_")):
            monkeypatch.delenv(k)
    monkeypatch.setenv("OPENPI_DUQUANT_WBITS_DEFAULT", "8")
    assert dq.Config.from_env().wbits == 8
    assert dq.settings_from_env().enabled


# ---- enable_from_env -------------------------------------------------------------------------------

def test_disabled_returns_none_and_leaves_the_model_alone():
    model = float_model()
    assert dq.enable_from_env(model, {}) is None
    assert dq.enable_from_env(model, {"OPENPI_DUQUANT_PACKDIR": "/nonexistent"}) is None
    assert quantized_names(model) == []


def test_dry_run_lists_and_changes_nothing(capsys):
    model = float_model()
    report = dq.enable_from_env(model, {"OPENPI_DUQUANT_DRYRUN": "1", "OPENPI_DUQUANT_WBITS": "layers.0.mlp.up_proj:8"})
    assert report.action == "dry_run" and sorted(report.names) == ALL_DEFAULT
    assert next(l for l in report.layers if l.name == "layers.0.mlp.up_proj").config.wbits == 8
    assert quantized_names(model) == []
    assert "would quantize 14 layer(s)" in capsys.readouterr().err


def test_selection_scope_layers_include_exclude_and_per_layer_bits():
    model = float_model()
    report = dq.enable_from_env(model, {"DUQUANT_SCOPE": "layers.1.", "DUQUANT_EXCLUDE": r"mlp\.",
                                        "DUQUANT_WBITS": "layers.1.self_attn.q_proj:8"}, verbose=False)
    assert report.action == "packed"
    assert quantized_names(model) == sorted(f"layers.1.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj"))
    assert model.layers[1].self_attn.q_proj.config.wbits == 8
    assert model.layers[1].self_attn.k_proj.config.wbits == 4

    model = float_model()
    dq.enable_from_env(model, {"DUQUANT_LAYERS": "lm_head,layers.0.mlp.down_proj"}, verbose=False)
    assert quantized_names(model) == ["layers.0.mlp.down_proj", "lm_head"]  # LAYERS bypasses INCLUDE/EXCLUDE

    model = float_model()
    dq.enable_from_env(model, {"DUQUANT_INCLUDE": "", "DUQUANT_EXCLUDE": ""}, verbose=False)
    assert len(quantized_names(model)) == 15  # every nn.Linear, lm_head too


def test_selection_errors_name_the_variable_and_leave_the_model_alone():
    model = float_model()
    with pytest.raises(dq.EnvError, match=r"OPENPI_DUQUANT_LAYERS: 'layers.0.mlp.up' is not an nn.Linear"):
        dq.enable_from_env(model, {"OPENPI_DUQUANT_LAYERS": "layers.0.mlp.up"}, verbose=False)
    with pytest.raises(dq.EnvError, match=r"DUQUANT_WBITS: layer 'lm_head' is not among the 14 selected layers"):
        dq.enable_from_env(model, {"DUQUANT_WBITS": "lm_head:8"}, verbose=False)
    assert quantized_names(model) == []


def test_action_head_is_skipped_unless_asked_for():
    class Policy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(32, 32)
            self.action_out_proj = nn.Linear(32, 8)
    model = Policy()
    dq.enable_from_env(model, {"DUQUANT_INCLUDE": ""}, verbose=False)
    assert quantized_names(model) == ["fc1"]
    model = Policy()
    dq.enable_from_env(model, {"DUQUANT_INCLUDE": "", "DUQUANT_INCLUDE_ACTION_HEAD": "1"}, verbose=False)
    assert quantized_names(model) == ["action_out_proj", "fc1"]


def test_packdir_end_to_end_packs_then_loads(tmp_path, monkeypatch):
    packdir = tmp_path / "packs"
    env = {"OPENPI_DUQUANT_PACKDIR": str(packdir), "OPENPI_DUQUANT_ABITS": "8",
           "OPENPI_DUQUANT_WBITS": "layers.0.mlp.down_proj:8"}
    base = float_model()
    x = torch.randn(6, 48)

    first = copy.deepcopy(base)
    r1 = dq.enable_from_env(first, env, verbose=False)
    assert r1.action == "packed" and r1.saved and len(r1) == 14
    assert os.listdir(packdir) == [os.path.basename(r1.pack_path)]
    assert first.layers[0].mlp.down_proj.config.wbits == 8

    # The second run loads: packing again would be an error here.
    def no_packing(*args, **kwargs):
        raise AssertionError("packed again instead of loading")
    monkeypatch.setattr(dq.DuQuantLinear, "from_linear", no_packing)
    second = copy.deepcopy(base)
    r2 = dq.enable_from_env(second, env, verbose=False)
    assert r2.action == "loaded" and r2.pack_path == r1.pack_path
    assert quantized_names(second) == ALL_DEFAULT
    assert torch.equal(second(x), first(x))
    monkeypatch.undo()

    # Other weights or other settings never reuse that pack: they get their own file.
    changed = copy.deepcopy(base)
    with torch.no_grad():
        changed.layers[0].self_attn.q_proj.weight[0, 0] += 1.0
    r3 = dq.enable_from_env(changed, env, verbose=False)
    assert r3.action == "packed" and r3.pack_path != r1.pack_path
    r4 = dq.enable_from_env(copy.deepcopy(base), {**env, "OPENPI_DUQUANT_ABITS": "0"}, verbose=False)
    assert r4.action == "packed" and r4.pack_path not in (r1.pack_path, r3.pack_path)
    assert len(os.listdir(packdir)) == 3


def test_damaged_pack_in_packdir_is_rebuilt(tmp_path):
    env = {"DUQUANT_PACKDIR": str(tmp_path), "DUQUANT_ABITS": "8"}
    base = float_model()
    r1 = dq.enable_from_env(copy.deepcopy(base), env, verbose=False)
    with open(r1.pack_path, "wb") as f:
        f.write(b"not a pack")
    model = copy.deepcopy(base)
    with pytest.warns(UserWarning, match="cannot use .*packing again"):
        r2 = dq.enable_from_env(model, env, verbose=False)
    assert r2.action == "packed" and r2.saved
    assert len(dq.PackFile.open(r1.pack_path)) == 14
    r3 = dq.enable_from_env(copy.deepcopy(base), env, verbose=False)
    assert r3.action == "loaded"


def test_packing_error_leaves_model_and_packdir_untouched(tmp_path):
    model = float_model()
    with torch.no_grad():
        model.layers[1].mlp.up_proj.weight[3, 3] = float("nan")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="layers.1.mlp.up_proj"):
        dq.enable_from_env(model, {"DUQUANT_PACKDIR": str(tmp_path / "p"), "DUQUANT_ABITS": "8"}, verbose=False)
    assert quantized_names(model) == []
    after = model.state_dict()
    assert list(after) == list(before)
    nan_key = "layers.1.mlp.up_proj.weight"  # the one NaN, which torch.equal never calls equal to itself
    assert torch.isnan(before[nan_key]).sum() == 1
    for k in before:
        torch.testing.assert_close(after[k], before[k], rtol=0, atol=0, equal_nan=(k == nan_key), msg=k)
    assert not (tmp_path / "p").exists() or os.listdir(tmp_path / "p") == []
