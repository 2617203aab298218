"""`evofast bench ops`: latency of one `evo_step` and of `soft_embed` per provider.

What is timed (evo_step): one greedy step (k_soft 3, alpha 0.7, temperature 0,
low-confidence remasking) at the FIRST block of a generation, the widest window:
sequence rows [P, L) (R = G rows), current block [P, P + Bk), `num_transfer` =
Bk / steps-per-block tokens per sequence, the whole generation still masked.
Logits are random (normal, std 2, plus one spike of +2..+10 per row, so the
confidences spread over (0, 1) and ties are rare); bf16 on GPU, fp32 on CPU.

Providers:
  authors-eager   `baselines.authors_step` (the authors' post-processing: float64
                  softmax and top-k over all L rows) once per batch row, as their
                  batch-1 loop runs it. It writes -inf into column M of its logits
                  (a quirk); the untimed reset before each call restores that
                  column, so every call sees fresh logits at no timed cost.
  eager-rows      `baselines.needed_rows_step`: the best eager PyTorch, window rows only.
  compiled-rows   `torch.compile(needed_rows_step)` (compile time reported apart;
                  skipped with a note when compilation fails).
  evofast-<name>  `evofast.ops.evo_step(..., backend=name)` for every backend in
                  `evofast.ops.backends()` that runs on the device (Triton on CPU
                  tensors only runs in the interpreter, whose timings mean nothing:
                  skipped).
Before each timed call an untimed reset restores x and conf. GB/s counts the
logits bytes of the window rows (B x R x V x dtype size) over the median time
for every provider alike (the authors' code reads more: all L rows, several
times), so it is the effective bandwidth of the step; on CUDA it is also given
as a fraction of the device's peak DRAM bandwidth.

soft_embed: forward (no grad, as in decoding) and forward + backward (autograd
gradients of weight and w) at (B, L, k + 1 = 4) ids, d = 4096 on GPU / 64 on CPU,
per backend against `reference.soft_embed_spec` under autograd ("spec-autograd").
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
from ..ops import evo_step, soft_embed
from ..ops.reference import soft_embed_spec
from . import _common

HELP = "latency of one evo_step and of soft_embed per provider (authors' eager, eager, compiled, backends)"


@dataclass(frozen=True)
class Shape:
    name: str
    vocab: int
    mask_id: int
    prompt: int
    gen: int
    block: int
    steps_per_block: int
    batches: tuple
    budget_s: float            # default time budget of one measurement
    compile: bool = True       # time torch.compile (a cold compile costs ~15 s on a small CPU)

    @property
    def length(self) -> int:
        return self.prompt + self.gen

    @property
    def rows(self) -> int:      # window rows of the first block's step: [prompt, L)
        return self.gen

    @property
    def num_transfer(self) -> int:
        return self.block // self.steps_per_block


SHAPES = {
    "tiny": Shape("tiny", 1000, 990, 16, 32, 8, 4, (1, 2), 0.1, compile=False),
    "cpu": Shape("cpu", 126464, 126336, 64, 128, 32, 16, (1,), 2.0),
    "llada-8b": Shape("llada-8b", 126464, 126336, 128, 256, 32, 16, (1, 8, 32), 2.0),
}
K_SOFT, ALPHA = 3, 0.7
EAGER = ("authors-eager", "eager-rows", "compiled-rows")
SPEC = "spec-autograd"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_compiled_rows_step = None


def provider_names() -> list[str]:
    return [*EAGER, SPEC, *(f"evofast-{b}" for b in _backend.BACKENDS)]


def normalise_providers(names) -> Optional[set]:
    """--backends values -> provider names ("cpp" means "evofast-cpp"); None = all."""
    if not names:
        return None
    valid = provider_names()
    out = set()
    for n in names:
        for part in n.split(","):
            part = part.strip()
            if not part:
                continue
            full = part if part in valid else f"evofast-{part}"
            if full not in valid:
                raise SystemExit(f"--backends: unknown provider {part!r}; choose from {', '.join(valid)}")
            out.add(full)
    return out


def backend_skip_reason(name: str, device: torch.device) -> Optional[str]:
    """Why evofast backend `name` is not timed on `device` (None: it is)."""
    if device.type == "cpu" and name == "triton":
        return "Triton on CPU tensors runs only in the interpreter, whose timings mean nothing"
    if name not in evofast_backends():
        return "not available here (see evofast.ops.backends())"
    if not _backend.usable(name, device):
        return f"does not run on {device.type} tensors"
    return None


# --------------------------------------------------------------------------- evo_step
class StepCase:
    """Logits and the x / conf state of one batch at the first block, with resets."""

    def __init__(self, shape: Shape, B: int, dtype: torch.dtype, device: torch.device, seed: int = 0):
        self.shape, self.B, self.dtype, self.device = shape, B, dtype, device
        P, L, V, M = shape.prompt, shape.length, shape.vocab, shape.mask_id
        gen = torch.Generator(device=device).manual_seed(seed)
        self.full = torch.empty(B, L, V, dtype=dtype, device=device)     # the model's logits, all L rows
        for b in range(B):                                                 # row by row: small temporaries
            lg = torch.randn(L, V, generator=gen, device=device) * 2.0
            spike_at = torch.randint(0, V, (L, 1), generator=gen, device=device)
            spike = 2.0 + 8.0 * torch.rand(L, 1, generator=gen, device=device)
            self.full[b] = lg.scatter_add_(1, spike_at, spike).to(dtype)
        self.window = self.full[:, P:].contiguous()                        # rows [P, L): what evo_step reads
        self.col_m = self.full[..., M].clone()
        prompt = torch.randint(0, M, (B, P), generator=gen, device=device)
        self.x0 = torch.cat([prompt, torch.full((B, shape.gen), M, device=device)], 1)
        self.conf0 = torch.zeros(B, L, dtype=torch.float64, device=device)
        self.x, self.conf = self.x0.clone(), self.conf0.clone()
        self.n = torch.full((B,), shape.num_transfer, dtype=torch.int64, device=device)
        self.bounds = dict(block_start=P, block_end=P + shape.block, prompt_len=P)
        self.reset()
        evo_step(self.window, self.x, self.conf, self.n, row0=P, mask_id=M, k_soft=K_SOFT, alpha=ALPHA,
                 backend="torch", **self.bounds)
        self.x_ref, self.conf_ref = self.x.clone(), self.conf.clone()

    @property
    def window_bytes(self) -> int:
        return self.window.numel() * self.window.element_size()

    def reset(self):
        self.x.copy_(self.x0)
        self.conf.copy_(self.conf0)

    def reset_authors(self):
        self.reset()
        self.full[..., self.shape.mask_id] = self.col_m

    def check(self) -> str:
        """Compare the state after one call with the torch backend's."""
        same_x = torch.equal(self.x, self.x_ref)
        same_c = torch.allclose(self.conf, self.conf_ref, rtol=1e-6, atol=0.0)
        if same_x and same_c:
            return "ok"
        bad = int((self.x != self.x_ref).sum())
        return f"MISMATCH ({bad} tokens differ)" if bad else "MISMATCH (conf)"

    # providers: (fn, reset)
    def authors(self):
        M = self.shape.mask_id

        def fn():
            for b in range(self.B):   # the authors' code is batch-1: one call per sequence
                baselines.authors_step(self.full[b:b + 1], self.x[b:b + 1], self.conf[b:b + 1],
                                       self.n[b:b + 1], mask_id=M, k_soft=K_SOFT, alpha=ALPHA, **self.bounds)
        return fn, self.reset_authors

    def rows_step(self, step):
        P, M = self.shape.prompt, self.shape.mask_id

        def fn():
            step(self.window, self.x, self.conf, self.n, row0=P, mask_id=M, k_soft=K_SOFT, alpha=ALPHA,
                 **self.bounds)
        return fn, self.reset

    def evofast(self, backend: str):
        P, M = self.shape.prompt, self.shape.mask_id

        def fn():
            evo_step(self.window, self.x, self.conf, self.n, row0=P, mask_id=M, k_soft=K_SOFT, alpha=ALPHA,
                     backend=backend, check_ids=False, **self.bounds)   # as generate calls it
        return fn, self.reset


def compiled_rows_step():
    global _compiled_rows_step
    if _compiled_rows_step is None:
        _compiled_rows_step = torch.compile(baselines.needed_rows_step, dynamic=False)
    return _compiled_rows_step


def step_providers(case: StepCase, device: torch.device, selected: Optional[set], compile: bool):
    """[(name, factory or None, note)] in table order; factory() -> (fn, reset)."""
    out = []

    def want(name):
        return selected is None or name in selected

    if want("authors-eager"):
        out.append(("authors-eager", case.authors, ""))
    if want("eager-rows"):
        out.append(("eager-rows", lambda: case.rows_step(baselines.needed_rows_step), ""))
    if want("compiled-rows"):
        if compile:
            out.append(("compiled-rows", lambda: case.rows_step(compiled_rows_step()), ""))
        else:
            out.append(("compiled-rows", None, f"left out of the {case.shape.name} shape (a cold compile "
                                               "takes ~15 s); --compile adds it"))
    for b in _backend.BACKENDS:
        name = f"evofast-{b}"
        if not want(name):
            continue
        why = backend_skip_reason(b, device)
        out.append((name, None if why else (lambda b=b: case.evofast(b)), why or ""))
    return out


def bench_evo_step(shape: Shape, B: int, dtype, device, selected, timing: dict, log,
                   compile: bool = True) -> list[dict]:
    case = StepCase(shape, B, dtype, device)
    base = {"op": "evo_step", "shape": shape.name, "B": B, "rows": shape.rows, "V": shape.vocab,
            "dtype": str(dtype).replace("torch.", ""), "bytes": case.window_bytes}
    peak, _ = _common.peak_bandwidth(device)
    rows = []
    for name, factory, note in step_providers(case, device, selected, compile):
        row = {**base, "provider": name, "note": note}
        rows.append(row)
        if factory is None:
            row["skipped"] = True
            log(f"  evo_step B={B} {name}: skipped ({note})")
            continue
        fn, reset = factory()
        try:
            reset()
            mem0 = _common.reset_peak_memory(device)
            t0 = time.perf_counter()
            fn()                                   # first call: compilation, lazy loads
            _common.synchronize(device)
            first_s = time.perf_counter() - t0
            row["temp_mem_mib"] = _common.peak_memory_since(device, mem0)
            row["check"] = case.check()
            t = _common.measure(fn, device=device, setup=reset, **timing)
        except Exception as err:                   # noqa: BLE001 - a provider failing is reported, not fatal
            row["skipped"] = True
            row["note"] = f"failed: {_first_line(err)}"
            log(f"  evo_step B={B} {name}: {row['note']}")
            continue
        if name == "compiled-rows":
            row["compile_s"] = first_s
            row["note"] = f"compile {first_s:.1f} s (first call, not timed)"
        row.update(t.summary())
        row["gbs"] = case.window_bytes / (t.median_ms * 1e-3) / 1e9
        if peak:
            row["peak_frac"] = row["gbs"] * 1e9 / peak
        log(f"  evo_step B={B} {name}: median {t.median_ms:.3f} ms ({t.reps} reps) check {row['check']}")
    _speedups(rows, "authors-eager")
    del case
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def _speedups(rows: list[dict], baseline: str, key: str = "speedup"):
    ref = next((r.get("median_ms") for r in rows if r["provider"] == baseline and r.get("median_ms")), None)
    for r in rows:
        if ref and r.get("median_ms"):
            r[key] = ref / r["median_ms"]


# --------------------------------------------------------------------------- soft_embed
def embed_dim(device: torch.device) -> int:
    return 4096 if device.type == "cuda" else 64


class EmbedCase:
    """weight (V, d), ids / w (B, L, k + 1) and an output gradient, with the spec's output."""

    def __init__(self, shape: Shape, B: int, dtype: torch.dtype, device: torch.device, seed: int = 1):
        V, L, J, d = shape.vocab, shape.length, K_SOFT + 1, embed_dim(device)
        self.shape, self.B, self.dtype, self.device, self.d = shape, B, dtype, device, d
        gen = torch.Generator(device=device).manual_seed(seed)
        self.weight = (torch.randn(V, d, generator=gen, device=device) * 0.02).to(dtype).requires_grad_()
        self.ids = torch.randint(0, V, (B, L, J), generator=gen, device=device)
        self.w = torch.rand(B, L, J, generator=gen, device=device).to(dtype).requires_grad_()
        self.grad = torch.randn(B, L, d, generator=gen, device=device).to(dtype)
        with torch.no_grad():
            self.ref_out = soft_embed_spec(self.weight, self.ids, self.w).float()

    @property
    def fwd_bytes(self) -> int:
        """Bytes a forward must move at least: the gathered rows, ids, w, and the output."""
        B, L, J = self.ids.shape
        elt = self.weight.element_size()
        return B * L * J * (self.d * elt + self.ids.element_size() + self.w.element_size()) + B * L * self.d * elt

    def functions(self, f):
        """(forward without grad, forward + backward) closures for f(weight, ids, w)."""
        def fwd():
            with torch.no_grad():
                return f(self.weight, self.ids, self.w)

        def fwd_bwd():
            return torch.autograd.grad(f(self.weight, self.ids, self.w), (self.weight, self.w), self.grad)
        return fwd, fwd_bwd

    def check(self, out) -> str:
        tol = 1e-4 if self.dtype == torch.float32 else 3e-2
        return "ok" if torch.allclose(out.float(), self.ref_out, rtol=tol, atol=tol) else "MISMATCH"


def embed_providers(device: torch.device, selected: Optional[set]):
    """[(name, f(weight, ids, w) or None, note)] in table order."""
    out = []
    if selected is None or SPEC in selected:
        out.append((SPEC, soft_embed_spec, "autograd of the spec formula"))
    for b in _backend.BACKENDS:
        name = f"evofast-{b}"
        if selected is not None and name not in selected:
            continue
        why = backend_skip_reason(b, device)
        f = None if why else (lambda wt, i, ww, b=b: soft_embed(wt, i, ww, backend=b, check_ids=False))
        out.append((name, f, why or "check_ids=False"))
    return out


def bench_soft_embed(shape: Shape, B: int, dtype, device, selected, timing: dict, log) -> list[dict]:
    case = EmbedCase(shape, B, dtype, device)
    peak, _ = _common.peak_bandwidth(device)
    base = {"shape": shape.name, "B": B, "rows": shape.length, "V": shape.vocab, "d": case.d,
            "dtype": str(dtype).replace("torch.", "")}
    fwd_rows, bwd_rows = [], []
    for name, f, note in embed_providers(device, selected):
        rf = {**base, "op": "soft_embed fwd", "provider": name, "note": note, "bytes": case.fwd_bytes}
        rb = {**base, "op": "soft_embed fwd+bwd", "provider": name, "note": note}
        fwd_rows.append(rf)
        bwd_rows.append(rb)
        if f is None:
            rf["skipped"] = rb["skipped"] = True
            log(f"  soft_embed B={B} {name}: skipped ({note})")
            continue
        fwd, fwd_bwd = case.functions(f)
        try:
            rf["check"] = rb["check"] = case.check(fwd())
            mem0 = _common.reset_peak_memory(device)
            fwd_bwd()
            rb["temp_mem_mib"] = _common.peak_memory_since(device, mem0)
            tf = _common.measure(fwd, device=device, **timing)
            tb = _common.measure(fwd_bwd, device=device, **timing)
        except Exception as err:                   # noqa: BLE001 - a provider failing is reported, not fatal
            rf["skipped"] = rb["skipped"] = True
            rf["note"] = rb["note"] = f"failed: {_first_line(err)}"
            log(f"  soft_embed B={B} {name}: {rf['note']}")
            continue
        rf.update(tf.summary())
        rb.update(tb.summary())
        rf["gbs"] = case.fwd_bytes / (tf.median_ms * 1e-3) / 1e9
        if peak:
            rf["peak_frac"] = rf["gbs"] * 1e9 / peak
        log(f"  soft_embed B={B} {name}: fwd {tf.median_ms:.3f} ms, fwd+bwd {tb.median_ms:.3f} ms")
    _speedups(fwd_rows, SPEC)
    _speedups(bwd_rows, SPEC)
    del case
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return fwd_rows + bwd_rows


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0][:160]}" if text else type(err).__name__


# --------------------------------------------------------------------------- command line
COLUMNS = [("op", "op"), ("B", "B"), ("provider", "provider"), ("median_ms", "median ms"),
           ("p20_ms", "p20 ms"), ("p80_ms", "p80 ms"), ("reps", "reps"), ("speedup", "speedup"),
           ("gbs", "GB/s"), ("peak_pct", "% peak"), ("temp_mem_mib", "temp MiB"), ("check", "check"),
           ("note", "note")]
OPTIONAL_COLUMNS = ("peak_pct", "temp_mem_mib")     # shown when some row has them (CUDA)


def render(rows: list[dict]) -> str:
    """The table of timed rows (a blank line between (op, B) groups), then what was not timed."""
    timed = [r for r in rows if not r.get("skipped")]
    cols = [c for c in COLUMNS if c[0] not in OPTIONAL_COLUMNS or any(r.get(c[0]) is not None for r in timed)]
    lines = _common.format_table(timed, cols).splitlines()
    out = lines[:2]
    for i, r in enumerate(timed):
        if i and (r["op"], r["B"]) != (timed[i - 1]["op"], timed[i - 1]["B"]):
            out.append("")
        out.append(lines[2 + i])
    text = ["\n".join(out)]
    skipped = {}
    for r in rows:
        if r.get("skipped"):
            skipped.setdefault(r["provider"], r["note"])
    if skipped:
        text.append("not timed:\n" + "\n".join(f"  {p}: {n}" for p, n in skipped.items()))
    return "\n\n".join(text)


def targets(rows: list[dict], shape: Shape, device: torch.device) -> list[dict]:
    """The project's speed targets for one step, against the rows measured."""
    def find(provider, B):
        return next((r for r in rows if r["op"] == "evo_step" and r["provider"] == provider and r["B"] == B
                     and r.get("speedup") is not None), None)

    out = []
    if device.type == "cpu" and shape.vocab == 126464:
        r = find("evofast-cpp", 1)
        if r:
            out.append({"what": f"evofast-cpp vs authors-eager, {shape.name} B=1", "value": r["speedup"],
                        "target": 5.0, "unit": "x", "met": r["speedup"] >= 5.0})
    if device.type == "cuda" and shape.name == "llada-8b":
        r = find("evofast-cuda", 1)
        if r:
            out.append({"what": "evofast-cuda vs authors-eager, llada-8b B=1", "value": r["speedup"],
                        "target": 50.0, "unit": "x", "met": r["speedup"] >= 50.0})
        for r in rows:
            if (r["op"] == "evo_step" and r["provider"] == "evofast-cuda" and r.get("peak_pct") is not None
                    and r["B"] * r["rows"] >= 256):
                out.append({"what": f"evofast-cuda logits read, llada-8b B={r['B']}", "value": r["peak_pct"],
                            "target": 70.0, "unit": "% of peak", "met": r["peak_pct"] >= 70.0})
    return out


def summary(rows: list[dict], shape: Shape, device: torch.device) -> Optional[str]:
    """One line for a newcomer: the fastest evofast evo_step against the authors' post-processing,
    at the smallest batch timed (None when either was not timed)."""
    steps = [r for r in rows if r["op"] == "evo_step" and r.get("speedup") is not None
             and r["provider"].startswith("evofast-")]
    if not steps:
        return None
    B = min(r["B"] for r in steps)
    best = max((r for r in steps if r["B"] == B), key=lambda r: r["speedup"])
    where = "this GPU" if device.type == "cuda" else "this CPU"
    verdict = f"{best['speedup']:.1f}x faster than" if best["speedup"] >= 1 else \
        f"{1 / best['speedup']:.1f}x slower than"
    return (f"evo_step: {verdict} the authors' post-processing on {where} ({best['provider']}, batch {B}, "
            f"vocabulary {shape.vocab:,}, {best['median_ms']:.3f} ms per step)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    _common.add_common_arguments(
        parser, shapes=list(SHAPES),
        shape_help="tiny (V 1000, seconds) | cpu (V 126464, prompt 64, gen 128, B 1) | llada-8b "
                   "(V 126464, prompt 128, gen 256, B 1/8/32); default llada-8b on GPU, cpu on CPU")
    parser.add_argument("--backends", nargs="+", default=None, metavar="NAME",
                        help="providers to time (default all): " + ", ".join(provider_names())
                             + "; a bare backend name means evofast-<name>")
    parser.add_argument("--batch", type=int, nargs="+", default=None, metavar="B",
                        help="batch sizes (default: the shape's)")
    parser.add_argument("--dtype", choices=list(DTYPES), default=None,
                        help="logits / embedding dtype (default bf16 on GPU, fp32 on CPU)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="time torch.compile of eager-rows (default: yes, except for the tiny shape)")
    parser.add_argument("--no-soft-embed", action="store_true", help="time evo_step only")


def run(args: argparse.Namespace) -> int:
    device = _common.pick_device(args.device)
    shape = SHAPES[args.shape or ("llada-8b" if device.type == "cuda" else "cpu")]
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    batches = tuple(args.batch or shape.batches)
    selected = normalise_providers(args.backends)
    timing = {"warmup": args.warmup, "repeat": args.repeat, "budget_s": args.budget or shape.budget_s,
              "cold_l2": args.cold_l2 and device.type == "cuda",
              "retry_busy": args.retry_busy if args.retry_busy is not None else (0 if shape.name == "tiny" else 3)}
    if device.type == "cuda":
        torch.cuda.set_device(device)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    env = _common.environment(device)
    config = {
        "shape": shape.name, "vocab": shape.vocab, "mask_id": shape.mask_id, "prompt": shape.prompt,
        "gen": shape.gen, "block": shape.block, "steps_per_block": shape.steps_per_block,
        "num_transfer": shape.num_transfer, "batches": list(batches), "dtype": str(dtype).replace("torch.", ""),
        "device": str(device), "k_soft": K_SOFT, "alpha": ALPHA, "soft_embed_dim": embed_dim(device),
        "timing": timing,
        "timed_step": (f"first block: window rows [{shape.prompt}, {shape.length}) ({shape.rows} rows), "
                       f"block [{shape.prompt}, {shape.prompt + shape.block}), num_transfer {shape.num_transfer}, "
                       "greedy, every generation row still masked"),
    }
    peak_txt = (f"{env['peak_bandwidth_gbs']:,.0f} GB/s ({env['peak_bandwidth_source']})"
                if env["peak_bandwidth_gbs"] else env["peak_bandwidth_source"])
    print(f"evofast bench ops: {env['device']} ({device}, {env['cores']} cores, {env['torch_threads']} torch threads), "
          f"peak DRAM bandwidth {peak_txt}")
    print(f"torch {env['torch']}, cuda {env['cuda']}, triton {env['triton']}, python {env['python']}, "
          f"commit {(env['commit'] or 'none')[:12]}{' (dirty)' if env['dirty'] else ''}, {env['time_utc']}")
    print(f"shape {shape.name}: V {shape.vocab}, mask {shape.mask_id}, prompt {shape.prompt}, gen {shape.gen}, "
          f"block {shape.block}, L {shape.length}, B {list(batches)}, {config['dtype']}")
    print(f"evo_step timed at the {config['timed_step']}")
    print("authors-eager: the authors' post-processing over all L rows, once per batch row; eager-rows / "
          "compiled-rows: best eager PyTorch on the window rows, and its torch.compile; evofast-*: evo_step")
    print("GB/s = logits bytes of the window rows (B x rows x V x dtype size) / median, for every provider; "
          "speedup vs authors-eager (evo_step) and spec-autograd (soft_embed); check: x / conf (evo_step) or "
          "output (soft_embed) against the torch reference")

    rows = []
    for B in batches:
        rows += bench_evo_step(shape, B, dtype, device, selected, timing, log,
                               compile=shape.compile if args.compile is None else args.compile)
    if not args.no_soft_embed:
        for B in batches:
            rows += bench_soft_embed(shape, B, dtype, device, selected, timing, log)
    for r in rows:
        if r.get("peak_frac") is not None:
            r["peak_pct"] = 100.0 * r["peak_frac"]
        if (r.get("other_cpu") or 0.0) > _common.BUSY_THRESHOLD:
            r["note"] = "; ".join(filter(None, [r["note"], f"DISTURBED: others used {100 * r['other_cpu']:.0f}% CPU"]))
    print()
    print(render(rows))
    shares = [r["other_cpu"] for r in rows if r.get("other_cpu") is not None]
    other = max(shares) if shares else None
    if other is not None:
        busy = [f"{r['op']} B={r['B']} {r['provider']}" for r in rows if (r.get("other_cpu") or 0) > _common.BUSY_THRESHOLD]
        warn = ""
        if busy:
            which = ", ".join(busy) if len(busy) <= 4 else f"{len(busy)} of {len(shares)} measurements"
            warn = (f"; WARNING: disturbed timings (other_cpu > {_common.BUSY_THRESHOLD} in the JSON rows), "
                    f"--retry-busy notwithstanding: {which}")
        print(f"\nother processes used at most {100 * other:.0f}% of the {env['cores']} cores while timing" + warn)
    goals = targets(rows, shape, device)
    if goals:
        print("\ntargets:")
        for g in goals:
            print(f"  {g['what']}: {g['value']:.1f} {g['unit']} (target >= {g['target']:g}) "
                  f"{'met' if g['met'] else 'NOT MET'}")
    if args.json:
        path = _common.write_json(args.json, {
            "benchmark": "evofast.bench.ops", "schema_version": _common.SCHEMA_VERSION,
            "env": env, "config": config, "other_cpu_max": other, "targets": goals, "rows": rows})
        print(f"\nwrote {path}")
    line = summary(rows, shape, device)
    if line:
        print(f"\n{line}")
    return 0


def main(argv=None) -> int:
    from .. import cli
    return cli.standalone(sys.modules[__name__], "evofast bench ops", argv)
