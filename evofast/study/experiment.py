"""The study on one task: a base, its fine-tuned arms, every decoding setting, paired contrasts.

    cfg = StudyConfig(seeds=3, problems=1000)
    res = run_task(task, base, tok, cfg, settings=("lora", "full"))
    res["models"]      # per model: arm, setting, seed, chosen alpha, fine-tune log, one record per decoding
    res["contrasts"]   # per setting and decoding: CTS-evotoken vs FT-hard, CTS-hard vs FT-hard, ...

Arms: "base" (the pretrained model), "ft" (the FT-baseline: masked diffusion) and "cts",
each fine-tune repeated for `seeds` seeds, in each fine-tune setting ("lora": LoRA on q / k
/ v; "full": every parameter), all from the same base (`evofast.study.finetune`). Every
model decodes the same test problems with every setting of `decodings`; its EvoToken alpha
is chosen on validation problems (held-out problems apart from the test ones) first.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Callable, Optional

from . import stats
from .finetune import finetune
from .scoring import POLICIES, Setting, score

__all__ = ["StudyConfig", "ARMS", "SETTINGS", "CONTRASTS", "problem_sets", "decodings", "select_alpha", "run_task"]

ARMS = ("base", "ft", "cts")
SETTINGS = ("lora", "full")
#: (name, (arm, mode) of a, (arm, mode) of b): the difference reported is b - a
CONTRASTS = (
    ("CTS-evotoken vs FT-hard", ("ft", "hard"), ("cts", "evotoken")),
    ("CTS-hard vs FT-hard", ("ft", "hard"), ("cts", "hard")),
    ("CTS-evotoken vs CTS-hard", ("cts", "hard"), ("cts", "evotoken")),
    ("FT-evotoken vs FT-hard", ("ft", "hard"), ("ft", "evotoken")),
    ("base-evotoken vs base-hard", ("base", "hard"), ("base", "evotoken")),
)


@dataclass(frozen=True)
class StudyConfig:
    """Everything the study's numbers depend on (saved with them)."""

    seeds: int = 3
    problems: int = 1000
    val_problems: int = 200
    tokens_per_step: tuple = (2, 4, 8)
    temperatures: tuple = (0.0, 0.5)
    alphas: tuple = (0.5, 0.7, 0.9)
    policies: tuple = ("schedule", "threshold")
    k_soft: int = 3
    ft_steps: int = 150
    ft_batch: int = 32
    ft_warmup: int = 15
    lora_r: int = 16
    lora_lr: float = 1e-3
    full_lr: float = 1e-4
    decode_batch: int = 1000
    seed: int = 0

    def __post_init__(self):
        unknown = [p for p in self.policies if p not in POLICIES]
        if unknown or "schedule" not in self.policies:
            raise ValueError(f"policies: must include 'schedule', each one of {sorted(POLICIES)}, got "
                             f"{list(self.policies)}")
        for name in ("seeds", "problems", "val_problems", "ft_steps", "ft_batch", "lora_r", "decode_batch"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}: must be an int >= 1, got {v!r}")
        if not self.alphas or not all(0 <= a < 1 for a in self.alphas):
            raise ValueError(f"alphas: each must lie in [0, 1), got {list(self.alphas)}")
        if not self.temperatures or any(t < 0 for t in self.temperatures):
            raise ValueError(f"temperatures: each must be >= 0, got {list(self.temperatures)}")

    def as_dict(self) -> dict:
        return asdict(self)


def problem_sets(task, n_test: int, n_val: int, seed: int = 0) -> tuple:
    """(validation, test): distinct held-out problems (the task's test split), validation first.
    When the split holds fewer than n_val + n_test problems, the test set gets what is left."""
    everything = task.test_set(n_val + n_test, seed=seed)
    if len(everything) <= n_val:
        raise ValueError(f"problems: {task!r} has only {len(everything)} held-out problems, not enough for "
                         f"{n_val} validation problems and a test set")
    return everything[:n_val], everything[n_val:]


def check_task(task, cfg: StudyConfig) -> None:
    """The task must be fixed-width (checked on a sample of its prompts) and every decoding
    setting valid for its lengths (ValueError before any work)."""
    import itertools
    sample = itertools.islice(task.stream("train", cfg.seed), 200)
    if any(len(ex.prompt) != task.prompt_length for ex in sample):
        raise ValueError(f"task: {task!r} writes prompts of several widths; the study needs a fixed-width task "
                         "(CTS batches cannot mask pads), e.g. countdown-synth:aligned=1")
    G, Bk = task.gen_length, task.block_length
    for tps in cfg.tokens_per_step:
        if isinstance(tps, bool) or not isinstance(tps, int) or tps < 1 or G % tps or (G // tps) % (G // Bk) \
                or tps > Bk:
            raise ValueError(f"tokens_per_step: {tps} does not give a whole number of steps per block for "
                             f"{task!r} (gen_length {G}, block {Bk})")


def decodings(cfg: StudyConfig, alpha: Optional[float]) -> list:
    """The decoding settings of a model (its chosen alpha): the schedule at every tokens-per-step,
    temperature and mode, then each other policy greedy in both modes (the schedule's smallest
    tokens-per-step keeps its `steps` valid; the policy decides how many forwards it takes)."""
    out = []
    for tps in cfg.tokens_per_step:
        for T in cfg.temperatures:
            out += [Setting("hard", tps, T), Setting("evotoken", tps, T, alpha)]
    for policy in cfg.policies:
        if policy != "schedule":
            tps = min(cfg.tokens_per_step)
            out += [Setting("hard", tps, 0.0, policy=policy), Setting("evotoken", tps, 0.0, alpha, policy)]
    return out


def key_of(setting: dict) -> str:
    """A decoding's name without the alpha (which differs from model to model)."""
    return f"tps{setting['tokens_per_step']}-T{setting['temperature']:g}-{setting['policy']}"


def select_alpha(model, tok, task, val: list, cfg: StudyConfig) -> tuple:
    """(alpha, {alpha: validation accuracy}): the alpha of `cfg.alphas` with the most correct
    validation answers over every tokens-per-step, greedy, schedule (ties: the first listed)."""
    acc = {}
    for a in cfg.alphas:
        right = 0
        for tps in cfg.tokens_per_step:
            r = score(model, tok, task, val, Setting("evotoken", tps, 0.0, a), batch_size=cfg.decode_batch,
                      seed=cfg.seed, k_soft=cfg.k_soft, keep_samples=0)
            right += sum(r["correct"])
        acc[a] = right / (len(val) * len(cfg.tokens_per_step))
    best = max(cfg.alphas, key=lambda a: (acc[a], -cfg.alphas.index(a)))
    return best, acc


def _model_record(model, tok, task, val, test, cfg: StudyConfig, tick: Callable) -> dict:
    t0 = time.perf_counter()
    alpha, val_acc = select_alpha(model, tok, task, val, cfg)
    rec = {"alpha": alpha, "val_accuracy": {f"{a:g}": v for a, v in val_acc.items()},
           "val_seconds": time.perf_counter() - t0, "decodings": []}
    for s in decodings(cfg, alpha):
        r = score(model, tok, task, test, s, batch_size=cfg.decode_batch, seed=cfg.seed, k_soft=cfg.k_soft)
        r["key"] = key_of(r["setting"])
        r["correct"] = "".join(map(str, r["correct"]))             # compact in the JSON
        r["first_correct"] = "".join(map(str, r["first_correct"]))
        r.pop("revised")
        rec["decodings"].append(r)
        tick(s.name)
    return rec


def run_task(task, base, tok, cfg: StudyConfig, *, settings=SETTINGS, device=None,
             on_model: Optional[Callable] = None, progress: bool = True, log: Callable = print) -> dict:
    """The study on `task` from the trained `base` (see the module docstring). `on_model(arm,
    setting, seed, model)` sees every fine-tuned model (to export one)."""
    check_task(task, cfg)
    bad = [s for s in settings if s not in SETTINGS]
    if bad or not settings:
        raise ValueError(f"settings: each must be one of {SETTINGS}, got {list(settings)}")
    val, test = problem_sets(task, cfg.problems, cfg.val_problems, cfg.seed)
    n_dec = len(decodings(cfg, 0.5))
    n_models = 1 + 2 * cfg.seeds * len(settings)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=n_models * n_dec, desc=f"study {task.name}", unit="decoding")

    def tick(name):
        if bar is not None:
            bar.update(1)
            bar.set_postfix_str(name)

    models = []
    try:
        rec = _model_record(base, tok, task, val, test, cfg, tick)
        models.append({"arm": "base", "setting": None, "seed": None, **rec})
        for setting in settings:
            for s in range(cfg.seeds):
                for arm, objective in (("ft", "md"), ("cts", "cts")):
                    t0 = time.perf_counter()
                    lora = setting == "lora"
                    model, tlog = finetune(base, tok, task, objective=objective, lora_r=cfg.lora_r if lora else None,
                                           steps=cfg.ft_steps, batch_size=cfg.ft_batch, warmup=cfg.ft_warmup,
                                           lr=cfg.lora_lr if lora else cfg.full_lr, seed=cfg.seed * 1000 + 1 + s,
                                           device=device)
                    train_s = time.perf_counter() - t0
                    if on_model is not None:
                        on_model(arm, setting, s, model)
                    rec = _model_record(model, tok, task, val, test, cfg, tick)
                    models.append({"arm": arm, "setting": setting, "seed": s, "train_seconds": train_s,
                                   "train_losses": tlog.losses, **rec})
                    del model
    finally:
        if bar is not None:
            bar.close()
    return {"task": task.spec(), "n_test": len(test), "n_val": len(val), "models": models,
            "contrasts": contrasts(models, settings)}


def _matrix(models: list, arm: str, setting: Optional[str], key: str, mode: str) -> Optional[list]:
    rows = []
    for m in models:
        if m["arm"] == arm and (arm == "base" or m["setting"] == setting):
            d = next((d for d in m["decodings"] if d["key"] == key and d["setting"]["mode"] == mode), None)
            if d is not None:
                rows.append([int(c) for c in d["correct"]])
    return rows or None


def contrasts(models: list, settings=SETTINGS) -> list:
    """Every contrast of `CONTRASTS` in every setting and decoding (paired: same problems,
    fine-tune seed s against seed s; the base's one row against every seed)."""
    keys = list(dict.fromkeys(d["key"] for m in models for d in m["decodings"]))
    out = []
    for setting in settings:
        for key in keys:
            for name, (arm_a, mode_a), (arm_b, mode_b) in CONTRASTS:
                if arm_a == arm_b == "base" and setting != settings[0]:
                    continue                                   # the base's contrast once, not per setting
                a = _matrix(models, arm_a, setting, key, mode_a)
                b = _matrix(models, arm_b, setting, key, mode_b)
                if a is None or b is None:
                    continue
                out.append({"setting": None if arm_a == arm_b == "base" else setting, "decoding": key,
                            "contrast": name, **stats.compare(a, b)})
    return out
