"""Sibling layers with one input transform (q/k/v_proj, gate/up_proj): packing and linking on any
device; on CUDA, the common input quantized once with answers identical to each layer alone."""
import copy
import io

import pytest
import torch
from torch import nn

import duquant_ext as dq
import emulation as em
from duquant_ext import _C
from cuda_graphs import captured, replay
from models import TinyLM, add_weight_outliers, outlier_acts

needs_cuda = pytest.mark.skipif(
    not (torch.cuda.is_available() and dq._C.fast_path_built()),
    reason="no CUDA device, or duquant built without its CUDA kernels: the shared fast path needs both")


def make_model(layers=2, d=48, kv=16, h=80):
    torch.manual_seed(0)
    return add_weight_outliers(TinyLM(layers=layers, d=d, kv=kv, h=h)).eval()


def rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm())


def test_quantize_links_siblings_and_reports_them():
    model = make_model()
    report = dq.quantize_(model, dq.Config())
    want = [[f"layers.{i}.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj")] for i in range(2)] + [
        [f"layers.{i}.mlp.{p}" for p in ("gate_proj", "up_proj")] for i in range(2)]
    assert sorted(report.shared_inputs) == sorted(want)
    assert "share an input transform" in str(report)
    attn, mlp = model.layers[0].self_attn, model.layers[0].mlp
    for group in ((attn.q_proj, attn.k_proj, attn.v_proj), (mlp.gate_proj, mlp.up_proj)):
        share = group[0]._input_share
        assert share is not None and share.size == len(group)
        for m in group[1:]:
            assert m._input_share is share
            assert torch.equal(m.perm, group[0].perm) and torch.equal(m.r_in, group[0].r_in)
        assert "input transform shared by" in repr(group[0])
    assert attn.o_proj._input_share is None and mlp.down_proj._input_share is None
    # Blocks do not share with each other.
    assert model.layers[1].self_attn.q_proj._input_share is not attn.q_proj._input_share


def test_shared_transform_is_the_stacked_weights():
    """One permutation and R_in from [W_q; W_k; W_v]; each layer keeps its own R_out and codes."""
    model = make_model()
    ref = copy.deepcopy(model)
    dq.quantize_(model, dq.Config(wbits=8))
    a, r = model.layers[1].self_attn, ref.layers[1].self_attn
    stacked = torch.cat([r.q_proj.weight, r.k_proj.weight, r.v_proj.weight]).detach()
    pk = em.pack(stacked, None, wbits=8)
    for name in ("q_proj", "k_proj", "v_proj"):
        layer = getattr(a, name)
        assert torch.equal(layer.perm, pk["perm"])
        assert torch.allclose(layer.r_in.double(), torch.stack(pk["r_in"]), atol=1e-5)
        alone = em.pack(getattr(r, name).weight.detach(), None, wbits=8)
        assert torch.allclose(layer.r_out.double(), torch.stack(alone["r_out"]), atol=1e-5)
    # Every layer still computes its own linear, about as well as when packed alone (outlier-heavy
    # input; measured: mean error 0.030 shared vs 0.033 alone over this model's five siblings).
    alone = copy.deepcopy(ref)
    dq.quantize_(alone, dq.Config(wbits=8), share_inputs=False)
    x = outlier_acts(9, 48)
    errors = {True: [], False: []}
    for blk in range(2):
        for parent, names in (("self_attn", ("q_proj", "k_proj", "v_proj")), ("mlp", ("gate_proj", "up_proj"))):
            for name in names:
                want = getattr(getattr(ref.layers[blk], parent), name)(x)
                errors[True].append(rel(getattr(getattr(model.layers[blk], parent), name)(x), want))
                errors[False].append(rel(getattr(getattr(alone.layers[blk], parent), name)(x), want))
    mean = {k: sum(v) / len(v) for k, v in errors.items()}
    assert max(errors[True]) < 0.06 and mean[True] < 1.25 * mean[False] + 0.005, errors


def test_share_inputs_false_and_static_scales_pack_alone():
    for cfg, share in ((dq.Config(), False), (dq.Config(act="static"), True), (dq.Config(abits=0), True)):
        model = make_model()
        ref = copy.deepcopy(model)
        report = dq.quantize_(model, cfg, share_inputs=share)
        assert report.shared_inputs == []
        for name in report.names:
            assert getattr(model.get_submodule(name), "_input_share") is None
            alone = dq.DuQuantLinear.from_linear(ref.get_submodule(name), cfg)
            assert torch.equal(model.get_submodule(name).r_in, alone.r_in), name


def test_explicit_input_groups_and_their_errors():
    torch.manual_seed(3)
    cfg = dq.Config()
    w = [torch.randn(24, 40), torch.randn(8, 40), torch.randn(16, 40)]
    out = _C.pack_linears([("a", w[0], None, cfg, "g"), ("b", w[1], None, cfg, "g"), ("c", w[2], None, cfg, None)])
    (_, a), (_, b), (_, c) = out
    assert torch.equal(a.perm, b.perm) and torch.equal(a.r_in, b.r_in)
    assert not torch.equal(a.r_in, c.r_in)
    alone = _C.pack_linear(w[2], None, cfg, "c")
    assert torch.equal(c.r_in, alone.r_in) and torch.equal(c.qweight, alone.qweight)
    with pytest.raises(ValueError, match=r"'b' cannot share an input transform with 'a' \(in_features 32 vs 40\)"):
        _C.pack_linears([("a", w[0], None, cfg, "g"), ("b", torch.randn(8, 32), None, cfg, "g")])
    with pytest.raises(ValueError, match=r"'b' cannot share .* \(configs differ\)"):
        _C.pack_linears([("a", w[0], None, cfg, "g"), ("b", w[1], None, dq.Config(wbits=8), "g")])
    bad = w[1].clone()
    bad[2, 5] = float("nan")
    with pytest.raises(ValueError, match=r"b: weight contains NaN/Inf \(first at row 2, column 5\)"):
        _C.pack_linears([("a", w[0], None, cfg, "g"), ("b", bad, None, cfg, "g")])
    assert ["q_proj", "k_proj", "v_proj"] in _C.sibling_sets()
    assert _C.sibling_set_of("model.layers.3.self_attn", "k_proj") == _C.sibling_sets().index(
        ["q_proj", "k_proj", "v_proj"])
    assert _C.sibling_set_of("model.layers.3.self_attn", "o_proj") == -1
    assert _C.sibling_set_of("decoder.layers.0.encoder_attn", "k_proj") == -1  # cross-attention: two inputs
    assert _C.sibling_set_of("bert.layer.0.crossattention.self", "query") == -1
    assert _C.sibling_set_of("bert.layer.0.attention.self", "query") >= 0
    assert _C.sibling_set_of("layers.0.CrossAttention", "q_proj") == -1


def test_only_named_siblings_link_even_with_equal_transforms():
    """Without rotation or permutation every layer of a width has the same (trivial) transform; only
    the sibling sets link, and cross-attention children stay apart."""
    model = make_model()
    cross = nn.Module()
    cross.q_proj, cross.k_proj, cross.v_proj = (nn.Linear(48, 16, bias=False) for _ in range(3))
    model.layers[0].add_module("encoder_attn", cross)
    cfg = dq.Config(block_size=1, permute=False)
    report = dq.quantize_(model, cfg, include=None, exclude="lm_head")
    names = sum(report.shared_inputs, [])
    assert "layers.0.self_attn.o_proj" not in names and "layers.0.mlp.down_proj" not in names
    assert not any("encoder_attn" in n for n in names)
    assert ["layers.0.self_attn.q_proj", "layers.0.self_attn.k_proj", "layers.0.self_attn.v_proj"] in \
        report.shared_inputs


def test_group_op_from_codes_on_cpu_and_its_errors():
    model = make_model()
    dq.quantize_(model, dq.Config())
    a = model.layers[0].self_attn
    layers = (a.q_proj, a.k_proj, a.v_proj)
    x = outlier_acts(6, 48)
    codes, scales = torch.ops.duquant.quantize_input(x, a.q_proj.perm, a.q_proj.r_in, None, 8)
    outs = torch.ops.duquant.linear_codes_group(
        codes, scales, x, [m.qweight for m in layers], [m.w_scale for m in layers], a.q_proj.r_in,
        [m.r_out for m in layers], [m.bias for m in layers], 48, 4, 8)
    for got, layer in zip(outs, layers):
        assert torch.equal(got, layer(x))  # the reference on the same codes
    with pytest.raises(ValueError, match=r"linear_codes_group: want int8 codes \[6, 48\] and float32 scales \[6\]"):
        torch.ops.duquant.linear_codes_group(
            codes[:5], scales, x, [a.q_proj.qweight], [a.q_proj.w_scale], a.q_proj.r_in, [a.q_proj.r_out], [None],
            48, 4, 8)
    with pytest.raises(ValueError, match="1 qweights but 2 w_scales"):
        torch.ops.duquant.linear_codes_group(
            codes, scales, x, [a.q_proj.qweight], [a.q_proj.w_scale] * 2, a.q_proj.r_in, [a.q_proj.r_out], [None],
            48, 4, 8)


def test_load_pack_relinks_and_load_state_dict_unlinks(tmp_path):
    model = make_model()
    dq.quantize_(model, dq.Config())
    path = tmp_path / "m.safetensors"
    dq.save_pack(model, path)
    fresh = make_model()
    dq.load_pack(fresh, path)
    attn = fresh.layers[0].self_attn
    assert attn.q_proj._input_share is not None and attn.k_proj._input_share is attn.q_proj._input_share
    x = outlier_acts(5, 48)
    assert torch.equal(fresh(x), model(x))
    # A layer refilled from elsewhere may no longer match its siblings: it quantizes alone.
    attn.k_proj.load_state_dict(copy.deepcopy(model.layers[1].self_attn.k_proj.state_dict()))
    assert attn.k_proj._input_share is None
    groups = dq.link_shared_inputs(fresh)
    assert "layers.0.self_attn.k_proj" not in sum(groups, [])
    assert ["layers.0.self_attn.q_proj", "layers.0.self_attn.v_proj"] in groups


# ---- CUDA: one input kernel for the group, answers unchanged ---------------------------------
def alone(layer, x):
    wbits, abits, act = layer._op_args
    return torch.ops.duquant.linear(x, layer.qweight, layer.w_scale, layer.perm, layer.r_in, layer.r_out, layer.bias,
                                    layer.act_scale, layer.in_features, wbits, abits, act, True)


def cuda_block(d=512, kv=128, h=1024, dtype=torch.bfloat16):
    torch.manual_seed(1)
    model = add_weight_outliers(TinyLM(layers=1, d=d, kv=kv, h=h, vocab=11)).eval()
    dq.quantize_(model, dq.Config())
    return model.cuda()


def kernels_launched(fn):
    """(input kernels, GEMM kernels, all names) that fn launched."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    inputs = sum(1 for n in names if any(k in n for k in ("rotate_", "permute_", "quantize_chunk")))
    return inputs, sum(1 for n in names if "int_gem" in n), names


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 7, 50, 301])
def test_siblings_equal_each_layer_alone_bitwise(dtype, m):
    a = cuda_block().layers[0].self_attn
    x = outlier_acts(m, 512, channel_scale=30.0, token_scale=50.0).to(dtype).cuda()  # finite in float16 too
    want = [alone(layer, x) for layer in (a.q_proj, a.k_proj, a.v_proj)]
    # Poisoned outputs would show: every output is a fresh tensor the GEMM fills.
    got = [a.q_proj(x), a.k_proj(x), a.v_proj(x)]
    for g, w, name in zip(got, want, ("q", "k", "v")):
        assert g.dtype == dtype and g.shape == w.shape
        assert torch.equal(g, w), name
    # In any order, a layer twice: still each layer's own answer.
    for layer in (a.v_proj, a.q_proj, a.v_proj, a.k_proj):
        assert torch.equal(layer(x), alone(layer, x))


@needs_cuda
@pytest.mark.parametrize("m", [1, 50])
def test_group_runs_one_input_kernel_and_one_gemm(m):
    a = cuda_block().layers[0].self_attn
    x = outlier_acts(m, 512).to(torch.bfloat16).cuda()
    shared = kernels_launched(lambda: (a.q_proj(x), a.k_proj(x), a.v_proj(x)))
    unshared = kernels_launched(lambda: [alone(layer, x) for layer in (a.q_proj, a.k_proj, a.v_proj)])
    assert shared[:2] == (1, 1) and unshared[:2] == (3, 3), (shared[2], unshared[2])


@needs_cuda
@pytest.mark.parametrize("tile", ["stream", "32x32", "64x64", "128x128", "wgmma128", "gemv"])
@pytest.mark.parametrize("m", [3, 50, 129])
def test_grouped_gemm_every_tile_bitwise(tile, m):
    """One launch for q/k/v (widths 512, 128, 128: segments of unequal tile counts) on each mma.sync
    tile; tiles that cannot take a group (wgmma, the skinny kernel) launch per layer. Outputs
    poisoned first would show as NaN: every output is fresh and must equal the layer alone."""
    if tile == "wgmma128" and not dq._C.wgmma_gemm_available():
        pytest.skip("the wgmma GEMM needs a compute capability 9.0 GPU and a build with sm_90a code")
    a = cuda_block().layers[0].self_attn
    x = outlier_acts(m, 512, channel_scale=30.0, token_scale=50.0).to(torch.bfloat16).cuda()
    want = [alone(layer, x) for layer in (a.q_proj, a.k_proj, a.v_proj)]
    dq._C.set_gemm_tile(tile)
    try:
        got = [a.q_proj(x), a.k_proj(x), a.v_proj(x)]
        ran = dq._C.last_gemm_tile()
    finally:
        dq._C.set_gemm_tile("auto")
    for g, w in zip(got, want):
        assert torch.equal(g, w), (tile, ran)


@needs_cuda
def test_changed_input_is_quantized_again():
    a = cuda_block().layers[0].self_attn
    x = outlier_acts(16, 512).to(torch.bfloat16).cuda()
    a.q_proj(x)
    x.mul_(-2.0)  # in place: same tensor, new version
    assert torch.equal(a.k_proj(x), alone(a.k_proj, x))
    y = x.clone()  # equal values, another tensor: quantized again, same answer
    assert torch.equal(a.v_proj(y), alone(a.v_proj, y))


@needs_cuda
def test_shared_model_in_cuda_graph_and_compile():
    model = cuda_block().to(torch.bfloat16)  # norms and head too; DuQuantLinear keeps its formats
    x = outlier_acts(50, 512, channel_scale=30.0, token_scale=50.0).to(torch.bfloat16).cuda()
    eager = model(x)
    graph, static_x, static_y = captured(model, x)
    x2 = (outlier_acts(50, 512, channel_scale=30.0, token_scale=50.0) * 2).to(torch.bfloat16).cuda()
    replay(graph, static_x, x2)
    assert torch.equal(static_y, model(x2))
    # Compiled, the layers run unshared: the same codes, the same answers bit for bit (the whole
    # model would differ in its norms, which inductor fuses).
    a = model.layers[0].self_attn
    h = model.layers[0].input_layernorm(x)
    shared = (a.q_proj(h), a.k_proj(h), a.v_proj(h))
    compiled = torch.compile(lambda t: (a.q_proj(t), a.k_proj(t), a.v_proj(t)), fullgraph=True)
    for got, want in zip(compiled(h), shared):
        assert torch.equal(got, want)
    assert eager.isfinite().all()


@needs_cuda
def test_inference_mode_other_streams_and_replicas():
    a = cuda_block().layers[0].self_attn
    layers = (a.q_proj, a.k_proj, a.v_proj)
    x = outlier_acts(50, 512, channel_scale=30.0, token_scale=50.0).to(torch.bfloat16).cuda()
    want = [alone(layer, x) for layer in layers]
    with torch.inference_mode():  # inference tensors have no version counter
        xi = x.clone()
        got = [layer(xi) for layer in layers]
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    # A sibling on another stream does not take an output made on this one.
    a.q_proj(x)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        k_side = a.k_proj(x)
    torch.cuda.current_stream().wait_stream(side)
    assert torch.equal(k_side, want[1])
    # A shallow copy (what nn.DataParallel's replicas are) is no member: it runs alone.
    replica = copy.copy(a.v_proj)
    assert replica._input_share is a.v_proj._input_share
    assert torch.equal(replica(x), want[2])


@needs_cuda
def test_siblings_that_read_different_inputs_switch_to_sharing_codes():
    """Cross-attention: q reads one input, k/v another. The first miss that leaves outputs untaken
    turns the group to codes mode: each member runs its own GEMM, k and v still share codes."""
    a = cuda_block().layers[0].self_attn
    share = a.q_proj._input_share
    x1 = outlier_acts(7, 512).to(torch.bfloat16).cuda()
    x2 = outlier_acts(9, 512).to(torch.bfloat16).cuda()
    for step in range(3):
        assert torch.equal(a.q_proj(x1), alone(a.q_proj, x1))
        assert torch.equal(a.k_proj(x2), alone(a.k_proj, x2))
        assert torch.equal(a.v_proj(x2), alone(a.v_proj, x2))
    assert not share.grouped
    inputs, gemms, names = kernels_launched(lambda: (a.q_proj(x1), a.k_proj(x2), a.v_proj(x2)))
    assert (inputs, gemms) == (2, 3), names


def test_deepcopy_and_pickle_keep_groups_apart():
    model = make_model()
    dq.quantize_(model, dq.Config())
    clone = copy.deepcopy(model)
    a, b = model.layers[0].self_attn, clone.layers[0].self_attn
    assert b.q_proj._input_share is b.k_proj._input_share is not a.q_proj._input_share
    assert all(m is n for m, n in zip(b.q_proj._input_share.members, (b.q_proj, b.k_proj, b.v_proj)))
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False) if "weights_only" in torch.load.__code__.co_varnames \
        else torch.load(buffer)
    x = outlier_acts(4, 48)
    assert torch.equal(loaded(x), model(x))
