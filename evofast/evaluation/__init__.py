"""Evaluating a model on a task over a grid of decoding settings, resumably.

    from evofast.evaluation import expand_grid, ResultStore, run_grid
    configs = expand_grid(mode="evotoken", gen_lengths=[128, 256], alphas=[0.9, 0.7, 0.5], temperature=0.5)
    store = ResultStore("results/gsm8k", settings)      # settings: what the results depend on
    store.claim()                                        # refuses a directory of another run
    summaries = run_grid(model, tok, task, examples, configs, store, batch_size=32)

`evofast eval` is this on the command line; `evofast.study.evaluate.evaluate` is the
in-memory single configuration of the synthetic quality study.
"""
from .grid import EvalConfig, expand_grid
from .loading import load_model_and_task, resolve_task
from .report import mark_best_alpha, summarize, table, wilson_interval, write_authors_layout
from .results import ResultStore, write_json_atomic
from .runner import decode_examples, distributed_context, run_grid

__all__ = ["EvalConfig", "expand_grid", "load_model_and_task", "resolve_task", "ResultStore", "write_json_atomic", "run_grid", "decode_examples",
           "distributed_context", "summarize", "mark_best_alpha", "table", "wilson_interval",
           "write_authors_layout"]
