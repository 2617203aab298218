"""`evofast bench cts`: one CTS training step, evofast's fused `cts_loss` vs the eager implementation.

What is timed: `loss + backward` of one collated batch (K trajectory steps,
k_soft 3, fixed alphas) on evofast's LLaDA architecture with random weights and
peft LoRA on q / k / v:

  eager     `evofast.cts.eager_cts_loss` (the authors' trainer restated: full fp32
            logits of every position at every step, float64 softmax of every
            position, all K graphs alive) then `.backward()`;
  evofast   `evofast.cts.cts_loss(..., backward=True)`: hidden states of the rows
            that matter through the chunked linear cross-entropy, `evo_step` on
            each logits block, backward per trajectory step.

Each provider runs in fresh processes (so one provider's allocator state or
OOM cannot touch the other's figures): a warm-up step, one step whose peak
memory above the start is recorded (CUDA: max_memory_allocated; CPU: resident
set size sampled every 2 ms, in a process of its own with glibc's mmap
threshold pinned at 1 MiB so freed tensors go back to the system), then the
timed steps. A CUDA OOM is
recorded as "OOM". `check` compares the two losses and LoRA gradients.

Shapes: tiny (V 1000, d_model 32, seq 64: seconds), cpu (V 126464, d_model 64,
2 layers, seq 256, batch 2, K 4, LoRA r 8: issue 6's CPU target, >= 2x faster and
<= half the peak memory), llada-8b (LLaDA-8B layers, bf16 weights built on the
meta device then materialised on the GPU, LoRA r 128, seq 1024, batch 2, K 4,
gradient checkpointing: GPU only).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass
from typing import Optional

import torch

from . import _common

HELP = "one CTS training step: evofast's fused cts_loss vs the eager implementation (time, peak memory)"
PROVIDERS = ("eager", "evofast")
K_SOFT = 3


@dataclass(frozen=True)
class CTSShape:
    name: str
    vocab: int
    d_model: int
    n_layers: int
    n_heads: int
    mlp: Optional[int]          # None: 3 x d_model
    seq: int
    prompt: int
    batch: int
    K: int
    lora_r: int
    dtype: str                  # weights: fp32 | bf16
    checkpointing: bool
    repeat: int

    @property
    def mask_id(self) -> int:
        return 126336 if self.vocab > 126336 else self.vocab - 1


SHAPES = {
    "tiny": CTSShape("tiny", 1000, 32, 2, 4, None, 64, 16, 2, 4, 8, "fp32", False, 5),
    "cpu": CTSShape("cpu", 126464, 64, 2, 4, None, 256, 64, 2, 4, 8, "fp32", False, 3),
    "llada-8b": CTSShape("llada-8b", 126464, 4096, 32, 32, 12288, 1024, 128, 2, 4, 128, "bf16", True, 3),
}


# --------------------------------------------------------------------------- one provider (child process)
def build(shape: CTSShape, device: torch.device, seed: int = 0, fast_init: Optional[bool] = None):
    """(LoRA-wrapped model in train mode, batch, alphas) for the shape, the same for the same seed.
    `fast_init` (default: off the CPU): `llada.random_weights` instead of `llada.tiny`'s init."""
    import warnings

    from ..cts import CTSCollator
    from ..cts.lora import add_lora
    from ..models import llada

    warnings.filterwarnings("ignore", category=FutureWarning)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[shape.dtype]
    cfg = dict(vocab_size=shape.vocab, d_model=shape.d_model, n_layers=shape.n_layers, n_heads=shape.n_heads,
               mlp_hidden_size=shape.mlp or 3 * shape.d_model)
    if not (device.type != "cpu" if fast_init is None else fast_init):
        model = llada.tiny(dtype=dtype, seed=seed, **cfg)
    else:
        model = llada.random_weights(llada.LLaDAConfig(**cfg, embedding_size=shape.vocab, n_kv_heads=shape.n_heads,
                                                       mask_token_id=shape.mask_id), device, dtype, seed)
    torch.manual_seed(seed)              # peft draws LoRA A from the global RNG: the same in every process
    model = add_lora(model, shape.lora_r)           # alpha 2 r on q / k / v
    if shape.checkpointing:
        model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    g = torch.Generator().manual_seed(seed + 1)
    examples = [{"input_ids": torch.randint(0, min(shape.vocab, 126000) - 2, (shape.seq,), generator=g),
                 "prompt_length": shape.prompt} for _ in range(shape.batch)]
    collator = CTSCollator(shape.mask_id, shape.mask_id - 1, K=shape.K, block_sizes=(512,), generator=g,
                           extra_pad_prob=0.0)
    batch = {k: v.to(device) for k, v in collator(examples).items()}
    alphas = torch.full((shape.K, shape.batch), 0.7, dtype=torch.float64)
    return model, batch, alphas


def step_fn(provider: str, model, batch, alphas):
    from ..cts import cts_loss, eager_cts_loss

    if provider == "eager":
        def step():
            loss = eager_cts_loss(model, batch, K_SOFT, alphas)
            loss.backward()
            return loss.detach()
    else:
        def step():
            return cts_loss(model, batch, K_SOFT, alphas, backward=True)
    return step


def run_provider(shape_name: str, provider: str, device: str, repeat: Optional[int], warmup: int,
                 budget: Optional[float], timed: bool = True, memory: bool = True, retry_busy: int = 0) -> dict:
    """What is measured for one provider in this process (see the module docstring)."""
    shape = SHAPES[shape_name]
    dev = torch.device(device)
    if dev.type == "cpu" and shape.name == "tiny":
        torch.set_num_threads(1)   # tiny matrices: a second thread only adds synchronisation (on a busy
                                   # machine, hundreds of times slower); the cpu shape keeps every core
    model, batch, alphas = build(shape, dev)
    step = step_fn(provider, model, batch, alphas)
    oom = (torch.cuda.OutOfMemoryError,) if dev.type == "cuda" else ()
    row = {"provider": provider, "shape": shape.name}
    try:
        model.zero_grad(set_to_none=True)
        _common.synchronize(dev)
        # warm-up: allocates the LoRA grads and any workspace a provider keeps between
        # steps; both count, so its peak is taken too
        with _common.PeakMemory(dev) as first:
            loss = step()
        grads = {n: p.grad.detach().float().cpu().clone() for n, p in model.named_parameters() if p.grad is not None}
        if memory:
            _common.synchronize(dev)
            with _common.PeakMemory(dev) as mem:
                step()
            row["peak_mib"] = max(mem.mib, first.mib)
        if timed:
            _common.synchronize(dev)
            t = _common.measure(step, device=dev, setup=lambda: model.zero_grad(set_to_none=False),
                                warmup=max(0, warmup - 1), repeat=repeat if repeat else shape.repeat,
                                budget_s=budget or 10.0, min_repeat=1, max_repeat=20, retry_busy=retry_busy)
            row.update(t.summary())
    except oom as e:
        return {**row, "oom": True, "note": f"OOM: {str(e).splitlines()[0][:200]}"}
    row.update(loss=float(loss), oom=False)
    grad_path = os.environ.get("EVOFAST_BENCH_CTS_GRADS")
    if grad_path:
        torch.save(grads, f"{grad_path}.{provider}")
    return row


def _child_main() -> None:
    """`python -c` entry of a provider's process: one JSON line on stdout."""
    spec = json.loads(sys.argv[1])
    print("EVOFAST-ROW " + json.dumps(run_provider(**spec)), flush=True)


def run_in_child(spec: dict, timeout: int = 1800, grads_path: Optional[str] = None) -> dict:
    env = dict(os.environ)
    if spec.get("memory") and spec["device"] == "cpu":   # freed tensors go back to the system: RSS = live memory
        env["MALLOC_MMAP_THRESHOLD_"] = str(1 << 20)
    if grads_path:
        env["EVOFAST_BENCH_CTS_GRADS"] = grads_path
    code = "from evofast.bench.cts import _child_main; _child_main()"
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], env=env, capture_output=True, text=True,
                          timeout=timeout)
    for line in proc.stdout.splitlines():
        if line.startswith("EVOFAST-ROW "):
            return json.loads(line[len("EVOFAST-ROW "):])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
    oom = any("out of memory" in s.lower() for s in tail)
    return {"provider": spec["provider"], "shape": spec["shape_name"], "oom": oom,
            "note": ("OOM: " if oom else f"failed (exit {proc.returncode}): ") + " | ".join(tail)[-400:]}


# --------------------------------------------------------------------------- command
COLUMNS = [("provider", "provider"), ("median_ms", "median ms"), ("p20_ms", "p20"), ("p80_ms", "p80"),
           ("speedup", "speedup"), ("peak_mib", "peak MiB"), ("mem_ratio", "memory vs eager"), ("loss", "loss")]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    _common.add_common_arguments(
        parser, shapes=list(SHAPES),
        shape_help="tiny (V 1000, seconds) | cpu (V 126464, d_model 64, 2 layers, seq 256, B 2, K 4, LoRA) | "
                   "llada-8b (LLaDA-8B layers, bf16, LoRA r 128, seq 1024, B 2, K 4, checkpointing; GPU); "
                   "default llada-8b on GPU, cpu on CPU")
    parser.add_argument("--providers", nargs="+", choices=PROVIDERS, default=list(PROVIDERS),
                        help="what to run (default: eager evofast)")


def targets(rows: dict, shape: CTSShape, device: torch.device) -> list:
    ev, ea = rows.get("evofast"), rows.get("eager")
    out = []
    if not ev or ev.get("oom") or "median_ms" not in ev:
        return out
    if shape.name == "cpu" and device.type == "cpu" and ea and "median_ms" in ea:
        out.append({"what": "evofast vs eager step time, cpu shape", "value": ev["speedup"], "target": 2.0,
                    "unit": "x", "met": ev["speedup"] >= 2.0})
        out.append({"what": "evofast peak memory / eager, cpu shape", "value": ev["mem_ratio"], "target": 0.5,
                    "unit": "", "met": ev["mem_ratio"] <= 0.5})
    if shape.name == "llada-8b" and device.type == "cuda":
        if ea and ea.get("oom"):
            out.append({"what": "llada-8b: eager OOMs, evofast runs", "value": ev["peak_mib"], "target": None,
                        "unit": "MiB", "met": True})
        elif ea and "median_ms" in ea:
            out.append({"what": "evofast vs eager step time, llada-8b", "value": ev["speedup"], "target": 2.0,
                        "unit": "x", "met": ev["speedup"] >= 2.0})
            out.append({"what": "evofast peak memory / eager, llada-8b", "value": ev["mem_ratio"], "target": 0.4,
                        "unit": "", "met": ev["mem_ratio"] <= 0.4})
    return out


def run(args: argparse.Namespace) -> int:
    import tempfile

    device = _common.pick_device(args.device)
    shape_name = args.shape or ("llada-8b" if device.type == "cuda" else "cpu")
    shape = SHAPES[shape_name]
    if shape.name == "llada-8b" and device.type != "cuda":
        print("evofast bench cts: the llada-8b shape needs a CUDA device", file=sys.stderr)
        return 2
    print(f"evofast bench cts: shape {shape.name} on {_common.device_name(device)}, providers {args.providers} "
          "(each in a fresh process)", file=sys.stderr)
    rows = {}
    with tempfile.TemporaryDirectory(prefix="evofast-bench-cts-") as tmp:
        grads = os.path.join(tmp, "grads")
        for provider in args.providers:
            spec = {"shape_name": shape.name, "provider": provider, "device": str(device), "repeat": args.repeat,
                    "warmup": args.warmup, "budget": args.budget,
                    "retry_busy": args.retry_busy if args.retry_busy is not None else
                    (0 if shape.name == "tiny" else 3)}
            if device.type == "cuda":
                rows[provider] = run_in_child(spec, grads_path=grads)
            else:   # the pinned mmap threshold that makes RSS honest also slows allocation: time apart
                rows[provider] = run_in_child(dict(spec, memory=False), grads_path=grads)
                mem = run_in_child(dict(spec, timed=False))
                rows[provider]["peak_mib"] = mem.get("peak_mib")
            print(f"  {provider}: {rows[provider].get('median_ms', rows[provider].get('note'))}", file=sys.stderr)
        check = None
        if all(os.path.exists(f"{grads}.{p}") for p in PROVIDERS):
            ga, ge = torch.load(f"{grads}.eager"), torch.load(f"{grads}.evofast")
            # relative to the largest gradient entry of all: LoRA A gradients are exactly 0 at init (B = 0)
            scale = max(float(g.abs().max()) for g in ga.values()) or 1.0
            worst = max(float((ga[n] - ge[n]).abs().max()) for n in ga) / scale
            check = {"loss_abs_diff": abs(rows["eager"]["loss"] - rows["evofast"]["loss"]),
                     "max_rel_grad_diff": worst, "grad_tensors": len(ga)}
    ea, ev = rows.get("eager"), rows.get("evofast")
    if ea and ev and "median_ms" in ea and "median_ms" in ev:
        ev["speedup"] = ea["median_ms"] / ev["median_ms"]
        ea["speedup"] = 1.0
        if ea.get("peak_mib") and ev.get("peak_mib") is not None:
            ev["mem_ratio"] = ev["peak_mib"] / ea["peak_mib"]
            ea["mem_ratio"] = 1.0
    table = [dict(r, provider=r["provider"] + (" (OOM)" if r.get("oom") else "")) for r in rows.values()]
    print(_common.format_table(table, COLUMNS))
    if check:
        print(f"check: |loss eager - evofast| = {check['loss_abs_diff']:.3g}, max LoRA gradient difference "
              f"{check['max_rel_grad_diff']:.3g} of the largest gradient entry, over {check['grad_tensors']} tensors")
    goals = targets(rows, shape, device)
    for g in goals:
        print(f"target: {g['what']}: {_common.fmt(g['value'])}{g['unit']} (target {g['target']}) "
              f"{'met' if g['met'] else 'NOT met'}")
    if args.json:
        payload = {"schema_version": _common.SCHEMA_VERSION, "benchmark": "cts", "shape": asdict(shape),
                   "environment": _common.environment(device), "rows": list(rows.values()), "check": check,
                   "targets": goals, "memory_method": "CUDA max_memory_allocated" if device.type == "cuda" else
                   "RSS sampled every 2 ms above the start, MALLOC_MMAP_THRESHOLD_=1 MiB, fresh process; the larger of the warm-up step and a second step"}
        print(f"wrote {_common.write_json(args.json, payload)}", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    from .. import cli
    return cli.standalone(sys.modules[__name__], "evofast bench cts", argv)


if __name__ == "__main__":
    sys.exit(main())
