"""What the local executor refuses to run (one clear line each), and a plan's per-role
memory settings reaching the engines it builds."""

from __future__ import annotations

import pytest

from hybridflow.executor.run.checks import PlanNotRunnable, check_runnable
from hybridflow.layout import GenLayout, ParallelLayout
from hybridflow.memory import MemorySettings
from hybridflow.plan import PlacedSet, Plan
from hybridflow.simulator.cluster import Cluster
from hybridflow.simulator.job import Job


def _plan(
    actor: ParallelLayout, model: str = "tiny-4l", memory: MemorySettings | None = None
) -> Plan:
    """PPO with the actor alone on its layout's devices, the other roles on one more."""
    job = Job.create("ppo", model, 16, 8, 8)
    gen = GenLayout(pp=1, tp=actor.tp, micro_dp=actor.pp)
    one = ParallelLayout()
    sets = (
        PlacedSet(
            ("actor",),
            actor.n_gpus,
            {"actor": {"train": actor, "generate": gen}},
            {"actor": memory} if memory else {},
        ),
        PlacedSet(
            ("critic", "reference", "reward"),
            1,
            {"critic": {"train": one}, "reference": {"infer": one}, "reward": {"infer": one}},
        ),
    )
    return Plan(Cluster("local-cpu", 1, actor.n_gpus + 1), job, sets)


def test_a_plan_it_can_run_passes() -> None:
    check_runnable(_plan(ParallelLayout(pp=2, dp=1)), devices=3)
    check_runnable(_plan(ParallelLayout(tp=2, dp=2), memory=MemorySettings(recompute="full")))


@pytest.mark.parametrize(
    "plan,message",
    [
        (
            lambda: _plan(ParallelLayout(dp=2), memory=MemorySettings(offload=True)),
            "role actor: memory offload: true: CPU offload is not run by the executor on "
            "CPU devices",
        ),
        (
            lambda: _plan(ParallelLayout(cp=2)),
            "role actor: cp=2: the executor does not run context parallelism",
        ),
        (
            lambda: _plan(ParallelLayout(pp=3)),
            "role actor: pp=3 splits the 4 layers unevenly (2, 1, 1)",
        ),
        (  # even layer count, but the plan balanced the LM head with a shorter last stage
            lambda: _plan(ParallelLayout(pp=2), model="qwen2.5-0.5b"),
            "role actor: pp=2 splits the 24 layers unevenly (17, 7)",
        ),
    ],
    ids=["offload", "cp", "layers-not-divisible", "uneven-stages"],
)
def test_what_the_executor_cannot_run_is_refused(plan, message: str) -> None:
    with pytest.raises(PlanNotRunnable) as err:
        check_runnable(plan())
    assert str(err.value).startswith(message)
    assert "\n" not in str(err.value)


def test_plan_settings_reach_the_trained_engines() -> None:
    from hybridflow.executor.engines.train_engine import EngineConfig, EngineConfigError
    from hybridflow.executor.rl.runtime import engine_config
    from hybridflow.executor.run.config import RunConfig

    settings = MemorySettings(distributed_optimizer=False, recompute="full", micro_batch_tokens=100)
    actor = engine_config("actor", RunConfig(), settings, seq_len=24)
    assert (actor.micro_batch_size, actor.use_distributed_optimizer, actor.recompute) == (
        4,
        False,
        "full",
    )
    one = engine_config("critic", RunConfig(), MemorySettings().resolved(24), seq_len=24)
    assert (one.micro_batch_size, one.use_distributed_optimizer, one.recompute) == (1, True, "none")
    ref = engine_config("reference", RunConfig(micro_batch_size=8), settings, seq_len=24)
    assert (ref.micro_batch_size, ref.use_distributed_optimizer, ref.recompute) == (
        8,
        False,
        "none",
    )
    with pytest.raises(EngineConfigError, match="recompute must be one of none, selective, full"):
        EngineConfig(recompute="partial")


def test_a_generation_group_wider_than_training_is_refused() -> None:
    job = Job.create("ppo", "tiny-4l", 16, 8, 8)
    one = ParallelLayout()
    actor = ParallelLayout(dp=2)
    sets = (
        PlacedSet(("actor",), 2, {"actor": {"train": actor, "generate": GenLayout(1, 2, 1)}}),
        PlacedSet(
            ("critic", "reference", "reward"),
            1,
            {"critic": {"train": one}, "reference": {"infer": one}, "reward": {"infer": one}},
        ),
    )
    plan = Plan(Cluster("local-cpu", 1, 3), job, sets)
    with pytest.raises(PlanNotRunnable, match="3D-HybridEngine only"):
        check_runnable(plan, devices=3)


def test_fsdp_is_refused() -> None:
    with pytest.raises(PlanNotRunnable, match="not FSDP"):
        check_runnable(_plan(ParallelLayout(dp=2), memory=MemorySettings(fsdp=True)), devices=3)


def test_an_asynchronous_plan_is_refused_with_the_way_to_a_runnable_one(tmp_path) -> None:
    from hybridflow.cli.main import main

    out = tmp_path / "async.json"
    argv = ["plan", "--gpu", "local-cpu", "--gpus", "2", "--model", "tiny", "--reward", "rule"]
    assert (
        main(
            [
                *argv,
                "--algorithm",
                "grpo",
                "--prompt-len",
                "16",
                "--response-len",
                "8",
                "--batch",
                "8",
                "--pipeline",
                "async",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    plan = Plan.load(out)
    assert plan.asynchronous
    with pytest.raises(PlanNotRunnable, match="--pipeline sync") as e:
        check_runnable(plan, 4, user_job=False)
    assert "\n" not in str(e.value)
