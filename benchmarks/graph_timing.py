"""CUDA-graph timing shared by the tuning benchmarks (fast_path_breakdown.py, gemm_tile_sweep.py)."""
import statistics

import torch


def graph_time_us(fn, calls, repeats):
    """Median µs per call of `calls` back-to-back calls of fn captured in one CUDA graph, over
    `repeats` replays. Kernel switches (_C.set_input_kernel, _C.set_gemm_tile) are read at capture."""
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
