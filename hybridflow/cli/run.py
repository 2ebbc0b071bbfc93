"""`hybridflow run [PLAN.json]`: execute a plan (default: plan the built-in job on the local
4-device cluster and run it), streaming metrics to DIR/metrics.jsonl.

    .venv/bin/hybridflow run                          # plan + run the default local job
    .venv/bin/hybridflow run plan.json --iterations 20 --out runs/ppo
    .venv/bin/hybridflow run --resume runs/ppo        # continue a stopped run
    .venv/bin/hybridflow run --max-restarts 2         # survive two worker deaths

SIGTERM or SIGINT: the current iteration finishes, a checkpoint is written, and the command
exits with one line and code 128 + the signal's number (143, 130); a second signal stops at
once (same code), the last whole checkpoint kept. `--resume DIR` continues either.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from hybridflow.errors import UserError
from hybridflow.executor.run.config import OLD_LOGPROBS, SCHEMES, RunConfig
from hybridflow.executor.run.driver import RunInterrupted, RunOptions, run
from hybridflow.executor.run.rundir import RunDir
from hybridflow.plan import Plan
from hybridflow.planner.search import plan_job
from hybridflow.simulator.cluster import Cluster
from hybridflow.simulator.job import Job
from hybridflow.simulator.profile import load_profile
from hybridflow.vocab import ALGORITHMS

# batch sizes at which the tiny task's rule score rises within 16 iterations (see
# tests/executor/test_run_e2e.py::test_rl_raises_the_rule_score and benchmarks/local_rl.py)
DEFAULT_JOB: dict[str, Any] = dict(
    algorithm="ppo",
    model="tiny",
    prompt_len=16,
    response_len=8,
    global_batch=64,
    ppo_epochs=2,
    mini_batches=4,
)
# GRPO-like algorithms
DEFAULT_GROUPED: dict[str, Any] = dict(n_samples=8, global_batch=32, ppo_epochs=1)
# the flags' upper bounds, and why (their lower bounds are RunConfig's)
LIMITS: dict[str, tuple[int, int, str]] = {
    "iterations": (1, 10**6, "more would run for years"),
    "checkpoint_every": (1, 10**6, "iterations"),
    "seed": (0, 2**32 - 1, "the range every seeded library takes"),
    "devices": (1, 1024, "one process each on this host"),
    "max_restarts": (0, 100, "restarts after a worker dies"),
}


DATA_FLAGS = (
    "data",
    "eval_data",
    "prompt_key",
    "answer_key",
    "chat_template",
    "reward_fn",
    "cost_fn",
    "reward_processes",
    "export_hf",
)


class RunUsageError(UserError):
    """A run flag out of its range."""


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("plan", nargs="?", help="plan JSON (default: plan the built-in local job)")
    p.add_argument("--iterations", type=int, default=None, help="RL iterations (default 16)")
    p.add_argument("--out", default=None, help="run dir (default runs/<time>)")
    p.add_argument(
        "--resume",
        metavar="DIR",
        help="continue the run in DIR from its last checkpoint (its plan and settings)",
    )
    p.add_argument("--ray-address", default=None, help="join this Ray cluster (or RAY_ADDRESS)")
    p.add_argument(
        "--devices",
        type=int,
        default=4,
        help="logical devices of the local CPU cluster (default 4)",
    )
    p.add_argument(
        "--algorithm", choices=list(ALGORITHMS), help="algorithm of the default job (no PLAN given)"
    )
    p.add_argument("--reshard", choices=SCHEMES, default=None)
    p.add_argument(
        "--old-logprobs",
        choices=OLD_LOGPROBS,
        default=None,
        help="the behaviour policy's log-probs: recomputed by the actor (default) or the "
        "generation engine's own (one forward pass less; exact in fp32 on the CPU)",
    )
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--checkpoint-every", type=int, default=None)
    p.add_argument(
        "--max-restarts",
        type=int,
        default=0,
        help="when a worker dies, restart the worker groups from the last checkpoint up to "
        "N times (default 0: stop)",
    )
    p.add_argument(
        "--profile", default="local-cpu", help="profile the prediction beside the measurement uses"
    )
    _data_flags(p)


def _data_flags(p: argparse.ArgumentParser) -> None:
    """A user's job: the plan's checkpoint folders trained on a data file, scored by a rule."""
    g = p.add_argument_group("your own job (the plan's models are Hugging Face folders)")
    g.add_argument("--data", metavar="FILE", help="training prompts: JSONL or Parquet")
    g.add_argument("--eval-data", metavar="FILE", help="held-out prompts, scored before and after")
    g.add_argument("--prompt-key", default=None, help="the prompt's field (default prompt)")
    g.add_argument(
        "--answer-key", default=None, help="the ground truth's field, dotted for nested ones"
    )
    g.add_argument(
        "--no-chat-template",
        dest="chat_template",
        action="store_false",
        default=None,
        help="encode prompts as they are (default: the tokenizer's chat template, if any)",
    )
    g.add_argument(
        "--truncate-prompts",
        action="store_true",
        default=None,
        help="keep the last prompt_len tokens of longer prompts (default: refuse them)",
    )
    g.add_argument(
        "--reward-fn",
        metavar="FILE.py:NAME",
        help="reward rule: fn(data_source, solution_str, ground_truth, extra_info) -> float, "
        "or a built-in rule (exact, math)",
    )
    g.add_argument("--cost-fn", metavar="FILE.py:NAME", help="Safe-RLHF's cost rule, the same")
    g.add_argument(
        "--reward-processes", type=int, default=None, help="processes the rules run in (2)"
    )
    g.add_argument("--export-hf", metavar="DIR", help="write the trained actor here at the end")


def default_plan(algorithm: str, devices: int) -> Plan:
    """The built-in job planned for the local cluster (generation pp=1, as the executor runs)."""
    kw = dict(DEFAULT_JOB, algorithm=algorithm)
    if ALGORITHMS[algorithm].grouped:
        kw.update(DEFAULT_GROUPED)
    job = Job.create(**kw)
    cluster = Cluster.from_gpus("local-cpu", devices, devices)
    return plan_job(cluster, job, load_profile("local-cpu"), max_gen_pp=1)[0]


def _settings(args: argparse.Namespace, saved: dict | None) -> RunConfig:
    d = dict(saved or {})
    for flag, key in (
        ("iterations", "iterations"),
        ("reshard", "reshard"),
        ("seed", "seed"),
        ("checkpoint_every", "checkpoint_every"),
        ("old_logprobs", "old_logprobs"),
    ):
        if getattr(args, flag) is not None:
            d[key] = getattr(args, flag)
    data = dict(d.get("data") or {})
    for flag in DATA_FLAGS:
        if getattr(args, flag, None) is not None:
            data[flag] = getattr(args, flag)
    if args.truncate_prompts:
        data["overlong"] = "truncate"
    for flag in ("data", "eval_data", "export_hf"):  # workers and resumes read them anywhere
        if data.get(flag):
            data[flag] = str(Path(data[flag]).resolve())
    for flag in ("reward_fn", "cost_fn"):
        file, sep, name = str(data.get(flag) or "").rpartition(":")
        if sep and Path(file).exists():
            data[flag] = f"{Path(file).resolve()}:{name}"
    d["data"] = data
    return RunConfig.from_dict(d)


def _check_flags(args: argparse.Namespace) -> None:
    """The flags' ranges and the --profile, before a run dir is written or Ray starts."""
    for dest, (low, high, why) in LIMITS.items():
        v = getattr(args, dest)
        if v is not None and not low <= v <= high:
            flag = "--" + dest.replace("_", "-")
            raise RunUsageError(f"{flag} must be in {low}..{high:,} ({why}), got {v}")
    load_profile(args.profile)


def _load(args: argparse.Namespace) -> tuple[Plan, RunConfig, Path]:
    if args.resume:
        plan, saved = RunDir(args.resume).saved()
        return plan, _settings(args, saved), Path(args.resume)
    if args.data and not args.plan:
        raise RunUsageError(
            "--data runs your plan: plan your model folder first (hybridflow plan --model DIR "
            "... --out plan.json), then hybridflow run plan.json --data FILE"
        )
    plan = (
        Plan.load(args.plan) if args.plan else default_plan(args.algorithm or "ppo", args.devices)
    )
    out = Path(args.out or f"runs/{time.strftime('%Y%m%d-%H%M%S')}")
    return plan, _settings(args, None), out


def main(args: argparse.Namespace) -> int:
    _check_flags(args)
    plan, cfg, out = _load(args)
    options = RunOptions(
        resume=bool(args.resume),
        ray_address=args.ray_address,
        devices=args.devices,
        profile=args.profile,
        max_restarts=args.max_restarts,
    )
    bar = _Progress(cfg.iterations)
    try:
        res = run(plan, cfg, out, options, progress=bar)
    except RunInterrupted as e:
        bar.close()
        print(f"hybridflow run: {e}", file=sys.stderr)
        return e.exit_code
    finally:
        bar.close()
    m, p = res.summary["measured"], res.summary["predicted"] or {}
    print(f"run dir: {out}")
    print(f"{'stage':10s} {'measured s':>11s} {'predicted s':>12s}")
    for s, v in m["stages"].items():
        print(f"{s:10s} {v:11.3f} {p.get('stages', {}).get(s, float('nan')):12.3f}")
    print(f"{'iteration':10s} {m['iteration_s']:11.3f} {p.get('iteration_s', float('nan')):12.3f}")
    print(f"tokens/s   {m['tokens_per_s']:11.1f} {p.get('tokens_per_s', float('nan')):12.1f}")
    print(
        f"rule score of the batch: {m['score_first']:.3f} (first iteration) -> "
        f"{m['score_last']:.3f} (last)"
    )
    up = res.summary.get("startup", {})
    if up:
        parts = ", ".join(f"{k[:-2]} {v:.1f}" for k, v in up.items() if k != "total_s")
        print(f"start-up: {up['total_s']:.1f} s to the first iteration ({parts})")
    counts = res.summary.get("inputs", {})
    if counts.get("truncated"):
        print(f"prompts truncated to prompt_len: {counts['truncated']} of {counts['prompts']}")
    if m.get("eval_score_before") is not None:
        print(
            f"rule score on the held-out prompts: "
            f"{m['eval_score_before']:.3f} (before) -> {m['eval_score_after']:.3f} (after)"
        )
    return 0


class _Progress:
    """A progress bar drawn from the first iteration on (none if the run's checks fail)."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.bar: Any = None

    def __call__(self, row: dict) -> None:
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, unit="it", desc="rl")
        self.bar.n = row["iteration"] + 1
        self.bar.set_postfix(
            score=f"{row['score']:.3f}",
            reward=f"{row['reward']:.3f}",
            tok_s=f"{row['tokens_per_s']:.0f}",
        )
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
