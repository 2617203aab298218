"""Headless Chromium for the tests of the trace page (skipped where it is not installed)."""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Optional

import pytest

# Without the background-networking switches a headless Chromium tries the network at start-up
# and can stall on a machine without it; --no-sandbox because CI runs as root.
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def chromium() -> Optional[str]:
    """The browser's path, or None."""
    for path in ("/usr/bin/chromium", shutil.which("chromium"), shutil.which("chromium-browser")):
        if path and os.path.exists(path):
            return path
    return None


def run(page: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Chromium on the local file `page` with `args`, in a fresh profile; skips the test without it."""
    browser = chromium()
    if browser is None:
        pytest.skip("chromium is not installed")
    with tempfile.TemporaryDirectory() as profile:
        return subprocess.run([browser, *FLAGS, f"--user-data-dir={profile}", *args, Path(page).resolve().as_uri()],
                              capture_output=True, text=True, timeout=timeout)


def dump_dom(page: Path, width: int = 1400, height: int = 900) -> str:
    """The page's DOM after its scripts ran, at a window of width x height."""
    return run(page, f"--window-size={width},{height}", "--dump-dom").stdout


def screenshot(page: Path, png: Path, width: int = 1400, height: int = 900) -> Path:
    res = run(page, f"--window-size={width},{height}", f"--screenshot={png}")
    assert png.exists(), res.stderr[-2000:]
    return png
