"""`generate`: the decoding loop, composed of the pieces of this package."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from ..ops import _checks
from ..ops import evo_step as _evo_step
from .config import DecodeConfig, check_prompt
from .forward import ModelForward
from .observers import Observer, ProgressBar, StepOutput, TraceRecorder
from .policies import per_row, policy_for
from .state import DecodeState

__all__ = ["generate"]


@torch.no_grad()
def generate(model, input_ids: Tensor, attention_mask: Optional[Tensor] = None, gen_length: int = 128,
             block_length: int = 32, steps: int = 64, mode: str = "evotoken", k_soft: int = 3,
             alpha: float = 0.7, temperature: float = 0.0, remasking: str = "low_confidence",
             threshold: Optional[float] = None, cache: Optional[str] = None,
             generator: Optional[torch.Generator] = None, *, top_k: Optional[int] = None,
             top_p: Optional[float] = None, policy=None, cache_refresh: Optional[int] = None,
             compile: bool = False, progress: bool = False, return_trace: bool = False,
             backend: Optional[str] = None, stats: Optional[dict] = None,
             observers: Sequence[Observer] = ()):
    """Generate `gen_length` tokens after each prompt with EvoToken ("evotoken") or hard-mask ("hard") decoding.

    Args:
        model: a model `evofast.patch` supports (a peft PeftModel around one too), or an
            `evofast.models.base.Adapter`.
        input_ids: `(B, P)` prompts (a `(P,)` tensor is one prompt); unequal prompts
            left-padded, with `attention_mask`. Moved to the model's device.
        attention_mask: `(B, P)` 1 = token, 0 = pad, each row 0...0 1...1 (None: no padding).
        gen_length, block_length, steps: `gen_length % block_length == 0`, `steps` a multiple of
            the number of blocks and at most `gen_length`; each block gets steps / blocks steps.
        mode: "evotoken" (soft tokens and revision) or "hard" (the authors' plain
            masked-diffusion `generate`; k_soft / alpha unused).
        k_soft (1..16), alpha ([0, 1), the mask weight), temperature (>= 0, Gumbel-max in
        float64): docs/semantics.md.
        remasking: the confidence that ranks positions (and that the revision compares):
            "low_confidence" (the probability of the chosen token), "random" (uniform),
            "topk_margin" (top-1 minus top-2 probability) or "entropy" (the negative
            entropy of the distribution, <= 0).
        threshold: decode every eligible position at least this confident (the most
            confident one always) instead of the step schedule; a block then takes as many
            forwards as it needs (at most block_length), so `steps` sets nothing. In [0, 1]
            (<= 0 with remasking "entropy").
        top_k, top_p: sampling filters at temperature > 0 (nothing at 0): the draw keeps the
            `top_k` (>= 1) most likely tokens and / or the smallest most likely set whose
            probability reaches `top_p` (in (0, 1]); the confidence then measures that filtered,
            tempered distribution (Dream's convention). Fused backends do `top_k <= 64` in their
            single pass; `top_p` and larger `top_k` run the torch reference step.
        policy: which eligible positions a step decodes, instead of `threshold`: an
            `evofast.ops.STDD` (per-position thresholds that rise while a position's confidence
            still moves or disagrees with its neighbours; `STDD(tau, lam_t=0, lam_s=0)` is
            `threshold=tau` exactly) or an `evofast.decode.TransferPolicy` (`Schedule()`,
            `Threshold(tau)`, `Stdd(STDD(...))`). None: the step schedule, or `threshold`'s.
            Not together with `threshold`.
        cache: None (every forward runs the whole sequence), "prefix" (the prompt and finished
            blocks come from a KV cache) or "dual" (the suffix too; only the current block is
            run); approximate by design (`evofast.decode.cache_plan`). The adapter must list it
            in `cache_kinds`.
        cache_refresh: with a cache, also recompute the whole sequence every this many forwards
            (None: only at block starts).
        generator: draws when sampling (temperature > 0 or remasking "random").
        compile: run the forward through `torch.compile` (falls back to eager with a warning).
        progress: a tqdm bar over the forwards.
        return_trace: also return an `evofast.trace.Trace` of every step.
        backend: force an ops backend ("torch", "cpp", "triton", "cuda") for evo_step / soft_embed.
        stats: a dict to fill with `forwards` (model forwards of the batch) and `row_forwards`
            (per row, the forwards it took part in: its decoding steps).
        observers: `evofast.decode.Observer`s called at every step (timers, recorders).

    Returns:
        `(B, P + gen_length)` int64 on the model's device: the prompts (pads as given) and
        the generated tokens; with `return_trace`, `(out, trace)`.

    With temperature 0 and no cache each row is token for token what the authors' batch-1
    code gives for its unpadded prompt (docs/semantics.md, "Exactness"). Every argument is
    checked before the first forward (ValueError naming it).
    """
    config = DecodeConfig(gen_length=gen_length, block_length=block_length, steps=steps, mode=mode, k_soft=k_soft,
                          alpha=alpha, temperature=temperature, remasking=remasking, threshold=threshold,
                          top_k=top_k, top_p=top_p, policy=policy, cache=cache, cache_refresh=cache_refresh,
                          compile=compile, backend=backend)
    if generator is not None and not isinstance(generator, torch.Generator):
        _checks.fail("generator", f"expected a torch.Generator, got {type(generator).__name__}")
    if stats is not None and not isinstance(stats, dict):
        _checks.fail("stats", f"expected a dict to fill, got {type(stats).__name__}")
    adapter = _get_adapter(model)
    config.check_adapter(adapter)
    state = _start(adapter, config, input_ids, attention_mask)
    policy = policy_for(config.threshold, config.policy)
    watchers = list(observers) + ([ProgressBar(policy)] if progress else [])
    recorder = TraceRecorder() if return_trace else None
    if recorder is not None:
        watchers.append(recorder)
    forward = ModelForward(adapter, config, state)
    policy.start(state)
    for o in watchers:
        o.on_start(state)
    try:
        while (step := state.next_step()) is not None:
            _one_step(state, step, forward, policy, watchers, generator)
    finally:
        for o in watchers:
            o.on_end(state)
    if stats is not None:
        stats.update(forwards=state.forwards, row_forwards=list(state.row_forwards))
    out = state.output()
    return (out, recorder.trace) if return_trace else out


def _one_step(state: DecodeState, step, forward: ModelForward, policy, watchers, generator) -> None:
    """One forward and one evo_step on the rows still generating; the state moves on."""
    c = state.config
    xs, cs = step.rows_of(state.x), step.rows_of(state.conf)
    for o in watchers:
        o.before_forward(state, step)
    logits = forward(state, step, xs)
    for o in watchers:
        o.after_forward(state, step, logits)
    ids, w, transfer = _evo_step(
        logits, xs, cs, row0=step.row0, block_start=per_row(step.block_start if c.soft else step.block_end),
        block_end=per_row(step.block_end), prompt_len=state.P, mask_id=state.mask_id, k_soft=c.k_soft,
        alpha=c.alpha, temperature=c.temperature, remasking=c.remasking, top_k=c.top_k, top_p=c.top_p,
        generator=generator, backend=c.backend, check_ids=False,   # x is built here from checked prompts
        **policy.step_kwargs(state, step))
    policy.after_step(state, step)
    out = StepOutput(logits, ids, w, transfer)
    for o in watchers:
        o.after_evo_step(state, step, out)
    state.write_back(step, xs, cs)
    if c.soft:
        state.set_representation(step, ids, w)
    state.advance(step, xs)
    for o in watchers:
        o.end_of_step(state, step, out)


def _start(adapter, config: DecodeConfig, input_ids, attention_mask) -> DecodeState:
    """The state before the first forward, after the prompt's checks."""
    E = adapter.input_embeddings().weight
    input_ids, am, pads = check_prompt(input_ids, attention_mask, E.device)
    P = input_ids.shape[1]
    real = torch.ones_like(input_ids, dtype=torch.bool) if am is None else am.bool()
    bad = real & ((input_ids < 0) | (input_ids >= E.shape[0]))
    if bool(bad.any()):
        _checks.fail("input_ids", f"token ids must lie in [0, {E.shape[0]}), got {input_ids[bad][:8].tolist()}")
    max_len = adapter.max_length
    if max_len is not None and P + config.gen_length > max_len:
        _checks.fail("gen_length", f"prompt width ({P}{' with left padding' if any(pads) else ''}) + gen_length "
                                   f"({config.gen_length}) = {P + config.gen_length} exceeds the model's maximum "
                                   f"length {max_len}")
    return DecodeState(input_ids, am, pads, config, int(adapter.mask_id), E)


def _get_adapter(model):
    from ..models.base import Adapter
    if isinstance(model, Adapter):
        return model
    from ..models.registry import get_adapter
    return get_adapter(model)
