"""What both sides of benchmarks/trl_grpo.py share: the workload, and how an iteration's
tokens and seconds are counted. Run the benchmark, not this file."""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from hybridflow.executor.run.driver import iteration_tokens
from hybridflow.plan import Plan

TRL_MISSING = (
    "trl_grpo: TRL is not installed in this environment; install the benchmark's "
    "extra packages with: .venv/bin/pip install -r benchmarks/requirements-trl.txt"
)


@dataclass(frozen=True)
class Workload:
    prompts: int = 16  # prompts per iteration (the job's global batch)
    samples: int = 4  # responses per prompt
    prompt_len: int = 16
    response_len: int = 8
    mini_batches: int = 2  # optimizer steps per iteration
    iterations: int = 8
    seed: int = 0
    trl_beta: float = 1e-3
    model: str = "tiny"  # the actor: "tiny" (the built-in task's) or a Hugging Face folder

    def __post_init__(self) -> None:
        if (
            min(self.prompts, self.prompt_len, self.response_len, self.mini_batches) < 1
            or self.iterations < 2
            or self.samples < 2
        ):
            raise ValueError(
                "need prompts, lengths, mini-batches >= 1, samples >= 2 and "
                "iterations >= 2 (the first is a warm-up)"
            )
        if (self.prompts * self.samples) % self.mini_batches:
            raise ValueError("mini_batches must divide prompts x samples")

    def job(self):
        from hybridflow.simulator.job import Job

        return Job.create(
            algorithm="grpo",
            model=self.model,
            prompt_len=self.prompt_len,
            response_len=self.response_len,
            global_batch=self.prompts,
            n_samples=self.samples,
            mini_batches=self.mini_batches,
            reward="rule",
        )


def planned_tokens(plan: Plan) -> int:
    """Tokens of one iteration as the controller counts them (its tokens/s numerator)."""
    return iteration_tokens(plan)


def iteration_seconds(t0: float, step_ends: list[float], steps_per_iteration: int) -> list[float]:
    """Seconds of each whole iteration from the start time and every optimizer step's end."""
    if steps_per_iteration < 1:
        raise ValueError("steps_per_iteration must be >= 1")
    bounds = [t0] + step_ends[steps_per_iteration - 1 :: steps_per_iteration]
    return [b - a for a, b in zip(bounds, bounds[1:])]


def throughput(tokens: int, seconds: list[float]) -> tuple[float, float]:
    """(mean seconds per iteration, tokens/s) with the first iteration (warm-up) left out."""
    rows = seconds[1:] if len(seconds) > 1 else seconds
    mean = statistics.mean(rows)
    return mean, tokens / mean
