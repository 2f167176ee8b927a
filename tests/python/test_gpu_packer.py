"""GPU packer (cuSOLVER) against the CPU packer (Eigen): the same packs. Skips without a GPU."""
import copy

import pytest
import torch

import duquant_ext as dq

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: GPU packer tests need one")


def outlier_weight(n, k, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.02
    w[:, torch.randperm(k, generator=g)[: k // 20]] *= 10
    return w


def compare_rotations(gpu, cpu, gram_blocks):
    """Blocks whose eigenvalues are separated must match entrywise; near-equal eigenvalues only
    determine a subspace, so there we compare the spanned subspaces' projectors."""
    gpu, cpu = gpu.double().cpu(), cpu.double()
    for b in range(cpu.shape[0]):
        ev = torch.linalg.eigvalsh(gram_blocks[b]).flip(0)
        gaps = (ev[:-1] - ev[1:]).abs() / ev.abs().max().clamp_min(1e-30)
        if bool((gaps > 1e-6).all()):
            assert (gpu[b] - cpu[b]).abs().max() < 1e-5, f"block {b}"
        else:
            p_gpu, p_cpu = gpu[b] @ gpu[b].T, cpu[b] @ cpu[b].T
            assert (p_gpu - p_cpu).abs().max() < 1e-5, f"block {b} (subspace)"


@pytest.mark.parametrize("n,k,cfg", [
    (256, 512, dict()),
    (200, 333, dict(block_out=8)),            # short blocks on both sides
    (128, 256, dict(wbits=8, block_size=32)),
    (96, 640, dict(block_size=64, block_out=48)),  # beyond syevj's 32: XsyevBatched
])
def test_gpu_pack_equals_cpu_pack(n, k, cfg):
    w = outlier_weight(n, k, n + k)
    bias = torch.randn(n)
    config = dq.Config(**cfg)
    cpu = dq.pack_linear(w, bias, config)
    gpu = dq.pack_linear(w.cuda(), bias.cuda(), config)
    assert gpu.qweight.is_cuda and gpu.r_in.is_cuda
    assert torch.equal(gpu.perm.cpu(), cpu.perm)
    wp = w.double()[:, cpu.perm]
    bsz = config.block_size
    pad = (-k) % bsz
    blocks = torch.nn.functional.pad(wp, (0, pad)).reshape(n, -1, bsz).permute(1, 2, 0)
    compare_rotations(gpu.r_in, cpu.r_in, blocks @ blocks.transpose(1, 2))
    same = (gpu.qweight.cpu() == cpu.qweight).float().mean().item()
    assert same >= 0.999, f"only {same:.5f} of weight bytes equal"
    assert torch.allclose(gpu.w_scale.cpu(), cpu.w_scale, rtol=1e-6, atol=0)


def test_quantize_on_gpu_runs_and_tracks_cpu():
    torch.manual_seed(0)
    model = torch.nn.Sequential()
    model.add_module("q_proj", torch.nn.Linear(512, 512))
    model.add_module("down_proj", torch.nn.Linear(512, 256))
    cpu_model = copy.deepcopy(model)
    dq.quantize_(cpu_model, dq.Config())
    model = model.cuda()
    dq.quantize_(model, dq.Config())
    x = torch.randn(7, 512)
    y_gpu = model(x.cuda()).cpu()
    y_cpu = cpu_model(x)
    assert ((y_gpu - y_cpu).norm() / y_cpu.norm()).item() < 1e-3
