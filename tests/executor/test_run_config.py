"""Run settings: validation, and which algorithm each KL setting reaches."""

from __future__ import annotations

import re

import pytest

from hybridflow.executor.run.config import RunConfig, RunConfigError
from hybridflow.simulator.job import Job


@pytest.mark.parametrize(
    "bad,message",
    [
        (dict(iterations=0), "iterations must be an integer >= 1"),
        (dict(critic_warmup=-1), "critic_warmup must be an integer >= 0"),
        (dict(critic_warmup=1.5), "critic_warmup must be an integer >= 0"),
        (dict(reshard="nccl"), "unknown resharding scheme"),
        (dict(top_p=0.0), "top_p in (0, 1]"),
    ],
)
def test_bad_settings_are_named(bad: dict, message: str) -> None:
    with pytest.raises(RunConfigError, match=re.escape(message)):
        RunConfig(**bad)


def test_kl_settings_reach_their_algorithms() -> None:
    cfg = RunConfig(kl_coef=0.3, kl_loss_coef=0.4)
    grpo = cfg.rl(Job.create("grpo", "tiny", 16, 8, 8, n_samples=8))
    assert (grpo.kl_coef, grpo.kl_loss_coef, grpo.group_size) == (0.0, 0.4, 8)
    for algorithm in ("ppo", "remax", "safe-rlhf"):
        rl = cfg.rl(Job.create(algorithm, "tiny", 16, 8, 8))
        assert (rl.kl_coef, rl.kl_loss_coef) == (0.3, 0.0)


def test_unknown_saved_settings_are_refused() -> None:
    with pytest.raises(RunConfigError, match="unknown run settings: warmup"):
        RunConfig.from_dict({"warmup": 3})
    assert RunConfig.from_dict(RunConfig(critic_warmup=0).to_dict()).critic_warmup == 0


def test_data_settings_round_trip_and_are_checked() -> None:
    from hybridflow.executor.run.config import DataConfig

    cfg = RunConfig(data=DataConfig(data="/d/train.jsonl", reward_fn="math", overlong="truncate"))
    again = RunConfig.from_dict(cfg.to_dict())
    assert again == cfg and again.data.user_job
    assert not RunConfig().data.user_job
    with pytest.raises(RunConfigError, match="overlong must be one of refuse, truncate"):
        DataConfig(data="x.jsonl", overlong="cut")
    with pytest.raises(RunConfigError, match="need --data"):
        DataConfig(reward_fn="math")
    with pytest.raises(RunConfigError, match="unknown run settings: prompt"):
        RunConfig.from_dict({"data": {"prompt": "q"}})


def test_engine_logprobs_need_temperature_one() -> None:
    assert RunConfig(old_logprobs="engine").old_logprobs == "engine"
    with pytest.raises(RunConfigError, match="temperature 1"):
        RunConfig(old_logprobs="engine", temperature=0.7)
    with pytest.raises(RunConfigError, match="old_logprobs must be one of recompute, engine"):
        RunConfig(old_logprobs="vllm")
