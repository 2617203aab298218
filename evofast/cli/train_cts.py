"""`evofast train-cts`: CTS training (continuous trajectory supervision) from the command line.

    evofast train-cts --model PATH_OR_tiny [--data FILE.jsonl] [--out DIR [--overwrite]]
        [--save-steps N [--save-total-limit N]] [--resume]
        [--steps N | --epochs E] [--batch-size B] [--grad-accum G] [--lr LR]
        [--lora-r R [--lora-targets NAME ...] | --full] [--K 4] [--per-de-nums 1 2 4 8]
        [--block-sizes 512] [--max-length N] [--k-soft 3] [--bf16] [--dtype float32|bfloat16]
        [--gradient-checkpointing] [--fsdp]
        [--no-merge] [--no-chat-template] [--trust-remote-code] [--seed S]

FILE.jsonl holds one `{"prompt": ..., "response": ...}` object per line; the
tokenizer's chat template is applied when it has one. PATH is loaded as by
`evofast generate` (AutoTokenizer, evofast's LLaDA for model_type "llada").
`--model tiny` is the built-in random-weight LLaDA-architecture model with a
character tokenizer; without --data it trains on a few built-in arithmetic
lines (a demo that the pipeline runs: the loss goes down, nothing more).
A progress bar and the loss of every logged step are shown; examples that cannot
be trained on (no response token, longer than --max-length) are reported before
training starts.

`--out DIR` receives the model (save_pretrained; LoRA merged, or the adapter alone
with --no-merge), its tokenizer and the task file of the input model, written
beside DIR and renamed into place at the end. DIR must be new or empty and outside
the input model's directory: `--overwrite` writes into a non-empty DIR (its old
checkpoints are removed when training starts). `--save-steps N` writes a checkpoint
into DIR every N optimizer steps; `--resume` continues the run from DIR's last
checkpoint with the same data order and noise draws (pass the same options), so it
ends where the uninterrupted run would have.

Launch on several processes with torchrun (DDP; FSDP2 with --fsdp) or `accelerate launch --config_file
CONFIG -m evofast.cli train-cts ...` (DDP, FSDP2, DeepSpeed ZeRO 1-3 with CPU offload;
evofast's configs are in configs/accelerate/ of the repository). Under a launcher
every process loads the model on the CPU and the launcher places or shards it, and
the gradient accumulation, mixed precision and clipping of the accelerate config are
used (a conflicting --grad-accum / --bf16 is an error before anything is loaded).
"""
from __future__ import annotations

import argparse
import os
import sys

from .common import command, resolve_device

OPTIONS = ("device", "seed", "threads", "progress")

HELP = "train a diffusion LM with CTS (LoRA by default): --model PATH_OR_tiny --data FILE.jsonl"

DEMO = [("What is 2 + 3?", "2 + 3 = 5."), ("What is 7 + 1?", "7 + 1 = 8."), ("What is 4 + 4?", "4 + 4 = 8."),
        ("What is 6 + 3?", "6 + 3 = 9."), ("What is 1 + 1?", "1 + 1 = 2."), ("What is 5 + 2?", "5 + 2 = 7.")]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="PATH_OR_tiny",
                        help="checkpoint directory, or 'tiny' for the built-in random model")
    parser.add_argument("--data", metavar="FILE.jsonl", default=None,
                        help='{"prompt", "response"} lines (optional with --model tiny: a built-in demo set)')
    parser.add_argument("--out", metavar="DIR", default=None,
                        help="save the trained model, its tokenizer and checkpoints here (a new or empty directory)")
    parser.add_argument("--overwrite", action="store_true", help="let --out name a non-empty directory")
    parser.add_argument("--save-steps", type=int, default=0, metavar="N",
                        help="write a checkpoint into --out every N optimizer steps (0: none)")
    parser.add_argument("--save-total-limit", type=int, default=2, metavar="N",
                        help="checkpoints kept (the newest N; 2)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the last checkpoint in --out (same options as the first run)")
    parser.add_argument("--steps", type=int, default=-1, metavar="N", help="optimizer steps (default: --epochs)")
    parser.add_argument("--epochs", type=float, default=1.0, metavar="E", help="passes over the data (1)")
    parser.add_argument("--batch-size", type=int, default=1, metavar="B", help="examples per device and micro-step")
    parser.add_argument("--grad-accum", type=int, default=None, metavar="G",
                        help="micro-steps per optimizer step (default: the accelerate config's, else 1)")
    parser.add_argument("--lr", type=float, default=1e-5, metavar="LR", help="learning rate (1e-5)")
    parser.add_argument("--lora-r", type=int, default=128, metavar="R", help="LoRA rank (128, the paper's)")
    parser.add_argument("--lora-alpha", type=int, default=None, metavar="A", help="LoRA alpha (default 2 r)")
    parser.add_argument("--lora-targets", nargs="+", default=None, metavar="NAME",
                        help="linear layers to adapt (default: the model's attention q/k/v projections, e.g. "
                             "q_proj k_proj v_proj, or query key value for BERT)")
    parser.add_argument("--full", action="store_true", help="train every parameter instead of LoRA")
    parser.add_argument("--K", type=int, default=4, help="trajectory steps (4)")
    parser.add_argument("--per-de-nums", type=int, nargs="+", default=[1, 2, 4, 8], metavar="D",
                        help="tokens revealed per trajectory step, drawn per batch (1 2 4 8)")
    parser.add_argument("--block-sizes", type=int, nargs="+", default=[512], metavar="L",
                        help="block lengths, drawn per batch (512, the authors' script)")
    parser.add_argument("--max-length", type=int, default=None, metavar="N",
                        help="drop (and count) longer examples (default: the model's limit)")
    parser.add_argument("--extra-pad-prob", type=float, default=0.5, metavar="P",
                        help="probability of the collator's extra supervised pads (spec QUIRK: 0.5; 0 when the "
                             "data is already padded to the generation length)")
    parser.add_argument("--k-soft", type=int, default=3, metavar="K", help="top-k of a soft token (3)")
    parser.add_argument("--bf16", action="store_true",
                        help="bf16 mixed precision (on by itself when the accelerate config says bf16)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="dtype the weights are loaded in (float32; bfloat16 as the paper's 8B LoRA runs)")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward")
    parser.add_argument("--fsdp", action="store_true",
                        help="FSDP2 under torchrun (every block sharded, then the model; GPUs only): without an "
                             "accelerate config")
    parser.add_argument("--no-merge", action="store_true", help="--out saves the LoRA adapter alone")
    parser.add_argument("--no-chat-template", action="store_true", help="never apply the chat template")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="let transformers run the checkpoint's own model / tokenizer code")
    parser.add_argument("--mask-id", type=int, default=None, help="mask token id (default: config, then tokenizer)")


@command("evofast train-cts")
def run(args: argparse.Namespace) -> int:
    import torch

    from ..models.loading import load_checkpoint, load_tiny
    from .generate import TINY_NOTE
    from ..cts import encode_examples, load_jsonl, train_cts
    from ..cts.output import check_output_dir

    def err(msg):
        print(f"evofast train-cts: error: {msg}", file=sys.stderr)
        return 2

    try:
        launcher = _launcher_settings(args)
    except ValueError as e:
        return err(str(e))
    for name in ("steps", "batch_size", "grad_accum", "K", "k_soft", "save_total_limit"):
        v = getattr(args, name)
        if v < 1 and not (name == "steps" and v == -1):     # --steps -1: train by --epochs
            return err(f"--{name.replace('_', '-')} must be positive, got {v}")
    if args.save_steps < 0:
        return err(f"--save-steps must be >= 0, got {args.save_steps}")
    if args.save_steps and args.out is None:
        return err("--save-steps: checkpoints are written into --out DIR; pass it")
    if args.data is None and args.model != "tiny":
        return err("--data FILE.jsonl is required (only --model tiny has a built-in demo set)")
    model_dir = None if args.model == "tiny" else args.model
    try:      # before anything is loaded: nothing is overwritten, a bad --out costs nothing
        check_output_dir(args.out, inputs=[model_dir], overwrite=args.overwrite, resume=args.resume,
                         names=("--out", "--overwrite", "--resume"))
    except ValueError as e:
        return err(str(e))
    try:
        records = load_jsonl(args.data) if args.data else [{"prompt": p, "response": r} for p, r in DEMO]
    except (OSError, ValueError) as e:
        return err(f"cannot read --data: {e}")
    device = resolve_device(args.device)
    # several processes: each loads on the CPU, the launcher moves (DDP) or shards (FSDP, ZeRO) the model
    load_on = torch.device("cpu") if int(os.environ.get("WORLD_SIZE", "1")) > 1 else device
    main_process = os.environ.get("RANK", "0") == "0"          # the one that reports
    dtype = getattr(torch, args.dtype)
    try:
        if args.model == "tiny":
            if main_process:
                print(TINY_NOTE, file=sys.stderr)
            if device.type == "cpu" and args.threads is None:
                torch.set_num_threads(1)   # tiny matrices: more threads only add synchronisation (see load_tiny)
            model, tok = load_tiny(load_on, dtype)
        else:
            model, tok = load_checkpoint(args.model, load_on, dtype, args.trust_remote_code)
    except (OSError, ValueError, TypeError, ImportError) as e:
        return err(f"cannot load {args.model!r}: {e}")
    examples = encode_examples(tok, records, chat=not args.no_chat_template)
    max_length = args.max_length
    if max_length is None:
        max_length = getattr(getattr(model, "config", None), "max_sequence_length", None)

    def show(step, loss):
        from tqdm import tqdm
        tqdm.write(f"step {step}: loss {loss:.4f}", file=sys.stderr)   # above the progress bar

    try:
        trained, losses = train_cts(
            model, tok, examples, output_dir=args.out, overwrite=args.overwrite, resume=args.resume,
            save_steps=args.save_steps, save_total_limit=args.save_total_limit, source_dir=model_dir,
            lora_r=None if args.full else args.lora_r, lora_alpha=args.lora_alpha, target_modules=args.lora_targets,
            mask_id=args.mask_id, K=args.K, per_de_nums=args.per_de_nums,
            block_sizes=args.block_sizes, max_length=max_length, extra_pad_prob=args.extra_pad_prob,
            k_soft=args.k_soft, epochs=args.epochs,
            max_steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr,
            bf16=args.bf16, gradient_checkpointing=args.gradient_checkpointing, seed=args.seed,
            merge=not args.no_merge, progress=args.progress, on_loss=show,
            use_cpu=device.type == "cpu", **launcher, **({"fsdp": True} if args.fsdp else {}))
    except (ValueError, TypeError) as e:
        return err(str(e))
    if not main_process:
        return 0
    if losses:
        print(f"{len(losses)} steps logged, loss {losses[0][1]:.4f} -> {losses[-1][1]:.4f}", file=sys.stderr)
    if args.out:
        what = "the LoRA adapter" if args.no_merge and not args.full else "the model"
        print(f"{what} and its tokenizer saved to {args.out}", file=sys.stderr)
    else:
        print("no model saved (pass --out DIR to keep it)", file=sys.stderr)
    return 0


def _launcher_settings(args: argparse.Namespace) -> dict:
    """Adopt what `accelerate launch --config_file` fixes (it exports them to the processes):
    gradient accumulation (into args.grad_accum), mixed precision (args.bf16, or fp16) and
    gradient clipping; extra TrainingArguments as a dict. ValueError on a conflict."""
    env = os.environ
    extra = {}
    ga = env.get("ACCELERATE_GRADIENT_ACCUMULATION_STEPS")
    if ga and ga != "auto":
        if args.grad_accum is not None and args.grad_accum != int(ga):
            raise ValueError(f"--grad-accum {args.grad_accum}: the accelerate config sets gradient_accumulation_steps "
                             f"{ga}; drop --grad-accum or make them agree")
        args.grad_accum = int(ga)
    if args.grad_accum is None:
        args.grad_accum = 1
    precision = env.get("ACCELERATE_MIXED_PRECISION", "no")
    if precision == "bf16":
        args.bf16 = True
    elif precision == "fp16":
        if args.bf16:
            raise ValueError("--bf16: the accelerate config sets mixed_precision fp16; drop --bf16 or change the config")
        extra["fp16"] = True
    clip = env.get("ACCELERATE_GRADIENT_CLIPPING", "").lower()
    if clip not in ("", "none", "auto"):
        extra["max_grad_norm"] = float(clip)
    return extra


def main(argv=None) -> int:
    from .. import cli
    return cli.standalone(sys.modules[__name__], "evofast train-cts", argv)


if __name__ == "__main__":
    sys.exit(main())
