"""duquant-pack / duquant-inspect end to end on a generated sharded checkpoint.

The binaries are found through DUQUANT_BIN_DIR (ctest sets it to <build>/tools), else in the
package's bin/ (where the pip-installed package ships them).
"""
import copy
import hashlib
import json
import math
import os
import re
import struct
import subprocess

import pytest
import torch

import duquant_ext as dq
from models import TinyLM, add_weight_outliers

BIN_DIR = os.environ.get("DUQUANT_BIN_DIR") or os.path.join(os.path.dirname(dq.__file__), "bin")
PACK = os.path.join(BIN_DIR, "duquant-pack")
INSPECT = os.path.join(BIN_DIR, "duquant-inspect")
pytestmark = pytest.mark.skipif(
    not (os.access(PACK, os.X_OK) and os.access(INSPECT, os.X_OK)),
    reason=f"duquant-pack/duquant-inspect not found in {BIN_DIR}: set DUQUANT_BIN_DIR=<build>/tools "
           f"(ctest does), install the package (it ships them in duquant_ext/bin), or build with "
           f"-DDUQUANT_BUILD_TOOLS=ON")

# ---- a safetensors writer and reader of our own, independent of the library ----------------------
_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64"}


def _raw(t):
    t = t.contiguous()
    return t.view(torch.int16).numpy().tobytes() if t.dtype == torch.bfloat16 else t.numpy().tobytes()


def write_safetensors(path, tensors):
    header, blobs, offset = {}, [], 0
    for name, t in tensors.items():
        data = _raw(t)
        header[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        blobs.append(data)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + b"".join(blobs))


def read_raw_safetensors(path):
    """{name: (dtype, shape, raw bytes)} and the metadata."""
    with open(path, "rb") as f:
        blob = f.read()
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8:8 + n])
    meta = header.pop("__metadata__", {})
    data = blob[8 + n:]
    return {k: (v["dtype"], v["shape"], data[v["data_offsets"][0]:v["data_offsets"][1]]) for k, v in header.items()}, meta


def digest(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def run(*args):
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=600)


# ---- the checkpoint: TinyLM, layer 0 in bf16 in one shard, layer 1 in f32 in another ------------
def make_model():
    torch.manual_seed(0)
    return add_weight_outliers(TinyLM(layers=2, d=48, kv=16, h=80)).eval()


@pytest.fixture()
def checkpoint(tmp_path):
    model = make_model()
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    shard1, shard2 = {}, {}
    for name, t in state.items():
        if name.startswith("layers.1."):
            shard2[name] = t.float()                      # f32 weights
        else:
            shard1[name] = t.to(torch.bfloat16)           # bf16 weights, norms, embeddings, lm_head
    shard2["steps"] = torch.tensor([7, 8, 9])             # a non-float extra tensor
    folder = tmp_path / "ckpt"
    folder.mkdir()
    write_safetensors(folder / "model-00001-of-00002.safetensors", shard1)
    write_safetensors(folder / "model-00002-of-00002.safetensors", shard2)
    weight_map = {k: "model-00001-of-00002.safetensors" for k in shard1}
    weight_map.update({k: "model-00002-of-00002.safetensors" for k in shard2})
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    # The float model the checkpoint holds (bf16 values where the checkpoint has bf16).
    exact = {k: (shard1.get(k, shard2.get(k))).float() for k in state}
    return {"index": index, "folder": folder, "shard1": shard1, "shard2": shard2, "state": exact}


def model_from(state):
    m = make_model()
    m.load_state_dict(state)
    return m


SELECTED = sorted(f"layers.{i}.{p}" for i in range(2) for p in (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"))


def test_pack_sharded_checkpoint_matches_quantize_and_copies_the_rest(checkpoint, tmp_path):
    out = tmp_path / "model.duquant.safetensors"
    inputs = [checkpoint["index"], *sorted(checkpoint["folder"].glob("*.safetensors"))]
    before = {p: digest(p) for p in inputs}
    r = run(PACK, checkpoint["index"], "-o", out, "--copy-rest", "--wbits-for", "layers.1.mlp.down_proj:8")
    assert r.returncode == 0, r.stderr
    assert {p: digest(p) for p in inputs} == before  # IN untouched

    # The closing table: every selected layer with its bits and a small output error.
    rows = {m.group(1): m for m in re.finditer(r"^(layers\.\S+)\s+\[(\d+), (\d+)\]\s+(W\d+A\d+)\s+.*?(\d+\.\d+)\s*$",
                                                r.stdout, re.M)}
    assert sorted(rows) == SELECTED
    assert rows["layers.1.mlp.down_proj"].group(4) == "W8A8" and rows["layers.0.mlp.down_proj"].group(4) == "W4A8"
    assert rows["layers.0.mlp.up_proj"].group(2, 3) == ("80", "48")
    assert all(0 < float(m.group(5)) < 0.5 for m in rows.values())
    assert re.search(r"^total: 14 layer\(s\) .* -> .*, 9 other tensor\(s\) copied", r.stdout, re.M)
    assert re.search(r"^wrote .* in \d+\.\d+ s on cpu$", r.stdout, re.M)

    # --copy-rest: every tensor that was not packed is in OUT, bit for bit, with dtype and shape.
    source = {}
    for shard in checkpoint["folder"].glob("*.safetensors"):
        source.update(read_raw_safetensors(shard)[0])
    packed_tensors, meta = read_raw_safetensors(out)
    assert meta["format"] == "duquant"
    rest = {k for k in source if not any(k == f"{n}.weight" or k == f"{n}.bias" for n in SELECTED)}
    assert rest == {"embed_tokens.weight", "norm.weight", "norm.bias", "lm_head.weight", "steps"} | {
        f"layers.{i}.input_layernorm.{p}" for i in range(2) for p in ("weight", "bias")}
    for name in rest:
        assert packed_tensors[name] == source[name], name
    # A quantized layer's bias went into its pack (float32), not copied as it was.
    assert packed_tensors["layers.0.self_attn.o_proj.bias"][0] == "F32"

    # Layers loaded from the pack compute what quantize_ gives for the same config.
    cfg = dq.Config()
    reference = model_from(checkpoint["state"])
    dq.quantize_(reference, cfg, filter_fn=lambda name, m: name != "layers.1.mlp.down_proj")
    dq.quantize_(reference, cfg.replace(wbits=8), include=r"^layers\.1\.mlp\.down_proj$")
    loaded = model_from(checkpoint["state"])
    report = dq.load_pack(loaded, out)
    assert sorted(report.names) == SELECTED
    for name in SELECTED:
        got, want = loaded.get_submodule(name), reference.get_submodule(name)
        assert got.config == want.config, name
        for key in ("qweight", "w_scale", "perm", "r_in", "r_out", "bias"):
            a, b = getattr(got, key), getattr(want, key)
            assert (a is None) == (b is None) and (a is None or torch.equal(a, b)), f"{name}.{key}"
    x = torch.randn(3, 48)
    assert torch.equal(loaded(x), reference(x))


def test_siblings_share_an_input_transform_unless_told_not_to(checkpoint, tmp_path):
    shared, alone = tmp_path / "shared.safetensors", tmp_path / "alone.safetensors"
    assert run(PACK, checkpoint["index"], "-o", shared).returncode == 0
    r = run(PACK, checkpoint["index"], "-o", alone, "--no-share-inputs")
    assert r.returncode == 0, r.stderr
    s, a = read_raw_safetensors(shared)[0], read_raw_safetensors(alone)[0]
    for i in range(2):
        for parent, names in (("self_attn", ("q_proj", "k_proj", "v_proj")), ("mlp", ("gate_proj", "up_proj"))):
            keys = [f"layers.{i}.{parent}.{n}" for n in names]
            for what in ("perm", "r_in"):
                assert len({s[f"{k}.{what}"][2] for k in keys}) == 1, (keys, what)  # one transform
                assert len({a[f"{k}.{what}"][2] for k in keys}) > 1 or what == "perm", (keys, what)
        assert s[f"layers.{i}.self_attn.o_proj.r_in"] == a[f"layers.{i}.self_attn.o_proj.r_in"]
    # Loaded, the siblings are linked again.
    model = model_from(checkpoint["state"])
    dq.load_pack(model, shared)
    assert model.layers[0].self_attn.k_proj._input_share is model.layers[0].self_attn.q_proj._input_share
    assert model.layers[0].self_attn.q_proj._input_share is not None
    assert "--no-share-inputs" in run(PACK, "--help").stdout


def test_inspect_text_and_json(checkpoint, tmp_path):
    out = tmp_path / "p.safetensors"
    assert run(PACK, checkpoint["index"], "-o", out, "--abits", "0", "--wbits-for", "k_proj:8").returncode == 0
    r = run(INSPECT, out)
    assert r.returncode == 0, r.stderr
    assert "format version 1" in r.stdout
    assert "\nconfig: W4A16, B=16, Bo=16, permute, row_rot=restore\n" in r.stdout
    for name in SELECTED:
        assert re.search(rf"^{re.escape(name)}\s", r.stdout, re.M), name
    assert re.search(r"^layers\.0\.mlp\.up_proj\s+80 x 48\s+4\s+float\s", r.stdout, re.M)
    assert re.search(r"^layers\.1\.self_attn\.k_proj\s+16 x 48\s+8\s", r.stdout, re.M)
    assert "extra tensors: 0" in r.stdout

    j = json.loads(run(INSPECT, out, "--json").stdout)
    assert j["format_version"] == 1 and j["config"]["wbits"] == 4 and j["config"]["abits"] == 0
    assert sorted(layer["name"] for layer in j["layers"]) == SELECTED
    by_name = {layer["name"]: layer for layer in j["layers"]}
    assert by_name["layers.0.self_attn.k_proj"]["wbits"] == 8
    assert (by_name["layers.0.mlp.down_proj"]["out_features"], by_name["layers.0.mlp.down_proj"]["in_features"]) == (48, 80)
    assert by_name["layers.0.self_attn.o_proj"]["has_bias"] and not by_name["layers.0.self_attn.q_proj"]["has_bias"]
    assert j["extra_tensors"]["count"] == 0
    assert j["bytes"]["file"] == os.path.getsize(out)
    assert j["bytes"]["layers"] == sum(layer["bytes"] for layer in j["layers"]) > 0
    pf = dq.PackFile.open(str(out))  # a layer's bytes: its tensors' bytes in the file
    down = "layers.0.mlp.down_proj"
    tensors = [pf.tensor(n) for n in pf.tensor_names() if n.startswith(down + ".")]
    assert by_name[down]["bytes"] == sum(t.numel() * t.element_size() for t in tensors) > 0
    assert j["metadata"]["created_by"] == "duquant-pack"


def test_dry_run_lists_and_writes_nothing(checkpoint, tmp_path):
    out = tmp_path / "never.safetensors"
    r = run(PACK, checkpoint["index"], "-o", out, "--dry-run", "--scope", "layers.1", "--wbits-for", "q_proj:6")
    assert r.returncode == 0, r.stderr
    assert not out.exists() and os.listdir(tmp_path) == ["ckpt"]
    listed = re.findall(r"^(layers\.\S+)\s+\[(\d+), (\d+)\]\s+(\S+)\s+(W\d+A\d+)", r.stdout, re.M)
    assert sorted(n for n, *_ in listed) == [n for n in SELECTED if n.startswith("layers.1.")]
    assert {n: bits for n, _, _, _, bits in listed}["layers.1.self_attn.q_proj"] == "W6A8"
    assert {n: dt for n, _, _, dt, _ in listed}["layers.1.self_attn.q_proj"] == "F32"
    assert "nothing written" in r.stdout
    # Nothing selected is fine in a dry run, an error otherwise.
    assert run(PACK, checkpoint["index"], "--dry-run", "--scope", "nowhere").returncode == 0
    r = run(PACK, checkpoint["index"], "-o", out, "--scope", "nowhere")
    assert r.returncode == 1 and "no layer selected" in r.stderr and not out.exists()


def test_default_selection_is_quantize_s(checkpoint):
    r = run(PACK, "--help")
    assert r.returncode == 0
    assert dq.DEFAULT_INCLUDE in r.stdout and dq.DEFAULT_EXCLUDE in r.stdout
    listed = re.findall(r"^(\S+)\s+\[\d+, \d+\]", run(PACK, checkpoint["index"], "--dry-run").stdout, re.M)
    assert sorted(listed) == sorted(n for n, _ in dq.select_linear_layers(make_model()))
    # include '' takes every 2-D .weight (here also the embedding and lm_head), exclude applies.
    listed = re.findall(r"^(\S+)\s+\[\d+, \d+\]", run(PACK, checkpoint["index"], "--dry-run", "--include", "").stdout, re.M)
    assert sorted(listed) == sorted(SELECTED + ["embed_tokens", "lm_head"])


def test_usage_errors_exit_2(checkpoint, tmp_path):
    out = tmp_path / "o.safetensors"
    for args in (["--bogus"], ["--wbits", "9"], ["--act", "sometimes"], ["--row-rot", "propagate"],
                 ["--device", "tpu"], ["--include", "("], ["--wbits-for", "nothing_matches:8"],
                 ["--wbits-for", "q_proj"], ["--block", "x"]):
        r = run(PACK, checkpoint["index"], "-o", out, *args)
        assert r.returncode == 2, (args, r.stderr)
        assert r.stderr.startswith("duquant-pack: error: "), (args, r.stderr)
        assert not out.exists()
    assert run(PACK).returncode == 2                                      # no IN
    assert run(PACK, checkpoint["index"]).returncode == 2                 # no -o
    assert run(PACK, tmp_path / "missing.safetensors", "-o", out).returncode == 2
    assert run(INSPECT).returncode == 2
    assert run(INSPECT, out, "--bogus").returncode == 2
    # OUT may not be one of the inputs.
    shard = next(checkpoint["folder"].glob("*.safetensors"))
    r = run(PACK, checkpoint["index"], "-o", shard)
    assert r.returncode == 2 and "is an input file" in r.stderr


def _one_line_error(r):
    """The error is one line, the last on stderr (progress lines for finished layers may precede it)."""
    assert r.returncode == 1, r.stderr
    lines = r.stderr.strip().splitlines()
    errors = [line for line in lines if "error" in line]
    assert errors == [lines[-1]] and lines[-1].startswith("duquant-pack: error: "), r.stderr
    return lines[-1]


def test_bad_inputs_exit_1_and_keep_out(checkpoint, tmp_path):
    out = tmp_path / "keep.safetensors"
    out.write_bytes(b"precious bytes")
    folder = checkpoint["folder"]
    shard1 = folder / "model-00001-of-00002.safetensors"

    # A truncated shard.
    good = shard1.read_bytes()
    shard1.write_bytes(good[:-10])
    msg = _one_line_error(run(PACK, checkpoint["index"], "-o", out))
    assert "model-00001-of-00002.safetensors" in msg
    shard1.write_bytes(good)

    # A NaN in a selected weight: the error names the layer.
    shard2 = dict(checkpoint["shard2"])
    shard2["layers.1.mlp.up_proj.weight"] = shard2["layers.1.mlp.up_proj.weight"].clone()
    shard2["layers.1.mlp.up_proj.weight"][4, 5] = math.nan
    write_safetensors(folder / "model-00002-of-00002.safetensors", shard2)
    msg = _one_line_error(run(PACK, checkpoint["index"], "-o", out))
    assert "layers.1.mlp.up_proj: weight contains NaN/Inf (first at row 4, column 5)" in msg
    write_safetensors(folder / "model-00002-of-00002.safetensors", checkpoint["shard2"])

    # Index problems: not JSON, a missing shard, a tensor in the wrong shard.
    index = checkpoint["index"]
    good_index = index.read_text()
    index.write_text("{not json")
    assert "not valid JSON" in _one_line_error(run(PACK, index, "-o", out))
    bad = json.loads(good_index)
    bad["weight_map"]["norm.weight"] = "model-00009-of-00009.safetensors"
    index.write_text(json.dumps(bad))
    assert "does not exist" in _one_line_error(run(PACK, index, "-o", out))
    bad = json.loads(good_index)
    bad["weight_map"]["norm.weight"] = "model-00002-of-00002.safetensors"
    index.write_text(json.dumps(bad))
    assert "norm.weight" in _one_line_error(run(PACK, index, "-o", out))
    index.write_text(good_index)

    # A selected weight that is not floating point.
    single = tmp_path / "int.safetensors"
    write_safetensors(single, {"q_proj.weight": torch.ones(16, 16, dtype=torch.int64)})
    assert "expected F32, F16, BF16 or F64" in _one_line_error(run(PACK, single, "-o", out))

    # Not a pack, for inspect.
    r = run(INSPECT, shard1)
    assert r.returncode == 1 and r.stderr.startswith("duquant-inspect: error: ") and "not a duquant pack" in r.stderr
    r = run(INSPECT, tmp_path / "missing.safetensors")
    assert r.returncode == 1

    assert out.read_bytes() == b"precious bytes"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "int.safetensors", "keep.safetensors"]


def test_single_file_checkpoint_and_static_mode(tmp_path):
    model = make_model()
    src = tmp_path / "model.safetensors"
    write_safetensors(src, {k: v for k, v in model.state_dict().items()})
    out = tmp_path / "p.safetensors"
    r = run(PACK, src, "-o", out, "--act", "static", "--calib-steps", "4", "--block", "8", "--no-permute",
            "--row-rot", "none", "--include", r"mlp\.", "--exclude", "down_proj")
    assert r.returncode == 0, r.stderr
    assert "(weights only)" in r.stdout and "calibrate" in r.stdout
    pf = dq.PackFile.open(str(out))
    assert sorted(pf.layer_names()) == [f"layers.{i}.mlp.{p}" for i in range(2) for p in ("gate_proj", "up_proj")]
    c = pf.layer("layers.0.mlp.gate_proj").config
    assert (c.act, c.calib_steps, c.block_size, c.permute, c.row_rot) == ("static", 4, 8, False, "none")
    # Same numbers as quantize_ with that config.
    cfg = dq.Config(act="static", calib_steps=4, block_size=8, permute=False, row_rot="none")
    ref = copy.deepcopy(model)
    dq.quantize_(ref, cfg, include=r"mlp\.", exclude="down_proj")
    pack = pf.load_layer("layers.1.mlp.up_proj")
    assert torch.equal(pack.qweight, ref.layers[1].mlp.up_proj.qweight)
    assert torch.equal(pack.w_scale, ref.layers[1].mlp.up_proj.w_scale)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: duquant-pack --device cuda needs one")
def test_pack_on_gpu_tracks_cpu(checkpoint, tmp_path):
    cpu_out, gpu_out = tmp_path / "cpu.safetensors", tmp_path / "gpu.safetensors"
    assert run(PACK, checkpoint["index"], "-o", cpu_out).returncode == 0
    r = run(PACK, checkpoint["index"], "-o", gpu_out, "--device", "cuda")
    if r.returncode == 1 and "built without CUDA" in r.stderr:
        pytest.skip("this duquant-pack was built without CUDA")
    assert r.returncode == 0, r.stderr
    assert re.search(r"on cuda(:0)?$", r.stdout, re.M)
    cpu_pf, gpu_pf = dq.PackFile.open(str(cpu_out)), dq.PackFile.open(str(gpu_out))
    assert gpu_pf.layer_names() == cpu_pf.layer_names()
    for name in SELECTED:
        a, b = gpu_pf.load_layer(name), cpu_pf.load_layer(name)
        assert torch.equal(a.perm, b.perm), name
        assert (a.qweight == b.qweight).float().mean().item() >= 0.999, name
        assert torch.allclose(a.w_scale, b.w_scale, rtol=1e-6, atol=0), name


def test_device_errors_exit_1(checkpoint, tmp_path):
    out = tmp_path / "o.safetensors"
    r = run(PACK, checkpoint["index"], "-o", out, "--device", "cuda:63")
    assert r.returncode == 1 and r.stderr.startswith("duquant-pack: error: --device cuda:63: "), r.stderr
    assert not out.exists()
