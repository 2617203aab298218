"""Tasks: synthetic reasoning tasks with exact answers, and the EvoToken paper's benchmarks.

Synthetic tasks, generated from a seed (see `base.py` for the split and the JSONL export):

    from evofast import tasks
    task = tasks.get_task("add", digits=3)        # or "mul", "countdown-synth"
    ex = task.make(random.Random(0))              # Example(prompt, response, answer, meta)
    test = task.test_set(500, seed=0)             # never overlaps the train stream
    task.check(ex, generated_text)                # exact match (countdown-synth: the ast checker)
    tok = tasks.make_tokenizer()                  # character tokenizer, AutoTokenizer-loadable once saved

The paper's benchmarks, read from their files and scored with the authors' rules (see `paper.py`):

    t = tasks.get_task("gsm8k")                   # "gsm8k", "math500" (alias "math"), "svamp", "countdown"
    exs = t.load(path)                            # PaperExample(question, answer, record)
    t.encode(exs[0], tokenizer), t.extract(exs[0], text), t.check(exs[0], text)
"""
from __future__ import annotations

from typing import Union

from .arithmetic import Addition, Multiplication
from .base import TEST_PERCENT, Example, Task, in_test_split
from .countdown import Arithmetic, Countdown, check_countdown, safe_arith
from .paper import GSM8K, MATH500, PAPER_ALIASES, PAPER_TASKS, SVAMP, CountdownCD3, PaperExample, PaperTask
from .tokenizer import make_tokenizer

__all__ = ["TASKS", "PAPER_TASKS", "get_task", "task_from_spec", "parse_task", "task_names", "Task", "Example",
           "Addition", "Multiplication", "Countdown", "Arithmetic", "check_countdown", "safe_arith",
           "make_tokenizer", "in_test_split", "TEST_PERCENT", "TASK_FILE", "PaperTask", "PaperExample", "GSM8K",
           "MATH500", "SVAMP", "CountdownCD3"]

TASKS = {"add": Addition, "mul": Multiplication, "countdown-synth": Countdown}
TASK_FILE = "evofast_task.json"       # written into a model directory by train-base
_SYNTHETIC_KEYS = {"count", "hi", "test_percent"}    # in a synthetic countdown's spec, never in the paper's


def task_names() -> list:
    """Every name `get_task` accepts."""
    return sorted(TASKS) + sorted(PAPER_TASKS) + sorted(PAPER_ALIASES)


def get_task(name: str, **params) -> Union[Task, PaperTask]:
    """A task by name: a synthetic one ("add", "mul", "countdown-synth") with its parameters
    (digits=, count=, hi=), or one of the paper's benchmarks ("gsm8k", "math500" or
    "math", "svamp", "countdown"), which take none."""
    name = PAPER_ALIASES.get(name, name)
    if name in PAPER_TASKS:
        if params:
            hint = " (the synthetic countdown is 'countdown-synth')" if name == "countdown" else ""
            raise ValueError(f"task {name!r}: takes no parameters, got {params}{hint}")
        return PAPER_TASKS[name]()
    if name not in TASKS:
        raise ValueError(f"task: must be one of {task_names()}, got {name!r}")
    try:
        return TASKS[name](**params)
    except TypeError as e:
        raise ValueError(f"task {name!r}: bad parameters {params}: {e}") from None


def parse_task(text: str, synthetic: bool = False) -> Union[Task, PaperTask]:
    """A task from the command line: "add", "add:digits=2", "countdown-synth:count=3,hi=9", "gsm8k".
    With `synthetic`, only a synthetic task is accepted (for commands that generate their data)."""
    if not isinstance(text, str) or not text:
        raise ValueError(f"task: expected NAME[:key=value,...], got {text!r}")
    name, _, rest = text.partition(":")
    params = {}
    for item in filter(None, rest.split(",")):
        key, eq, val = item.partition("=")
        if not eq or not val.strip().lstrip("-").isdigit():
            raise ValueError(f"task: parameter {item!r} is not key=INT (in {text!r})")
        params[key.strip()] = int(val)
    task = get_task(name.strip(), **params)
    if synthetic and not isinstance(task, Task):
        raise ValueError(f"task: {name.strip()!r} is one of the paper's benchmarks; this needs a synthetic task "
                         f"({', '.join(sorted(TASKS))})")
    return task


def task_from_spec(spec: dict) -> Union[Task, PaperTask]:
    """The task a `spec()` dict (e.g. a model directory's TASK_FILE) describes. A spec
    written when the synthetic countdown was named "countdown" (it carries count / hi)
    still gives the synthetic task."""
    name = spec["task"]
    if name == "countdown" and _SYNTHETIC_KEYS & spec.keys():
        name = "countdown-synth"
    skip = {"task", "gen_length", "block_length", "test_percent"}
    return get_task(name, **{k: v for k, v in spec.items() if k not in skip})
