"""Runs one fast-path layer call (for ncu): python3 benchmarks/profile_one.py K N M [wbits] [input kernel]."""
import sys

import torch

import duquant_ext as dq

k, n, m = (int(v) for v in sys.argv[1:4])
wbits = int(sys.argv[4]) if len(sys.argv) > 4 else 4
if len(sys.argv) > 5:
    dq._C.set_input_kernel(sys.argv[5])  # "rows", "split", "mma", "slices" or "auto"
layer = dq.DuQuantLinear.from_linear(torch.nn.Linear(k, n, bias=False), dq.Config(wbits=wbits)).cuda()
x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
for _ in range(3):
    layer(x)
torch.cuda.synchronize()
print(layer.execution_path, layer(x).shape, "input kernel:", dq._C.last_input_kernel())
