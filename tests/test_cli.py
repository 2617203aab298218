"""The `evofast` command line: `bench ops` runs, prints its table and writes the documented JSON."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

ENV_KEYS = {"device", "device_type", "cpu", "cores", "torch_threads", "peak_bandwidth_gbs", "python", "torch",
            "cuda", "triton", "evofast", "evofast_backends", "commit", "dirty", "time_utc", "command"}
ROW_KEYS = {"op", "shape", "B", "provider", "median_ms", "p20_ms", "p80_ms", "reps", "speedup", "gbs", "check"}


def _evofast(*args, timeout=300):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    return subprocess.run([sys.executable, "-m", "evofast", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_bench_ops_tiny_table_and_json(tmp_path):
    out = tmp_path / "ops.json"
    res = _evofast("bench", "ops", "--shape", "tiny", "--device", "cpu", "--budget", "0.02", "--json", str(out))
    assert res.returncode == 0, res.stderr
    lines = res.stdout.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("op "))
    for col in ("provider", "median ms", "p20 ms", "p80 ms", "speedup", "GB/s"):
        assert col in lines[head]
    table = "\n".join(lines[head:])
    for provider in ("authors-eager", "eager-rows", "evofast-torch", "spec-autograd"):
        assert provider in table
    assert "first block" in res.stdout

    data = json.loads(out.read_text())
    assert data["benchmark"] == "evofast.bench.ops"
    assert ENV_KEYS <= set(data["env"]), ENV_KEYS - set(data["env"])
    assert data["env"]["cores"] >= 1 and data["env"]["command"][-1] == str(out)
    assert data["config"]["shape"] == "tiny" and data["config"]["batches"] == [1, 2]
    timed = [r for r in data["rows"] if not r.get("skipped")]
    assert {r["op"] for r in timed} == {"evo_step", "soft_embed fwd", "soft_embed fwd+bwd"}
    for r in timed:
        assert ROW_KEYS - {"gbs"} <= set(r), ROW_KEYS - set(r)
        assert r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
        assert r["check"] == "ok", r
    authors = [r for r in timed if r["provider"] == "authors-eager"]
    assert authors and all(r["speedup"] == pytest.approx(1.0) for r in authors)
    assert all(r["gbs"] > 0 for r in timed if r["op"] == "evo_step")
    skipped = {r["provider"]: r["note"] for r in data["rows"] if r.get("skipped")}
    assert "compiled-rows" in skipped          # left out of the tiny shape unless --compile
    assert "evofast-triton" in skipped         # never timed on CPU tensors
    last = lines[-1]                           # a one-line summary for a newcomer ends the output
    assert last.startswith("evo_step: ") and "the authors' post-processing on this CPU" in last
    best = max((r for r in timed if r["op"] == "evo_step" and r["B"] == 1 and r["provider"].startswith("evofast-")),
               key=lambda r: r["speedup"])
    assert f"({best['provider']}, batch 1" in last


def test_bench_ops_summary_line():
    import torch

    from evofast.bench import ops
    rows = [{"op": "evo_step", "provider": "authors-eager", "B": 1, "speedup": 1.0, "median_ms": 2.0},
            {"op": "evo_step", "provider": "evofast-torch", "B": 1, "speedup": 2.0, "median_ms": 1.0},
            {"op": "evo_step", "provider": "evofast-cpp", "B": 1, "speedup": 4.0, "median_ms": 0.5},
            {"op": "evo_step", "provider": "evofast-cpp", "B": 8, "speedup": 9.0, "median_ms": 0.4},
            {"op": "soft_embed fwd", "provider": "evofast-cpp", "B": 1, "speedup": 20.0, "median_ms": 0.1}]
    shape = ops.SHAPES["tiny"]
    assert ops.summary(rows, shape, torch.device("cpu")) == (
        "evo_step: 4.0x faster than the authors' post-processing on this CPU (evofast-cpp, batch 1, "
        "vocabulary 1,000, 0.500 ms per step)")
    rows[2]["speedup"] = 0.5
    assert "2.0x slower than" in ops.summary(rows[2:3], shape, torch.device("cuda"))
    assert ops.summary(rows[:1], shape, torch.device("cpu")) is None


def test_bench_ops_selects_providers():
    res = _evofast("bench", "ops", "--shape", "tiny", "--device", "cpu", "--repeat", "3", "--warmup", "1",
                   "--backends", "eager-rows", "torch", "--batch", "1", "--no-soft-embed")
    assert res.returncode == 0, res.stderr
    table = res.stdout.split("\n\n", 1)[1]
    assert "eager-rows" in table and "evofast-torch" in table and "authors-eager" not in table


def test_cli_rejects_unknown_names():
    assert _evofast("bench", "nope").returncode != 0
    res = _evofast("bench", "ops", "--shape", "tiny", "--backends", "nope")
    assert res.returncode != 0 and "unknown provider" in res.stderr


def test_cli_parser_in_process():
    from evofast.cli import build_parser
    args = build_parser().parse_args(["bench", "ops", "--shape", "tiny", "--json", "x.json"])
    assert args.benchmark == "ops" and args.shape == "tiny" and args.json == "x.json"


def test_peak_bandwidth_table_and_quantiles():
    from types import SimpleNamespace

    from evofast.bench._common import format_table, peak_bandwidth_of, percentile

    def peak(name, **kw):
        return peak_bandwidth_of(SimpleNamespace(name=name, **kw))[0]

    assert peak("NVIDIA H100 80GB HBM3") == 3.35e12
    assert peak("NVIDIA H100 PCIe") == 2.0e12
    assert peak("NVIDIA H200") == 4.8e12
    assert peak("NVIDIA A100-SXM4-80GB") == 2.0e12
    assert peak("Some Future GPU") is None
    assert peak("Some Future GPU", memory_clock_rate=2_619_000, memory_bus_width=5120) == pytest.approx(3.35e12, rel=0.01)
    xs = [5.0, 1.0, 3.0, 2.0, 4.0]
    assert percentile(xs, 0.5) == 3.0 and percentile(xs, 0.2) == pytest.approx(1.8) and percentile(xs, 0.8) == 4.2
    table = format_table([{"a": "x", "b": 1.23456}, {"a": "yy"}], [("a", "A"), ("b", "B")])
    assert table.splitlines()[2].split() == ["x", "1.23"] and table.splitlines()[3].split() == ["yy", "-"]


def test_a_broken_command_does_not_break_the_others(monkeypatch, capsys):
    from evofast import cli
    monkeypatch.setitem(cli.BENCHMARKS, "broken", "evofast.no_such_module")
    parser = cli.build_parser()
    assert parser.parse_args(["bench", "ops", "--shape", "tiny"]).shape == "tiny"
    assert cli.main(["bench", "broken", "--x"]) == 2
    assert "unavailable" in capsys.readouterr().err
