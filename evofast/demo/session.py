"""What the demo runs: a model, its tokenizer, its task (when its directory names one), and the
settings a request may ask for.

`load_model("tiny" | DIR, device, dtype)` gives a `DemoModel`. A directory holding a task file
(`evofast_task.json`, written by `evofast train-base`) brings its synthetic task: prompts are
then encoded in the task's fixed-width layout (the one the model was trained on), the page
offers test problems as examples, and an answer to a prompt the task can parse is checked.

`parse_settings(body, defaults)` turns a request's JSON into the prompt and `generate`'s
keyword arguments; every wrong type or unknown name is a ValueError naming the field (the
values' ranges are `generate`'s to check: its messages name the argument too). The transfer
policies the page offers are the rows of `POLICIES`; a new one is a row.
"""
from __future__ import annotations

import json
import numbers
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

__all__ = ["DemoModel", "load_model", "parse_settings", "POLICIES", "Policy", "MAX_GEN_LENGTH", "TINY_NOTE"]

TINY_NOTE = ("the built-in random-weight LLaDA-architecture model (d_model 64, 2 layers) with a character "
             "tokenizer: its text is nonsense, its steps are real")
MAX_GEN_LENGTH = 512           # the page draws steps x positions cells; more would drown the browser
CACHES = ("none", "prefix", "dual")


@dataclass(frozen=True)
class Policy:
    """A transfer policy the page offers: its label, its parameters (name -> (default, lo, hi)) and
    how their values become `generate` arguments."""
    label: str
    params: dict
    kwargs: Callable[[dict], dict]


POLICIES = {
    "schedule": Policy("step schedule (each block's masks split evenly over its steps)", {},
                       lambda values: {"threshold": None}),
    "threshold": Policy("confidence threshold (every position at least this confident; steps set nothing)",
                        {"threshold": (0.9, 0.0, 1.0)}, lambda values: {"threshold": values["threshold"]}),
    "stdd": Policy("STDD (a threshold per position, raised by lam_t while its confidence still moves and by "
                   "lam_s while it disagrees with its neighbours; steps set nothing)",
                   {"tau": (0.9, 0.0, 1.0), "lam_t": (1.0, 0.0, 10.0), "lam_s": (1.0, 0.0, 10.0)},
                   lambda values: {"policy": _stdd(**values)}),
}


def _stdd(**params):
    from ..ops import STDD
    return STDD(**params)


@dataclass
class DemoModel:
    """A model patched for `generate`, its tokenizer, and what the page needs to know of it."""
    model: object
    tokenizer: object
    name: str
    note: str = ""
    task: Optional[object] = None          # a synthetic evofast.tasks.Task
    chat: bool = True                      # prompts through the chat template (when the tokenizer has one)
    examples: list = field(default_factory=list)

    @property
    def device(self):
        return next(self.model.parameters()).device

    def defaults(self) -> dict:
        """The settings the page starts from."""
        if self.task is not None:
            gen, block = self.task.gen_length, self.task.block_length
            prompt = self.examples[0].prompt if self.examples else ""
        elif self.name == "tiny":
            gen, block, prompt = 64, 16, "What is 12 + 30?"
        else:
            gen, block, prompt = 128, 32, "What is 12 + 30?"
        policy_params = {name: v[0] for policy in POLICIES.values() for name, v in policy.params.items()}
        return {"prompt": prompt, "mode": "evotoken", "policy": "schedule", **policy_params, "alpha": 0.7,
                "k_soft": 3, "steps": gen // 2, "gen_length": gen, "block_length": block, "cache": "none"}

    def encode(self, prompt: str):
        """(input_ids, attention_mask or None) of one prompt, on the model's device."""
        if self.task is not None:
            from ..tasks.base import Example, encode_batch
            batch = encode_batch(self.tokenizer, self.task, [Example(prompt, "", "")], with_response=False)
            am = batch["attention_mask"]
            return batch["input_ids"].to(self.device), (None if bool(am.all()) else am.to(self.device))
        from ..chat import encode_prompts
        return encode_prompts(self.tokenizer, [prompt], self.chat, self.device)

    def answer(self, generated) -> str:
        """The text of generated token ids (special tokens left out)."""
        return self.tokenizer.decode(list(generated), skip_special_tokens=True)

    def check(self, prompt: str, generated) -> Optional[dict]:
        """With a task and a prompt it can parse: the expected answer and whether the generation has it."""
        ex = self.example_for(prompt)
        if ex is None:
            return None
        text = self.tokenizer.decode(list(generated), skip_special_tokens=False)   # the task reads its own <eos>
        return {"expected": ex.answer, "extracted": self.task.extract(ex, text),
                "correct": bool(self.task.check(ex, text))}

    def example_for(self, prompt: str):
        """The task's example of `prompt`: one of the examples shown, or one the task builds from the
        prompt's numbers (`task.example(a, b)`) when it writes exactly this prompt."""
        if self.task is None:
            return None
        for ex in self.examples:
            if ex.prompt == prompt:
                return ex
        build = getattr(self.task, "example", None)
        if callable(build):
            try:
                ex = build(*map(int, re.findall(r"\d+", prompt)))
            except (TypeError, ValueError):
                return None
            return ex if ex.prompt == prompt else None
        return None


def load_model(spec: str, device, dtype, *, lora: Optional[str] = None, trust_remote_code: bool = False,
               mask_id: Optional[int] = None, chat: bool = True, examples: int = 8) -> DemoModel:
    """`spec`: "tiny" (the built-in random model) or a checkpoint directory (with its task file, if any)."""
    from ..models.loading import load_checkpoint, load_tiny, patch_for_generation

    if spec == "tiny":
        model, tok = load_tiny(device, dtype)
        patch_for_generation(model, tok, mask_id)
        return DemoModel(model, tok, "tiny", TINY_NOTE, chat=chat)
    model, tok = load_checkpoint(spec, device, dtype, trust_remote_code, lora=lora)
    patch_for_generation(model, tok, mask_id)
    demo = DemoModel(model, tok, Path(spec).name or str(spec), chat=chat)
    task = _task_of(Path(spec))
    if task is not None:
        demo.task, demo.examples = task, task.test_set(examples, seed=0)
        params = ", ".join(f"{k}={v}" for k, v in task.params().items())
        demo.note = f"its task: {task.name}" + (f" ({params})" if params else "")
    return demo


def _task_of(path: Path):
    """The synthetic task a model directory's task file names (None: no file, or one of the paper's
    benchmarks, whose prompts need their own records)."""
    from ..tasks import TASK_FILE, Task, task_from_spec

    file = path / TASK_FILE
    if not file.is_file():
        return None
    task = task_from_spec(json.loads(file.read_text()))
    return task if isinstance(task, Task) else None


# --------------------------------------------------------------------------- a request's settings
def _int(name, v) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise ValueError(f"{name}: expected an integer, got {v!r}")
    return int(v)


def _real(name, v) -> float:
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise ValueError(f"{name}: expected a number, got {v!r}")
    return float(v)


def _choice(name, v, choices) -> str:
    if v not in choices:
        raise ValueError(f"{name}: must be one of {list(choices)}, got {v!r}")
    return v


_FIELDS = {"prompt", "mode", "policy", "alpha", "k_soft", "steps", "gen_length", "block_length", "cache"} | {
    p for policy in POLICIES.values() for p in policy.params}


def parse_settings(body, defaults: dict) -> tuple:
    """(prompt, generate's keyword arguments) of a request's JSON object; missing fields take `defaults`."""
    from ..generation import MODES

    if not isinstance(body, dict):
        raise ValueError(f"request: expected a JSON object of settings, got {type(body).__name__}")
    unknown = sorted(set(body) - _FIELDS)
    if unknown:
        raise ValueError(f"request: unknown setting(s) {unknown}; known: {sorted(_FIELDS)}")
    s = {**defaults, **body}
    prompt = s["prompt"]
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("prompt: type a prompt (a non-empty string)")
    policy = POLICIES[_choice("policy", s["policy"], POLICIES)]
    values = {name: _real(name, s[name]) for name in policy.params}
    gen_length = _int("gen_length", s["gen_length"])
    if gen_length > MAX_GEN_LENGTH:
        raise ValueError(f"gen_length: at most {MAX_GEN_LENGTH} here (the page draws every step x position), "
                         f"got {gen_length}")
    cache = _choice("cache", s["cache"], CACHES)
    kwargs = {"mode": _choice("mode", s["mode"], MODES), "gen_length": gen_length,
              "block_length": _int("block_length", s["block_length"]), "steps": _int("steps", s["steps"]),
              "k_soft": _int("k_soft", s["k_soft"]), "alpha": _real("alpha", s["alpha"]),
              "cache": None if cache == "none" else cache, **policy.kwargs(values)}
    return prompt, kwargs
