"""`evofast.generate`: blockwise EvoToken (and hard-mask) decoding, batched and exact.

The loop of spec/evotoken.md section 2, driven by `evofast.ops.evo_step` and
`evofast.ops.soft_embed`, with per-row state for a batch of B prompts:

* Blocks and schedule. Row r's sequence is its (left-padded) prompt then G mask
  tokens. Block b covers batch positions [P + b*Bk, P + (b+1)*Bk) for every row
  (P = the padded prompt width): a row with `pad` left pads has real prompt length
  P - pad, so its batch-1 block bounds shifted by `pad` are the same positions.
  At a block's start the row's masked count (always Bk: nothing writes a later
  block) is split over s = steps / blocks steps, the remainder one each to the
  earliest steps (spec 2.1).
* Rows move on independently. Every forward steps every row still generating:
  a row whose block holds no mask token after a step starts its next block at the
  next forward, whatever the other rows do; a row done with its last block drops
  out of the batch (the forward and the step run on the rows still generating, so
  a finished row never changes and costs nothing). Each row therefore sees
  exactly the sequence of forwards and steps of its batch-1 run.
* Window. A step can change rows from min(block start, first mask token left in
  the prompt) on (spec 2.2 item 2: prompt masks are eligible); with soft tokens
  every later row also gets a new representation, so the window is [row0, L)
  (hard mode: the step reads [row0, end of the block), nothing later matters).
  The model is asked for the logits of rows [row0, L) only (`logits_from`), and
  only window rows are post-processed; rows before the window are [Decode]
  (plain E[x]), row0 being the minimum over the rows still generating.
* Representation (spec 2.2 item 7/8). The ids / weights `evo_step` returns for
  the window are kept per row and position until that row's next step; the next
  forward embeds rows [soft_from, L) with `soft_embed` and the rows before with
  the plain embedding, where soft_from is the previous step's window start (below
  it everything is [Decode]). QUIRK 8 follows by itself: when a block ends, its
  rows keep the soft representation of its last step for the first forward of
  the next block, whose step then turns them into [Decode]. The very first
  forward reads plain token ids.
* Padding. Pad positions hold a non-mask id inside the loop (never eligible,
  restored on return), are hidden as attention keys (`attention_mask`, passed
  only when some row is padded), and each row's positions count from its first
  real token (`position_ids`), so a padded row computes what its unpadded
  batch-1 run computes.
* Hard mode (the authors' `generate`): the same loop with the revision off
  (`evo_step` with block_start = block_end, so no decoded row is after the frozen
  prefix) and plain token ids at every forward.

KV cache (`cache="prefix"` / `"dual"`, `evofast.cache.BlockKVCache`, one per call,
allocated before the first forward). A *refresh* forward runs the whole sequence
from exactly the inputs the uncached loop would use (QUIRK 8 included: at a
block's first step the previous block is still soft) and writes every position's
keys and values; its step is the uncached step. Refreshes happen at the first
step of every block of any row, when the set of rows still generating changes (the
cache's slots follow the active rows), every `cache_refresh` forwards, and when a
step's window reaches below the refreshed one. Between refreshes a forward runs
only the window: "prefix" the rows [lo, L) (lo = the window start at the refresh:
min(block start, first prompt mask)), "dual" the rows [lo, max block end); the
other rows' keys and values are read from the cache as the refresh left them.
The rows a forward computes are the only ones post-processed: with "dual" the
suffix [block end, L) keeps, for the whole block, the keys/values and the soft
representation of the block's first step. So a cache is approximate by design
(the prefix entries came from the block's soft first-step inputs, the suffix's
from masks the block has since decoded into), as for Fast-dLLM; it is exact in
that a cached forward over inputs equal to the refresh's gives the uncached
logits (fp32 rounding): `cache_refresh=1` gives `cache=None`'s tokens, and so
does `cache="prefix"` with one block on a one-layer model (deeper layers' prompt
keys attend to the changing generation).
In hard mode the window forward applies the LM head to [row0, max block end) only.

`compile=True` runs the forward through `torch.compile` (mode "reduce-overhead",
i.e. CUDA graphs, on CUDA; the dual-cache window has one static shape); where
compiling fails the call warns once and runs eagerly.

A block normally ends within its s steps; when mask tokens in the prompt take
part of a step's transfers (infilling), the schedule can run out first (the
authors' code then fails with an IndexError): every further step transfers one
token. With a threshold the schedule is not used (spec 2.2 item 5).
"""
from __future__ import annotations

import numbers
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .ops import _checks
from .ops import evo_step as _evo_step
from .ops import soft_embed as _soft_embed

__all__ = ["generate", "MODES", "CACHES"]

MODES = ("evotoken", "hard")
CACHES = (None, "prefix", "dual")


def _fail(name: str, problem: str):
    raise ValueError(f"{name}: {problem}")


def _get_adapter(model):
    from .models.base import Adapter
    if isinstance(model, Adapter):
        return model
    from .models.registry import get_adapter
    return get_adapter(model)


def _positive_int(name, v) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        _fail(name, f"expected an int, got {v!r}")
    if v < 1:
        _fail(name, f"must be >= 1, got {v}")
    return int(v)


def _check_mode_args(mode, k_soft, alpha, temperature, remasking, threshold, cache, generator):
    if mode not in MODES:
        _fail("mode", f"must be one of {MODES}, got {mode!r}")
    if cache not in CACHES:
        _fail("cache", f"must be one of {CACHES}, got {cache!r}")
    k_soft = _checks.integer("k_soft", k_soft, 1, 16)
    alpha = _checks.real("alpha", alpha, 0.0, 1.0, hi_open=True)
    temperature = _checks.real("temperature", temperature, 0.0)
    if remasking not in ("low_confidence", "random"):
        _fail("remasking", f"must be 'low_confidence' or 'random', got {remasking!r}")
    if threshold is not None:
        threshold = _checks.real("threshold", threshold)
    if generator is not None and not isinstance(generator, torch.Generator):
        _fail("generator", f"expected a torch.Generator, got {type(generator).__name__}")
    return k_soft, alpha, temperature, threshold


def _check_lengths(gen_length, block_length, steps):
    gen_length = _positive_int("gen_length", gen_length)
    block_length = _positive_int("block_length", block_length)
    steps = _positive_int("steps", steps)
    if gen_length % block_length:
        _fail("gen_length", f"must be a multiple of block_length={block_length}, got {gen_length}")
    blocks = gen_length // block_length
    if steps % blocks:
        _fail("steps", f"must be a multiple of the number of blocks gen_length / block_length = {blocks}, "
                       f"got {steps}")
    if steps > gen_length:
        _fail("steps", f"must not exceed gen_length={gen_length} (at least one token per step), got {steps}")
    return gen_length, block_length, steps, blocks


def _check_prompt(input_ids, attention_mask, device):
    if not isinstance(input_ids, Tensor):
        _fail("input_ids", f"expected a (B, P) LongTensor, got {type(input_ids).__name__}")
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.dim() != 2:
        _fail("input_ids", f"expected shape (B, P), got {tuple(input_ids.shape)}")
    if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
        _fail("input_ids", f"expected an integer tensor, got dtype {input_ids.dtype}")
    B, P = input_ids.shape
    if B == 0:
        _fail("input_ids", "empty batch")
    if P == 0:
        _fail("input_ids", "empty prompt (generation needs at least one prompt token)")
    input_ids = input_ids.to(device=device, dtype=torch.long)
    if attention_mask is None:
        return input_ids, None, [0] * B
    if not isinstance(attention_mask, Tensor):
        _fail("attention_mask", f"expected a (B, P) tensor, got {type(attention_mask).__name__}")
    if tuple(attention_mask.shape) != (B, P):
        _fail("attention_mask", f"expected shape {(B, P)} like input_ids, got {tuple(attention_mask.shape)}")
    am = attention_mask.detach().to("cpu")
    if not bool(((am == 0) | (am == 1)).all()):
        _fail("attention_mask", "values must be 0 (pad) or 1 (token)")
    am = am.to(torch.long)
    if bool((am[:, 1:] < am[:, :-1]).any()):
        bad = int((am[:, 1:] < am[:, :-1]).any(dim=1).nonzero()[0])
        _fail("attention_mask", f"row {bad} is not left-padded (must be 0...0 1...1, pads first): "
                                f"{am[bad].tolist()}")
    real = am.sum(dim=1)
    if bool((real == 0).any()):
        bad = int((real == 0).nonzero()[0])
        _fail("input_ids", f"row {bad} has an empty prompt (its attention_mask is all zeros)")
    pads = (P - real).tolist()
    if not any(pads):
        return input_ids, None, pads
    return input_ids, am.to(device), pads


@torch.no_grad()
def generate(model, input_ids: Tensor, attention_mask: Optional[Tensor] = None, gen_length: int = 128,
             block_length: int = 32, steps: int = 64, mode: str = "evotoken", k_soft: int = 3,
             alpha: float = 0.7, temperature: float = 0.0, remasking: str = "low_confidence",
             threshold: Optional[float] = None, cache: Optional[str] = None,
             generator: Optional[torch.Generator] = None, *, cache_refresh: Optional[int] = None,
             compile: bool = False, progress: bool = False, return_trace: bool = False,
             backend: Optional[str] = None, stats: Optional[dict] = None):
    """Generate `gen_length` tokens after each prompt with EvoToken ("evotoken") or hard-mask ("hard") decoding.

    Args:
        model: a model `evofast.patch` supports (or an `evofast.models.base.Adapter`).
        input_ids: `(B, P)` prompts (a `(P,)` tensor is one prompt); unequal prompts
            left-padded, with `attention_mask`. Moved to the model's device.
        attention_mask: `(B, P)` 1 = token, 0 = pad, each row 0...0 1...1 (None: no padding).
        gen_length, block_length, steps: `gen_length % block_length == 0`, `steps` a multiple of
            the number of blocks and at most `gen_length`.
        mode: "evotoken" (soft tokens and revision, spec 2) or "hard" (the authors' plain
            masked-diffusion `generate`; k_soft / alpha unused).
        k_soft (1..16), alpha ([0, 1), the mask weight), temperature (>= 0, Gumbel-max in
        float64), remasking ("low_confidence" | "random"), threshold (confidence-threshold
        parallel decoding; None: the step schedule), generator (draws when sampling): spec 2.2.
        cache: None (every forward runs the whole sequence), "prefix" (the prompt and finished
            blocks come from a KV cache) or "dual" (the suffix too; only the current block is
            run); see the module docstring. The adapter must list it in `cache_kinds`.
        cache_refresh: with a cache, also recompute the whole sequence every this many forwards
            (None: only at block starts).
        compile: run the forward through `torch.compile` (falls back to eager with a warning).
        progress: a tqdm bar over the forwards (steps).
        return_trace: also return an `evofast.trace.Trace` of every step.
        backend: force an ops backend ("torch", "cpp", "triton", "cuda") for evo_step / soft_embed.
        stats: a dict to fill with `forwards` (model forwards of the batch) and `row_forwards`
            (per row, the forwards it took part in: its decoding steps).

    Returns:
        `(B, P + gen_length)` int64 on the model's device: the prompts (pads as given) and
        the generated tokens; with `return_trace`, `(out, trace)`.

    With temperature 0 each row is token for token what the authors' batch-1 code gives
    for its unpadded prompt (spec 2, QUIRKs included). Every argument is checked before
    the first forward (ValueError naming it).
    """
    # ---- checks, all before any forward
    k_soft, alpha, temperature, threshold = _check_mode_args(
        mode, k_soft, alpha, temperature, remasking, threshold, cache, generator)
    gen_length, block_length, steps, blocks = _check_lengths(gen_length, block_length, steps)
    adapter = _get_adapter(model)
    if cache is not None and cache not in adapter.cache_kinds:
        have = ", ".join(map(repr, adapter.cache_kinds)) or "no KV cache"
        _fail("cache", f"cache={cache!r} is not available for {type(adapter.model).__name__} "
                       f"(evofast's {adapter.name} adapter supports {have}); use cache=None")
    if cache_refresh is not None:
        if cache is None:
            _fail("cache_refresh", "needs a cache ('prefix' or 'dual'); got cache=None")
        cache_refresh = _positive_int("cache_refresh", cache_refresh)
    if not isinstance(compile, bool):
        _fail("compile", f"expected a bool, got {compile!r}")
    if stats is not None and not isinstance(stats, dict):
        _fail("stats", f"expected a dict to fill, got {type(stats).__name__}")
    E = adapter.input_embeddings().weight
    device = E.device
    V = int(adapter.vocab_size)
    M = int(adapter.mask_id)
    if not 0 <= M < V:
        _fail("mask_id", f"the model's mask id {M} lies outside its vocabulary [0, {V})")
    if E.shape[0] < V:
        _fail("model", f"its input embedding has {E.shape[0]} rows, fewer than the {V} logits columns "
                       "(soft tokens could name ids it cannot embed)")
    if mode == "evotoken" and k_soft >= V:
        _fail("k_soft", f"must be smaller than the vocabulary size {V}, got {k_soft}")
    input_ids, am, pads = _check_prompt(input_ids, attention_mask, device)
    B, P = input_ids.shape
    real = torch.ones(B, P, dtype=torch.bool, device=device) if am is None else am.bool()
    bad_ids = real & ((input_ids < 0) | (input_ids >= E.shape[0]))
    if bool(bad_ids.any()):
        _fail("input_ids", f"token ids must lie in [0, {E.shape[0]}), got {input_ids[bad_ids][:8].tolist()}")
    max_len = adapter.max_length
    if max_len is not None and P + gen_length > max_len:
        _fail("gen_length", f"prompt width ({P}{' with left padding' if any(pads) else ''}) + gen_length "
                            f"({gen_length}) = {P + gen_length} exceeds the model's maximum length {max_len}")

    # ---- state
    L = P + gen_length
    s = steps // blocks
    base, extra = divmod(block_length, s)
    schedule = [base + (t < extra) for t in range(s)]          # the same for every row (spec 2.1)
    x = torch.full((B, L), M, dtype=torch.long, device=device)
    x[:, :P] = input_ids
    pad_fill = 0 if M != 0 else 1
    if am is not None:                                           # pads: never eligible, never masked
        x[:, :P] = torch.where(real, input_ids, torch.full_like(input_ids, pad_fill))
        full_mask = torch.cat([am, torch.ones(B, gen_length, dtype=am.dtype, device=device)], dim=1)
        position_ids = (full_mask.cumsum(dim=1) - 1).clamp_min(0)
    else:
        full_mask = position_ids = None
    conf = torch.zeros(B, L, dtype=torch.float64, device=device)
    prompt_masks = (x[:, :P] == M) & real
    first_pm = [L] * B                                           # first mask left in each prompt (L: none)
    if bool(prompt_masks.any()):
        has = prompt_masks.any(dim=1).tolist()
        idx = prompt_masks.to(torch.int8).argmax(dim=1).tolist()
        first_pm = [i if h else L for i, h in zip(idx, has)]
    track_prompt_masks = any(f < P for f in first_pm)

    blk = [0] * B                                                # current block per row (blocks = done)
    step_in_block = [0] * B
    row_forwards = [0] * B
    soft = mode == "evotoken"
    rep_ids = rep_w = None                                       # (B, L, k + 1), made at the first step
    soft_from = L                                                # rows below it are plain E[x]
    trace = None
    if return_trace:
        from .trace import Trace
        trace = Trace(mode=mode, mask_id=M, prompt_length=P, gen_length=gen_length, block_length=block_length,
                      steps_per_block=s, k_soft=k_soft, alpha=alpha, pad=list(pads))
        _record(trace, -1, [], [-1] * B, (L, L), x, conf, None, None, M, k_soft)

    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=steps, desc="evofast generate", unit="step")

    pos = torch.arange(L, device=device)
    kv = adapter.new_cache(B, L) if cache is not None else None
    fwd = _Forward(adapter, compile, cache, kv)
    kv_rows = None                                               # the rows whose slots the cache holds
    lo = L                                                       # window start at the last refresh
    since = 0                                                    # forwards since the last refresh
    forward_index = 0
    try:
        while True:
            act = [r for r in range(B) if blk[r] < blocks]
            if not act:
                break
            all_rows = len(act) == B
            bs = [P + blk[r] * block_length for r in act]
            be = [b + block_length for b in bs]
            row0 = min(min(bs), min(first_pm[r] for r in act))
            end = L if soft else max(be)
            sel = None if all_rows else torch.tensor(act, device=device)

            def rows_of(t):
                return t if sel is None else t.index_select(0, sel)

            # ---- forward on the rows still generating, logits of the window rows only
            xs = rows_of(x)
            kw = {}
            if full_mask is not None:
                kw = dict(attention_mask=rows_of(full_mask), position_ids=rows_of(position_ids))

            def inputs(a, b):
                """Model inputs of rows [a, b): plain E[x] below soft_from, soft tokens from it."""
                if soft_from >= b:
                    return dict(input_ids=xs[:, a:b])
                cut = max(a, soft_from)
                mixed = _soft_embed(E, rows_of(rep_ids[:, cut:b]), rows_of(rep_w[:, cut:b]),
                                    backend=backend, check_ids=False)
                if cut == a:
                    return dict(inputs_embeds=mixed.to(E.dtype))
                plain = F.embedding(xs[:, a:cut], E)
                return dict(inputs_embeds=torch.cat([plain, mixed.to(plain.dtype)], dim=1))

            if kv is None:
                logits = fwd(**inputs(0, L), logits_from=row0, **kw)
                want = L
            else:
                refresh = (kv_rows != act or row0 < lo or any(step_in_block[r] == 0 for r in act)
                           or (cache_refresh is not None and since >= cache_refresh))
                if refresh:                                      # the whole sequence, as uncached
                    lo, kv_rows, since = row0, list(act), 0
                    a, b, want = 0, L, end
                else:                                            # the window only, the rest from the cache
                    a, b = max(0, lo - adapter.cache_lead), (L if cache == "prefix" else max(be))
                    want = min(b, end)
                logits = fwd(**inputs(a, b), cache=kv, start=a, logits_from=row0, logits_to=want, **kw)
                kv.mark(a, b, forward_index)
                since += 1
            if logits.shape[1] != want - row0:
                raise RuntimeError(f"the adapter returned logits for {logits.shape[1]} rows, expected {want - row0} "
                                   f"(rows [{row0}, {want}))")
            if logits.dtype == torch.float64:
                logits = logits.float()
            lg = logits if want <= end else logits[:, :end - row0]

            # ---- one step (spec 2.2 items 2-7) on those rows
            nt = [schedule[step_in_block[r]] if step_in_block[r] < s else 1 for r in act]
            cs = rows_of(conf)
            ids, w, transfer = _evo_step(
                lg, xs, cs, _per_row(nt, device), row0=row0,
                block_start=_per_row(bs if soft else be, device), block_end=_per_row(be, device),
                prompt_len=P, mask_id=M, k_soft=k_soft, alpha=alpha, temperature=temperature,
                remasking=remasking, threshold=threshold, generator=generator, backend=backend,
                check_ids=False)                                 # x is built here from checked prompts
            if sel is not None:                                  # write the rows back
                x.index_copy_(0, sel, xs)
                conf.index_copy_(0, sel, cs)

            # ---- the representation the next forward reads
            if soft:
                if rep_ids is None:
                    rep_ids = torch.zeros(B, L, k_soft + 1, dtype=torch.long, device=device)
                    rep_ids[..., k_soft] = x
                    rep_w = torch.zeros(B, L, k_soft + 1, dtype=w.dtype, device=device)
                    rep_w[..., k_soft] = 1
                hi = row0 + ids.shape[1]                         # < L: a dual-cache step (suffix kept)
                if sel is None:
                    rep_ids[:, row0:hi] = ids
                    rep_w[:, row0:hi] = w
                    if soft_from < row0:                         # below the window: [Decode]
                        rep_w[:, soft_from:row0] = _one_hot_last(k_soft, w.dtype, device)
                else:
                    rep_ids[sel, row0:hi] = ids
                    rep_w[sel, row0:hi] = w
                    if soft_from < row0:
                        rep_w[sel, soft_from:row0] = _one_hot_last(k_soft, w.dtype, device)
                soft_from = row0

            # ---- per row: block done? (one host sync per step)
            if all(b == bs[0] for b in bs):
                counts = (xs[:, bs[0]:bs[0] + block_length] == M).sum(dim=1)
            else:
                bs_t = torch.tensor(bs, device=device)[:, None]
                counts = ((xs == M) & (pos >= bs_t) & (pos < bs_t + block_length)).sum(dim=1)
            if track_prompt_masks:
                pm = (xs[:, :P] == M) & rows_of(real)
                first = torch.where(pm.any(dim=1), pm.to(torch.int8).argmax(dim=1), L)
                counts = torch.stack([counts, first])
            counts = counts.tolist()
            left = counts[0] if track_prompt_masks else counts
            if trace is not None:
                _record(trace, forward_index, act, [blk[r] if blk[r] < blocks else -1 for r in range(B)],
                        (row0, row0 + lg.shape[1]), x, conf, rep_ids if soft else None,
                        rep_w if soft else None, M, k_soft,
                        lg=lg, temperature=temperature)
            for j, r in enumerate(act):
                step_in_block[r] += 1
                row_forwards[r] += 1
                if track_prompt_masks:
                    first_pm[r] = counts[1][j]
                if left[j] == 0:
                    blk[r] += 1
                    step_in_block[r] = 0
            forward_index += 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(block=f"{min(min(blk), blocks - 1) + 1}/{blocks}", refresh=False)
    finally:
        if bar is not None:
            if bar.n != bar.total:
                bar.total = bar.n
                bar.refresh()
            bar.close()

    out = x
    if am is not None:
        out[:, :P] = torch.where(real, out[:, :P], input_ids)   # pads as given (prompt masks stay filled)
    if stats is not None:
        stats.update(forwards=forward_index, row_forwards=row_forwards)
    return (out, trace) if return_trace else out


class _Forward:
    """The adapter's forward (`forward`, or `forward_cached` with a cache), through
    `torch.compile` when asked; a compile failure warns once and runs eagerly from then on."""

    #: graphs per call: a prefix / dual window starts at every block (ints are specialised)
    RECOMPILE_LIMIT = 256

    def __init__(self, adapter, compile: bool, cache: Optional[str], kv=None):
        self.eager = adapter.forward if cache is None else adapter.forward_cached
        self.compiled = None
        if compile:
            try:
                on_cuda = adapter.input_embeddings().weight.is_cuda
                if on_cuda and kv is not None:                   # CUDA graphs may then write them in place
                    for t in kv.keys + kv.values:
                        torch._dynamo.mark_static_address(t)
                self.compiled = torch.compile(self.eager, mode="reduce-overhead" if on_cuda else None,
                                              dynamic=False if cache == "dual" else None)
            except Exception as e:                               # noqa: BLE001 (any failure: eager)
                self._fall_back(e)

    def _fall_back(self, err):
        import warnings
        warnings.warn(f"evofast.generate(compile=True): torch.compile is unavailable here "
                      f"({type(err).__name__}: {err}); running eagerly", RuntimeWarning, stacklevel=3)
        self.compiled = None

    def __call__(self, **kw):
        if self.compiled is not None:
            try:
                with torch._dynamo.config.patch(recompile_limit=self.RECOMPILE_LIMIT):
                    return self.compiled(**kw)
            except Exception as e:                               # noqa: BLE001
                self._fall_back(e)
        return self.eager(**kw)


def _per_row(values, device):
    """Per-row ints -> an int when they are all equal (no tensor), else a (B,) tensor."""
    first = values[0]
    if all(v == first for v in values):
        return first
    return torch.tensor(values, dtype=torch.long)


_ONE_HOT = {}


def _one_hot_last(k_soft, dtype, device):
    key = (k_soft, dtype, device)
    t = _ONE_HOT.get(key)
    if t is None:
        t = _ONE_HOT[key] = torch.zeros(k_soft + 1, dtype=dtype, device=device)
        t[k_soft] = 1
    return t


def _record(trace, step, act, block, window, x, conf, rep_ids, rep_w, M, k, *, lg=None, temperature=0.0):
    """Append one TraceStep to `trace`: CPU copies of the state after the step of the rows `act`
    (lg: their window logits, (len(act), R, V) from row window[0]; None before the first forward)."""
    from .trace import TraceStep, state_of
    B, L = x.shape
    row0 = window[0]
    xc = x.detach().to("cpu").clone()
    if rep_w is None:
        rid = torch.zeros(B, L, k + 1, dtype=torch.long)
        rid[..., k] = xc
        rw = torch.zeros(B, L, k + 1, dtype=torch.float32)
        rw[..., k] = 1
    else:
        rid = rep_ids.detach().to("cpu").clone()
        rw = rep_w.detach().to("cpu", torch.float32)
    topk_ids = torch.full((B, L, k), -1, dtype=torch.long)
    topk_p = torch.full((B, L, k), float("nan"), dtype=torch.float32)
    transfer = torch.zeros(B, L, dtype=torch.bool)
    if lg is not None:                                           # row by row: no (B, R, V) temporaries
        R = lg.shape[1]
        for j, r in enumerate(act):
            lr = lg[j].float()
            if temperature == 0:                                 # as the step: M out of the softmax
                lr = lr.clone()
                lr[:, M] = -torch.inf
            top, ti = lr.topk(k, dim=-1)
            tp = (top - torch.logsumexp(lr, dim=-1, keepdim=True)).exp()
            topk_ids[r, row0:row0 + R] = ti.cpu()
            topk_p[r, row0:row0 + R] = tp.cpu()
        prev = trace.records[-1].x
        transfer = (prev == M) & (xc != M)
    state = state_of(xc, None if rep_w is None else rw, M)
    trace.records.append(TraceStep(step=step, rows=list(act), block=list(block), window=tuple(window),
                                   x=xc, conf=conf.detach().to("cpu").clone(), state=state, rep_ids=rid,
                                   rep_w=rw, transfer=transfer, topk_ids=topk_ids, topk_p=topk_p))
