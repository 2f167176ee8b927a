"""Accuracy under outliers: plain round-to-nearest W4A8 vs DuQuant in each activation mode.

Layers get activations with a few large outlier channels (x20-x100) and a few massive tokens
(x1000), like the residual streams of LLMs and VLA policies. Weights are heavy-tailed (Student-t),
like trained weights. For each layer shape we report the relative output error
||y_q - y|| / ||y|| against the float64 layer, on a held-out batch after calibrating on 8 batches.
The massive tokens dominate ||y||, so we also report the error over the ordinary tokens alone.

Usage: python benchmarks/accuracy_outliers.py [--tokens 256] [--seed 0]
(runs on the CPU in about a minute; the table in benchmarks/results/ was printed by it)
"""
import argparse
import statistics

import torch

import duquant_ext as dq

SHAPES = [(1024, 2048), (1024, 256), (2048, 1024), (1024, 4096), (4096, 1024), (2048, 2048)]


def make_layer(k, n, gen):
    w = torch.distributions.StudentT(4.0).sample((n, k)) * 0.02
    return torch.nn.Linear(k, n).requires_grad_(False).float().eval(), w


def make_batch(tokens, k, outlier_channels, gen):
    x = torch.randn(tokens, k, generator=gen)
    x[:, outlier_channels] *= torch.empty(len(outlier_channels)).uniform_(20, 100, generator=gen)
    massive = torch.randperm(tokens, generator=gen)[:2]
    x[massive] *= 1000.0
    return x, massive


def rtn_w4a8(w, x):
    """Plain round-to-nearest: per-row int4 weights (absmax scale), per-token int8 activations."""
    s_w = (w.abs().amax(1, keepdim=True) / 7).clamp_min(1e-8)
    wq = (w / s_w).round().clamp(-8, 7) * s_w
    s_x = (x.abs().amax(1, keepdim=True) / 127).clamp_min(1e-8)
    xq = (x / s_x).round().clamp(-128, 127) * s_x
    return xq @ wq.T


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)

    methods = ["RTN W4A8 (no rotation)", "DuQuant W4A8 dynamic", "DuQuant W4A8 static",
               "DuQuant W4A8 static_channel", "DuQuant W4A16 (weight-only)"]
    configs = {
        "DuQuant W4A8 dynamic": dq.Config(),
        "DuQuant W4A8 static": dq.Config(act="static", calib_steps=8),
        "DuQuant W4A8 static_channel": dq.Config(act="static_channel", calib_steps=8),
        "DuQuant W4A16 (weight-only)": dq.Config(abits=0),
    }
    rows = []
    for k, n in SHAPES:
        lin, w = make_layer(k, n, gen)
        lin.weight.copy_(w)
        lin.bias.zero_()
        channels = torch.randperm(k, generator=gen)[:6]
        calib = [make_batch(args.tokens, k, channels, gen)[0] for _ in range(8)]
        x, massive = make_batch(args.tokens, k, channels, gen)
        ordinary = torch.ones(args.tokens, dtype=torch.bool)
        ordinary[massive] = False
        y = x.double() @ w.double().T
        errs = {"RTN W4A8 (no rotation)": (rel(rtn_w4a8(w, x), y), rel(rtn_w4a8(w, x)[ordinary], y[ordinary]))}
        for name, cfg in configs.items():
            layer = dq.DuQuantLinear.from_linear(lin, cfg)
            for b in calib if cfg.needs_calibration else []:
                layer(b)
            out = layer(x)
            errs[name] = (rel(out, y), rel(out[ordinary], y[ordinary]))
        rows.append(((k, n), errs))

    print(f"relative output error, {args.tokens} tokens, 6 outlier channels x20-x100, 2 massive tokens x1000, "
          f"Student-t(4) weights; torch {torch.__version__}")
    header = f"{'layer (in->out)':<16}" + "".join(f"{m:>30}" for m in methods)
    print(header)
    for (k, n), errs in rows:
        print(f"{f'{k}->{n}':<16}" + "".join(f"{errs[m][0]:>14.4f} / {errs[m][1]:<13.4f}" for m in methods))
    print("(each cell: all tokens / ordinary tokens only)")
    med = {m: statistics.median(e[m][1] for _, e in rows) for m in methods}
    print("median over layers, ordinary tokens: " + ", ".join(f"{m}: {v:.4f}" for m, v in med.items()))
    print(f"headline: DuQuant W4A8 dynamic error / RTN W4A8 error = "
          f"{med['DuQuant W4A8 dynamic'] / med['RTN W4A8 (no rotation)']:.3f} (ordinary tokens, median)")


if __name__ == "__main__":
    main()
