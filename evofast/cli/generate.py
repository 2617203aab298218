"""`evofast generate`: EvoToken (or hard-mask) decoding of prompts from the command line.

    evofast generate --model PATH_OR_tiny --prompt "..." [--prompt "..." ...]
        [--mode evotoken|hard] [--steps N] [--gen-length N] [--block-length N]
        [--k-soft K] [--alpha A] [--temperature T [--top-k K] [--top-p P]] [--seed S]
        [--remasking low_confidence|random|topk_margin|entropy]
        [--policy schedule | --threshold C | --policy stdd [--stdd-tau X --stdd-lam-t X ...]]
        [--trace out.html] [--lora DIR [--merge-lora]] [--trust-remote-code] [--device cpu|cuda]
        [--dtype auto|fp32|bf16|fp16]

PATH is a local checkpoint directory (or a name transformers can resolve),
loaded by `evofast.models.loading.load_checkpoint` and `evofast.patch`ed. LLaDA
checkpoints load into evofast's own LLaDA implementation unless
--trust-remote-code is given (then the checkpoint's code runs); no remote code
runs without that flag. --lora DIR loads a LoRA adapter on it with peft,
unmerged (checked against the checkpoint before any weight is loaded). The chat
template is applied when the tokenizer has one (--no-chat-template: never).
Several --prompt values run as one left-padded batch.

`--model tiny` is a built-in random-weight LLaDA-architecture model (d_model 64,
2 layers) with a character tokenizer: it runs in a second and its text is
nonsense. --trace writes a self-contained HTML page of every step (how each
position went from mask to soft to decoded; colour = confidence, top-k on hover).
"""
from __future__ import annotations

import argparse
import sys
import time

from .common import (POLICY_FLAGS, CommandError, add_policy_arguments, check_output_file, command,
                     policy_kwargs, resolve_device, resolve_dtype, to_flags)

HELP = "generate text with EvoToken soft-token decoding (a checkpoint, or --model tiny)"
OPTIONS = ("device", "dtype", "seed", "threads", "progress")
# the library's argument names -> this command's flags (for error messages)
FLAGS = {"gen_length": "--gen-length", "block_length": "--block-length", "steps": "--steps", "mode": "--mode",
         "k_soft": "--k-soft", "alpha": "--alpha", "temperature": "--temperature", "cache": "--cache",
         "cache_refresh": "--cache-refresh", "mask_id": "--mask-id", **POLICY_FLAGS}
MERGE_NOTE = ("note: --merge-lora folds the adapter into the weights; merged bf16 weights round "
              "differently from the unmerged adapter, so tokens are not identical to the authors' runs")
TINY_NOTE = ("note: --model tiny is a random-weight LLaDA-architecture model (d_model 64, 2 layers) with a "
             "character tokenizer: its text is nonsense. It shows that the pipeline runs, nothing more.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="PATH_OR_tiny",
                        help="checkpoint directory, or 'tiny' for the built-in random model")
    parser.add_argument("--prompt", required=True, action="append", metavar="TEXT",
                        help="the prompt; repeat for a batch (left-padded)")
    parser.add_argument("--mode", choices=("evotoken", "hard"), default="evotoken",
                        help="evotoken (soft tokens, default) or hard (plain masked diffusion)")
    parser.add_argument("--gen-length", type=int, default=128, metavar="N", help="tokens to generate (128)")
    parser.add_argument("--block-length", type=int, default=32, metavar="N", help="block length (32)")
    parser.add_argument("--steps", type=int, default=64, metavar="N", help="decoding steps in all (64)")
    parser.add_argument("--k-soft", type=int, default=3, metavar="K", help="top-k of a soft token (3)")
    parser.add_argument("--alpha", type=float, default=0.7, metavar="A", help="mask weight of a soft mask (0.7)")
    parser.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 = greedy (default)")
    parser.add_argument("--cache", choices=("none", "prefix", "dual"), default="none",
                        help="KV cache: none (default), prefix (prompt and finished blocks cached) or dual "
                             "(the masked suffix too: only the current block is run)")
    parser.add_argument("--cache-refresh", type=int, default=None, metavar="N",
                        help="with a cache, also recompute the whole sequence every N steps")
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the forward (CUDA graphs on GPU; falls back to eager)")
    parser.add_argument("--trace", metavar="FILE.html", default=None,
                        help="write a self-contained HTML page of every decoding step")
    parser.add_argument("--lora", metavar="DIR", default=None,
                        help="a LoRA adapter directory (peft save_pretrained, e.g. the released EvoToken LoRA), "
                             "loaded onto the checkpoint unmerged")
    parser.add_argument("--merge-lora", action="store_true",
                        help="fold the --lora adapter into the weights (faster; not token-identical in bf16)")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="let transformers run the checkpoint's own model / tokenizer code")
    parser.add_argument("--no-chat-template", action="store_true", help="never apply the chat template")
    parser.add_argument("--mask-id", type=int, default=None,
                        help="mask token id (default: the config's, else the tokenizer's)")
    add_policy_arguments(parser)
    parser.set_defaults(progress=False)                 # --progress: a bar over the steps


# the loaders live in the library; these names stay importable from here
from ..chat import encode_prompts  # noqa: E402,F401
from ..models.loading import load_checkpoint, load_tiny  # noqa: E402,F401


@command("evofast generate", FLAGS)
def run(args: argparse.Namespace) -> int:
    import torch

    from .. import generation
    from ..decode import DecodeConfig
    from ..models.loading import patch_for_generation

    # every setting checked before anything loads
    decoding = policy_kwargs(args)
    DecodeConfig(gen_length=args.gen_length, block_length=args.block_length, steps=args.steps, mode=args.mode,
                 k_soft=args.k_soft, alpha=args.alpha, temperature=args.temperature,
                 cache=None if args.cache == "none" else args.cache, cache_refresh=args.cache_refresh, **decoding)
    trace_path = check_output_file(args.trace, "--trace")
    if args.merge_lora and args.lora is None:
        raise CommandError("--merge-lora needs --lora DIR")
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    try:
        if args.model == "tiny":
            print(TINY_NOTE, file=sys.stderr)
            if device.type == "cpu" and args.threads is None:
                torch.set_num_threads(1)                # see load_tiny
            model, tok = load_tiny(device, dtype)
        else:
            model, tok = load_checkpoint(args.model, device, dtype, args.trust_remote_code,
                                         lora=args.lora, merge_lora=args.merge_lora)
            if args.lora is not None and args.merge_lora:
                print(MERGE_NOTE, file=sys.stderr)
        patch_for_generation(model, tok, args.mask_id)
    except (OSError, ValueError, TypeError, ImportError) as e:
        raise CommandError(f"cannot load {args.model!r}: {to_flags(str(e), FLAGS)}") from None

    ids, am = encode_prompts(tok, args.prompt, not args.no_chat_template, device)
    gen = torch.Generator().manual_seed(args.seed)
    t0 = time.perf_counter()
    out = generation.generate(
        model, ids, am, gen_length=args.gen_length, block_length=args.block_length, steps=args.steps,
        mode=args.mode, k_soft=args.k_soft, alpha=args.alpha, temperature=args.temperature,
        cache=None if args.cache == "none" else args.cache, cache_refresh=args.cache_refresh, **decoding,
        compile=args.compile, generator=gen, progress=args.progress,
        return_trace=args.trace is not None)
    seconds = time.perf_counter() - t0
    out, trace = out if args.trace is not None else (out, None)

    P = ids.shape[1]
    answers = tok.batch_decode(out[:, P:].tolist(), skip_special_tokens=True)
    for i, text in enumerate(answers):
        if len(answers) > 1:
            print(f"[{i}] ", end="")
        print(text)
    n = out.shape[0] * args.gen_length
    print(f"{n} tokens in {seconds:.2f} s ({n / seconds:.1f} tokens/s), mode {args.mode}, cache {args.cache}, "
          f"{device}, {str(dtype).replace('torch.', '')}", file=sys.stderr)
    if trace is not None:
        from ..trace import to_html
        to_html(trace, tok, trace_path, title=f"evofast generate: {args.model} ({args.mode})")
        print(f"trace: wrote {trace_path} ({trace.num_steps} steps)", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    from .. import cli
    return cli.standalone(sys.modules[__name__], "evofast generate", argv)


if __name__ == "__main__":
    sys.exit(main())
