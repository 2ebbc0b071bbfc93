"""One iteration of each algorithm over the worker groups (the paper's §4 controller).

generate -> reference log-probs, values, rewards -> advantages on the controller ->
critic and actor updates. Each loop returns the iteration's metrics and is registered with
``@loop(name)`` under its algorithm's name (hybridflow.vocab).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from hybridflow.executor.controller.batch import Batch
from hybridflow.executor.engines import timers
from hybridflow.executor.rl import algorithms as alg
from hybridflow.executor.rl.losses import ActorLoss, CriticLoss
from hybridflow.executor.rl.runtime import Runtime
from hybridflow.vocab import ALGORITHMS, Role, Stage

Loop = Callable[[Runtime, int, dict], dict]
LOOPS: dict[str, Loop] = {}  # algorithm name -> one iteration of it


def loop(name: str) -> Callable[[Loop], Loop]:
    """Register the controller loop of the algorithm `name`."""

    def add(fn: Loop) -> Loop:
        assert name in ALGORITHMS and name not in LOOPS, name
        LOOPS[name] = fn
        return fn

    return add


LOGP = "response_outputs"
SCORE = "sequence_scores"


def _scored(rt: Runtime, batch: Batch, wanted: dict[str, tuple[str, str]]) -> Batch:
    """Run the model outputs; rule-based reward/cost (a function, no model) on the controller."""
    rules = {k: v for k, v in wanted.items() if rt.plan.job.is_rule(v[0])}
    if rt.cfg.old_logprobs == "engine" and "old_log_probs" in wanted:
        # the engine sampled with these very weights: its log-probs are the behaviour policy's
        wanted = {k: v for k, v in wanted.items() if k != "old_log_probs"}
        batch = batch.with_fields({"old_log_probs": batch["rollout_log_probs"]})
    batch = rt.outputs(batch, {k: v for k, v in wanted.items() if k not in rules})
    with timers.timed("controller:prepare.rules"):
        extra = {
            k: rt.rule(batch, "score" if role == "reward" else "cost")
            for k, (role, _) in rules.items()
        }
    return batch.with_fields(extra) if extra else batch


def _advantages(rt: Runtime, batch: Batch, rl: alg.RLConfig, lagrange: float = 0.0) -> Batch:
    fields = {k: batch[k] for k in batch.keys() if isinstance(batch[k], torch.Tensor)}
    fields["log_probs"] = batch["old_log_probs"]
    with timers.timed("controller:prepare.advantages"):
        out = alg.compute_advantages(rl, fields, rl.kl_coef, lagrange)
    return batch.with_fields({k: v for k, v in out.items() if k != "kl"})


def _metrics(rt: Runtime, batch: Batch, train: dict[str, float], **extra: float) -> dict:
    mask = batch["response_mask"].float()
    kl = 0.0
    if "ref_log_probs" in batch:
        kl = float(alg.masked_mean(batch["old_log_probs"] - batch["ref_log_probs"], mask))
    # vLLM's sampling log-probs against megatron's recomputation: ~0 when the resharded
    # generation weights are the trained ones
    drift = (
        float(alg.masked_mean((batch["rollout_log_probs"] - batch["old_log_probs"]).abs(), mask))
        if "rollout_log_probs" in batch and rt.cfg.old_logprobs == "recompute"
        else float("nan")  # not measured when the engine's log-probs are taken as they are
    )
    return {
        "reward": float(batch["scores"].float().mean()),
        "score": float(rt.rule(batch).mean()),
        "kl": kl,
        "rollout_logp_diff": drift,
        "response_tokens": float(mask.sum()),
        **extra,
        **train,
    }


def _rl(rt: Runtime) -> alg.RLConfig:
    return rt.cfg.rl(rt.plan.job)


def _losses(rt: Runtime, rl: alg.RLConfig, roles: tuple[str, ...]) -> dict[str, Callable]:
    P = rt.plan.job.prompt_len
    out: dict[str, Any] = {}
    for role in roles:
        out[role] = (
            ActorLoss(rl, P)
            if role == Role.ACTOR
            else CriticLoss(rl, P, "cost_" if role == Role.COST_CRITIC else "")
        )
    return out


def _trained(rt: Runtime, it: int) -> tuple[str, ...]:
    """The algorithm's critics, and the actor once the critic warm-up iterations are over."""
    critics = rt.plan.job.dataflow.critics
    return critics + ((Role.ACTOR,) if not critics or it >= rt.cfg.critic_warmup else ())


@loop("ppo")
def ppo(rt: Runtime, it: int, state: dict) -> dict:
    rl = _rl(rt)
    batch = rt.generate(rt.prompts(it), it)
    with rt.stage(Stage.PREPARE):
        batch = _scored(
            rt,
            batch,
            {
                "old_log_probs": ("actor", LOGP),
                "ref_log_probs": ("reference", LOGP),
                "values": ("critic", LOGP),
                "scores": ("reward", SCORE),
            },
        )
        batch = _advantages(rt, batch, rl)
    with rt.stage(Stage.TRAIN):
        train = rt.update(_losses(rt, rl, _trained(rt, it)), batch)
    return _metrics(rt, batch, train)


@loop("grpo")
def grpo(rt: Runtime, it: int, state: dict) -> dict:
    rl = _rl(rt)
    batch = rt.generate(rt.prompts(it), it, n=rl.group_size)
    with rt.stage(Stage.PREPARE):
        wanted = {"old_log_probs": ("actor", LOGP), "scores": ("reward", SCORE)}
        if "reference" in rt.groups:
            wanted["ref_log_probs"] = ("reference", LOGP)
        batch = _advantages(rt, _scored(rt, batch, wanted), rl)
    with rt.stage(Stage.TRAIN):
        train = rt.update(_losses(rt, rl, _trained(rt, it)), batch)
    return _metrics(rt, batch, train)


@loop("remax")
def remax(rt: Runtime, it: int, state: dict) -> dict:
    rl = _rl(rt)
    prompts = rt.prompts(it)
    batch = rt.generate(prompts, it)
    greedy = rt.generate(prompts, it, greedy=True)
    with rt.stage(Stage.PREPARE):
        baseline = _scored(rt, greedy, {"scores": ("reward", SCORE)})["scores"]
        batch = _scored(
            rt,
            batch,
            {
                "old_log_probs": ("actor", LOGP),
                "ref_log_probs": ("reference", LOGP),
                "scores": ("reward", SCORE),
            },
        )
        batch = _advantages(rt, batch.with_fields({"baseline_scores": baseline}), rl)
    with rt.stage(Stage.TRAIN):
        train = rt.update(_losses(rt, rl, _trained(rt, it)), batch)
    return _metrics(rt, batch, train, baseline=float(baseline.float().mean()))


@loop("safe-rlhf")
def safe_rlhf(rt: Runtime, it: int, state: dict) -> dict:
    rl = _rl(rt)
    lagrange = alg.LagrangeMultiplier(
        value=state.get("lagrange", 1.0), lr=rt.cfg.lagrange_lr, threshold=rt.cfg.cost_threshold
    )
    batch = rt.generate(rt.prompts(it), it)
    with rt.stage(Stage.PREPARE):
        batch = _scored(
            rt,
            batch,
            {
                "old_log_probs": ("actor", LOGP),
                "ref_log_probs": ("reference", LOGP),
                "values": ("critic", LOGP),
                "cost_values": ("cost_critic", LOGP),
                "scores": ("reward", SCORE),
                "costs": ("cost", SCORE),
            },
        )
        batch = _advantages(rt, batch, rl, lagrange.value)
        mean_cost = float(batch["costs"].float().mean())
        state["lagrange"] = lagrange.update(mean_cost)
    with rt.stage(Stage.TRAIN):
        train = rt.update(_losses(rt, rl, _trained(rt, it)), batch)
    return _metrics(rt, batch, train, cost=mean_cost, lagrange=state["lagrange"])
