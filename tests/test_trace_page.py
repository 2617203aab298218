"""The trace page (`evofast.trace.to_html`): one self-contained file built from package data."""
from __future__ import annotations

import fnmatch
import json
import re
from importlib import resources
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from evofast.generation import generate  # noqa: E402
from evofast.models import llada  # noqa: E402
from evofast.trace import to_html  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PAGE_FILES = ("page.html", "page.css", "page.js")
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model():
    return llada.tiny(vocab_size=300, d_model=32, n_layers=2, n_heads=4, seed=1)


def _trace(model, mode, gen_length=96, block_length=32, steps=6):
    """Two left-padded prompts; ids as text (no tokenizer): a long run of tokens without spaces."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, int(model.config.mask_token_id), (2, 5), generator=g)
    am = torch.ones_like(ids)
    ids[1, :2], am[1, :2] = 0, 0
    _, trace = generate(model, ids, am, gen_length=gen_length, block_length=block_length, steps=steps, mode=mode,
                        return_trace=True)
    return trace


def _data(page: str) -> dict:
    return json.loads(re.search(r'<script type="application/json" id="trace-data">(.*?)</script>', page, re.S).group(1))


# --------------------------------------------------------------------------- the file
def test_page_is_one_file_with_the_package_data_inlined(model):
    trace = _trace(model, "evotoken", gen_length=8, block_length=4, steps=4)
    page = to_html(trace)
    folder = resources.files("evofast") / "trace_page"
    css, js = ((folder / name).read_text(encoding="utf-8") for name in ("page.css", "page.js"))
    assert css in page and js in page
    assert not re.search(r"__(TITLE|CSS|JS|DATA)__", page)
    assert page.count("<style>") == 1 and page.count("<script") == 2 and page.count("</script>") == 2
    assert not re.search(r"""(src|href)\s*=|https?://|@import""", page), "the page must load nothing"


def test_page_files_ship_in_the_wheel():
    """pyproject's package data names every file of evofast/trace_page (a wheel holds only those)."""
    tomllib = pytest.importorskip("tomllib")
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    patterns = [f"evofast/{p}" for p in config.get("evofast", [])]
    files = sorted(p.name for p in (ROOT / "evofast" / "trace_page").iterdir() if p.is_file())
    assert set(PAGE_FILES) <= set(files)
    for name in files:
        assert any(fnmatch.fnmatch(f"evofast/trace_page/{name}", p) for p in patterns), name


def test_title_and_token_text_cannot_break_the_page(model):
    class Hostile:
        def decode(self, ids, skip_special_tokens=False):
            return "</script><!--<script>__JS__"

    trace = _trace(model, "evotoken", gen_length=8, block_length=4, steps=4)
    page = to_html(trace, Hostile(), title="__DATA__ </title><b>")
    assert page.count("</script>") == 2 and "<b>" not in page
    assert "__DATA__ &lt;/title&gt;&lt;b&gt;" in page
    data = _data(page)
    assert set(data["vocab"].values()) - {"[M]"} == {"</script><!--<script>__JS__"}
    assert len(data["rows"][0]["steps"]) == 5
