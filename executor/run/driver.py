"""`hybridflow run`: execute a plan's RL job on its placement and measure it.

The run dir holds plan.json, run.json (settings), metrics.jsonl (one line per iteration),
summary.json (measured and predicted stage seconds side by side) and checkpoints/iter_N
(every role's weights and optimizer state per rank, plus the controller's state). A
checkpoint is written into a temporary folder and renamed into place, so a run that dies
while saving leaves the previous checkpoint whole.
"""
from __future__ import annotations

import json
import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from hybridflow.executor.task.artifacts import ensure_artifacts
from hybridflow.executor.controller.cluster import Cluster, ClusterConfig
from hybridflow.executor.rl.loops import LOOPS
from hybridflow.executor.run.checks import check_plan
from hybridflow.executor.run.config import RunConfig, samples_per_prompt
from hybridflow.executor.rl.runtime import Runtime

STAGES = ("generate", "reshard", "prepare", "train")


class RunError(ValueError):
    """A run that cannot start: a bad plan, run dir or setting."""


@dataclass
class RunResult:
    out_dir: Path
    metrics: list[dict]
    summary: dict


def _latest_checkpoint(out: Path) -> Path | None:
    done = sorted((p for p in (out / "checkpoints").glob("iter_*") if p.is_dir()),
                  key=lambda p: int(p.name.split("_")[1]))
    return done[-1] if done else None


def _save_checkpoint(rt: Runtime, out: Path, it: int, state: dict) -> None:
    final = out / "checkpoints" / f"iter_{it:06d}"
    tmp = final.with_name(final.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if final.exists():  # a resumed run saving an iteration again
        shutil.rmtree(final)
    futures = [rt.groups[role].call(role, "save_role", str(tmp)) for role in rt.groups]
    for f in futures:
        f.result()
    (tmp / "controller.json").write_text(json.dumps({"iteration": it, "state": state}))
    tmp.rename(final)
    for old in (out / "checkpoints").glob("iter_*"):  # keep the newest two
        if old.is_dir() and old not in sorted(old.parent.glob("iter_*"))[-2:]:
            shutil.rmtree(old, ignore_errors=True)


def _restore(rt: Runtime, ckpt: Path) -> tuple[int, dict]:
    for f in [rt.groups[role].call(role, "load_role", str(ckpt)) for role in rt.groups]:
        f.result()
    saved = json.loads((ckpt / "controller.json").read_text())
    return saved["iteration"], saved["state"]


def _tokens(plan: dict) -> int:
    job = plan["job"]
    return job["global_batch"] * samples_per_prompt(job) * (job["prompt_len"]
                                                            + job["response_len"])


def summarize(plan: dict, metrics: list[dict], predicted: dict | None,
              evals: dict | None = None, warmup: int = 1) -> dict:
    """Measured stage means over the steady iterations (the first `warmup` ones left out
    when there are more: start-up, and critic warm-up iterations that do not train the
    actor), next to the simulator's prediction; `evals`: held-out rule scores before the
    first and after the last iteration."""
    rows = metrics[warmup:] if len(metrics) > warmup else metrics
    stages = {s: statistics.mean(m["stages"][s] for m in rows) for s in STAGES}
    it_s = sum(stages.values())
    return {"plan": plan,
            "measured": {"iteration_s": it_s, "tokens_per_s": _tokens(plan) / it_s,
                         "stages": stages, "iterations": len(metrics),
                         "timed_iterations": len(rows),
                         "score_first": metrics[0]["score"], "score_last": metrics[-1]["score"],
                         **{f"eval_score_{k}": v for k, v in (evals or {}).items()}},
            "predicted": predicted}


def predict(plan: dict, profile: str, scheme: str) -> dict | None:
    from hybridflow.plan import Plan
    from hybridflow.simulator.predict import predict_plan
    from hybridflow.simulator.profile import load_profile
    pred = predict_plan(Plan.from_dict(plan), load_profile(profile), reshard=scheme)
    d = pred.to_dict()
    return {"iteration_s": d["iteration_s"], "tokens_per_s": d["tokens_per_s"],
            "stages": d["stages"], "profile": profile}


def run(plan: dict, cfg: RunConfig, out: Path, resume: bool = False,
        ray_address: str | None = None, profile: str = "local-cpu", devices: int = 4,
        progress: Callable[[dict], None] | None = None) -> RunResult:
    """Run (or with `resume`, continue) the plan's job; `devices`: of a local cluster."""
    algorithm = plan["job"]["algorithm"]
    check_plan(plan, cfg, None if ray_address else devices)
    if not resume and ((out / "metrics.jsonl").exists() or (out / "checkpoints").exists()):
        raise RunError(f"run dir {out} already holds a run: continue it with --resume, "
                       f"or give another --out")
    out.mkdir(parents=True, exist_ok=True)
    (out / "plan.json").write_text(json.dumps(plan, indent=1))
    (out / "run.json").write_text(json.dumps(cfg.to_dict(), indent=1))
    models = {m for m in plan["job"]["models"].values() if m != "rule"}
    art = ensure_artifacts(model=models.pop(), seed=cfg.seed)
    predicted = predict(plan, profile, cfg.reshard)
    metrics_path = out / "metrics.jsonl"
    cluster = Cluster.start(ClusterConfig(devices=devices, address=ray_address))
    rt = Runtime(plan, cfg, art, cluster)
    try:
        rt.start()
        first, state = 0, {}
        ckpt = _latest_checkpoint(out) if resume else None
        if ckpt is not None:
            first, state = _restore(rt, ckpt)
        if "eval_before" not in state:
            state["eval_before"] = rt.evaluate()
        metrics = [json.loads(l) for l in metrics_path.read_text().splitlines()[:first]] \
            if resume and metrics_path.exists() else []
        metrics_path.write_text("".join(json.dumps(m) + "\n" for m in metrics))
        for it in range(first, cfg.iterations):
            t0 = time.perf_counter()
            row = LOOPS[algorithm](rt, it, state)
            wall = time.perf_counter() - t0
            stages = rt.take_timings()
            row = {"iteration": it, "stages": stages, "wall_s": wall,
                   "tokens_per_s": _tokens(plan) / sum(stages.values()), **row}
            metrics.append(row)
            with metrics_path.open("a") as f:
                f.write(json.dumps(row) + "\n")
            if progress:
                progress(row)
            if (it + 1) % cfg.checkpoint_every == 0 or it + 1 == cfg.iterations:
                _save_checkpoint(rt, out, it + 1, state)
        evals = {"before": state["eval_before"], "after": rt.evaluate()}
    finally:
        rt.shutdown()
        cluster.shutdown()
    critic = algorithm in ("ppo", "safe-rlhf")
    summary = summarize(plan, metrics, predicted, evals,
                        warmup=max(1, cfg.critic_warmup if critic else 0))
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return RunResult(out, metrics, summary)
