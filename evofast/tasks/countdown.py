"""Countdown: reach a target from given numbers with + - * /, each number used at most once.

The answer is checked by walking the `ast` of the expression (never `eval`): only
integer literals, the four binary operators, unary minus and parentheses are
accepted, arithmetic is exact (`fractions.Fraction`), and the size of the text,
of each literal and of every intermediate value is bounded, so no input can run
code, raise, or take long.
"""
from __future__ import annotations

import ast
import operator
import random
from collections import Counter
from fractions import Fraction
from typing import Optional, Sequence

from .base import Example, Task

__all__ = ["safe_arith", "check_countdown", "make_countdown", "Countdown"]

MAX_TEXT = 64                 # characters of an expression the checker reads
MAX_LITERAL = 10 ** 6
MAX_VALUE = 10 ** 12          # intermediate values beyond this are rejected (no huge products)

_ALLOWED = set("0123456789+-*/() ")
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}
_ARITH = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv}


class _Reject(Exception):
    pass


def _walk(node, literals: list) -> Fraction:
    if isinstance(node, ast.Expression):
        return _walk(node.body, literals)
    if isinstance(node, ast.Constant) and type(node.value) is int:
        if node.value > MAX_LITERAL:
            raise _Reject("literal too large")
        literals.append(node.value)
        return Fraction(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -_walk(node.operand, literals)
    if isinstance(node, ast.BinOp):
        a, b = _walk(node.left, literals), _walk(node.right, literals)
        if isinstance(node.op, ast.Div):
            if b == 0:
                raise _Reject("division by zero")
            v = a / b
        elif type(node.op) in _OPS:
            v = _OPS[type(node.op)](a, b)
        else:                                   # Pow, Mod, FloorDiv, bit ops...: not Countdown
            raise _Reject(f"operator {type(node.op).__name__}")
        if abs(v) > MAX_VALUE or v.denominator > MAX_VALUE:
            raise _Reject("value too large")
        return v
    raise _Reject(f"node {type(node).__name__}")  # names, calls, attributes, strings, floats...


def safe_arith(text: str) -> Optional[tuple]:
    """`(value: Fraction, literals: list[int])` of an arithmetic expression, or None when
    the text is not one (any character but digits, + - * /, parentheses and spaces; any
    syntax but decimal ints, the four operators, unary minus and parentheses), is longer
    than MAX_TEXT, divides by zero, or leaves the bounds. Never evaluates code."""
    if not isinstance(text, str) or len(text) > MAX_TEXT or not set(text) <= _ALLOWED:
        return None                 # the character set alone rules out names, calls, 0x10, 1e3, 1_000...
    try:
        tree = ast.parse(text.strip(), mode="eval")
        literals: list = []
        return _walk(tree, literals), literals
    except (SyntaxError, ValueError, _Reject, RecursionError, MemoryError):
        return None


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
    the target, e.g. "(3+5)*2". Any correct expression counts, not only the generated one."""

    name = "countdown"

    def __init__(self, count: int = 3, hi: int = 12):
        if isinstance(count, bool) or not isinstance(count, int) or not 2 <= count <= 5:
            raise ValueError(f"count: must be an int in 2..5, got {count!r}")
        if isinstance(hi, bool) or not isinstance(hi, int) or not 2 <= hi <= 99:
            raise ValueError(f"hi: must be an int in 2..99, got {hi!r}")
        self.count, self.hi = count, hi
        width = len(str(hi))
        self.prompt_length = count * (width + 1) + 4
        expr = count * width + (count - 1) + 2 * (count - 2)     # numbers, operators, parentheses
        self.gen_length = -(-(expr + 1) // 8) * 8

    def params(self) -> dict:
        return {"count": self.count, "hi": self.hi}

    def make(self, rng: random.Random) -> Example:
        nums, expr, target = make_countdown(rng, self.count, 1, self.hi)
        return Example(f"{','.join(map(str, nums))}:{target}=", expr, str(target), tuple(nums))

    def extract(self, text: str) -> Optional[str]:
        text = text.split("<")[0].strip()    # up to the first special token
        return text or None

    def check(self, example: Example, text: str) -> bool:
        expr = self.extract(text)
        return expr is not None and check_countdown(expr, example.meta, int(example.answer))
