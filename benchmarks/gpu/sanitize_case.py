"""Small CUDA workloads for compute-sanitizer (memcheck, racecheck, synccheck, initcheck).

Every launch shape of the CUDA backend once: one block per row and split-V
(forced through EVOFAST_CUDA_EVO_SPLITS), greedy / threshold / sampling / random
remasking, ragged windows, odd V, the bf16 value table; soft_embed forward and
backward. Each result is
compared with the torch reference so a sanitizer run is also a correctness run.
"""
import os

import torch

import evofast.ops as ops
from evofast.ops import evo_step, soft_embed

assert "cuda" in ops.backends(), ops.backends()
dev = torch.device("cuda")


def case(V, B, P, G, blk, dtype, splits, **kw):
    os.environ["EVOFAST_CUDA_EVO_SPLITS"] = str(splits)
    L, M = P + G, V - 1
    g = torch.Generator(device=dev).manual_seed(V + B + splits)
    logits = (torch.randn(B, G, V, device=dev, generator=g) * 3).to(dtype)
    x0 = torch.cat([torch.randint(0, M, (B, P), device=dev, generator=g), torch.full((B, G), M, device=dev)], 1)
    out = {}
    for be in ("torch", "cuda"):
        x, conf = x0.clone(), torch.zeros(B, L, dtype=torch.float64, device=dev)
        gen = torch.Generator(device=dev).manual_seed(7)
        ids, w, t = evo_step(logits, x, conf, torch.full((B,), 2, device=dev), row0=P, block_start=P,
                             block_end=P + blk, prompt_len=P, mask_id=M, backend=be, generator=gen, **kw)
        out[be] = (x, conf, ids, w, t)
    torch.cuda.synchronize()
    if kw.get("temperature", 0) == 0 and kw.get("remasking", "low_confidence") == "low_confidence":
        assert torch.equal(out["torch"][0], out["cuda"][0]), (V, B, splits, kw)
    print("ok", V, B, G, dtype, splits, kw)


for splits in (1, 4):
    case(1000, 2, 5, 24, 8, torch.float32, splits)
    case(50257, 3, 3, 17, 8, torch.bfloat16, splits, threshold=0.05)
    case(4099, 2, 4, 16, 16, torch.float16, splits, k_soft=2, alpha=0.5)
    case(1000, 2, 5, 24, 8, torch.float32, splits, temperature=0.8)
    case(1000, 2, 5, 24, 8, torch.float32, splits, remasking="random")
os.environ.pop("EVOFAST_CUDA_EVO_SPLITS")
case(126464, 1, 8, 32, 32, torch.bfloat16, 0)
os.environ["EVOFAST_CUDA_VALUE_TABLE"] = "1"       # the value table: one block per row and long split-V chunks
for splits in (1, 3):
    case(126464, 2, 5, 12, 4, torch.bfloat16, splits)
    case(50257, 3, 3, 17, 8, torch.bfloat16, splits, threshold=0.05)
os.environ.pop("EVOFAST_CUDA_VALUE_TABLE")

for wdt in (torch.float32, torch.bfloat16):
    weight = torch.randn(1000, 96, device=dev, dtype=wdt, requires_grad=True)
    ids = torch.randint(0, 1000, (2, 9, 4), device=dev)
    w = torch.softmax(torch.randn(2, 9, 4, device=dev), -1).to(wdt).requires_grad_()
    e = soft_embed(weight, ids, w)
    e.float().square().sum().backward()
    torch.cuda.synchronize()
    print("ok soft_embed", wdt, tuple(e.shape))
print("sanitize_case done")
