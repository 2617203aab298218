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
    trainable weights: the 2 blocks, plus the root in full fine-tuning), not once per step; and
    the final save gathers the sharded weights whole."""
    cases = ["fsdp2:lora", "fsdp2:full", "ddp:full"]
    for rank_result in _launch(tmp_path, cases):
        for case in cases:
            _assert_matches(reference[case.split(":")[1]], rank_result[case], case)
        assert rank_result["reductions"] == {"fsdp2:lora": 2, "fsdp2:full": 3}
        assert rank_result["saved"] == {"fsdp2:lora": True, "fsdp2:full": True}   # the gathered final save


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_cpu_offload_two_processes_match_one_process(tmp_path, reference, stage):
    """ZeRO-2 / ZeRO-3, optimizer offloaded to the CPU; ZeRO-3 with every weight partitioned and
    released after use, so the loss's direct reads of the embedding and the head are fetched."""
    pytest.importorskip("deepspeed")
    cases = ["deepspeed:lora", "deepspeed:full"]
    results = _launch(tmp_path, cases, DS_ACCELERATOR="cpu", ZERO_STAGE=str(stage), ZERO_OFFLOAD="cpu")
    for case in cases:
        _assert_matches(reference[case.split(":")[1]], results[0][case], f"ZeRO-{stage} {case}")
    if stage == 3:                                                 # the gathered final save
        assert results[0]["saved"] == {"deepspeed:lora": True, "deepspeed:full": True}


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


def test_saves_that_cannot_work_are_refused_before_training():
    from evofast.cts import distributed

    def trainer(fsdp=False, stage=0, gather=False):
        zero = {"stage3_gather_16bit_weights_on_model_save": gather}
        plugin = SimpleNamespace(zero_stage=stage, deepspeed_config={"zero_optimization": zero})
        return SimpleNamespace(is_fsdp_enabled=fsdp, is_deepspeed_enabled=stage > 0,
                               accelerator=SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=plugin)))
    for sharded in (trainer(fsdp=True), trainer(stage=3, gather=True)):
        with pytest.raises(ValueError, match="--no-merge"):
            distributed.check_save(sharded, merge_lora=True)
        distributed.check_save(sharded, merge_lora=False)
    with pytest.raises(ValueError, match="zero3_save_16bit_model: true"):
        distributed.check_save(trainer(stage=3), merge_lora=False)
    distributed.check_save(trainer(stage=2), merge_lora=True)          # ZeRO-2 keeps whole weights


def test_cli_takes_the_launchers_settings_and_refuses_conflicts(monkeypatch, capsys):
    from evofast.cli import train_cts as cli_train_cts
    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "4")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    monkeypatch.setenv("ACCELERATE_GRADIENT_CLIPPING", "0.5")
    args = SimpleNamespace(grad_accum=None, bf16=False)
    assert cli_train_cts._launcher_settings(args) == {"max_grad_norm": 0.5}
    assert args.grad_accum == 4 and args.bf16
    assert cli_train_cts.main(["--model", "tiny", "--grad-accum", "2"]) == 2      # before anything loads
    assert "gradient_accumulation_steps 4" in capsys.readouterr().err
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "fp16")
    assert cli_train_cts.main(["--model", "tiny", "--bf16"]) == 2
    assert "mixed_precision fp16" in capsys.readouterr().err


LAUNCH = os.environ.get("EVOFAST_TEST_ACCELERATE_LAUNCH")


@pytest.mark.slow
@pytest.mark.skipif(not LAUNCH, reason="EVOFAST_TEST_ACCELERATE_LAUNCH is not set (DeepSpeed compiles its CPU "
                                       "ops on first use: minutes)")
@pytest.mark.parametrize("config,extra", [("zero2_offload_bf16", []), ("zero3_offload_bf16", ["--full"])])
def test_cli_under_accelerate_launch_with_the_repos_deepspeed_configs(tmp_path, config, extra):
    """`accelerate launch --config_file configs/accelerate/CONFIG.yaml -m evofast.cli train-cts`, 2
    processes, DeepSpeed's CPU accelerator, bf16: trains, checkpoints and saves a model that loads."""
    pytest.importorskip("deepspeed")
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), CUDA_VISIBLE_DEVICES="", DS_ACCELERATOR="cpu")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "configs" / "accelerate" / f"{config}.yaml"), "--num_processes", "2", "-m", "evofast.cli",
           "train-cts", "--model", "tiny", "--steps", "2", "--lora-r", "4", "--block-sizes", "16",
           "--batch-size", "2", "--no-progress", "--save-steps", "1", "--out", str(out), *extra]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stderr.count("saved to") == 1 and (out / "checkpoint-2").is_dir()
    from evofast.models import llada
    assert llada.LLaDAModelLM.from_pretrained(out).config.vocab_size == 100
