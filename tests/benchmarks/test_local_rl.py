"""The single-process RL loop (benchmarks/local_rl.py) runs every algorithm's dataflow.

Small artifacts, two iterations each: finite losses, the algorithm's own quantities present.
How far the rule score rises is measured by the benchmark itself (see its docstring).
"""

import math

import pytest

from hybridflow.executor.task.artifacts import ensure_artifacts
from hybridflow.executor.task.settings import BuildSettings
from tests.conftest import load_benchmark

SMALL = dict(n_train=256, n_eval=16, sft_steps=40, rm_steps=8, cost_steps=8, batch=16)


@pytest.fixture(scope="module")
def local_rl():
    return load_benchmark("local_rl")


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    return ensure_artifacts(
        settings=BuildSettings(**SMALL), cache_dir=tmp_path_factory.mktemp("cache")
    )


@pytest.mark.parametrize("algorithm", ["ppo", "grpo", "remax", "safe-rlhf"])
def test_each_algorithm_runs_its_dataflow(local_rl, art, algorithm):
    s = local_rl.LoopSettings(
        algorithm=algorithm, iterations=2, prompts=4, group_size=2, mini_batches=2, kl_coef=0.05
    )
    history = local_rl.run(s, art, log=lambda line: None)
    steps = [h for h in history if "actor_loss" in h]
    assert len(steps) == 2
    for h in steps:
        assert all(math.isfinite(h[k]) for k in ("actor_loss", "score", "reward", "kl"))
        assert 0.0 <= h["score"] <= 1.0
    if algorithm == "safe-rlhf":
        assert all("lagrange" in h and h["lagrange"] >= 0 for h in steps)
    assert 0.0 <= history[-1]["eval_sampled"] <= 1.0


def test_loop_settings_are_validated(local_rl):
    with pytest.raises(ValueError):
        local_rl.LoopSettings(algorithm="dpo")
    with pytest.raises(ValueError):
        local_rl.LoopSettings(prompts=3, mini_batches=2, algorithm="ppo")
    with pytest.raises(ValueError):
        local_rl.LoopSettings(reward="oracle")
