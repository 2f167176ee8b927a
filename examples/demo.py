"""duquant demo on built-in generated data: pack, swap, compare.

Builds a small transformer-style stack whose activations carry outlier channels (x40-x50, from
LayerNorm gains, as in real LLMs) and one massive token (x1000), swaps its nn.Linear layers with
duquant_ext.quantize_ under several settings, and prints output error and memory for each.
Runs on the CPU in a few seconds; pass --device cuda on a GPU machine.
"""
import argparse
import copy
import time

import torch
from torch import nn

import duquant_ext as dq


class Block(nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.q_proj, self.k_proj = nn.Linear(d, d, bias=False), nn.Linear(d, d // 4, bias=False)
        self.v_proj, self.o_proj = nn.Linear(d, d // 4, bias=False), nn.Linear(d, d)
        self.gate_proj, self.up_proj = nn.Linear(d, h, bias=False), nn.Linear(d, h, bias=False)
        self.down_proj = nn.Linear(h, d)
        self.input_layernorm, self.post_attention_layernorm = nn.LayerNorm(d), nn.LayerNorm(d)

    def forward(self, x):
        h = self.input_layernorm(x)
        q, k, v = self.q_proj(h), self.k_proj(h), self.v_proj(h)
        gate = torch.sigmoid(q[..., : k.shape[-1]] * k) * v
        x = x + self.o_proj(torch.cat([gate, q[..., k.shape[-1]:]], -1))
        h = self.post_attention_layernorm(x)
        return x + self.down_proj(nn.functional.silu(self.gate_proj(h)) * self.up_proj(h))


def make_model(d, h, layers):
    torch.manual_seed(0)
    model = nn.Sequential(*[Block(d, h) for _ in range(layers)])
    with torch.no_grad():
        heavy_tailed = torch.distributions.StudentT(df=4.0)  # trained weights are heavy-tailed, not uniform
        for m in model.modules():
            if isinstance(m, nn.Linear):
                m.weight.copy_(heavy_tailed.sample(m.weight.shape) * 0.02)
        for blk in model:
            # LayerNorm gains with a few large channels: the activation outliers of real LLMs.
            for norm in (blk.input_layernorm, blk.post_attention_layernorm):
                norm.weight[:4] = 40.0
    return model.eval()


def make_inputs(batches, tokens, d):
    xs = []
    for _ in range(batches):
        x = torch.randn(1, tokens, d)
        x[..., :4] *= 50.0                 # outlier channels
        x[:, tokens // 3, :] *= 1000.0     # a massive-activation token
        xs.append(x)
    return xs


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--mlp", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    base = make_model(args.width, args.mlp, args.layers).to(args.device)
    calib = [x.to(args.device) for x in make_inputs(4, args.tokens, args.width)]
    test = make_inputs(1, args.tokens, args.width)[0].to(args.device)
    with torch.no_grad():
        ref = base(test)

    settings = [
        ("W8A8 dynamic", dq.Config(wbits=8)),
        ("W4A16 (weight-only)", dq.Config(abits=0)),
        ("W4A8 dynamic (default)", dq.Config()),
        ("W4A8 static", dq.Config(act="static", calib_steps=4)),
        ("W4A8 static_channel", dq.Config(act="static_channel", calib_steps=4)),
        ("W4A8 no rotation/perm", dq.Config(block_size=1, block_out=1, permute=False)),
    ]
    print(f"duquant demo: {args.layers} blocks, width {args.width}, MLP {args.mlp}, {args.tokens} tokens, "
          f"device {args.device}, torch {torch.__version__}")
    print(f"{'setting':<26}{'layers':>7}{'pack s':>8}{'MB before':>11}{'MB after':>10}{'ratio':>7}{'rel err':>9}")
    for name, config in settings:
        model = copy.deepcopy(base)
        t0 = time.perf_counter()
        report = dq.quantize_(model, config)
        pack_s = time.perf_counter() - t0
        with torch.no_grad():
            if config.needs_calibration:
                for x in calib:
                    model(x)
            out = model(test)
        print(f"{name:<26}{len(report):>7}{pack_s:>8.2f}{report.bytes_before / 1e6:>11.2f}"
              f"{report.bytes_after / 1e6:>10.2f}{report.bytes_after / report.bytes_before:>7.3f}{rel(out - test, ref - test):>9.4f}")
    print("\nrel err = ||d_quantized - d_float|| / ||d_float||, d = output - input (what the blocks add to the "
          "residual stream), on a held-out batch.\nSizes: the swapped layers' float32 weights+bias vs all their "
          "duquant buffers (codes, scales, rotations, permutation).")
    print("\nOne layer, as printed:\n ", model[0].q_proj)


if __name__ == "__main__":
    main()
