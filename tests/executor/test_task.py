"""The synthetic offline task: prompts, answers, rule score and cost, preference pairs."""

import random

import pytest

from hybridflow.executor.task import rules as task


def test_examples_are_deterministic_and_well_formed():
    cfg = task.TaskConfig()
    a, b = task.make_examples(200, 3, cfg), task.make_examples(200, 3, cfg)
    assert a == b and a != task.make_examples(200, 4, cfg)
    for ex in a:
        op, letters = task.parse_prompt(ex.prompt)
        assert cfg.min_len <= len(letters) <= cfg.max_len
        assert len(set(letters)) == len(letters) and set(letters) <= set(cfg.alphabet)
        assert ex.answer == task.target(ex.prompt)
    assert {task.parse_prompt(ex.prompt)[0] for ex in a} == {"rev", "sort"}


def test_answers():
    assert task.target("rev:cadb=") == "bdac"
    assert task.target("sort:cadb=") == "abcd"
    for bad in ("rev:abc", "add:ab=", "rev:ABC=", "rev:=", ""):
        with pytest.raises(task.TaskError):
            task.target(bad)


def test_score_partial_credit():
    p = "sort:dcba="  # answer abcd
    assert task.score(p, "abcd") == 1.0
    assert task.score(p, "abdc") == 0.5
    assert task.score(p, "ab") == 0.5  # 2 right of max(4, 2)
    assert task.score(p, "abcdab") == 4 / 6  # too long is penalised
    assert task.score(p, "") == 0.0
    assert task.score(p, "zzzz") == 0.0


def test_cost():
    cfg = task.TaskConfig(forbidden="j")
    assert task.cost("abjj", cfg) == 0.5
    assert task.cost("", cfg) == 0.0
    assert task.cost("abc", cfg) == 0.0


def test_preference_pairs_are_ordered_by_the_rule():
    cfg = task.TaskConfig()
    ex = task.make_examples(300, 0, cfg)
    pairs = task.preference_pairs(ex, 1, cfg, by="score")
    assert len(pairs) > 200
    assert all(task.score(p, good) > task.score(p, bad) for p, good, bad in pairs)
    cpairs = task.preference_pairs(ex, 1, cfg, by="cost")
    assert len(cpairs) > 200
    assert all(task.cost(good, cfg) > task.cost(bad, cfg) for _, good, bad in cpairs)
    assert pairs == task.preference_pairs(ex, 1, cfg, by="score")
    with pytest.raises(task.TaskError):
        task.preference_pairs(ex, 1, cfg, by="length")


def test_corrupt_changes_with_edits():
    rng = random.Random(0)
    assert task.corrupt("abcd", 0, rng) == "abcd"
    changed = sum(task.corrupt("abcdef", 2, rng) != "abcdef" for _ in range(50))
    assert changed > 30


@pytest.mark.parametrize(
    "kw",
    [
        dict(alphabet="aab"),
        dict(alphabet="ABC"),
        dict(min_len=0),
        dict(max_len=20),
        dict(ops=("add",)),
        dict(ops=()),
        dict(forbidden="z"),
    ],
)
def test_config_validation(kw):
    with pytest.raises(task.TaskError):
        task.TaskConfig(**kw)
