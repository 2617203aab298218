"""The trace page (`evofast.trace.to_html`): one self-contained file built from package data, and what
it shows, checked in headless Chromium where it is installed (the DOM after the script ran, a screenshot)."""
from __future__ import annotations

import fnmatch
import json
import re
from html.parser import HTMLParser
from importlib import resources
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

import _chromium  # noqa: E402

from evofast.generation import generate  # noqa: E402
from evofast.models import llada  # noqa: E402
from evofast.trace import SOFT, STATE_NAMES, to_html  # noqa: E402

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


# --------------------------------------------------------------------------- in the browser
class _Dom(HTMLParser):
    """The grid cells' attributes and the text of the elements with an id."""

    def __init__(self, dom: str):
        super().__init__()
        self.cells, self.text, self.attrs, self._open = [], {}, {}, []
        self.feed(dom)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "td" and "cell" in a.get("class", "").split():
            self.cells.append(a)
        if "id" in a:
            self.attrs[a["id"]] = a
            self.text[a["id"]] = ""
            self._open.append((tag, a["id"]))
        elif self._open and self._open[-1][0] == tag:
            self._open.append((tag, None))

    def handle_endtag(self, tag):
        if self._open and self._open[-1][0] == tag:
            self._open.pop()

    def handle_data(self, data):
        for _, ident in self._open:
            if ident is not None:
                self.text[ident] += data


# Appended to a copy of the page: what overflows its box at the browser's window width.
_PROBE = """<script>
const wide = [...document.querySelectorAll(".text, .prompt, .legend, #meta")]
  .filter((e) => e.scrollWidth > e.clientWidth + 1).map((e) => e.className || e.id);
if (document.documentElement.scrollWidth > window.innerWidth) wide.push("page");
const probe = document.createElement("div");
probe.id = "probe";
probe.textContent = "overflow:" + wide.join(",") + "; textwidth:" + document.querySelector(".text").scrollWidth;
document.body.appendChild(probe);
</script>
</body>"""


def _render(trace, path: Path, probe: bool = False) -> _Dom:
    page = to_html(trace)
    path.write_text(page.replace("</body>", _PROBE) if probe else page, encoding="utf-8")
    dom = _Dom(_chromium.dump_dom(path, 1400, 900))
    assert dom.attrs.get("trace-error") is None, dom.text.get("trace-error")
    return dom


def _expected_marks(trace, b):
    """(step, position) -> "tr" (token chosen at that step) or "rev" (token changed after it was chosen)."""
    marks, prev = {}, None
    for rec in trace.records:
        if rec.step >= 0 and b not in rec.rows:
            continue
        for p in range(rec.x.shape[1]):
            if bool(rec.transfer[b, p]):
                marks[rec.step, p] = "tr"
            elif prev is not None and int(prev[p]) != trace.mask_id and int(rec.x[b, p]) != int(prev[p]):
                marks[rec.step, p] = "rev"
        prev = rec.x[b]
    return marks


@pytest.fixture(scope="module")
def evotoken_page(model, tmp_path_factory):
    """An EvoToken trace of two rows and its DOM at 1400 x 900 (with the overflow probe)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        trace = _trace(model, "evotoken")
    finally:
        torch.set_num_threads(threads)
    return trace, _render(trace, tmp_path_factory.mktemp("page") / "evo.html", probe=True)


@pytest.mark.slow
def test_browser_rings_and_final_state(evotoken_page):
    """Rings mark the positions whose token was chosen / revised at that step; the last step shows decoded."""
    trace, dom = evotoken_page
    assert "soft-mask" in dom.text["legend"]
    assert "token chosen at this step" in dom.text["legend"] and "revised at this step" in dom.text["legend"]
    assert "k_soft 3" in dom.text["meta"] and "alpha 0.7" in dom.text["meta"]
    P, L = trace.prompt_length, trace.prompt_length + trace.gen_length
    assert len(dom.cells) == 2 * len(trace.records) * trace.gen_length     # every step x position of both rows
    last = trace.records[-1]
    assert bool((last.state[:, L - trace.block_length:] == SOFT).all())    # the record keeps the soft input ...
    shown = {}
    for b, cells in enumerate((dom.cells[:len(dom.cells) // 2], dom.cells[len(dom.cells) // 2:])):
        marks = _expected_marks(trace, b)
        assert "rev" in marks.values(), "the trace should revise a token somewhere"
        states = {rec.step: rec.state[b] for rec in trace.records}
        for c in cells:
            step, pos = int(c["data-step"]), int(c["data-pos"])
            assert P <= pos < L
            got = {"tr", "rev"} & set(c["class"].split())
            assert got == ({marks[step, pos]} if (step, pos) in marks else set()), (b, step, pos, c["class"])
            want = STATE_NAMES[int(states[step][pos])]
            if step == last.step and want == "soft":
                want = "decoded"                                            # ... the page shows it final
            assert c["data-state"] == want, (b, step, pos)
            shown.setdefault(step, set()).add(want)
    assert shown[last.step] == {"decoded"} and "soft" in shown[last.step - 1]


@pytest.mark.slow
def test_browser_token_strip_wraps_at_1400px(evotoken_page):
    dom = evotoken_page[1]
    overflow, width = re.match(r"overflow:(.*); textwidth:(\d+)", dom.text["probe"]).groups()
    assert overflow == "" and 0 < int(width) <= 1400


@pytest.mark.slow
def test_browser_hard_mode_shows_no_soft_settings(model, tmp_path):
    dom = _render(_trace(model, "hard"), tmp_path / "hard.html")
    assert "mode hard" in dom.text["meta"] and "k_soft" not in dom.text["meta"] and "alpha" not in dom.text["meta"]
    assert "soft" not in dom.text["legend"] and "revised" not in dom.text["legend"]
    assert "mask:" in dom.text["legend"] and "decoded:" in dom.text["legend"]
    assert {c["data-state"] for c in dom.cells} == {"mask", "decoded"}


@pytest.mark.slow
def test_browser_screenshot_is_a_page(model, tmp_path):
    from PIL import Image
    path = tmp_path / "shot.html"
    to_html(_trace(model, "evotoken"), path=path)
    png = _chromium.screenshot(path, tmp_path / "shot.png", 1400, 900)
    assert png.stat().st_size > 20_000
    img = Image.open(png).convert("RGB")
    assert img.size == (1400, 900)
    colours = img.getcolors(maxcolors=1 << 16)
    assert colours is None or len(colours) > 50                  # text, the four states' shades, rings
    lo, hi = zip(*img.getextrema())
    assert min(lo) < 40 and max(hi) > 200
