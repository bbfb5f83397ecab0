"""Tests of `deepseek_edu.tasks`: the verifiable task generators, the character tokenizer, the safe parser.

What is checked:
- generators: seeded (same seed, same problems), every worked solution is correct by the package's
  own checker and by plain integer arithmetic, train and test splits are disjoint for any seeds,
  the split is a function of the problem only, the test share is about `test_fraction`;
- Countdown: each problem is solvable with its numbers used exactly once;
- the tokenizer: exact round trip, one id per tag, unknown characters rejected;
- the parser (pitfalls kind I): hand-computed values, exact fractions, precedence, and rejection of
  everything outside the bounded grammar (``**``, Unicode digits, huge literals, deep nesting, long
  inputs, division by zero, trailing text) -- each call within a fixed time.
"""

from __future__ import annotations

import time
from fractions import Fraction

import pytest

from deepseek_edu import data
from deepseek_edu.tasks import (
    MAX_DEPTH,
    MAX_EXPR_CHARS,
    SPECIAL,
    ArithmeticTask,
    CharTokenizer,
    CountdownTask,
    ExpressionError,
    make_task,
    parse_expression,
    parse_integer,
    try_parse,
)

TIME_LIMIT_S = 0.05  # every parse of a pathological input must finish within this


def _answer(solution: str) -> str:
    return solution.split("<answer>")[1].split("</answer>")[0]


def test_reexported_from_data() -> None:
    assert data.ArithmeticTask is ArithmeticTask and data.CountdownTask is CountdownTask
    assert data.CharTokenizer is CharTokenizer and data.make_task is make_task


@pytest.mark.parametrize("name", ["arithmetic", "countdown"])
def test_seeded_and_disjoint(name: str) -> None:
    task = make_task(name)
    a = task.problems(50, "train", seed=3)
    assert a == task.problems(50, "train", seed=3)
    assert a != task.problems(50, "train", seed=4)
    train_keys = {task.key(p) for s in range(3) for p in task.problems(300, "train", seed=s)}
    test_keys = {task.key(p) for s in range(3) for p in task.problems(100, "test", seed=s)}
    assert train_keys and test_keys and not train_keys & test_keys
    distinct = task.problems(100, "test", seed=0, distinct=True)
    assert len({task.key(p) for p in distinct}) == 100
    assert all(task.is_test(p) for p in distinct)


def test_split_is_a_function_of_the_problem_and_about_test_fraction() -> None:
    task = ArithmeticTask(n_digits=2, ops="+-", test_fraction=0.1)
    all_problems = [task.make(a, "+", b) for a in range(100) for b in range(100)]
    share = sum(task.is_test(p) for p in all_problems) / len(all_problems)
    assert 0.08 < share < 0.12, share
    p = task.make(47, "+", 38)
    assert task.is_test(p) == task.is_test(task.make(47, "+", 38))  # no hidden state


def test_arithmetic_solutions_by_hand() -> None:
    task = ArithmeticTask()
    assert task.make(47, "+", 38).solution == "<think>7+8=15,4+3+1=8</think><answer>85</answer>"
    assert task.make(43, "-", 18).solution == "<think>13-8=5,4-1-1=2</think><answer>25</answer>"
    assert task.make(43, "-", 38).solution == "<think>13-8=5,4-3-1=0</think><answer>5</answer>"
    assert task.make(97, "+", 38).answer == "135"
    assert task.make(5, "+", 7).prompt == "5+7="
    with pytest.raises(ValueError, match="a >= b"):
        task.make(3, "-", 8)


@pytest.mark.parametrize("n_digits", [1, 2, 3])
def test_arithmetic_answers_are_correct(n_digits: int) -> None:
    task = ArithmeticTask(n_digits=n_digits)
    for p in task.problems(200, "train", seed=n_digits):
        a, op, b = p.prompt.rstrip("=").partition("+") if "+" in p.prompt else p.prompt.rstrip("=").partition("-")
        expected = int(a) + int(b) if op == "+" else int(a) - int(b)
        assert int(p.answer) == expected and _answer(p.solution) == str(expected), p
        assert expected >= 0


def test_countdown_is_solvable_with_each_number_once() -> None:
    task = CountdownTask(n_numbers=3, max_number=20, max_target=100)
    for p in task.problems(300, "train", seed=0):
        value, used = parse_expression(_answer(p.solution), unary_minus=False)
        assert sorted(used) == sorted(p.numbers) and value == int(p.answer), p
        assert 1 <= int(p.answer) <= 100 and len(p.numbers) == 3
        assert p.prompt == f"{' '.join(map(str, p.numbers))} to {p.answer}:"


def test_task_arguments_validated() -> None:
    with pytest.raises(ValueError, match="test_fraction"):
        ArithmeticTask(test_fraction=0.0)
    with pytest.raises(ValueError, match="ops"):
        ArithmeticTask(ops="*")
    with pytest.raises(ValueError, match="n_numbers"):
        CountdownTask(n_numbers=7)
    with pytest.raises(ValueError, match="unknown task"):
        make_task("chess")
    with pytest.raises(ValueError, match="split"):
        ArithmeticTask().problems(3, "val", seed=0)
    with pytest.raises(ValueError, match="could not draw"):
        ArithmeticTask(n_digits=1, ops="+").problems(1000, "test", seed=0, distinct=True)


def test_tokenizer_round_trip() -> None:
    tok = CharTokenizer()
    for p in make_task("countdown").problems(20, "train", seed=1) + make_task("arithmetic").problems(20, "train", seed=1):
        text = p.prompt + p.solution
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert len(ids) == len(text) - sum(text.count(t) * (len(t) - 1) for t in SPECIAL)
    assert tok.encode("<think>") == [tok.stoi["<think>"]]
    with pytest.raises(ValueError, match="CHARSET"):
        tok.encode("<thin")  # a broken tag is not a tag, and "<" is not a character of the task text
    assert tok.decode([tok.stoi["1"], tok.eos_id, tok.stoi["2"]]) == "1"
    assert tok.decode([tok.pad_id, tok.stoi["7"], 63]) == "7"
    with pytest.raises(ValueError, match="CHARSET"):
        tok.encode("47+38=٣")
    assert max(max(tok.encode("abc 12")), len(tok.itos) - 1) < tok.vocab_size


@pytest.mark.parametrize("text, value", [
    ("1+2*3", 7), ("(1+2)*3", 9), ("10-4-3", 3), ("8/4/2", 1), ("7/2", Fraction(7, 2)), ("2*(3+4)-5", 9),
    (" 3 *\n4 ", 12), ("-5+2", -3), ("3*-2", -6), ("((((7))))", 7), ("0", 0), ("1/3+1/6", Fraction(1, 2)),
])
def test_parse_values(text: str, value) -> None:
    assert parse_expression(text)[0] == value


def test_parse_numbers_in_order_and_unary_switch() -> None:
    assert parse_expression("(25-5)/4+3")[1] == [25, 5, 4, 3]
    with pytest.raises(ExpressionError):
        parse_expression("-3+5", unary_minus=False)


BAD = [
    "9**9**9", "2**100", "9 * * 9", "9^9", "1/0", "5/(3-3)", "1+", "(1+2", "1+2)", "", "   ", "1 2", "abc",
    "__import__('os')", "١+١", "٣", "１+１", "1e9", "1.5", "0x10", "9" * 13, "1" * 100_000, "(" * 200 + "1" + ")" * 200,
    "-" * (MAX_DEPTH + 5) + "1", "1+" * (MAX_EXPR_CHARS // 2 + 1) + "1", "999999999999*" * 18 + "9",
    "<answer>1</answer>", "1\x00", "1;2",
]


@pytest.mark.parametrize("text", BAD, ids=range(len(BAD)))
def test_parse_rejects_within_time(text: str) -> None:
    t0 = time.perf_counter()
    with pytest.raises(ExpressionError):
        parse_expression(text)
    assert try_parse(text) is None
    assert time.perf_counter() - t0 < TIME_LIMIT_S


def test_parse_value_bound() -> None:
    # 21 twelve-digit factors: about 2**837, over the 2**256 bound -> rejected, not computed forever
    with pytest.raises(ExpressionError, match="exceeds"):
        parse_expression("*".join(["999999999999"] * 21))
    assert try_parse("*".join(["999999999999"] * 5)) == 999999999999**5


def test_parse_never_executes(tmp_path, monkeypatch) -> None:
    import builtins

    def boom(*args, **kwargs):
        raise AssertionError("model text reached eval/exec/compile")

    for name in ("eval", "exec", "compile"):
        monkeypatch.setattr(builtins, name, boom)
    for text in ["1+2", "__import__('os').system('echo hi')", "open('x','w')"]:
        try_parse(text)


@pytest.mark.parametrize("text, value", [("85", 85), (" -35\n", -35), ("007", 7)])
def test_parse_integer_ok(text: str, value: int) -> None:
    assert parse_integer(text) == value


@pytest.mark.parametrize("text", ["47+38", "", "-", "8 5", "٨٥", "1e3", "9" * 13, "9" * 10_000, "85.0", "+85"])
def test_parse_integer_rejects(text: str) -> None:
    t0 = time.perf_counter()
    assert parse_integer(text) is None
    assert time.perf_counter() - t0 < TIME_LIMIT_S
