"""CTSTrainer under data parallelism on the CPU (gloo, 2 processes): FSDP2, DDP and DeepSpeed ZeRO
with CPU offload give the loss and the (gathered) LoRA and full-parameter gradients that one
process gives on the same global batch (its two micro-batches accumulated). The one-process
reference runs here; the workers are tests/cts_dist_worker.py under torchrun.

FSDP2: torch's `fully_shard` on every block and then the root, as accelerate's FSDP2 plugin
wraps a model (accelerate enables its FSDP plugin on GPUs only), driven by CTSTrainer's own
training step. DeepSpeed: the Trainer's DeepSpeed integration end to end (accelerate, the
engine, ZeRO's partitioned and offloaded gradients), DeepSpeed's CPU accelerator.
"""
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning"), pytest.mark.usefixtures("one_torch_thread")]

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The one-process results (both micro-batches accumulated), per mode."""
    import cts_dist_worker
    tmp = str(tmp_path_factory.mktemp("ref"))
    out = {}
    for mode in ("lora", "full"):
        loss, grads = cts_dist_worker.run_direct("single", mode, tmp)
        out[mode] = {"loss": loss.detach(), "grads": grads}
    return out


def _launch(tmp_path, cases, **env):
    out = tmp_path / "result"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), CUDA_VISIBLE_DEVICES="", **env)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(TESTS / "cts_dist_worker.py"), str(out), ",".join(cases)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [torch.load(f"{out}.{rank}.pt") for rank in (0, 1)]


def _assert_matches(ref, got, case):
    torch.testing.assert_close(got["loss"], ref["loss"], rtol=1e-5, atol=1e-6, msg=case)
    assert got["grads"].keys() == ref["grads"].keys(), case
    for name, g in ref["grads"].items():
        assert float(g.abs().max()) > 0, name                  # every gradient is really there
        torch.testing.assert_close(got["grads"][name], g, rtol=1e-4, atol=1e-7, msg=f"{case}: {name}")


def test_fsdp2_and_ddp_two_processes_match_one_process(tmp_path, reference):
    """Also: FSDP2 reduces the gradients once per micro-batch (one reduction per FSDP unit with
    trainable weights: the 2 blocks, plus the root in full fine-tuning), not once per step."""
    cases = ["fsdp2:lora", "fsdp2:full", "ddp:full"]
    for rank_result in _launch(tmp_path, cases):
        for case in cases:
            _assert_matches(reference[case.split(":")[1]], rank_result[case], case)
        assert rank_result["reductions"] == {"fsdp2:lora": 2, "fsdp2:full": 3}


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_cpu_offload_two_processes_match_one_process(tmp_path, reference, stage):
    """ZeRO-2 / ZeRO-3, optimizer offloaded to the CPU; ZeRO-3 with every weight partitioned and
    released after use, so the loss's direct reads of the embedding and the head are fetched."""
    pytest.importorskip("deepspeed")
    cases = ["deepspeed:lora", "deepspeed:full"]
    results = _launch(tmp_path, cases, DS_ACCELERATOR="cpu", ZERO_STAGE=str(stage), ZERO_OFFLOAD="cpu")
    for case in cases:
        _assert_matches(reference[case.split(":")[1]], results[0][case], f"ZeRO-{stage} {case}")


# --------------------------------------------------------------------------- refused before the first step
def test_fsdp1_and_model_parallel_setups_are_refused_by_name():
    from evofast.cts import distributed

    def trainer(fsdp_version=None, pc=None):
        state = SimpleNamespace(fsdp_plugin=SimpleNamespace(fsdp_version=fsdp_version))
        return SimpleNamespace(is_fsdp_enabled=fsdp_version is not None, model=None,
                               accelerator=SimpleNamespace(state=state, parallelism_config=pc))
    with pytest.raises(ValueError, match="fsdp_version: 2"):
        distributed.check_setup(trainer(fsdp_version=1))
    with pytest.raises(ValueError, match="data parallelism"):
        distributed.check_setup(trainer(pc=SimpleNamespace(tp_enabled=True)))
    distributed.check_setup(trainer(fsdp_version=2))
    distributed.check_setup(trainer())


def test_a_model_partitioned_at_load_is_refused_before_patching():
    """ZeRO-3's zero.Init partitions weights as the model is built: evofast cannot patch such a
    model (it reads the embedding's shape), so CTSTrainer names the setting to change."""
    from transformers import TrainingArguments

    from evofast.cts import CTSTrainer
    from evofast.models import llada
    model = llada.tiny(vocab_size=64, d_model=32, n_layers=1, n_heads=4)
    model.model.transformer.wte.weight.ds_id = 0                 # what zero.Init leaves on a parameter
    args = TrainingArguments(output_dir="unused", use_cpu=True, report_to=[])
    with pytest.raises(ValueError, match="zero3_init_flag: false"):
        CTSTrainer(model=model, args=args)
