"""`CTSCollator`: the noising of docs/semantics.md §3, vectorised over the batch.

Per batch: right-pad to the longest example; with probability `extra_pad_prob`
(0.5; a quirk of the authors' collator) append 1..`max_extra_pad` (10) more pad tokens
to every row (they are ordinary supervised tokens; never past `max_length`); draw `d` from `per_de_nums` and a block length `Lb`
from `block_sizes`; clip `Lb` to `N - max(P)`; if `K * d >= Lb`, `Lb = K * d + 1`.
Per row: block start uniform in `[P, N - Lb]` (`N - Lb` when that range is
empty), a random permutation `perm` of the block, `m` uniform in `[0, Lb - K d]`;
positions `st + perm[m:]` and everything after the block are masked, and
`next[k, j] = st + perm[m + k d + j]`. Uniform integers are `floor(u * n)`,
permutations `argsort` of uniforms, so the distribution is the one docs/semantics.md describes.

Two options (off by default: the spec's draws) make the blocks look like decoding's:
`exact_blocks` keeps `Lb` as drawn (never raised to `K d + 1`; a `d` with `K d > Lb` is
not drawn, so `K d == Lb` is a whole block decoded over the trajectory, as decoding at
`d` tokens per step with `K` steps per block does) and `grid_starts` puts the block on
decoding's grid, `st = P + j * Lb` with `j` uniform over the blocks that fit in the
row, so it never starts inside the prompt or between two decoding blocks. With
`extra_pad_prob=0` and examples of one length (prompt width + generation length),
every CTS block is a block decoding sees.

The two halves are separate methods: `pad` (deterministic: drops unusable examples,
pads) and `noise(padded, generator)` (every random draw). The draws of a call come
from a generator derived from `(seed, call number)` (`derived_generator`), not from
one stream, so a batch's noise is a function of where it stands in the run:
`CTSTrainer` calls `noise` itself with a generator derived from the seed and the
optimizer step, which is what makes a resumed run draw what the uninterrupted one
drew. A `generator` passed explicitly is used as one stream instead.
"""
from __future__ import annotations

import hashlib
import numbers
from collections import Counter
from typing import Optional, Sequence

import torch
from torch import Tensor


def derived_generator(seed: int, *key) -> torch.Generator:
    """A CPU `torch.Generator` seeded from `(seed, *key)` by a stable hash (same key, same draws,
    in any process and after any restart)."""
    digest = hashlib.blake2b(repr((int(seed),) + tuple(key)).encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & ((1 << 63) - 1))


def _positive_ints(name: str, values) -> tuple:
    try:
        vals = tuple(values)
    except TypeError:
        raise ValueError(f"{name}: expected a non-empty sequence of positive ints, got {values!r}") from None
    if not vals or any(isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1 for v in vals):
        raise ValueError(f"{name}: expected a non-empty sequence of positive ints, got {values!r}")
    return tuple(int(v) for v in vals)


class CTSCollator:
    """Turns a list of `{"input_ids": (n,) ids, "prompt_length": int}` into a CTS batch.

    Returns a dict of `input_ids (B, N)` (noised), `labels (B, N)` (clean ids),
    `prompt_lengths (B,)`, `block_start (B,)`, `block_end (B,)` (inclusive) and
    `next_positions (B, K, d)`, all int64 on the CPU. Unusable examples (no response
    token, longer than `max_length`, malformed) are dropped and counted in
    `self.dropped`; a batch left empty raises ValueError. `split_usable` finds them
    up front. Without `generator`, call i draws from `derived_generator(seed, "batch", i)`.
    """

    def __init__(self, mask_id: int, pad_id: int, K: int = 4, per_de_nums: Sequence[int] = (1, 2, 4, 8),
                 block_sizes: Sequence[int] = (512,), generator: Optional[torch.Generator] = None, *,
                 seed: int = 0, max_length: Optional[int] = None, extra_pad_prob: float = 0.5,
                 max_extra_pad: int = 10, exact_blocks: bool = False, grid_starts: bool = False):
        for name, v in (("mask_id", mask_id), ("pad_id", pad_id), ("K", K), ("max_extra_pad", max_extra_pad),
                        ("seed", seed)):
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 0:
                raise ValueError(f"{name}: expected a non-negative int, got {v!r}")
        if K < 1:
            raise ValueError(f"K: the number of trajectory steps must be >= 1, got {K}")
        self.mask_id, self.pad_id, self.K = int(mask_id), int(pad_id), int(K)
        self.per_de_nums = _positive_ints("per_de_nums", per_de_nums)
        self.block_sizes = _positive_ints("block_sizes", block_sizes)
        if max_length is not None:
            if isinstance(max_length, bool) or not isinstance(max_length, numbers.Integral) or max_length < 2:
                raise ValueError(f"max_length: expected an int >= 2 or None, got {max_length!r}")
            worst = self.K * max(self.per_de_nums)
            if worst >= max_length:
                raise ValueError(f"K * d = {self.K} * {max(self.per_de_nums)} = {worst} >= max_length={max_length}: "
                                 "a block of K * d + 1 positions never fits; lower K or per_de_nums")
        self.max_length = None if max_length is None else int(max_length)
        if not 0.0 <= float(extra_pad_prob) <= 1.0:
            raise ValueError(f"extra_pad_prob: expected a probability in [0, 1], got {extra_pad_prob!r}")
        self.extra_pad_prob = float(extra_pad_prob)
        self.max_extra_pad = int(max_extra_pad)
        for name, v in (("exact_blocks", exact_blocks), ("grid_starts", grid_starts)):
            if not isinstance(v, bool):
                raise ValueError(f"{name}: expected a bool, got {v!r}")
        self.exact_blocks, self.grid_starts = exact_blocks, grid_starts
        if generator is not None and not isinstance(generator, torch.Generator):
            raise ValueError(f"generator: expected a torch.Generator, got {type(generator).__name__}")
        self.generator = generator
        self.seed = int(seed)
        self.calls = 0
        self.dropped = 0

    # -- examples ----------------------------------------------------------------------
    def _usable(self, ex) -> tuple:
        """((ids (n,) int64, prompt length), None) or (None, why the example cannot be trained on)."""
        try:
            ids = ex["input_ids"]
            plen = ex["prompt_length"] if "prompt_length" in ex else ex["prompt_lengths"]
            ids = torch.as_tensor(ids).reshape(-1)
            plen = int(torch.as_tensor(plen).reshape(-1)[0]) if isinstance(plen, (Tensor, list, tuple)) else int(plen)
        except (KeyError, TypeError, ValueError, IndexError):
            return None, "malformed"
        if ids.dtype.is_floating_point or ids.dtype == torch.bool or plen < 0:
            return None, "malformed"
        if plen >= ids.numel():
            return None, "no response token"
        if self.max_length is not None and ids.numel() > self.max_length:
            return None, f"longer than max_length {self.max_length}"
        return (ids.to(torch.int64), plen), None

    def split_usable(self, examples: Sequence[dict]) -> tuple:
        """(the usable examples, Counter of the reasons the others are not), counting nothing."""
        kept, why = [], Counter()
        for ex in examples:
            got, reason = self._usable(ex)
            if got is None:
                why[reason] += 1
            else:
                kept.append(ex)
        return kept, why

    def pad(self, examples: Sequence[dict]) -> dict:
        """The deterministic half: `{"input_ids": clean ids (B, N) right-padded, "prompt_lengths": (B,)}`
        of the usable examples (the others counted in `self.dropped`)."""
        rows = []
        for ex in examples:
            got, _ = self._usable(ex)
            if got is None:
                self.dropped += 1
            else:
                rows.append(got)
        if not rows:
            raise ValueError(f"CTSCollator: every example of this batch was unusable ({len(examples)} dropped: "
                             "no response token, longer than max_length, or malformed)")
        N = max(r[0].numel() for r in rows)
        clean = torch.full((len(rows), N), self.pad_id, dtype=torch.int64)
        for b, (ids, _) in enumerate(rows):
            clean[b, :ids.numel()] = ids
        return {"input_ids": clean, "prompt_lengths": torch.tensor([r[1] for r in rows], dtype=torch.int64)}

    def __call__(self, examples: Sequence[dict]) -> dict:
        gen = self.generator if self.generator is not None else derived_generator(self.seed, "batch", self.calls)
        self.calls += 1
        return self.noise(self.pad(examples), gen)

    def _exact_block(self, room: int, choice) -> tuple:
        """(d, Lb) under `exact_blocks`: Lb drawn from the block sizes that fit after every
        prompt (`room` positions), d from those with K d <= Lb."""
        sizes = tuple(b for b in self.block_sizes if b <= room)
        if not sizes:
            raise ValueError(f"block_sizes: exact_blocks needs a block of {min(self.block_sizes)} positions after "
                             f"the longest prompt, but only {room} follow it")
        Lb = choice(sizes)
        fits = tuple(d for d in self.per_de_nums if self.K * d <= Lb)
        if not fits:
            raise ValueError(f"per_de_nums: exact_blocks needs K * d <= the block length {Lb}, got K = {self.K} "
                             f"and d in {list(self.per_de_nums)}")
        return choice(fits), Lb

    # -- draws -------------------------------------------------------------------------
    def noise(self, padded: dict, generator: torch.Generator) -> dict:
        """The random half: the CTS batch of a `pad` output, every draw from `generator`."""
        def u(*shape) -> Tensor:
            return torch.rand(shape, generator=generator, dtype=torch.float64)

        def randint(lo: Tensor, hi: Tensor) -> Tensor:      # uniform in [lo, hi] (inclusive), elementwise
            return lo + (u(*lo.shape) * (hi - lo + 1)).long().clamp_max(hi - lo)

        def choice(values: tuple) -> int:
            return values[int(u(1) * len(values)) % len(values)]

        clean, P = padded["input_ids"], padded["prompt_lengths"]
        B, N = clean.shape
        if float(u(1)) < self.extra_pad_prob:                           # the authors' extra supervised pads
            N += 1 + int(u(1) * self.max_extra_pad) % self.max_extra_pad if self.max_extra_pad else 0
            if self.max_length is not None:                             # never past what the model takes
                N = max(min(N, self.max_length), clean.shape[1])
            clean = torch.cat([clean, clean.new_full((B, N - clean.shape[1]), self.pad_id)], dim=1)

        K = self.K
        if self.exact_blocks:
            d, Lb = self._exact_block(N - int(P.max()), choice)
        else:
            fits = tuple(d for d in self.per_de_nums if K * d < N)   # the authors' code asserts; we skip such d
            if not fits:
                raise ValueError(f"K * d = {K} * {min(self.per_de_nums)} >= sequence length {N}: a block of "
                                 "K * d + 1 positions does not fit; lower K or per_de_nums, or train on longer "
                                 "examples")
            d = choice(fits)
            Lb = min(choice(self.block_sizes), N - int(P.max()))
            if K * d >= Lb:
                Lb = K * d + 1
        if self.grid_starts:                                              # P + j Lb, j over the blocks that fit
            if Lb > N - int(P.max()):
                raise ValueError(f"grid_starts: a block of {Lb} positions (K * d + 1) does not fit after the "
                                 f"longest prompt ({N - int(P.max())} positions follow it); use exact_blocks")
            j = randint(torch.zeros(B, dtype=torch.int64), (N - P) // Lb - 1)
            st = P + j * Lb
        else:
            hi = torch.full((B,), N - Lb, dtype=torch.int64)
            st = torch.where(P >= hi, hi, randint(P.clamp_max(N - Lb), hi))
        en = st + Lb - 1
        perm = torch.argsort(u(B, Lb), dim=1)                             # a uniform permutation per row
        m = randint(torch.zeros(B, dtype=torch.int64), torch.full((B,), Lb - K * d, dtype=torch.int64))
        rank = torch.argsort(perm, dim=1)                                 # rank[o] = index of offset o in perm
        pos = torch.arange(N)
        offset = (pos[None, :] - st[:, None]).clamp(0, Lb - 1)
        in_block = (pos[None, :] >= st[:, None]) & (pos[None, :] <= en[:, None])
        masked = (in_block & (rank.gather(1, offset) >= m[:, None])) | (pos[None, :] > en[:, None])
        slots = m[:, None] + torch.arange(K * d)[None, :]                 # (B, K d) indices into perm
        nxt = (st[:, None] + perm.gather(1, slots)).view(B, K, d)
        return {
            "input_ids": torch.where(masked, self.mask_id, clean),
            "labels": clean,
            "prompt_lengths": P,
            "block_start": st,
            "block_end": en,
            "next_positions": nxt,
        }
