"""`evofast demo`: the server's API (a local server on a free port, the tiny model) against
`generate(..., return_trace=True)`, its checks, stop and one-at-a-time; a task model's examples and
answer check; and the page in headless Chromium (driven over its DevTools pipe: load, submit,
wait for the answer, read the DOM, screenshot), where Chromium is installed."""
from __future__ import annotations

import base64
import io
import json
import os
import select
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from importlib import resources

import pytest
import torch

pytest.importorskip("transformers")

import _chromium  # noqa: E402

from evofast.demo import load_model, make_server, parse_settings  # noqa: E402
from evofast.generation import generate  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")
SMALL = {"gen_length": 32, "block_length": 8, "steps": 16}


def _serve(demo):
    server = make_server(demo, port=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return server


@pytest.fixture(scope="module")
def tiny():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    server = _serve(load_model("tiny", "cpu", torch.float32))
    yield server
    server.shutdown()
    server.server_close()
    torch.set_num_threads(threads)


def _post(url, body, raw: bytes = None):
    """(status, the JSON lines of the answer)."""
    data = raw if raw is not None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, [json.loads(line) for line in r.read().splitlines() if line]
    except urllib.error.HTTPError as e:
        return e.code, [json.loads(e.read())]


def _get(url):
    with urllib.request.urlopen(url, timeout=30) as r:
        return r.status, r.headers.get("Content-Type"), r.read()


# --------------------------------------------------------------------------- the API
@pytest.mark.parametrize("settings", [
    {"mode": "evotoken", **SMALL},
    {"mode": "hard", "cache": "dual", **SMALL},
    {"mode": "evotoken", "policy": "threshold", "threshold": 0.05, "alpha": 0.5, "k_soft": 2, **SMALL},
    {"mode": "evotoken", "policy": "stdd", "tau": 0.05, "lam_t": 2.0, "lam_s": 0.5, **SMALL},
], ids=["evotoken", "hard-dual", "threshold", "stdd"])
def test_stream_is_the_trace_of_generate(tiny, settings):
    """Each streamed step holds the tokens and states `generate(..., return_trace=True)` records for the same
    settings, in order, then the answer."""
    body = {"prompt": "What is 12 + 30?", **settings}
    code, events = _post(tiny.url + "api/generate", body)
    assert code == 200
    assert [e["event"] for e in events] == ["start"] + ["step"] * (len(events) - 2) + ["done"]
    prompt, kwargs = parse_settings(body, tiny.demo.defaults())
    ids, am = tiny.demo.encode(prompt)
    out, trace = generate(tiny.demo.model, ids, am, return_trace=True, **kwargs)
    start, steps, done = events[0], [e["step"] for e in events[1:-1]], events[-1]
    P = ids.shape[1]
    assert start["meta"]["mode"] == settings["mode"] and start["meta"]["gen_length"] == 32
    assert start["row"]["first"] == P and start["row"]["prompt"] == ids[0].tolist()
    assert [s["step"] for s in steps] == [r.step for r in trace.records]
    for s, rec in zip(steps, trace.records):
        assert s["x"] == rec.x[0, P:].tolist(), s["step"]
        assert s["state"] == rec.state[0, P:].tolist(), s["step"]
        assert s["transfer"] == [int(t) for t in rec.transfer[0, P:].tolist()]
    vocab = {}
    for e in events[:-1]:
        vocab.update(e["vocab"])
    named = {i for s in steps for i in s["x"]} | {i for s in steps for row in s["topk"] for i, _ in row}
    assert {str(i) for i in named} <= set(vocab)                 # every id the page shows has its text
    assert done["answer"] == tiny.demo.answer(out[0, P:].tolist()) and done["check"] is None
    assert done["forwards"] == trace.num_steps


@pytest.mark.parametrize("body, message", [
    ({"steps": 5, "gen_length": 32, "block_length": 8}, "steps: must be a multiple"),
    ({"mode": "soft"}, "mode: must be one of"),
    ({"alpha": "high"}, "alpha: expected a number"),
    ({"alpha": 1.5}, "alpha"),
    ({"k_soft": 0}, "k_soft"),
    ({"steps": 2.5}, "steps: expected an integer"),
    ({"policy": "threshold", "threshold": 2}, "threshold"),
    ({"policy": "nucleus"}, "policy: must be one of"),
    ({"policy": "stdd", "tau": 1.5}, "tau"),
    ({"cache": "full"}, "cache: must be one of"),
    ({"gen_length": 4096, "block_length": 32, "steps": 64}, "gen_length: at most"),
    ({"prompt": "  "}, "prompt:"),
    ({"stepz": 3}, "unknown setting(s) ['stepz']"),
    ([1, 2], "expected a JSON object"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_bad_settings_are_a_400_naming_the_setting(tiny, body, message):
    code, (answer,) = _post(tiny.url + "api/generate", body)
    assert code == 400 and message in answer["error"], answer


def test_a_body_that_is_not_json_is_refused(tiny):
    code, (answer,) = _post(tiny.url + "api/generate", None, raw=b"{prompt")
    assert code == 400 and "not JSON" in answer["error"]
    req = urllib.request.Request(tiny.url + "api/generate", data=b'{"prompt": "hi"}', method="POST",
                                 headers={"Content-Type": "text/plain"})      # what a form of another site sends
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=30)
    assert e.value.code == 415


def test_stop_and_one_generation_at_a_time(tiny):
    """A long generation streams while it runs: a second one is refused (409), Stop ends it at its next
    step, and the model is free again."""
    body = json.dumps({"prompt": "hi", "gen_length": 512, "block_length": 512, "steps": 512}).encode()
    req = urllib.request.Request(tiny.url + "api/generate", data=body, method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=60) as r:
        assert json.loads(r.readline())["event"] == "start"
        assert json.loads(r.readline())["step"]["step"] == -1
        assert json.loads(r.readline())["step"]["step"] == 0          # a step arrives while the rest runs
        code, (busy,) = _post(tiny.url + "api/generate", {"prompt": "x"})
        assert code == 409 and "busy" in busy["error"]
        assert _post(tiny.url + "api/stop", {})[1] == [{"stopping": True}]
        rest = [json.loads(line) for line in r.read().splitlines() if line]
    assert rest[-1] == {"event": "stopped"} and len(rest) < 500
    code, events = _post(tiny.url + "api/generate", {"prompt": "x", **SMALL})
    assert code == 200 and events[-1]["event"] == "done"


def test_info_page_and_shared_drawing_code(tiny):
    code, ctype, raw = _get(tiny.url + "api/info")
    info = json.loads(raw)
    assert info["model"] == "tiny" and "nonsense" in info["note"] and info["task"] is None
    assert info["defaults"]["prompt"] and info["defaults"]["mode"] == "evotoken"
    assert [p["name"] for p in info["choices"]["policy"]] == ["schedule", "threshold", "stdd"]
    assert info["choices"]["cache"] == ["none", "prefix", "dual"]
    code, ctype, page = _get(tiny.url)
    assert ctype.startswith("text/html") and b'src="/static/view.js"' in page and b'src="/static/demo.js"' in page
    view = (resources.files("evofast") / "trace_page" / "view.js").read_bytes()
    assert _get(tiny.url + "static/view.js")[2] == view             # the trace page's own drawing code
    assert _get(tiny.url + "static/demo.js")[1].startswith("text/javascript")
    with pytest.raises(urllib.error.HTTPError) as e:
        _get(tiny.url + "static/../server.py")
    assert e.value.code == 404


def test_page_files_ship_in_the_wheel():
    import fnmatch
    from pathlib import Path
    tomllib = pytest.importorskip("tomllib")
    root = Path(__file__).resolve().parents[1]
    patterns = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["evofast"]
    files = sorted(p.name for p in (root / "evofast" / "demo" / "page").iterdir() if p.is_file())
    assert {"index.html", "demo.js", "demo.css"} <= set(files)
    for name in files:
        assert any(fnmatch.fnmatch(f"demo/page/{name}", p) for p in patterns), name


# --------------------------------------------------------------------------- a model with a task
@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    """An untrained model in the layout `evofast train-base` writes (with its task file)."""
    from evofast import tasks
    from evofast.study.pretrain import build_model, save
    task = tasks.get_task("add", digits=2)
    model, tok = build_model(task, d_model=32, n_layers=1, n_heads=2)
    return save(model, tok, task, tmp_path_factory.mktemp("add2"))


def test_task_model_examples_layout_and_check(task_dir):
    demo = load_model(str(task_dir), "cpu", torch.float32)
    task = demo.task
    assert task.name == "add" and len(demo.examples) == 8 and demo.note == "its task: add (digits=2)"
    d = demo.defaults()
    assert d["prompt"] == demo.examples[0].prompt and d["gen_length"] == task.gen_length
    ids, am = demo.encode("1+2=")                                   # the task's fixed-width layout, left-padded
    assert ids.shape == (1, task.prompt_length + 1) and am is not None and int(am.sum()) == 5
    ex = demo.examples[0]
    right = demo.tokenizer(ex.response + "<eos>", add_special_tokens=False)["input_ids"]
    assert demo.check(ex.prompt, right) == {"expected": ex.answer, "extracted": ex.answer, "correct": True}
    assert demo.check(ex.prompt, right[:-3])["correct"] is False
    assert demo.example_for("12+34=").answer == "46"                # parsed: the task writes this prompt
    assert demo.example_for("12+34") is None and demo.example_for("hello") is None
    server = _serve(demo)
    try:
        code, events = _post(server.url + "api/generate", {"prompt": ex.prompt, "mode": "hard"})
        info = json.loads(_get(server.url + "api/info")[2])
    finally:
        server.shutdown()
        server.server_close()
    assert code == 200 and events[-1]["check"]["expected"] == ex.answer
    assert info["task"]["task"] == "add" and info["examples"][0] == {"prompt": ex.prompt, "answer": ex.answer}


# --------------------------------------------------------------------------- the command
def test_command_is_registered_and_reports_a_bad_model(capsys, tmp_path):
    from evofast import cli
    assert cli.COMMANDS["demo"] == "evofast.cli.demo"
    assert cli.main(["demo", "--model", str(tmp_path / "nothing"), "--port", "0"]) == 2
    assert "cannot load" in capsys.readouterr().err
    assert cli.main(["demo", "--port", "70000"]) == 2
    assert "--port" in capsys.readouterr().err


@pytest.mark.slow
def test_command_serves_and_prints_the_url():
    """`evofast demo --port 0` prints its URL and answers there."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "evofast.cli", "demo", "--port", "0"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert select.select([proc.stdout], [], [], 120)[0], "no URL printed within 120 s"
        line = proc.stdout.readline()
        assert "evofast demo: tiny at http://127.0.0.1:" in line, proc.stderr.read() if proc.poll() else line
        url = line.split(" at ")[1].split()[0]
        assert json.loads(_get(url + "api/info")[2])["model"] == "tiny"
    finally:
        proc.terminate()
        proc.wait(30)


# --------------------------------------------------------------------------- in the browser
class Browser:
    """Headless Chromium driven over its DevTools pipe (fds 3 and 4): what `--dump-dom` cannot do here,
    wait for a streamed answer."""

    def __init__(self, width=1400, height=900, timeout=60):
        browser = _chromium.chromium()
        if browser is None:
            pytest.skip("chromium is not installed")
        self.timeout, self.n, self.buf = timeout, 0, b""
        self.profile = tempfile.TemporaryDirectory()
        to_child, self.w = os.pipe()
        self.r, from_child = os.pipe()

        def pipes():                               # in the child: its DevTools pipe on fds 3 and 4
            a, b = os.dup(to_child), os.dup(from_child)
            os.dup2(a, 3)
            os.dup2(b, 4)

        self.proc = subprocess.Popen([browser, *_chromium.FLAGS, f"--user-data-dir={self.profile.name}",
                                      f"--window-size={width},{height}", "--remote-debugging-pipe", "about:blank"],
                                     close_fds=False, preexec_fn=pipes, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        os.close(to_child)
        os.close(from_child)
        page = next(t for t in self.call("Target.getTargets")["targetInfos"] if t["type"] == "page")
        self.session = self.call("Target.attachToTarget", targetId=page["targetId"], flatten=True)["sessionId"]
        self.call("Emulation.setDeviceMetricsOverride", self.session, width=width, height=height,
                  deviceScaleFactor=1, mobile=False)                # the viewport, not the window with its frame

    def call(self, method, session=None, **params):
        self.n += 1
        msg = {"id": self.n, "method": method, "params": params, **({"sessionId": session} if session else {})}
        os.write(self.w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + self.timeout
        while True:
            while b"\0" not in self.buf:
                if not select.select([self.r], [], [], max(0.0, deadline - time.monotonic()))[0]:
                    raise TimeoutError(f"chromium did not answer {method}")
                chunk = os.read(self.r, 1 << 16)
                if not chunk:
                    raise RuntimeError("chromium closed its DevTools pipe")
                self.buf += chunk
            line, self.buf = self.buf.split(b"\0", 1)
            reply = json.loads(line)
            if reply.get("id") == self.n:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def js(self, expression):
        r = self.call("Runtime.evaluate", self.session, expression=expression, returnByValue=True)
        return r["result"].get("value")

    def goto(self, url):
        self.js("document.body && (document.body.dataset.phase = 'leaving')")   # no stale answer from the last page
        self.call("Page.navigate", self.session, url=url)

    def wait(self, expression, seconds=60):
        """Polls `expression` until it is truthy; its value."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            value = self.js(expression)
            if value:
                return value
            time.sleep(0.1)
        raise TimeoutError(f"{expression!r} stayed false; phase {self.js('document.body.dataset.phase')!r}")

    def screenshot(self) -> bytes:
        return base64.b64decode(self.call("Page.captureScreenshot", self.session, format="png")["data"])

    def close(self):
        try:
            self.call("Browser.close")
        except (RuntimeError, TimeoutError, OSError):
            self.proc.kill()
        self.proc.wait(30)
        os.close(self.w)
        os.close(self.r)
        self.profile.cleanup()


_FINISHED = "['done', 'error', 'stopped'].includes(document.body.dataset.phase) && document.body.dataset.phase"
_SUMMARY = """JSON.stringify({
  answer: document.getElementById('answer').textContent,
  answerShown: !document.getElementById('answer-box').hidden,
  status: document.getElementById('status').textContent,
  error: document.getElementById('error').hidden ? null : document.getElementById('error').textContent,
  broken: document.getElementById('trace-error') && document.getElementById('trace-error').textContent,
  cells: document.querySelectorAll('td.cell').length,
  rows: [...document.querySelectorAll('table.grid tr[data-step]')].map((tr) => tr.dataset.step),
  last: [...document.querySelectorAll('table.grid tr[data-step]:last-child td.cell')].map((td) => td.dataset.state),
  meta: document.getElementById('meta').textContent,
  legend: document.getElementById('legend').textContent,
  alphaShown: document.getElementById('alpha').offsetParent !== null,
})"""


@pytest.mark.slow
def test_browser_submit_watch_answer_and_screenshot(tiny, tmp_path):
    """The query string fills the form and submits: the page shows the answer and every step, the top-k on
    hover; the form's Generate button runs another; a long one is drawn while it runs and Stop ends it; a bad
    setting shows its message; a screenshot is a real page."""
    from PIL import Image

    prompt, kwargs = parse_settings({"prompt": "What is 12 + 30?", **SMALL}, tiny.demo.defaults())
    ids, am = tiny.demo.encode(prompt)
    want = tiny.demo.answer(generate(tiny.demo.model, ids, am, **kwargs)[0, ids.shape[1]:].tolist())
    b = Browser()
    try:
        query = urllib.parse.urlencode({**SMALL, "prompt": "What is 12 + 30?", "run": 1})
        b.goto(tiny.url + "?" + query)
        assert b.wait(_FINISHED) == "done"
        page = json.loads(b.js(_SUMMARY))
        assert page["broken"] is None and page["error"] is None
        assert page["answerShown"] and page["answer"] == want and page["status"].startswith("done: 16 forwards")
        assert page["cells"] == 17 * 32 and page["rows"] == [str(i) for i in range(-1, 16)]
        assert set(page["last"]) == {"decoded"}                      # finished: the last step shows decoded
        assert "k_soft 3" in page["meta"] and "soft-mask" in page["legend"] and page["alphaShown"]
        hover = b.js("""(() => { const td = document.querySelector('tr[data-step="3"] td.cell');
            td.dispatchEvent(new MouseEvent('mouseover', {bubbles: true})); td.click();
            return [document.getElementById('tip').textContent,
                    document.querySelector('.controls').textContent]; })()""")
        assert "step 3" in hover[0] and "top-3 prediction" in hover[0]       # the top-k on hover
        assert "after step 3" in hover[1]                                     # a click shows that step
        png = tmp_path / "demo.png"
        png.write_bytes(b.screenshot())
        img = Image.open(io.BytesIO(png.read_bytes())).convert("RGB")
        assert img.size == (1400, 900) and png.stat().st_size > 20_000
        colours = img.getcolors(maxcolors=1 << 16)
        assert colours is None or len(colours) > 50                  # text, the states' shades, rings, the form
        lo, hi = zip(*img.getextrema())
        assert min(lo) < 40 and max(hi) > 200

        b.js("const mode = document.getElementById('mode'); mode.value = 'hard';"
             "mode.dispatchEvent(new Event('change')); document.getElementById('run').click()")   # the form's submit
        assert b.wait("document.getElementById('meta').textContent.includes('mode hard') && " + _FINISHED) == "done"
        page = json.loads(b.js(_SUMMARY))
        assert not page["alphaShown"] and "k_soft" not in page["meta"] and page["cells"] == 17 * 32

        b.goto(tiny.url + "?gen_length=512&block_length=512&steps=512&run=1")   # long: watched, then stopped
        drawn = "document.querySelectorAll('tr[data-step]').length"
        assert b.wait(f"{drawn} >= 3 && document.body.dataset.phase") == "running"    # steps drawn as they run
        b.js("document.getElementById('stop').click()")
        assert b.wait(_FINISHED) == "stopped"
        assert json.loads(b.js(_SUMMARY))["status"].startswith("stopped after step")

        b.goto(tiny.url + "?steps=5&gen_length=32&block_length=8&run=1")
        assert b.wait(_FINISHED) == "error"
        page = json.loads(b.js(_SUMMARY))
        assert "steps: must be a multiple" in page["error"] and page["broken"] is None
    finally:
        b.close()
