"""One iteration of each algorithm over the worker groups (the paper's §4 controller).

generate -> reference log-probs, values, rewards -> advantages on the controller ->
critic and actor updates. Each function returns the iteration's metrics.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from hybridflow.executor.rl import algorithms as alg
from hybridflow.executor.controller.batch import Batch
from hybridflow.executor.rl.worker import ActorLoss, CriticLoss
from hybridflow.executor.run.config import samples_per_prompt
from hybridflow.executor.rl.runtime import Runtime

LOGP = "response_outputs"
SCORE = "sequence_scores"


def _scored(rt: Runtime, batch: Batch, wanted: dict[str, tuple[str, str]]) -> Batch:
    """Run the model outputs; rule-based reward/cost (a function, no model) on the controller."""
    models = rt.plan["job"]["models"]
    rules = {k: v for k, v in wanted.items() if models.get(v[0]) == "rule"}
    batch = rt.outputs(batch, {k: v for k, v in wanted.items() if k not in rules})
    extra = {k: rt.rule(batch, "score" if role == "reward" else "cost")
             for k, (role, _) in rules.items()}
    return batch.with_fields(extra) if extra else batch


def _advantages(rt: Runtime, batch: Batch, rl: alg.RLConfig, lagrange: float = 0.0) -> Batch:
    fields = {k: batch[k] for k in batch.keys() if isinstance(batch[k], torch.Tensor)}
    fields["log_probs"] = batch["old_log_probs"]
    out = alg.compute_advantages(rl, fields, rl.kl_coef, lagrange)
    return batch.with_fields({k: v for k, v in out.items() if k != "kl"})


def _metrics(rt: Runtime, batch: Batch, train: dict[str, float], **extra: float) -> dict:
    mask = batch["response_mask"].float()
    kl = 0.0
    if "ref_log_probs" in batch:
        kl = float(alg.masked_mean(batch["old_log_probs"] - batch["ref_log_probs"], mask))
    # vLLM's sampling log-probs against megatron's recomputation: ~0 when the resharded
    # generation weights are the trained ones
    drift = float(alg.masked_mean((batch["rollout_log_probs"] - batch["old_log_probs"]).abs(),
                                  mask)) if "rollout_log_probs" in batch else float("nan")
    return {"reward": float(batch["scores"].float().mean()),
            "score": float(rt.rule(batch).mean()), "kl": kl, "rollout_logp_diff": drift,
            "response_tokens": float(mask.sum()), **extra, **train}


def _rl(rt: Runtime) -> alg.RLConfig:
    job = rt.plan["job"]
    return rt.cfg.rl(job["algorithm"], samples_per_prompt(job))


def _losses(rt: Runtime, rl: alg.RLConfig, roles: tuple[str, ...]) -> dict[str, Callable]:
    P, R = rt.plan["job"]["prompt_len"], rt.plan["job"]["response_len"]
    out: dict[str, Any] = {}
    for role in roles:
        out[role] = (ActorLoss(rl, P, R) if role == "actor" else
                     CriticLoss(rl, P, R, "cost_" if role == "cost_critic" else ""))
    return out


def _trained(rt: Runtime, it: int, critics: tuple[str, ...]) -> tuple[str, ...]:
    """The critics, and the actor once the critic warm-up iterations are over."""
    return critics + (("actor",) if it >= rt.cfg.critic_warmup else ())


def ppo(rt: Runtime, it: int, state: dict) -> dict:
    rl = _rl(rt)
    batch = rt.generate(rt.prompts(it), it)
    with rt.stage("prepare"):
        batch = _scored(rt, batch, {"old_log_probs": ("actor", LOGP),
                                    "ref_log_probs": ("reference", LOGP),
                                    "values": ("critic", LOGP), "scores": ("reward", SCORE)})
        batch = _advantages(rt, batch, rl)
    with rt.stage("train"):
        train = rt.update(_losses(rt, rl, _trained(rt, it, ("critic",))), batch)
    return _metrics(rt, batch, train)


def grpo(rt: Runtime, it: int, state: dict) -> dict:
    rl = _rl(rt)
    batch = rt.generate(rt.prompts(it), it, n=rl.group_size)
    with rt.stage("prepare"):
        wanted = {"old_log_probs": ("actor", LOGP), "scores": ("reward", SCORE)}
        if "reference" in rt.groups:
            wanted["ref_log_probs"] = ("reference", LOGP)
        batch = _advantages(rt, _scored(rt, batch, wanted), rl)
    with rt.stage("train"):
        train = rt.update(_losses(rt, rl, ("actor",)), batch)
    return _metrics(rt, batch, train)


def remax(rt: Runtime, it: int, state: dict) -> dict:
    rl = _rl(rt)
    prompts = rt.prompts(it)
    batch = rt.generate(prompts, it)
    greedy = rt.generate(prompts, it, greedy=True)
    with rt.stage("prepare"):
        baseline = _scored(rt, greedy, {"scores": ("reward", SCORE)})["scores"]
        batch = _scored(rt, batch, {"old_log_probs": ("actor", LOGP),
                                    "ref_log_probs": ("reference", LOGP),
                                    "scores": ("reward", SCORE)})
        batch = _advantages(rt, batch.with_fields({"baseline_scores": baseline}), rl)
    with rt.stage("train"):
        train = rt.update(_losses(rt, rl, ("actor",)), batch)
    return _metrics(rt, batch, train, baseline=float(baseline.float().mean()))


def safe_rlhf(rt: Runtime, it: int, state: dict) -> dict:
    rl = _rl(rt)
    lagrange = alg.LagrangeMultiplier(value=state.get("lagrange", 1.0), lr=rt.cfg.lagrange_lr,
                                      threshold=rt.cfg.cost_threshold)
    batch = rt.generate(rt.prompts(it), it)
    with rt.stage("prepare"):
        batch = _scored(rt, batch, {
            "old_log_probs": ("actor", LOGP), "ref_log_probs": ("reference", LOGP),
            "values": ("critic", LOGP), "cost_values": ("cost_critic", LOGP),
            "scores": ("reward", SCORE), "costs": ("cost", SCORE)})
        batch = _advantages(rt, batch, rl, lagrange.value)
        mean_cost = float(batch["costs"].float().mean())
        state["lagrange"] = lagrange.update(mean_cost)
    with rt.stage("train"):
        train = rt.update(_losses(rt, rl, _trained(rt, it, ("critic", "cost_critic"))), batch)
    return _metrics(rt, batch, train, cost=mean_cost, lagrange=state["lagrange"])


LOOPS: dict[str, Callable[[Runtime, int, dict], dict]] = {
    "ppo": ppo, "grpo": grpo, "remax": remax, "safe-rlhf": safe_rlhf}
