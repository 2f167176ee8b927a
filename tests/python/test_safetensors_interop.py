"""Our files load with the official `safetensors` package, and theirs with our reader (DESIGN.md section 4)."""
import copy

import pytest
import torch

safetensors_torch = pytest.importorskip(
    "safetensors.torch", reason="safetensors not installed: runs on the GPU machine, which has it")
from safetensors import safe_open  # noqa: E402

import duquant_ext as dq  # noqa: E402
from models import TinyLM, add_weight_outliers  # noqa: E402


def quantized_model(config):
    model = add_weight_outliers(TinyLM()).eval()
    dq.quantize_(model, config)
    return model


@pytest.mark.parametrize("config", [dq.Config(), dq.Config(wbits=8, act="static_channel", calib_steps=1),
                                    dq.Config(wbits=16, row_rot="none", permute=False)])
def test_pack_files_load_with_safetensors(tmp_path, config):
    model = quantized_model(config)
    if config.needs_calibration:
        model(torch.randn(8, 48))
    path = str(tmp_path / "pack.safetensors")
    dq.save_pack(model, path, extra_metadata={"source": "interop"})
    theirs = safetensors_torch.load_file(path)
    pf = dq.PackFile.open(path)
    assert sorted(theirs) == sorted(pf.tensor_names())
    for name, tensor in theirs.items():
        ours = pf.tensor(name)
        assert tensor.dtype == ours.dtype and torch.equal(tensor, ours), name
    buffers = dict(model.named_buffers())
    for name, tensor in theirs.items():
        assert torch.equal(tensor, buffers[name]), name
    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
    assert meta["format"] == "duquant" and meta["format_version"] == "1" and meta["source"] == "interop"


def test_files_written_by_safetensors_load_with_our_reader(tmp_path):
    tensors = {
        "f32": torch.randn(3, 5),
        "f16": torch.randn(7).half(),
        "bf16": torch.randn(2, 2, 2).bfloat16(),
        "f64": torch.randn(4, 1).double(),
        "i64": torch.arange(-5, 6),
        "i32": torch.arange(9, dtype=torch.int32).reshape(3, 3),
        "i16": torch.tensor([-7, 7], dtype=torch.int16),
        "i8": torch.tensor([-128, 127], dtype=torch.int8),
        "u8": torch.arange(13, dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
    }
    path = str(tmp_path / "theirs.safetensors")
    safetensors_torch.save_file(tensors, path, metadata={"who": "safetensors"})
    ours = dq.read_safetensors(path)
    assert sorted(ours) == sorted(tensors)
    for name, tensor in tensors.items():
        assert ours[name].dtype == tensor.dtype and ours[name].shape == tensor.shape, name
        assert torch.equal(ours[name], tensor), name
    assert dq.safetensors_metadata(path) == {"who": "safetensors"}
    with pytest.raises(ValueError, match="not a duquant pack"):
        dq.PackFile.open(path)


def test_a_pack_rewritten_by_safetensors_still_loads(tmp_path):
    torch.manual_seed(1)  # `fresh` below must get the same unquantized weights (norms, embeddings)
    model = quantized_model(dq.Config())
    ours = str(tmp_path / "ours.safetensors")
    dq.save_pack(model, ours)
    with safe_open(ours, framework="pt") as f:
        metadata = f.metadata()
    theirs = str(tmp_path / "theirs.safetensors")
    safetensors_torch.save_file(safetensors_torch.load_file(ours), theirs, metadata=metadata)
    torch.manual_seed(1)
    fresh = add_weight_outliers(TinyLM()).eval()
    dq.load_pack(fresh, theirs)
    x = torch.randn(4, 48)
    assert torch.equal(fresh(x), model(x))
