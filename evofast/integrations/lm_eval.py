"""evofast as a model of EleutherAI's lm-evaluation-harness (lm-eval 0.4): `pip install 'evofast[eval]'`.

    python -m evofast.integrations.lm_eval --model evofast \\
        --model_args pretrained=DIR,lora=DIR,mode=evotoken,gen_length=256,steps=128,block_length=32,alpha=0.7 \\
                     temperature=0.5,cache=dual,batch_size=16,dtype=bfloat16 \\
        --tasks evofast_gsm8k --apply_chat_template --metadata gsm8k_data=gsm8k_test.jsonl --output_path results/

Importing this module registers the model "evofast" with lm-eval; `python -m
evofast.integrations.lm_eval ARGS` is lm-eval's own command line (`lm-eval ARGS`)
after that import, with evofast's task directory (`TASK_DIR`: the paper's four
benchmarks evofast_gsm8k, evofast_math500, evofast_svamp, evofast_countdown) as the
`--include_path` unless one is given. From Python: `import evofast.integrations.lm_eval`,
then `lm_eval.simple_evaluate(model="evofast", model_args={...}, ...)`, or pass an
`EvofastLM` instance as the model.

Model arguments (`--model_args`; they win over lm-eval's `--batch_size` / `--device`):

    pretrained      a checkpoint directory (loaded with `evofast.models.loading.load_checkpoint`), or
                    a model object (Python; then `tokenizer` is required)
    tokenizer       a tokenizer object or directory (default: the checkpoint's)
    lora, merge_lora, trust_remote_code     as for `load_checkpoint`
    dtype           auto (bfloat16 on CUDA, float32 otherwise) | float32 | bfloat16 | float16
    device          cpu | cuda | cuda:N (default: CUDA when available; under torchrun cuda:LOCAL_RANK)
    batch_size      prompts per `evofast.generate` call
    mode, gen_length, steps, block_length, k_soft, alpha, temperature, remasking, threshold,
    cache, cache_refresh, compile, backend  `evofast.generate`'s options (checked before loading)
    seed            seeds sampling (temperature > 0) and the Monte-Carlo likelihood
    mc_num, mc_batch_size, greedy_check     `loglikelihood` (below)

generate_until. Requests are grouped by their generation length, sorted by prompt
length (longest first) and decoded `batch_size` at a time, left-padded with an
attention mask, each batch by one `evofast.generate` call. Decoding settings come from
the model arguments; of a request's generation kwargs only these are read (others,
such as temperature or do_sample, are ignored with a warning):

    until               stop strings: the text is cut before the first one found
    max_gen_toks        (or max_new_tokens) the generation length: rounded up to a whole number
                        of blocks (block_length), with `steps` scaled to keep the model's steps per
                        block, and the generated tokens cut to max_gen_toks; without it, gen_length
    skip_special_tokens default true: the tokenizer's EOS is a stop string too and special tokens
                        are removed from the text; false: the text as decoded with special tokens
                        and only `until` applied (evofast's task files ask for this, as the authors
                        score the raw generation)

With temperature > 0 each batch draws from its own generator, seeded by `seed` and the
batch's prompts (repeats of one prompt counted apart), so a rerun draws the same numbers.

Chat template. With `--apply_chat_template` lm-eval renders each request through
`apply_chat_template`; a request with a `gen_prefix` (evofast's task files prefill
"<reasoning>") ends in an assistant message that the template continues
(`continue_final_message`). A prompt that starts with the tokenizer's BOS text (a chat
template writes its own) is tokenized without adding special tokens, others with the
tokenizer's defaults, as `evofast.chat` does.

loglikelihood: `evofast.integrations.likelihood.mc_loglikelihood`, the Monte-Carlo
estimate of LLaDA's evaluation (`mc_num` noisy copies, default 128, in forwards of
`mc_batch_size`), drawn from a generator seeded by `seed` and the request, so it is
deterministic. Its is-greedy flag is computed only with `greedy_check=true` (one
forward per continuation token); otherwise it is False. loglikelihood_rolling
(perplexity) raises NotImplementedError.

Distributed: under torchrun (WORLD_SIZE > 1) torch.distributed is initialised (NCCL on
CUDA, gloo otherwise), lm-eval gives each rank its share of the requests and gathers
the results through `all_gather` / `gather_object` / `barrier`.
"""
from __future__ import annotations

import hashlib
import logging
import os
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

__all__ = ["EvofastLM", "TASK_DIR", "MODEL_NAME", "main"]

MODEL_NAME = "evofast"
#: evofast's lm-eval task files (the paper's four benchmarks), for `--include_path`
TASK_DIR = Path(__file__).resolve().parent / "lm_eval_tasks"

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}
_READ_GEN_KWARGS = {"until", "max_gen_toks", "max_new_tokens", "skip_special_tokens"}


@dataclass(frozen=True)
class _Request:
    """One generate_until request, planned: its prompt ids and what to do with the output."""
    index: int
    args: tuple
    ids: list
    gen_length: int
    steps: int
    keep_tokens: Optional[int]      # cut the generated tokens to this many (None: all)
    stops: tuple
    skip_special: bool
    seed_key: str                   # the prompt and which repeat of it this is


def _pick_device(device) -> torch.device:
    cuda = torch.cuda.is_available()
    auto = device in (None, "", "auto")
    if "LOCAL_RANK" in os.environ and cuda and (auto or str(device).startswith("cuda")):
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))      # torchrun: one GPU per rank
    if auto:
        return torch.device("cuda" if cuda else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device: expected cpu, cuda or cuda:N, got {device!r}") from None
    if dev.type == "cuda" and not cuda:
        # lm-eval's command line passes --device cuda:0 unless told otherwise
        log.warning("evofast: device %s asked for but CUDA is not available; running on the CPU", device)
        return torch.device("cpu")
    return dev


def _pick_dtype(dtype, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if str(dtype).replace("torch.", "") not in _DTYPES:
        raise ValueError(f"dtype: expected auto, {', '.join(sorted(_DTYPES))}, got {dtype!r}")
    return _DTYPES[str(dtype).replace("torch.", "")]


def _positive(name: str, v) -> int:
    try:
        if isinstance(v, bool) or int(v) != float(v) or int(v) < 1:
            raise ValueError
    except (TypeError, ValueError):
        raise ValueError(f"{name}: expected a positive int, got {v!r}") from None
    return int(v)


def _decoding(mode, gen_length, steps, block_length, k_soft, alpha, temperature, cache, threshold, remasking,
              cache_refresh, compile, backend):
    """The checked decoding settings: (EvalConfig, the extra `generate` keyword arguments)."""
    from ..evaluation import expand_grid
    from ..ops import backends

    config, = expand_grid(mode=mode, gen_lengths=[gen_length], steps=[steps], block_length=block_length,
                          alphas=[alpha], k_soft=k_soft, temperature=temperature, cache=cache, threshold=threshold,
                          remasking=remasking)
    if cache_refresh is not None:
        if cache is None:
            raise ValueError("cache_refresh: needs a cache ('prefix' or 'dual'); got cache=None")
        cache_refresh = _positive("cache_refresh", cache_refresh)
    if not isinstance(compile, bool):
        raise ValueError(f"compile: expected true or false, got {compile!r}")
    if backend is not None and backend not in ("torch", "cpp", "triton", "cuda"):
        raise ValueError(f"backend: expected torch, cpp, triton or cuda, got {backend!r} (usable here: {backends()})")
    return config, dict(cache_refresh=cache_refresh, compile=compile, backend=backend)


def _load(pretrained, tokenizer, device, dtype, lora, merge_lora, trust_remote_code):
    """(model patched for evofast, tokenizer)."""
    from ..models.loading import load_checkpoint, patch_for_generation

    if isinstance(pretrained, torch.nn.Module):
        if tokenizer is None:
            raise ValueError("tokenizer: required when pretrained is a model object")
        model = pretrained.to(device).eval()
    elif isinstance(pretrained, (str, Path)) and Path(pretrained).is_dir():
        model, tok = load_checkpoint(str(pretrained), device, dtype, trust_remote_code, lora=lora,
                                     merge_lora=merge_lora)
        tokenizer = tok if tokenizer is None else tokenizer
    else:
        raise ValueError(f"pretrained: expected a checkpoint directory (or a model object), got {pretrained!r}")
    if isinstance(tokenizer, (str, Path)):
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer), trust_remote_code=trust_remote_code)
    patch_for_generation(model, tokenizer)
    return model, tokenizer


def _cut(text: str, stops) -> str:
    """`text` up to the first occurrence of any stop string."""
    ends = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return text[:min(ends)] if ends else text


def _batch_generator(seed: int, keys) -> torch.Generator:
    digest = hashlib.sha256("\x00".join([str(seed), *keys]).encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


class EvofastLM(LM):
    """lm-eval's `LM` for any model `evofast.patch` supports; see the module doc for the arguments."""

    def __init__(self, pretrained, tokenizer=None, *, lora=None, merge_lora=False, trust_remote_code=False,
                 dtype="auto", device=None, batch_size=1, max_batch_size=None, mode="evotoken", gen_length=256,
                 steps=128, block_length=32, k_soft=3, alpha=0.7, temperature=0.0, remasking="low_confidence",
                 threshold=None, cache=None, cache_refresh=None, compile=False, backend=None, seed=0,
                 mc_num=128, mc_batch_size=32, greedy_check=False, **unknown):
        super().__init__()
        if unknown:
            raise ValueError(f"model_args: unknown argument(s) {sorted(unknown)} for the evofast model")
        if str(batch_size).startswith("auto"):
            raise ValueError("batch_size: 'auto' is not supported by the evofast model; give a number")
        self.batch_size = _positive("batch_size", batch_size)
        self.batch_sizes = {"generate_until": self.batch_size}     # what lm-eval reports as the batch size used
        self.config, self._extra = _decoding(mode, gen_length, steps, block_length, k_soft, alpha, temperature,
                                             cache, threshold, remasking, cache_refresh, compile, backend)
        self.mc_num, self.mc_batch_size = _positive("mc_num", mc_num), _positive("mc_batch_size", mc_batch_size)
        if self.mc_num % self.mc_batch_size:
            raise ValueError(f"mc_batch_size: must divide mc_num={self.mc_num}, got {self.mc_batch_size}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed: expected an int, got {seed!r}")
        self.seed, self.greedy_check = seed, bool(greedy_check)
        self._device = _pick_device(device)
        if self._device.type == "cuda":
            torch.cuda.set_device(self._device)
        self.model, self.tokenizer = _load(pretrained, tokenizer, self._device, _pick_dtype(dtype, self._device),
                                           lora, merge_lora, trust_remote_code)
        from ..evaluation import distributed_context
        self._rank, self._world_size = distributed_context(self._device)
        self._template = None                 # the chat template chosen by chat_template()
        self._chat_used = False               # apply_chat_template has rendered a request
        self._warned = set()
        self.pretrained_name = str(pretrained) if isinstance(pretrained, (str, Path)) else type(pretrained).__name__

    @classmethod
    def create_from_arg_obj(cls, arg_dict, additional_config=None):
        # lm-eval's command line always passes --batch_size (default 1) and --device (default cuda:0):
        # the model arguments name them explicitly, so they win
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in arg_dict}
        return cls(**arg_dict, **extra)

    @classmethod
    def create_from_arg_string(cls, arg_string, additional_config=None):
        from lm_eval.utils import simple_parse_args_string
        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    # ---- what lm-eval reads
    @property
    def eot_token_id(self):
        return self.tokenizer.eos_token_id

    @property
    def max_length(self):
        from ..models import get_adapter
        return get_adapter(self.model).max_length

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "") or self.pretrained_name).replace("/", "__")

    def get_model_info(self) -> dict:
        import evofast
        weights = next(self.model.parameters())
        return {"evofast_version": evofast.__version__, "model_class": type(self.model).__name__,
                "model_dtype": str(weights.dtype), "decoding": self.config.as_dict(),
                "generate_options": {k: v for k, v in self._extra.items() if v is not None},
                "mc_num": self.mc_num, "seed": self.seed}

    def _warn_once(self, key: str, message: str, *args) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(message, *args)

    # ---- chat template
    def chat_template(self, chat_template=False) -> Optional[str]:
        """The template `apply_chat_template` uses: the tokenizer's, or the one of that name when
        the tokenizer has several and `chat_template` names one."""
        template = getattr(self.tokenizer, "chat_template", None)
        if not template:
            raise ValueError(f"apply_chat_template: the tokenizer of {self.pretrained_name} has no chat template")
        if isinstance(template, dict):
            name = chat_template if isinstance(chat_template, str) else "default"
            if name not in template:
                raise ValueError(f"apply_chat_template: no template {name!r}; the tokenizer has {sorted(template)}")
            template = template[name]
        self._template = template
        return template

    def apply_chat_template(self, chat_history, add_generation_prompt=True) -> str:
        """The chat through the template: with the assistant's header (`add_generation_prompt`), or,
        when the last message is the assistant's (a gen_prefix), continuing that message."""
        self._chat_used = True
        continue_final = not add_generation_prompt and bool(chat_history) and chat_history[-1]["role"] == "assistant"
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False, chat_template=self._template,
                                                  add_generation_prompt=add_generation_prompt,
                                                  continue_final_message=continue_final)

    def _encode(self, text: str) -> list:
        bos = getattr(self.tokenizer, "bos_token", None)
        if bos and text.startswith(bos):
            return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return list(self.tokenizer(text)["input_ids"])

    def _fit(self, ids: list, room: int) -> list:
        """`ids` left-truncated so that `room` more positions fit the model's maximum length."""
        limit = self.max_length
        if limit is None or len(ids) + room <= limit:
            return ids
        if room >= limit:
            raise ValueError(f"gen_length: {room} tokens do not fit the model's maximum length {limit}")
        self._warn_once("truncate", "evofast: prompts longer than %d tokens are left-truncated to fit the model's "
                                    "maximum length %d", limit - room, limit)
        return ids[len(ids) + room - limit:]

    # ---- generate_until
    def _plan(self, index: int, args: tuple, seen: Counter) -> _Request:
        context, gen_kwargs = args
        gen_kwargs = dict(gen_kwargs or {})
        ignored = sorted(set(gen_kwargs) - _READ_GEN_KWARGS)
        if ignored:
            self._warn_once(f"ignored {ignored}", "evofast: generation kwargs %s are ignored; decoding settings come "
                            "from the model arguments (%s)", {k: gen_kwargs[k] for k in ignored}, self.config.name)
        until = gen_kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        skip_special = gen_kwargs.get("skip_special_tokens", True)
        if not isinstance(skip_special, bool):
            raise ValueError(f"skip_special_tokens: expected true or false, got {skip_special!r}")
        eos = getattr(self.tokenizer, "eos_token", None)
        if skip_special and eos and eos not in until:
            until.append(eos)
        c = self.config
        max_toks = gen_kwargs.get("max_gen_toks", gen_kwargs.get("max_new_tokens"))
        if max_toks is None:
            gen, steps, keep = c.gen_length, c.steps, None
        else:
            keep = _positive("max_gen_toks", max_toks)
            blocks = -(-keep // c.block_length)
            gen, steps = blocks * c.block_length, blocks * (c.steps // (c.gen_length // c.block_length))
            keep = keep if keep < gen else None
        seen[context] += 1
        return _Request(index, args, self._fit(self._encode(context), gen), gen, steps, keep, tuple(until),
                        skip_special, f"{seen[context]}:{context}")

    def _strip_special(self, text: str) -> str:
        for token in sorted(getattr(self.tokenizer, "all_special_tokens", []), key=len, reverse=True):
            text = text.replace(token, "")
        return text

    def _generate_batch(self, batch) -> list:
        from ..chat import left_pad, pad_id_of
        from ..generation import generate

        ids, am = left_pad([r.ids for r in batch], pad_id_of(self.tokenizer), self._device)
        config = replace(self.config, gen_length=batch[0].gen_length, steps=batch[0].steps)
        gen = _batch_generator(self.seed, [r.seed_key for r in batch]) if config.temperature > 0 else None
        out = generate(self.model, ids, am, generator=gen, **config.generate_kwargs(), **self._extra)
        texts = []
        for r, row in zip(batch, out[:, ids.shape[1]:].tolist()):
            text = _cut(self.tokenizer.decode(row[:r.keep_tokens], skip_special_tokens=False), r.stops)
            texts.append(self._strip_special(text) if r.skip_special else text)
        return texts

    def generate_until(self, requests, disable_tqdm: bool = False) -> list:
        from lm_eval.models.utils import Collator
        from tqdm.auto import tqdm

        if not requests:
            return []
        if not self._chat_used and getattr(self.tokenizer, "chat_template", None) and any(
                str(getattr(r, "task_name", "")).startswith("evofast_") for r in requests):
            self._warn_once("chat", "evofast: the evofast_* tasks prompt as the authors do only through the chat "
                                    "template: run them with --apply_chat_template")
        seen = Counter()
        plans = [self._plan(i, r.args, seen) for i, r in enumerate(requests)]
        order = Collator(plans, sort_fn=lambda r: (-len(r.ids), r.index),
                         group_fn=lambda r: {"gen_length": r.gen_length, "steps": r.steps}, group_by="gen_kwargs")
        bar = tqdm(total=len(plans), disable=disable_tqdm or self.rank != 0, desc="evofast generate_until")
        texts = []
        for batch in order.get_batched(n=self.batch_size):
            for r, text in zip(batch, self._generate_batch(batch)):
                self.cache_hook.add_partial("generate_until", r.args, text)
                texts.append(text)
            bar.update(len(batch))
        bar.close()
        return order.get_original(texts)

    # ---- likelihoods
    def _encode_pair(self, context: str, continuation: str):
        """(context ids, continuation ids), the continuation's being the tail of the whole text's
        (trailing spaces of the context move to the continuation, as lm-eval's models do); an
        empty context is the tokenizer's BOS (else EOS) token."""
        if not context:
            prefix = self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else self.eot_token_id
            return [int(prefix)], list(self.tokenizer(continuation, add_special_tokens=False)["input_ids"])
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole, ctx = self._encode(context + continuation), self._encode(context)
        return whole[:len(ctx)], whole[len(ctx):]

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list:
        """[(log p(continuation | context), is_greedy)] by the Monte-Carlo estimate (module doc)."""
        from tqdm.auto import tqdm

        from .likelihood import greedy_matches, mc_loglikelihood

        out = []
        for req in tqdm(requests, disable=disable_tqdm or self.rank != 0, desc="evofast loglikelihood"):
            context, continuation = req.args
            ctx, cont = self._encode_pair(context, continuation)
            if not cont:
                raise ValueError(f"loglikelihood: the continuation {continuation!r} encodes to no tokens")
            ctx = self._fit(ctx, len(cont))
            gen = _batch_generator(self.seed, [repr(ctx), repr(cont)])
            logp = mc_loglikelihood(self.model, ctx, cont, mc_num=self.mc_num, batch_size=self.mc_batch_size,
                                    generator=gen)
            greedy = self.greedy_check and greedy_matches(self.model, ctx, cont)
            self.cache_hook.add_partial("loglikelihood", req.args, (logp, greedy))
            out.append((logp, greedy))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list:
        raise NotImplementedError(
            "evofast: loglikelihood_rolling (perplexity tasks such as wikitext) is not supported: a masked diffusion "
            "model gives no left-to-right token probabilities, only a bound on a text's likelihood; use "
            "generate_until tasks, or loglikelihood / multiple-choice tasks (a Monte-Carlo estimate)")

    # ---- torch.distributed, for lm-eval's data parallelism
    def all_gather(self, tensor):
        if self.world_size == 1:
            return tensor
        import torch.distributed as dist
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor.contiguous())
        return torch.stack(parts) if tensor.dim() == 0 else torch.cat(parts)

    def gather_object(self, obj, dst=0):
        if self.world_size == 1:
            return [obj]
        import torch.distributed as dist
        out = [None] * self.world_size if self.rank == dst else None
        dist.gather_object(obj, out, dst=dst)
        return out

    def barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist
            dist.barrier()


def main(argv=None) -> int:
    """lm-eval's command line (`lm-eval ARGS`) with the "evofast" model registered and, unless
    --include_path is given, evofast's task directory included."""
    import sys

    from lm_eval.__main__ import cli_evaluate

    args = list(sys.argv[1:] if argv is None else argv)
    asks_help = {"-h", "--help"} & set(args)
    if args and not asks_help and not any(a == "--include_path" or a.startswith("--include_path=") for a in args):
        args += ["--include_path", str(TASK_DIR)]
    sys.argv = ["lm-eval", *args]
    cli_evaluate()
    return 0


if __name__ == "__main__":
    # run as a script, this file is not the importable module that registers the model: import that
    from evofast.integrations.lm_eval import main as _main
    raise SystemExit(_main())
else:
    import lm_eval.models  # noqa: F401  (lm-eval's own models first: its registry skips them once one is there)
    register_model(MODEL_NAME)(EvofastLM)
