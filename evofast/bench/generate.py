"""`evofast bench generate`: end-to-end EvoToken decoding, evofast.generate vs the authors' loop.

What is timed: one whole generation (greedy, k_soft 3, alpha 0.7, low-confidence
remasking, the step schedule) of B random prompts with evofast's LLaDA
architecture and random weights:

  authors          the authors' `generate_soft_token` loop re-stated (batch 1, so one
                   run per prompt): every forward computes all L rows' logits, the
                   model's soft input is the spec formula over all L rows (inside the
                   forward, as in their model code), and the step is
                   `baselines.authors_step` (float64 softmax and top-k over all L rows).
  evofast-<name>   `evofast.generate(..., backend=name)`: window rows only (logits_from),
                   one fused `evo_step`, `soft_embed` for the soft rows.

Per provider: the median (p20, p80) seconds of a generation, tokens/s = B x gen /
median, ms/step = median / forwards, and the share of a step spent outside the
model forward, from one more run whose forwards are bracketed by device
synchronisations (not the timed runs). `check` compares evofast's tokens with the
authors' loop row by row.

Shapes: tiny (V 1000, seconds), cpu (d_model 64, 2 layers, V 126464, prompt 64,
gen 128, block 32, steps 64, B 1: issue 4's CPU target >= 3x), llada-8b (LLaDA-8B
layer shapes, bf16, prompt 128, gen 256, block 32, steps 128, B 1 and 16; GPU).
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

HELP = "end-to-end generation: evofast.generate vs the authors' loop (tokens/s, ms/step, share outside the forward)"
K_SOFT, ALPHA = 3, 0.7
AUTHORS = "authors"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


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
    "llada-8b": GenShape("llada-8b", 126464, 4096, 32, 32, 12288, 128, 256, 32, 128, (1, 16), 3, 1),
}


def build_model(shape: GenShape, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """A random-weight evofast LLaDA model of the shape, in eval mode, built on `device`."""
    from ..models import llada

    kw = dict(vocab_size=shape.vocab, d_model=shape.d_model, n_layers=shape.n_layers, n_heads=shape.n_heads,
              seed=seed)
    if shape.mlp is not None:
        kw["mlp_hidden_size"] = shape.mlp
    if device.type == "cpu":
        return llada.tiny(dtype=dtype, **kw)
    # large models: initialise directly on the device, in the target dtype
    cfg = dict(vocab_size=shape.vocab, embedding_size=shape.vocab, d_model=shape.d_model, n_layers=shape.n_layers,
               n_heads=shape.n_heads, n_kv_heads=shape.n_heads, mlp_hidden_size=shape.mlp or 3 * shape.d_model,
               mask_token_id=shape.mask_id)
    old = torch.get_default_dtype()
    try:
        torch.set_default_dtype(dtype)
        with torch.device(device), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            model = llada.LLaDAModelLM(llada.LLaDAConfig(**cfg))
    finally:
        torch.set_default_dtype(old)
    return model.to(dtype).eval()


# --------------------------------------------------------------------------- forward timing
class ForwardTimer:
    """Seconds spent inside model forwards, each bracketed by device synchronisations."""

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


def timed_adapter(adapter, timer: ForwardTimer):
    """An Adapter that forwards to `adapter` and times its forward (evofast.generate accepts adapters)."""
    from ..models.base import Adapter

    class _Timed(Adapter):
        name = f"timed-{adapter.name}"

        def __init__(self):
            self.model, self.mask_id = adapter.model, adapter.mask_id

        def input_embeddings(self):
            return adapter.input_embeddings()

        @property
        def vocab_size(self):
            return adapter.vocab_size

        @property
        def max_length(self):
            return adapter.max_length

        def forward(self, **kw):
            return timer(adapter.forward, **kw)

    return _Timed()


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
    """The authors' loop and evofast with the backend "auto" picks (plus torch on the CPU)."""
    auto = _backend.resolve(device, "auto")
    names = [AUTHORS, f"evofast-{auto}"]
    if device.type == "cpu" and auto != "torch":
        names.append("evofast-torch")
    return names


def bench_case(shape: GenShape, B: int, model, device: torch.device, providers: list, timing: dict, log,
               seed: int = 0) -> list:
    from ..generation import generate
    from ..models.registry import get_adapter

    gen = torch.Generator(device="cpu").manual_seed(seed + B)
    M = shape.mask_id
    prompts = torch.randint(0, M, (B, shape.prompt), generator=gen).to(device)
    kw = dict(gen_length=shape.gen, block_length=shape.block, steps=shape.steps)
    adapter = get_adapter(model)
    rows, outputs = [], {}
    base = {"shape": shape.name, "B": B, "V": shape.vocab, "d_model": shape.d_model, "layers": shape.n_layers,
            "prompt": shape.prompt, "gen": shape.gen, "block": shape.block, "steps": shape.steps}

    for name in providers:
        row = {**base, "provider": name}
        rows.append(row)
        if name == AUTHORS:
            if B > shape.authors_max_batch:
                row.update(skipped=True, note=f"batch-1 code, not timed above B={shape.authors_max_batch} "
                                              "(it runs the prompts one after another)")
                log(f"  B={B} {name}: skipped ({row['note']})")
                continue

            def run(timer=None):
                return torch.cat([baselines.authors_generate(model, prompts[b:b + 1], mask_id=M, timer=timer, **kw)
                                  for b in range(B)])
        else:
            backend = name.removeprefix("evofast-")
            why = backend_skip_reason(backend, device)
            if why:
                row.update(skipped=True, note=why)
                log(f"  B={B} {name}: skipped ({why})")
                continue

            def run(timer=None, backend=backend):
                target = model if timer is None else timed_adapter(adapter, timer)
                return generate(target, prompts, backend=backend, **kw)
        try:
            timer = ForwardTimer(device)
            t0 = time.perf_counter()
            outputs[name] = run(timer)                    # instrumented run (also the warm-up)
            _common.synchronize(device)
            total = time.perf_counter() - t0
            t = _common.measure(run, device=device, warmup=timing["warmup"], repeat=timing["repeat"],
                                budget_s=timing["budget_s"], min_repeat=1, max_repeat=50,
                                retry_busy=timing["retry_busy"])
        except Exception as err:                           # noqa: BLE001 - reported, not fatal
            row.update(skipped=True, note=f"failed: {type(err).__name__}: {str(err).splitlines()[0][:160]}")
            log(f"  B={B} {name}: {row['note']}")
            continue
        row.update(t.summary())
        forwards = timer.calls
        row["forwards"] = forwards
        row["median_s"] = t.median_ms / 1e3
        row["ms_per_step"] = t.median_ms / max(forwards, 1)
        row["tokens_per_s"] = B * shape.gen / (t.median_ms / 1e3)
        row["outside_pct"] = 100.0 * max(total - timer.seconds, 0.0) / total
        row["outside_ms_per_step"] = 1e3 * max(total - timer.seconds, 0.0) / max(forwards, 1)
        log(f"  B={B} {name}: {row['median_s']:.2f} s/generation, {row['ms_per_step']:.1f} ms/step, "
            f"{row['tokens_per_s']:.1f} tokens/s, {row['outside_pct']:.1f}% outside the forward")

    ref = outputs.get(AUTHORS)
    ref_time = next((r["median_ms"] for r in rows if r["provider"] == AUTHORS and not r.get("skipped")), None)
    for r in rows:
        if r.get("skipped"):
            continue
        if ref_time:
            r["speedup"] = ref_time / r["median_ms"]
        out = outputs.get(r["provider"])
        if r["provider"] == AUTHORS:
            r["check"] = "reference"
        elif ref is None:
            r["check"] = "-"
        else:
            bad = int((out != ref).sum())
            r["check"] = "ok" if bad == 0 else f"DIFF ({bad} tokens)"
    return rows


# --------------------------------------------------------------------------- command line
COLUMNS = [("B", "B"), ("provider", "provider"), ("median_s", "s/gen"), ("p20_ms", "p20 ms"), ("p80_ms", "p80 ms"),
           ("reps", "reps"), ("forwards", "steps"), ("ms_per_step", "ms/step"), ("tokens_per_s", "tokens/s"),
           ("outside_pct", "% outside fwd"), ("outside_ms_per_step", "outside ms/step"), ("speedup", "speedup"),
           ("check", "check")]


def render(rows: list) -> str:
    timed = [r for r in rows if not r.get("skipped")]
    text = [_common.format_table(timed, COLUMNS)] if timed else ["(nothing timed)"]
    skipped = [f"  B={r['B']} {r['provider']}: {r['note']}" for r in rows if r.get("skipped")]
    if skipped:
        text.append("not timed:\n" + "\n".join(skipped))
    return "\n\n".join(text)


def targets(rows: list, shape: GenShape, device: torch.device) -> list:
    """Issue 4's figures against their targets."""
    out = []
    best = {}
    for r in rows:
        if not r.get("skipped") and r["provider"].startswith("evofast-"):
            cur = best.get(r["B"])
            if cur is None or r["median_ms"] < cur["median_ms"]:
                best[r["B"]] = r
    if device.type == "cpu" and shape.name == "cpu" and best.get(1, {}).get("speedup") is not None:
        r = best[1]
        out.append({"what": f"{r['provider']} vs the authors' loop, cpu shape B=1", "value": r["speedup"],
                    "target": 3.0, "unit": "x", "met": r["speedup"] >= 3.0})
    if device.type == "cuda" and shape.name == "llada-8b":
        for B, r in sorted(best.items()):
            out.append({"what": f"{r['provider']} share of a step outside the forward, llada-8b B={B}",
                        "value": r["outside_pct"], "target": 2.0, "unit": "%", "met": r["outside_pct"] < 2.0,
                        "below": True})
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    _common.add_common_arguments(
        parser, shapes=list(SHAPES),
        shape_help="tiny (V 1000, seconds) | cpu (d_model 64, 2 layers, V 126464, prompt 64, gen 128, B 1) | "
                   "llada-8b (LLaDA-8B layers, bf16, prompt 128, gen 256, B 1/16); default llada-8b on GPU, "
                   "cpu on CPU")
    parser.add_argument("--backends", nargs="+", default=None, metavar="NAME",
                        help="providers (default: authors and evofast with the automatic backend, plus "
                             "evofast-torch on the CPU): " + ", ".join(provider_names())
                             + "; a bare backend name means evofast-<name>")
    parser.add_argument("--batch", type=int, nargs="+", default=None, metavar="B", help="batch sizes")
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
              "batches": list(batches), "dtype": str(dtype).replace("torch.", ""), "device": str(device),
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
          "evofast-*: evofast.generate. % outside fwd: share of a generation's time outside the model forwards "
          "(an extra run with synchronised forwards); check: tokens vs the authors' loop")
    log(f"building the model ({shape.name}) ...")
    t0 = time.perf_counter()
    model = build_model(shape, device, dtype)
    log(f"  built in {time.perf_counter() - t0:.1f} s")

    rows = []
    for B in batches:
        rows += bench_case(shape, B, model, device, providers, timing, log)
    print()
    print(render(rows))
    shares = [r["other_cpu"] for r in rows if r.get("other_cpu") is not None]
    other = max(shares) if shares else None
    if other is not None:
        busy = [f"B={r['B']} {r['provider']}" for r in rows if (r.get("other_cpu") or 0) > _common.BUSY_THRESHOLD]
        print(f"\nother processes used at most {100 * other:.0f}% of the {env['cores']} cores while timing"
              + (f"; WARNING: disturbed timings: {', '.join(busy)}" if busy else ""))
    goals = targets(rows, shape, device)
    if goals:
        print("\ntargets (issue 4):")
        for g in goals:
            rel = "<" if g.get("below") else ">="
            print(f"  {g['what']}: {g['value']:.2f} {g['unit']} (target {rel} {g['target']:g}) "
                  f"{'met' if g['met'] else 'NOT MET'}")
    if args.json:
        path = _common.write_json(args.json, {
            "benchmark": "evofast.bench.generate", "schema_version": _common.SCHEMA_VERSION, "env": env,
            "config": config, "other_cpu_max": other, "targets": goals, "rows": rows})
        print(f"\nwrote {path}")
    return 0


def main(argv=None) -> int:
    from .. import cli
    return cli.standalone(sys.modules[__name__], "evofast bench generate", argv)
