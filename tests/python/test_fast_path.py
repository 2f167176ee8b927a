"""CUDA fast path against the reference (DESIGN §2 "two execution paths, one answer").

- The input kernel's codes equal the reference's (an off-by-one only on float32 rounding
  boundaries, at most 0.1% of codes) and its scales match.
- The GEMM + epilogue reproduce, in float64, restore((codes_a s_t)(codes_w s_n)^T) + bias from the
  very codes the kernels used: this pins the integer GEMM independently of activation rounding.
- Whole layers agree with the reference path, outputs poisoned before the kernels write them;
  also under torch.compile(fullgraph=True) and inside a CUDA graph.
Skips without a CUDA device or without the kernels compiled in.
"""
import pytest
import torch
from torch import nn

import duquant_ext as dq
from cuda_graphs import captured, replay

pytestmark = [
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: fast-path tests need one"),
    pytest.mark.skipif(not dq._C.fast_path_built(), reason="duquant built without its CUDA kernels"),
]

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(params=["rows", "split", "mma", "slices"])
def input_kernel(request):
    """Runs a test with each input kernel: one kernel with whole rows in shared memory (1-16 tokens
    per CTA, by M), the two passes over column chunks, and the rotation on tensor cores, whole rows
    a CTA or (Hopper) a permuted copy and slices of positions (float16 and bfloat16 inputs with
    blocks of 16; the others fall back to what auto picks)."""
    dq._C.set_input_kernel(request.param)
    yield request.param
    dq._C.set_input_kernel("auto")


@pytest.fixture(params=["auto", "stream", "32x32", "64x64", "128x128", "wgmma128", "wgmma256", "gemv", "gemv-direct"])
def gemm_tile(request):
    """Runs a test with the tile shape the GEMM picks by size, and with every tile shape forced (by
    size alone each would run only at some M; "gemv" where it cannot run, M > 64, K not a multiple of
    128 or int8 weights, picks by size; "gemv-direct" the same past M = 16)."""
    if request.param.startswith("wgmma") and not dq._C.wgmma_gemm_available():
        pytest.skip("the wgmma GEMM needs a compute capability 9.0 GPU and a build with sm_90a code")
    dq._C.set_gemm_tile(request.param)
    yield request.param
    dq._C.set_gemm_tile("auto")


def outlier_input(m, k, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    x[:, torch.randperm(k, generator=g)[: max(1, k // 50)]] *= 30.0  # outlier channels
    if m > 2:
        x[m // 2] *= 100.0                                               # a massive token
    return x.to(dtype)


def outlier_linear(n, k, bias, seed):
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(n, k, generator=g) * 0.02)
        lin.weight[:, torch.randperm(k, generator=g)[: max(1, k // 20)]] *= 8.0
        if bias:
            lin.bias.copy_(torch.randn(n, generator=g))
    return lin


def poison_next_allocation(*shapes_dtypes, byte=None):
    """Fill the caching allocator's next blocks with NaN (float) or `byte` (integer tensors) so an
    unwritten output shows up."""
    blocks = []
    for s, d in shapes_dtypes:
        if d.is_floating_point:
            blocks.append(torch.full(s, float("nan"), dtype=d, device="cuda"))
        else:  # every int8 value can be a real code: callers compare two runs with different poison
            blocks.append(torch.full(s, byte, dtype=torch.uint8, device="cuda"))
    del blocks


def unpack_codes(qweight, wbits, k):
    if wbits > 4:
        return qweight.to(torch.int64)
    lo = (qweight & 0xF).to(torch.int64)
    hi = ((qweight >> 4) & 0xF).to(torch.int64)
    codes = torch.stack([lo, hi], dim=-1).reshape(qweight.shape[0], -1)[:, :k]
    return torch.where(codes >= 8, codes - 16, codes)


def restore64(y, r_out):
    if r_out is None:
        return y
    nb, bo, _ = r_out.shape
    n = y.shape[1]
    pad = torch.nn.functional.pad(y, (0, nb * bo - n))
    out = torch.einsum("tbi,bij->tbj", pad.reshape(y.shape[0], nb, bo), r_out.double())
    return out.reshape(y.shape[0], nb * bo)[:, :n]


# ---- the input kernel --------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,k,block,static", [
    (1, 256, 16, False), (7, 1000, 16, False), (33, 2048, 16, False), (300, 333, 32, False),
    (5, 4096, 8, False), (17, 640, 16, True), (1025, 1024, 16, False),
    # the row kernel's tokens per CTA grow with M (on 114-132 SMs): 16, 8, 4 and 2 here; rows split
    # over a cluster (Hopper) at 1 token per CTA, and at 2 (one or four chunks a CTA); a row too
    # long for it (the two passes run)
    (2500, 2048, 16, False), (1100, 3072, 16, False), (700, 1000, 16, True), (300, 16384, 16, False),
    (3, 16384, 16, False), (200, 4096, 16, False), (101, 16384, 16, False), (2, 40000, 16, False),
    (600, 6000, 16, False),  # 4 tokens per CTA, 12 chunks each
    (4500, 1000, 16, False), (4500, 1024, 16, False),  # the tensor-core kernel's 32 tokens per CTA
])
def test_input_codes_equal_reference(dtype, m, k, block, static, input_kernel):
    check_input_codes(dtype, m, k, block, static)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("splits", [1, 2, 3, 8])
@pytest.mark.parametrize("m,k", [(33, 2048), (300, 4096), (17, 1024), (5000, 2048)])
def test_input_codes_with_forced_cluster_split(dtype, m, k, splits):
    """The tensor-core input kernel with each token group's blocks over a forced cluster of CTAs
    (Hopper: as many as asked, at most one block of positions per warp a CTA; one CTA elsewhere),
    also where its size would pick none (M = 5000) or another count; what ran is checked."""
    dq._C.set_input_kernel("mma")
    dq._C.set_input_splits(splits)
    try:
        check_input_codes(dtype, m, k, 16, False)
        ran = dq._C.last_input_splits()
    finally:
        dq._C.set_input_kernel("auto")
        dq._C.set_input_splits(0)
    clusters = torch.cuda.get_device_capability()[0] >= 9
    assert ran == (min(splits, k // 16 // 8, 8) if clusters else 1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m,k,static,permute,row_pad", [
    (1, 256, False, True, 0), (33, 2048, False, True, 0), (300, 16384, False, True, 0),
    (257, 4144, False, True, 0),   # 259 blocks: the last CTA of a cluster gets fewer
    (4500, 1024, False, True, 0), (700, 2048, True, True, 0), (131, 16384, False, True, 0),
    (300, 8192, False, True, 0),   # 32 tokens a CTA
    (9000, 512, False, True, 0),   # 64 tokens a CTA, no cluster
    (100, 1024, False, False, 0),  # no permutation: x read in place, no copy
    (70, 4144, False, False, 3),   # ... from rows that are not 16-byte aligned
    (70, 4144, False, True, 3),    # the copy from such rows (element loads)
])
def test_slice_kernels_codes(dtype, m, k, static, permute, row_pad):
    """The slice kernels (Hopper; elsewhere "slices" picks as auto): a permuted copy of x, then 16-64
    tokens a CTA over slices of positions; token counts that leave a CTA's last n-tiles empty."""
    dq._C.set_input_kernel("slices")
    try:
        check_input_codes(dtype, m, k, 16, static, permute=permute, row_pad=row_pad)
        ran = dq._C.last_input_kernel()
    finally:
        dq._C.set_input_kernel("auto")
    if torch.cuda.get_device_capability()[0] >= 9:
        assert ran == "slices"


def check_input_codes(dtype, m, k, block, static, permute=True, row_pad=0):
    """The CUDA input kernels' codes and scales against the reference's, outputs poisoned two ways.
    row_pad > 0: x is a view of wider rows (a row stride that breaks 16-byte alignment)."""
    x = outlier_input(m, k + row_pad, dtype, seed=m + k)[:, :k]
    perm = torch.randperm(k) if permute else None
    r_in = torch.linalg.qr(torch.randn((k + block - 1) // block, block, block, dtype=torch.float64))[0].float()
    scale = torch.tensor([0.05]) if static else None
    for abits in (8, 4):
        ref_codes, ref_scales = torch.ops.duquant.quantize_input(x, perm, r_in, scale, abits)
        runs = []
        for byte in (0x5A, 0xA5):
            poison_next_allocation(((m, k), torch.int8), ((m,), torch.float32), byte=byte)
            x_gpu = torch.empty_strided(x.shape, x.stride(), dtype=dtype, device="cuda").copy_(x)
            runs.append(torch.ops.duquant.quantize_input(x_gpu, None if perm is None else perm.cuda(), r_in.cuda(),
                                                         None if scale is None else scale.cuda(), abits))
        assert torch.equal(runs[0][0], runs[1][0]), "a code was never written (differs with the poison)"
        codes, scales = runs[0][0].cpu(), runs[0][1].cpu()
        assert torch.isfinite(scales).all()
        torch.testing.assert_close(scales, ref_scales, rtol=1e-5, atol=0)
        diff = (codes.to(torch.int32) - ref_codes.to(torch.int32)).abs()
        assert diff.max() <= 1, f"abits={abits}: codes differ by {diff.max()}"
        assert diff.count_nonzero().item() <= max(1, codes.numel() // 1000), \
            f"abits={abits}: {diff.count_nonzero().item()} of {codes.numel()} codes off by one"


# ---- the GEMM and its epilogue, from the kernels' own codes --------------------------------------
CONFIGS = [
    dict(),                                        # W4A8 dynamic, B=Bo=16, permute, restore
    dict(wbits=8),
    dict(wbits=3, abits=4),
    dict(wbits=6, block_out=8),
    dict(block_size=32, block_out=32),
    dict(row_rot="none", permute=False),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "default")
@pytest.mark.parametrize("m,n,k,bias", [
    (1, 256, 512, True), (7, 200, 96, False), (16, 2048, 256, True), (33, 250, 1024, True),
    (129, 512, 384, False), (300, 1000, 2048, True),
    (201, 96, 512, True),  # streaming tiles past M = 128 (N small enough that 32x32 tiles idle SMs)
    (9, 200, 384, False), (16, 1000, 1152, True),  # decode kernel: 16 tokens a column block, N not whole groups
    (50, 1000, 2048, True), (64, 136, 640, False),  # skinny kernel: 64 tokens a CTA, N not whole groups
    (45, 1000, 3104, True),  # streaming tiles for down_proj-like rows: 5 stages, the last 32 wide
])
def test_gemm_matches_float64_from_codes(cfg, m, n, k, bias, gemm_tile):
    check_gemm_against_float64(cfg, m, n, k, bias)


@pytest.mark.parametrize("tile,cfg,m,n,k", [
    ("stream", dict(), 1, 256, 512), ("32x32", dict(), 33, 250, 1024), ("64x64", dict(wbits=8), 129, 512, 384),
    ("128x128", dict(), 300, 1000, 2048), ("gemv", dict(), 50, 1000, 2048), ("gemv-direct", dict(), 9, 200, 384),
    ("wgmma128", dict(), 300, 1000, 2048), ("wgmma128", dict(wbits=3, abits=4), 7, 200, 96),
    ("wgmma256", dict(block_size=32, block_out=32), 600, 136, 640), ("wgmma256", dict(), 129, 512, 384),
    # the wgmma epilogue with every Bo (8, 4 and 2: the scalar restore), and a last k stage cut short
    # after the ring of stages has wrapped (K = 1056: 9 stages of 128, the last 32 wide)
    ("wgmma128", dict(block_out=8), 200, 520, 1056), ("wgmma256", dict(block_size=4, block_out=4), 300, 264, 1056),
    ("wgmma128", dict(block_size=8, block_out=2), 131, 130, 288),
])
def test_forced_tile_is_the_one_that_runs(tile, cfg, m, n, k, forced_gemm):
    """A forced tile that can run is the one launched (last_gemm_tile), so the float64 tests above
    really cover it: a forced choice that cannot run falls back to picking by size silently."""
    if tile.startswith("wgmma") and not dq._C.wgmma_gemm_available():
        pytest.skip("the wgmma GEMM needs a compute capability 9.0 GPU and a build with sm_90a code")
    forced_gemm(tile, 1 if tile == "wgmma128" else 0)  # unsplit (test_wgmma_cluster_split_* covers the split)
    check_gemm_against_float64(cfg, m, n, k, True)
    assert dq._C.last_gemm_tile() == tile


@pytest.mark.parametrize("tile,cfg,m", [("wgmma256", dict(wbits=8), 300), ("gemv", dict(), 65),
                                        ("gemv-direct", dict(), 17)],
                         ids=["wgmma-int8-weights", "gemv-past-64-tokens", "gemv-direct-past-16"])
def test_forced_tile_that_cannot_run_picks_by_size(tile, cfg, m, forced_gemm):
    n, k = 1000, 2048
    forced_gemm("auto", 0)
    check_gemm_against_float64(cfg, m, n, k, True)
    by_size = dq._C.last_gemm_tile()
    assert by_size not in ("", "auto", tile)
    forced_gemm(tile, 0)
    check_gemm_against_float64(cfg, m, n, k, True)
    assert dq._C.last_gemm_tile() == by_size


@pytest.mark.parametrize("k,n,m,splits", [
    (16384, 2048, 256, 2), (2048, 256, 1024, 4), (16384, 2048, 64, 4), (2048, 16384, 33, 1), (1024, 2048, 512, 2),
    (2048, 2048, 129, 2), (2048, 2048, 64, None), (1024, 256, 1024, None), (2048, 256, 256, None),
    (16384, 2048, 32, None),
], ids=["long-rows-m256", "narrow-m1024", "long-rows-m64", "wide-m33", "64-tiles", "m129", "m64", "narrow-short-rows",
        "narrow-m256", "long-rows-m32"])
def test_auto_runs_wgmma_where_it_wins(k, n, m, splits):
    """int_gemm_plan's rule on Hopper: the 128-token wgmma tiles past M = 64 (past 32 on long rows or
    wide layers), not on narrow layers (N = 256) up to M = 256 or with K < 2048 (splits None: another
    kernel); their k split over a cluster of as many CTAs as keep them to half the SMs, at most 8, and
    2 where the tiles alone fill at most half (wgmma_auto_splits): the counts here are for 132 SMs
    (H100 SXM, H200), checked there only."""
    if not dq._C.wgmma_gemm_available():
        pytest.skip("the wgmma GEMM needs a compute capability 9.0 GPU and a build with sm_90a code")
    assert dq._C.gemm_tile() == "auto" and dq._C.gemm_splits() == 0
    layer = dq.DuQuantLinear.from_linear(nn.Linear(k, n, bias=False), dq.Config()).cuda()
    layer(torch.randn(m, k, device="cuda", dtype=torch.bfloat16))
    tile, ran = dq._C.last_gemm_tile(), dq._C.last_gemm_splits()
    if splits is None:
        assert not tile.startswith("wgmma"), tile
        return
    assert tile == "wgmma128"
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    if sms != 132:
        pytest.skip(f"the tile was checked; the split counts are pinned for 132 SMs, this GPU has {sms}")
    assert ran == splits


@pytest.fixture
def forced_gemm():
    """Forces a GEMM tile and split-k count for one test: yields a setter, restores auto after."""
    def force(tile, splits):
        dq._C.set_gemm_tile(tile)
        dq._C.set_gemm_splits(splits)
    yield force
    dq._C.set_gemm_tile("auto")
    dq._C.set_gemm_splits(0)


@pytest.mark.parametrize("tile", ["64x64", "stream"])
@pytest.mark.parametrize("splits", [2, 3, 7])
@pytest.mark.parametrize("cfg,m,n,k", [
    (dict(), 5, 200, 2048), (dict(), 50, 1000, 4096), (dict(wbits=8, block_out=32, block_size=32), 33, 96, 2080),
], ids=["w4a8-small", "w4a8-m50", "w8a8-bo32-odd-k"])
def test_split_k_matches_float64(cfg, m, n, k, tile, splits, forced_gemm, input_kernel):
    """Split-k (64x64 tiles; other tiles ignore a forced count): the k range of each output tile
    over several CTAs, the last one to finish summing the partials; its counters must be clear
    again for the next call (checked by running twice), which each input kernel does."""
    forced_gemm(tile, splits)
    y = check_gemm_against_float64(cfg, m, n, k, True)
    assert torch.equal(y, check_gemm_against_float64(cfg, m, n, k, True)), "a second call differs"


@pytest.mark.parametrize("splits", [2, 3, 4, 8, 64])
@pytest.mark.parametrize("cfg,m,n,k", [
    (dict(), 300, 1000, 2048), (dict(block_out=8), 200, 520, 1056), (dict(block_size=8, block_out=2), 131, 130, 1024),
    (dict(block_size=32, block_out=32), 64, 136, 640), (dict(wbits=3, abits=4), 7, 200, 1024), (dict(), 20, 96, 96),
], ids=["w4a8", "bo8-uneven-stages", "bo2-scalar-restore", "bo32-five-stages", "w3a4-m7", "one-stage"])
def test_wgmma_cluster_split_matches_float64(cfg, m, n, k, splits, forced_gemm):
    """The 128-token wgmma tiles with k split over a cluster (Hopper): each CTA multiplies a run of
    k stages, the partial tiles meet in distributed shared memory and each CTA finishes a share of
    the tokens. A power of two of CTAs, at most 8 and one per k stage of 128 (3 runs as 2, 64 as 8,
    K = 640 on at most 4): what ran is checked, and its output equals the unsplit kernel's bit for
    bit (integer sums, same epilogue). Twice, so nothing depends on state a first call left."""
    if not dq._C.wgmma_gemm_available():
        pytest.skip("the wgmma GEMM needs a compute capability 9.0 GPU and a build with sm_90a code")
    forced_gemm("wgmma128", 1)
    unsplit = check_gemm_against_float64(cfg, m, n, k, True)
    assert (dq._C.last_gemm_tile(), dq._C.last_gemm_splits()) == ("wgmma128", 1)
    forced_gemm("wgmma128", splits)
    y = check_gemm_against_float64(cfg, m, n, k, True)
    expected = 1
    while 2 * expected <= min(splits, (k + 127) // 128, 8):
        expected *= 2
    assert (dq._C.last_gemm_tile(), dq._C.last_gemm_splits()) == ("wgmma128", expected)
    assert torch.equal(y, unsplit), "the split and unsplit wgmma kernels differ"
    assert torch.equal(y, check_gemm_against_float64(cfg, m, n, k, True)), "a second call differs"


@pytest.mark.parametrize("tile,splits", [("wgmma128", 1), ("wgmma128", 4), ("wgmma256", 1)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k,bias", [(300, 1000, 2048, True), (257, 1002, 1024, True), (129, 136, 512, False)],
                         ids=["m300", "n-not-quads", "no-bias"])
def test_wgmma_epilogue_matches_tiles_bitwise(m, n, k, bias, dtype, tile, splits, forced_gemm):
    """The wgmma kernel (and the 64x64 tiles) restore 16-column blocks with R_out in registers
    (restore16_bias_store; unsplit wgmma tiles with 16-byte aligned output rows store by bulk
    copies, restore16_tma_store), the 32x32 tiles with restore_bias_store: the same float
    operations in the same order, so equal outputs bit for bit, in every output dtype, with and
    without bias, where N leaves a partial column quad (1002: element stores in 16-bit) or a
    partial box (1000, 136), split over a cluster or not. Outputs poisoned first."""
    if not dq._C.wgmma_gemm_available():
        pytest.skip("the wgmma GEMM needs a compute capability 9.0 GPU and a build with sm_90a code")
    layer = dq.DuQuantLinear.from_linear(outlier_linear(n, k, bias, seed=m + n), dq.Config()).cuda()
    x = outlier_input(m, k, dtype, seed=m).cuda()
    outputs = {}
    for which, count in ((tile, splits), ("64x64", 1), ("32x32", 1)):
        forced_gemm(which, count)
        poison_next_allocation(((m, n), dtype))
        outputs[which] = layer(x)
        assert (dq._C.last_gemm_tile(), dq._C.last_gemm_splits()) == (which, count)
    assert torch.isfinite(outputs[tile]).all(), "an output element was never written"
    assert torch.equal(outputs[tile], outputs["32x32"]), "the wgmma and restore_bias_store epilogues differ"
    assert torch.equal(outputs["64x64"], outputs["32x32"]), "the 64x64 and 32x32 tiles' epilogues differ"


@pytest.mark.parametrize("tile", ["gemv", "gemv-direct"])
@pytest.mark.parametrize("splits", [0, 2, 3, 7, 8])
@pytest.mark.parametrize("cfg,m,n,k", [
    (dict(), 1, 200, 8192), (dict(), 13, 96, 4096), (dict(block_size=32, block_out=32), 4, 256, 2048),
    (dict(wbits=3, abits=6), 16, 2048, 4096), (dict(), 3, 9000, 1024), (dict(), 24, 300, 16384),
    (dict(), 40, 300, 16384), (dict(block_size=32, block_out=32), 64, 96, 1024),
], ids=["m1-long-rows", "m13", "bo32", "w3a6-m16", "m3-wide", "m24-long-rows", "m40-long-rows", "m64-bo32"])
def test_gemv_cluster_split_matches_float64(cfg, m, n, k, splits, tile, forced_gemm, input_kernel):
    """The skinny kernel with its k range split over a cluster of CTAs (Hopper; elsewhere one CTA),
    each CTA finishing a share of the tokens from every CTA's partials through distributed shared
    memory: by size (0) and forced, odd counts too (7 of 8 chunks leaves CTAs without any), codes
    staged and direct (past M = 16 direct picks by size). By size: m3-wide takes staged codes (direct
    would need two waves of CTAs), m24-long-rows the 32-token staged kernel, the others direct up to
    M = 16. Twice, so nothing depends on state a first call left; and bit for bit the streaming
    tiles' output (integer sums, same epilogue)."""
    forced_gemm(tile, splits)
    y = check_gemm_against_float64(cfg, m, n, k, True)
    assert torch.equal(y, check_gemm_against_float64(cfg, m, n, k, True)), "a second call differs"
    forced_gemm("stream", 0)
    assert torch.equal(y, check_gemm_against_float64(cfg, m, n, k, True)), "gemv and the streaming tiles differ"


def check_gemm_against_float64(cfg, m, n, k, bias):
    """A CUDA layer's output against float64 from the kernels' own activation codes; returns it."""
    config = dq.Config(**cfg)
    layer = dq.DuQuantLinear.from_linear(outlier_linear(n, k, bias, seed=n * k + m), config).cuda()
    assert layer.execution_path == "cuda", layer.execution_path
    x = outlier_input(m, k, torch.float32, seed=m).cuda()
    codes, s_t = torch.ops.duquant.quantize_input(x, layer.perm, layer.r_in, None, config.abits)
    poison_next_allocation(((m, n), torch.float32))
    y = layer(x).cpu().double()
    assert torch.isfinite(y).all(), "an output element was never written"
    w = unpack_codes(layer.qweight.cpu(), config.wbits, k).double() * layer.w_scale.cpu().double()[:, None]
    expect = restore64((codes.cpu().double() * s_t.cpu().double()[:, None]) @ w.T,
                       None if layer.r_out is None else layer.r_out.cpu())
    if layer.bias is not None:
        expect = expect + layer.bias.cpu().double()
    err = (y - expect).norm() / expect.norm()
    assert err < 1e-5, f"relative error {err:.3g}"
    return y


# ---- whole layers against the reference path -----------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 5, 64, 257, 1100, 2200])
@pytest.mark.parametrize("cfg", [dict(), dict(wbits=8), dict(act="static", calib_steps=2), dict(abits=0)],
                         ids=["w4a8", "w8a8", "static", "w4a16"])
def test_layer_matches_reference(dtype, m, cfg, input_kernel):
    k, n = 1024, 768
    lin = outlier_linear(n, k, True, seed=m)
    layer = dq.DuQuantLinear.from_linear(lin, dq.Config(**cfg))
    if layer.config.needs_calibration:
        for s in range(2):
            layer(outlier_input(64, k, torch.float32, seed=100 + s))
        assert layer.calibrated
    assert_cuda_matches_reference(layer, outlier_input(m, k, dtype, seed=m + 1))


def assert_cuda_matches_reference(layer, x):
    """The CPU layer (reference path, float32) against its CUDA copy (fast path) on x, the output
    poisoned first. Float32 in: only summation order and rare boundary codes differ. 16-bit out:
    one rounding."""
    m, n = x.shape[0], layer.out_features
    ref = layer(x.float()).double()
    gpu = layer.cuda()
    assert "path=cuda" in repr(gpu)
    poison_next_allocation(((m, n), x.dtype))
    y = gpu(x.cuda())
    assert y.dtype == x.dtype and y.shape == (m, n)
    assert torch.isfinite(y).all()
    err = ((y.double().cpu() - ref).norm() / ref.norm()).item()
    tol = 2e-4 if x.dtype == torch.float32 else 8e-3
    assert err < tol, f"relative error {err:.3g} against the reference path"


@pytest.mark.parametrize("cfg", [dict(), dict(wbits=8), dict(abits=0)], ids=["w4a8", "w8a8", "w4a16"])
@pytest.mark.parametrize("wide", [False, True], ids=["narrow", "wide"])
@pytest.mark.parametrize("tile", ["auto", "stream"])
def test_long_rows_small_batch(cfg, wide, tile, forced_gemm):
    """K >= 8192 at M <= 16 (a down_proj at decode): W4A8 runs the register-streaming decode kernel by
    default; the streaming tiles take their deepest pipeline, whose widest once asked for more shared
    memory than an SM has and failed to launch."""
    forced_gemm(tile, 0)
    k, n = 8192, 96
    config = dq.Config(block_size=32, block_out=32, **cfg) if wide else dq.Config(**cfg)
    layer = dq.DuQuantLinear.from_linear(outlier_linear(n, k, True, seed=31), config)
    assert_cuda_matches_reference(layer, outlier_input(5, k, torch.bfloat16, seed=32))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m,n,k,cfg", [
    (1, 256, 512, dict()), (7, 200, 96, dict(wbits=3)), (33, 250, 1024, dict(block_out=8)),
    (129, 512, 384, dict(row_rot="none", permute=False)), (300, 1000, 2048, dict(block_size=32, block_out=32)),
])
def test_weight_only_matches_float64(dtype, m, n, k, cfg, gemm_tile, weight_only_path):
    """W4A16: the fused GEMM against float64 from the same 16-bit transformed activations."""
    weight_only_path("fused")
    config = dq.Config(abits=0, **cfg)
    layer = dq.DuQuantLinear.from_linear(outlier_linear(n, k, True, seed=n + k), config)
    x = outlier_input(m, k, dtype, seed=m)
    # The kernel rounds the float32 x' to x's dtype; a float64 emulation of that input.
    perm = layer.perm if layer.perm is not None else torch.arange(k)
    xt = restore64(x.double()[:, perm], layer.r_in).to(dtype).double()  # same block product as the restore
    w = unpack_codes(layer.qweight, config.wbits, k).double() * layer.w_scale.double()[:, None]
    expect = restore64(xt @ w.T, layer.r_out) + layer.bias.double()
    gpu = layer.cuda()
    assert gpu.execution_path == "cuda"
    poison_next_allocation(((m, n), dtype))
    y = gpu(x.cuda())
    assert y.dtype == dtype and torch.isfinite(y).all()
    err = ((y.double().cpu() - expect).norm() / expect.norm()).item()
    assert err < 4e-3, f"relative error {err:.3g}"


@pytest.fixture
def weight_only_path():
    """Forces the weight-only path for one test (set_weight_only_path), back to "auto" after it."""
    yield dq._C.set_weight_only_path
    dq._C.set_weight_only_path("auto")


def weight_only_float64(layer, x):
    """A weight-only layer in float64 from its codes: x~ R_in, codes x scales, restore, bias."""
    k = layer.in_features
    perm = layer.perm if layer.perm is not None else torch.arange(k)
    xt = restore64(x.double()[:, perm], layer.r_in)
    w = unpack_codes(layer.qweight, layer.config.wbits, k).double() * layer.w_scale.double()[:, None]
    y = restore64(xt @ w.T, layer.r_out)
    return y + layer.bias.double() if layer.bias is not None else y


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 5, 130, 300])
@pytest.mark.parametrize("n,k,cfg", [
    (768, 1024, dict()), (250, 512, dict(wbits=8)), (200, 96, dict(wbits=3)), (96, 256, dict(wbits=6, block_out=4)),
    (130, 384, dict(block_out=8, bias=False)), (64, 160, dict(row_rot="none", permute=False)),
    (48, 4096, dict(block_out=1)),
    # Bo = 2 (N = 100: float32 rows leave in 16-byte stores but for the last tile, 16-bit ones element-wise)
    (100, 256, dict(block_out=2)),
])
def test_weight_only_dense_matches_float64(dtype, m, n, k, cfg, weight_only_path):
    """The dense-weight path (permutation, rotations, scales and restore folded into one weight,
    then cuBLAS) against float64 from the codes, its scratch and output poisoned first; float32
    input and wbits 5..8 run it by default, as nothing else can."""
    cfg = dict(cfg)
    bias = cfg.pop("bias", True)
    weight_only_path("dense")
    layer = dq.DuQuantLinear.from_linear(outlier_linear(n, k, bias, seed=n + k), dq.Config(abits=0, **cfg))
    x = outlier_input(m, k, dtype, seed=m)
    expect = weight_only_float64(layer, x)
    gpu = layer.cuda()
    assert gpu.execution_path == "cuda"
    poison_next_allocation(((k * n + n,), dtype), ((m, n), dtype))  # the dense weight's scratch, the output
    y = gpu(x.cuda())
    assert dq._C.last_weight_only_path() == "dense"
    assert y.dtype == dtype and y.shape == (m, n) and torch.isfinite(y).all()
    err = ((y.double().cpu() - expect).norm() / expect.norm()).item()
    assert err < (2e-5 if dtype == torch.float32 else 4e-3), f"relative error {err:.3g}"
    if dtype != torch.float32 and cfg.get("wbits", 4) <= 4:  # the fused GEMM can run these too
        weight_only_path("auto")
        gpu(x.cuda())
        assert dq._C.last_weight_only_path() == ("dense" if m >= 128 else "fused")


def test_weight_only_dense_needs_blocks_of_16():
    """Where neither weight-only kernel takes the layer, the reference path runs and says why."""
    layer = dq.DuQuantLinear.from_linear(outlier_linear(64, 256, True, 5), dq.Config(abits=0, wbits=8, block_size=32))
    x = outlier_input(3, 256, torch.bfloat16, 6)
    ref = layer(x.float()).double()
    gpu = layer.cuda()
    assert gpu.execution_path == ("reference (weight-only wbits 5..8 runs the dense-weight kernel, which takes "
                                  "block_size 16 and block_out dividing 16)")
    assert ((gpu(x.cuda()).double().cpu() - ref).norm() / ref.norm()).item() < 8e-3


def test_weight_only_dense_in_cuda_graph_and_compiled(weight_only_path):
    weight_only_path("dense")
    model = nn.Sequential()
    model.add_module("up_proj", outlier_linear(384, 512, True, 21))
    model.add_module("act", nn.GELU())
    model.add_module("down_proj", outlier_linear(256, 384, False, 22))
    dq.quantize_(model, dq.Config(abits=0))
    model = model.cuda()
    x = outlier_input(200, 512, torch.bfloat16, 23).cuda()
    eager = model(x)
    assert dq._C.last_weight_only_path() == "dense"
    graph, static_x, static_y = captured(model, x)
    x2 = outlier_input(200, 512, torch.bfloat16, 24).cuda()
    replay(graph, static_x, x2)
    assert torch.equal(static_y, model(x2))
    if hasattr(torch, "compile"):  # one layer: inductor's own GELU need not match eager's bits
        layer = model.up_proj
        assert torch.equal(torch.compile(layer, fullgraph=True)(x), layer(x))


def test_leading_dims_and_noncontiguous_input():
    layer = dq.DuQuantLinear.from_linear(outlier_linear(256, 512, True, 3), dq.Config()).cuda()
    x = outlier_input(2 * 3 * 5, 1024, torch.bfloat16, 4).cuda()[:, ::2].reshape(2, 3, 5, 512)
    y = layer(x)
    assert y.shape == (2, 3, 5, 256)
    ref = layer.cpu()(x.cpu().float()).double()
    assert ((y.double().cpu() - ref).norm() / ref.norm()).item() < 8e-3


@pytest.mark.parametrize("m", [1, 64])
def test_op_reads_views_of_the_layer_densely(m):
    """torch.ops.duquant.linear handed views (a transposed-strided qweight, an r_out 4 bytes off
    16-byte alignment, which the tile kernels copy 16 bytes at a time): the kernels read dense,
    aligned copies, so the output is the layer's own; a wrong shape is refused by name instead of
    read past."""
    layer = dq.DuQuantLinear.from_linear(outlier_linear(96, 256, True, 5), dq.Config()).cuda()
    x = outlier_input(m, 256, torch.bfloat16, 6).cuda()
    expect = layer(x)
    qweight = layer.qweight.t().contiguous().t()
    r_out = torch.empty(layer.r_out.numel() + 1, device="cuda")[1:].view_as(layer.r_out)
    r_out.copy_(layer.r_out)
    assert not qweight.is_contiguous() and r_out.data_ptr() % 16 != 0

    def call(qw, ws, ro):
        return torch.ops.duquant.linear(x, qw, ws, layer.perm, layer.r_in, ro, layer.bias, None,
                                        256, 4, 8, "dynamic", True)
    assert torch.equal(call(qweight, layer.w_scale, r_out), expect)
    with pytest.raises(ValueError, match=r"'w_scale' should be Float \[96\]"):
        call(layer.qweight, layer.w_scale[:95], layer.r_out)


def test_reference_fallbacks_say_why():
    k = 1000  # not a multiple of 32
    layer = dq.DuQuantLinear.from_linear(outlier_linear(64, k, False, 5), dq.Config()).cuda()
    assert layer.execution_path.startswith("reference (in_features=1000")
    y = layer(outlier_input(3, k, torch.float16, 6).cuda())
    assert torch.isfinite(y).all()
    sc = dq.DuQuantLinear.from_linear(outlier_linear(64, 256, False, 5), dq.Config(act="static_channel")).cuda()
    assert "static_channel" in sc.execution_path
    # rows past 2^22 elements: the GEMM tiles index their rows in 32 bits
    long_k = (1 << 22) + 32
    lin = nn.Linear(long_k, 8, bias=False)
    long_rows = dq.DuQuantLinear.from_linear(lin, dq.Config(row_rot="none", permute=False)).cuda()
    assert long_rows.execution_path == f"reference (in_features={long_k} above the kernels' 2^22)"
    assert torch.isfinite(long_rows(torch.randn(2, long_k, device="cuda", dtype=torch.bfloat16))).all()
    del lin, long_rows
    wide_config = dq.Config(block_size=512, block_out=16)
    wide = dq.DuQuantLinear.from_linear(outlier_linear(64, 1024, False, 7), wide_config).cuda()
    assert wide.execution_path.startswith("reference (block_size=512"), wide.execution_path
    x = outlier_input(3, 1024, torch.bfloat16, 8)
    ref = wide.cpu()(x.float())
    y = wide.cuda()(x.cuda())
    assert ((y.double().cpu() - ref.double()).norm() / ref.double().norm()).item() < 8e-3


# ---- torch.compile, CUDA graphs, opcheck ---------------------------------------------------------
def small_model():
    model = nn.Sequential()
    model.add_module("up_proj", outlier_linear(1024, 512, True, 7))
    model.add_module("act", nn.GELU())
    model.add_module("down_proj", outlier_linear(512, 1024, False, 8))
    dq.quantize_(model, dq.Config())
    return model.cuda()


def test_cuda_graph_capture_and_replay():
    model = small_model()
    x = outlier_input(50, 512, torch.bfloat16, 9).cuda()
    eager = model(x)
    graph, static_x, static_y = captured(model, x)
    x2 = outlier_input(50, 512, torch.bfloat16, 10).cuda()
    replay(graph, static_x, x2)
    assert torch.equal(static_y, model(x2))
    replay(graph, static_x, x)
    assert torch.equal(static_y, eager)


@pytest.mark.skipif(not hasattr(torch, "compile"), reason="torch.compile needs PyTorch 2")
def test_torch_compile_fullgraph():
    model = small_model()
    x = outlier_input(33, 512, torch.bfloat16, 11).cuda()
    eager = model(x)
    compiled = torch.compile(model, fullgraph=True)
    assert torch.equal(compiled(x), eager)


@pytest.mark.skipif(not hasattr(torch.library, "opcheck"), reason="torch.library.opcheck needs PyTorch 2.4+")
def test_opcheck():
    layer = dq.DuQuantLinear.from_linear(outlier_linear(128, 256, True, 12), dq.Config()).cuda()
    x = outlier_input(9, 256, torch.bfloat16, 13).cuda()
    args = (x, layer.qweight, layer.w_scale, layer.perm, layer.r_in, layer.r_out, layer.bias, None,
            256, 4, 8, "dynamic", True)
    torch.library.opcheck(torch.ops.duquant.linear.default, args)
    torch.library.opcheck(torch.ops.duquant.quantize_input.default, (x, layer.perm, layer.r_in, None, 8))
