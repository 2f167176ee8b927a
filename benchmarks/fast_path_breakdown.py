"""Where the fast path's time goes: the input side alone with each input kernel ("rows": one kernel,
whole rows in shared memory; "split": two passes over column chunks; "mma": the rotation on tensor
cores, whole rows a CTA; "slices": a permuted copy, then the rotation on tensor cores over slices of
positions (Hopper); "auto": what layers run), the
whole layer (input + GEMM) and bf16 nn.Linear, per shape and token count. CUDA graphs of `--calls`
back-to-back calls, median of `--repeats` replays. A tuning aid; benchmarks/linear_speed.py is the benchmark of record.

    PYTHONPATH=build/python python3 benchmarks/fast_path_breakdown.py [--m 1,16,256,4096]
        [--shapes expert | --shapes 4096:1024,1024:256]   (default: the LLM shapes)
        [--input-splits 1,2,4,8]   (instead: the tensor-core input kernel with each cluster size forced)
"""
import argparse
import statistics

import torch

import duquant_ext as dq

SHAPES = [(2048, 2048), (2048, 256), (2048, 16384), (16384, 2048), (1024, 4096), (4096, 1024)]
# The action expert's layers (benchmarks/action_expert_e2e.py: q, k/v, o, gate/up, down), --shapes expert
EXPERT_SHAPES = [(1024, 2048), (1024, 256), (2048, 1024), (1024, 4096), (4096, 1024)]


def graph_time_us(fn, calls, repeats):
    """Median µs per call of `calls` back-to-back calls of fn captured in one CUDA graph, over
    `repeats` replays. The input-kernel switch is read at capture."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            fn()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1000.0 / calls)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--m", default="1,16,64,256,1024,4096")
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--wbits", type=int, default=4)
    ap.add_argument("--shapes", default="",
                    help='"expert" for the action expert\'s layers, or K:N pairs, comma-separated (default: LLM shapes)')
    ap.add_argument("--input-splits", default="",
                    help="time only the tensor-core input kernel, with these cluster sizes forced (comma-separated)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to time")
        return
    shapes = parse_shapes(args.shapes)
    if args.input_splits:
        input_split_table(args, [int(v) for v in args.input_splits.split(",")], shapes)
        return
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, wbits={args.wbits}")
    print(f"{'K->N':>12} {'M':>5} {'in:rows':>8} {'in:split':>8} {'in:mma':>8} {'in:slices':>9} {'input':>8} "
          f"{'ran':>6} {'layer':>8} {'gemm~':>8} "
          f"{'bf16':>8} {'bf16/layer':>10}")
    for k, n in shapes:
        lin = torch.nn.Linear(k, n, bias=False)
        layer = dq.DuQuantLinear.from_linear(lin, dq.Config(wbits=args.wbits)).cuda()
        lin_bf16 = lin.to(device="cuda", dtype=torch.bfloat16)
        for m in [int(v) for v in args.m.split(",")]:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            t_in = {}
            with torch.no_grad():
                for which in ("rows", "split", "mma", "slices", "auto"):  # the switch is read when a graph is captured
                    dq._C.set_input_kernel(which)
                    t_in[which] = graph_time_us(
                        lambda: torch.ops.duquant.quantize_input(x, layer.perm, layer.r_in, None, 8),
                        args.calls, args.repeats)
                ran = dq._C.last_input_kernel()  # what auto picked (captured last)
                t_layer = graph_time_us(lambda: layer(x), args.calls, args.repeats)
                t_bf16 = graph_time_us(lambda: lin_bf16(x), args.calls, args.repeats)
            print(f"{k:>5}->{n:<6} {m:>5} {t_in['rows']:>8.1f} {t_in['split']:>8.1f} {t_in['mma']:>8.1f} "
                  f"{t_in['slices']:>9.1f} {t_in['auto']:>8.1f} {ran:>6} "
                  f"{t_layer:>8.1f} {t_layer - t_in['auto']:>8.1f} {t_bf16:>8.1f} {t_bf16 / t_layer:>10.2f}", flush=True)


def parse_shapes(text):
    if not text:
        return SHAPES
    if text == "expert":
        return EXPERT_SHAPES
    try:
        return [tuple(int(v) for v in pair.split(":")) for pair in text.split(",")]
    except ValueError:
        raise SystemExit(f'--shapes: expected "expert" or K:N pairs like 4096:1024,1024:256, got {text!r}')


def input_split_table(args, splits, shapes_kn):
    """in:mma µs per call with each cluster size forced (_C.set_input_splits), against the size's own pick."""
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}; the tensor-core input kernel (in:mma), "
          f"µs per call, cluster size forced; auto = its own pick; /n: ran with n")
    print(f"{'K':>6} {'M':>5} " + " ".join(f"{'split ' + str(s):>8}" for s in splits) + f" {'auto':>8}")
    shapes = dict.fromkeys(k for k, _ in shapes_kn)
    try:
        dq._C.set_input_kernel("mma")
        for k in shapes:
            layer = dq.DuQuantLinear.from_linear(torch.nn.Linear(k, 256, bias=False), dq.Config()).cuda()
            for m in [int(v) for v in args.m.split(",")]:
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                cells = []
                with torch.no_grad():
                    for s in splits + [0]:  # the switch is read when a graph is captured
                        dq._C.set_input_splits(s)
                        us = graph_time_us(lambda: torch.ops.duquant.quantize_input(x, layer.perm, layer.r_in, None, 8),
                                           args.calls, args.repeats)
                        ran = dq._C.last_input_splits()  # a size asked for may run as another
                        cells.append(f"{us:.1f}" + ("" if ran == s else f"/{ran}"))
                print(f"{k:>6} {m:>5} " + " ".join(f"{c:>8}" for c in cells), flush=True)
    finally:
        dq._C.set_input_kernel("auto")
        dq._C.set_input_splits(0)


if __name__ == "__main__":
    main()
