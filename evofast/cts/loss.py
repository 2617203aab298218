"""`cts_loss`: the K-step continuous-trajectory-supervision loss of docs/semantics.md §3.

Per trajectory step k, with one forward of the backbone up to the final norm
(`Adapter.hidden_states`):

* input: plain embeddings of the noised ids at k = 0, afterwards the soft
  representation through `evofast.ops.soft_embed` (its backward reaches the
  embedding only when it is trainable);
* `evofast.ops.linear_cross_entropy` over rows `[block_start, N)` of every row
  (the LM head is applied to nothing else): cross-entropy on the block
  `[block_start, block_end]`, rows after the block unlabelled; the last step
  reads the block only;
* in the same pass, on each logits block (`on_logits`): the prediction at the
  step's `next_positions` is written into the ids, then `evofast.ops.evo_step`
  with `exclude_mask=False` and no transfer does the revision and builds the
  next soft representation (argmax, float64 confidence, top-k: CTS loss item 4, quirks
  included), so the logits are read once;
* `backward=True` runs backward after each step (the next step's inputs are
  detached anyway), so one step's activations are alive at a time.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ..models.registry import get_adapter
from ..ops import evo_step, linear_cross_entropy, soft_embed

BATCH_KEYS = ("input_ids", "labels", "prompt_lengths", "block_start", "block_end", "next_positions")


def base_model(model: nn.Module) -> nn.Module:
    """The model under DDP / FSDP (`.module`) and peft (`get_base_model()`) wrappers."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        if hasattr(model, "get_base_model") and callable(model.get_base_model):
            model = model.get_base_model()
        elif isinstance(getattr(model, "module", None), nn.Module):
            model = model.module
    return model


def _checkpointing(model: nn.Module) -> bool:
    """Whether activation checkpointing is on (transformers 5 name first, then the old one)."""
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if hasattr(type(model), name):
            return bool(getattr(model, name))
    return False


def check_batch(batch: dict, device: torch.device) -> dict:
    """The batch's tensors on `device` as int64, shapes checked (ValueError naming the key)."""
    if not isinstance(batch, dict):
        raise ValueError(f"batch: expected a dict from CTSCollator, got {type(batch).__name__}")
    missing = [k for k in BATCH_KEYS if k not in batch]
    if missing:
        raise ValueError(f"batch: missing keys {missing} (expected the output of evofast.cts.CTSCollator)")
    out = {k: torch.as_tensor(batch[k]).to(device=device, dtype=torch.int64) for k in BATCH_KEYS}
    ids = out["input_ids"]
    if ids.dim() != 2 or ids.shape[1] == 0:
        raise ValueError(f"input_ids: expected a (B, N) tensor, got shape {tuple(ids.shape)}")
    B, N = ids.shape
    if tuple(out["labels"].shape) != (B, N):
        raise ValueError(f"labels: expected shape {(B, N)}, got {tuple(out['labels'].shape)}")
    for k in ("prompt_lengths", "block_start", "block_end"):
        if tuple(out[k].shape) != (B,):
            raise ValueError(f"{k}: expected shape ({B},), got {tuple(out[k].shape)}")
    nxt = out["next_positions"]
    if nxt.dim() != 3 or nxt.shape[0] != B or nxt.shape[1] < 1:
        raise ValueError(f"next_positions: expected shape (B, K, d) with B = {B}, got {tuple(nxt.shape)}")
    st, en = out["block_start"], out["block_end"]
    if bool(((st < 0) | (en < st) | (en >= N)).any()):
        raise ValueError("block_start / block_end: need 0 <= block_start <= block_end < N")
    if bool(((nxt < st[:, None, None]) | (nxt > en[:, None, None])).any()):
        raise ValueError("next_positions: every position must lie in its row's block [block_start, block_end]")
    return out


def draw_alphas(K: int, B: int, alphas: Optional[Tensor], generator: Optional[torch.Generator]) -> list:
    """(K, B) mask weights as host floats: the given tensor, or U(0.5, 1.0) draws (CTS loss item 4)."""
    if alphas is None:
        return (0.5 + 0.5 * torch.rand((K, B), generator=generator, dtype=torch.float64)).tolist()
    a = torch.as_tensor(alphas, dtype=torch.float64).detach().cpu()
    if tuple(a.shape) != (K, B):
        raise ValueError(f"alphas: expected shape (K, B) = {(K, B)}, got {tuple(a.shape)}")
    if bool(((a < 0) | (a >= 1) | a.isnan()).any()):
        raise ValueError("alphas: mask weights must lie in [0, 1)")
    return a.tolist()


class _Trajectory:
    """What one step's logits hook does (CTS loss items 3-4) on rows `[block_start, N)` of every row.

    The rows the loss reads are those rows concatenated over the batch, so a logits
    block can span two batch rows: it is split into per-row windows of consecutive
    sequence positions, which is what `evo_step` takes.
    """

    def __init__(self, x: Tensor, conf: Tensor, soft_ids: Tensor, soft_w: Tensor, starts: list, ends: list,
                 prompts: list, offsets: list, nxt: list, alphas: list, mask_id: int, k_soft: int,
                 backend: Optional[str]):
        self.x, self.conf, self.soft_ids, self.soft_w = x, conf, soft_ids, soft_w
        self.starts, self.ends, self.prompts, self.offsets = starts, ends, prompts, offsets
        self.nxt, self.alphas, self.mask_id, self.k_soft, self.backend = nxt, alphas, mask_id, k_soft, backend

    def __call__(self, s: int, e: int, logits: Tensor) -> None:
        for b, st in enumerate(self.starts):
            lo, hi = max(s, self.offsets[b]), min(e, self.offsets[b + 1])
            if lo >= hi:
                continue
            p0, p1 = st + lo - self.offsets[b], st + hi - self.offsets[b]   # sequence positions
            block = logits[lo - s:hi - s]
            # 3.3: the model's own prediction at this step's next positions
            nx = [p for p in self.nxt[b] if p0 <= p < p1]
            if nx:
                at = torch.tensor(nx, device=logits.device)
                self.x[b, at] = block[at - p0].argmax(dim=-1)
            # 3.4: revision (x != M, q > c, from max(st, P)) and the new soft representation
            ids, w, _ = evo_step(block[None], self.x[b:b + 1], self.conf[b:b + 1], 0, row0=p0, block_start=st,
                                 block_end=self.ends[b] + 1, prompt_len=self.prompts[b], mask_id=self.mask_id,
                                 k_soft=self.k_soft, alpha=self.alphas[b], exclude_mask=False, backend=self.backend,
                                 check_ids=False)
            self.soft_ids[b, p0:p1] = ids[0]
            self.soft_w[b, p0:p1] = w[0].to(self.soft_w.dtype)


class Trajectory:
    """The K steps of one batch's CTS trajectory, run one at a time: `step()` runs the next
    step's forward and returns its loss `loss_k` (differentiable), having already built the
    next step's soft representation. Steps must run in order; what the caller does between
    them (a backward, a gradient-sync decision) is its own. The model's weights are looked up
    inside every step, so a step may run inside a sharding framework's forward (FSDP2 gathers
    the root's weights for it; ZeRO-3 fetches a weight read inside a forward), where they
    exist only for the duration of that forward. `device`: where the batch goes (default:
    the input embedding's). Other arguments as for `cts_loss`."""

    def __init__(self, model: nn.Module, batch: dict, k_soft: int = 3, alphas: Optional[Tensor] = None, *,
                 generator: Optional[torch.Generator] = None, mask_id: Optional[int] = None,
                 chunk_size: Optional[int] = None, backend: Optional[str] = None,
                 device: Optional[torch.device] = None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        if isinstance(k_soft, bool) or not isinstance(k_soft, int) or k_soft < 1:
            raise ValueError(f"k_soft: expected a positive int, got {k_soft!r}")
        base = base_model(model)
        self.adapter = adapter = get_adapter(base, mask_id)
        emb = adapter.input_embeddings().weight
        weight = adapter.output_head()[0]
        dev = torch.device(device) if device is not None else emb.device
        b = check_batch(batch, dev)
        self.ids, labels, nxt = b["input_ids"].clone(), b["labels"], b["next_positions"]
        B, N = self.ids.shape
        self.K = K = nxt.shape[1]
        V = int(getattr(weight, "ds_shape", weight.shape)[0])     # ZeRO-3 keeps the full shape in ds_shape
        if k_soft >= V:
            raise ValueError(f"k_soft: must be smaller than the vocabulary size {V}, got {k_soft}")
        if bool(((labels < 0) | (labels >= V)).any()) or bool(((self.ids < 0) | (self.ids >= V)).any()):
            raise ValueError(f"input_ids / labels: token ids must lie in [0, {V})")
        self.alphas = draw_alphas(K, B, alphas, generator)
        self.st_h, self.en_h = b["block_start"].tolist(), b["block_end"].tolist()
        self.p_h, self.nxt_h = b["prompt_lengths"].tolist(), nxt.tolist()
        pos = torch.arange(N, device=dev)[None, :]
        self.before = pos < b["block_start"][:, None]          # [Decode] rows, never read by the LM head
        self.tail = ~self.before                               # [block_start, N): what steps k < K - 1 read
        self.in_block = self.tail & (pos <= b["block_end"][:, None])   # what the last step reads
        self.block_labels = torch.where(self.in_block, labels, -100)
        self.offsets = [0]                                     # where each row's part starts in h[tail]
        for st in self.st_h:
            self.offsets.append(self.offsets[-1] + N - st)
        self.checkpointing = _checkpointing(base)
        self.conf = torch.zeros(B, N, dtype=torch.float64, device=dev)
        self.soft = None
        self.k = 0
        self.k_soft, self.chunk_size, self.backend = k_soft, chunk_size, backend

    def step(self) -> Tensor:
        """Step k's loss (fp32 scalar); k advances by one."""
        k, K = self.k, self.K
        if k >= K:
            raise RuntimeError(f"Trajectory.step: all {K} steps have run")
        adapter, dev = self.adapter, self.ids.device
        emb = adapter.input_embeddings().weight
        weight, bias, scale = adapter.output_head()
        last = k == K - 1
        if self.soft is None:
            h = adapter.hidden_states(input_ids=self.ids)
        else:
            e = soft_embed(emb, self.soft[0], self.soft[1], backend=self.backend, check_ids=False)
            if self.checkpointing and torch.is_grad_enabled() and not e.requires_grad:
                e.requires_grad_()   # reentrant checkpointing drops parameter grads when no input needs grad
            h = adapter.hidden_states(inputs_embeds=e)
        rows = self.in_block if last else self.tail
        hook = None
        if not last:
            B, N = self.ids.shape
            self.ids = self.ids.clone()    # the hook writes the ids; this step's graph may hold the old ones
            soft_ids = torch.zeros(B, N, self.k_soft + 1, dtype=torch.int64, device=dev)
            soft_w = torch.zeros(B, N, self.k_soft + 1, dtype=emb.dtype, device=dev)
            hook = _Trajectory(self.ids, self.conf, soft_ids, soft_w, self.st_h, self.en_h, self.p_h, self.offsets,
                               [r[k] for r in self.nxt_h], self.alphas[k], adapter.mask_id, self.k_soft, self.backend)
        loss_k = linear_cross_entropy(h[rows], weight, self.block_labels[rows], bias=bias, scale=scale,
                                      chunk_size=self.chunk_size, on_logits=hook)
        if hook is not None:
            # rows before the block are [Decode]: weight 1 on x itself (ids updated by the hook)
            ks = self.k_soft
            soft_ids[..., ks] = torch.where(self.before, self.ids, soft_ids[..., ks])
            soft_w[..., ks] = torch.where(self.before, torch.ones((), dtype=soft_w.dtype, device=dev),
                                          soft_w[..., ks])
            self.soft = (soft_ids, soft_w)
        self.k += 1
        return loss_k


def cts_loss(model: nn.Module, batch: dict, k_soft: int = 3, alphas: Optional[Tensor] = None,
             backward: bool = False, *, generator: Optional[torch.Generator] = None, grad_scale: float = 1.0,
             mask_id: Optional[int] = None, chunk_size: Optional[int] = None, backend: Optional[str] = None,
             return_steps: bool = False):
    """The CTS loss `sum_k loss_k / K` of one collated batch (docs/semantics.md §3).

    Args:
        model: an evofast-supported model with an output head (LLaDA, Dream / Qwen2, BERT-like
            MLMs), possibly wrapped by peft (LoRA unmerged) / DDP; patched on first use (`evofast.patch`).
        batch: the dict of `CTSCollator` (K = `next_positions.shape[1]`).
        k_soft: top-k of a soft token (3 in the paper).
        alphas: `(K, B)` mask weights in [0, 1); None draws U(0.5, 1.0) from `generator`.
        backward: run `(loss_k * grad_scale / K).backward()` after each step and return the
            detached total (same gradients, one step's activations alive at a time).
        grad_scale: multiplies the gradients of `backward=True` (e.g. 1 / gradient accumulation).
        mask_id: the mask id when the model is not patched yet and its config has none.
        chunk_size: rows per logits block of the fused cross-entropy (default: 64 MiB blocks, 256 MiB on a GPU).
        backend: evo_step / soft_embed backend (default: evofast's choice).
        return_steps: also return the K detached per-step losses.

    Returns the scalar fp32 loss (detached when `backward=True`), or `(loss, [loss_k])`.
    """
    traj = Trajectory(model, batch, k_soft, alphas, generator=generator, mask_id=mask_id, chunk_size=chunk_size,
                      backend=backend)
    K = traj.K
    total = torch.zeros((), dtype=torch.float32, device=traj.ids.device)
    steps = []
    for _ in range(K):
        loss_k = traj.step()
        if backward:
            if loss_k.requires_grad:
                (loss_k * (float(grad_scale) / K)).backward()
            loss_k = loss_k.detach()
        total = total + loss_k
        steps.append(loss_k.detach())
    loss = total / K
    return (loss, steps) if return_steps else loss
