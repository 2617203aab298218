"""The hooks of evofast's lm-eval task files (`lm_eval_tasks/evofast_*.yaml`): the EvoToken
paper's four benchmarks, prompted and scored by `evofast.tasks` exactly as `evofast eval` does.

For each benchmark NAME (gsm8k, math500, svamp, countdown) the task file names

    NAME_dataset(**metadata)        its `custom_dataset`: the records of the file given as
                                    metadata NAME_data (`--metadata NAME_data=PATH`), read and
                                    checked by `evofast.tasks.get_task(NAME).load`; without it,
                                    the hub split the authors use (countdown has none: required)
    NAME_doc_to_text(doc)           the user turn: the authors' system prompt, a blank line, the question
    NAME_process_results(doc, out)  {"acc": 1.0 or 0.0}: the authors' verdict `task.check` on the generation

The task files set `gen_prefix: "<reasoning>"` (the authors' prefill of the assistant turn)
and ask the model for the generation as the authors decode it (special tokens kept, no
stop strings), so run them with `--apply_chat_template`.

Only `datasets` is needed here (lm-eval imports this module when it reads the task files).
"""
from __future__ import annotations

from functools import lru_cache, partial

__all__ = [f"{name}_{hook}" for name in ("gsm8k", "math500", "svamp", "countdown")
           for hook in ("dataset", "doc_to_text", "process_results")]


@lru_cache(maxsize=None)
def _task(name: str):
    from ..tasks import get_task
    return get_task(name)


def _dataset(name: str, /, **metadata):
    import datasets

    key = f"{name}_data"
    task = _task(name)
    source = metadata.get(key)
    if source is None:
        if task.hub is None:
            raise ValueError(f"{key}: the {name} task needs its data file: pass --metadata {key}=PATH "
                             f"(the fields {list(task.fields)}, one record per problem)")
        source = task.hub[0]
    records = [ex.record for ex in task.load(str(source))]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(records)})


def _doc_to_text(name: str, doc: dict) -> str:
    task = _task(name)
    return task.user_turn(task.make_example(dict(doc)))


def _process_results(name: str, doc: dict, results: list) -> dict:
    task = _task(name)
    return {"acc": float(task.check(task.make_example(dict(doc)), results[0]))}


def _hooks(name: str) -> tuple:
    """NAME_dataset, NAME_doc_to_text, NAME_process_results of one benchmark."""
    return partial(_dataset, name), partial(_doc_to_text, name), partial(_process_results, name)


gsm8k_dataset, gsm8k_doc_to_text, gsm8k_process_results = _hooks("gsm8k")
math500_dataset, math500_doc_to_text, math500_process_results = _hooks("math500")
svamp_dataset, svamp_doc_to_text, svamp_process_results = _hooks("svamp")
countdown_dataset, countdown_doc_to_text, countdown_process_results = _hooks("countdown")
