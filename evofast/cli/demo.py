"""`evofast demo`: a local web page that shows EvoToken decoding as it runs.

    evofast demo [--model tiny|DIR] [--port 8000] [--host 127.0.0.1] [--open]

Type a prompt and watch every position go from mask to soft (its top-k and their
weights on hover) to decoded, and get revised, step by step while the model runs;
mode, transfer policy, alpha, k_soft, steps, lengths and the KV cache are controls,
and Stop ends a generation. A model directory with a task file (what `evofast
train-base` writes) brings its task: example prompts, and whether an answer is
right. `--model tiny` is the built-in random model (its text is nonsense). The
server binds 127.0.0.1 (this machine only) unless --host says otherwise; --port 0
takes any free port. It needs nothing beyond evofast (Python's own HTTP server).
"""
from __future__ import annotations

import argparse
import sys

from .common import CommandError, command, resolve_device, resolve_dtype

HELP = "a local web page that shows EvoToken decoding step by step as it runs"
OPTIONS = ("device", "dtype", "threads")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="tiny", metavar="DIR_OR_tiny",
                        help="checkpoint directory, or 'tiny' for the built-in random model (default)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free port)")
    parser.add_argument("--open", action="store_true", help="open the page in a browser")
    parser.add_argument("--lora", metavar="DIR", default=None, help="a LoRA adapter directory, loaded unmerged")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="let transformers run the checkpoint's own model / tokenizer code")
    parser.add_argument("--no-chat-template", action="store_true", help="never apply the chat template")
    parser.add_argument("--mask-id", type=int, default=None, help="mask token id (default: the model's)")
    parser.add_argument("--verbose", action="store_true", help="log every request")


@command("evofast demo")
def run(args: argparse.Namespace) -> int:
    import torch

    from ..demo import load_model, serve

    if not 0 <= args.port <= 65535:
        raise CommandError(f"--port: must lie in 0..65535, got {args.port}")
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    if args.threads is None and args.model == "tiny" and device.type == "cpu":
        torch.set_num_threads(1)                      # tiny matrices: more threads only add synchronisation
    try:
        demo = load_model(args.model, device, dtype, lora=args.lora, trust_remote_code=args.trust_remote_code,
                          mask_id=args.mask_id, chat=not args.no_chat_template)
    except (OSError, ValueError, TypeError, ImportError) as e:
        raise CommandError(f"cannot load {args.model!r}: {e}") from None
    try:
        serve(demo, args.host, args.port, open_browser=args.open, quiet=not args.verbose)
    except OSError as e:                                  # the port is taken, the address is not ours
        raise CommandError(f"cannot serve on {args.host}:{args.port}: {e} (--port 0 takes any free port)") from None
    return 0


def main(argv=None) -> int:
    from .. import cli
    return cli.standalone(sys.modules[__name__], "evofast demo", argv)


if __name__ == "__main__":
    sys.exit(main())
