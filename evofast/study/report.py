"""The study's tables and figure, from the payload `evofast bench quality` writes as JSON.

    print(render(payload))     # accuracy per arm, chosen alphas, contrasts, revisions, per task
    plot(payload, "quality.png")
"""
from __future__ import annotations

import statistics
from pathlib import Path

__all__ = ["render", "plot", "accuracy_table", "contrast_table", "revision_table", "MAIN_CONTRASTS"]

MAIN_CONTRASTS = ("CTS-evotoken vs FT-hard", "CTS-hard vs FT-hard", "CTS-evotoken vs CTS-hard")
_ARM = {"base": "base", "ft": "FT", "cts": "CTS"}


def _columns(task_res: dict) -> list:
    cols = [("base", None)]
    for s in dict.fromkeys(m["setting"] for m in task_res["models"] if m["setting"]):
        cols += [("ft", s), ("cts", s)]
    return cols


def _label(arm, setting) -> str:
    return _ARM[arm] + (f" {setting}" if setting else "")


def _pct(values) -> str:
    """Mean accuracy in %, with the seeds' range when there are several."""
    if not values:
        return "-"
    mean = 100 * statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.1f}"
    return f"{mean:.1f} ({100 * min(values):.1f}-{100 * max(values):.1f})"


def _decodings(task_res: dict) -> list:
    return list(dict.fromkeys((d["key"], d["setting"]["mode"]) for m in task_res["models"] for d in m["decodings"]))


def _accuracies(task_res, arm, setting, key, mode, field="accuracy") -> list:
    return [d[field] for m in task_res["models"] if m["arm"] == arm and m["setting"] == setting
            for d in m["decodings"] if d["key"] == key and d["setting"]["mode"] == mode]


def accuracy_table(task_res: dict) -> str:
    """Exact match % per decoding (rows) and arm (columns): the mean over seeds (their range);
    the last column is the base's forwards per problem (a threshold policy's vary by model)."""
    cols = _columns(task_res)
    head = "| decoding | mode | " + " | ".join(_label(*c) for c in cols) + " | forwards (base) |"
    lines = [head, "|" + "---|" * (len(cols) + 3)]
    for key, mode in _decodings(task_res):
        cells = [_pct(_accuracies(task_res, arm, s, key, mode)) for arm, s in cols]
        fw = _accuracies(task_res, "base", None, key, mode, "forwards_per_problem")
        lines.append(f"| {key} | {mode} | " + " | ".join(cells) + (f" | {fw[0]:.1f} |" if fw else " | - |"))
    return "\n".join(lines)


def alpha_line(task_res: dict) -> str:
    parts = []
    for arm, s in _columns(task_res):
        alphas = [m["alpha"] for m in task_res["models"] if m["arm"] == arm and m["setting"] == s]
        parts.append(f"{_label(arm, s)} {', '.join(f'{a:g}' for a in alphas)}")
    return "alpha chosen on the validation problems: " + "; ".join(parts)


def contrast_table(task_res: dict, names=None) -> str:
    """One line per contrast: the mean difference in points with its paired 95% interval, the verdict,
    and per seed the difference and McNemar's p."""
    lines = ["| setting | decoding | contrast | difference, points [95% CI] | verdict | per seed (McNemar p) |",
             "|---|---|---|---|---|---|"]
    for c in task_res["contrasts"]:
        if names is not None and c["contrast"] not in names:
            continue
        per = ", ".join(f"{100 * s['diff']:+.1f} (p {s['p']:.2g})" for s in c["per_seed"])
        lines.append(f"| {c['setting'] or '-'} | {c['decoding']} | {c['contrast']} | {100 * c['diff']:+.1f} "
                     f"[{100 * c['ci'][0]:+.1f}, {100 * c['ci'][1]:+.1f}] | {c['verdict']} | {per} |")
    return "\n".join(lines)


def revision_table(task_res: dict) -> str:
    """EvoToken decodings: answers a revision turned wrong->right and right->wrong, and tokens revised,
    summed over seeds (out of problems x seeds)."""
    lines = ["| arm | decoding | wrong->right | right->wrong | tokens revised | answers |", "|---|---|---|---|---|---|"]
    for arm, s in _columns(task_res):
        for key, mode in _decodings(task_res):
            if mode != "evotoken":
                continue
            ds = [d for m in task_res["models"] if m["arm"] == arm and m["setting"] == s
                  for d in m["decodings"] if d["key"] == key and d["setting"]["mode"] == mode]
            lines.append(f"| {_label(arm, s)} | {key} | {sum(d['wrong_to_right'] for d in ds)} | "
                         f"{sum(d['right_to_wrong'] for d in ds)} | {sum(d['revised_tokens'] for d in ds)} | "
                         f"{sum(d['n'] for d in ds)} |")
    return "\n".join(lines)


def _task_header(t: dict) -> str:
    b = t["base_train"]
    cfg = b.get("config", {})
    return (f"## {t['role']} task {t['task']['task']} {({k: v for k, v in t['task'].items() if k != 'task'})}\n"
            f"base: {cfg.get('parameters', '?')} parameters, {b['steps']} steps, final loss "
            f"{b['final_loss']:.3f}{' (reused)' if t['base_reused'] else ''}; {t['n_test']} test problems, "
            f"{t['n_val']} validation problems; {t['seconds']:.0f} s")


def render(payload: dict) -> str:
    env, cfg = payload["env"], payload["config"]
    out = [f"evofast bench quality: {env['device']} ({payload['device']}, {env['cores']} cores, "
           f"{env['torch_threads']} torch threads), torch {env['torch']}, commit {(env['commit'] or 'none')[:12]}"
           f"{' (dirty)' if env['dirty'] else ''}, {env['time_utc']}",
           f"{cfg['seeds']} fine-tune seeds per arm, {cfg['ft_steps']} steps of {cfg['ft_batch']} (LoRA r "
           f"{cfg['lora_r']} on q/k/v at lr {cfg['lora_lr']:g}; full at lr {cfg['full_lr']:g}); k_soft "
           f"{cfg['k_soft']}; {payload['seconds'] / 60:.1f} min in all"
           + (f", other processes used {100 * payload['other_cpu']:.0f}% of the cores" if payload.get("other_cpu")
              is not None else "")]
    for t in payload["tasks"]:
        out += ["", _task_header(t), "", "accuracy, % (mean over seeds, their range):", accuracy_table(t), "",
                alpha_line(t), "", "paired contrasts (b - a, same problems; verdict only when the interval "
                "excludes 0):", contrast_table(t), "", "revisions (EvoToken):", revision_table(t)]
        if t.get("exported"):
            e = t["exported"]
            out += ["", f"exported {e['path']}: accuracy {100 * e['accuracy']:.1f}% on {e['n']} test problems "
                    f"({e['decoding']})"]
    return "\n".join(out)


def plot(payload: dict, path) -> Path:
    """Per task, the main contrasts with their paired 95% intervals, one row per setting and decoding."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..bench._common import save_figure

    tasks = payload["tasks"]
    rows = [[c for c in t["contrasts"] if c["contrast"] in MAIN_CONTRASTS] for t in tasks]
    fig, axes = plt.subplots(1, len(tasks), figsize=(7 * len(tasks), 0.22 * max(len(r) for r in rows) + 1.5),
                             squeeze=False)
    colours = dict(zip(MAIN_CONTRASTS, ("#d62728", "#bcbd22", "#1f77b4")))
    for ax, t, cs in zip(axes[0], tasks, rows):
        y = list(range(len(cs)))[::-1]
        for yi, c in zip(y, cs):
            lo, hi = 100 * c["ci"][0], 100 * c["ci"][1]
            ax.errorbar(100 * c["diff"], yi, xerr=[[100 * c["diff"] - lo], [hi - 100 * c["diff"]]], fmt="o",
                        color=colours[c["contrast"]], capsize=2, ms=4)
        ax.axvline(0, color="black", lw=0.8)
        ax.set_yticks(y)
        ax.set_yticklabels([f"{c['setting']} {c['decoding']} {c['contrast']}" for c in cs], fontsize=6)
        ax.set_xlabel("difference, accuracy points (paired 95% CI over problems, mean over seeds)")
        ax.set_title(f"{t['role']}: {t['task']['task']} ({t['n_test']} problems, {payload['config']['seeds']} seeds)",
                     fontsize=9)
    return save_figure(fig, path)
