"""Does a TORCH_CHECK failure inside evofast's compiled ops surface as a Python error?"""
import faulthandler
import sys

import torch

import evofast._C  # noqa: F401  (schemas + CPU kernels)
if sys.argv[1] == "cuda":
    import evofast._C_cuda  # noqa: F401

faulthandler.enable()
which = sys.argv[1]
dev = "cuda" if which == "cuda" else "cpu"
V, R = 6, 8
one = lambda v: torch.tensor([v], device=dev)  # noqa: E731
x = torch.full((1, R), 5, dtype=torch.long, device=dev)
conf = torch.zeros(1, R, dtype=torch.float64, device=dev)
try:
    torch.ops.evofast.evo_step_fused(torch.randn(1, R, V, device=dev), x, conf, one(R), one(0), one(R), one(0),
                                     0, 100, 2, 0.7, 0.7, False, 0.0, False, True, 5)
    print(which, "NO ERROR")
except RuntimeError as e:
    print(which, "raised ok:", str(e).splitlines()[0][:120])
