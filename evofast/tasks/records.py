"""Reading a benchmark's records: a local .jsonl / .json / .parquet file, or anything
`datasets.load_dataset` opens (a hub name such as "openai/gsm8k", a local dataset folder).

Every record comes back with where it was found ("line 3", "record 3", "row 3"), so a
task can name the exact place of a bad record.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional, Tuple

__all__ = ["read_records", "FILE_SUFFIXES", "EXTRA"]

FILE_SUFFIXES = (".jsonl", ".json", ".parquet")
EXTRA = "pip install 'evofast[eval]'"          # datasets, with pyarrow for parquet


def read_records(source, *, config: Optional[str] = None, split: str = "test") -> List[Tuple[str, dict]]:
    """`[(where, record), ...]` of a local file (by suffix) or, when `source` is not an
    existing file, of `datasets.load_dataset(source, config, split=split)`."""
    if not isinstance(source, (str, Path)) or not str(source):
        raise ValueError(f"path: expected a file path or a dataset name, got {source!r}")
    path = Path(source)
    if path.is_file():
        if path.suffix not in FILE_SUFFIXES:
            raise ValueError(f"path: {path} is not a {' / '.join(FILE_SUFFIXES)} file")
        reader = {".jsonl": _jsonl, ".json": _json, ".parquet": _parquet}[path.suffix]
        rows = reader(path)
    elif path.suffix in FILE_SUFFIXES:
        raise ValueError(f"path: no such file: {path}")
    else:
        rows = _hub(str(source), config, split)
    if not rows:
        raise ValueError(f"path: {source} holds no records")
    return rows


def _jsonl(path: Path, text: Optional[str] = None) -> list:
    rows = []
    lines = (path.read_text(encoding="utf-8") if text is None else text).splitlines()
    for n, line in enumerate(lines, 1):
        if line.strip():
            try:
                rows.append((f"line {n}", json.loads(line)))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: line {n}: not JSON ({e})") from None
    return rows


def _json(path: Path) -> list:
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":                  # JSON lines in a .json file (datasets' to_json writes those)
            return _jsonl(path, text)
        raise ValueError(f"{path}: not JSON ({e})") from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of records (or JSON lines), got a {type(data).__name__}")
    return [(f"record {n}", r) for n, r in enumerate(data, 1)]


def _parquet(path: Path) -> list:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(f"reading {path} needs pyarrow (installed with datasets): {EXTRA}") from None
    return [(f"row {n}", r) for n, r in enumerate(pq.read_table(path).to_pylist(), 1)]


def _hub(name: str, config: Optional[str], split: str) -> list:
    try:
        import datasets
    except ImportError:
        raise ImportError(f"path: {name!r} is not a file; loading it with datasets.load_dataset needs "
                          f"datasets: {EXTRA}") from None
    try:
        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:                         # offline, unknown name, bad config or split...
        raise OSError(f"path: {name!r} is not a file and datasets.load_dataset({name!r}, {config!r}, "
                      f"split={split!r}) failed ({type(e).__name__}: {e}); without network access, "
                      f"download the file and pass its path") from e
    return [(f"row {n}", dict(r)) for n, r in enumerate(ds, 1)]
