"""evofast.tasks' paper benchmarks: the authors' answer rules on golden cases (each verdict
is the one the authors' eval/get_acc.py gives), loaders, prompts, names and defaults."""
import json
import time

import pytest

from evofast import tasks
from evofast.tasks import PaperExample, paper_rules

INF, NAN = float("inf"), float("nan")

# (generation, ground truth, what the rule extracts, the authors' verdict)
NUMERIC_CASES = [
    ("<reasoning>6*3=18</reasoning>\n<answer>\n\\boxed{18}\n</answer><|eot_id|>", 18.0, 18.0, True),
    ("\\boxed{18.0}", 18.0, 18.0, True),
    ("\\boxed{18.00}", 18.0, 18.0, True),
    ("\\boxed{ 18 }", 18.0, 18.0, True),
    ("\\boxed{+18}", 18.0, 18.0, True),
    ("\\boxed{5.}", 5.0, 5.0, True),
    ("\\boxed{.5}", 0.5, 0.5, True),
    ("\\boxed{0.5}", 0.5, 0.5, True),
    ("\\boxed{\\$18}", 18.0, 18.0, True),                      # no float: the first number
    ("\\boxed{18 dollars}", 18.0, 18.0, True),
    ("\\boxed{18%}", 18.0, 18.0, True),
    ("\\boxed{\\text{18 apples}}", 18.0, 18.0, True),          # the content stops at the first "}"
    ("\\boxed{1,000}", 1000.0, 1.0, False),                    # commas are not removed
    ("\\boxed{1000}", 1000.0, 1000.0, True),
    ("\\boxed{\\frac{1}{2}}", 0.5, 1.0, False),                # "\\frac{1" -> 1
    ("\\boxed{3 + 15 = 18}", 18.0, 3.0, False),                # the FIRST number of a box
    ("\\boxed{-18}", 18.0, -18.0, False),
    ("\\boxed{-3}", -3.0, -3.0, True),
    ("\\boxed{ - 18}", 18.0, 18.0, True),                      # "- 18" is no float; its number is 18
    ("\\boxed{1e3}", 1000.0, 1000.0, True),                    # float() reads it
    ("\\boxed{1_8}", 18.0, 18.0, True),                        # so does this
    ("\\boxed{inf}", 18.0, INF, False),
    ("\\boxed{nan}", 18.0, NAN, False),
    ("\\boxed{\u0663}", 3.0, 3.0, True),                       # an Arabic-Indic 3
    ("\\boxed{...}\nso \\boxed{18}", 18.0, 18.0, True),        # the template's placeholder is skipped
    ("\\boxed{..}\\boxed{18}", 18.0, 18.0, True),
    ("\\boxed{}\\boxed{18}", 18.0, 18.0, True),
    ("\\boxed{ ... }\\boxed{18}", 18.0, 18.0, True),
    ("\\boxed{17}\\boxed{18}", 18.0, 17.0, False),             # the FIRST usable box
    ("\\boxed{x}\\boxed{18}", 18.0, 18.0, True),               # a box without a number is skipped
    ("\\boxed{18}<answer>17</answer>", 18.0, 18.0, True),
    ("\\boxed{abc}<answer>18</answer>", 18.0, 18.0, True),     # the tag only when no box gives a number
    ("<answer>18</answer>", 18.0, 18.0, True),
    ("<answer>\n18\n</answer><|eot_id|>", 18.0, 18.0, True),
    ("<answer>The answer is 16, not 18</answer>", 18.0, 18.0, True),   # the tag's LAST number
    ("<answer>18.5 and 19</answer>", 19.0, 19.0, True),
    ("<answer>1,234</answer>", 1234.0, 234.0, False),
    ("<answer>18</answer><answer>19</answer>", 19.0, 18.0, False),     # the first tag
    ("<answer>\n\\boxed{...}\n</answer>", 18.0, None, False),
    ("<answer></answer>", 18.0, None, False),
    ("<ANSWER>18</ANSWER>", 18.0, None, False),
    ("the answer is 18", 18.0, None, False),
    ("\\boxed{18", 18.0, None, False),                         # never closed
    ("\\boxed{18\n}", 18.0, None, False),                      # the box regex stays on one line
    ("\\boxed 18", 18.0, None, False),                         # the spaced form is not read here
    ("\\boxed{18}", None, 18.0, False),                        # a GSM8K solution with no number after ####
    ("", 18.0, None, False),
]

# (generation, ground truth, what the rule extracts, the authors' verdict)
MATH_CASES = [
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}", "\\frac{1}{2}", True),
    ("\\boxed{\\dfrac{1}{2}}", "\\frac{1}{2}", "\\dfrac{1}{2}", True),
    ("\\boxed{\\tfrac12}", "\\frac{1}{2}", "\\tfrac12", True),
    ("\\boxed{\\frac34}", "\\frac{3}{4}", "\\frac34", True),
    ("\\boxed{\\frac3}", "\\frac{3}{4}", "\\frac3", False),
    ("\\boxed{1/2}", "\\frac{1}{2}", "1/2", True),
    ("\\boxed{0.5}", "\\frac{1}{2}", "0.5", True),
    ("\\boxed{.5}", "\\frac{1}{2}", ".5", True),
    ("\\boxed{0.50}", "\\frac{1}{2}", "0.50", False),
    ("\\boxed{\\frac{3}{4}}.", "3/4", "\\frac{3}{4}", True),
    ("\\boxed{3/04}", "\\frac{3}{4}", "3/04", False),
    ("\\boxed{x/2}", "\\frac{x}{2}", "x/2", False),
    ("\\boxed{x/2}", "x/2", "x/2", True),                     # not normalisable: raw strings compared
    ("\\boxed{3}\\boxed{4}", "4", "4", True),                 # the LAST box
    ("\\boxed{3}\\boxed{4}", "3", "4", False),
    ("\\boxed{x = 5}", "5", "x = 5", True),                   # a short left side is dropped
    ("\\boxed{abc = 5}", "5", "abc = 5", False),
    ("\\boxed{y = 2x+1}", "2x+1", "y = 2x+1", True),
    ("\\boxed{90^\\circ}", "90", "90^\\circ", True),
    ("\\boxed{10\\%}", "10", "10\\%", True),
    ("\\boxed{\\$5}", "5", "\\$5", True),
    ("\\boxed{\\!5}", "5", "\\!5", True),
    ("\\boxed{5\\text{ cm}}", "5", "5\\text{ cm}", True),
    ("\\boxed{5}", "5\\text{ apples}", "5", True),
    ("\\boxed{5\\text{ cm}\\text{ m}}", "5", "5\\text{ cm}\\text{ m}", False),
    ("\\boxed{\\sqrt3}", "\\sqrt{3}", "\\sqrt3", True),
    ("\\boxed{2\\sqrt{3}}", "2\\sqrt3", "2\\sqrt{3}", True),
    ("\\boxed{\\sqrt}", "\\sqrt", "\\sqrt", True),
    ("\\boxed{a\\frac}", "a\\frac", "a\\frac", True),
    ("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt{3}}{2}", "\\frac{\\sqrt{3}}{2}", True),
    ("\\boxed{\\left(1,2\\right)}", "(1,2)", "\\left(1,2\\right)", True),
    ("\\boxed{(1, 2)}", "(1,2)", "(1, 2)", True),
    ("\\boxed{1,000}", "1000", "1,000", False),
    ("\\boxed{-3}", "- 3", "-3", True),
    ("\\boxed{{.5}}", "{0.5}", "{.5}", True),
    ("\\boxed{\\infty}", "\\infty", "\\infty", True),
    ("\\boxed{\\text{(A)}}", "A", "\\text{(A)}", False),
    ("\\boxed{\\boxed{5}}", "5", "5", True),
    ("\\boxed{5}\n</answer><|eot_id|><|endoftext|>", "5", "5", True),
    ("5", "5", "5", True),                                    # no box: the whole text is the answer
    ("The answer is 5.", "5", "The answer is 5.", False),
    ("<answer>5</answer>", "5", "<answer>5</answer>", False),  # the tag is not read when there is no box
    ("\\boxed{}<answer>5</answer>", "5", "5", True),          # ...only when the box is empty
    ("\\boxed{5", "5", None, False),                          # ...or never closes
    ("\\boxed{5 <answer> 5 </answer>", "5", "5", True),
    ("\\fbox{5}", "5", "\\fbox{5}", False),
    ("$\\boxed 5$", "5", "5", True),                          # the spaced form, up to "$"
    ("\\boxed 5 and then \\boxed{6}", "6", "5 and then \\boxed{6}", False),
    ("", "5", "", False),
]

# (generation, numbers, target, the expression the rule extracts, the authors' verdict)
COUNTDOWN_CASES = [
    ("\\boxed{30+100-93}", [30, 100, 93], 37, "30+100-93", True),
    ("<reasoning>try</reasoning>\n<answer>\n\\boxed{100 - 93 + 30}\n</answer><|eot_id|>", [30, 100, 93], 37,
     "100 - 93 + 30", True),
    ("\\boxed{30+100-93}", [93, 30, 100], 37, "30+100-93", True),
    ("\\boxed{(30+100)-93}", [30, 100, 93], 37, "(30+100)-93", True),
    ("\\boxed{100-(93-30)}", [30, 100, 93], 37, "100-(93-30)", True),
    ("\\boxed{100-93-30}", [30, 100, 93], 37, "100-93-30", False),
    ("\\boxed{(100-93)*30}", [30, 100, 93], 210, "(100-93)*30", True),
    ("\\boxed{6 \\div 3 \\times 2}", [6, 3, 2], 4, "6 / 3 * 2", True),
    ("\\boxed{6 \\cdot 2 - 3}", [6, 3, 2], 9, "6 * 2 - 3", True),
    ("\\boxed{30+100-93 = 37}", [30, 100, 93], 37, "30+100-93", True),
    ("\\boxed{30 + 100 - 93 = 37.0}", [30, 100, 93], 37, "30 + 100 - 93", True),
    ("\\boxed{30+100-93=}", [30, 100, 93], 37, "30+100-93=", False),
    ("\\boxed{30+100+93}", [30, 100, 93], 37, "30+100+93", False),
    ("\\boxed{30+30+100-93}", [30, 100, 93], 67, "30+30+100-93", False),     # a number twice
    ("\\boxed{30+100-93+0}", [30, 100, 93], 37, "30+100-93+0", False),       # a number not given
    ("\\boxed{31+100-94}", [30, 100, 93], 37, "31+100-94", False),
    ("\\boxed{30+100}", [30, 100, 93], 130, "30+100", False),                # a number unused
    ("\\boxed{8/2*3}", [8, 2, 3], 12, "8/2*3", True),
    ("\\boxed{7/3*3}", [7, 3, 3], 7, "7/3*3", True),                         # 7.000000000000001
    ("\\boxed{7/2-1}", [7, 2, 1], 3, "7/2-1", False),
    ("\\boxed{2/(5-5)}", [2, 5, 5], 0, "2/(5-5)", False),                    # division by zero
    ("\\boxed{2**3*1}", [2, 3, 1], 8, "2**3*1", True),                       # their eval takes powers
    ("\\boxed{7//2+1}", [7, 2, 1], 4, "7//2+1", True),                       # and floor division
    ("\\boxed{3^2+1}", [3, 2, 1], 10, "3^2+1", False),
    ("\\boxed{-3+5*2}", [3, 5, 2], 7, "-3+5*2", True),
    ("\\boxed{+3+5*2}", [3, 5, 2], 13, "+3+5*2", True),
    ("\\boxed{--30+100-93}", [30, 100, 93], 37, "--30+100-93", True),
    ("\\boxed{3.5*2}", [3, 5, 2], 7, "3.5*2", True),                         # 3 and 5 "used" as 3.5
    ("\\boxed{30.+100-93}", [30, 100, 93], 37, "30.+100-93", True),
    ("\\boxed{30.0+100-93}", [30, 100, 93], 37, "30.0+100-93", False),
    ("\\boxed{05+3+2}", [5, 3, 2], 10, "05+3+2", False),                     # Python refuses 05
    ("\\boxed{30 100 93}", [30, 100, 93], 37, "30 100 93", False),
    ("\\boxed{(30+100-93}", [30, 100, 93], 37, "(30+100-93", False),
    ("\\boxed{30+100\u221293}", [30, 100, 93], 37, "30+100\u221293", False),  # a Unicode minus
    ("\\boxed{30+100-93\n}", [30, 100, 93], 37, "30+100-93\n", True),
    ("\\boxed{a + b * c}", [30, 100, 93], 37, "a + b * c", False),
    ("\\boxed{30+100-93}\\boxed{1+2}", [30, 100, 93], 37, "1+2", False),      # the LAST box
    ("First 100-93=7, then 7+30=37. \\boxed{37}", [30, 100, 93], 37, "37", False),
    ("\\boxed{30+100-93", [30, 100, 93], 37, "\\boxed{30+100-93", False),    # unclosed, no tag: whole text
    ("\\boxed{30+100-93 <answer>30+100-93</answer>", [30, 100, 93], 37, "30+100-93", True),
    ("<answer>30+100-93</answer>", [30, 100, 93], 37, "<answer>30+100-93</answer>", False),
    ("30+100-93", [30, 100, 93], 37, "30+100-93", True),                       # no box: the whole text
    ("I think 30 + 100 - 93 = 37 works", [30, 100, 93], 37, "30 + 100 - 93", True),  # its first "x = n"
    ("\\boxed{(0-8)**.5}", [0, 8, 5], 1, "(0-8)**.5", False),                # complex
    ("\\boxed{1**(100**93)}", [1, 100, 93], 1, "1**(100**93)", True),
    ("\\boxed{2**-3000}", [2, 3000], 0, "2**-3000", True),                   # underflows to 0.0
    ("\\boxed{" + "-" * 1000 + "30+100-93}", [30, 100, 93], 37, "-" * 1000 + "30+100-93", True),
    ("\\boxed{" + "-" * 3000 + "30+100-93}", [30, 100, 93], 37, "-" * 3000 + "30+100-93", False),  # parser
    ("\\boxed{" + "(" * 250 + "30+100-93" + ")" * 250 + "}", [30, 100, 93], 37,
     "(" * 250 + "30+100-93" + ")" * 250, False),                            # too deep for Python's parser
    ("__import__('os').system('echo hi')", [30, 100, 93], 37, "__import__('os').system('echo hi')", False),
]


def _task_for(name, answer):
    return tasks.get_task(name), PaperExample("q", answer, {})


@pytest.mark.parametrize("name", ["gsm8k", "svamp"])
@pytest.mark.parametrize("text, truth, extracted, ok", NUMERIC_CASES)
def test_numeric_rule_golden(name, text, truth, extracted, ok):
    t, ex = _task_for(name, truth)
    got = t.extract(ex, text)
    assert got == extracted or (got != got and extracted != extracted)      # nan == nan here
    assert t.check(ex, text) is ok


@pytest.mark.parametrize("text, truth, extracted, ok", MATH_CASES)
def test_math_rule_golden(text, truth, extracted, ok):
    t, ex = _task_for("math500", truth)
    assert t.extract(ex, text) == extracted
    assert t.check(ex, text) is ok


@pytest.mark.parametrize("text, numbers, target, extracted, ok", COUNTDOWN_CASES)
def test_countdown_rule_golden(text, numbers, target, extracted, ok):
    t, ex = _task_for("countdown", (tuple(numbers), target))
    assert t.extract(ex, text) == extracted
    assert t.check(ex, text) is ok


def test_golden_tables_are_large_enough():
    assert min(len(NUMERIC_CASES), len(MATH_CASES), len(COUNTDOWN_CASES)) >= 40


@pytest.mark.parametrize("expr, numbers", [
    ("9**9**9", [9, 9, 9]), ("100**93**30", [100, 93, 30]), ("(100**93)**30", [100, 93, 30]),
    ("2.0**1000.0", [2, 0, 1000, 0]), ("30 +" + " " * 5000 + "100-93", [30, 100, 93]),
    ("(" * 100000, []), ("1+" * 20000 + "1", [1] * 20001), ("-" * 100000 + "1", [1]),
])
def test_countdown_huge_or_long_is_wrong_fast(expr, numbers):
    # the authors' eval would take forever on the powers; the padded one is past COUNTDOWN_MAX_TEXT
    t0 = time.perf_counter()
    assert not paper_rules.countdown_correct("\\boxed{" + expr + "}", numbers, 1)
    assert not paper_rules.countdown_correct(expr, numbers, 1)
    assert time.perf_counter() - t0 < 1.0


def test_countdown_never_evaluates(monkeypatch):
    import builtins

    def boom(*a, **k):
        raise AssertionError("eval/exec called")
    monkeypatch.setattr(builtins, "eval", boom)
    monkeypatch.setattr(builtins, "exec", boom)
    assert paper_rules.countdown_correct("\\boxed{30+100-93}", [30, 100, 93], 37)
    assert not paper_rules.countdown_correct("\\boxed{__import__('os')}", [], 0)
    assert paper_rules.countdown_value("7//2") == 3 and paper_rules.countdown_value("7/2") == 3.5
    assert paper_rules.countdown_value("x") is None and paper_rules.countdown_value("1/0") is None


def test_check_wants_text():
    t, ex = _task_for("gsm8k", 1.0)
    with pytest.raises(ValueError, match="text"):
        t.check(ex, None)


# ---- records -> examples

def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_load_each_dataset_from_jsonl(tmp_path):
    gsm = tasks.get_task("gsm8k").load(_write_jsonl(tmp_path / "g.jsonl", [
        {"question": "Q1?", "answer": "6*3=18\n#### 18"}, {"question": "Q2?", "answer": "#### 1,234.5"},
        {"question": "Q3?", "answer": "#### $7"}, {"question": "Q4?", "answer": "#### -3"}]))
    assert [e.answer for e in gsm] == [18.0, 1234.5, 7.0, None]       # no minus in the authors' regex
    assert gsm[0].question == "Q1?" and gsm[0].record["answer"].endswith("18")
    sv = tasks.get_task("svamp").load(_write_jsonl(tmp_path / "s.jsonl", [
        {"ID": "a", "Body": "Jack had 8 pens.", "Question": "How many now?", "Answer": 5.0}]))
    assert sv[0].question == "Jack had 8 pens.How many now?" and sv[0].answer == 5.0
    m = tasks.get_task("math").load(_write_jsonl(tmp_path / "m.jsonl", [
        {"problem": "P", "answer": "\\frac{1}{2}", "level": 3}]))
    assert m[0].question == "P" and m[0].answer == "\\frac{1}{2}"
    cd = tasks.get_task("countdown").load(_write_jsonl(tmp_path / "c.jsonl", [
        {"input": "30,100,93", "output": "23"}]))
    assert cd[0].question == "Numbers: [30, 100, 93]\nTarget: 23" and cd[0].answer == ((30, 100, 93), 23)
    assert tasks.get_task("countdown").check(cd[0], "\\boxed{100 - 30 - 93 + 46}") is False
    assert tasks.get_task("countdown").check(cd[0], "<answer>\\boxed{100 - 93 + 30 - 14}</answer>") is False


def test_load_json_list_json_lines_and_parquet(tmp_path):
    rows = [{"question": "A?", "answer": "#### 1"}, {"question": "B?", "answer": "#### 2"}]
    t = tasks.get_task("gsm8k")
    (tmp_path / "list.json").write_text(json.dumps(rows))
    assert [e.answer for e in t.load(tmp_path / "list.json")] == [1.0, 2.0]
    _write_jsonl(tmp_path / "lines.json", rows)                            # datasets' to_json writes lines
    assert [e.question for e in t.load(str(tmp_path / "lines.json"))] == ["A?", "B?"]
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "t.parquet")
    assert [e.answer for e in t.load(tmp_path / "t.parquet")] == [1.0, 2.0]


@pytest.mark.parametrize("name, rows, match", [
    ("gsm8k", [{"question": "A?", "answer": "#### 1"}, {"question": "B?"}], r"line 2: missing field\(s\) \['answer'\]"),
    ("gsm8k", [{"q": "A?", "a": "#### 1"}], r"line 1: .*\['question', 'answer'\]"),
    ("math500", [{"problem": "P", "answer": 5}], r"line 1: answer: expected a string"),
    ("svamp", [{"Body": "b", "Question": "q", "Answer": "five"}], r"line 1: Answer: expected a number"),
    ("countdown", [{"input": "1,x,3", "output": "4"}], r"line 1: input / output"),
    ("countdown", [{"input": "1,2,3", "output": 4.5}], r"line 1: input / output"),
    ("gsm8k", [["A?", "#### 1"]], r"line 1: expected an object"),
])
def test_load_bad_records_name_file_line_and_fields(tmp_path, name, rows, match):
    path = _write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(ValueError, match=match) as e:
        tasks.get_task(name).load(path)
    assert str(path) in str(e.value) and "needs the fields" in str(e.value)


@pytest.mark.parametrize("file, content, match", [
    ("bad.jsonl", '{"question": "A?", "answer": "#### 1"}\n{not json}\n', "line 2: not JSON"),
    ("empty.jsonl", "\n", "no records"),
    ("d.json", '{"data": []}', "JSON list"),
    ("x.csv", "question,answer\n", "jsonl"),
    ("missing.jsonl", None, "no such file"),
])
def test_load_file_errors(tmp_path, file, content, match):
    if content is not None:
        (tmp_path / file).write_text(content)
    with pytest.raises(ValueError, match=match):
        tasks.get_task("gsm8k").load(tmp_path / file)


def test_countdown_needs_the_authors_file():
    with pytest.raises(ValueError, match="countdown_cd3_test.jsonl"):
        tasks.get_task("countdown").load("aim-uofa/countdown")


def test_load_from_the_hub_offline_and_without_datasets(monkeypatch):
    import sys
    datasets = pytest.importorskip("datasets")
    calls = []

    def unreachable(*args, **kw):
        calls.append((args, kw))
        raise ConnectionError("no network")
    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    with pytest.raises(OSError, match="openai/gsm8k.*ConnectionError.*download the file"):
        tasks.get_task("gsm8k").load("openai/gsm8k")
    assert calls == [(("openai/gsm8k", "main"), {"split": "test"})]               # the authors' config, split
    with pytest.raises(OSError):
        tasks.get_task("math").load("HuggingFaceH4/MATH-500", split="train")
    assert calls[-1] == (("HuggingFaceH4/MATH-500", None), {"split": "train"})
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: [{"Body": "b.", "Question": "q?", "Answer": 2}])
    assert tasks.get_task("svamp").load("ChilleD/SVAMP")[0].question == "b.q?"
    monkeypatch.setitem(sys.modules, "datasets", None)                            # not installed
    with pytest.raises(ImportError, match=r"evofast\[eval\]"):
        tasks.get_task("gsm8k").load("openai/gsm8k")


# ---- prompts

TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
            "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
            "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")


@pytest.fixture
def chat_tok():
    tok = tasks.make_tokenizer()               # its post-processor adds <bos>, as many tokenizers' do
    tok.chat_template = TEMPLATE
    return tok


@pytest.mark.parametrize("name", ["gsm8k", "math500", "svamp", "countdown"])
def test_prompt_text_is_the_authors(name, chat_tok):
    t = tasks.get_task(name)
    ex = PaperExample("What is 1+2?", 3.0, {})
    msgs = t.messages(ex)
    assert msgs == [{"role": "user", "content": t.system_prompt + "\n\nWhat is 1+2?"}]
    text = t.prompt_text(ex, chat_tok)
    assert text == ("<bos><|start_header_id|>user<|end_header_id|>\n\n" + (t.system_prompt + "\n\nWhat is 1+2?").strip()
                    + "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n<reasoning>")


def test_system_prompts_verbatim():
    fmt = ("Respond in the following format:\n<reasoning>\nYour reasoning here\n</reasoning>\n"
           "<answer>\n\\boxed{...}\n</answer>")
    head = ("You are a math expert. You will be given a question to solve. Solve it step by step. "
            "Wrap the final answer in a \\boxed{}.")
    assert tasks.get_task("gsm8k").system_prompt == head + " \n" + fmt
    assert tasks.get_task("math").system_prompt == head + "\n" + fmt + '" \n'
    assert tasks.get_task("svamp").system_prompt == tasks.get_task("math500").system_prompt
    cd = tasks.get_task("countdown").system_prompt
    assert cd.startswith("Using only the provided numbers, create an arithmetic expression")
    assert cd.endswith("For example: \\boxed{a + b * c}" + fmt) and "inside \\boxed{} tags without" in cd


def test_encode_bos_choice(chat_tok):
    from tokenizers import processors
    t = tasks.get_task("countdown")
    ex = PaperExample("Numbers: [1, 2]\nTarget: 3", ((1, 2), 3), {})
    bos = chat_tok.bos_token_id
    ids = t.encode(ex, chat_tok)
    assert ids == chat_tok(t.prompt_text(ex, chat_tok), add_special_tokens=False)["input_ids"]
    assert ids[0] == bos and ids[1] != bos                                    # the template's one BOS
    assert t.encode(ex, chat_tok, add_special_tokens=True)[:2] == [bos, bos]  # the authors' literal call
    # a tokenizer that adds no BOS of its own (LLaDA-8B-Instruct's): both give the same ids
    chat_tok.backend_tokenizer.post_processor = processors.TemplateProcessing(single="$A", special_tokens=[])
    assert t.encode(ex, chat_tok, add_special_tokens=True) == t.encode(ex, chat_tok) == ids


def test_prompt_needs_a_chat_template():
    t = tasks.get_task("gsm8k")
    with pytest.raises(ValueError, match="chat template"):
        t.prompt_text(PaperExample("q", 1.0, {}), tasks.make_tokenizer())


# ---- names, specs and defaults

def test_names_aliases_and_specs():
    assert isinstance(tasks.get_task("math"), tasks.MATH500) and tasks.get_task("math500").name == "math500"
    assert isinstance(tasks.get_task("countdown"), tasks.CountdownCD3)
    assert isinstance(tasks.parse_task("gsm8k"), tasks.GSM8K)
    assert repr(tasks.parse_task("countdown-synth:count=4,hi=9")) == "Countdown(count=4, hi=9)"
    for name in ("gsm8k", "math500", "svamp", "countdown"):
        assert tasks.task_from_spec(tasks.get_task(name).spec()).name == name
    # a model directory written when the synthetic countdown was called "countdown"
    old = {"task": "countdown", "count": 3, "hi": 12, "gen_length": 16, "block_length": 8, "test_percent": 10}
    assert repr(tasks.task_from_spec(old)) == "Countdown(count=3, hi=12)"
    assert tasks.task_from_spec({**old, "task": "countdown-synth"}).name == "countdown-synth"
    with pytest.raises(ValueError, match="countdown-synth"):
        tasks.parse_task("countdown:count=3,hi=9")
    with pytest.raises(ValueError, match="synthetic task"):
        tasks.parse_task("gsm8k", synthetic=True)
    with pytest.raises(ValueError, match="gsm8k"):
        tasks.get_task("gsm9k")
    assert set(tasks.task_names()) >= {"add", "mul", "countdown-synth", "gsm8k", "math500", "math", "svamp",
                                       "countdown"}


def test_authors_defaults():
    cd, g = tasks.get_task("countdown"), tasks.get_task("gsm8k")
    assert cd.num_eval == 256 and g.num_eval is None
    assert g.gen_lengths == (128, 256) and g.block_length == 32 and g.steps_for(256) == 128
    assert g.temperature == 0.5 and g.k_soft == 3 and g.alphas == (0.9, 0.8, 0.7, 0.6, 0.5) and g.batch_size == 1
    assert g.hub == ("openai/gsm8k", "main", "test") and tasks.get_task("svamp").hub[0] == "ChilleD/SVAMP"
