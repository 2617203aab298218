"""`evofast bench generate`: end-to-end decoding, evofast.generate (with and without its KV cache) vs the authors' loop.

What is timed: one whole generation (greedy, k_soft 3, alpha 0.7, low-confidence
remasking, the step schedule) of B random prompts with evofast's LLaDA
architecture and random weights, for every configuration

  mode      evotoken (soft tokens) | hard (plain masked diffusion)     --modes
  cache     none | prefix | dual (evofast.generate(cache=...))         --caches
  B         batch sizes                                                --batch-sizes
  provider  authors          the authors' loop re-stated (batch 1, so one run per
                             prompt; no cache): every forward computes all L rows'
                             logits, the soft input is the spec formula over all L
                             rows, the step is `baselines.authors_step` (float64
                             softmax and top-k over all L rows).
            evofast-<name>   `evofast.generate(..., backend=name)`.      --backends

Per configuration: the median (p20, p80) seconds of a generation, tokens/s = B x
gen / median, ms/step = median / forwards, from one more (instrumented) run whose
forwards and `evo_step` calls are bracketed by device synchronisations: the share
of a step outside the model forward and the share inside `evo_step` (the EvoToken
post-processing), the peak memory of that run (CUDA: `max_memory_allocated` above
the model; CPU: the peak resident set above the start, sampled every 2 ms) and the
KV cache's size. `check` compares tokens with the authors' loop (cache none); a
cache is approximate by design, so cached rows give the share of tokens equal to
the uncached evofast run instead. `--plot FILE.png` draws tokens/s by configuration.

Shapes: tiny (V 1000, seconds), cpu (d_model 64, 2 layers, V 126464, prompt 64,
gen 128, block 32, steps 64, B 1: the CPU targets: evofast >= 3x the authors, prefix
>= 2x no cache, dual more again), llada-8b (LLaDA-8B layer shapes, bf16 random
weights built on the meta device then filled on the GPU, prompt 512, gen 256, block
32, steps 256, B 1: prefix >= 3x and dual >= 5x the authors' loop, evo_step < 2% of a
step).
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from typing import Optional

import torch

from .. import baselines
from ..ops import _backend
from ..ops import backends as evofast_backends
from . import _common

HELP = ("end-to-end generation: evofast.generate (cache none/prefix/dual) vs the authors' loop "
        "(tokens/s, ms/step, evo_step share, peak memory, plot)")
K_SOFT, ALPHA = 3, 0.7
AUTHORS = "authors"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MODES = ("evotoken", "hard")
CACHES = ("none", "prefix", "dual")


@dataclass(frozen=True)
class GenShape:
    name: str
    vocab: int
    d_model: int
    n_layers: int
    n_heads: int
    mlp: Optional[int]           # MLP width (None: 3 x d_model)
    prompt: int
    gen: int
    block: int
    steps: int
    batches: tuple
    repeat: int                  # timed generations per measurement (default)
    authors_max_batch: int       # the authors' batch-1 loop is timed up to this B

    @property
    def length(self) -> int:
        return self.prompt + self.gen

    @property
    def mask_id(self) -> int:
        return 126336 if self.vocab > 126336 else self.vocab - 1


SHAPES = {
    "tiny": GenShape("tiny", 1000, 32, 2, 4, None, 16, 32, 8, 16, (1, 2), 3, 2),
    "cpu": GenShape("cpu", 126464, 64, 2, 4, None, 64, 128, 32, 64, (1,), 3, 1),
    "llada-8b": GenShape("llada-8b", 126464, 4096, 32, 32, 12288, 512, 256, 32, 256, (1,), 3, 1),
}


def build_model(shape: GenShape, device: torch.device, dtype: torch.dtype, seed: int = 0,
                fast_init: Optional[bool] = None):
    """A random-weight evofast LLaDA model of the shape, in eval mode, on `device`.

    `fast_init` (default: off the CPU): `llada.random_weights` (built on the meta
    device, filled on `device` in `dtype`: an 8B model in seconds, not minutes).
    Otherwise `llada.tiny` (LLaDA's own init)."""
    from ..models import llada

    if not (device.type != "cpu" if fast_init is None else fast_init):
        kw = dict(vocab_size=shape.vocab, d_model=shape.d_model, n_layers=shape.n_layers, n_heads=shape.n_heads,
                  seed=seed)
        if shape.mlp is not None:
            kw["mlp_hidden_size"] = shape.mlp
        return llada.tiny(dtype=dtype, **kw)
    cfg = llada.LLaDAConfig(vocab_size=shape.vocab, embedding_size=shape.vocab, d_model=shape.d_model,
                            n_layers=shape.n_layers, n_heads=shape.n_heads, n_kv_heads=shape.n_heads,
                            mlp_hidden_size=shape.mlp or 3 * shape.d_model, mask_token_id=shape.mask_id)
    return llada.random_weights(cfg, device, dtype, seed)


# --------------------------------------------------------------------------- instrumentation
class SyncTimer:
    """Seconds spent inside the wrapped calls, each bracketed by device synchronisations (the
    authors' loop takes it as its forward timer; evofast.generate takes a `StepTimer` observer)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.seconds = 0.0
        self.calls = 0

    def __call__(self, fn, *args, **kwargs):
        _common.synchronize(self.device)
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        _common.synchronize(self.device)
        self.seconds += time.perf_counter() - t0
        self.calls += 1
        return out


# --------------------------------------------------------------------------- one case
def provider_names() -> list:
    return [AUTHORS, *(f"evofast-{b}" for b in _backend.BACKENDS)]


def backend_skip_reason(name: str, device: torch.device) -> Optional[str]:
    if device.type == "cpu" and name == "triton":
        return "Triton on CPU tensors runs only in the interpreter, whose timings mean nothing"
    if name not in evofast_backends() or not _backend.usable(name, device):
        return f"not usable on {device.type} here (see evofast.ops.backends())"
    return None


def default_providers(device: torch.device) -> list:
    """The authors' loop and evofast with the backend "auto" picks."""
    return [AUTHORS, f"evofast-{_backend.resolve(device, 'auto')}"]


def bench_case(shape: GenShape, B: int, model, device: torch.device, providers: list, timing: dict, log,
               seed: int = 0, modes=("evotoken",), caches=("none",), compile: bool = False) -> list:
    """Rows for batch size B: per mode, the authors' loop then every evofast provider x cache."""
    from ..cache import BlockKVCache
    from ..decode import StepTimer, generate
    from ..models.registry import get_adapter

    gen = torch.Generator(device="cpu").manual_seed(seed + B)
    M = shape.mask_id
    prompts = torch.randint(0, M, (B, shape.prompt), generator=gen).to(device)
    kw = dict(gen_length=shape.gen, block_length=shape.block, steps=shape.steps)
    adapter = get_adapter(model)
    layers, heads, head_dim = adapter.cache_layout()
    cache_mib = BlockKVCache.size_of(layers, B, heads, shape.length, head_dim,
                                     adapter.input_embeddings().weight.dtype) / 2**20
    rows = []
    base = {"shape": shape.name, "B": B, "V": shape.vocab, "d_model": shape.d_model, "layers": shape.n_layers,
            "prompt": shape.prompt, "gen": shape.gen, "block": shape.block, "steps": shape.steps}
    for mode in modes:
        outputs = {}
        configs = [(p, "none") for p in providers if p == AUTHORS]
        configs += [(p, c) for p in providers if p != AUTHORS for c in caches]
        for name, cache in configs:
            row = {**base, "mode": mode, "cache": cache, "provider": name,
                   "cache_mib": cache_mib if cache != "none" else 0.0}
            rows.append(row)
            label = f"B={B} {mode} {name} cache={cache}"
            if name == AUTHORS:
                if B > shape.authors_max_batch:
                    row.update(skipped=True, note=f"batch-1 code, not timed above B={shape.authors_max_batch} "
                                                  "(it runs the prompts one after another)")
                    log(f"  {label}: skipped ({row['note']})")
                    continue

                def run(probe=None, mode=mode):
                    return torch.cat([baselines.authors_generate(model, prompts[b:b + 1], mask_id=M, timer=probe,
                                                                 mode=mode, k_soft=K_SOFT, alpha=ALPHA, **kw)
                                      for b in range(B)])
                probe = SyncTimer(device)
            else:
                backend = name.removeprefix("evofast-")
                why = backend_skip_reason(backend, device)
                if why:
                    row.update(skipped=True, note=why)
                    log(f"  {label}: skipped ({why})")
                    continue

                def run(probe=None, backend=backend, mode=mode, cache=cache):
                    return generate(model, prompts, backend=backend, mode=mode, k_soft=K_SOFT, alpha=ALPHA,
                                    cache=None if cache == "none" else cache, compile=compile,
                                    observers=() if probe is None else (probe,), **kw)
                probe = StepTimer(device)
            try:
                with _common.PeakMemory(device) as mem:
                    t0 = time.perf_counter()
                    outputs[(name, cache)] = run(probe)           # instrumented run (also the warm-up)
                    _common.synchronize(device)
                    total = time.perf_counter() - t0
                t = _common.measure(run, device=device, warmup=timing["warmup"], repeat=timing["repeat"],
                                    budget_s=timing["budget_s"], min_repeat=1, max_repeat=50,
                                    retry_busy=timing["retry_busy"])
            except Exception as err:                               # noqa: BLE001 - reported, not fatal
                row.update(skipped=True, note=f"failed: {type(err).__name__}: {str(err).splitlines()[0][:160]}")
                log(f"  {label}: {row['note']}")
                continue
            row.update(t.summary())
            forwards, forward_s = (probe.calls, probe.seconds) if name == AUTHORS else (probe.forwards, probe.forward_s)
            row["forwards"] = forwards
            row["median_s"] = t.median_ms / 1e3
            row["ms_per_step"] = t.median_ms / max(forwards, 1)
            row["tokens_per_s"] = B * shape.gen / (t.median_ms / 1e3)
            row["outside_pct"] = 100.0 * max(total - forward_s, 0.0) / total
            row["outside_ms_per_step"] = 1e3 * max(total - forward_s, 0.0) / max(forwards, 1)
            row["evo_step_pct"] = 100.0 * probe.evo_step_s / total if name != AUTHORS else None
            row["peak_mib"] = mem.mib
            log(f"  {label}: {row['median_s']:.2f} s/generation, {row['ms_per_step']:.1f} ms/step, "
                f"{row['tokens_per_s']:.1f} tokens/s, {row['outside_pct']:.1f}% outside the forward"
                + (f", evo_step {row['evo_step_pct']:.1f}%" if row["evo_step_pct"] is not None else ""))
        _compare(rows, outputs, mode, B)
    return rows


def _compare(rows: list, outputs: dict, mode: str, B: int) -> None:
    """Speedups and token checks of one (mode, B) group of rows."""
    group = [r for r in rows if r["mode"] == mode and r["B"] == B and not r.get("skipped")]
    ref = outputs.get((AUTHORS, "none"))
    ref_time = next((r["median_ms"] for r in group if r["provider"] == AUTHORS), None)
    for r in group:
        key = (r["provider"], r["cache"])
        none = next((x for x in group if x["provider"] == r["provider"] and x["cache"] == "none"), None)
        if ref_time:
            r["speedup"] = ref_time / r["median_ms"]
        if none is not None:
            r["vs_no_cache"] = none["median_ms"] / r["median_ms"]
        out = outputs[key]
        if r["provider"] == AUTHORS:
            r["check"] = "reference"
        elif r["cache"] == "none":
            r["check"] = "-" if ref is None else ("ok" if torch.equal(out, ref) else
                                                  f"DIFF ({int((out != ref).sum())} tokens)")
        else:
            base = outputs.get((r["provider"], "none"), ref)
            if base is None:
                r["check"] = "-"
            else:
                gen_cols = out.shape[1] - rows[0]["prompt"]
                same = (out[:, -gen_cols:] == base[:, -gen_cols:]).float().mean().item()
                r["same_tokens_pct"] = 100.0 * same
                r["check"] = f"approx ({100 * same:.0f}% same)"


# --------------------------------------------------------------------------- command line
COLUMNS = [("B", "B"), ("mode", "mode"), ("provider", "provider"), ("cache", "cache"), ("median_s", "s/gen"),
           ("p20_ms", "p20 ms"), ("p80_ms", "p80 ms"), ("reps", "reps"), ("forwards", "steps"),
           ("ms_per_step", "ms/step"), ("tokens_per_s", "tokens/s"), ("outside_pct", "% outside fwd"),
           ("evo_step_pct", "% evo_step"), ("peak_mib", "peak MiB"), ("cache_mib", "cache MiB"),
           ("speedup", "speedup"), ("vs_no_cache", "vs none"), ("check", "check")]


def render(rows: list) -> str:
    timed = [r for r in rows if not r.get("skipped")]
    text = [_common.format_table(timed, COLUMNS)] if timed else ["(nothing timed)"]
    skipped = [f"  B={r['B']} {r['mode']} {r['provider']} cache={r['cache']}: {r['note']}"
               for r in rows if r.get("skipped")]
    if skipped:
        text.append("not timed:\n" + "\n".join(skipped))
    return "\n\n".join(text)


def _best(rows: list, B: int, mode: str, cache: str) -> Optional[dict]:
    cands = [r for r in rows if not r.get("skipped") and r["provider"].startswith("evofast-") and r["B"] == B
             and r["mode"] == mode and r["cache"] == cache]
    return min(cands, key=lambda r: r["median_ms"]) if cands else None


def targets(rows: list, shape: GenShape, device: torch.device) -> list:
    """The project's targets for whole generations (evofast vs the authors' loop; the caches)."""
    out = []

    def goal(what, value, target, unit="x", below=False):
        out.append({"what": what, "value": value, "target": target, "unit": unit,
                    "met": value < target if below else value >= target, **({"below": True} if below else {})})

    for mode in MODES:
        none, prefix, dual = (_best(rows, 1, mode, c) for c in CACHES)
        if device.type == "cpu" and shape.name == "cpu":
            if mode == "evotoken" and none and none.get("speedup") is not None:
                goal(f"{none['provider']} vs the authors' loop, cpu shape B=1 {mode}", none["speedup"], 3.0)
            if none and prefix:
                goal(f"prefix cache vs no cache, cpu shape B=1 {mode}", none["median_ms"] / prefix["median_ms"], 2.0)
            if prefix and dual:
                goal(f"dual cache vs prefix cache, cpu shape B=1 {mode}", prefix["median_ms"] / dual["median_ms"],
                     1.0)
        if device.type == "cuda" and shape.name == "llada-8b":
            for cache, want in (("prefix", 3.0), ("dual", 5.0)):
                r = prefix if cache == "prefix" else dual
                if r is not None and r.get("speedup") is not None:
                    goal(f"{cache} cache vs the authors' loop, llada-8b B=1 {mode}", r["speedup"], want)
            if mode == "evotoken":
                for r in (none, prefix, dual):
                    if r is not None and r.get("evo_step_pct") is not None:
                        goal(f"evo_step share of a step, llada-8b B=1 cache={r['cache']}", r["evo_step_pct"], 2.0,
                             unit="%", below=True)
    return out


def plot(rows: list, path, title: str):
    """Bar chart of tokens/s by configuration (one bar per timed row), log scale."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rows if not r.get("skipped")]
    labels = [f"B={r['B']} {r['mode']} {r['provider'].removeprefix('evofast-')}"
              + ("" if r["provider"] == AUTHORS else f" {r['cache']}") for r in done]
    colours = {"none": "#1f77b4", "prefix": "#ff7f0e", "dual": "#2ca02c"}
    col = ["#7f7f7f" if r["provider"] == AUTHORS else colours[r["cache"]] for r in done]
    fig, ax = plt.subplots(figsize=(max(7, 0.45 * len(done) + 2), 5))
    ax.bar(range(len(done)), [r["tokens_per_s"] for r in done], color=col)
    for i, r in enumerate(done):
        ax.text(i, r["tokens_per_s"], f"{r['tokens_per_s']:.0f}", ha="center", va="bottom", fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("tokens/s (log)")
    ax.set_xticks(range(len(done)))
    ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
    ax.set_title(title, fontsize=9)
    from matplotlib.patches import Patch
    ax.legend(handles=[Patch(color="#7f7f7f", label="authors' loop")]
              + [Patch(color=c, label=f"evofast, cache {k}") for k, c in colours.items()], fontsize=7)
    return _common.save_figure(fig, path)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    _common.add_common_arguments(
        parser, shapes=list(SHAPES),
        shape_help="tiny (V 1000, seconds) | cpu (d_model 64, 2 layers, V 126464, prompt 64, gen 128, B 1) | "
                   "llada-8b (LLaDA-8B layers, bf16, prompt 512, gen 256, steps 256, B 1); default llada-8b "
                   "on GPU, cpu on CPU")
    parser.add_argument("--backends", nargs="+", default=None, metavar="NAME",
                        help="providers (default: authors and evofast with the automatic backend): "
                             + ", ".join(provider_names()) + "; a bare backend name means evofast-<name>")
    parser.add_argument("--batch-sizes", "--batch", dest="batch", type=int, nargs="+", default=None, metavar="B",
                        help="batch sizes (default: the shape's)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES), help="decoding modes (default both)")
    parser.add_argument("--caches", nargs="+", choices=CACHES, default=list(CACHES),
                        help="evofast KV caches (default all three)")
    parser.add_argument("--compile", action="store_true", help="evofast.generate(compile=True)")
    parser.add_argument("--plot", metavar="FILE.png", default=None, help="write a tokens/s bar chart here")
    parser.add_argument("--dtype", choices=list(DTYPES), default=None, help="default bf16 on GPU, fp32 on CPU")
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="torch CPU threads (default: torch's); 1 keeps small-op timings stable on a busy machine")


def _providers(names, device) -> list:
    if not names:
        return default_providers(device)
    valid = provider_names()
    out = []
    for n in names:
        for part in filter(None, (p.strip() for p in n.split(","))):
            full = part if part in valid else f"evofast-{part}"
            if full not in valid:
                raise SystemExit(f"--backends: unknown provider {part!r}; choose from {', '.join(valid)}")
            if full not in out:
                out.append(full)
    return out


def run(args: argparse.Namespace) -> int:
    device = _common.pick_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = SHAPES[args.shape or ("llada-8b" if device.type == "cuda" else "cpu")]
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    batches = tuple(args.batch or shape.batches)
    if any(b < 1 for b in batches):
        raise SystemExit(f"--batch-sizes: expected sizes >= 1, got {list(batches)}")
    modes = tuple(dict.fromkeys(args.modes))
    caches = tuple(dict.fromkeys(args.caches))
    providers = _providers(args.backends, device)
    # the instrumented run comes first and counts as one warm-up call
    timing = {"warmup": max(args.warmup - 1, 0), "repeat": args.repeat or None,
              "budget_s": args.budget or 1.0,
              "retry_busy": args.retry_busy if args.retry_busy is not None else (0 if shape.name == "tiny" else 1)}
    if timing["repeat"] is None and args.budget is None:
        timing["repeat"] = shape.repeat
    if device.type == "cuda":
        torch.cuda.set_device(device)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    env = _common.environment(device)
    config = {"shape": shape.name, "vocab": shape.vocab, "mask_id": shape.mask_id, "d_model": shape.d_model,
              "n_layers": shape.n_layers, "n_heads": shape.n_heads, "mlp": shape.mlp or 3 * shape.d_model,
              "prompt": shape.prompt, "gen": shape.gen, "block": shape.block, "steps": shape.steps,
              "batches": list(batches), "modes": list(modes), "caches": list(caches), "compile": args.compile,
              "dtype": str(dtype).replace("torch.", ""), "device": str(device),
              "k_soft": K_SOFT, "alpha": ALPHA, "providers": providers, "timing": timing,
              "what": "one whole greedy generation per timed call; the warm-up is the instrumented run"}
    print(f"evofast bench generate: {env['device']} ({device}, {env['cores']} cores, {env['torch_threads']} torch "
          f"threads)")
    print(f"torch {env['torch']}, cuda {env['cuda']}, python {env['python']}, commit "
          f"{(env['commit'] or 'none')[:12]}{' (dirty)' if env['dirty'] else ''}, {env['time_utc']}")
    print(f"shape {shape.name}: evofast LLaDA architecture, random weights, d_model {shape.d_model}, "
          f"{shape.n_layers} layers, V {shape.vocab}, prompt {shape.prompt}, gen {shape.gen}, block {shape.block}, "
          f"steps {shape.steps}, B {list(batches)}, {config['dtype']}; greedy, k_soft {K_SOFT}, alpha {ALPHA}")
    print("authors: their batch-1 loop (all L logits every forward, float64 post-processing of all L rows); "
          "evofast-*: evofast.generate with cache none/prefix/dual. % outside fwd / % evo_step: shares of a "
          "generation's time (an extra run with synchronised forwards and evo_steps); peak MiB: that run's peak "
          "above its start; check: tokens vs the authors' loop (a cache: share equal to evofast without one)")
    log(f"building the model ({shape.name}) ...")
    t0 = time.perf_counter()
    model = build_model(shape, device, dtype)
    log(f"  built in {time.perf_counter() - t0:.1f} s")

    rows = []
    for B in batches:
        rows += bench_case(shape, B, model, device, providers, timing, log, modes=modes, caches=caches,
                           compile=args.compile)
    print()
    print(render(rows))
    shares = [r["other_cpu"] for r in rows if r.get("other_cpu") is not None]
    other = max(shares) if shares else None
    if other is not None:
        busy = [f"B={r['B']} {r['mode']} {r['provider']} {r['cache']}" for r in rows
                if (r.get("other_cpu") or 0) > _common.BUSY_THRESHOLD]
        print(f"\nother processes used at most {100 * other:.0f}% of the {env['cores']} cores while timing"
              + (f"; WARNING: disturbed timings: {', '.join(busy)}" if busy else ""))
    goals = targets(rows, shape, device)
    if goals:
        print("\ntargets:")
        for g in goals:
            rel = "<" if g.get("below") else ">="
            print(f"  {g['what']}: {g['value']:.2f} {g['unit']} (target {rel} {g['target']:g}) "
                  f"{'met' if g['met'] else 'NOT MET'}")
    if args.json:
        path = _common.write_json(args.json, {
            "benchmark": "evofast.bench.generate", "schema_version": _common.SCHEMA_VERSION, "env": env,
            "config": config, "other_cpu_max": other, "targets": goals, "rows": rows})
        print(f"\nwrote {path}")
    if args.plot:
        title = (f"evofast bench generate, {shape.name}: {env['device']}, {config['dtype']}, "
                 f"prompt {shape.prompt}, gen {shape.gen}, block {shape.block}, steps {shape.steps}")
        print(f"wrote {plot(rows, args.plot, title)}")
    return 0


def main(argv=None) -> int:
    from .. import cli
    return cli.standalone(sys.modules[__name__], "evofast bench generate", argv)
