"""`hybridflow run`: a plan's RL job run on its placement, measured beside its prediction.

:func:`run` checks the plan against what this executor can run, starts Ray and one worker
group per set, and calls the algorithm's loop (hybridflow.executor.rl.loops) once per
iteration, writing everything into a :class:`RunDir`.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from hybridflow.executor.controller.cluster import Cluster, ClusterConfig
from hybridflow.executor.rl.loops import LOOPS
from hybridflow.executor.rl.runtime import Runtime
from hybridflow.executor.run.checks import check_runnable
from hybridflow.executor.run.config import RunConfig
from hybridflow.executor.run.rundir import RunDir
from hybridflow.executor.task.artifacts import ensure_artifacts
from hybridflow.plan import Plan
from hybridflow.simulator.predict import predict_plan
from hybridflow.simulator.profile import load_profile
from hybridflow.vocab import STAGES

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunOptions:
    """Where and how a run goes, beyond its plan and settings."""

    resume: bool = False  # continue the run in the run dir from its newest checkpoint
    ray_address: str | None = None  # join this Ray cluster (else RAY_ADDRESS, else local)
    devices: int = 4  # logical devices of a local cluster
    profile: str = "local-cpu"  # the profile the prediction beside the measurement uses


@dataclass
class RunResult:
    out_dir: Path
    metrics: list[dict]
    summary: dict


def iteration_tokens(plan: Plan) -> int:
    """Prompt + response tokens the controller generates and trains on per iteration."""
    return plan.job.sequences * plan.job.seq_len


def summarize(
    plan: Plan,
    metrics: list[dict],
    predicted: dict | None,
    evals: dict | None = None,
    warmup: int = 1,
) -> dict:
    """Measured stage means over the steady iterations (the first `warmup` ones left out
    when there are more: start-up, and critic warm-up iterations that do not train the
    actor), next to the simulator's prediction; `evals`: held-out rule scores before the
    first and after the last iteration."""
    rows = metrics[warmup:] if len(metrics) > warmup else metrics
    stages = {s: statistics.mean(m["stages"][s] for m in rows) for s in STAGES}
    it_s = sum(stages.values())
    return {
        "plan": plan.to_dict(),
        "measured": {
            "iteration_s": it_s,
            "tokens_per_s": iteration_tokens(plan) / it_s,
            "stages": stages,
            "iterations": len(metrics),
            "timed_iterations": len(rows),
            "score_first": metrics[0]["score"],
            "score_last": metrics[-1]["score"],
            **{f"eval_score_{k}": v for k, v in (evals or {}).items()},
        },
        "predicted": predicted,
    }


def predict(plan: Plan, profile: str, scheme: str) -> dict:
    """The simulator's prediction of the plan, as the summary holds it."""
    d = predict_plan(plan, load_profile(profile), reshard=scheme).to_dict()
    return {
        "iteration_s": d["iteration_s"],
        "tokens_per_s": d["tokens_per_s"],
        "stages": d["stages"],
        "profile": profile,
    }


def run(
    plan: Plan,
    cfg: RunConfig,
    out: str | Path,
    options: RunOptions = RunOptions(),
    progress: Callable[[dict], None] | None = None,
) -> RunResult:
    """Run (or with options.resume, continue) the plan's job into the run dir `out`."""
    cluster_config = ClusterConfig(devices=options.devices, address=options.ray_address)
    check_runnable(plan, None if cluster_config.join_address else options.devices)
    rundir = RunDir(out)
    rundir.start(plan, cfg, options.resume)
    art = ensure_artifacts(model=plan.job.model(plan.job.gpu_roles[0]), seed=cfg.seed)
    predicted = predict(plan, options.profile, cfg.reshard)
    cluster = Cluster.start(cluster_config)
    rt = Runtime(plan, cfg, art, cluster)
    try:
        rt.start()
        metrics, evals = _iterations(rt, rundir, options.resume, progress)
    finally:
        rt.shutdown()
        cluster.shutdown()
    critics = bool(plan.job.dataflow.critics)
    summary = summarize(
        plan, metrics, predicted, evals, warmup=max(1, cfg.critic_warmup if critics else 0)
    )
    rundir.write_summary(summary)
    return RunResult(rundir.path, metrics, summary)


def _iterations(
    rt: Runtime, rundir: RunDir, resume: bool, progress: Callable[[dict], None] | None
) -> tuple[list[dict], dict]:
    """The iterations from the newest checkpoint (or the first) to the last; the metrics
    of every iteration and the held-out scores before the first and after the last."""
    cfg, loop = rt.cfg, LOOPS[rt.plan.job.algorithm]
    first, state = rundir.restore(rt) if resume else (0, {})
    log.info("iterations %d to %d of %s", first, cfg.iterations - 1, rt.plan.job.algorithm)
    if "eval_before" not in state:
        state["eval_before"] = rt.evaluate()
    metrics = rundir.metrics_before(first)
    for it in range(first, cfg.iterations):
        t0 = time.perf_counter()
        row = loop(rt, it, state)
        wall = time.perf_counter() - t0
        stages = rt.take_timings()
        row = {
            "iteration": it,
            "stages": stages,
            "wall_s": wall,
            "tokens_per_s": iteration_tokens(rt.plan) / sum(stages.values()),
            **row,
        }
        metrics.append(row)
        rundir.append(row)
        log.debug("iteration %d: %.3f s, stages %s", it, sum(stages.values()), stages)
        if progress:
            progress(row)
        if (it + 1) % cfg.checkpoint_every == 0 or it + 1 == cfg.iterations:
            rundir.save_checkpoint(rt, it + 1, state)
    return metrics, {"before": state["eval_before"], "after": rt.evaluate()}
