"""The plans and jobs of benchmarks/fidelity.py: the tiny job of each algorithm, its
responses as the starting actor samples them, and the ten plans the benchmark runs."""

from __future__ import annotations

import dataclasses
import functools
import os
from collections import Counter

JOB = dict(
    model="tiny", prompt_len=16, response_len=8, global_batch=32, ppo_epochs=1, mini_batches=2
)


@functools.cache
def response_lengths(response_len: int, prompts: int = 1024) -> tuple[tuple[int, float], ...]:
    """The responses as the job describes them to the simulator: the lengths (up to and
    including EOS, at most `response_len`) the runs' starting actor (the task's SFT
    checkpoint) samples at the runs' temperature on the first `prompts` training prompts;
    (length, share) pairs. Sampled once with transformers in this process, not taken from
    any run. (The task's answers plus EOS understate them: at temperature 1 about one
    response in sixteen runs to the cap, and a generate call lasts as long as its longest.)"""
    import torch
    from transformers import LlamaForCausalLM

    from hybridflow.executor.run.config import RunConfig
    from hybridflow.executor.task.artifacts import ensure_artifacts
    from hybridflow.executor.task.warmup import generate

    art = ensure_artifacts(model=JOB["model"], seed=0)
    actor = LlamaForCausalLM.from_pretrained(str(art.actor_dir)).eval()
    pool, counts = art.prompts.train[:prompts], Counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    try:
        for i in range(0, len(pool), 256):
            counts.update(
                len(r)
                for r in generate(
                    actor, pool[i : i + 256], response_len, art.special, RunConfig().temperature, i
                )
            )
    finally:
        torch.set_num_threads(threads)
    return tuple((n, c / sum(counts.values())) for n, c in sorted(counts.items()))


def job(algorithm: str):
    from hybridflow.simulator.job import Job

    kw = dict(JOB, algorithm=algorithm)
    if algorithm == "grpo":
        kw.update(n_samples=4, global_batch=8)
    job = Job.create(**kw)
    return dataclasses.replace(job, response_dist=response_lengths(job.response_len))


def _colocated(cluster, job, layouts: dict[str, dict]) -> dict:
    """Every role of `job` on all of the cluster's devices, with the layouts given (data
    parallel over all of them for the roles not named)."""
    from hybridflow.layout import GenLayout, ParallelLayout
    from hybridflow.plan import PlacedSet, Plan
    from hybridflow.vocab import layout_kinds

    n = cluster.n_gpus
    plain = {
        "train": ParallelLayout(1, 1, n),
        "infer": ParallelLayout(1, 1, n),
        "generate": GenLayout(1, 1, 1),
    }
    sets = (
        PlacedSet(
            job.gpu_roles,
            n,
            {
                role: {
                    k: (
                        GenLayout.from_dict(layouts[role][k])
                        if k == "generate"
                        else ParallelLayout.from_dict(layouts[role][k])
                    )
                    if k in layouts.get(role, {})
                    else plain[k]
                    for k in layout_kinds(role)
                }
                for role in job.gpu_roles
            },
        ),
    )
    return Plan(cluster, job, sets).to_dict()


def _split(cluster, job, sets: tuple[tuple[str, ...], ...]) -> dict:
    """The roles in `sets` of equal devices, each role data parallel over its set."""
    from hybridflow.layout import GenLayout, ParallelLayout
    from hybridflow.plan import PlacedSet, Plan
    from hybridflow.vocab import layout_kinds

    n = cluster.n_gpus // len(sets)
    lay = ParallelLayout(1, 1, n)
    placed = tuple(
        PlacedSet(
            roles,
            n,
            {
                r: {k: GenLayout(1, 1, 1) if k == "generate" else lay for k in layout_kinds(r)}
                for r in roles
            },
        )
        for roles in sets
    )
    return Plan(cluster, job, placed).to_dict()


def _cluster():
    """The local cluster the benchmark runs on: 4 logical devices."""
    from hybridflow.simulator.cluster import Cluster

    return Cluster.from_gpus("local-cpu", 4, 4)


def planner_first(profile) -> dict:
    """The PPO plan the planner ranks first for the local cluster with `profile`."""
    from hybridflow.planner.search import plan_job

    return plan_job(_cluster(), job("ppo"), profile, max_gen_pp=1)[0].to_dict()


def build_plans(profile) -> dict[str, dict]:
    """name -> plan dict (the planner's, its standard placements, and hand-set layouts)."""
    from hybridflow.planner.search import standard_placements

    cluster = _cluster()
    ppo = job("ppo")
    std = {
        k: p.to_dict() for k, p in standard_placements(cluster, ppo, profile, max_gen_pp=1).items()
    }
    plans = {"ppo-planner": planner_first(profile)}
    plans.update({f"ppo-{k}": v for k, v in std.items()})
    # data parallel over all 4 devices, colocated and as two concurrent sets of 2
    plans["ppo-colocated-dp4"] = _colocated(cluster, ppo, {})
    plans["ppo-split-2x2"] = _split(cluster, ppo, (("actor", "reference"), ("critic", "reward")))
    plans["ppo-tp2-pp2"] = _colocated(
        cluster,
        ppo,
        {
            "actor": {
                "train": {"pp": 1, "tp": 2, "dp": 2},
                "generate": {"pp": 1, "tp": 1, "micro_dp": 2},
            },
            "critic": {"train": {"pp": 2, "tp": 1, "dp": 2}},
        },
    )
    plans["grpo-gen-tp2"] = _colocated(
        cluster,
        job("grpo"),
        {
            "actor": {
                "train": {"pp": 1, "tp": 2, "dp": 2},
                "generate": {"pp": 1, "tp": 2, "micro_dp": 1},
            }
        },
    )
    plans["remax-split"] = standard_placements(cluster, job("remax"), profile, max_gen_pp=1)[
        "split"
    ].to_dict()
    plans["safe-rlhf-colocated"] = standard_placements(
        cluster, job("safe-rlhf"), profile, max_gen_pp=1
    )["colocated"].to_dict()
    return plans
