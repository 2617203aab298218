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
2 layers, seq 256, batch 2, K 4, LoRA r 8: >= 2x faster and <= half the peak
memory), llada-8b-layers (two LLaDA-8B layers at full width, d_model 4096, 32
heads, MLP 12288, V 126464, fp32, seq 1024, batch 2, K 4, LoRA r 128 on q / k / v:
the real width on the CPU; about a teraflop of LM-head work per trajectory step,
so minutes a step; one warm-up step gives the peak and one step the time, in the
same process per provider), llada-8b (all 32 LLaDA-8B layers, bf16 weights built on
the meta device then materialised on the GPU, LoRA r 128, seq 1024, batch 2, K 4,
gradient checkpointing: GPU only).

With llada-8b-layers the JSON also holds what autograd keeps per LLaDA-8B layer
for one trajectory step (saved-tensor hooks on one full-width layer) and, computed
from it, what an 8B CTS step needs per GPU under DDP + LoRA, ZeRO-2 with CPU
offload and FSDP (`per_gpu_needs`).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
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
    "llada-8b-layers": CTSShape("llada-8b-layers", 126464, 4096, 2, 32, 12288, 1024, 128, 2, 4, 128, "fp32", False,
                                1),
    "llada-8b": CTSShape("llada-8b", 126464, 4096, 32, 32, 12288, 1024, 128, 2, 4, 128, "bf16", True, 3),
}
#: shapes measured in one pass per provider: the warm-up step's peak memory, one timed step
ONE_PASS = ("llada-8b-layers",)


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


def _cpu_s() -> float:
    """CPU seconds this process has used (user + system): a step's cost that other jobs on a shared
    machine inflate much less than its wall time."""
    t = os.times()
    return t.user + t.system


def run_provider(shape_name: str, provider: str, device: str, repeat: Optional[int], warmup: int,
                 budget: Optional[float], timed: bool = True, memory: bool = True, retry_busy: int = 0) -> dict:
    """What is measured for one provider in this process (see the module docstring)."""
    shape = SHAPES[shape_name]
    dev = torch.device(device)
    if dev.type == "cpu" and shape.name == "tiny":
        torch.set_num_threads(1)   # tiny matrices: a second thread only adds synchronisation (on a busy
                                   # machine, hundreds of times slower); the cpu shape keeps every core
    model, batch, alphas = build(shape, dev, fast_init=True if shape.name in ONE_PASS else None)
    step = step_fn(provider, model, batch, alphas)
    oom = (torch.cuda.OutOfMemoryError,) if dev.type == "cuda" else ()
    row = {"provider": provider, "shape": shape.name}
    try:
        model.zero_grad(set_to_none=True)
        _common.synchronize(dev)
        # warm-up: allocates the LoRA grads and any workspace a provider keeps between
        # steps; both count, so its peak is taken too
        t0, cpu0 = time.perf_counter(), _cpu_s()
        with _common.PeakMemory(dev) as first:
            loss = step()
        first_s, first_cpu = time.perf_counter() - t0, _cpu_s() - cpu0
        grads = {n: p.grad.detach().float().cpu().clone() for n, p in model.named_parameters() if p.grad is not None}
        if memory and shape.name in ONE_PASS:
            row["peak_mib"] = first.mib
        elif memory:
            _common.synchronize(dev)
            with _common.PeakMemory(dev) as mem:
                step()
            row["peak_mib"] = max(mem.mib, first.mib)
        if timed and shape.name in ONE_PASS:          # minutes a step: the step after the warm-up, once
            busy, cpu0 = _common.CpuContention(), _cpu_s()
            t0 = time.perf_counter()
            step()
            ms = (time.perf_counter() - t0) * 1e3
            row.update(median_ms=ms, p20_ms=ms, p80_ms=ms, min_ms=ms, reps=1, warmup=1,
                       other_cpu=busy.other_fraction(), first_step_ms=first_s * 1e3,
                       cpu_s=_cpu_s() - cpu0, first_step_cpu_s=first_cpu)
        elif timed:
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


# --------------------------------------------------------------------------- an 8B step per GPU
GB = 1e9


def layer_activation_bytes(shape: CTSShape, dtype: torch.dtype = torch.float32) -> int:
    """Bytes autograd keeps for one trajectory step's backward in one LLaDA layer of `shape`'s width
    (batch x seq tokens, LoRA on q / k / v; weights excluded, the layer's input included), measured
    with saved-tensor hooks on a one-layer model (its final norm adds one batch x seq x d_model tensor)."""
    from ..cts.lora import add_lora
    from ..models import llada
    from ..models.registry import get_adapter

    cfg = llada.LLaDAConfig(vocab_size=256, embedding_size=256, d_model=shape.d_model, n_layers=1,
                            n_heads=shape.n_heads, n_kv_heads=shape.n_heads, mlp_hidden_size=shape.mlp,
                            max_sequence_length=max(4096, shape.seq), mask_token_id=255)
    model = add_lora(llada.random_weights(cfg, "cpu", dtype), shape.lora_r)
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in weights:
            kept[ptr] = t.untyped_storage().nbytes()
        return t
    x = torch.randn(shape.batch, shape.seq, shape.d_model, dtype=dtype, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        get_adapter(model.get_base_model()).hidden_states(inputs_embeds=x)
    return sum(kept.values())


def per_gpu_needs(layer_fp32: int, gpus: int = 8, batch: int = 2, seq: int = 1024, K: int = 4,
                  lora_r: int = 128) -> dict:
    """What one CTS optimizer step of LLaDA-8B needs per GPU (GB), computed: weights, gradients and
    optimizer states from the 8B config's parameter counts, activations from the measured bytes per
    layer (`layer_fp32`, halved for bf16). evofast: one trajectory step's graph alive (with gradient
    checkpointing: each layer's input, plus one layer's graph); eager: all K graphs, each with its
    fp32 log-softmax of every position, plus one step's fp32 logits and one row's float64 softmax."""
    from ..models import llada
    with torch.device("meta"):
        model = llada.LLaDAModelLM(llada.LLaDAConfig(vocab_size=126464, embedding_size=126464))
    cfg = model.config
    P = sum(p.numel() for p in model.parameters())
    block = sum(p.numel() for p in model.model.transformer.blocks[0].parameters())
    root = P - cfg.n_layers * block                                # embedding, LM head, final norm
    lora = cfg.n_layers * 3 * lora_r * 2 * cfg.d_model             # A (r x d) + B (d x r) on q, k, v
    L, d, V = cfg.n_layers, cfg.d_model, cfg.vocab_size
    layer = layer_fp32 / 2                                         # bf16 activations
    logits32 = batch * seq * V * 4
    act = {"evofast": L * layer + batch * seq * d * 4 + 256 * 2**20,        # + fused head: grad_h, one block
           "evofast, checkpointing": L * batch * seq * d * 2 + layer + batch * seq * d * 4 + 256 * 2**20,
           "eager": K * (L * layer + logits32) + logits32 + seq * V * 8}
    setups = {
        "DDP + LoRA r128 (bf16 weights, fp32 LoRA + Adam)": {"gpu": 2 * P + 16 * lora, "cpu": 0},
        "ZeRO-2 + CPU offload, LoRA r128 (the authors' setup)": {"gpu": 2 * P + 2 * lora, "cpu": 16 * lora},
        f"ZeRO-2 + CPU offload, full fine-tuning, {gpus} GPUs": {"gpu": 2 * P + 2 * P / gpus + 2 * 5e8,
                                                                "cpu": 16 * P},
        f"FSDP2, full fine-tuning, {gpus} GPUs (fp32 shards, bf16 compute)": {
            "gpu": 16 * P / gpus + 2 * root + 2 * 2 * block, "cpu": 0},
    }
    rows = []
    for name, fixed in setups.items():
        row = {"setup": name, "states_gb": fixed["gpu"] / GB, "cpu_gb": fixed["cpu"] / GB}
        for kind, a in act.items():
            row[f"activations_{kind}_gb"] = a / GB
            row[f"total_{kind}_gb"] = (fixed["gpu"] + a) / GB
        rows.append(row)
    return {"parameters": P, "lora_parameters": lora, "layer_activation_fp32_bytes": layer_fp32,
            "gpus": gpus, "batch_per_gpu": batch, "seq": seq, "K": K, "rows": rows,
            "method": "computed: parameter counts of the LLaDA-8B config, activations per layer measured on the "
                      "CPU (fp32, saved-tensor hooks) and halved for bf16; GPU allocator overheads not included"}


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
    if shape.name == "llada-8b-layers" and ea and "median_ms" in ea:
        out.append({"what": "evofast vs eager step time, two LLaDA-8B layers", "value": ev["speedup"],
                    "target": 2.0, "unit": "x", "met": ev["speedup"] >= 2.0})
        out.append({"what": "evofast peak memory / eager, two LLaDA-8B layers", "value": ev["mem_ratio"],
                    "target": 0.4, "unit": "", "met": ev["mem_ratio"] <= 0.4})
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
            if device.type == "cuda" or shape.name in ONE_PASS:
                rows[provider] = run_in_child(spec, grads_path=grads, timeout=4 * 3600)
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
    if ea and ev and ea.get("cpu_s") and ev.get("cpu_s"):
        ev["cpu_speedup"] = ea["cpu_s"] / ev["cpu_s"]
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
    scale = None
    if shape.name in ONE_PASS:
        layer = layer_activation_bytes(shape)
        scale = per_gpu_needs(layer, batch=shape.batch, seq=shape.seq, K=shape.K, lora_r=shape.lora_r)
        print(f"per LLaDA-8B layer and trajectory step, autograd keeps {layer / 2**20:.0f} MiB (fp32); an 8B CTS "
              "step per GPU (computed, GB):", file=sys.stderr)
        for r in scale["rows"]:
            print(f"  {r['setup']}: evofast {r['total_evofast_gb']:.1f} (checkpointing "
                  f"{r['total_evofast, checkpointing_gb']:.1f}), eager {r['total_eager_gb']:.1f}", file=sys.stderr)
    for g in goals:
        print(f"target: {g['what']}: {_common.fmt(g['value'])}{g['unit']} (target {g['target']}) "
              f"{'met' if g['met'] else 'NOT met'}")
    if args.json:
        payload = {"schema_version": _common.SCHEMA_VERSION, "benchmark": "cts", "shape": asdict(shape),
                   "environment": _common.environment(device), "rows": list(rows.values()), "check": check,
                   "targets": goals, "per_gpu_8b": scale, "memory_method": "CUDA max_memory_allocated" if device.type == "cuda" else
                   "RSS sampled every 2 ms above the start, MALLOC_MMAP_THRESHOLD_=1 MiB, fresh process; the larger of the warm-up step and a second step"}
        print(f"wrote {_common.write_json(args.json, payload)}", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    from .. import cli
    return cli.standalone(sys.modules[__name__], "evofast bench cts", argv)


if __name__ == "__main__":
    sys.exit(main())
