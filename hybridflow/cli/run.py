"""`hybridflow run [PLAN.json]`: execute a plan (default: plan the built-in job on the local
4-device cluster and run it), streaming metrics to DIR/metrics.jsonl.

    .venv/bin/hybridflow run                          # plan + run the default local job
    .venv/bin/hybridflow run plan.json --iterations 20 --out runs/ppo
    .venv/bin/hybridflow run --resume runs/ppo        # continue a stopped run
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from hybridflow.executor.run.config import RunConfig, SCHEMES

# batch sizes at which the tiny task's rule score rises within 16 iterations (see
# tests/test_run_e2e.py::test_*_raises_the_rule_score and benchmarks/local_rl.py)
DEFAULT_JOB = dict(algorithm="ppo", model="tiny", prompt_len=16, response_len=8,
                   global_batch=64, ppo_epochs=2, mini_batches=4)


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("plan", nargs="?", help="plan JSON (default: plan the built-in local job)")
    p.add_argument("--iterations", type=int, default=None, help="RL iterations (default 16)")
    p.add_argument("--out", default=None, help="run dir (default runs/<time>)")
    p.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last "
                   "checkpoint (its plan and settings)")
    p.add_argument("--ray-address", default=None, help="join this Ray cluster (or RAY_ADDRESS)")
    p.add_argument("--devices", type=int, default=4,
                   help="logical devices of the local CPU cluster (default 4)")
    p.add_argument("--algorithm", choices=["ppo", "grpo", "remax", "safe-rlhf"],
                   help="algorithm of the default job (no PLAN given)")
    p.add_argument("--reshard", choices=SCHEMES, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--checkpoint-every", type=int, default=None)
    p.add_argument("--profile", default="local-cpu",
                   help="profile the prediction beside the measurement uses")


def default_plan(algorithm: str, devices: int) -> dict:
    """The built-in job planned for the local cluster (generation pp=1, as the executor runs)."""
    from hybridflow.planner.search import plan_job
    from hybridflow.simulator.cluster import Cluster
    from hybridflow.simulator.job import Job
    from hybridflow.simulator.profile import load_profile
    kw = dict(DEFAULT_JOB, algorithm=algorithm)
    if algorithm == "grpo":
        kw.update(n_samples=8, global_batch=32, ppo_epochs=1)
    job = Job.create(**kw)
    cluster = Cluster.from_gpus("local-cpu", devices, devices)
    return plan_job(cluster, job, load_profile("local-cpu"), max_gen_pp=1)[0].to_dict()


def _settings(args: argparse.Namespace, saved: dict | None) -> RunConfig:
    d = dict(saved or {})
    for flag, key in (("iterations", "iterations"), ("reshard", "reshard"), ("seed", "seed"),
                      ("checkpoint_every", "checkpoint_every")):
        if getattr(args, flag) is not None:
            d[key] = getattr(args, flag)
    return RunConfig.from_dict(d)


def _load(args: argparse.Namespace) -> tuple[dict, RunConfig, Path]:
    if args.resume:
        out = Path(args.resume)
        if not (out / "plan.json").exists() or not (out / "run.json").exists():
            raise ValueError(f"--resume {out}: not a run dir (no plan.json / run.json)")
        plan = json.loads((out / "plan.json").read_text())
        return plan, _settings(args, json.loads((out / "run.json").read_text())), out
    if args.plan:
        try:
            plan = json.loads(Path(args.plan).read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"plan {args.plan}: not valid JSON ({e})") from None
    else:
        plan = default_plan(args.algorithm or "ppo", args.devices)
    out = Path(args.out or f"runs/{time.strftime('%Y%m%d-%H%M%S')}")
    return plan, _settings(args, None), out


def main(args: argparse.Namespace) -> int:
    from hybridflow.executor.run.driver import run
    from hybridflow.executor.run.checks import check_plan
    plan, cfg, out = _load(args)
    local = not (args.ray_address or os.environ.get("RAY_ADDRESS"))
    check_plan(plan, cfg, args.devices if local else None)
    from hybridflow.executor.controller.worker_group import WorkerGroupError
    bar = _progress(cfg.iterations)
    try:
        res = run(plan, cfg, out, resume=bool(args.resume), ray_address=args.ray_address,
                  profile=args.profile, devices=args.devices, progress=bar)
    except WorkerGroupError as e:
        bar.close()
        print(f"hybridflow run: stopped: {e}", file=sys.stderr)
        return 1
    bar.close()
    m, p = res.summary["measured"], res.summary["predicted"] or {}
    print(f"run dir: {out}")
    print(f"{'stage':10s} {'measured s':>11s} {'predicted s':>12s}")
    for s, v in m["stages"].items():
        print(f"{s:10s} {v:11.3f} {p.get('stages', {}).get(s, float('nan')):12.3f}")
    print(f"{'iteration':10s} {m['iteration_s']:11.3f} {p.get('iteration_s', float('nan')):12.3f}")
    print(f"tokens/s   {m['tokens_per_s']:11.1f} {p.get('tokens_per_s', float('nan')):12.1f}")
    print(f"rule score of the batch: {m['score_first']:.3f} (first iteration) -> "
          f"{m['score_last']:.3f} (last)")
    if "eval_score_before" in m:
        print(f"rule score on the held-out prompts: "
              f"{m['eval_score_before']:.3f} (before) -> {m['eval_score_after']:.3f} (after)")
    return 0


class _progress:
    def __init__(self, total: int) -> None:
        from tqdm import tqdm
        self.bar = tqdm(total=total, unit="it", desc="rl")

    def __call__(self, row: dict) -> None:
        self.bar.n = row["iteration"] + 1
        self.bar.set_postfix(score=f"{row['score']:.3f}", reward=f"{row['reward']:.3f}",
                             tok_s=f"{row['tokens_per_s']:.0f}")
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()
