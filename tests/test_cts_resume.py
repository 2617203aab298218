"""Exact resume of CTS training: a run stopped after a checkpoint and resumed from it ends with the
weights of the uninterrupted run; checkpoints are renamed into place only once complete."""
import pytest
import torch
from transformers import TrainerCallback

from evofast.cts import encode_examples, train_cts
from evofast.cts.output import STAGING, checkpoints, last_checkpoint
from evofast.models import llada
from evofast.char_tokenizer import tiny_tokenizer

pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning"), pytest.mark.usefixtures("one_torch_thread")]


class Crash(Exception):
    pass


class CrashAt(TrainerCallback):
    """Stops the run the hard way (an exception, as a killed process would) after optimizer step `n`."""

    def __init__(self, n):
        self.n = n

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.n:
            raise Crash(f"stopped at step {state.global_step}")


def _run(out, tok, exs, lora, **kw):
    model = llada.tiny(vocab_size=tok.vocab_size, d_model=32, n_layers=2, n_heads=4, seed=0)
    kw = dict(output_dir=str(out), lora_r=4 if lora else None, max_steps=6, batch_size=2, grad_accum=2, lr=5e-3,
              block_sizes=(16,), per_de_nums=(1, 2), merge=False, progress=False, seed=3, save_steps=3,
              save_total_limit=None, log=lambda msg: None, **kw)
    trained, _ = train_cts(model, tok, exs, **kw)
    return {n: p.detach().clone() for n, p in trained.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("lora", [True, False])
def test_stopped_and_resumed_run_ends_with_the_uninterrupted_weights(tmp_path, lora):
    """6 examples, batch 2, accumulation 2: 3 micro-batches and 2 optimizer steps per epoch, so the
    checkpoint at step 3 lies inside an epoch (the resumed run skips its first micro-batches) and
    the run crosses epochs. The collator's noise and the mask weights are drawn from the optimizer
    step, not from a stream the crash loses."""
    tok = tiny_tokenizer()
    exs = encode_examples(tok, [{"prompt": f"Q{i}:", "response": "the quick brown fox " + "ab" * i}
                                for i in range(6)])
    want = _run(tmp_path / "straight", tok, exs, lora)
    out = tmp_path / "stopped"
    with pytest.raises(Crash):
        _run(out, tok, exs, lora, callbacks=[CrashAt(5)])
    assert [p.name for p in checkpoints(out)] == ["checkpoint-3"]          # the crash left the checkpoint
    got = _run(out, tok, exs, lora, resume=True)
    assert want.keys() == got.keys() and len(want) > 0
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0, msg=name)
    assert last_checkpoint(out).name == "checkpoint-6"


def test_an_interrupted_save_is_never_taken_for_a_checkpoint(tmp_path, monkeypatch):
    """A crash while the Trainer writes a checkpoint leaves it under the staging folder only:
    resume takes the last complete one."""
    from transformers import Trainer
    tok = tiny_tokenizer()
    exs = encode_examples(tok, [{"prompt": "Q:", "response": "the quick brown fox"}] * 4)
    real = Trainer._save_rng_state

    def crash_in_step_4(self, output_dir):
        if self.state.global_step == 4:
            raise Crash("killed while saving")
        real(self, output_dir)
    monkeypatch.setattr(Trainer, "_save_rng_state", crash_in_step_4)
    out = tmp_path / "run"
    with pytest.raises(Crash):
        train_cts(llada.tiny(vocab_size=tok.vocab_size, d_model=32, n_layers=1, n_heads=4), tok, exs,
                  output_dir=str(out), lora_r=2, max_steps=6, save_steps=2, block_sizes=(16,), per_de_nums=(1,),
                  progress=False, merge=False, log=lambda msg: None)
    assert [p.name for p in checkpoints(out)] == ["checkpoint-2"]
    assert (out / STAGING / "checkpoint-4").is_dir()                       # the half-written one
    assert last_checkpoint(out).name == "checkpoint-2"
