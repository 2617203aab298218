"""A few evo_step launches at LLaDA-8B shapes for Nsight Compute (ncu -k regex:evo)."""
import torch

from evofast.ops import evo_step

V, M, P = 126464, 126336, 128
dev = torch.device("cuda")
for B, R in ((1, 32), (8, 288), (32, 288)):
    logits = (torch.randn(B, R, V, device=dev) * 2).to(torch.bfloat16)
    L = P + R
    x = torch.cat([torch.randint(0, M, (B, P), device=dev), torch.full((B, R), M, device=dev)], 1)
    conf = torch.zeros(B, L, dtype=torch.float64, device=dev)
    for _ in range(2):
        evo_step(logits, x, conf, torch.full((B,), 2, device=dev), row0=P, block_start=P, block_end=P + 32,
                 prompt_len=P, mask_id=M, backend="cuda")
    torch.cuda.synchronize()
