"""The best plan says how many GPUs it leaves idle and why, from the planner's own tables."""

from __future__ import annotations

import pytest

from hybridflow.cli.main import main
from hybridflow.plan import PlacedSet, Plan
from hybridflow.planner.idle import SAME, grown, growth, idle_reason, size_rule
from hybridflow.planner.search import Planner
from hybridflow.planner.tables import set_sizes
from hybridflow.simulator.cluster import Cluster
from hybridflow.simulator.job import Job
from hybridflow.simulator.profile import load_profile

# a small batch on a 1.5B model: the best plan leaves whole nodes idle, as no faster
JOB = Job.create("grpo", "qwen2.5-1.5b", 1024, 1024, 4, mini_batches=4, reward="rule")
H100 = load_profile("h100-80gb")


@pytest.fixture(scope="module")
def planner() -> Planner:
    return Planner(JOB, H100, 8)


def _best(planner: Planner, gpus: int) -> Plan:
    return planner.plan(Cluster.from_gpus("h100-80gb", gpus, 8))[0]


def test_idle_gpus_are_counted_and_the_sizes_tried_named(planner: Planner) -> None:
    best = _best(planner, 64)
    assert best.gpus < 64  # the premise: GPUs left idle
    reason = idle_reason(planner, best)
    assert reason is not None
    assert reason.startswith(f"{64 - best.gpus} of 64 GPUs idle: no faster plan uses them")
    assert "set sizes are 1, 2, 4 GPUs within a node or whole nodes of 8" in reason
    for i, placed in enumerate(best.sets):
        up = next(n for n in set_sizes(8, 64) if n > placed.gpus)
        name = "+".join(placed.models)
        assert f"the next size up for {name} is {up} GPUs and is no faster" in reason
        # the numbers are the prediction of the plan with this set grown to that size
        g = growth(planner, best, i)
        alt = grown(planner, best, i, up)
        assert alt is not None and g.next_gpus == up and g.reach == placed.gpus + 64 - best.gpus
        now = best.prediction["iteration_s"]
        assert g.iteration_s == alt.prediction["iteration_s"] >= now * (1 - SAME)
        assert f"{g.iteration_s:.2f} s vs {now:.2f} s" in reason


def test_every_larger_size_within_reach_is_tried(planner: Planner) -> None:
    best = _best(planner, 128)
    idle = 128 - best.gpus
    assert idle >= 16  # the premise: room for two sizes up
    reason = idle_reason(planner, best)
    assert reason is not None and reason.startswith(f"{idle} of 128 GPUs idle: no faster plan")
    for i, placed in enumerate(best.sets):
        g = growth(planner, best, i)
        sizes = [n for n in set_sizes(8, 128) if placed.gpus < n <= placed.gpus + idle]
        assert (g.next_gpus, g.reach, g.tried_to) == (sizes[0], placed.gpus + idle, sizes[-1])
        assert g.further is not None and g.further[1] >= best.prediction["iteration_s"] * (1 - SAME)
        name = "+".join(placed.models)
        assert f"next size up for {name} is {sizes[0]} GPUs and is no faster" in reason
        assert f"nor is any size up to {sizes[-1]} GPUs" in reason


def test_no_idle_gpu_gives_none(planner: Planner) -> None:
    best = _best(planner, 16)
    assert best.gpus == 16
    assert idle_reason(planner, best) is None


def test_a_set_whose_next_size_does_not_fit_in_the_idle_gpus() -> None:
    """A hand-made plan of two sets: the actor's next size (8) needs 4 more GPUs than the 2
    idle; the reference's (4) fits, and is predicted faster."""
    job = Job.create("grpo", "qwen2.5-0.5b", 256, 256, 8, mini_batches=2, reward="rule")
    planner = Planner(job, load_profile("a100-80gb"), 8)
    sets = []
    for role, n in (("actor", 4), ("reference", 2)):
        choice = planner.tables.best_set((role,), n)
        assert choice is not None
        sets.append(PlacedSet((role,), n, dict(choice.layouts)))
    plan = Plan(Cluster.from_gpus("a100-80gb", 8, 8), job, tuple(sets))
    reason = idle_reason(planner, plan)
    assert reason is not None and reason.startswith("2 of 8 GPUs idle: ")
    assert "the next size up for actor is 8 GPUs, 4 more than its 4, but only 2 are idle" in reason
    g = growth(planner, plan, 1)
    assert g.next_gpus == 4 and g.iteration_s is not None
    assert "the next size up for reference is 4 GPUs and is " in reason


def test_size_rule_follows_the_node() -> None:
    assert size_rule(8) == "1, 2, 4 GPUs within a node or whole nodes of 8"
    assert size_rule(6) == "1, 2 GPUs within a node or whole nodes of 6"
    assert size_rule(1) == "whole nodes of 1"


def test_plan_prints_the_idle_line(capsys) -> None:
    argv = ["plan", "--gpu", "h100-80gb", "--gpus", "64", "--model", "qwen2.5-1.5b"]
    argv += ["--algorithm", "grpo", "--reward", "rule", "--batch", "4"]
    argv += ["--pipeline", "sync"]  # the idle line reads a synchronous plan's tables
    assert main(argv) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    idle = next(i for i, line in enumerate(lines) if "GPUs idle" in line)
    assert lines[idle].startswith("  48 of 64 GPUs idle: no faster plan uses them")
    assert lines[idle - 1].startswith("  stages: ")  # right under the best plan
    assert main([*argv[:4], "16", *argv[5:]]) == 0
    assert "GPUs idle" not in capsys.readouterr().out
