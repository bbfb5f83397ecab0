"""Rule-based rewards of DeepSeek-R1-Zero (R1 §2.2.2): the answer checked by a program, and the layout.

The layout is ``<think>…</think><answer>…</answer>``; `format_reward` scores it and `accuracy_reward`
checks the answer with a bounded hand-written parser (`tasks.parse_expression`): rewards never
execute model text, and every reward does a bounded amount of work on any input (docs/pitfalls.md).
`score_responses` combines them for a batch. Re-exported by `grpo.py`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .tasks import ExpressionError, Problem, parse_expression, parse_integer

# --- rewards (R1 §2.2.2) ---------------------------------------------------------------------------

THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE = "<think>", "</think>", "<answer>", "</answer>"
TAGS = (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)
MAX_RESPONSE_CHARS = 4096  # longer responses score 0 before any scan


def parse_r1_layout(text: str) -> tuple[str, str] | None:
    """Split an R1-Zero response into (reasoning, answer), or None if the layout is broken.

    The layout: optional whitespace, ``<think>``, reasoning (any characters, newlines included, no
    tag), ``</think>``, optional whitespace, ``<answer>``, answer (no tag), ``</answer>``, optional
    whitespace. Each tag exactly once, so nested or repeated tags fail. Linear time (``str.count`` and
    ``str.find``; no backtracking regex); texts over `MAX_RESPONSE_CHARS` fail at once.
    """
    if not isinstance(text, str) or len(text) > MAX_RESPONSE_CHARS:
        return None
    if any(text.count(tag) != 1 for tag in TAGS):
        return None
    a, b, c, d = (text.find(tag) for tag in TAGS)
    if not a < b < c < d:
        return None
    ws = " \t\r\n"
    if text[:a].strip(ws) or text[b + len(THINK_CLOSE):c].strip(ws) or text[d + len(ANSWER_CLOSE):].strip(ws):
        return None
    return text[a + len(THINK_OPEN):b], text[c + len(ANSWER_OPEN):d]


def format_reward(text: str) -> float:
    """1.0 if `text` follows the R1-Zero layout (`parse_r1_layout`), else 0.0."""
    return 1.0 if parse_r1_layout(text) is not None else 0.0


def check_answer(answer: str, problem: Problem) -> bool:
    """Whether the text inside ``<answer>`` solves `problem`. Never executes anything.

    * arithmetic: an integer literal equal to the reference (an expression is refused: copying the
      question ``"47+38"`` must not score);
    * countdown: an expression over + - * / and parentheses using each given number exactly once
      (no unary minus, no other numbers) whose exact value is the target.

    A reference that does not parse makes every answer wrong.
    """
    if problem.task == "arithmetic":
        ref = parse_integer(problem.answer)
        got = parse_integer(answer)
        return ref is not None and got is not None and got == ref
    if problem.task == "countdown":
        target = parse_integer(problem.answer)
        if target is None or not problem.numbers:
            return False
        try:
            value, used = parse_expression(answer, unary_minus=False)
        except ExpressionError:
            return False
        return sorted(used) == sorted(problem.numbers) and value == target
    return False


def accuracy_reward(text: str, problem: Problem) -> float:
    """1.0 if the response has the R1 layout and its answer is correct (`check_answer`), else 0.0."""
    parsed = parse_r1_layout(text)
    return 1.0 if parsed is not None and check_answer(parsed[1], problem) else 0.0


def score_responses(texts: Sequence[str], problems: Sequence[Problem], format_weight: float = 0.1
                    ) -> tuple[Tensor, Tensor, Tensor]:
    """Rewards of a batch: r = accuracy + format_weight * format.

    Returns:
        (rewards, accuracy, format), each (N,) float32.
    Raises:
        ValueError: if the two sequences differ in length.
    """
    if len(texts) != len(problems):
        raise ValueError(f"{len(texts)} responses for {len(problems)} problems")
    acc = torch.tensor([accuracy_reward(t, p) for t, p in zip(texts, problems)], dtype=torch.float32)
    fmt = torch.tensor([format_reward(t) for t in texts], dtype=torch.float32)
    return acc + format_weight * fmt, acc, fmt
