"""Which GEMM tile shape is fastest where: every W4A8 layer shape of linear_speed.py at small and
medium token counts, timed with each tile shape forced (_C.set_gemm_tile) and with the automatic
choice, against bf16 nn.Linear. Timed as linear_speed.py times (CUDA graphs, weights replicated past
the L2 so they come from DRAM as in a real model). A tuning aid for the tile rule in
kernels/src/int_gemm.cu; benchmarks/linear_speed.py is the benchmark of record.

    PYTHONPATH=build/python python3 benchmarks/gemm_tile_sweep.py [--m 16,32,50,64,128,256]
"""
import argparse
import copy
import math

import torch
from torch import nn

import duquant_ext as dq
from linear_speed import EXPERT_SHAPES, LLM_SHAPES, module_bytes, time_graph

TILES = ["stream", "32x32", "64x64", "128x128"]


def replicas(module, rotate_bytes, max_copies):
    count = max(1, min(max_copies, math.ceil(rotate_bytes / max(1, module_bytes(module)))))
    return [module] + [copy.deepcopy(module) for _ in range(count - 1)]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--m", default="16,32,50,64,128,256", help="token counts (comma-separated)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--rotate-l2", type=float, default=4.0,
                    help="replicate weights until the copies span this many L2 sizes")
    ap.add_argument("--max-copies", type=int, default=512)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to time")
        return
    props = torch.cuda.get_device_properties(0)
    rotate_bytes = args.rotate_l2 * getattr(props, "L2_cache_size", 50 << 20)
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, W4A8, bf16 input; µs per call "
          f"(median of {args.repeats}); best = fastest forced tile")
    print(f"{'K->N':>12} {'M':>4} {'bf16':>7} " + " ".join(f"{t:>8}" for t in TILES)
          + f" {'auto':>7} {'best':>8} {'auto/best':>9}", flush=True)
    try:
        for k, n in LLM_SHAPES + EXPERT_SHAPES:
            lin = nn.Linear(k, n, bias=False)
            layer = dq.DuQuantLinear.from_linear(lin, dq.Config()).cuda()
            bf16 = lin.to(device="cuda", dtype=torch.bfloat16)
            ours, theirs = replicas(layer, rotate_bytes, args.max_copies), replicas(bf16, rotate_bytes, args.max_copies)
            for m in [int(v) for v in args.m.split(",")]:
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                with torch.no_grad():
                    t_bf16 = time_graph(theirs, x, args.repeats, 2.0)[0]
                    t = {}
                    for tile in TILES + ["auto"]:  # the switch is read when a graph is captured
                        dq._C.set_gemm_tile(tile)
                        t[tile] = time_graph(ours, x, args.repeats, 2.0)[0]
                best = min(TILES, key=lambda name: t[name])
                print(f"{k:>5}->{n:<6} {m:>4} {t_bf16:>7.1f} " + " ".join(f"{t[name]:>8.1f}" for name in TILES)
                      + f" {t['auto']:>7.1f} {best:>8} {t['auto'] / t[best]:>9.2f}", flush=True)
            del ours, theirs
    finally:
        dq._C.set_gemm_tile("auto")


if __name__ == "__main__":
    main()
