"""evofast.tasks: seeded generators, worked steps, answer checkers, the safe Countdown
checker, disjoint splits, the JSONL export and the character tokenizer."""
import json
import random
import time

import pytest

from evofast import tasks
from evofast.tasks import Addition, Countdown, Multiplication, check_countdown, safe_arith
from evofast.tasks.base import encode_batch

ALL = [Addition(1), Addition(3), Multiplication(2), Countdown(3, 12), Countdown(4, 9)]


@pytest.mark.parametrize("task", ALL, ids=repr)
def test_generator_seeded_and_consistent(task):
    a = [task.make(random.Random(5)) for _ in range(3)]
    b = [task.make(random.Random(5)) for _ in range(3)]
    assert a == b
    rng = random.Random(0)
    for _ in range(300):
        ex = task.make(rng)
        assert len(ex.prompt) <= task.prompt_length
        assert len(ex.response) < task.gen_length                     # room for <eos>
        assert task.gen_length % task.block_length == 0
        assert task.check(ex, ex.response + "<eos><eos>")
        assert task.check(ex, ex.response)


def test_worked_steps_are_right():
    ex = Addition(3).example(347, 285)
    assert ex.prompt == "347+285=" and ex.answer == "632"
    assert ex.response == "7+5+0=12,4+8+1=13,3+2+1=06;632"
    ex = Addition(3).example(999, 1)
    assert ex.prompt == "999+001=" and ex.response == "9+1+0=10,9+0+1=10,9+0+1=10;1000"
    assert Multiplication(3).example(5, 3).prompt == "005*3="
    with pytest.raises(ValueError, match="a, b"):
        Addition(2).example(100, 1)
    ex = Multiplication(3).example(347, 6)
    assert ex.response == "7*6+0=42,4*6+4=28,3*6+2=20;2082" and ex.answer == "2082"
    rng = random.Random(1)
    for _ in range(200):
        ex = Addition(3).make(rng)
        a, b = map(int, ex.prompt[:-1].split("+"))
        assert int(ex.answer) == a + b and len(ex.prompt) == 8
        for step in ex.response.split(";")[0].split(","):         # every column adds up
            lhs, rhs = step.split("=")
            assert sum(map(int, lhs.split("+"))) == int(rhs)


def test_answer_checker_exact_match():
    t = Addition(2)
    ex = t.example(12, 30)
    assert t.check(ex, "2+0+0=02,1+3+0=04;42<eos>")
    assert t.check(ex, "garbage steps;42")                        # only the final answer is scored
    assert not t.check(ex, "2+0+0=02,1+3+0=04;43")
    assert not t.check(ex, "2+0+0=02,1+3+0=04;420")
    assert not t.check(ex, "42")                                  # no ';': no answer
    assert not t.check(ex, "")
    assert t.extract(None, "1;2;3<eos>4") == "3" and t.extract(None, "1;2;3<eos><eos>") == "3"
    assert t.extract(None, "1;42<mask><eos>") == "42"


def test_countdown_checker_accepts_any_correct_expression():
    assert check_countdown("(3+5)*2", [3, 5, 2], 16)
    assert check_countdown("2*(5+3)", [2, 3, 5], 16)
    assert check_countdown(" 5*3+2-1 ", [1, 2, 3, 5], 16)
    assert check_countdown("12/4*3", [3, 4, 12], 9)               # exact division
    assert check_countdown("-3+5*2", [3, 5, 2], 7)                # unary minus
    assert not check_countdown("3+5*2", [3, 5, 2], 16)            # wrong value
    assert not check_countdown("(3+5)*2*2", [3, 5, 2], 32)        # 2 used twice
    assert not check_countdown("(3+5)*4", [3, 5, 2], 32)          # 4 not given
    assert check_countdown("7/2*2", [7, 2, 2], 7) and safe_arith("7/2*2")[0] == 7     # exact fractions
    assert safe_arith("7/2")[0] == pytest.approx(3.5)


@pytest.mark.parametrize("text", [
    "__import__('os').system('echo hi')", "open('/etc/passwd')", "x", "(lambda: 1)()", "[1,2][0]",
    "'16'", "16.0", "1e3", "2**10", "2**99999999999", "9**9**9**9", "10**100", "7%3", "7//2", "1<<30", "~1",
    "1/0", "5/(3-3)", "1 if 1 else 2", "1;2", "import os", "", "   ", "((((", "1+", "0x10", "True+1", "1_000",
    "9" * 80, "(" * 200 + "1" + ")" * 200, "999999*999999*999999", "f'{1}'", "+3", "a.b", "3 5",
])
def test_countdown_checker_rejects_bad_and_unsafe_text_fast(text):
    t0 = time.perf_counter()
    assert not check_countdown(text, [1, 2, 3, 5, 7, 9, 10, 16, 30], 16)
    assert time.perf_counter() - t0 < 0.5
    assert safe_arith(text) is None


def test_safe_arith_never_evaluates(monkeypatch):
    import builtins

    def boom(*a, **k):
        raise AssertionError("eval/exec called")
    monkeypatch.setattr(builtins, "eval", boom)
    monkeypatch.setattr(builtins, "exec", boom)
    assert safe_arith("(3+5)*2")[0] == 16
    assert safe_arith("__import__('os')") is None
    assert safe_arith(123) is None


def test_countdown_task_check_uses_numbers():
    t = Countdown(3, 12)
    ex = t.make(random.Random(3))
    assert t.check(ex, ex.response)
    nums = list(ex.meta)
    assert not t.check(ex, "+".join(str(n) for n in nums) + f"+{int(ex.answer)}<eos>")
    assert not t.check(ex, "__import__('os')<eos>")


def test_countdown_aligned_prompts_have_one_width():
    t = tasks.parse_task("countdown-synth:aligned=1")
    assert repr(t) == "Countdown(count=3, hi=12, aligned=1)" and t.spec()["aligned"] == 1
    assert repr(tasks.task_from_spec(json.loads(json.dumps(t.spec())))) == repr(t)
    assert "aligned" not in Countdown(3, 12).spec()                  # the unaligned spec is unchanged
    ex = t.example(3, 7, 12, 20)
    assert ex.prompt == " 3, 7,12: 20=" and len(ex.prompt) == t.prompt_length
    assert t.check(ex, "7+12-3+3<eos>") is False and t.check(ex, "(7-3)*12/3+4") is False
    assert t.check(t.example(3, 7, 10, 20), "3*10-7-3") is False and t.check(ex, "12+7-3+4") is False  # 3 twice / 4
    assert t.check(t.example(5, 3, 12, 24), "12*(5-3)<eos><eos>")
    exs = t.test_set(300, seed=0)
    assert {len(e.prompt) for e in exs} == {t.prompt_length} and all(t.check(e, e.response) for e in exs)
    tok = tasks.make_tokenizer()
    b = encode_batch(tok, t, exs[:50])
    assert bool(b["attention_mask"].all())                            # no row needs padding
    for bad, match in (({"aligned": 2}, "aligned"),):
        with pytest.raises(ValueError, match=match):
            Countdown(**bad)
    with pytest.raises(ValueError, match="numbers"):
        t.example(3, 13, 1, 5)
    with pytest.raises(ValueError, match="target"):
        t.example(3, 1, 1, 1000)
    with pytest.raises(ValueError, match="values"):
        t.example(3, 1, 5)


@pytest.mark.parametrize("task", [Addition(1), Addition(2), Multiplication(1), Countdown(3, 9)], ids=repr)
def test_splits_never_overlap(task):
    train = {next(it).prompt for it in [task.stream("train", 0)] for _ in range(3000)}
    train |= {ex.prompt for ex, _ in zip(task.stream("train", 1), range(2000))}
    test = {ex.prompt for ex in task.test_set(200, seed=0)} | {ex.prompt for ex in task.test_set(100, seed=7)}
    assert test and train
    assert not train & test
    assert all(tasks.in_test_split(p) for p in test)
    assert not any(tasks.in_test_split(p) for p in train)


def test_test_set_distinct_seeded_and_bounded():
    t = Addition(3)
    a, b = t.test_set(100, seed=0), t.test_set(100, seed=0)
    assert a == b and len({e.prompt for e in a}) == 100
    assert t.test_set(100, seed=1) != a
    small = Addition(1).test_set(1000)                         # 1-digit: only ~10 test prompts exist
    assert 0 < len(small) < 100 and len({e.prompt for e in small}) == len(small)
    with pytest.raises(ValueError, match="n"):
        t.test_set(0)
    with pytest.raises(ValueError, match="split"):
        next(t.stream("valid", 0))


def test_parse_task_and_errors():
    assert repr(tasks.parse_task("add")) == "Addition(digits=3)"
    assert repr(tasks.parse_task("add:digits=2")) == "Addition(digits=2)"
    assert repr(tasks.parse_task("countdown-synth:count=4,hi=9")) == "Countdown(count=4, hi=9)"
    t = tasks.parse_task("mul:digits=2")
    assert repr(tasks.task_from_spec(json.loads(json.dumps(t.spec())))) == repr(t)
    for bad, match in [("sub", "task"), ("add:digits=9", "digits"), ("add:digits=x", "key=INT"),
                       ("add:width=3", "bad parameters"), ("countdown-synth:count=1", "count"), ("", "task")]:
        with pytest.raises(ValueError, match=match):
            tasks.parse_task(bad)


def test_jsonl_export(tmp_path):
    t = Addition(2)
    path = t.write_jsonl(tmp_path / "d" / "train.jsonl", 50, seed=3)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 50 and all(set(r) == {"prompt", "response"} for r in rows)
    assert not any(tasks.in_test_split(r["prompt"]) for r in rows)
    tok = tasks.make_tokenizer()
    for r in rows:                          # <eos>-padded to gen_length - 1 tokens (train-cts adds the last)
        ids = tok(r["response"], add_special_tokens=False)["input_ids"]
        assert len(ids) == t.gen_length - 1 and "<" not in r["response"].split("<eos>")[0]
        assert r["response"].endswith("<eos>") or len(r["response"]) == t.gen_length - 1
    assert rows == [json.loads(line) for line in t.write_jsonl(tmp_path / "again.jsonl", 50, seed=3).read_text()
                    .splitlines()]


def test_tokenizer_roundtrip_and_autotokenizer(tmp_path):
    from transformers import AutoTokenizer

    tok = tasks.make_tokenizer()
    text = "347+285=7+5+0=12,4+8+1=13;632"
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id and len(ids) == len(text) + 1
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok.decode(ids[1:] + [tok.eos_token_id]) == text + "<eos>"
    assert tok(text + "<eos>", add_special_tokens=False)["input_ids"][-1] == tok.eos_token_id
    assert len({tok.eos_token_id, tok.mask_token_id, tok.bos_token_id, tok.unk_token_id}) == 4
    assert tok.pad_token_id == tok.eos_token_id                    # LLaDA's convention
    assert tok.mask_token_id == len(tok) - 1
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again(text)["input_ids"] == ids
    assert again.mask_token_id == tok.mask_token_id and again.padding_side == "left"
    assert again.decode(ids, skip_special_tokens=True) == text
    assert tok("A")["input_ids"][1] == tok.unk_token_id            # unknown characters


def test_synthetic_countdown_keeps_its_problems_and_old_specs():
    # renamed "countdown-synth" (the paper's benchmark is "countdown"): the same seeds give the same problems
    t = tasks.get_task("countdown-synth", count=3, hi=12)
    assert [e.prompt for e in t.test_set(5, seed=1)] == ["4,8,4:1=", "2,6,3:11=", "6,2,6:14=", "2,12,1:22=",
                                                         "1,3,7:11="]
    assert t.spec()["task"] == "countdown-synth" and repr(tasks.task_from_spec(t.spec())) == repr(t)
    old = {**t.spec(), "task": "countdown"}                 # a model directory from before the rename
    assert repr(tasks.task_from_spec(old)) == "Countdown(count=3, hi=12)"
    with pytest.raises(ValueError, match="synthetic task"):
        tasks.parse_task("countdown", synthetic=True)
