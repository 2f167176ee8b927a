"""End to end: a pi0-style action expert, bf16 vs every linear swapped by dq.quantize_.

One question: how much faster is one policy call (the whole flow-matching loop of the action
expert) when its linears are DuQuant W4A8, and how far do the actions move?

The model: 18 Gemma-style decoder layers of width 1024 (RMSNorm with (1 + w) scale, attention with
8 query heads of head_dim 256 and one KV head: q_proj 1024->2048, k/v 1024->256, o_proj
2048->1024; gated-GELU MLP 1024->4096->1024: gate_proj, up_proj, down_proj), a final RMSNorm.
Random weights (std 0.02) with a few outlier input columns, and a few RMSNorm channels scaled up
so the activations have outlier channels too. Simplifications, none of which touch the linears:
no RoPE, no attention to a VLM prefix (plain attention among the action tokens), the state lives
at width 1024 (no action in/out projections), time enters as a sinusoidal embedding added to
the input.

One policy call = 10 flow-matching steps at batch 1 with 50 action tokens: each step is a full
forward over the 50 tokens giving the velocity v, then x = x + dt * v. Both policies are timed
as one CUDA graph over the whole 10-step loop (eager if capture fails, and the output says so),
median over --repeats. The output difference is ||x_dq - x_bf16|| / ||x_bf16 - x_0|| (relative to
how far the loop moved the noise), and each policy's difference from the same model in float32.

Usage:
  python benchmarks/action_expert_e2e.py [--repeats 20] [--out FILE]
  python benchmarks/action_expert_e2e.py --kernels   # also: each policy's GPU time per kernel family
  python benchmarks/action_expert_e2e.py --timeline  # also: one layer's kernels in order, each policy
  python benchmarks/action_expert_e2e.py --cpu-smoke     # tiny model on the CPU: logic check only
"""
import argparse
import copy
import json
import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import ProfilerActivity, profile

import duquant_ext as dq
from report import Report


@dataclass
class ExpertShape:
    layers: int = 18
    width: int = 1024
    mlp: int = 4096
    heads: int = 8
    kv_heads: int = 1
    head_dim: int = 256
    tokens: int = 50
    steps: int = 10


# Input columns of each weight scaled up by this much (a few per layer). Moderate on purpose: the
# SVD rotations align with a dominant column rather than spread it, so large weight-column
# outliers cost per-row int4 dearly; activation outliers (from the norms) are the main case.
OUTLIER_COLUMN_GAIN = 3.0

SMOKE = ExpertShape(layers=2, width=64, mlp=128, heads=2, kv_heads=1, head_dim=32, tokens=8, steps=3)


class RMSNorm(nn.Module):
    """Gemma's RMSNorm: normalize in float32, scale by (1 + weight)."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * (1.0 + self.weight.float())).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, s: ExpertShape):
        super().__init__()
        self.s = s
        self.q_proj = nn.Linear(s.width, s.heads * s.head_dim, bias=False)
        self.k_proj = nn.Linear(s.width, s.kv_heads * s.head_dim, bias=False)
        self.v_proj = nn.Linear(s.width, s.kv_heads * s.head_dim, bias=False)
        self.o_proj = nn.Linear(s.heads * s.head_dim, s.width, bias=False)

    def forward(self, h):
        s = self.s
        b, t, _ = h.shape
        q = self.q_proj(h).view(b, t, s.kv_heads, s.heads // s.kv_heads, s.head_dim).permute(0, 2, 3, 1, 4)
        k = self.k_proj(h).view(b, t, s.kv_heads, 1, s.head_dim).permute(0, 2, 3, 1, 4)
        v = self.v_proj(h).view(b, t, s.kv_heads, 1, s.head_dim).permute(0, 2, 3, 1, 4)
        # Plain softmax attention among the action tokens (all see all), scores in float32.
        scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) / math.sqrt(s.head_dim)
        o = torch.matmul(scores.softmax(-1).to(v.dtype), v)  # [b, kv, group, t, d]
        o = o.permute(0, 3, 1, 2, 4).reshape(b, t, s.heads * s.head_dim)
        return self.o_proj(o)


class GatedMLP(nn.Module):
    def __init__(self, s: ExpertShape):
        super().__init__()
        self.gate_proj = nn.Linear(s.width, s.mlp, bias=False)
        self.up_proj = nn.Linear(s.width, s.mlp, bias=False)
        self.down_proj = nn.Linear(s.mlp, s.width, bias=False)

    def forward(self, h):
        return self.down_proj(F.gelu(self.gate_proj(h), approximate="tanh") * self.up_proj(h))


class DecoderLayer(nn.Module):
    def __init__(self, s: ExpertShape):
        super().__init__()
        self.input_layernorm = RMSNorm(s.width)
        self.self_attn = Attention(s)
        self.post_attention_layernorm = RMSNorm(s.width)
        self.mlp = GatedMLP(s)

    def forward(self, h):
        h = h + self.self_attn(self.input_layernorm(h))
        return h + self.mlp(self.post_attention_layernorm(h))


class ActionExpert(nn.Module):
    def __init__(self, s: ExpertShape):
        super().__init__()
        self.s = s
        self.layers = nn.ModuleList(DecoderLayer(s) for _ in range(s.layers))
        self.norm = RMSNorm(s.width)
        # Euler from t=1 (noise) to t=0: t_i = 1 - i/steps, dt = -1/steps. Time embeddings are
        # buffers so the whole loop can be captured in one CUDA graph.
        ts = 1.0 - torch.arange(s.steps, dtype=torch.float32) / s.steps
        self.register_buffer("time_emb", sinusoidal(ts, s.width))
        self.dt = -1.0 / s.steps

    def velocity(self, x, i):
        h = x + self.time_emb[i].to(x.dtype)
        for layer in self.layers:
            h = layer(h)
        return self.norm(h)

    def forward(self, x):
        """One policy call: the full flow-matching loop from noise x."""
        for i in range(self.s.steps):
            x = x + self.dt * self.velocity(x, i)
        return x


def sinusoidal(t, dim):
    half = dim // 2
    freqs = torch.exp(-math.log(10_000.0) * torch.arange(half, dtype=torch.float32) / half)
    ang = t[:, None] * freqs[None, :] * 1000.0
    return torch.cat([ang.sin(), ang.cos()], dim=-1)


def randomize(model: ActionExpert, seed: int):
    """Std-0.02 weights with a few outlier input columns per linear; a few RMSNorm channels
    scaled up so that the linears see outlier activation channels, as in trained models."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                n, k = m.weight.shape
                w = torch.randn(n, k, generator=g) * 0.02
                w[:, torch.randperm(k, generator=g)[: max(1, k // 256)]] *= OUTLIER_COLUMN_GAIN
                m.weight.copy_(w)
            elif isinstance(m, RMSNorm):
                d = m.weight.numel()
                w = torch.randn(d, generator=g) * 0.1
                w[torch.randperm(d, generator=g)[: max(1, d // 256)]] = 9.0  # (1 + w) = 10x on these channels
                m.weight.copy_(w)


def linear_weight_bytes(model: nn.Module, dtype_bytes: int) -> int:
    return sum(m.weight.numel() * dtype_bytes for m in model.modules() if isinstance(m, nn.Linear))


def capture_policy(model, x0):
    """One CUDA graph over the whole loop (after warm-up on a side stream); returns (run, how).
    Eager if capture fails, and `how` says so."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            model(x0)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            model(x0)
        return graph.replay, "CUDA graph of the 10-step loop"
    except Exception as e:  # noqa: BLE001 - not capturable: eager, stated in the output
        torch.cuda.synchronize()
        return (lambda: model(x0)), f"eager (graph capture failed: {' '.join(str(e).split())[:80]})"


def time_policy(model, x0, repeats, cuda):
    """Median ms per policy call. CUDA: one graph over the whole loop; returns (ms, spread, how)."""
    if not cuda:
        model(x0)
        samples = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(x0)
            samples.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(samples), spread(samples), "eager (CPU)"
    run, how = capture_policy(model, x0)
    for _ in range(3):
        run()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    samples = []
    for _ in range(repeats):
        start.record()
        for _ in range(5):  # a few calls per sample: event resolution and launch jitter amortized
            run()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / 5)
    return statistics.median(samples), spread(samples), how


def short_kernel_name(name):
    """A kernel's name without its namespaces, argument list and (for ours) template arguments
    past the first few, so that launches of one kernel family add up in one row."""
    base = name.replace("(anonymous namespace)::", "").replace("void ", "").split("(")[0]
    head, _, targs = base.partition("<")
    head = head.split("::")[-1]
    return f"{head}<{targs[:40]}" if targs else head


def profiled_kernels(model, x0, replays):
    """The kernels of `replays` profiled graph replays of one policy call, in start order, as
    (name, start µs, duration µs, grid)."""
    run, _ = capture_policy(model, x0)
    for _ in range(3):
        run()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            run()
        torch.cuda.synchronize()
    path = os.path.join(tempfile.mkdtemp(), "trace.json")
    prof.export_chrome_trace(path)
    with open(path) as f:
        events = json.load(f)["traceEvents"]
    kernels = sorted((e for e in events if e.get("cat") == "kernel"), key=lambda e: e["ts"])
    return [(e["name"], e["ts"], e["dur"], e.get("args", {}).get("grid")) for e in kernels]


def with_costs(kernels):
    """Each kernel with its cost: the time from the end of the kernel before it to its own end, so
    its launch gap and the part of its run that nothing else covers (chained kernels start early
    and wait). The costs add up to the GPU's time."""
    prev_end = None
    for name, ts, dur, grid in kernels:
        end = ts + dur
        cost = end - prev_end if prev_end is not None and end > prev_end else (dur if prev_end is None else 0.0)
        gap = ts - prev_end if prev_end is not None else 0.0
        yield name, grid, gap, dur, cost
        prev_end = max(prev_end or end, end)


def kernel_costs(model, x0, replays=3):
    """Per kernel family (ours also per grid shape): (µs per policy call, launches per call), over
    profiled graph replays."""
    costs, counts = {}, {}
    for full, grid, _, _, cost in with_costs(profiled_kernels(model, x0, replays)):
        name = short_kernel_name(full)
        if "duquant::" in full and grid:  # ours by launch shape too: one row per layer kind
            name = f"{name[:36]} grid {'x'.join(str(g) for g in grid)}"
        costs[name] = costs.get(name, 0.0) + cost
        counts[name] = counts.get(name, 0) + 1
    return {k: (costs[k] / replays, counts[k] / replays) for k in costs}


def layer_timeline(model, x0, shape):
    """One decoder layer's kernels in order, in the middle of the loop: from its input norm's
    first reduction (RMSNorm's x.pow(2)) to the next layer's. Rows of (name, grid, gap, run, cost)."""
    rows = list(with_costs(profiled_kernels(model, x0, 1)))
    norms = [i for i, r in enumerate(rows) if "pow_tensor_scalar" in r[0]]
    per_step = 2 * shape.layers + 1  # two norms a layer, the final one
    if len(norms) != shape.steps * per_step:
        raise RuntimeError(f"expected {shape.steps * per_step} RMSNorm reductions, found {len(norms)}")
    first = (shape.steps // 2) * per_step + 2 * (shape.layers // 2)
    return rows[norms[first]:norms[first + 2]]


def spread(samples):
    s = sorted(samples)
    lo, hi = s[int(0.1 * (len(s) - 1))], s[int(math.ceil(0.9 * (len(s) - 1)))]
    return (hi - lo) / statistics.median(s)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="also write the results to this file")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny model on the CPU, eager")
    ap.add_argument("--kernels", action="store_true",
                    help="also profile one policy call of each and print where its time goes, per kernel family")
    ap.add_argument("--timeline", action="store_true",
                    help="also print one decoder layer's kernels in order for each policy: launch gap, run time, cost")
    args = ap.parse_args()

    cuda = not args.cpu_smoke
    if cuda and not torch.cuda.is_available():
        print("action_expert_e2e: no CUDA device; this benchmark times GPU execution. Run it on the GPU machine "
              "(see benchmarks/README.md), or use --cpu-smoke for a tiny logic check on the CPU.")
        return 0
    shape = SMOKE if args.cpu_smoke else ExpertShape()
    device = torch.device("cuda" if cuda else "cpu")
    if args.cpu_smoke:
        args.repeats = min(args.repeats, 3)

    out = Report("e2e")

    gpu = torch.cuda.get_device_name() if cuda else "none (CPU smoke run)"
    out(f"# action expert end to end, {time.strftime('%Y-%m-%d %H:%M')}, GPU: {gpu}, torch {torch.__version__} "
        f"(CUDA {torch.version.cuda}), command: {' '.join(sys.argv)}")
    out(f"# {shape.layers} layers, width {shape.width}, MLP {shape.mlp} gated GELU, {shape.heads} heads x "
        f"{shape.head_dim}, {shape.kv_heads} KV head; {shape.steps} flow-matching steps, batch 1, "
        f"{shape.tokens} action tokens")

    torch.manual_seed(args.seed)
    with torch.no_grad():
        ref = ActionExpert(shape)
        randomize(ref, args.seed)
        ref = ref.to(device).eval()  # float32: the accuracy reference
        bf16 = copy.deepcopy(ref).to(torch.bfloat16)
        quant, alone = copy.deepcopy(ref), copy.deepcopy(ref)
        print("[e2e] packing every linear with dq.quantize_ (W4A8 dynamic)", file=sys.stderr, flush=True)
        report = dq.quantize_(quant, dq.Config(), include=None)  # packs from the float32 weights
        # The same without shared input transforms: q/k/v and gate/up each quantize their input.
        report_alone = dq.quantize_(alone, dq.Config(), include=None, share_inputs=False)
        quant = quant.to(torch.bfloat16)  # norms and time embeddings to bf16; DuQuantLinear keeps its formats
        alone = alone.to(torch.bfloat16)
        n_linear = sum(isinstance(m, nn.Linear) for m in ref.modules())
        if len(report) != n_linear or len(report_alone) != n_linear:
            raise SystemExit(f"quantize_ swapped {len(report)} of {n_linear} linears")

        g = torch.Generator().manual_seed(args.seed + 1)
        x0 = torch.randn(1, shape.tokens, shape.width, generator=g).to(device)
        x0_bf16 = x0.bfloat16()
        y_ref = ref(x0)
        y_bf16 = bf16(x0_bf16)
        y_dq = quant(x0_bf16)
        y_alone = alone(x0_bf16)
        paths = sorted({m.execution_path for m in quant.modules() if isinstance(m, dq.DuQuantLinear)})
        moved = (y_bf16.float() - x0).norm()

        t_bf16, s_bf16, how_bf16 = time_policy(bf16, x0_bf16, args.repeats, cuda)
        t_dq, s_dq, how_dq = time_policy(quant, x0_bf16, args.repeats, cuda)
        t_alone, s_alone, how_alone = time_policy(alone, x0_bf16, args.repeats, cuda)

    bytes_bf16 = linear_weight_bytes(ref, 2)
    out(f"linear layers: {n_linear} (all swapped); DuQuantLinear execution path(s): {', '.join(paths)}")
    out(f"linear weight bytes: bf16 {bytes_bf16 / 1e6:.1f} MB, DuQuant W4A8 {report.bytes_after / 1e6:.1f} MB "
        f"({report.bytes_after / bytes_bf16:.3f}x)")
    out(f"output difference: ||x_dq - x_bf16|| / ||x_bf16 - x_0|| = "
        f"{float((y_dq.float() - y_bf16.float()).norm() / moved):.4f}")
    out(f"vs float32 model, same relative measure: bf16 {float((y_bf16.float() - y_ref).norm() / moved):.4f}, "
        f"DuQuant W4A8 {float((y_dq.float() - y_ref).norm() / moved):.4f}, "
        f"siblings packed alone {float((y_alone.float() - y_ref).norm() / moved):.4f}")
    out(f"shared input transforms: {len(report.shared_inputs)} groups (q/k/v_proj, gate/up_proj per layer)")
    out()
    w = 36
    out(f"{'policy':<{w}}{'ms / policy call':>18}{'spread':>9}  timed as")
    out(f"{'bf16':<{w}}{t_bf16:>18.3f}{s_bf16:>9.1%}  {how_bf16}")
    out(f"{'DuQuant W4A8 (all)':<{w}}{t_dq:>18.3f}{s_dq:>9.1%}  {how_dq}")
    out(f"{'DuQuant W4A8 (all, siblings alone)':<{w}}{t_alone:>18.3f}{s_alone:>9.1%}  {how_alone}")
    out(f"headline: DuQuant W4A8 policy call {t_bf16 / t_dq:.2f}x the speed of bf16 "
        f"({t_bf16:.3f} -> {t_dq:.3f} ms, {shape.steps} steps x {shape.tokens} tokens; "
        f"{t_bf16 / t_alone:.2f}x with every linear quantizing its own input)")
    if args.kernels and cuda:
        with torch.no_grad():
            profiles = {"bf16": kernel_costs(bf16, x0_bf16), "W4A8": kernel_costs(quant, x0_bf16)}
        for label, prof in profiles.items():
            out()
            total = sum(c for c, _ in prof.values())
            out(f"where a {label} policy call's time goes (profiled graph replay, kernel families by cost; "
                f"total {total / 1e3:.3f} ms)")
            out(f"{'kernel':<56}{'us/call':>10}{'launches':>10}{'us each':>9}")
            for name, (cost, n) in sorted(prof.items(), key=lambda kv: -kv[1][0])[:20]:
                out(f"{name[:55]:<56}{cost:>10.1f}{n:>10.0f}{cost / max(n, 1):>9.2f}")
    if args.timeline and cuda:
        with torch.no_grad():
            timelines = {"bf16": layer_timeline(bf16, x0_bf16, shape), "W4A8": layer_timeline(quant, x0_bf16, shape)}
        for label, rows in timelines.items():
            out()
            out(f"one {label} decoder layer in order (layer {shape.layers // 2} of step {shape.steps // 2}, from its "
                f"input norm to the next layer's; profiled graph replay, µs; gap < 0: launched early, chained; "
                f"cost: from the previous kernel's end to its own; total {sum(r[4] for r in rows):.1f})")
            out(f"{'kernel':<56}{'grid':>14}{'gap':>7}{'run':>7}{'cost':>7}")
            for name, grid, gap, dur, cost in rows:
                g = "x".join(str(v) for v in grid) if grid else ""
                out(f"{short_kernel_name(name)[:55]:<56}{g:>14}{gap:>7.2f}{dur:>7.2f}{cost:>7.2f}")
    out.write(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
