"""Packing speed: the prototype's per-block SVD loop vs our GPU packer (cuSOLVER) vs our CPU packer (Eigen).

Stacks (random heavy-tailed weights with outlier columns):
  (a) Gemma-2B-shaped: 18 x {q 2048->2048, k,v 2048->256, o 2048->2048, gate,up 2048->16384, down 16384->2048}
  (b) 300M action expert: 18 x {q 1024->2048, k,v 1024->256, o 2048->1024, gate,up 1024->4096, down 4096->1024}
The prototype method (seeds: one torch.linalg.svd per 16-wide block on the GPU, results to the host
each time) is timed on one layer of each distinct shape and multiplied by the layer count; ours is
timed on every layer. CPU packer runs with --cpu-threads threads (2 = the CI machine).

Usage: python benchmarks/pack_speed.py [--cpu-threads 2] [--skip-prototype] [--cpu-stack expert|both|none]
"""
import argparse
import os
import time

import torch

import duquant_ext as dq

GEMMA_2B = [(2048, 2048), (2048, 256), (2048, 256), (2048, 2048), (2048, 16384), (2048, 16384), (16384, 2048)]
EXPERT = [(1024, 2048), (1024, 256), (1024, 256), (2048, 1024), (1024, 4096), (1024, 4096), (4096, 1024)]
DEPTH = 18


def weight(k, n, device, seed):
    g = torch.Generator(device=device).manual_seed(seed)
    w = torch.randn(n, k, generator=g, device=device) * 0.02
    w[:, :: max(1, k // 16)] *= 8.0
    return w


def prototype_pack(w, block=16):
    """The seeds' method: per-block SVDs in a Python loop, each result copied to the host."""
    n, k = w.shape
    r_in, r_out = [], []
    for c in range(0, k, block):
        u = torch.linalg.svd(w[:, c:c + block].T.float(), full_matrices=True)[0]
        r_in.append(u.cpu().numpy())
    for r in range(0, n, block):
        u = torch.linalg.svd(w[r:r + block, :].float(), full_matrices=True)[0]
        r_out.append(u.cpu().numpy())
    return r_in, r_out


def time_stack(shapes, fn, device, depth=DEPTH, sample_only=False):
    total = 0.0
    for i, (k, n) in enumerate(shapes):
        w = weight(k, n, device, i)
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        reps = 1 if sample_only else depth
        for _ in range(reps):
            fn(w)
        if device == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        total += dt * (depth if sample_only else 1)
    return total


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu-threads", type=int, default=2)
    ap.add_argument("--skip-prototype", action="store_true")
    ap.add_argument("--cpu-stack", choices=["expert", "both", "none"], default="expert")
    args = ap.parse_args()
    cfg = dq.Config()
    have_gpu = torch.cuda.is_available()
    gpu_name = torch.cuda.get_device_name() if have_gpu else "none"
    print(f"pack speed, {time.strftime('%Y-%m-%d')}, GPU: {gpu_name}, torch {torch.__version__}, "
          f"CPU packer threads: {args.cpu_threads}, eigensolver: {os.environ.get('DUQUANT_CUDA_EIGENSOLVER', 'default')}")
    rows = []
    for name, shapes in (("Gemma-2B stack (126 layers)", GEMMA_2B), ("action expert (126 layers)", EXPERT)):
        proto = ours_gpu = ours_cpu = float("nan")
        if have_gpu:
            dq.pack_linear(weight(256, 256, "cuda", 0), None, cfg)  # warm-up: handles, kernels
            ours_gpu = time_stack(shapes, lambda w: dq.pack_linear(w, None, cfg), "cuda")
            if not args.skip_prototype:
                prototype_pack(weight(256, 256, "cuda", 0))
                proto = time_stack(shapes, prototype_pack, "cuda", sample_only=True)
        if args.cpu_stack == "both" or (args.cpu_stack == "expert" and shapes is EXPERT):
            torch.set_num_threads(args.cpu_threads)
            ours_cpu = time_stack(shapes, lambda w: dq.pack_linear(w, None, cfg), "cpu")
        rows.append((name, proto, ours_gpu, ours_cpu))
    print(f"{'stack':<30}{'prototype (GPU SVD loop) s':>28}{'ours GPU s':>12}{'ours CPU s':>12}{'GPU speedup':>13}")
    for name, proto, g, c in rows:
        print(f"{name:<30}{proto:>28.2f}{g:>12.3f}{c:>12.2f}{proto / g:>12.0f}x")
    name, proto, g, _ = rows[0]
    print(f"headline: GPU packer is {proto / g:.0f}x faster than the prototype's method on the Gemma-2B stack")


if __name__ == "__main__":
    main()
