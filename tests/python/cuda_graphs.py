"""CUDA graph capture for the GPU tests: the steps torch asks for (a warm-up on a side stream, then
the capture), in one place."""
import torch


def captured(model, x):
    """model(x) captured in a CUDA graph after a warm-up off the capture stream: (graph, its input
    buffer, its output)."""
    static_x = x.clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        model(static_x)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = model(static_x)
    return graph, static_x, static_y


def replay(graph, static_x, x):
    """Replays a graph from captured() on new input x (copied into its buffer); returns when done."""
    static_x.copy_(x)
    graph.replay()
    torch.cuda.synchronize()
