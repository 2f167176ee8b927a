"""Sibling layers that read one input, side by side: q/k/v of an attention block and gate/up of a
gated MLP, as bf16 nn.Linear, as DuQuant W4A8 layers packed alone (share_inputs=False: each runs
its own input kernel and GEMM), and as DuQuant W4A8 siblings sharing one input transform (the
default: one input kernel and, at small and medium M, one grouped GEMM for the whole group).

Each contender is one call of every layer of the group on the same input, timed as a CUDA graph of
`--calls` back-to-back group calls, median of `--repeats` replays (µs per group call). The input
changes between group calls (a tiny in-place add), so sharing cannot carry codes from one call to
the next.

    PYTHONPATH=build/python python3 benchmarks/sibling_groups.py [--m 1,16,50,64,256,1024] [--out FILE]
"""
import argparse
import sys
import time

import torch
from torch import nn

import duquant_ext as dq
from fast_path_breakdown import graph_time_us  # benchmarks/ is the script's folder
from report import Report


def group_time_us(fn, x, calls, repeats):
    """graph_time_us of fn(x), with x given a new version before each call (x.add_(0.0)): sharing
    cannot carry codes or outputs from one group call to the next."""
    return graph_time_us(lambda: (x.add_(0.0), fn(x)), calls, repeats)

# (label, parent attribute names and shapes): the action expert's (width 1024) and LLMs' (2048, and
# 4096 with 8 KV heads of 128 and an 11008-wide MLP).
GROUPS = [
    ("expert q/k/v", [("q_proj", 1024, 2048), ("k_proj", 1024, 256), ("v_proj", 1024, 256)]),
    ("expert gate/up", [("gate_proj", 1024, 4096), ("up_proj", 1024, 4096)]),
    ("llm q/k/v", [("q_proj", 2048, 2048), ("k_proj", 2048, 256), ("v_proj", 2048, 256)]),
    ("llm gate/up", [("gate_proj", 2048, 16384), ("up_proj", 2048, 16384)]),
    ("llm4096 q/k/v", [("q_proj", 4096, 4096), ("k_proj", 4096, 1024), ("v_proj", 4096, 1024)]),
    ("llm4096 gate/up", [("gate_proj", 4096, 11008), ("up_proj", 4096, 11008)]),
]


def group_module(layers, seed):
    torch.manual_seed(seed)
    parent = nn.Module()
    for name, k, n in layers:
        lin = nn.Linear(k, n, bias=False)
        with torch.no_grad():
            lin.weight.normal_(0, 0.02)
            lin.weight[:, torch.randperm(k)[: k // 64]] *= 3.0
        setattr(parent, name, lin)
    return parent


def solo(layer, x):
    """The layer's own op, unshared."""
    wbits, abits, act = layer._op_args
    return torch.ops.duquant.linear(x, layer.qweight, layer.w_scale, layer.perm, layer.r_in, layer.r_out, layer.bias,
                                    layer.act_scale, layer.in_features, wbits, abits, act, True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--m", default="1,16,50,64,256,1024", help="token counts")
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--out", default=None)
    ap.add_argument("--tiles", default="", help="also time the shared group with each GEMM tile forced "
                    "(_C.set_gemm_tile names, e.g. stream,32x32,64x64): a tuning aid")
    ap.add_argument("--groups", default="", help="only the groups whose label contains one of these (comma list)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("sibling_groups: no CUDA device; this benchmark times GPU kernels (see benchmarks/README.md)")
        return 0
    ms = [int(v) for v in args.m.split(",")]
    out = Report("sibling_groups")

    out(f"# sibling groups, {time.strftime('%Y-%m-%d %H:%M')}, GPU: {torch.cuda.get_device_name()}, torch "
        f"{torch.__version__}; µs per group call (CUDA graph of {args.calls} calls, median of {args.repeats}); "
        f"bf16 input; command: {' '.join(sys.argv)}")
    tiles = [t for t in args.tiles.split(",") if t]
    out(f"{'group':<16}{'M':>6}{'bf16':>9}{'alone':>9}{'shared':>9}{'bf16/shared':>13}{'alone/shared':>14}"
        + "".join(f"{t:>10}" for t in tiles) + "  kernels")
    for gi, (label, layers) in enumerate(GROUPS):
        if args.groups and not any(g in label for g in args.groups.split(",")):
            continue
        bf16 = group_module(layers, gi).cuda().to(torch.bfloat16)
        alone, shared = group_module(layers, gi).cuda(), group_module(layers, gi).cuda()  # packed on the GPU
        dq.quantize_(alone, dq.Config(), include=None, share_inputs=False)
        report = dq.quantize_(shared, dq.Config(), include=None)
        assert report.shared_inputs, "the group was not linked"
        names = [name for name, _, _ in layers]
        k = layers[0][1]
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)

            def run(mod):
                return lambda t: [getattr(mod, n)(t) for n in names]

            with torch.no_grad():
                # Alone and shared pack different transforms: compare shared with its own layers alone.
                y_shared = run(shared)(x)
                same = all(torch.equal(y, solo(getattr(shared, n), x)) for y, n in zip(y_shared, names))
                t = [group_time_us(run(mod), x.clone(), args.calls, args.repeats) for mod in (bf16, alone, shared)]
            tile = dq._C.last_gemm_tile()
            forced = []
            for name in tiles:
                dq._C.set_gemm_tile(name)
                try:
                    forced.append(group_time_us(run(shared), x.clone(), args.calls, args.repeats))
                finally:
                    dq._C.set_gemm_tile("auto")
            note = f"GEMM {tile}" + ("" if same else "  (outputs differ from alone!)")
            out(f"{label:<16}{m:>6}{t[0]:>9.1f}{t[1]:>9.1f}{t[2]:>9.1f}{t[0] / t[2]:>13.2f}{t[1] / t[2]:>14.2f}"
                + "".join(f"{v:>10.1f}" for v in forced) + f"  {note}")
    out.write(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
