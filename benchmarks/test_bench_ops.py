"""pytest-benchmark: evo_step and soft_embed per provider at small shapes.

Run on demand (not part of `make test`):

    pytest benchmarks/ [--benchmark-json FILE] [--benchmark-compare]

Same providers, cases and checks as `evofast bench ops` (evofast/bench/ops.py),
at the tiny shape (V 1000, prompt 16, gen 32, block 8) and a small LLaDA-vocabulary
one (V 126464, prompt 16, gen 32). GPU when there is one (bf16), else CPU (fp32).
Each round starts from a reset state (untimed setup); on CUDA the timed call ends
with a synchronize, so device time is counted.
"""
from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _checkout  # noqa: F401,E402  (evofast from this checkout when not installed)

from evofast.bench import _common
from evofast.bench import ops as bench_ops

DEVICE = _common.pick_device("auto")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
SHAPES = {
    "tiny": bench_ops.SHAPES["tiny"],
    "small-llada-vocab": replace(bench_ops.SHAPES["cpu"], name="small-llada-vocab", prompt=16, gen=32, block=8,
                                 steps_per_block=4, batches=(1, 2)),
}
STEP_PROVIDERS = ["authors-eager", "eager-rows", "compiled-rows", *(f"evofast-{b}" for b in ("torch", "cpp",
                                                                                          "triton", "cuda"))]
EMBED_PROVIDERS = [bench_ops.SPEC, *(f"evofast-{b}" for b in ("torch", "cpp", "triton", "cuda"))]
CASE_IDS = [(s, b) for s in SHAPES for b in (1, 2)]


def _synced(fn):
    def call():
        fn()
        _common.synchronize(DEVICE)
    return call


@pytest.fixture(scope="module", params=CASE_IDS, ids=[f"{s}-B{b}" for s, b in CASE_IDS])
def step_case(request):
    shape, B = request.param
    return bench_ops.StepCase(SHAPES[shape], B, DTYPE, DEVICE)


@pytest.fixture(scope="module", params=CASE_IDS, ids=[f"{s}-B{b}" for s, b in CASE_IDS])
def embed_case(request):
    shape, B = request.param
    return bench_ops.EmbedCase(SHAPES[shape], B, DTYPE, DEVICE)


@pytest.mark.parametrize("provider", STEP_PROVIDERS)
def test_evo_step(benchmark, step_case, provider):
    entries = {n: (f, note) for n, f, note in bench_ops.step_providers(step_case, DEVICE, {provider}, True)}
    factory, note = entries[provider]
    if factory is None:
        pytest.skip(note)
    fn, reset = factory()
    reset()
    fn()                                        # compile / load outside the timing
    assert step_case.check() == "ok"
    benchmark.group = f"evo_step {step_case.shape.name} B={step_case.B} {DEVICE.type}"
    benchmark.extra_info.update(window_bytes=step_case.window_bytes, device=_common.device_name(DEVICE))
    benchmark.pedantic(_synced(fn), setup=reset, rounds=30, warmup_rounds=2)


@pytest.mark.parametrize("pass_", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("provider", EMBED_PROVIDERS)
def test_soft_embed(benchmark, embed_case, provider, pass_):
    entries = {n: (f, note) for n, f, note in bench_ops.embed_providers(DEVICE, {provider})}
    f, note = entries[provider]
    if f is None:
        pytest.skip(note)
    fwd, fwd_bwd = embed_case.functions(f)
    assert embed_case.check(fwd()) == "ok"
    benchmark.group = f"soft_embed {pass_} {embed_case.shape.name} B={embed_case.B} {DEVICE.type}"
    benchmark.pedantic(_synced(fwd if pass_ == "fwd" else fwd_bwd), rounds=30, warmup_rounds=2)
