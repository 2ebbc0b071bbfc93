"""The built-in task's rule as a `--reward-fn` function (verl's signature) for the sized rows
of benchmarks/trl_grpo.py: the data file's answer key is the prompt itself, the rule scores a
response against it (executor.task.rules.score, as TRL's reward function there does)."""

from __future__ import annotations

from typing import Any


def rule_score(data_source: str, solution_str: str, ground_truth: Any, extra_info: dict) -> float:
    from hybridflow.executor.task import rules

    return float(rules.score(str(ground_truth), solution_str))
