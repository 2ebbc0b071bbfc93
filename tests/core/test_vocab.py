"""The one vocabulary: stages in one order everywhere, and the algorithm registry that every
package reads (adding an algorithm is one registration, plus its loop and estimator)."""

from __future__ import annotations

import pytest

from hybridflow import vocab
from hybridflow.cli import main as cli_main
from hybridflow.executor.rl.algorithms import ESTIMATORS
from hybridflow.executor.rl.loops import LOOPS
from hybridflow.executor.run.driver import summarize
from hybridflow.plan import Plan
from hybridflow.planner.search import plan_job
from hybridflow.simulator.cluster import Cluster
from hybridflow.simulator.job import Job, JobError
from hybridflow.vocab import ALGORITHMS, STAGES, Algorithm, Role, Stage


def test_every_algorithm_has_its_loop_and_estimator() -> None:
    assert set(LOOPS) == set(ALGORITHMS) == set(ESTIMATORS)


def test_the_command_line_offers_the_registered_algorithms() -> None:
    for command in ("plan", "run"):
        parser = cli_main.build_parser([command])
        sub = next(a for a in parser._actions if a.dest == "command").choices[command]
        choices = next(a for a in sub._actions if a.dest == "algorithm").choices
        assert list(choices) == list(ALGORITHMS)


def test_stages_have_one_order(a100_plan: Plan) -> None:
    assert STAGES == (Stage.GENERATE, Stage.PREPARE, Stage.TRAIN, Stage.RESHARD)
    assert list(a100_plan.predicted["stages"]) == list(STAGES)
    rows = [{"stages": {s: 1.0 for s in reversed(STAGES)}, "score": 0.5}] * 2
    assert list(summarize(a100_plan, rows, None)["measured"]["stages"]) == list(STAGES)


@pytest.fixture
def a100_plan() -> Plan:
    job = Job.create("ppo", "qwen2.5-0.5b", 256, 256, 64, mini_batches=2)
    return plan_job(Cluster.from_gpus("a100-80gb", 8), job)[0]


@pytest.fixture
def rloo():
    """A grouped algorithm without a reference (a made-up registration for this test)."""
    algo = vocab.register(
        Algorithm("rloo-test", (Role.ACTOR, Role.REWARD), grouped=True, default_samples=4)
    )
    yield algo
    del ALGORITHMS[algo.name]


def test_one_registration_reaches_the_job_and_the_planner(rloo: Algorithm) -> None:
    job = Job.create(rloo.name, "qwen2.5-0.5b", 256, 256, 64, mini_batches=2)
    assert job.roles == (Role.ACTOR, Role.REWARD) and job.n_samples == 4
    assert job.to_dict()["n_samples"] == 4  # grouped: the plan file says how many
    plan = plan_job(Cluster.from_gpus("a100-80gb", 8), job)[0]
    assert {r for s in plan.sets for r in s.models} == {"actor", "reward"}
    with pytest.raises(JobError, match="needs n_samples >= 2"):
        Job.create(rloo.name, "qwen2.5-0.5b", 256, 256, 64, n_samples=1)


def test_unknown_algorithm_names_the_known_ones() -> None:
    with pytest.raises(JobError, match="unknown algorithm 'dpo': choose one of ppo, grpo"):
        Job.create("dpo", "tiny", 16, 8, 8)


def test_data_holds_plain_names() -> None:
    """Roles in jobs and sets are the names themselves (a Role compares equal to its name),
    so messages and files never show an enum."""
    job = Job.create("ppo", "tiny", 16, 8, 8)
    assert all(type(r) is str for r in job.roles) and all(type(r) is str for r, _ in job.models)
    plan = plan_job(Cluster.from_gpus("local-cpu", 4, 4), job)[0]
    assert all(type(r) is str for s in plan.sets for r in s.models)
    assert Role.ACTOR in job.roles and "critic" in vocab.VALUE_ROLES
