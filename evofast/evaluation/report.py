"""Summaries of an evaluation run: accuracy with a Wilson interval, speed, the table, the
authors' file layout.

Per configuration: accuracy (exact, by the task's rule) with its Wilson 95% interval,
tokens/s and seconds per example (decoding time of one process, summed over its
batches), and forwards per example (the decoding steps each example took). Where a
grid varies alpha, the best alpha per (gen length, steps) is marked: it is chosen on
the test set itself, as the paper reports it, so it is an optimistic figure.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

__all__ = ["wilson_interval", "summarize", "mark_best_alpha", "table", "write_authors_layout", "AUTHORS_NAMES"]

#: evofast task name -> the dataset key of the authors' evaluate.py / get_acc.py
AUTHORS_NAMES = {"gsm8k": "gsm8k", "math500": "math", "svamp": "svamp", "countdown": "countdown"}


def wilson_interval(correct: int, n: int, z: float = 1.959964) -> tuple:
    """Wilson score interval of a binomial proportion (95% by default); (0, 1) when n = 0."""
    if n < 0 or not 0 <= correct <= max(n, 0):
        raise ValueError(f"correct: must lie in [0, n={n}], got {correct}")
    if n == 0:
        return (0.0, 1.0)
    p = correct / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    lo = 0.0 if correct == 0 else max(0.0, centre - half)      # exact ends (no rounding below 1)
    hi = 1.0 if correct == n else min(1.0, centre + half)
    return (lo, hi)


def summarize(config, records: Sequence[dict]) -> dict:
    """The summary of one configuration's records."""
    n = len(records)
    correct = sum(bool(r["correct"]) for r in records)
    seconds = sum(float(r.get("seconds", 0.0)) for r in records)
    forwards = [r["forwards"] for r in records if r.get("forwards") is not None]
    lo, hi = wilson_interval(correct, n)
    return {**config.as_dict(), "n": n, "correct": correct, "accuracy": correct / n if n else 0.0,
            "ci95": [lo, hi], "seconds": seconds,
            "tokens_per_s": n * config.gen_length / seconds if seconds > 0 else None,
            "seconds_per_example": seconds / n if n else None,
            "examples_per_s": n / seconds if seconds > 0 else None,
            "forwards_per_example": sum(forwards) / len(forwards) if forwards else None}


def mark_best_alpha(summaries: list) -> list:
    """Set `best_alpha_on_test` on the evotoken summary with the highest accuracy among those
    sharing everything but alpha (only where alpha varies)."""
    groups = {}
    for s in summaries:
        if s["mode"] == "evotoken":
            key = tuple((k, v) for k, v in s.items() if k in ("gen_length", "steps", "block_length", "k_soft",
                                                               "temperature", "cache", "threshold"))
            groups.setdefault(key, []).append(s)
    for group in groups.values():
        for s in group:
            s["best_alpha_on_test"] = False
        if len(group) > 1:
            max(group, key=lambda s: s["accuracy"])["best_alpha_on_test"] = True
    return summaries


def table(summaries: list, title: str = "") -> str:
    """A Markdown table of the summaries (best alpha marked with *)."""
    lines = [f"### {title}", ""] if title else []
    lines += ["| configuration | n | accuracy % [95% CI] | tokens/s | s / example | forwards / example |",
              "|---|---|---|---|---|---|"]
    for s in summaries:
        star = " *" if s.get("best_alpha_on_test") else ""
        acc = f"{100 * s['accuracy']:.1f} [{100 * s['ci95'][0]:.1f}, {100 * s['ci95'][1]:.1f}]"
        tps = f"{s['tokens_per_s']:.1f}" if s["tokens_per_s"] else "-"
        spe = f"{s['seconds_per_example']:.3f}" if s["seconds_per_example"] is not None else "-"
        fpe = f"{s['forwards_per_example']:.1f}" if s["forwards_per_example"] is not None else "-"
        lines.append(f"| {s['name']}{star} | {s['n']} | {acc} | {tps} | {spe} | {fpe} |")
    if any(s.get("best_alpha_on_test") for s in summaries):
        lines += ["", "\\* the best alpha of its row group, chosen on the test set itself (as the paper "
                      "reports it): an optimistic figure."]
    return "\n".join(lines) + "\n"


def write_authors_layout(out: Path, task_name: str, config, records: Sequence[dict], settings: dict) -> Path:
    """The authors' evaluate.py output for one configuration, so that their get_acc.py reads
    evofast's results: `<out>/authors/eval_results_kSoft_<k>_alphaSoftMask_<a>/
    <dataset>_<gen>_<steps>_0_generations.json` (hard mode: `eval_results_hard/`)."""
    dataset = AUTHORS_NAMES.get(task_name, task_name)
    sub = (f"eval_results_kSoft_{config.k_soft}_alphaSoftMask_{config.alpha:g}" if config.mode == "evotoken"
           else "eval_results_hard")
    d = Path(out) / "authors" / sub
    d.mkdir(parents=True, exist_ok=True)
    seconds = [float(r.get("seconds", 0.0)) for r in records]
    doc = {
        "generations": [{"question": r["question"], "prompt_input": r["prompt"], "generations": r["generation"],
                         "ground_truth": r["ground_truth"]} for r in records],
        "metrics": {"wall_time": sum(seconds) / len(seconds) if seconds else 0.0, "total_processed": len(records)},
        "model_path": settings.get("model"), "checkpoint_path": settings.get("lora"),
        "gen_length": config.gen_length, "diffusion_steps": config.steps, "block_length": config.block_length,
    }
    path = d / f"{dataset}_{config.gen_length}_{config.steps}_0_generations.json"
    path.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    return path
