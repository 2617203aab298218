"""evofast as an lm-evaluation-harness model: the paper's task files on a 3-row local JSON file
through lm-eval's Python API and command line, generations equal to `evofast.generate`'s,
the Monte-Carlo log-likelihood, arguments refused before the model loads."""
from __future__ import annotations

import json

import pytest
import torch
from _checkpoints import save_tiny_checkpoint

lm_eval = pytest.importorskip("lm_eval", reason="needs lm-eval (pip install 'evofast[eval]')")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

import evofast  # noqa: E402
from evofast.chat import left_pad, pad_id_of  # noqa: E402
from evofast.integrations import lm_eval as evo_lm_eval  # noqa: E402
from evofast.integrations.likelihood import greedy_matches, mc_loglikelihood  # noqa: E402
from evofast.tasks import get_task  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

#: an LLaDA-like template: roles rendered apart, so an assistant prefill continues after "A:"
TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}<bos>Q: {{ m['content'] }}\n"
            "{% else %}A:{{ m['content'] }}<eos>{% endif %}{% endfor %}{% if add_generation_prompt %}A:{% endif %}")
ROWS = [{"question": "What is 2 + 3?", "answer": "add\n#### 5"},
        {"question": "Tom has 4 apples and eats 1. How many are left?", "answer": "#### 3"},
        {"question": "7 * 6 = ?", "answer": "#### 42"}]
DECODING = dict(mode="evotoken", gen_length=16, steps=8, block_length=8, k_soft=3, alpha=0.7)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("lm_eval")
    _, tok = save_tiny_checkpoint(d / "model", chat_template=TEMPLATE)
    (d / "gsm8k.json").write_text(json.dumps(ROWS))
    return d, tok


@pytest.fixture(scope="module")
def lm(setup):
    d, _ = setup
    return evo_lm_eval.EvofastLM(pretrained=str(d / "model"), device="cpu", batch_size=2, **DECODING)


def _expected(lm, prompts, batch_size, **kw):
    """What evofast.generate gives for these prompt ids in generate_until's batches (longest first)."""
    order = sorted(range(len(prompts)), key=lambda i: (-len(prompts[i]), i))
    out = [None] * len(prompts)
    for s in range(0, len(order), batch_size):
        idx = order[s:s + batch_size]
        ids, am = left_pad([prompts[i] for i in idx], pad_id_of(lm.tokenizer))
        gen = evofast.generate(lm.model, ids, am, **{**DECODING, **kw})
        for i, row in zip(idx, gen[:, ids.shape[1]:].tolist()):
            out[i] = row
    return out


def test_paper_task_through_simple_evaluate(setup, lm):
    d, tok = setup
    tm = TaskManager(include_path=str(evo_lm_eval.TASK_DIR), include_defaults=False,
                     metadata={"gsm8k_data": str(d / "gsm8k.json")})
    res = lm_eval.simple_evaluate(model=lm, tasks=["evofast_gsm8k"], task_manager=tm, apply_chat_template=True,
                                  log_samples=True)
    r = res["results"]["evofast_gsm8k"]
    assert r["sample_len"] == 3 and 0.0 <= r["acc,none"] <= 1.0
    task = get_task("gsm8k")
    exs = task.load(d / "gsm8k.json")
    samples = sorted(res["samples"]["evofast_gsm8k"], key=lambda s: s["doc_id"])
    prompts = [s["arguments"][0][0] for s in samples]
    assert prompts == [task.prompt_text(ex, tok) for ex in exs]        # the authors' prompt, "<reasoning>" prefill
    expected = _expected(lm, [task.encode(ex, tok) for ex in exs], batch_size=2)
    texts = [tok.decode(row, skip_special_tokens=False) for row in expected]   # the task asks for the raw text
    assert [s["resps"][0][0] for s in samples] == texts
    assert [s["acc"] for s in samples] == [float(task.check(ex, t)) for ex, t in zip(exs, texts)]
    assert res["config"]["decoding"]["name"] == "gen16-steps8-block8-evotoken-k3-alpha0.7-T0"


@pytest.mark.parametrize("name, record, right", [
    ("gsm8k", {"question": "2 + 3?", "answer": "add\n#### 5"}, "\\boxed{5}"),
    ("math500", {"problem": "Simplify 10/2.", "answer": "5"}, "so \\boxed{5}"),
    ("svamp", {"Body": "Tom has 2. ", "Question": "He gets 3; how many?", "Answer": 5.0}, "\\boxed{5}"),
    ("countdown", {"input": "1,2,3", "output": "6"}, "\\boxed{1 + 2 + 3}")])
def test_task_files_of_the_four_benchmarks(tmp_path, name, record, right):
    data = tmp_path / f"{name}.jsonl"
    data.write_text(json.dumps(record) + "\n")
    tm = TaskManager(include_path=str(evo_lm_eval.TASK_DIR), include_defaults=False,
                     metadata={f"{name}_data": str(data)})
    task = tm.load([f"evofast_{name}"])["tasks"][f"evofast_{name}"]
    doc, = list(task.test_docs())
    ex, = get_task(name).load(data)
    assert task.doc_to_text(doc) == get_task(name).user_turn(ex)
    assert task.config.gen_prefix == "<reasoning>"
    assert task.process_results(doc, [right]) == {"acc": 1.0} and task.process_results(doc, ["no box"]) == {"acc": 0.0}


def test_countdown_needs_its_file():
    from evofast.integrations import lm_eval_paper
    with pytest.raises(ValueError, match="^countdown_data:"):
        lm_eval_paper.countdown_dataset(pretrained="somewhere")


def _requests(contexts, **gen_kwargs):
    return [Instance("generate_until", {}, (c, dict(gen_kwargs)), i) for i, c in enumerate(contexts)]


def test_generate_until_lengths_stops_and_sampling(setup):
    d, tok = setup
    contexts = ["<bos>Q: hi\nA:", "<bos>Q: a longer question\nA:", "plain"]
    ids = [tok(c, add_special_tokens=False)["input_ids"] for c in contexts[:2]] + [tok("plain")["input_ids"]]
    lm = evo_lm_eval.EvofastLM(pretrained=str(d / "model"), device="cpu", batch_size=2,
                               **{**DECODING, "mode": "hard"})
    # max_gen_toks 5 -> one block of 8 tokens in 4 steps (the model's 4 steps per block), cut to 5 tokens
    got = lm.generate_until(_requests(contexts, until=[], max_gen_toks=5, skip_special_tokens=False))
    rows = _expected(lm, ids, 2, mode="hard", gen_length=8, steps=4)
    assert got == [tok.decode(r[:5], skip_special_tokens=False) for r in rows]
    # default: gen_length 16; the text cut before the first stop string, special tokens removed
    full = [tok.decode(r, skip_special_tokens=False) for r in _expected(lm, ids, 2, mode="hard")]
    stop = next(ch for ch in full[1][2:] if ch.isalnum())
    got = lm.generate_until(_requests(contexts, until=[stop], temperature=0.7))   # temperature: ignored (warned)
    for g, f in zip(got, full):
        ends = [f.find(s) for s in (stop, "<eos>") if s in f]
        want = f[:min(ends)] if ends else f
        for special in ("<bos>", "<eos>", "<mask>", "<unk>"):
            want = want.replace(special, "")
        assert g == want
    # sampling: the same draws on a rerun, other draws with another seed
    kw = dict(pretrained=str(d / "model"), device="cpu", batch_size=2, **{**DECODING, "temperature": 1.0})
    a, b = evo_lm_eval.EvofastLM(**kw, seed=1), evo_lm_eval.EvofastLM(**kw, seed=2)
    reqs = _requests(contexts * 2, until=[], skip_special_tokens=False)
    first = a.generate_until(reqs)
    assert first == a.generate_until(reqs) and first != b.generate_until(reqs)
    assert first[:3] != first[3:]                    # repeats of a prompt draw apart


def test_loglikelihood_monte_carlo(lm):
    tok = lm.tokenizer
    ctx, cont = "<bos>Q: 2+3\nA:", "5"
    reqs = [Instance("loglikelihood", {}, (ctx, cont), 0)]
    (logp, greedy), = lm.loglikelihood(reqs)
    assert lm.loglikelihood(reqs) == [(logp, greedy)] and greedy is False
    # one target token: the estimate is exact, log p of the token with it masked
    prefix = tok(ctx, add_special_tokens=False)["input_ids"]
    target = tok(cont, add_special_tokens=False)["input_ids"]
    adapter = evofast.get_adapter(lm.model)
    with torch.no_grad():
        logits = adapter.forward(input_ids=torch.tensor([prefix + [adapter.mask_id]]))[0, -1]
    assert logp == pytest.approx(float(torch.log_softmax(logits.double(), -1)[target[0]]), abs=1e-4)
    # two target tokens, 2 copies a forward: one copy masks one token (weight 2), the other both (weight 1)
    target = tok("42", add_special_tokens=False)["input_ids"]
    seq = prefix + target

    @torch.no_grad()
    def nll(masked):
        x = torch.tensor([seq])
        x[0, [len(prefix) + j for j in masked]] = adapter.mask_id
        lp = torch.log_softmax(adapter.forward(input_ids=x)[0].double(), -1)
        return {j: -float(lp[len(prefix) + j, target[j]]) for j in masked}
    both = sum(nll([0, 1]).values())
    per_batch = [-(2 * nll([j])[j] + both) / 2 for j in (0, 1)]
    g = torch.Generator().manual_seed(0)
    est = mc_loglikelihood(lm.model, prefix, target, mc_num=16, batch_size=2, generator=g)
    assert min(per_batch) - 1e-5 <= est <= max(per_batch) + 1e-5
    assert est == mc_loglikelihood(lm.model, prefix, target, mc_num=16, batch_size=2,
                                   generator=torch.Generator().manual_seed(0))
    greedy_tokens = evofast.generate(lm.model, torch.tensor([prefix]), gen_length=2, block_length=2, steps=2,
                                     mode="hard")[0, len(prefix):].tolist()
    assert greedy_matches(lm.model, prefix, greedy_tokens) and not greedy_matches(
        lm.model, prefix, [t + 1 for t in greedy_tokens])
    # lm-eval's greedy flag on request; an empty context is the BOS token
    lm.greedy_check = True
    try:
        (lp, flag), = lm.loglikelihood([Instance("loglikelihood", {}, ("", "42"), 0)])
    finally:
        lm.greedy_check = False
    assert lp < 0 and flag == greedy_matches(lm.model, [tok.bos_token_id], target)
    with pytest.raises(NotImplementedError, match="loglikelihood_rolling"):
        lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, ("text",), 0)])


def test_arguments_refused_before_loading(tmp_path):
    missing = str(tmp_path / "nowhere")
    for kw, what in [(dict(mode="soft"), "mode"), (dict(steps=5), "steps"), (dict(gen_length=20), "block_length"),
                     (dict(alpha=1.0), "alpha"), (dict(cache="full"), "cache"), (dict(remasking="x"), "remasking"),
                     (dict(batch_size="auto"), "batch_size"), (dict(mc_num=10, mc_batch_size=4), "mc_batch_size"),
                     (dict(cache_refresh=2), "cache_refresh"), (dict(top_p=0.9), "model_args")]:
        with pytest.raises(ValueError, match=f"^{what}:"):
            evo_lm_eval.EvofastLM(pretrained=missing, **kw)
    with pytest.raises(ValueError, match="^pretrained:"):
        evo_lm_eval.EvofastLM(pretrained=missing)


class _IncludedTasksOnly(TaskManager):
    """lm-eval's task manager without its own 14,000 task files (indexing them takes ~12 s)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, include_defaults=False, **kwargs)


def test_command_line_writes_results(setup, tmp_path, monkeypatch):
    d, _ = setup
    monkeypatch.setattr("lm_eval.tasks.TaskManager", _IncludedTasksOnly)
    out = tmp_path / "out"
    args = f"pretrained={d / 'model'},mode=hard,gen_length=16,steps=8,block_length=8,batch_size=3,dtype=float32"
    assert evo_lm_eval.main(["--model", "evofast", "--model_args", args, "--tasks", "evofast_gsm8k",
                             "--apply_chat_template", "--metadata", f"gsm8k_data={d / 'gsm8k.json'}",
                             "--output_path", str(out), "--device", "cpu"]) == 0
    files = list(out.rglob("results_*.json"))
    assert len(files) == 1
    res = json.loads(files[0].read_text())
    assert res["results"]["evofast_gsm8k"]["sample_len"] == 3 and "acc,none" in res["results"]["evofast_gsm8k"]
    assert res["config"]["model"] == "evofast" and res["config"]["decoding"]["mode"] == "hard"
    assert res["config"]["model_args"]["batch_size"] == 3


def _run_rank(rank: int, port: int, d, out) -> None:
    """One rank of a 2-process run, in a forked child (the imports are done already): torchrun's
    environment, the paper task through lm-eval, rank 0 writes what it gathered."""
    import os
    import traceback
    try:
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))
        torch.set_num_threads(1)
        tm = TaskManager(include_path=str(evo_lm_eval.TASK_DIR), include_defaults=False,
                         metadata={"gsm8k_data": str(d / "gsm8k.json")})
        lm = evo_lm_eval.EvofastLM(pretrained=str(d / "model"), device="cpu", batch_size=2, **DECODING)
        res = lm_eval.simple_evaluate(model=lm, tasks=["evofast_gsm8k"], task_manager=tm, apply_chat_template=True,
                                      log_samples=True)
        if res is not None:
            samples = sorted(res["samples"]["evofast_gsm8k"], key=lambda s: s["doc_id"])
            out.write_text(json.dumps({"rank": lm.rank, "world": lm.world_size, "n": len(samples),
                                       "texts": [s["resps"][0][0] for s in samples]}))
        code = 0
    except BaseException:
        (out.parent / f"error{rank}.txt").write_text(traceback.format_exc())
        code = 1
    os._exit(code)              # never back into the forked pytest


def test_two_ranks_share_the_requests(setup, lm, tmp_path):
    """Under torchrun's environment (gloo on the CPU) each rank decodes its share and rank 0
    gathers every sample."""
    import multiprocessing
    import socket

    d, tok = setup
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_run_rank, args=(r, port, d, tmp_path / f"rank{r}.json")) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
        if p.is_alive():
            p.kill()
    errors = [f.read_text() for f in sorted(tmp_path.glob("error*.txt"))]
    assert [p.exitcode for p in procs] == [0, 0], errors
    assert not (tmp_path / "rank1.json").exists()
    got = json.loads((tmp_path / "rank0.json").read_text())
    assert got["rank"] == 0 and got["world"] == 2 and got["n"] == 3
    task = get_task("gsm8k")
    exs = task.load(d / "gsm8k.json")
    # rank r decodes documents r, r + 2, ...: rank 0 a batch of two, rank 1 one prompt alone
    want = [None] * 3
    for docs in ([0, 2], [1]):
        rows = _expected(lm, [task.encode(exs[i], tok) for i in docs], batch_size=2)
        for i, row in zip(docs, rows):
            want[i] = tok.decode(row, skip_special_tokens=False)
    assert got["texts"] == want
