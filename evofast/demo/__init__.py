"""`evofast demo`: watch EvoToken decoding think, step by step, in a web page.

    from evofast.demo import load_model, serve
    serve(load_model("tiny", "cpu", torch.float32), port=0)      # prints the URL

Type a prompt and every position is drawn as it goes from mask to soft (its top-k
and their weights on hover) to decoded, and gets revised, while the model runs;
mode, policy, alpha, k_soft, steps, lengths and the KV cache are controls. The page
draws steps with the same script as the static trace page (evofast/trace_page/view.js).

    session.py   DemoModel (model, tokenizer, task), load_model, parse_settings, POLICIES
    stream.py    StepStream: the observer that streams each step as the page draws it
    server.py    the HTTP server (standard library): the page, /api/info, /api/generate, /api/stop
    page/        the page: index.html, demo.js, demo.css
"""
from .server import DemoServer, make_server, serve
from .session import POLICIES, DemoModel, load_model, parse_settings
from .stream import Cancelled, StepStream

__all__ = ["serve", "make_server", "DemoServer", "DemoModel", "load_model", "parse_settings", "POLICIES",
           "StepStream", "Cancelled"]
