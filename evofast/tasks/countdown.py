"""Countdown: reach a target from given numbers with + - * /, each number used at most once.

Expressions are evaluated by walking their `ast` (never `eval`) with an `Arithmetic`
policy: which operators and literals are accepted, whether arithmetic is exact
(`fractions.Fraction`) or Python's own (ints and floats, as `eval` would compute),
and bounds on the text, the literals and every intermediate value, so no input can
run code, raise, or take long. `safe_arith` is the strict exact policy of the
synthetic task; the paper's Countdown rule (`evofast.tasks.paper_rules`) uses a
Python-semantics policy.
"""
from __future__ import annotations

import ast
import operator
import random
from collections import Counter
from fractions import Fraction
from typing import Optional, Sequence

from .base import Example, Task

__all__ = ["Arithmetic", "safe_arith", "check_countdown", "make_countdown", "Countdown"]

MAX_TEXT = 64                 # characters of an expression the synthetic checker reads
MAX_LITERAL = 10 ** 6
MAX_VALUE = 10 ** 12          # intermediate values beyond this are rejected (no huge products)

_ALLOWED = set("0123456789+-*/() ")
_ARITH = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv}
_BINARY = {"+": (ast.Add, operator.add), "-": (ast.Sub, operator.sub), "*": (ast.Mult, operator.mul),
           "/": (ast.Div, operator.truediv), "//": (ast.FloorDiv, operator.floordiv), "**": (ast.Pow, operator.pow)}
_UNARY = {"-": (ast.USub, operator.neg), "+": (ast.UAdd, operator.pos)}


class _Reject(Exception):
    pass


class Arithmetic:
    """A bounded evaluator of arithmetic text: `policy(text) -> (value, literals)` or None.

    ops:       the binary operators accepted, among "+ - * / // **"
    unary:     the unary operators accepted, among "- +"
    floats:    accept float literals ("3.5", "3.", ".5") besides decimal ints
    exact:     literals become `Fraction`s (exact arithmetic, "/" exact); otherwise they
               stay Python numbers and every operator does what it does in Python
               (int / int is a float, (-8) ** 0.5 is complex...), as `eval` would
    max_text:  longer texts are rejected unread
    max_value: a bound on the magnitude of ints and Fractions (and on a Fraction's
               denominator), literal or intermediate; a power whose result would pass it
               is rejected before it is computed. Floats and complex numbers have a
               fixed size and are not bounded (an overflow is rejected as an error).
    max_literal: a bound on int literals (default max_value)

    Anything else (names, calls, strings, comparisons, other operators), a syntax
    error, an arithmetic error (division by zero, float overflow, a complex operand
    where Python refuses one) or a nesting too deep to walk gives None."""

    def __init__(self, *, ops: str, unary: str, floats: bool, exact: bool, max_text: int, max_value: int,
                 max_literal: Optional[int] = None):
        self.ops = dict(_BINARY[o] for o in ops.split())          # ast node type -> operator
        self.unary = dict(_UNARY[o] for o in unary.split())
        self.literals = (int, float) if floats else (int,)
        self.exact, self.max_text, self.max_value = exact, max_text, max_value
        self.max_literal = max_value if max_literal is None else max_literal

    def __call__(self, text: str) -> Optional[tuple]:
        if not isinstance(text, str) or len(text) > self.max_text:
            return None
        try:
            tree = ast.parse(text.strip(), mode="eval")
            literals: list = []
            return self._walk(tree.body, literals), literals
        except (SyntaxError, ValueError, _Reject, RecursionError, MemoryError):
            return None

    def _fits(self, v, bound: int) -> bool:
        if isinstance(v, Fraction):
            return abs(v) <= bound and v.denominator <= bound
        if isinstance(v, int):
            return abs(v) <= bound
        return True                                  # float, complex: fixed size

    def _walk(self, node, literals: list):
        if isinstance(node, ast.Constant) and type(node.value) in self.literals:
            if not self._fits(node.value, self.max_literal):
                raise _Reject("literal too large")
            literals.append(node.value)
            return Fraction(node.value) if self.exact else node.value
        if isinstance(node, ast.UnaryOp):
            # a chain of signs ("---5") is unwound in a loop: Python's parser accepts ~2900 of
            # them, far more than this walk could recurse into
            signs = []
            while isinstance(node, ast.UnaryOp) and type(node.op) in self.unary:
                signs.append(self.unary[type(node.op)])
                node = node.operand
            value = self._walk(node, literals)
            for sign in reversed(signs):
                value = sign(value)
            return value
        if isinstance(node, ast.BinOp) and type(node.op) in self.ops:
            a, b = self._walk(node.left, literals), self._walk(node.right, literals)
            if isinstance(node.op, ast.Pow) and self._power_too_large(a, b):
                raise _Reject("power too large")
            try:
                v = self.ops[type(node.op)](a, b)
            except (ArithmeticError, TypeError, ValueError) as e:   # 1/0, float overflow, complex // ...
                raise _Reject(str(e)) from None
            if not self._fits(v, self.max_value):
                raise _Reject("value too large")
            return v
        raise _Reject(f"node {type(node).__name__}")  # names, calls, strings, other operators...

    def _power_too_large(self, base, exp) -> bool:
        # only an int to a large non-negative int power grows without bound (and takes long);
        # float powers overflow into an error, negative powers are floats
        if not (type(base) is int and type(exp) is int) or exp <= 0 or abs(base) <= 1:
            return False
        return (abs(base).bit_length() - 1) * exp > self.max_value.bit_length()


_SYNTHETIC = Arithmetic(ops="+ - * /", unary="-", floats=False, exact=True, max_text=MAX_TEXT,
                        max_value=MAX_VALUE, max_literal=MAX_LITERAL)


def safe_arith(text: str) -> Optional[tuple]:
    """`(value: Fraction, literals: list[int])` of an arithmetic expression, or None when
    the text is not one (any character but digits, + - * /, parentheses and spaces; any
    syntax but decimal ints, the four operators, unary minus and parentheses), is longer
    than MAX_TEXT, divides by zero, or leaves the bounds. Never evaluates code."""
    if not isinstance(text, str) or not set(text) <= _ALLOWED:
        return None                 # the character set alone rules out names, calls, 0x10, 1e3, 1_000...
    return _SYNTHETIC(text)


def check_countdown(expression: str, numbers: Sequence[int], target: int) -> bool:
    """True when `expression` uses only `numbers` (each at most as often as given) and equals `target`."""
    got = safe_arith(expression)
    if got is None:
        return False
    value, literals = got
    if Counter(literals) - Counter(numbers):
        return False
    return value == target


def make_countdown(rng: random.Random, count: int = 3, lo: int = 1, hi: int = 12, max_target: int = 999):
    """`(numbers, expression, target)`: `count` numbers in [lo, hi] and an expression that
    combines all of them (left to right, random operators; divisions only when exact) to
    a positive integer target <= max_target."""
    while True:
        nums = [rng.randint(lo, hi) for _ in range(count)]
        order = nums[:]
        rng.shuffle(order)
        expr, value = str(order[0]), Fraction(order[0])
        for n in order[1:]:
            op = rng.choice("+-*/")
            if op == "/" and (n == 0 or (value / n).denominator != 1):
                op = "+"
            new = _ARITH[op](value, n)
            # parenthesise the left side when the new operator binds tighter than its last one
            if op in "*/" and any(c in expr for c in "+-"):
                expr = f"({expr})"
            expr, value = f"{expr}{op}{n}", new
        if value.denominator == 1 and 0 < value <= max_target:
            return nums, expr, int(value)


class Countdown(Task):
    """Prompt "3,5,2:16=" (the numbers, the target), response an expression that reaches
    the target, e.g. "(3+5)*2". Any correct expression counts, not only the generated one.

    `aligned=1` writes every number right-aligned in a field of spaces, " 3, 5, 2: 16=", so
    every prompt is exactly `prompt_length` characters: each digit sits at a fixed position
    (as the arithmetic tasks' zero-padded operands do), and a batch needs no padding, so
    training that cannot mask pad tokens (CTS) sees the layout decoding sees."""

    name = "countdown-synth"
    stream_key = "countdown"     # its name until the paper's Countdown took it: the same seeds, the same problems
    TARGET_WIDTH = 3             # make_countdown's targets are at most 999

    def __init__(self, count: int = 3, hi: int = 12, aligned: int = 0):
        if isinstance(count, bool) or not isinstance(count, int) or not 2 <= count <= 5:
            raise ValueError(f"count: must be an int in 2..5, got {count!r}")
        if isinstance(hi, bool) or not isinstance(hi, int) or not 2 <= hi <= 99:
            raise ValueError(f"hi: must be an int in 2..99, got {hi!r}")
        if aligned not in (0, 1) or isinstance(aligned, bool):
            raise ValueError(f"aligned: must be 0 or 1, got {aligned!r}")
        self.count, self.hi, self.aligned = count, hi, aligned
        self.width = len(str(hi))
        self.prompt_length = count * (self.width + 1) + 1 + self.TARGET_WIDTH
        expr = count * self.width + (count - 1) + 2 * (count - 2)     # numbers, operators, parentheses
        self.gen_length = -(-(expr + 1) // 8) * 8

    def params(self) -> dict:
        return {"count": self.count, "hi": self.hi, **({"aligned": 1} if self.aligned else {})}

    def make(self, rng: random.Random) -> Example:
        nums, expr, target = make_countdown(rng, self.count, 1, self.hi)
        return self._example(nums, target, expr)

    def example(self, *values: int) -> Example:
        """The example of a prompt's integers in prompt order: the numbers, then the target
        (`task.example(*numbers, target)`; its response is empty, any correct expression counts)."""
        if len(values) != self.count + 1:
            raise ValueError(f"values: expected {self.count} numbers and a target, got {list(values)!r}")
        return self._example(values[:-1], values[-1], "")

    def _example(self, numbers: Sequence[int], target: int, expression: str) -> Example:
        if not all(isinstance(n, int) and 1 <= n <= self.hi for n in numbers):
            raise ValueError(f"numbers: expected {self.count} ints in 1..{self.hi}, got {list(numbers)!r}")
        if not isinstance(target, int) or not 0 < target < 10 ** self.TARGET_WIDTH:
            raise ValueError(f"target: expected an int in 1..{10 ** self.TARGET_WIDTH - 1}, got {target!r}")
        if self.aligned:
            prompt = ",".join(f"{n:>{self.width}}" for n in numbers) + f":{target:>{self.TARGET_WIDTH}}="
        else:
            prompt = f"{','.join(map(str, numbers))}:{target}="
        return Example(prompt, expression, str(target), tuple(numbers))

    def extract(self, example: Optional[Example], text: str) -> Optional[str]:
        text = text.split("<")[0].strip()    # up to the first special token
        return text or None

    def check(self, example: Example, text: str) -> bool:
        expr = self.extract(example, text)
        return expr is not None and check_countdown(expr, example.meta, int(example.answer))
