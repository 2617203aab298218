"""Synthetic reasoning tasks with exact answers, for training and evaluating small DLMs.

    from evofast import tasks
    task = tasks.get_task("add", digits=3)        # or "mul", "countdown"
    ex = task.make(random.Random(0))              # Example(prompt, response, answer, meta)
    test = task.test_set(500, seed=0)             # never overlaps the train stream
    task.check(ex, generated_text)                # exact match (countdown: the ast checker)
    tok = tasks.make_tokenizer()                  # character tokenizer, AutoTokenizer-loadable once saved

Every task is generated from a seed; see `base.py` for the split and the JSONL export.
"""
from __future__ import annotations

from .arithmetic import Addition, Multiplication
from .base import TEST_PERCENT, Example, Task, in_test_split
from .countdown import Countdown, check_countdown, safe_arith
from .tokenizer import make_tokenizer

__all__ = ["TASKS", "get_task", "task_from_spec", "parse_task", "Task", "Example", "Addition", "Multiplication",
           "Countdown", "check_countdown", "safe_arith", "make_tokenizer", "in_test_split", "TEST_PERCENT",
           "TASK_FILE"]

TASKS = {"add": Addition, "mul": Multiplication, "countdown": Countdown}
TASK_FILE = "evofast_task.json"       # written into a model directory by train-base


def get_task(name: str, **params) -> Task:
    """A task by name ("add", "mul", "countdown") with its parameters (digits=, count=, hi=)."""
    if name not in TASKS:
        raise ValueError(f"task: must be one of {sorted(TASKS)}, got {name!r}")
    try:
        return TASKS[name](**params)
    except TypeError as e:
        raise ValueError(f"task {name!r}: bad parameters {params}: {e}") from None


def parse_task(text: str) -> Task:
    """A task from the command line: "add", "add:digits=2", "countdown:count=3,hi=9"."""
    if not isinstance(text, str) or not text:
        raise ValueError(f"task: expected NAME[:key=value,...], got {text!r}")
    name, _, rest = text.partition(":")
    params = {}
    for item in filter(None, rest.split(",")):
        key, eq, val = item.partition("=")
        if not eq or not val.strip().lstrip("-").isdigit():
            raise ValueError(f"task: parameter {item!r} is not key=INT (in {text!r})")
        params[key.strip()] = int(val)
    return get_task(name.strip(), **params)


def task_from_spec(spec: dict) -> Task:
    """The task a `Task.spec()` dict (e.g. a model directory's TASK_FILE) describes."""
    skip = {"task", "gen_length", "block_length", "test_percent"}
    return get_task(spec["task"], **{k: v for k, v in spec.items() if k not in skip})
