"""Random decoding states for evo_step tests."""
from dataclasses import dataclass

import torch


@dataclass
class Case:
    logits: torch.Tensor      # (B, R, V) window rows
    x: torch.Tensor           # (B, L)
    conf: torch.Tensor        # (B, L) float64
    num_transfer: torch.Tensor
    row0: int
    block_start: torch.Tensor
    block_end: torch.Tensor
    prompt_len: torch.Tensor
    mask_id: int

    def kwargs(self):
        return dict(row0=self.row0, block_start=self.block_start, block_end=self.block_end,
                    prompt_len=self.prompt_len, mask_id=self.mask_id)

    def to(self, device):
        f = {k: (v.to(device) if isinstance(v, torch.Tensor) and k in ("logits", "x", "conf") else v)
             for k, v in self.__dict__.items()}
        return Case(**f)

    def state(self):
        return self.x.clone(), self.conf.clone()


def make_case(B=2, V=1000, prompt=12, block=8, n_blocks=3, block_idx=1, row0=None, dtype=torch.float32,
              seed=0, ties=False, scale=3.0, mask_id=None, prompt_masks=0, n_transfer=2, vary_rows=True):
    """A mid-generation state: earlier blocks decoded, the current block partly decoded.

    Rows differ in prompt length (left-aligned here: prompt_len per row) when vary_rows.
    """
    g = torch.Generator().manual_seed(seed)
    L = prompt + block * n_blocks
    M = V - 3 if mask_id is None else mask_id
    x = torch.randint(0, V, (B, L), generator=g)
    x[x == M] = 0
    P = torch.full((B,), prompt, dtype=torch.int64)
    if vary_rows and B > 1:
        P[1:] = torch.randint(max(1, prompt - 4), prompt + 1, (B - 1,), generator=g)
    bs = P + block_idx * block
    be = bs + block
    conf = torch.zeros(B, L, dtype=torch.float64)
    for b in range(B):
        x[b, bs[b]:] = M
        done = torch.randperm(block, generator=g)[: int(torch.randint(0, block // 2 + 1, (1,), generator=g))]
        x[b, bs[b] + done] = torch.randint(0, V - 4, (len(done),), generator=g)
        conf[b, P[b]:bs[b] + block] = torch.rand(int(bs[b] + block - P[b]), dtype=torch.float64, generator=g)
        if prompt_masks:
            x[b, torch.randperm(int(P[b]), generator=g)[:prompt_masks]] = M
    conf[x == M] = 0
    if row0 is None:        # the window starts inside the prompt
        row0 = int(min(int(bs.min()), prompt - 3))
    elif row0 == "block":   # the window starts at the current block
        row0 = int(bs.min())
    R = L - row0
    if ties:
        logits = torch.randint(-3, 4, (B, R, V), generator=g).float()
    else:
        logits = torch.randn(B, R, V, generator=g) * scale
    logits = logits.to(dtype)
    nt = torch.full((B,), n_transfer, dtype=torch.int64)
    return Case(logits, x, conf, nt, row0, bs, be, P, M)
