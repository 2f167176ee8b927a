"""Eager calls (no CUDA graph): what a user who runs the model as it is pays per call.

linear_speed.py and action_expert_e2e.py time CUDA graphs, which leave the host out: Python, the
dispatcher, our op's checks, plans and allocations, the kernel launches. Most LLM and policy code
runs eagerly. One question: per call, how long does a DuQuantLinear take eagerly against
nn.Linear in bf16 and the prototype-style path, and how much of that is the host?

Method, per contender and shape: N calls back to back, then one synchronize; "eager" is the wall
time over N, "host" the time until the N calls had returned (before the synchronize), "graph" the
same call replayed from a CUDA graph (the GPU's time alone). Where host ~ eager > graph, the host
sets the pace; "bf16/x" is bf16's eager time over the contender's (above 1: faster than bf16).
Medians over --repeats. Then the action expert of action_expert_e2e.py (one policy call: 10 flow
steps x 18 layers, 50 tokens), eager: bf16, W4A8, and W4A8 packed with share_inputs=False (every
linear quantizes its own input: more launches, less Python per call). Last, where one eager
DuQuantLinear call's host time goes (torch.profiler, CPU side), top operators by self time.

Usage:
  python benchmarks/eager_overhead.py [--repeats 7] [--calls 400] [--out FILE]
"""
import argparse
import copy
import os
import statistics
import sys
import time

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from action_expert_e2e import ActionExpert, ExpertShape, randomize  # noqa: E402
from fast_path_breakdown import graph_time_us  # noqa: E402
from linear_speed import PrototypeFakeQuantLinear, build_ours, make_input, make_weight  # noqa: E402
from report import Report  # noqa: E402

import duquant_ext as dq  # noqa: E402

# (K, N, M): LLM decode at one token, and the action expert's MLP at 50 tokens.
SHAPES = [(2048, 2048, 1), (2048, 16384, 1), (1024, 4096, 50), (4096, 1024, 50)]


def time_eager(fn, calls, repeats):
    """(eager µs per call, host µs per call), medians."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    wall, host = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        host.append((t1 - t0) / calls * 1e6)
        wall.append((t2 - t0) / calls * 1e6)
    return statistics.median(wall), statistics.median(host)


def host_profile(fn, calls, top):
    """Top CPU operators of `calls` eager calls by self time: (name, µs per call)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            fn()
    torch.cuda.synchronize()
    rows = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:top]
    return [(e.key, e.self_cpu_time_total / calls, e.count / calls) for e in rows]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--calls", type=int, default=400, help="calls per sample (linear layers)")
    ap.add_argument("--out", default=None, help="also write the results to this file")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("eager_overhead: no CUDA device; this benchmark times eager GPU calls. Run it on the GPU machine "
              "(see benchmarks/README.md).")
        return 0

    out = Report("eager")

    dev = torch.device("cuda")
    out(f"# eager calls, {time.strftime('%Y-%m-%d %H:%M')}, GPU: {torch.cuda.get_device_name()}, torch "
        f"{torch.__version__} (CUDA {torch.version.cuda}), CPU threads {torch.get_num_threads()}, command: "
        f"{' '.join(sys.argv)}")
    out("# µs per call, medians; eager = wall over back-to-back calls, host = until the calls had returned, "
        "graph = GPU alone")
    out()
    out(f"{'shape':<22}{'contender':<10}{'eager':>9}{'host':>9}{'graph':>9}{'bf16/x':>9}")
    profiled = None  # the first shape's layer and input, for the host profile at the end
    with torch.no_grad():
        for i, (k, n, m) in enumerate(SHAPES):
            w = make_weight(k, n, i, dev)
            x = make_input(m, k, i, dev)
            lin = nn.Linear(k, n, bias=False, device=dev, dtype=torch.bfloat16).requires_grad_(False)
            lin.weight.copy_(w)
            ours = build_ours(w, None, {})
            profiled = profiled or (ours, x)
            contenders = {"bf16": lin, "proto": PrototypeFakeQuantLinear(w, None, ours), "W4A8": ours}
            base = None
            for name, mod in contenders.items():
                fn = lambda mod=mod: mod(x)  # noqa: E731
                eager, host = time_eager(fn, args.calls, args.repeats)
                graph = graph_time_us(fn, 20, args.repeats)
                base = base or eager
                out(f"{f'{k}->{n} M={m}':<22}{name:<10}{eager:>9.1f}{host:>9.1f}{graph:>9.1f}{base / eager:>8.2f}x")
            out(f"{'':<22}W4A8 path: {ours.execution_path}")

        out()
        shape = ExpertShape()
        ref = ActionExpert(shape)
        randomize(ref, 0)
        ref = ref.to(dev).eval()
        bf16 = copy.deepcopy(ref).to(torch.bfloat16)
        quant, alone = copy.deepcopy(ref), copy.deepcopy(ref)
        dq.quantize_(quant, dq.Config(), include=None)
        dq.quantize_(alone, dq.Config(), include=None, share_inputs=False)
        quant, alone = quant.to(torch.bfloat16), alone.to(torch.bfloat16)
        x0 = torch.randn(1, shape.tokens, shape.width, device=dev).bfloat16()
        t = {}
        for name, model in (("bf16", bf16), ("W4A8", quant), ("W4A8, siblings alone", alone)):
            eager, host = time_eager(lambda model=model: model(x0), 3, args.repeats)
            t[name] = eager
            out(f"action expert policy call, eager, {name:<21}{eager / 1e3:>9.3f} ms  (host {host / 1e3:.3f} ms)")
        out()
        k, n, m = SHAPES[0]
        ours, x = profiled
        out(f"host time of one eager DuQuantLinear call ({k}->{n}, M={m}), top CPU operators by self time:")
        out(f"{'operator':<48}{'µs/call':>9}{'calls':>7}")
        for key, us, cnt in host_profile(lambda: ours(x), 200, 12):
            out(f"{key[:47]:<48}{us:>9.2f}{cnt:>7.1f}")
        out()
        out(f"headline: eager action expert policy call {t['bf16'] / t['W4A8']:.2f}x the speed of bf16 "
            f"({t['bf16'] / 1e3:.3f} -> {t['W4A8'] / 1e3:.3f} ms; {t['bf16'] / t['W4A8, siblings alone']:.2f}x with "
            f"share_inputs=False)")
    out.write(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
