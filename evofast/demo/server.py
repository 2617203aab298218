"""The demo's web server: Python's standard library only, one generation at a time.

    GET  /                 the page (evofast/demo/page/index.html)
    GET  /static/NAME      its script and style sheet, and the trace page's view.js / page.css
    GET  /api/info         the model, its note, the default settings, the choices, task examples
    POST /api/generate     settings as JSON -> a stream of JSON lines (application/x-ndjson):
                           the `StepStream` events as the generation runs, then one of
                           {"event": "done", "answer", "check", "forwards", "seconds"},
                           {"event": "stopped"} or {"event": "error", "error"}
    POST /api/stop         stop the running generation before its next forward

POSTs must be application/json (a page of another site cannot send that here).
Settings are checked before anything is streamed: a bad one (or one `generate` refuses
before its first forward) is a 400 answer {"error": "<argument>: ..."}; a second
generation while one runs is a 409. Every request has its own thread; the generation
runs in a worker thread of its own and reaches the request through a queue, so a slow
or vanished browser never holds the model (a vanished one stops the generation).
"""
from __future__ import annotations

import json
import queue
import sys
import threading
import time
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from urllib.parse import urlsplit

from .session import MAX_GEN_LENGTH, POLICIES, DemoModel, parse_settings
from .stream import Cancelled, StepStream

__all__ = ["DemoServer", "make_server", "serve"]

_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
          ".css": "text/css; charset=utf-8"}
# what /static/ serves: name -> (package folder, file)
_STATIC = {"demo.js": ("demo/page", "demo.js"), "demo.css": ("demo/page", "demo.css"),
           "view.js": ("trace_page", "view.js"), "page.css": ("trace_page", "page.css")}
_BODY_LIMIT = 1 << 16


def _asset(folder: str, name: str) -> bytes:
    return (resources.files("evofast").joinpath(*folder.split("/"), name)).read_bytes()


class Runner:
    """Runs one generation at a time in a worker thread; its events come out of a queue."""

    def __init__(self, demo: DemoModel):
        self.demo = demo
        self.busy = threading.Lock()
        self.stop = threading.Event()          # the running generation's (each has its own)

    def start(self, prompt: str, kwargs: dict):
        """(the queue of a new generation's events, None ending them; the event that stops it), or
        None while another one runs. The prompt is encoded here: one the model cannot take raises
        ValueError."""
        if not self.busy.acquire(blocking=False):
            return None
        try:
            ids, am = self.demo.encode(prompt)
        except Exception:
            self.busy.release()
            raise
        self.stop = stop = threading.Event()
        events: queue.Queue = queue.Queue()
        threading.Thread(target=self._work, args=(prompt, ids, am, kwargs, events, stop), daemon=True,
                         name="evofast-demo-generate").start()
        return events, stop

    def running(self) -> bool:
        return self.busy.locked()

    def _work(self, prompt, ids, am, kwargs, events, stop) -> None:
        from ..generation import generate

        stream = StepStream(self.demo.tokenizer, events.put, stop)
        try:
            t0 = time.perf_counter()
            stats: dict = {}
            out = generate(self.demo.model, ids, am, observers=[stream], stats=stats, **kwargs)
            gen = out[0, ids.shape[1]:].tolist()
            events.put({"event": "done", "answer": self.demo.answer(gen), "check": self.demo.check(prompt, gen),
                        "forwards": stats["forwards"], "seconds": round(time.perf_counter() - t0, 3)})
        except Cancelled:
            events.put({"event": "stopped"})
        except (ValueError, NotImplementedError) as e:            # generate's checks: the user's to fix
            events.put({"event": "error", "error": str(e)})
        except Exception as e:                                   # noqa: BLE001 - a bug: say it, keep serving
            traceback.print_exc(file=sys.stderr)
            events.put({"event": "error", "error": f"{type(e).__name__}: {e}"})
        finally:
            self.busy.release()
            events.put(None)


class DemoServer(ThreadingHTTPServer):
    """The HTTP server of a `DemoModel` (`url` once bound)."""

    daemon_threads = True

    def __init__(self, demo: DemoModel, host: str = "127.0.0.1", port: int = 0, quiet: bool = True):
        self.demo, self.quiet = demo, quiet
        self.runner = Runner(demo)
        super().__init__((host, port), _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{'127.0.0.1' if host in ('0.0.0.0', '') else host}:{port}/"

    def info(self) -> dict:
        d = self.demo
        from ..generation import MODES
        return {"model": d.name, "note": d.note, "defaults": d.defaults(), "max_gen_length": MAX_GEN_LENGTH,
                "choices": {"mode": list(MODES), "cache": ["none", "prefix", "dual"],
                            "policy": [{"name": n, "label": p.label,
                                        "params": [{"name": k, "default": v[0], "min": v[1], "max": v[2]}
                                                   for k, v in p.params.items()]}
                                       for n, p in POLICIES.items()]},
                "task": None if d.task is None else {"name": d.task.name, **d.task.spec()},
                "examples": [{"prompt": ex.prompt, "answer": ex.answer} for ex in d.examples]}


class _Handler(BaseHTTPRequestHandler):
    server: DemoServer
    server_version = "evofast-demo"

    def log_message(self, format, *args):                       # noqa: A002 - the base class's name
        if not self.server.quiet:
            super().log_message(format, *args)

    # ------------------------------------------------------------------ replies
    def _send(self, code: int, body: bytes, ctype: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def _json(self, code: int, obj) -> None:
        self._send(code, json.dumps(obj).encode(), "application/json")

    # ------------------------------------------------------------------ routes
    def do_GET(self):
        path = urlsplit(self.path).path
        if path in ("/", "/index.html"):
            return self._send(200, _asset("demo/page", "index.html"), _TYPES[".html"])
        if path == "/api/info":
            return self._json(200, self.server.info())
        name = path[len("/static/"):] if path.startswith("/static/") else None
        if name in _STATIC:
            return self._send(200, _asset(*_STATIC[name]), _TYPES["." + name.rsplit(".", 1)[1]])
        self._json(404, {"error": f"no such page: {path}"})

    def do_POST(self):
        path = urlsplit(self.path).path
        if self.headers.get_content_type() != "application/json":
            # only JSON: another site's page cannot send it here without a CORS preflight, which fails
            return self._json(415, {"error": "request: send the settings as application/json"})
        if path == "/api/stop":
            running = self.server.runner.running()
            self.server.runner.stop.set()
            return self._json(200, {"stopping": running})
        if path != "/api/generate":
            return self._json(404, {"error": f"no such endpoint: {path}"})
        try:
            body = self._read_json()
            prompt, kwargs = parse_settings(body, self.server.demo.defaults())
            started = self.server.runner.start(prompt, kwargs)
        except ValueError as e:
            return self._json(400, {"error": str(e)})
        if started is None:
            return self._json(409, {"error": "busy: a generation is running (stop it, or wait for it to end)"})
        events, stop = started
        first = events.get()
        if first is None or first["event"] != "start":          # refused before its first forward
            return self._json(400, {"error": (first or {}).get("error", "the generation ended before it started")})
        self._stream(first, events, stop)

    def _read_json(self):
        n = int(self.headers.get("Content-Length") or 0)
        if n > _BODY_LIMIT:
            raise ValueError(f"request: a body of {n} bytes is more than the {_BODY_LIMIT} a prompt needs")
        try:
            return json.loads(self.rfile.read(n) or b"{}")
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"request: the body is not JSON ({e})") from None

    def _stream(self, first: dict, events: queue.Queue, stop: threading.Event) -> None:
        """JSON lines as the events come; the connection closes after the last one (HTTP/1.0)."""
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        event = first
        try:
            while event is not None:
                self.wfile.write(json.dumps(event, separators=(",", ":")).encode() + b"\n")
                self.wfile.flush()
                event = events.get()
        except (BrokenPipeError, ConnectionResetError):          # the page went away: free the model
            stop.set()


def make_server(demo: DemoModel, host: str = "127.0.0.1", port: int = 0, quiet: bool = True) -> DemoServer:
    """A bound (not yet serving) server; port 0 picks a free port (see `.url`)."""
    return DemoServer(demo, host, port, quiet)


def serve(demo: DemoModel, host: str = "127.0.0.1", port: int = 0, open_browser: bool = False,
          quiet: bool = True) -> None:
    """Serve the demo until interrupted (Ctrl-C), printing its URL."""
    server = make_server(demo, host, port, quiet)
    print(f"evofast demo: {demo.name} at {server.url}  (Ctrl-C stops)", flush=True)
    if open_browser:
        import webbrowser
        threading.Timer(0.5, webbrowser.open, args=(server.url,)).start()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.runner.stop.set()
        server.server_close()
