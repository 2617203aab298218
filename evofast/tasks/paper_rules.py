"""The answer-checking rules the EvoToken authors score their four benchmarks with.

Each rule reads the decoded generation (the authors decode the generated tokens with
`skip_special_tokens=False`, so `<|eot_id|>`, `<|endoftext|>`... stay in the text)
and reproduces the authors' verdict, quirks included, because accuracies are only
comparable under the same rule:

- `numeric_answer` (GSM8K, SVAMP): the first `\\boxed{...}` whose content (up to the
  first "}", on one line) is neither empty nor only dots and holds a number: the
  content as a float, else its FIRST number. Only when no box gives one, the first
  `<answer>...</answer>`: its content as a float, else its LAST number. Commas are
  not removed ("1,000" reads 1), `\\frac{1}{2}` reads 1. Scored by float equality.
- `math_answer` / `math_equiv` (MATH500): the LAST box (brace-matched; a box
  written "\\boxed 5" wins over every "\\boxed{...}" and ends at the next "$"), or,
  when the text has no box at all, the WHOLE text; the `<answer>` tag is read only
  when that comes out empty, or when the last box's braces never close. Compared
  after the Hendrycks MATH normalisation (`normalize_math`); when normalising either
  side fails (two "\\text{ " units, a bare "\\sqrt" or "\\frac" at the end, "x/2"
  where the parts are not ints), the two raw strings are compared instead.
- `countdown_equation` / `countdown_correct` (Countdown): the last box's content (or,
  with no box, the whole text; the `<answer>` tag only when the box never closes),
  LaTeX operators turned into Python's, cut to the expression before the first
  "= number"; correct when its digit runs are exactly the given numbers (each once)
  and its value, as Python computes it, is within 1e-5 of the target. The authors
  `eval` the text (behind a character filter); here it is walked as an `ast` under
  the same Python semantics (+ - * / // **, unary + and -, int and float literals,
  so "2**3" and "7//2" count as they do for the authors) and bounds: expressions
  over `COUNTDOWN_MAX_TEXT` characters and ints over 2**4096 are wrong, never slow.
"""
from __future__ import annotations

import re
from typing import Optional, Sequence

from .countdown import Arithmetic

__all__ = ["numeric_answer", "gsm8k_ground_truth", "boxed_answer", "math_answer", "normalize_math", "math_equiv",
           "countdown_equation", "countdown_value", "countdown_correct", "COUNTDOWN_MAX_TEXT"]

_FIRST_BOX = re.compile(r"\\boxed{(.*?)}")               # non-greedy: up to the first "}", one line
_NUMBER = re.compile(r"-?\d+\.?\d*")
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_GSM8K_FINAL = re.compile(r"####\s*\$?([\d,]+(?:\.\d+)?)")


def _number_in(text: str, which: int) -> Optional[float]:
    """`float(text)`, else its first (which=0) or last (which=-1) number, else None."""
    try:
        return float(text)
    except ValueError:
        numbers = _NUMBER.findall(text)
        return float(numbers[which]) if numbers else None


def numeric_answer(text: str) -> Optional[float]:
    """The number the authors read from a GSM8K / SVAMP generation (see the module doc)."""
    for content in _FIRST_BOX.findall(text):
        content = content.strip()
        if not content or not content.strip("."):         # empty, or dots: the format's "\\boxed{...}"
            continue
        value = _number_in(content, 0)
        if value is not None:
            return value
    tag = _ANSWER_TAG.search(text)
    if tag and tag.group(1).strip():
        return _number_in(tag.group(1).strip(), -1)
    return None


def gsm8k_ground_truth(solution: str) -> Optional[float]:
    """The float after the first '####' of a GSM8K solution (commas dropped, an optional
    '$'), or None where no such number follows (a minus sign, say: never scored right)."""
    found = _GSM8K_FINAL.search(solution)
    if not found:
        return None
    try:
        return float(found.group(1).replace(",", ""))
    except ValueError:                                    # "#### ," : only commas
        return None


def boxed_answer(text: str) -> Optional[str]:
    """The authors' "last boxed content" of a text:

    - a text containing "\\boxed " (with a space): what follows its last occurrence, up
      to the next "$";
    - else from the last "\\boxed" (or, with none, the last "\\fbox") up to the first "}"
      that brings the brace count back to zero: the content when that span reads
      "\\boxed{...}", the span itself otherwise ("\\fbox{5}" stays "\\fbox{5}"); None
      when no brace closes it;
    - a text with neither: the whole text."""
    if "\\boxed " in text:
        return text.split("\\boxed ")[-1].split("$")[0]
    start = text.rfind("\\boxed")
    if start < 0:
        start = text.rfind("\\fbox")
        if start < 0:
            return text
    depth = 0
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                span = text[start:i + 1]
                return span[len("\\boxed{"):-1] if span.startswith("\\boxed{") else span
    return None


def _answer_tag(text: str) -> Optional[str]:
    tag = _ANSWER_TAG.search(text)
    return tag.group(1).strip() if tag else None


def math_answer(text: str) -> Optional[str]:
    """The answer the authors read from a MATH500 generation: `boxed_answer`, or the
    first `<answer>` tag's stripped content when that is empty or None."""
    answer = boxed_answer(text)
    if not answer:
        tag = _answer_tag(text)
        if tag is not None:
            answer = tag
    return answer


class _Unnormalizable(Exception):
    """Where the authors' normalisation raises (they then compare the raw strings)."""


def _drop_units(s: str) -> str:
    if "\\text{ " not in s:
        return s
    parts = s.split("\\text{ ")
    if len(parts) != 2:
        raise _Unnormalizable("several units")
    return parts[0]


def _brace_sqrt(s: str) -> str:
    # "\\sqrt3" -> "\\sqrt{3}" (one character)
    head, *rest = s.split("\\sqrt")
    for piece in rest:
        if not piece:
            raise _Unnormalizable("bare \\sqrt")
        head += "\\sqrt" + (piece if piece[0] == "{" else "{" + piece[0] + "}" + piece[1:])
    return head


def _brace_fracs(s: str) -> str:
    # "\\frac12" -> "\\frac{1}{2}", "\\frac1{72}" -> "\\frac{1}{72}"; a one-character tail leaves s as it was
    head, *rest = s.split("\\frac")
    for piece in rest:
        if not piece:
            raise _Unnormalizable("bare \\frac")
        if piece[0] == "{":
            head += "\\frac" + piece
            continue
        if len(piece) < 2:
            return s
        num, den, tail = piece[0], piece[1], piece[2:]
        head += "\\frac{" + num + "}" + ("{" + den + "}" if den != "{" else den) + tail
    return head


def _slash_to_frac(s: str) -> str:
    # "3/4" -> "\\frac{3}{4}"; the parts must read as ints (else the authors' int() raises)
    parts = s.split("/")
    if len(parts) != 2:
        return s
    try:
        num, den = int(parts[0]), int(parts[1])
    except ValueError:
        raise _Unnormalizable("not a fraction of ints") from None
    return "\\frac{%d}{%d}" % (num, den) if s == f"{num}/{den}" else s


def normalize_math(s: str) -> str:
    """The Hendrycks MATH normalisation, step for step as the authors apply it (raises
    `_Unnormalizable` where theirs raises)."""
    for old, new in (("\n", ""), ("\\!", ""), ("\\\\", "\\"), ("tfrac", "frac"), ("dfrac", "frac"),
                     ("\\left", ""), ("\\right", ""), ("^{\\circ}", ""), ("^\\circ", ""), ("\\$", "")):
        s = s.replace(old, new)
    s = _drop_units(s)
    s = s.replace("\\%", "").replace(" .", " 0.").replace("{.", "{0.")
    if not s:
        return s
    if s[0] == ".":
        s = "0" + s
    sides = s.split("=")
    if len(sides) == 2 and len(sides[0]) <= 2:          # "x = 5" -> "5" (a short left side only)
        s = sides[1]
    s = _brace_sqrt(s).replace(" ", "")
    s = _brace_fracs(s)
    if s == "0.5":
        s = "\\frac{1}{2}"
    return _slash_to_frac(s)


def math_equiv(answer: Optional[str], truth: Optional[str]) -> bool:
    """The authors' MATH equivalence: equal after `normalize_math`, or, when either side
    cannot be normalised, equal as raw strings."""
    if answer is None or truth is None:
        return answer is None and truth is None
    try:
        return normalize_math(answer) == normalize_math(truth)
    except _Unnormalizable:
        return answer == truth


# ---- Countdown

COUNTDOWN_MAX_TEXT = 4096       # longer expressions are scored wrong unread
_LATEX_OPS = (("\\div", "/"), ("\\times", "*"), ("\\cdot", "*"))
_EXPRESSION_RUN = re.compile(r"[0-9+\-*/() ]+")
_RESULT_START = set("0123456789. ")
_ALLOWED = re.compile(r"^[\d+\-*/().\s]+$")
_PYTHON_ARITH = Arithmetic(ops="+ - * / // **", unary="- +", floats=True, exact=False,
                           max_text=COUNTDOWN_MAX_TEXT, max_value=2 ** 4096)


def countdown_equation(text: str) -> str:
    """The expression the authors score in a Countdown generation (see the module doc)."""
    eq = boxed_answer(text)
    if eq is None:                                     # a box that never closes
        tag = _answer_tag(text)
        eq = text if tag is None else tag
    for latex, op in _LATEX_OPS:
        eq = eq.replace(latex, op)
    # the authors search r"([0-9+\-*/() ]+)=[0-9. ]+": the first maximal run of expression
    # characters followed by "=" and a digit, dot or space (found here in one linear pass)
    for run in _EXPRESSION_RUN.finditer(eq):
        end = run.end()
        if eq[end:end + 1] == "=" and eq[end + 1:end + 2] in _RESULT_START:
            return run.group().strip()
    return eq


def _uses_exactly(eq: str, numbers: Sequence[int]) -> bool:
    try:
        used = [int(n) for n in re.findall(r"\d+", eq)]
    except ValueError:                                 # a digit run too long for int()
        return False
    return sorted(used) == sorted(numbers)


def countdown_value(eq: str):
    """The value Python's `eval` gives the expression (int, float or complex), or None where
    the authors' filter refuses it or `eval` would raise (or the bounds are passed)."""
    if not _ALLOWED.match(eq):
        return None
    got = _PYTHON_ARITH(eq.strip())
    return None if got is None else got[0]


def countdown_correct(text: str, numbers: Sequence[int], target: int) -> bool:
    """The authors' Countdown verdict of a generation."""
    eq = countdown_equation(text)
    if not _uses_exactly(eq, numbers):
        return False
    value = countdown_value(eq)
    return value is not None and abs(value - target) < 1e-5
