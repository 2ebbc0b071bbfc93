"""Reward rules: the built-in ones, a user's function from a file, scoring in processes,
and one clear error for each way a function can fail."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from hybridflow.executor.data import rewards as R


@pytest.mark.parametrize(
    "response,truth,score",
    [
        ("so the answer is \\boxed{1,234}", "1234", 1.0),
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}", 1.0),
        ("\\boxed{\\frac{1}{3}}", "\\frac{1}{2}", 0.0),
        ("first 3 then \\boxed{7} and \\boxed{8}", "8", 1.0),
        ("work... #### 72", "72", 1.0),
        ("it is 5 or maybe -2.5", "-2.5", 1.0),
        ("it is 5 or maybe -2.5", "5", 0.0),
        ("the total is $18.", "Janet sells 16 - 3 - 4 = 9 eggs ... #### 18", 1.0),
        ("no number here", "3", 0.0),
        ("\\boxed{42", "42", 1.0),  # unclosed box: the last number
    ],
)
def test_math_answer(response: str, truth: str, score: float) -> None:
    assert R.math_answer("gsm8k", response, truth, {}) == score


def test_exact_match_normalises_whitespace() -> None:
    assert R.exact_match("", "  a  b ", "a b", {}) == 1.0
    assert R.exact_match("", "a b c", "a b", {}) == 0.0


FN = """
import os

def length(data_source, solution_str, ground_truth, extra_info):
    return len(solution_str) / 10

def fails_on_three(data_source, solution_str, ground_truth, extra_info):
    if extra_info.get("i") == 3:
        raise KeyError("no such thing")
    return 1.0

def returns_nan(data_source, solution_str, ground_truth, extra_info):
    return float("nan")

def returns_text(data_source, solution_str, ground_truth, extra_info):
    return "1.0"

NOT_CALLABLE = 3
"""


@pytest.fixture
def fn_file(tmp_path: Path) -> Path:
    (tmp_path / "fns.py").write_text(FN)
    return tmp_path / "fns.py"


def _samples(n: int) -> list[R.Sample]:
    return [R.Sample(i + 10, "src", "x" * i, str(i), {"i": i}) for i in range(n)]


@pytest.mark.process
def test_scoring_in_processes_equals_inline(fn_file: Path) -> None:
    inline = R.RewardScorer(f"{fn_file}:length", processes=1).score(_samples(20))
    with R.RewardScorer(f"{fn_file}:length", processes=2) as s:
        assert s.score(_samples(20)) == inline == [i / 10 for i in range(20)]
        assert s.score(_samples(9)) == inline[:9]


@pytest.mark.process
def test_a_raise_names_the_samples_row(fn_file: Path) -> None:
    with R.RewardScorer(f"{fn_file}:fails_on_three", processes=2) as s:
        with pytest.raises(R.RewardError, match=re.escape("raised on the sample of row 13")):
            s.score(_samples(12))
    with pytest.raises(R.RewardError, match="KeyError: 'no such thing'"):
        R.RewardScorer(f"{fn_file}:fails_on_three", processes=1).score(_samples(5))


@pytest.mark.parametrize("name,message", [("returns_nan", "nan"), ("returns_text", "'1.0'")])
def test_bad_return_values_are_refused(fn_file: Path, name: str, message: str) -> None:
    with pytest.raises(
        R.RewardError, match=re.escape(f"returned {message} for the sample of row 10")
    ):
        R.RewardScorer(f"{fn_file}:{name}", processes=1).score(_samples(1))


def test_loading_errors_are_named(fn_file: Path, tmp_path: Path) -> None:
    cases = [
        (f"{tmp_path}/none.py:f", "does not exist"),
        (f"{fn_file}:missing", "has no 'missing' (its functions: fails_on_three, length,"),
        (f"{fn_file}:NOT_CALLABLE", "NOT_CALLABLE is not callable"),
        (f"{tmp_path}/x.txt:f", "is not a .py file"),
        ("median", "expected FILE.py:NAME or a built-in rule (exact, math)"),
    ]
    for spec, message in cases:
        with pytest.raises(R.RewardError, match=re.escape(message)):
            R.load_reward_fn(spec)
    (tmp_path / "broken.py").write_text("import no_such_module_here\n")
    with pytest.raises(R.RewardError, match="ModuleNotFoundError"):
        R.load_reward_fn(f"{tmp_path}/broken.py:f")
    assert R.load_reward_fn("math") is R.math_answer
