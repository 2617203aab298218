"""Where a CTS run writes, and what it writes there.

* `check_output_dir`: the output directory is checked before anything is loaded:
  it must not be a file, the input model's directory (or hold it, or lie inside
  it), or a non-empty directory unless the caller overwrites it or resumes from
  its checkpoints; its nearest existing ancestor must be writable.
* `publish`: the final model is written to a temporary directory beside the
  output and renamed into place, so an interrupted save never leaves a
  directory that looks like a model. Into a directory that already holds
  checkpoints the files are moved one by one, the config last (a directory
  without its config does not load).
* `save_model`: weights (`save_pretrained`), the tokenizer (evofast's character
  tokenizer of `--model tiny` as an equivalent transformers tokenizer, so
  `AutoTokenizer.from_pretrained` loads it) and the task file of the source model.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

#: transformers' checkpoint folders (`Trainer`'s `checkpoint-<global step>`)
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
#: where `CTSTrainer` writes a checkpoint before renaming it into the output directory
STAGING = ".incomplete-checkpoints"
#: moved last by `publish`: without them a directory does not load as a model / adapter
LAST_FILES = ("config.json", "adapter_config.json")


def checkpoints(folder) -> list:
    """The complete checkpoint folders of `folder`, oldest first (staged ones are not listed)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if p.is_dir() and (m := CHECKPOINT_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def last_checkpoint(folder) -> Optional[Path]:
    found = checkpoints(folder)
    return found[-1] if found else None


def check_output_dir(out, *, inputs: Iterable = (), overwrite: bool = False, resume: bool = False,
                     names: Sequence[str] = ("output_dir", "overwrite", "resume")) -> Optional[Path]:
    """The output directory as a Path (None when `out` is None), or ValueError naming the
    argument (`names`: how the caller calls out, overwrite and resume).

    `inputs`: paths the run reads (the model directory); the output may neither be
    one of them, nor contain one, nor lie inside one. `resume`: the directory must
    hold a complete checkpoint. `overwrite`: a non-empty directory is accepted (its
    old checkpoints are removed when training starts, files of the same names are
    replaced by the new model's, nothing else is touched)."""
    name, o_name, r_name = names
    if out is None:
        if resume:
            raise ValueError(f"{r_name}: needs {name}, the directory whose checkpoints to continue from")
        return None
    if overwrite and resume:
        raise ValueError(f"{o_name} / {r_name}: choose one ({r_name} continues the run in the directory, "
                         f"{o_name} starts a new one there)")
    path = Path(out).expanduser()
    if path.exists() and not path.is_dir():
        raise ValueError(f"{name} {out}: is a file, not a directory")
    real = path.resolve()
    for src in inputs:
        if src is None or not Path(src).expanduser().exists():
            continue
        s = Path(src).expanduser().resolve()
        if s == real or real in s.parents or s in real.parents:
            raise ValueError(f"{name} {out}: must lie outside the input model directory {src} (it would "
                             "overwrite or mix with the model being read)")
    if resume:
        if last_checkpoint(path) is None:
            raise ValueError(f"{r_name}: {out} holds no complete checkpoint (a run writes checkpoint-N folders "
                             "there when it saves checkpoints)")
    elif path.is_dir() and any(path.iterdir()) and not overwrite:
        raise ValueError(f"{name} {out}: the directory is not empty; choose a new directory, pass {o_name} to "
                         "write into it" + (f", or {r_name} to continue from its checkpoints" if r_name else ""))
    anc = path
    while not anc.exists():
        anc = anc.parent
    if not os.access(anc, os.W_OK | os.X_OK):
        raise ValueError(f"{name} {out}: {anc} is not writable")
    return path


def clear_checkpoints(out: Path) -> None:
    """Remove the checkpoints (complete and staged) of an earlier run in `out` (overwrite)."""
    for p in checkpoints(out):
        shutil.rmtree(p)
    shutil.rmtree(Path(out) / STAGING, ignore_errors=True)


def publish(out, write: Callable[[Path], None]) -> Path:
    """Run `write(tmp)` on a fresh temporary directory beside `out`, then move the result into `out`
    (one rename when `out` is absent or empty; else file by file, `LAST_FILES` last). On failure
    the temporary directory is removed and `out` is untouched."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        write(tmp)
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        if not out.exists():
            os.replace(tmp, out)
            return out
        for f in sorted(tmp.iterdir(), key=lambda p: p.name in LAST_FILES):
            dest = out / f.name
            if dest.is_dir() and not f.is_dir():
                raise ValueError(f"output_dir: {dest} is a directory, the model needs that name for a file")
            if dest.is_dir():
                shutil.rmtree(dest)
            os.replace(f, dest)
        tmp.rmdir()
        return out
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def savable_tokenizer(tok):
    """`tok` when it can `save_pretrained` (what `AutoTokenizer.from_pretrained` loads back), else None."""
    return tok if callable(getattr(tok, "save_pretrained", None)) else None


@contextlib.contextmanager
def progress_bars(enabled: bool):
    """transformers' own progress bars (e.g. writing model shards) on or off for the block."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()
    try:
        yield
    finally:
        (hf_logging.enable_progress_bar if was else hf_logging.disable_progress_bar)()


def save_model(model, tokenizer, out, *, source_dir=None, progress: bool = True, state_dict=None) -> Path:
    """`model.save_pretrained` (of `state_dict` when given: a sharded model's gathered weights), the
    tokenizer and the source model's task file, published into `out`."""
    from ..tasks import TASK_FILE

    tok = savable_tokenizer(tokenizer)
    if tok is None:
        raise ValueError(f"tokenizer: {type(tokenizer).__name__} cannot be saved (no save_pretrained); a model "
                         "saved without its tokenizer cannot be loaded by path")
    task = Path(source_dir) / TASK_FILE if source_dir is not None else None

    def write(tmp: Path) -> None:
        with progress_bars(progress):
            model.save_pretrained(tmp, state_dict=state_dict)
        tok.save_pretrained(tmp)
        if task is not None and task.is_file():
            shutil.copyfile(task, tmp / TASK_FILE)

    return publish(out, write)
