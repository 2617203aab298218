"""The EvoToken paper's four benchmarks, prompted and scored exactly as the authors do.

    from evofast import tasks
    t = tasks.get_task("gsm8k")              # "gsm8k", "math500" (alias "math"), "svamp", "countdown"
    exs = t.load("gsm8k_test.jsonl")         # or a hub name: t.load("openai/gsm8k")
    ids = t.encode(exs[0], tokenizer)        # the authors' prompt, token ids
    text = tokenizer.decode(generated_ids, skip_special_tokens=False)
    t.extract(exs[0], text), t.check(exs[0], text)

Records keep the dataset's own fields:

    gsm8k      {question, answer}        test split of the hub's "openai/gsm8k" (config "main")
    math500    {problem, answer}         test split of "HuggingFaceH4/MATH-500"
    svamp      {Body, Question, Answer}  test split of "ChilleD/SVAMP"
    countdown  {input, output}           "30,100,93" and "23": the authors' 256-problem
                                         countdown_cd3_test.jsonl, in the dataset/ folder of
                                         their repository github.com/aim-uofa/EvoTokenDLM.
                                         It is not shipped here (that repository has no
                                         license file; its README allows academic use
                                         only); download it and pass its path.

Prompt. One user turn, `system_prompt + "\\n\\n" + question`, through the tokenizer's
chat template with the generation prompt, then "<reasoning>" appended (the authors
prefill it for every model). The system prompts are theirs to the character: GSM8K's
first line ends in a space, MATH500's and SVAMP's end in a stray '" ' and a newline,
Countdown's example runs into "Respond in the following format" with no break.
SVAMP's question is Body + Question with nothing between them, as the authors join it.

Tokens. The authors tokenize the templated text with the tokenizer's defaults
(`add_special_tokens=True`). For LLaDA-8B-Instruct that adds nothing (its tokenizer
config says add_bos_token false and its ids start with a single <|startoftext|>, the
one the template writes), so the default here, `add_special_tokens=False`, gives the
authors' ids on LLaDA, and the template's single BOS with any tokenizer, as
`evofast.chat` does for generation and CTS training. `encode(..., add_special_tokens=True)`
repeats the authors' call literally; on a tokenizer that prepends its own BOS that
makes two. The authors decode one prompt at a time (batch size 1): no padding.

Scoring. `extract` and `check` are the rules of the authors' eval/get_acc.py (see
`evofast.tasks.paper_rules`); give them the generated part decoded with
`skip_special_tokens=False`, as the authors do.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Optional

from ..chat import chat_text, has_template
from . import paper_rules as rules
from .records import read_records

__all__ = ["PaperExample", "PaperTask", "GSM8K", "MATH500", "SVAMP", "CountdownCD3", "PAPER_TASKS",
           "PAPER_ALIASES", "PREFILL"]

PREFILL = "<reasoning>"

_FORMAT = ("Respond in the following format:\n<reasoning>\nYour reasoning here\n</reasoning>\n"
           "<answer>\n\\boxed{...}\n</answer>")
_MATH_EXPERT = ("You are a math expert. You will be given a question to solve. Solve it step by step. "
                "Wrap the final answer in a \\boxed{}.")
_MATH500_PROMPT = _MATH_EXPERT + "\n" + _FORMAT + '" \n'      # the authors' SVAMP prompt is this one too


@dataclass(frozen=True)
class PaperExample:
    """One benchmark problem: `question` as the authors build it (what follows the system
    prompt), `answer` the ground truth as they compute it (see each task), `record` the
    dataset's record as read."""
    question: str
    answer: Any
    record: dict


class PaperTask:
    """A benchmark of the paper. Subclasses set `name`, `fields` (of a record),
    `system_prompt`, `hub` ((name, config, split) for `datasets.load_dataset`, or None)
    and `make_example(record)`.

    The authors' evaluation setup, as attributes (their start_eval.sh and evaluate.py):

    num_eval       problems scored: None for all of the test split (countdown: 256)
    gen_lengths    (128, 256): the paper reports both; `gen_length` is the longer
    block_length   32
    steps          gen_length // 2 (`steps_for(gen_length)`)
    temperature    0.5
    k_soft         3
    alphas         (0.9, 0.8, 0.7, 0.6, 0.5): alpha_soft_mask values swept; the accuracy
                   reported for a setting is the best over them
    batch_size     1
    """

    name = "paper"
    fields: tuple = ()
    system_prompt = ""
    hub: Optional[tuple] = None
    num_eval: Optional[int] = None
    gen_lengths = (128, 256)
    gen_length = 256
    block_length = 32
    temperature = 0.5
    k_soft = 3
    alphas = (0.9, 0.8, 0.7, 0.6, 0.5)
    batch_size = 1

    @staticmethod
    def steps_for(gen_length: int) -> int:
        return gen_length // 2

    def spec(self) -> dict:
        return {"task": self.name}

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    # ---- data
    def load(self, path, *, split: Optional[str] = None, config: Optional[str] = None) -> List[PaperExample]:
        """The examples of a local .jsonl / .json (a list, or JSON lines) / .parquet file
        with the dataset's own fields, or, when `path` is not a file, of
        `datasets.load_dataset(path, config, split)` (config and split default to the
        ones the authors load, e.g. "main" and "test" for GSM8K)."""
        hub_config, hub_split = (self.hub[1], self.hub[2]) if self.hub else (None, "test")
        rows = read_records(path, config=config if config is not None else hub_config,
                            split=split if split is not None else hub_split)
        out = []
        for where, record in rows:
            try:
                if not isinstance(record, dict):
                    raise ValueError(f"expected an object, got {type(record).__name__}")
                missing = [f for f in self.fields if f not in record]
                if missing:
                    raise ValueError(f"missing field(s) {missing}; has {sorted(record)}")
                out.append(self.make_example(record))
            except ValueError as e:
                raise ValueError(f"{path}: {where}: {e} (a {self.name} record needs the fields "
                                 f"{list(self.fields)})") from None
        return out

    def make_example(self, record: dict) -> PaperExample:
        raise NotImplementedError

    # ---- prompt
    def user_turn(self, ex: PaperExample) -> str:
        """What the user says: the system prompt, a blank line, the question."""
        return self.system_prompt + "\n\n" + ex.question

    def messages(self, ex: PaperExample) -> list:
        """The chat the authors send: one user turn, the system prompt inside it."""
        return [{"role": "user", "content": self.user_turn(ex)}]

    def prompt_text(self, ex: PaperExample, tokenizer) -> str:
        """The chat template's text of `messages(ex)` with the generation prompt, then "<reasoning>"."""
        if not has_template(tokenizer):
            raise ValueError(f"tokenizer: has no chat template; the {self.name} prompt is a chat turn "
                             f"(the authors use LLaDA-8B-Instruct's template)")
        return chat_text(tokenizer, self.user_turn(ex)) + PREFILL

    def encode(self, ex: PaperExample, tokenizer, *, add_special_tokens: bool = False) -> List[int]:
        """Token ids of `prompt_text`. add_special_tokens=True is the authors' literal call
        (the same ids on LLaDA; a second BOS on a tokenizer that adds one: see the module doc)."""
        return list(tokenizer(self.prompt_text(ex, tokenizer), add_special_tokens=add_special_tokens)["input_ids"])

    # ---- scoring
    def extract(self, ex: Optional[PaperExample], text: str):
        """The answer the authors' rule reads from a generation (for logs)."""
        raise NotImplementedError

    def check(self, ex: PaperExample, text: str) -> bool:
        """The authors' verdict on a generation."""
        raise NotImplementedError


def _text(name: str, value) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{name}: expected a string, got {value!r}")
    return value


def _str_arg(text) -> str:
    if not isinstance(text, str):
        raise ValueError(f"text: expected the decoded generation (a str), got {type(text).__name__}")
    return text


class _NumericTask(PaperTask):
    """GSM8K and SVAMP: a float ground truth, `paper_rules.numeric_answer`, float equality."""

    def extract(self, ex, text: str) -> Optional[float]:
        return rules.numeric_answer(_str_arg(text))

    def check(self, ex: PaperExample, text: str) -> bool:
        got = self.extract(ex, text)
        return got is not None and got == ex.answer


class GSM8K(_NumericTask):
    """GSM8K test (1319 problems). answer: the float after '####' in the solution, or None
    where no number follows it (the authors' regex takes no minus sign): never right."""

    name = "gsm8k"
    fields = ("question", "answer")
    system_prompt = _MATH_EXPERT + " \n" + _FORMAT
    hub = ("openai/gsm8k", "main", "test")

    def make_example(self, record: dict) -> PaperExample:
        return PaperExample(_text("question", record["question"]),
                            rules.gsm8k_ground_truth(_text("answer", record["answer"])), record)


class SVAMP(_NumericTask):
    """SVAMP test (300 problems). question: Body + Question, joined with nothing between
    them; answer: float(Answer)."""

    name = "svamp"
    fields = ("Body", "Question", "Answer")
    system_prompt = _MATH500_PROMPT
    hub = ("ChilleD/SVAMP", None, "test")

    def make_example(self, record: dict) -> PaperExample:
        answer = record["Answer"]
        try:
            if isinstance(answer, bool):
                raise TypeError
            value = float(answer)
        except (TypeError, ValueError):
            raise ValueError(f"Answer: expected a number, got {answer!r}") from None
        return PaperExample(_text("Body", record["Body"]) + _text("Question", record["Question"]), value, record)


class MATH500(PaperTask):
    """MATH-500 (500 problems). answer: the record's answer string; scored with
    `paper_rules.math_answer` and `math_equiv` (the Hendrycks normalisation)."""

    name = "math500"
    fields = ("problem", "answer")
    system_prompt = _MATH500_PROMPT
    hub = ("HuggingFaceH4/MATH-500", None, "test")

    def make_example(self, record: dict) -> PaperExample:
        return PaperExample(_text("problem", record["problem"]), _text("answer", record["answer"]), record)

    def extract(self, ex, text: str) -> Optional[str]:
        return rules.math_answer(_str_arg(text))

    def check(self, ex: PaperExample, text: str) -> bool:
        got = self.extract(ex, text)
        return got is not None and rules.math_equiv(got, ex.answer)


class CountdownCD3(PaperTask):
    """The authors' Countdown with three numbers. question: "Numbers: [30, 100, 93]\\nTarget: 23";
    answer: (numbers, target). num_eval = 256: the authors score 256 problems drawn without
    replacement from the file, which has 256: all of them. No hub copy: `load` needs the
    file (see the module doc). Scored with `paper_rules.countdown_correct`, which never
    evaluates the text as code."""

    name = "countdown"
    fields = ("input", "output")
    system_prompt = ("Using only the provided numbers, create an arithmetic expression that evaluates to exactly "
                     "the provided target number. You may use the operations +, -, *, and / as needed, but each "
                     "number must be used exactly once. Think step-by-step. After reasoning, provide only your "
                     "final expression inside \\boxed{} tags without including an equals sign or the target "
                     "number. For example: \\boxed{a + b * c}" + _FORMAT)
    num_eval = 256

    def load(self, path, *, split=None, config=None) -> List[PaperExample]:
        if not Path(path).is_file():
            raise ValueError(f"path: no such file: {path}; the countdown problems are the authors' "
                             f"countdown_cd3_test.jsonl (dataset/ in github.com/aim-uofa/EvoTokenDLM)")
        return super().load(path, split=split, config=config)

    def make_example(self, record: dict) -> PaperExample:
        target = record["output"]
        try:
            if not isinstance(target, (str, int)) or isinstance(target, bool):
                raise TypeError(f"output {target!r} is not a string or an int")
            numbers = [int(n) for n in _text("input", record["input"]).split(",")]
            target = int(target)
        except (TypeError, ValueError) as e:
            raise ValueError(f"input / output: expected \"n1,n2,...\" and an integer target ({e})") from None
        return PaperExample(f"Numbers: {numbers}\nTarget: {target}", (tuple(numbers), target), record)

    def extract(self, ex, text: str) -> str:
        return rules.countdown_equation(_str_arg(text))

    def check(self, ex: PaperExample, text: str) -> bool:
        numbers, target = ex.answer
        return rules.countdown_correct(_str_arg(text), numbers, target)


PAPER_TASKS = {t.name: t for t in (GSM8K, MATH500, SVAMP, CountdownCD3)}
PAPER_ALIASES = {"math": "math500"}
