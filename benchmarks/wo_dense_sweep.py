"""Where the weight-only layer (W4A16) should run the fused GEMM and where the dense weight: every
layer shape of linear_speed.py at each token count, timed with each path forced
(_C.set_weight_only_path "fused": input kernel + W4A16 GEMM with the restore in its epilogue;
"dense": one kernel folds the permutation, rotations, scales and restore into a bf16 weight, then
cuBLAS) and with the automatic choice, against bf16 nn.Linear. Timed as linear_speed.py times (CUDA
graphs, weights replicated past the L2 so they come from DRAM as in a real model). A tuning aid for
kDenseMinTokens in src/fast/fast_path_cuda.cpp; benchmarks/linear_speed.py is the benchmark of record.

    PYTHONPATH=build/python python3 benchmarks/wo_dense_sweep.py [--m 16,64,128,256,1024,4096]
        [--shapes 2048->2048,1024->256] [--out results/wo_dense_sweep_h200.txt]
"""
import argparse
import datetime

import torch
from torch import nn

import duquant_ext as dq
from linear_speed import chosen_shapes, replicas, time_graph
from report import Report


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--m", default="1,16,64,128,256,1024,4096", help="token counts (comma-separated)")
    ap.add_argument("--shapes", default="", help="only these layer shapes, as K->N (comma-separated; default: all)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--rotate-l2", type=float, default=4.0,
                    help="replicate weights until the copies span this many L2 sizes")
    ap.add_argument("--max-copies", type=int, default=512)
    ap.add_argument("--out", default="", help="also write the table to this file")
    args = ap.parse_args()
    shapes = chosen_shapes(ap, args.shapes)
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to time")
        return
    out = Report("wo_dense_sweep")
    props = torch.cuda.get_device_properties(0)
    rotate_bytes = args.rotate_l2 * getattr(props, "L2_cache_size", 50 << 20)
    out(f"# benchmarks/wo_dense_sweep.py on one {torch.cuda.get_device_name()}, torch {torch.__version__}, "
        f"{datetime.datetime.now():%Y-%m-%d %H:%M}; W4A16 (Config(abits=0)), bf16 input, µs per call "
        f"(CUDA graph replay, median of {args.repeats})")
    out("# fused = input kernel + W4A16 GEMM; dense = the dense-weight kernel + cuBLAS; auto = what runs by default")
    out(f"{'K->N':>12} {'M':>5} {'bf16':>8} {'fused':>8} {'dense':>8} {'auto':>8} {'ran':>6} "
        f"{'bf16/fused':>10} {'bf16/dense':>10}")
    try:
        for k, n in shapes:
            lin = nn.Linear(k, n, bias=False)
            layer = dq.DuQuantLinear.from_linear(lin, dq.Config(abits=0)).cuda()
            bf16 = lin.to(device="cuda", dtype=torch.bfloat16)
            ours, theirs = replicas(layer, rotate_bytes, args.max_copies), replicas(bf16, rotate_bytes, args.max_copies)
            for m in [int(v) for v in args.m.split(",")]:
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                t = {}
                with torch.no_grad():
                    t["bf16"] = time_graph(theirs, x, args.repeats, 2.0)[0]
                    for path in ("fused", "dense", "auto"):  # read when a graph is captured
                        dq._C.set_weight_only_path(path)
                        t[path] = time_graph(ours, x, args.repeats, 2.0)[0]
                    ran = dq._C.last_weight_only_path()
                out(f"{k:>5}->{n:<6} {m:>5} {t['bf16']:>8.1f} {t['fused']:>8.1f} {t['dense']:>8.1f} {t['auto']:>8.1f} "
                    f"{ran:>6} {t['bf16'] / t['fused']:>10.2f} {t['bf16'] / t['dense']:>10.2f}")
            del ours, theirs
    finally:
        dq._C.set_weight_only_path("auto")
    out.write(args.out)


if __name__ == "__main__":
    main()
