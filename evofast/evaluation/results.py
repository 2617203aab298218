"""The output directory of an evaluation run: nothing overwritten, nothing lost, resumable.

    out/run.json                    the settings every result depends on (model, adapter, task,
                                    data file and its hash, dtype, grid, seed, batch size ...)
    out/<config name>/rank<R>.jsonl one record per example, appended batch by batch by process R
    out/summary.json, summary.md    written when every configuration is complete
    out/authors/...                 with the authors' layout: their *_generations.json files

A rerun into the same directory with the same settings resumes: the examples already
in a configuration's files (any process's) are skipped. A rerun with other settings
is refused before any model is loaded. A crash loses at most the batch in flight (a
torn last line of a record file is dropped on the next run).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

__all__ = ["ResultStore", "write_json_atomic"]

RUN_FILE = "run.json"


def write_json_atomic(path: Path, obj) -> Path:
    """Write JSON to a temporary file beside `path`, then rename it into place."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    os.replace(tmp, path)
    return path


class ResultStore:
    """Record files of one run directory (see the module docstring)."""

    def __init__(self, out, settings: dict):
        self.out = Path(out)
        self.settings = json.loads(json.dumps(settings, default=str))   # as it will read back

    def claim(self) -> str:
        """Create or reuse the directory for these settings: "new" or "resume". ValueError when
        it holds another run (or is a file): nothing is written then."""
        if self.out.exists() and not self.out.is_dir():
            raise ValueError(f"--out: {self.out} exists and is not a directory")
        run = self.out / RUN_FILE
        if run.is_file():
            old = json.loads(run.read_text())
            diff = sorted(k for k in set(old) | set(self.settings) if old.get(k) != self.settings.get(k))
            if diff:
                shown = "; ".join(f"{k}: {old.get(k)!r} there, {self.settings.get(k)!r} now" for k in diff[:4])
                raise ValueError(f"--out: {self.out} holds a run with other settings ({shown}); "
                                 "resume it with the same settings or choose another --out")
            return "resume"
        if self.out.is_dir() and any(self.out.iterdir()):
            raise ValueError(f"--out: {self.out} is not empty and holds no evofast run ({RUN_FILE}); "
                             "choose another --out")
        self.out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(run, self.settings)
        return "new"

    def _dir(self, config_name: str) -> Path:
        return self.out / config_name

    def records(self, config_name: str) -> dict:
        """index -> record of every example done in this configuration, by any process."""
        done = {}
        for f in sorted(self._dir(config_name).glob("rank*.jsonl")):
            for line in f.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:                  # a torn last line: redone
                    continue
                done[int(rec["index"])] = rec
        return done

    def append(self, config_name: str, rank: int, records: Iterable[dict]) -> None:
        """Append records to this process's file and flush them to disk."""
        d = self._dir(config_name)
        d.mkdir(parents=True, exist_ok=True)
        path = d / f"rank{rank}.jsonl"
        _drop_torn_line(path)
        with open(path, "a") as f:
            for rec in records:
                f.write(json.dumps(rec, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())


def _drop_torn_line(path: Path) -> None:
    """Cut a last line that a crash left without its newline (its record is redone)."""
    if not path.is_file():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)
