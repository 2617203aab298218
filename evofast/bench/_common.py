"""What every evofast benchmark shares: timing, the device's peak bandwidth, the
environment record, the table on stdout and the JSON file.

Timing (`measure`): warm-up calls, then N timed calls, N fixed (`--repeat`) or set
by a time budget; each call is preceded by an untimed `setup` (state reset, an
optional L2 flush on CUDA). On CUDA each call is bracketed by CUDA events on the
current stream, so host work in `setup` is not counted but queued device work of
the call is; on the CPU it is `time.perf_counter` around the call. Reported:
median, p20 and p80 in milliseconds.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import re
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from ..devices import pick_device, synchronize  # noqa: F401  (re-exported for the benchmarks)

SCHEMA_VERSION = 1
BUSY_THRESHOLD = 0.1     # share of all cores used by other processes above which a timing is "disturbed"

# Peak DRAM bandwidth in bytes/s by device name (first match wins). torch does not
# expose the memory clock and bus width in every version, so known parts are listed.
_PEAK_BANDWIDTH = (
    (r"H200", 4.8e12),
    (r"H100.*PCIe", 2.0e12),
    (r"H100.*NVL", 3.9e12),
    (r"H100", 3.35e12),          # SXM5 ("NVIDIA H100 80GB HBM3")
    (r"A100.*80GB", 2.0e12),
    (r"A100", 1.555e12),         # 40GB parts
    (r"L40S", 0.864e12),
    (r"L4\b", 0.3e12),
)


# --------------------------------------------------------------------------- timing
@dataclass
class Timing:
    """Seconds per call of `reps` timed calls."""
    times_s: list = field(repr=False)
    warmup: int = 0
    other_cpu: Optional[float] = None    # share of the cores used by other processes while timing
    attempts: int = 1                     # timed loops run (more than one when others kept the CPU busy)

    @property
    def reps(self) -> int:
        return len(self.times_s)

    def quantile_ms(self, q: float) -> float:
        return percentile(self.times_s, q) * 1e3

    @property
    def median_ms(self) -> float:
        return self.quantile_ms(0.5)

    @property
    def p20_ms(self) -> float:
        return self.quantile_ms(0.2)

    @property
    def p80_ms(self) -> float:
        return self.quantile_ms(0.8)

    def summary(self) -> dict:
        return {"median_ms": self.median_ms, "p20_ms": self.p20_ms, "p80_ms": self.p80_ms,
                "min_ms": min(self.times_s) * 1e3, "reps": self.reps, "warmup": self.warmup,
                "other_cpu": self.other_cpu, "attempts": self.attempts}


def percentile(xs: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile q in [0, 1] (numpy's default method)."""
    s = sorted(xs)
    if not s:
        raise ValueError("percentile of an empty sequence")
    pos = q * (len(s) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def reset_peak_memory(device: torch.device) -> Optional[int]:
    """Start tracking the peak of CUDA memory; returns the bytes allocated now (None on the CPU)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def peak_memory_since(device: torch.device, start: Optional[int]) -> Optional[float]:
    """MiB of CUDA memory allocated on top of `start` at the peak since `reset_peak_memory`."""
    if start is None:
        return None
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - start) / 2**20


class _L2Flusher:
    """Zeroes a buffer larger than the L2 cache before each timed call (CUDA only)."""

    def __init__(self, device: torch.device):
        size = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0) or 64 << 20
        self.buf = torch.empty(2 * size, dtype=torch.uint8, device=device)

    def __call__(self):
        self.buf.zero_()


def measure(fn: Callable[[], object], *, device: torch.device, setup: Optional[Callable[[], object]] = None,
            warmup: int = 2, repeat: Optional[int] = None, budget_s: float = 1.0,
            min_repeat: int = 5, max_repeat: int = 1000, cold_l2: bool = False,
            retry_busy: int = 0) -> Timing:
    """Time `fn()`; `setup()` runs untimed before every call (warm-up calls included).

    `repeat` fixes the number of timed calls; otherwise as many as fit in `budget_s`
    (estimated from the warm-up calls), within [min_repeat, max_repeat]. When other
    processes used more than BUSY_THRESHOLD of the cores meanwhile, the timed calls
    are run again up to `retry_busy` times and the least disturbed set is kept.
    """
    device = torch.device(device)
    flush = _L2Flusher(device) if (cold_l2 and device.type == "cuda") else None
    warm_s = []
    spent = 0.0
    # at least `warmup` calls; short calls keep warming up for 5% of the budget (at most 100 calls)
    while len(warm_s) < max(1, warmup) or (repeat is None and spent < 0.05 * budget_s and len(warm_s) < 100):
        if setup is not None:
            setup()
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        warm_s.append(time.perf_counter() - t0)
        spent += warm_s[-1]
    if repeat is None:
        est = max(percentile(warm_s[len(warm_s) // 2:], 0.5), 1e-7)
        repeat = int(min(max(budget_s / est, min_repeat), max_repeat))
    repeat = max(1, int(repeat))

    best = None
    for attempt in range(1 + max(0, retry_busy)):
        if attempt:
            time.sleep(1.0)                   # let the other processes' burst pass
        t = _timed_loop(fn, setup, flush, device, repeat)
        t.warmup, t.attempts = len(warm_s), attempt + 1
        if best is None or (t.other_cpu or 0.0) < (best.other_cpu or 0.0):
            best = t
        if (best.other_cpu or 0.0) <= BUSY_THRESHOLD:
            break
    return best


def _timed_loop(fn, setup, flush, device: torch.device, repeat: int) -> Timing:
    contention = CpuContention()
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(repeat)]
        for start, end in events:
            if setup is not None:
                setup()
            if flush is not None:
                flush()
            start.record()
            fn()
            end.record()
        synchronize(device)
        times = [start.elapsed_time(end) * 1e-3 for start, end in events]
    else:
        times = []
        for _ in range(repeat):
            if setup is not None:
                setup()
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return Timing(times, other_cpu=contention.other_fraction())


# --------------------------------------------------------------------------- device
def peak_bandwidth(device: torch.device) -> tuple[Optional[float], str]:
    """(peak DRAM bytes/s or None, where the figure comes from) for a CUDA device."""
    device = torch.device(device)
    if device.type != "cuda":
        return None, "unknown (CPU)"
    return peak_bandwidth_of(torch.cuda.get_device_properties(device))


def peak_bandwidth_of(props) -> tuple[Optional[float], str]:
    """From CUDA device properties: the table by name, else memory clock x bus width if exposed."""
    for pattern, peak in _PEAK_BANDWIDTH:
        if re.search(pattern, props.name, re.IGNORECASE):
            return peak, f"table ({pattern})"
    clock_khz = getattr(props, "memory_clock_rate", None)
    bus_bits = getattr(props, "memory_bus_width", None)
    if clock_khz and bus_bits:   # double data rate
        return 2.0 * clock_khz * 1e3 * bus_bits / 8, "memory clock x bus width"
    return None, "unknown"


def device_name(device: torch.device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return cpu_model()


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


# --------------------------------------------------------------------------- environment
def _version(dist: str) -> Optional[str]:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def git_state(path: Optional[Path] = None) -> dict:
    """{"commit": sha or None, "dirty": bool or None} of the tree holding `path`."""
    path = Path(path or Path(__file__).resolve().parent)

    def git(*args):
        return subprocess.run(["git", "-C", str(path), *args], capture_output=True, text=True, timeout=10)

    try:
        head = git("rev-parse", "HEAD")
        commit = head.stdout.strip() if head.returncode == 0 else None
        status = git("status", "--porcelain", "--untracked-files=no")
        dirty = bool(status.stdout.strip()) if status.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, None
    return {"commit": commit, "dirty": dirty}


def command_line() -> list[str]:
    """argv as typed: `python -m evofast ...` when run as a module."""
    prog = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python"
    if prog == "__main__.py":
        prog = "python -m evofast"
    return [prog, *sys.argv[1:]]


class CpuContention:
    """How much CPU time processes other than this one used since construction.

    From /proc/stat (all CPUs busy time, hypervisor steal included) minus this
    process's own user + system time; None where /proc/stat is missing.
    """

    def __init__(self):
        self.start = self._sample()

    @staticmethod
    def _sample():
        try:
            with open("/proc/stat") as f:
                vals = [int(v) for v in f.readline().split()[1:9]]
        except (OSError, ValueError):
            return None
        idle = vals[3] + (vals[4] if len(vals) > 4 else 0)          # idle + iowait
        busy_s = (sum(vals) - idle) / os.sysconf("SC_CLK_TCK")
        t = os.times()
        return busy_s, t.user + t.system, time.monotonic()

    def other_fraction(self) -> Optional[float]:
        """Share of all cores' time used by other processes (0..1)."""
        end = self._sample()
        if self.start is None or end is None:
            return None
        wall = end[2] - self.start[2]
        if wall <= 0:
            return None
        other = (end[0] - self.start[0]) - (end[1] - self.start[1])
        return min(max(other / (wall * (os.cpu_count() or 1)), 0.0), 1.0)


def environment(device: torch.device) -> dict:
    """Hardware, versions, commit and time: what makes a figure reproducible."""
    import evofast

    device = torch.device(device)
    peak, peak_src = peak_bandwidth(device)
    env = {
        "device": device_name(device),
        "device_type": device.type,
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "peak_bandwidth_gbs": None if peak is None else peak / 1e9,
        "peak_bandwidth_source": peak_src,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": _version("triton"),
        "evofast": evofast.__version__,
        "evofast_backends": evofast.ops.backends(),
        **git_state(),
        "time_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command_line(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "env_vars": {k: os.environ[k] for k in ("EVOFAST_BACKEND", "TRITON_INTERPRET", "OMP_NUM_THREADS",
                                                 "CUDA_VISIBLE_DEVICES") if k in os.environ},
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["gpu_capability"] = f"{props.major}.{props.minor}"
        env["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        env["gpu_sm_count"] = props.multi_processor_count
    return env


# --------------------------------------------------------------------------- output
def fmt(v) -> str:
    """A table cell: about three significant digits, no exponent above 1e-4."""
    if v is None:
        return "-"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, float):
        a = abs(v)
        if v != v:
            return "nan"
        if a >= 100:
            return f"{v:,.0f}"
        if a >= 10:
            return f"{v:.1f}"
        if a >= 1:
            return f"{v:.2f}"
        return f"{v:.3g}"
    return str(v)


def format_table(rows: Sequence[dict], columns: Sequence[tuple[str, str]]) -> str:
    """A plain-text table: columns are (key, header) pairs; missing values print '-'."""
    cells = [[fmt(r.get(k)) for k, _ in columns] for r in rows]
    heads = [h for _, h in columns]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, h in enumerate(heads)]
    right = [any(isinstance(r.get(k), (int, float)) for r in rows) for k, _ in columns]

    def line(vals):
        return "  ".join(v.rjust(w) if rj else v.ljust(w) for v, w, rj in zip(vals, widths, right)).rstrip()

    out = [line(heads), line(["-" * w for w in widths])]
    out += [line(c) for c in cells]
    return "\n".join(out)


def write_json(path: str | os.PathLike, payload: dict) -> Path:
    path = Path(path)
    if path.parent and not path.parent.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=_json_default) + "\n")
    return path


def _json_default(o):
    if isinstance(o, (torch.dtype, torch.device)):
        return str(o)
    if hasattr(o, "__dataclass_fields__"):
        return asdict(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def add_common_arguments(parser: argparse.ArgumentParser, *, shapes: Sequence[str], shape_help: str) -> None:
    """Options every `evofast bench <name>` accepts."""
    parser.add_argument("--shape", choices=list(shapes), default=None, help=shape_help)
    parser.add_argument("--json", metavar="FILE", default=None,
                        help="also write the environment and every row to this JSON file")
    parser.add_argument("--device", default="auto", help="cpu | cuda | cuda:N (default: cuda when available)")
    parser.add_argument("--repeat", type=int, default=None, metavar="N",
                        help="timed calls per measurement (default: as many as fit in --budget)")
    parser.add_argument("--warmup", type=int, default=2, metavar="N", help="untimed calls first (default 2)")
    parser.add_argument("--budget", type=float, default=None, metavar="SECONDS",
                        help="time budget of one measurement when --repeat is not given")
    parser.add_argument("--retry-busy", type=int, default=None, metavar="N",
                        help="re-time a measurement up to N times while other processes use more than "
                             f"{int(100 * BUSY_THRESHOLD)}%% of the cores, keeping the least disturbed "
                             "(default 3; 0 for the tiny shape)")
    parser.add_argument("--cold-l2", action="store_true",
                        help="flush the GPU L2 cache before every timed call (ignored on the CPU)")


def save_figure(fig, path) -> Path:
    """Lay out a matplotlib figure, write it as PNG to `path` (folders made), close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


class PeakMemory:
    """Peak memory of a region in MiB above its start: CUDA `max_memory_allocated`; CPU the
    resident set size, sampled every 2 ms by a thread (/proc/self/statm, else psutil)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.mib: Optional[float] = None

    @staticmethod
    def _rss() -> Optional[int]:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            try:
                import psutil
                return psutil.Process().memory_info().rss
            except Exception:                                 # noqa: BLE001
                return None

    def __enter__(self):
        if self.device.type == "cuda":
            self.start = reset_peak_memory(self.device)
            return self
        self.start = self._rss()
        self.peak = self.start
        self.stop = threading.Event()

        def sample():
            while not self.stop.wait(0.002):
                r = self._rss()
                if r is not None and r > self.peak:
                    self.peak = r
        self.thread = threading.Thread(target=sample, daemon=True)
        if self.start is not None:
            self.thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.mib = peak_memory_since(self.device, self.start)
            return
        if self.start is None:
            return
        self.stop.set()
        self.thread.join()
        r = self._rss()
        self.mib = (max(self.peak, r or 0) - self.start) / 2**20
