"""Which GEMM tile shape and split-k count are fastest where: every W4A8 layer shape of
linear_speed.py at small and medium token counts, timed with each tile shape and split count forced
(_C.set_gemm_tile, _C.set_gemm_splits; only 64x64 tiles, and over a cluster the decode kernel and
the 128-token wgmma tiles, split) and with the automatic choice,
against bf16 nn.Linear. Each tile column shows its fastest split count as time/splits. Timed as linear_speed.py times (CUDA graphs, weights replicated past
the L2 so they come from DRAM as in a real model). A tuning aid for the tile rule in
kernels/src/int_gemm.cu; benchmarks/linear_speed.py is the benchmark of record.

    PYTHONPATH=build/python python3 benchmarks/gemm_tile_sweep.py [--m 1,16,50,64,128,256] [--splits 1,2,4,8]
        [--tiles gemv,stream] [--shapes 2048->16384,16384->2048]
"""
import argparse

import torch
from torch import nn

import duquant_ext as dq
from linear_speed import chosen_shapes, replicas, time_graph

TILES = ["gemv", "gemv-direct", "stream", "32x32", "64x64", "128x128"] + (["wgmma128", "wgmma256"] if dq._C.wgmma_gemm_available() else [])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--m", default="1,16,50,64,128,256", help="token counts (comma-separated)")
    ap.add_argument("--splits", default="1,2,4,8",
                    help="split-k counts to try per tile (comma-separated; 0: the count picked by size)")
    ap.add_argument("--tiles", default=",".join(TILES), help="tile shapes to force (comma-separated)")
    ap.add_argument("--shapes", default="", help="only these layer shapes, as K->N (comma-separated; default: all)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--rotate-l2", type=float, default=4.0,
                    help="replicate weights until the copies span this many L2 sizes")
    ap.add_argument("--max-copies", type=int, default=512)
    args = ap.parse_args()
    split_counts = [int(v) for v in args.splits.split(",")]
    tiles = [v for v in args.tiles.split(",") if v]
    unknown = sorted(set(tiles) - set(TILES))
    if unknown:
        ap.error(f"--tiles: unknown or unavailable here: {', '.join(unknown)} (choose from {', '.join(TILES)})")
    shapes = chosen_shapes(ap, args.shapes)
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to time")
        return
    props = torch.cuda.get_device_properties(0)
    rotate_bytes = args.rotate_l2 * getattr(props, "L2_cache_size", 50 << 20)
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, W4A8, bf16 input; µs per call "
          f"(median of {args.repeats}); tile columns: fastest time/its split count; 1-split: fastest unsplit; "
          f"best = fastest forced tile and split")
    print(f"{'K->N':>12} {'M':>4} {'bf16':>7} " + " ".join(f"{t:>10}" for t in tiles)
          + f" {'1-split':>8} {'auto':>7} {'best':>10} {'auto/best':>9}", flush=True)
    try:
        for k, n in shapes:
            lin = nn.Linear(k, n, bias=False)
            layer = dq.DuQuantLinear.from_linear(lin, dq.Config()).cuda()
            bf16 = lin.to(device="cuda", dtype=torch.bfloat16)
            ours, theirs = replicas(layer, rotate_bytes, args.max_copies), replicas(bf16, rotate_bytes, args.max_copies)
            for m in [int(v) for v in args.m.split(",")]:
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                with torch.no_grad():
                    t_bf16 = time_graph(theirs, x, args.repeats, 2.0)[0]
                    t = {}
                    for tile in tiles:  # the switches are read when a graph is captured
                        for splits in split_counts if tile in ("64x64", "gemv", "gemv-direct", "wgmma128") else [1]:  # the ones that split
                            dq._C.set_gemm_tile(tile)
                            dq._C.set_gemm_splits(splits)
                            took = time_graph(ours, x, args.repeats, 2.0)[0]
                            ran = dq._C.last_gemm_splits() or splits  # a count asked for may run as another
                            t[tile, ran] = min(took, t.get((tile, ran), took))
                    dq._C.set_gemm_tile("auto")
                    dq._C.set_gemm_splits(0)
                    t_auto = time_graph(ours, x, args.repeats, 2.0)[0]
                cells = []
                for tile in tiles:
                    s_best = min((c for tl, c in t if tl == tile), key=lambda c: t[tile, c])
                    cells.append(f"{t[tile, s_best]:>7.1f}/{s_best:<2}")
                unsplit = min((v for (tl, c), v in t.items() if c == 1), default=float("nan"))
                best = min(t, key=t.get)
                print(f"{k:>5}->{n:<6} {m:>4} {t_bf16:>7.1f} " + " ".join(cells) + f" {unsplit:>8.1f} {t_auto:>7.1f} "
                      f"{best[0] + '/' + str(best[1]):>10} {t_auto / t[best]:>9.2f}", flush=True)
            del ours, theirs
    finally:
        dq._C.set_gemm_tile("auto")
        dq._C.set_gemm_splits(0)


if __name__ == "__main__":
    main()
