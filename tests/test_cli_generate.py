"""`evofast generate` end to end on the built-in tiny model, and the HTML trace it writes."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import _chromium
import pytest
from _checkpoints import CHAT_TEMPLATE, save_tiny_checkpoint

pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]


def _run(*args, module="evofast.cli", timeout=120):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    args = args if args[:1] == ("generate",) else ("generate", *args)
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    path = tmp_path_factory.mktemp("trace") / "out.html"
    res = _run("--model", "tiny", "--prompt", "hi", "--gen-length", "32", "--block-length", "8", "--steps", "16",
               "--trace", str(path))
    return res, path


def test_tiny_end_to_end(tiny_run):
    res, path = tiny_run
    assert res.returncode == 0, res.stderr
    assert "nonsense" in res.stderr                       # the tiny model says its text means nothing
    answer = res.stdout.rstrip("\n")
    assert answer and "<mask>" not in answer
    assert "32 tokens in" in res.stderr and "trace: wrote" in res.stderr


def test_trace_page_is_self_contained(tiny_run):
    res, path = tiny_run
    page = path.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    assert not re.search(r"""(src|href)\s*=|https?://|@import""", page), "the page must load nothing"
    data = json.loads(re.search(r'<script type="application/json" id="trace-data">(.*?)</script>', page,
                                re.S).group(1).replace("<\\/", "</"))
    assert data["meta"]["gen_length"] == 32 and data["meta"]["forwards"] == 16
    row = data["rows"][0]
    assert len(row["steps"]) == 17 and len(row["steps"][0]["x"]) == 32
    assert set(row["steps"][0]["state"]) == {0}                 # all [MASK] before the first forward
    assert set(row["steps"][-1]["state"]) <= {2, 3}            # soft / decoded at the end
    assert data["vocab"] and all(isinstance(v, str) for v in data["vocab"].values())


def _main(capsys, *args):
    """The command in this process (no interpreter start-up): (exit code, stdout, stderr)."""
    from evofast.cli import generate as cli_generate
    code = cli_generate.main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_batch_of_prompts_and_hard_mode(capsys):
    import torch
    threads = torch.get_num_threads()
    code, out, err = _main(capsys, "--model", "tiny", "--prompt", "hi", "--prompt", "hello there", "--mode", "hard",
                           "--gen-length", "16", "--block-length", "8", "--steps", "8", "--progress")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("[0] ") and any(line.startswith("[1] ") for line in lines)
    assert "evofast generate" in err                                # the progress bar
    assert torch.get_num_threads() == threads                       # the tiny model's one thread is undone


@pytest.mark.parametrize("args,what", [
    (("--gen-length", "10", "--block-length", "4"), "gen_length"),
    (("--cache", "prefix", "--cache-refresh", "0"), "cache_refresh"),
    (("--alpha", "1.5"), "alpha"),
    (("--top-k", "0"), "--top-k (top_k):"),
    (("--top-p", "1.5"), "--top-p (top_p):"),
    (("--threshold", "1.5"), "--threshold (threshold):"),
    (("--remasking", "entropy", "--threshold", "0.5"), "--threshold (threshold):"),
    (("--policy", "threshold"), "--policy threshold needs --threshold"),
    (("--policy", "stdd", "--threshold", "0.5"), "--threshold: only with --policy threshold"),
    (("--stdd-tau", "0.5"), "--stdd-tau: only with --policy stdd"),
    (("--policy", "stdd", "--stdd-tau", "0.5", "--stdd-tau-max", "0.4"), "--stdd-tau (tau):"),
    (("--policy", "stdd", "--stdd-window", "0"), "--stdd-window (window):"),
    (("--policy", "stdd", "--remasking", "entropy"), "--policy (policy):"),
])
def test_bad_arguments_are_reported(capsys, args, what):
    code, out, err = _main(capsys, "--model", "tiny", "--prompt", "hi", *args)
    assert code == 2 and what in err and "Traceback" not in err and not out


@pytest.mark.parametrize("args", [
    ("--policy", "stdd", "--stdd-tau", "0.2", "--stdd-lam-t", "2", "--stdd-radius", "2", "--remasking", "topk_margin"),
    ("--remasking", "entropy", "--threshold", "-2"),
    ("--temperature", "0.8", "--top-k", "5", "--top-p", "0.9", "--policy", "schedule"),
], ids=["stdd", "entropy-threshold", "filters"])
def test_decoding_policy_flags(capsys, args):
    code, out, err = _main(capsys, "--model", "tiny", "--prompt", "hi", "--gen-length", "8", "--block-length", "4",
                           "--steps", "4", *args)
    assert code == 0, err
    assert out.strip()


def test_missing_checkpoint_is_reported(capsys):
    code, out, err = _main(capsys, "--model", "/nonexistent/checkpoint", "--prompt", "hi")
    assert code == 2 and "cannot load" in err


def test_command_table_entry():
    """Through `evofast generate` once the row is in evofast.cli.COMMANDS."""
    from evofast import cli
    if "generate" not in cli.COMMANDS:
        pytest.skip("evofast.cli.COMMANDS has no 'generate' row yet")
    res = _run("generate", "--model", "tiny", "--prompt", "hi", "--gen-length", "8", "--block-length", "8",
               "--steps", "4", module="evofast")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip()


@pytest.mark.parametrize("chat", [False, True])
def test_checkpoint_directory(tmp_path, capsys, chat):
    """A saved evofast LLaDA checkpoint (random weights) and tokenizer load through the Auto classes; the
    answer is what generate gives in this process for the (chat-templated) prompt."""
    import torch

    from evofast.generation import generate
    model, tok = save_tiny_checkpoint(tmp_path, chat_template=CHAT_TEMPLATE if chat else None)
    code, out, err = _main(capsys, "--model", str(tmp_path), "--prompt", "hi", "--gen-length", "8",
                           "--block-length", "8", "--steps", "4", "--device", "cpu")
    assert code == 0, err
    assert "nonsense" not in err
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                   tokenize=False) if chat else "hi"
    assert text.startswith("<bos>Q: hi") if chat else True
    # the template's own BOS, or the tokenizer's: one, never two
    ids = tok(text, add_special_tokens=not chat)["input_ids"]
    assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1
    ids = torch.tensor([ids])
    want = generate(model, ids, gen_length=8, block_length=8, steps=4)
    assert out == tok.decode(want[0, ids.shape[1]:], skip_special_tokens=True) + "\n"


def test_checkpoint_loader_rebuilds_rope_buffers_where_the_model_can(tmp_path, monkeypatch):
    """load_checkpoint calls a model's own reset_rope_parameters (Dream's remote code has one; under
    transformers 5 its RoPE buffers load uninitialised)."""
    import torch

    from evofast.models import llada
    from evofast.models.loading import load_checkpoint
    save_tiny_checkpoint(tmp_path, chat_template=None)
    calls = []
    monkeypatch.setattr(llada.LLaDAModelLM, "reset_rope_parameters", lambda self: calls.append(self), raising=False)
    model, _ = load_checkpoint(str(tmp_path), "cpu", torch.float32, False)
    assert calls == [model]


def test_checkpoint_without_tokenizer_is_reported(tmp_path, capsys):
    from evofast.models import llada
    llada.tiny(vocab_size=100, d_model=32, n_layers=1, n_heads=2, seed=3).save_pretrained(tmp_path)
    code, _, err = _main(capsys, "--model", str(tmp_path), "--prompt", "hi", "--gen-length", "8",
                         "--block-length", "8", "--steps", "4")
    assert code == 2 and "cannot load" in err


@pytest.mark.slow
def test_trace_renders_in_headless_chromium(tiny_run):
    res, path = tiny_run
    dom = _chromium.dump_dom(path)
    assert 'data-rendered="1"' in dom and 'id="trace-error"' not in dom
    cells = [int(c) for c in re.findall(r'<td class="cell[^"]*" data-pos="(\d+)"', dom)]
    assert len(cells) == 17 * 32                                  # every step x every generated position
    assert set(cells) == set(range(min(cells), min(cells) + 32))
    assert 'data-state="decoded"' in dom and 'data-state="soft-mask"' in dom


def test_bench_generate_tiny(tmp_path, capsys):
    """`evofast bench generate` at the tiny shape: the table, the JSON, and tokens equal to the authors' loop."""
    import torch

    from evofast.bench import generate as bench
    out = tmp_path / "gen.json"
    threads = torch.get_num_threads()
    try:
        assert bench.main(["--shape", "tiny", "--device", "cpu", "--repeat", "1", "--batch", "1", "2",
                           "--backends", "authors", "cpp", "torch", "--caches", "none", "--threads", "1",
                           "--json", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    text = capsys.readouterr().out
    for col in ("s/gen", "ms/step", "tokens/s", "% outside fwd", "speedup", "check"):
        assert col in text
    data = json.loads(out.read_text())
    assert data["benchmark"] == "evofast.bench.generate" and data["config"]["shape"] == "tiny"
    timed = [r for r in data["rows"] if not r.get("skipped")]
    assert {r["provider"] for r in timed} == {"authors", "evofast-cpp", "evofast-torch"}
    for r in timed:
        assert r["check"] in ("ok", "reference"), r
        assert r["forwards"] >= 16 and r["tokens_per_s"] > 0 and 0 <= r["outside_pct"] <= 100
