"""Verifiable tasks for reinforcement learning: arithmetic and Countdown, a character tokenizer, a safe parser.

R1-Zero (DeepSeek-R1 §2.2) trains on problems whose answers a *program* can check, so the reward is a
rule, not a neural model. This module holds the problems and the checker's parser; `grpo.py` turns
them into rewards.

*Tasks.* Two seeded generators:

* `ArithmeticTask`: ``"47+38="`` with n-digit operands and ``+``/``-`` (the subtraction keeps
  a >= b). The worked solution is a column-by-column trace with carries (borrows), e.g.
  ``<think>7+8=15,4+3+1=8</think><answer>85</answer>``.
* `CountdownTask`: reach a target with the given numbers, each used exactly once, with + - * /
  (the task of TinyZero and many R1-Zero reproductions), e.g. ``"3 4 5 to 17:"`` ->
  ``<think>3*4=12,12+5=17</think><answer>3*4+5</answer>``. Every generated problem has a solution
  (it is built from one), and any other correct expression scores as well.

*Disjoint splits.* Whether a problem belongs to the test split is a pure function of the problem
itself (a SHA-256 of its canonical key), never of the seed or the order of drawing: the train
generator rejects test problems and the test generator rejects train problems, so the two sets can
never overlap, whatever seeds are used.

*Tokenizer.* `CharTokenizer` is a fixed table: 6 special tokens (pad, eos and the four R1 tags,
each one id) and one id per character of `CHARSET`. It needs no training and no library: the task
text uses about 50 distinct characters, and one id per character keeps the model's job legible
(the reader sees each digit the model writes). Unknown characters raise `ValueError`.

*The parser.* Model text is never executed: no `eval`, `exec`, `compile` or `ast.literal_eval`.
`parse_expression` is a recursive-descent parser for integers, ``+ - * /`` and parentheses, with exact
`Fraction` arithmetic and hard bounds: at most `MAX_EXPR_CHARS` characters, numbers of at most
`MAX_NUMBER_DIGITS` ASCII digits (``int()`` would also accept Unicode digits like ``"٣"``; we do
not), nesting at most `MAX_DEPTH`, every intermediate value below 2**`MAX_VALUE_BITS` in numerator
and denominator, no ``**``. So every call does a bounded amount of work on any input.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction

# --- the safe arithmetic parser ----------------------------------------------------------------------

MAX_EXPR_CHARS = 256  # longer expressions are rejected before any parsing
MAX_NUMBER_DIGITS = 12  # one integer literal: at most this many ASCII digits
MAX_DEPTH = 32  # parentheses and unary minus nested at most this deep (the recursion bound)
MAX_VALUE_BITS = 256  # |numerator| and denominator of every intermediate value stay below 2**256
_DIGITS = frozenset("0123456789")
_ALLOWED = frozenset("0123456789+-*/() \t\n")


class ExpressionError(ValueError):
    """The text is not an expression of the bounded grammar (or divides by zero, or grows too large)."""


class _Parser:
    """Recursive descent over::

        expr   := term (("+" | "-") term)*
        term   := factor (("*" | "/") factor)*
        factor := NUMBER | "(" expr ")" | "-" factor      (the last only with unary=True)
    """

    def __init__(self, text: str, unary: bool) -> None:
        self.text, self.pos, self.unary, self.depth = text, 0, unary, 0
        self.numbers: list[int] = []

    def peek(self) -> str:
        while self.pos < len(self.text) and self.text[self.pos] in " \t\n":
            self.pos += 1
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def expr(self) -> Fraction:
        value = self.term()
        while self.peek() in ("+", "-") and self.peek():
            op = self.text[self.pos]
            self.pos += 1
            value = _bounded(value + self.term() if op == "+" else value - self.term())
        return value

    def term(self) -> Fraction:
        value = self.factor()
        while self.peek() in ("*", "/") and self.peek():
            op = self.text[self.pos]
            self.pos += 1
            if self.peek() == "*":
                raise ExpressionError("'**' (power) is not allowed")
            rhs = self.factor()
            if op == "/" and rhs == 0:
                raise ExpressionError("division by zero")
            value = _bounded(value * rhs if op == "*" else value / rhs)
        return value

    def factor(self) -> Fraction:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise ExpressionError(f"nested deeper than MAX_DEPTH={MAX_DEPTH}")
        c = self.peek()
        if c == "(":
            self.pos += 1
            value = self.expr()
            if self.peek() != ")":
                raise ExpressionError(f"expected ')' at position {self.pos}")
            self.pos += 1
        elif c == "-" and self.unary:
            self.pos += 1
            value = -self.factor()
        elif c in _DIGITS:
            start = self.pos
            while self.pos < len(self.text) and self.text[self.pos] in _DIGITS:
                self.pos += 1
            if self.pos - start > MAX_NUMBER_DIGITS:
                raise ExpressionError(f"a number longer than MAX_NUMBER_DIGITS={MAX_NUMBER_DIGITS} digits")
            n = int(self.text[start:self.pos])  # ASCII digits only, at most 12: cheap and exact
            self.numbers.append(n)
            value = Fraction(n)
        else:
            raise ExpressionError(f"expected a number or '(' at position {self.pos}, found {c!r}")
        self.depth -= 1
        return value


def _bounded(value: Fraction) -> Fraction:
    if abs(value.numerator).bit_length() > MAX_VALUE_BITS or value.denominator.bit_length() > MAX_VALUE_BITS:
        raise ExpressionError(f"an intermediate value exceeds 2**{MAX_VALUE_BITS}")
    return value


def parse_expression(text: str, unary_minus: bool = True) -> tuple[Fraction, list[int]]:
    """Evaluate an arithmetic expression exactly, without executing anything.

    Args:
        text: e.g. ``"3*4+5"`` or ``" (25 - 5) / 4 "``; ASCII digits, ``+ - * /``, parentheses, spaces.
        unary_minus: accept a leading ``-`` on a factor (``"-35"``, ``"3*-2"``); Countdown forbids it.
    Returns:
        (value as a `Fraction`, the integer literals in the order written).
    Raises:
        ExpressionError: on any other character, ``**``, a number over `MAX_NUMBER_DIGITS` digits,
            nesting over `MAX_DEPTH`, text over `MAX_EXPR_CHARS`, division by zero, a value over
            2**`MAX_VALUE_BITS`, or trailing text.
    """
    if not isinstance(text, str):
        raise ExpressionError(f"expected a str, got {type(text).__name__}")
    if len(text) > MAX_EXPR_CHARS:
        raise ExpressionError(f"expression of {len(text)} characters exceeds MAX_EXPR_CHARS={MAX_EXPR_CHARS}")
    bad = next((c for c in text if c not in _ALLOWED), None)
    if bad is not None:
        raise ExpressionError(f"character {bad!r} is not allowed")
    if "**" in text.replace(" ", "").replace("\t", "").replace("\n", ""):
        raise ExpressionError("'**' (power) is not allowed")
    p = _Parser(text, unary_minus)
    value = p.expr()
    if p.peek() != "":
        raise ExpressionError(f"unexpected {p.peek()!r} at position {p.pos}")
    return value, p.numbers


def try_parse(text: str, unary_minus: bool = True) -> Fraction | None:
    """`parse_expression`'s value, or None when the text is not a valid bounded expression."""
    try:
        return parse_expression(text, unary_minus)[0]
    except ExpressionError:
        return None


def parse_integer(text: str) -> int | None:
    """An integer literal (optional ``-``, ASCII digits, surrounding whitespace), or None.

    Used for arithmetic answers, which must be a number: accepting an expression would let a model
    copy the question (``"47+38"``) into its answer.
    """
    if not isinstance(text, str) or len(text) > MAX_NUMBER_DIGITS + 64:
        return None
    s = text.strip(" \t\n")
    digits = s[1:] if s.startswith("-") else s
    if not 0 < len(digits) <= MAX_NUMBER_DIGITS or any(c not in _DIGITS for c in digits):
        return None
    return int(s)


# --- the character tokenizer ---------------------------------------------------------------------------

SPECIAL = ["<pad>", "<eos>", "<think>", "</think>", "<answer>", "</answer>"]
CHARSET = "0123456789+-*/()=:,. \nabcdefghijklmnopqrstuvwxyz?"


class CharTokenizer:
    """One id per special token (`SPECIAL`, ids 0..5), then one per character of `CHARSET`.

    ``decode(encode(s)) == s`` for every string over `CHARSET` and the tags. `vocab_size` is 64
    (the 56 used ids rounded up; the last ids are never produced).
    """

    vocab_size = 64

    def __init__(self) -> None:
        self.itos = SPECIAL + list(CHARSET)
        self.stoi = {s: i for i, s in enumerate(self.itos)}
        self.pad_id, self.eos_id = self.stoi["<pad>"], self.stoi["<eos>"]
        assert len(self.itos) <= self.vocab_size

    def encode(self, text: str) -> list[int]:
        """Ids of `text`; the tags become one id each. Raises ValueError on characters outside CHARSET."""
        ids, i = [], 0
        while i < len(text):
            if text[i] == "<":
                tag = next((t for t in SPECIAL if text.startswith(t, i)), None)
                if tag is not None:
                    ids.append(self.stoi[tag])
                    i += len(tag)
                    continue
            if text[i] not in self.stoi:
                raise ValueError(f"character {text[i]!r} at position {i} is not in the task tokenizer's CHARSET")
            ids.append(self.stoi[text[i]])
            i += 1
        return ids

    def decode(self, ids: Sequence[int], stop_at_eos: bool = True) -> str:
        """Text of `ids`; stops at the first eos (when asked); pad ids and unused ids are skipped."""
        out = []
        for i in ids:
            i = int(i)
            if i == self.eos_id and stop_at_eos:
                break
            if i == self.pad_id or i == self.eos_id or i >= len(self.itos):
                continue
            out.append(self.itos[i])
        return "".join(out)


# --- problems and splits ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    """One verifiable problem.

    Attributes:
        task: "arithmetic" or "countdown".
        prompt: the text the model continues, e.g. ``"47+38="``.
        answer: the reference answer as text: the result (arithmetic) or the target (Countdown).
        numbers: the numbers to use (Countdown); empty for arithmetic.
        solution: a worked response in the R1-Zero layout, for supervised fine-tuning.
    """

    task: str
    prompt: str
    answer: str
    numbers: tuple[int, ...] = ()
    solution: str = ""


def _in_test(key: str, test_fraction: float) -> bool:
    """Deterministic split: a problem is a test problem iff its key hashes below test_fraction."""
    h = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big")
    return h < test_fraction * 2**64


class _Task:
    name = ""

    def __init__(self, test_fraction: float) -> None:
        if not 0 < test_fraction < 1:
            raise ValueError(f"test_fraction={test_fraction} must be in (0, 1)")
        self.test_fraction = test_fraction

    def key(self, problem: Problem) -> str:  # pragma: no cover - overridden
        raise NotImplementedError

    def draw(self, rng: random.Random) -> Problem:  # pragma: no cover - overridden
        raise NotImplementedError

    def is_test(self, problem: Problem) -> bool:
        """Whether `problem` belongs to the held-out split (a function of the problem only)."""
        return _in_test(self.key(problem), self.test_fraction)

    def problems(self, n: int, split: str, seed: int, distinct: bool = False) -> list[Problem]:
        """`n` problems of `split` ("train" or "test") drawn with `random.Random(seed)`.

        `distinct=True` returns n different problems (use it for evaluation sets). Raises
        ValueError on an unknown split, or when the split has fewer than n problems to offer.
        """
        if split not in ("train", "test"):
            raise ValueError(f"split={split!r} must be 'train' or 'test'")
        rng, out, seen, tries = random.Random(seed), [], set(), 0
        while len(out) < n:
            tries += 1
            if tries > 200 * n + 10_000:
                raise ValueError(f"could not draw {n} {'distinct ' if distinct else ''}{split} problems")
            p = self.draw(rng)
            if self.is_test(p) != (split == "test"):
                continue
            if distinct:
                k = self.key(p)
                if k in seen:
                    continue
                seen.add(k)
            out.append(p)
        return out


class ArithmeticTask(_Task):
    """``a+b=`` and ``a-b=`` (a >= b) with operands in [0, 10**n_digits), column traces.

    Args:
        n_digits: digits of the operands (>= 1).
        ops: a non-empty subset of "+-".
        test_fraction: share of all problems held out for testing.
    """

    name = "arithmetic"

    def __init__(self, n_digits: int = 2, ops: str = "+-", test_fraction: float = 0.1) -> None:
        super().__init__(test_fraction)
        if n_digits < 1 or not ops or set(ops) - set("+-"):
            raise ValueError(f"need n_digits >= 1 and ops a non-empty subset of '+-', got {n_digits}, {ops!r}")
        self.n_digits, self.ops = n_digits, ops

    def key(self, problem: Problem) -> str:
        return f"arithmetic|{problem.prompt}"

    def make(self, a: int, op: str, b: int) -> Problem:
        """The problem a op b with its worked solution."""
        if op == "-" and a < b:
            raise ValueError(f"subtraction keeps a >= b, got {a}-{b}")
        result = a + b if op == "+" else a - b
        da = [int(c) for c in str(a).zfill(self.n_digits)[::-1]]  # least significant first
        db = [int(c) for c in str(b).zfill(self.n_digits)[::-1]]
        steps, carry = [], 0
        for i, (x, y) in enumerate(zip(da, db)):
            if op == "+":
                s = x + y + carry
                steps.append(f"{x}+{y}={s}" if i == 0 else f"{x}+{y}+{carry}={s}")
                carry = s // 10
            else:  # borrow from the next column when the top digit is too small
                top = x - carry
                borrow = 1 if top < y else 0
                d = top + 10 * borrow - y
                if i == 0:
                    steps.append(f"{x + 10 * borrow}-{y}={d}")
                else:
                    steps.append(f"{x + 10 * borrow}-{y}-{carry}={d}")
                carry = borrow
        solution = f"<think>{','.join(steps)}</think><answer>{result}</answer>"
        return Problem("arithmetic", f"{a}{op}{b}=", str(result), (), solution)

    def draw(self, rng: random.Random) -> Problem:
        hi = 10**self.n_digits
        a, b, op = rng.randrange(hi), rng.randrange(hi), rng.choice(self.ops)
        if op == "-" and a < b:
            a, b = b, a
        return self.make(a, op, b)


class CountdownTask(_Task):
    """Reach the target with each of `n_numbers` numbers exactly once, using + - * / (exact).

    A problem is built from a random expression over the numbers in a random order (division only when
    it is exact), so it always has a solution; targets are positive integers up to `max_target`.

    Args:
        n_numbers: numbers per problem (2..4).
        max_number: numbers are drawn from [1, max_number].
        max_target: largest target.
        test_fraction: share of all problems held out for testing.
    """

    name = "countdown"

    def __init__(self, n_numbers: int = 3, max_number: int = 20, max_target: int = 100,
                 test_fraction: float = 0.1) -> None:
        super().__init__(test_fraction)
        if not 2 <= n_numbers <= 4 or max_number < 1 or max_target < 1:
            raise ValueError(f"need 2 <= n_numbers <= 4, max_number >= 1, max_target >= 1; got "
                             f"{n_numbers}, {max_number}, {max_target}")
        self.n_numbers, self.max_number, self.max_target = n_numbers, max_number, max_target

    def key(self, problem: Problem) -> str:
        return f"countdown|{sorted(problem.numbers)}|{problem.answer}"

    def draw(self, rng: random.Random) -> Problem:
        while True:
            nums = [rng.randint(1, self.max_number) for _ in range(self.n_numbers)]
            order = nums[:]
            rng.shuffle(order)
            value, text, steps = order[0], str(order[0]), []
            ok = True
            for x in order[1:]:  # left-to-right chain: ((a op b) op c) ...
                op = rng.choice("+-*/")
                if op == "/" and (x == 0 or value % x):
                    op = rng.choice("+-*")
                new = {"+": value + x, "-": value - x, "*": value * x, "/": value // x if x else 0}[op]
                if new <= 0:
                    ok = False
                    break
                steps.append(f"{value}{op}{x}={new}")
                # parentheses only where the precedence needs them
                text = f"({text}){op}{x}" if op in "*/" and ("+" in text or "-" in text) else f"{text}{op}{x}"
                value = new
            if ok and 1 <= value <= self.max_target:
                prompt = f"{' '.join(map(str, nums))} to {value}:"
                solution = f"<think>{','.join(steps)}</think><answer>{text}</answer>"
                return Problem("countdown", prompt, str(value), tuple(nums), solution)


def make_task(name: str, **kwargs) -> ArithmeticTask | CountdownTask:
    """The task called `name`: "addition" (`ArithmeticTask` with ops "+"), "arithmetic" (+ and -) or
    "countdown"; `kwargs` go to the task's constructor. Raises ValueError for other names."""
    if name == "addition":
        return ArithmeticTask(**{"ops": "+", **kwargs})
    if name == "arithmetic":
        return ArithmeticTask(**kwargs)
    if name == "countdown":
        return CountdownTask(**kwargs)
    raise ValueError(f"unknown task {name!r}; known tasks: addition, arithmetic, countdown")
