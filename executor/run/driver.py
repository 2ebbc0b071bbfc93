"""`hybridflow run`: a plan's RL job run on its placement, measured beside its prediction.

:func:`run` checks the plan against what this executor can run, starts Ray and one worker
group per set, and calls the algorithm's loop (hybridflow.executor.rl.loops) once per
iteration, writing everything into a :class:`RunDir`.

Recovery: with ``RunOptions.max_restarts`` N > 0, a worker that dies (WorkerDiedError) makes
the controller tear every worker group down, check that the plan still fits on the nodes
alive, start the groups again, restore the newest whole checkpoint (the resume path) and go
on, at most N times; each restart is a record in metrics.jsonl. Preemption: the first
SIGTERM or SIGINT lets the current iteration finish, writes a checkpoint and stops
(:class:`RunInterrupted`, exit code 128 + the signal's number); a second one stops at once,
abandoning the iteration (:class:`RunAborted`), the last whole checkpoint kept.
"""

from __future__ import annotations

import logging
import signal
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

from hybridflow.errors import RunStopped
from hybridflow.executor.controller.cluster import (
    Cluster,
    ClusterConfig,
    RayClusterError,
    check_nodes,
)
from hybridflow.executor.controller.worker_group import WorkerDiedError
from hybridflow.executor.data.rewards import RewardError
from hybridflow.executor.rl.loops import LOOPS
from hybridflow.executor.rl.runtime import Runtime
from hybridflow.executor.run.checks import check_runnable
from hybridflow.executor.run.config import RunConfig
from hybridflow.executor.run.export import check_export_dir, export_actor
from hybridflow.executor.run.inputs import JobInputs, job_inputs
from hybridflow.executor.run.rundir import RunDir
from hybridflow.executor.run.startup import Startup
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
    max_restarts: int = 0  # worker deaths survived by restarting from the newest checkpoint


@dataclass
class RunResult:
    out_dir: Path
    metrics: list[dict]
    summary: dict


class RunInterrupted(RunStopped):
    """A run stopped by SIGTERM or SIGINT; the command exits with 128 + the signal's number
    (143 for SIGTERM, 130 for SIGINT)."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class RunAborted(RunInterrupted):
    """A second signal: the run stopped at once, its current iteration abandoned."""


class StopSignals:
    """While entered (in the main thread): the first SIGTERM or SIGINT is remembered, for the
    loop to stop at the next iteration boundary; a second raises :class:`RunAborted` at once."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[signal.Signals, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.signum is not None:
            raise RunAborted(signum, f"second {name}: stopped at once, the iteration abandoned")
        self.signum = signum
        log.warning(
            "%s: finishing the current iteration, then a checkpoint and stop (%s again: "
            "stop at once)",
            name,
            name,
        )

    def interrupted(self, what: str, rundir: RunDir) -> RunInterrupted:
        """The error a stop after the first signal raises; `what`: what became of the
        iteration."""
        assert self.signum is not None
        name = signal.Signals(self.signum).name
        return RunInterrupted(
            self.signum, f"{name}: {what}; continue with: hybridflow run --resume {rundir.path}"
        )


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
    parts = sorted({k for m in rows for k in m.get("breakdown", {})})
    split = {k: statistics.mean(m.get("breakdown", {}).get(k, 0.0) for m in rows) for k in parts}
    it_s = sum(stages.values())
    return {
        "plan": plan.to_dict(),
        "measured": {
            "iteration_s": it_s,
            "tokens_per_s": iteration_tokens(plan) / it_s,
            "stages": stages,
            "breakdown": split,
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
    startup = Startup()
    startup.mark("launch")
    cluster_config = ClusterConfig(devices=options.devices, address=options.ray_address)
    check_runnable(
        plan, None if cluster_config.join_address else options.devices, cfg.data.user_job
    )
    check_export_dir(cfg.data.export_hf)
    inputs = job_inputs(plan, cfg.data, cfg.seed)  # every model, data and rule checked
    startup.mark("inputs")
    try:
        rundir = RunDir(out)
        rundir.start(plan, cfg, options.resume)
        predicted = predict(plan, options.profile, cfg.reshard)
        cluster = Cluster.start(cluster_config)
        startup.mark("ray")
    except BaseException:
        inputs.close()
        raise
    try:
        with StopSignals() as stop:
            ctl = _Controller(plan, cfg, inputs, cluster, rundir, options, progress, stop, startup)
            metrics, evals = ctl.run()
            if cfg.data.export_hf:
                export_actor(rundir.latest_checkpoint(), cfg.data.export_hf)
    except (RewardError, RunAborted) as e:
        raise _with_checkpoint(e, rundir) from None
    finally:
        cluster.shutdown()
        inputs.close()
    critics = bool(plan.job.dataflow.critics)
    summary = summarize(
        plan, metrics, predicted, evals, warmup=max(1, cfg.critic_warmup if critics else 0)
    )
    summary["inputs"] = inputs.counts
    summary["startup"] = startup.to_dict()
    rundir.write_summary(summary)
    return RunResult(rundir.path, metrics, summary)


def _with_checkpoint(e: RewardError | RunAborted, rundir: RunDir) -> Exception:
    """The stop's message with the last whole checkpoint and how to continue from it."""
    last = rundir.latest_checkpoint()
    where = f"the last whole checkpoint: {last.name if last else 'none'}"
    again = f"hybridflow run --resume {rundir.path}"
    if isinstance(e, RewardError):
        return RewardError(f"{e}; {where}; continue with: {again} (and --reward-fn, once mended)")
    return RunAborted(e.signum, f"{e}; {where}; continue with: {again}")


@dataclass
class _Controller:
    """The iterations of one run, with its restarts and its stop on a signal."""

    plan: Plan
    cfg: RunConfig
    inputs: JobInputs
    cluster: Cluster
    rundir: RunDir
    options: RunOptions
    progress: Callable[[dict], None] | None
    stop: StopSignals
    startup: Startup = field(default_factory=Startup)
    iteration: int = 0  # the iteration running (or about to)

    def run(self) -> tuple[list[dict], dict]:
        """Worker groups started, the iterations run; on a worker's death (up to
        max_restarts times) the groups torn down, started again and the newest checkpoint
        restored."""
        resume, restarts = self.options.resume, 0
        while True:
            rt = Runtime(self.plan, self.cfg, self.inputs, self.cluster)
            try:
                self.cluster.reserve(self.plan)  # nodes checked, every set placed
                rt.start()
                self.startup.mark("workers")
                return self.iterations(rt, resume)
            except WorkerDiedError as e:
                died = self._died(e, restarts)
            finally:
                rt.shutdown()
            restarts += 1
            self._restart(died, restarts)
            resume = True

    def _died(self, e: WorkerDiedError, restarts: int) -> str:
        """What died, if the run restarts; else raises."""
        if self.stop.signum is not None:
            raise self.stop.interrupted(
                f"iteration {self.iteration} abandoned ({e})", self.rundir
            ) from e
        if restarts < self.options.max_restarts:
            return str(e)
        if restarts:
            raise WorkerDiedError(f"{e} (after {restarts} restarts: --max-restarts)") from e
        raise e

    def _restart(self, died: str, n: int) -> None:
        """Pools released, the plan checked against the nodes alive, the restart recorded."""
        for name in list(self.cluster.pools):
            self.cluster.remove_pool(name)
        resumed = self.rundir.checkpoint_iteration()
        c = self.plan.cluster
        try:
            check_nodes(
                self.cluster.node_devices(),
                c.nodes,
                c.gpus_per_node,
                self.plan.gpus,
                self.cluster.resource,
            )
        except RayClusterError as e:
            raise RunStopped(
                f"{died}; no restart: the plan no longer fits on the nodes alive ({e}); "
                f"the last whole checkpoint resumes at iteration {resumed}"
            ) from None
        log.warning(
            "restart %d of %d: %s; resuming at iteration %d",
            n,
            self.options.max_restarts,
            died,
            resumed,
        )
        self.rundir.append(
            {
                "event": "restart",
                "iteration": resumed,  # the iteration resumed at
                "restart": n,
                "max_restarts": self.options.max_restarts,
                "died": died,
                "failed_iteration": self.iteration,
                "time": datetime.now(UTC).isoformat(timespec="seconds"),
            }
        )

    def iterations(self, rt: Runtime, resume: bool) -> tuple[list[dict], dict]:
        """The iterations from the newest checkpoint (or the first) to the last; the metrics
        of every iteration and the held-out scores before the first and after the last."""
        cfg, loop = rt.cfg, LOOPS[rt.plan.job.algorithm]
        first, state = self.rundir.restore(rt) if resume else (0, {})
        log.info("iterations %d to %d of %s", first, cfg.iterations - 1, rt.plan.job.algorithm)
        self.iteration = first
        if "eval_before" not in state:
            state["eval_before"] = rt.evaluate()
        metrics = self.rundir.metrics_before(first)
        self.startup.finish()
        for it in range(first, cfg.iterations):
            if self.stop.signum is not None:
                self._stop(rt, it, first, state)
            self.iteration = it
            t0 = time.perf_counter()
            row = _row(rt, it, loop(rt, it, state), time.perf_counter() - t0)
            metrics.append(row)
            self.rundir.append(row)
            if self.progress:
                self.progress(row)
            if (it + 1) % cfg.checkpoint_every == 0 or it + 1 == cfg.iterations:
                self.rundir.save_checkpoint(rt, it + 1, state)
        return metrics, {"before": state["eval_before"], "after": rt.evaluate()}

    def _stop(self, rt: Runtime, it: int, first: int, state: dict) -> None:
        """After the first signal, before iteration `it`: a checkpoint (unless the newest
        is of this point), then RunInterrupted."""
        if it == first:
            what = f"stopped before iteration {it}, the checkpoints as they were"
        elif self.rundir.checkpoint_iteration() == it:
            what = f"iteration {it - 1} finished, its checkpoint iter_{it:06d} written"
        else:
            self.rundir.save_checkpoint(rt, it, state)
            what = f"iteration {it - 1} finished, checkpoint iter_{it:06d} written"
        raise self.stop.interrupted(what, self.rundir)


def _row(rt: Runtime, it: int, row: dict, wall: float) -> dict:
    """An iteration's metrics.jsonl record: its stage seconds, wall time and the loop's row."""
    stages = rt.take_timings()
    log.debug("iteration %d: %.3f s, stages %s", it, sum(stages.values()), stages)
    return {
        "iteration": it,
        "stages": stages,
        "wall_s": wall,
        "tokens_per_s": iteration_tokens(rt.plan) / sum(stages.values()),
        "breakdown": rt.take_breakdown(stages),
        **row,
    }
