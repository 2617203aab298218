"""Multi-digit addition and multiplication with worked steps, column by column.

    addition        347+085=   ->  7+5+0=12,4+8+1=13,3+0+1=04;432
    multiplication  347*6=     ->  7*6+0=42,4*6+4=28,3*6+2=20;2082

Each step is one column from the right: the digits, the carry in, and the two-digit
column result (its first digit is the carry out). The answer follows the last ';'.
Operands are written zero-padded to `digits` places, so every problem has the same
layout (each digit at a fixed position): a small model learns the copying quickly.
"""
from __future__ import annotations

import random

from .base import Example, Task

__all__ = ["Addition", "Multiplication"]


def _digits(name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 6:
        raise ValueError(f"{name}: must be an int in 1..6, got {v!r}")
    return v


def _operand(rng: random.Random, max_digits: int) -> int:
    # the number of digits first, so short operands are as common as long ones
    d = rng.randint(1, max_digits)
    return rng.randint(0 if d == 1 else 10 ** (d - 1), 10 ** d - 1)


class _ColumnTask(Task):
    """What addition and multiplication share: `digits`, and the response length of one
    step per column and an answer of up to digits + 1 digits."""

    def __init__(self, digits: int = 3):
        self.digits = _digits("digits", digits)
        steps = self.digits * 9 - 1                      # "a+b+c=ss," / "a*b+c=ss," per column
        self.gen_length = -(-(steps + 1 + self.digits + 1 + 1) // 8) * 8   # ';', answer, eos; multiple of 8

    def params(self) -> dict:
        return {"digits": self.digits}


class Addition(_ColumnTask):
    """a + b with a, b of 1..digits digits."""

    name = "add"

    def __init__(self, digits: int = 3):
        super().__init__(digits)
        self.prompt_length = 2 * self.digits + 2            # "ddd+ddd="

    def make(self, rng: random.Random) -> Example:
        a, b = _operand(rng, self.digits), _operand(rng, self.digits)
        return self.example(a, b)

    def example(self, a: int, b: int) -> Example:
        if not (0 <= a < 10 ** self.digits and 0 <= b < 10 ** self.digits):
            raise ValueError(f"a, b: must lie in [0, 10**{self.digits}), got {a}, {b}")
        sa, sb = str(a).zfill(self.digits), str(b).zfill(self.digits)
        steps, carry = [], 0
        for x, y in zip(map(int, sa[::-1]), map(int, sb[::-1])):
            s = x + y + carry
            steps.append(f"{x}+{y}+{carry}={s:02d}")
            carry = s // 10
        return Example(f"{sa}+{sb}=", ",".join(steps) + f";{a + b}", str(a + b))


class Multiplication(_ColumnTask):
    """a * b with a of 1..digits digits and b a single digit."""

    name = "mul"

    def __init__(self, digits: int = 3):
        super().__init__(digits)
        self.prompt_length = self.digits + 3                 # "ddd*d="

    def make(self, rng: random.Random) -> Example:
        return self.example(_operand(rng, self.digits), rng.randint(0, 9))

    def example(self, a: int, b: int) -> Example:
        if not (0 <= a < 10 ** self.digits and 0 <= b <= 9):
            raise ValueError(f"a, b: must lie in [0, 10**{self.digits}) and [0, 9], got {a}, {b}")
        sa = str(a).zfill(self.digits)
        steps, carry = [], 0
        for ch in sa[::-1]:
            s = int(ch) * b + carry
            steps.append(f"{ch}*{b}+{carry}={s:02d}")
            carry = s // 10
        return Example(f"{sa}*{b}=", ",".join(steps) + f";{a * b}", str(a * b))
