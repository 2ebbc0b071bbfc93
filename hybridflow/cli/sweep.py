"""`hybridflow sweep`: how many GPUs do I need? The best plan at every GPU count."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from hybridflow.cli.jobargs import add_job_arguments, build_job
from hybridflow.planner.sweep import (
    SweepError,
    Target,
    gpu_counts,
    parse_range,
    planner_points,
    run_sweep,
)
from hybridflow.report.sweep import table, to_json, write_outputs
from hybridflow.simulator.cluster import MAX_GPUS, Cluster
from hybridflow.simulator.profile import Profile, load_profile

MAX_COUNTS = 512  # a sweep plans every count: more would run for hours
MAX_STEPS = 10**9  # --steps: iterations of a training run


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gpu", required=True, help="GPU kind: a profile name (profiles/) or YAML path")
    add_job_arguments(p, model_default=None)
    p.add_argument(
        "--gpus",
        default="1:256",
        metavar="LO:HI",
        help="GPU counts to try: 1, 2, 4 below one node, then whole nodes (default 1:256)",
    )
    p.add_argument("--gpus-per-node", type=int, help="GPUs per node (default: the profile's)")
    p.add_argument(
        "--target-tokens-per-s",
        type=float,
        metavar="X",
        help="mark the smallest count predicted to reach X tokens/s",
    )
    p.add_argument("--steps", type=int, metavar="S", help="with --deadline-hours: S iterations ...")
    p.add_argument(
        "--deadline-hours", type=float, metavar="H", help="... must finish within H hours"
    )
    p.add_argument("--out", metavar="DIR", help="write sweep.csv and sweep.png to DIR")
    p.add_argument(
        "--json", action="store_true", help="print the sweep (with each best plan) as JSON"
    )


def _counts(args: argparse.Namespace, profile: Profile) -> tuple[list[int], int]:
    """The GPU counts to plan and the GPUs per node, checked before any planning."""
    gpn = profile.gpus_per_node if args.gpus_per_node is None else args.gpus_per_node
    Cluster(profile.name, 1, gpn)  # a ClusterError for an impossible --gpus-per-node
    lo, hi = parse_range(args.gpus)
    if hi > MAX_GPUS:
        raise SweepError(f"--gpus: at most {MAX_GPUS:,} GPUs (2**20), got {args.gpus!r}")
    counts = gpu_counts(lo, hi, gpn)
    if len(counts) > MAX_COUNTS:
        raise SweepError(
            f"--gpus {args.gpus} is {len(counts):,} cluster sizes of {gpn}-GPU nodes: a sweep "
            f"plans each, give at most {MAX_COUNTS} (a narrower LO:HI)"
        )
    return counts, gpn


def main(args: argparse.Namespace) -> int:
    if args.steps is not None and args.steps > MAX_STEPS:
        raise SweepError(f"--steps must be at most {MAX_STEPS:,} iterations, got {args.steps}")
    target = Target(args.target_tokens_per_s, args.steps, args.deadline_hours)
    profile = load_profile(args.gpu)
    counts, gpn = _counts(args, profile)
    job = build_job(args)
    plan_at = planner_points(args.gpu, job, profile, gpn)
    result = run_sweep(counts, plan_at, target, job.to_dict(), profile.name, gpn)
    if args.json:
        json.dump(to_json(result), sys.stdout, indent=1)
        print()
    else:
        print(table(result))
    if args.out is not None:
        csv_path, png_path = write_outputs(result, Path(args.out))
        print(f"wrote {csv_path} and {png_path}", file=sys.stderr if args.json else sys.stdout)
    return 0
