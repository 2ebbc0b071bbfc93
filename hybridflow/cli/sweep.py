"""`hybridflow sweep`: how many GPUs do I need? The best plan at every GPU count."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from hybridflow.cli.jobargs import add_job_arguments, build_job
from hybridflow.planner.sweep import Target, gpu_counts, parse_range, planner_points, run_sweep
from hybridflow.report.sweep import table, to_json, write_outputs
from hybridflow.simulator.profile import load_profile


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
    p.add_argument("--out", type=Path, metavar="DIR", help="write sweep.csv and sweep.png to DIR")
    p.add_argument(
        "--json", action="store_true", help="print the sweep (with each best plan) as JSON"
    )


def main(args: argparse.Namespace) -> int:
    target = Target(args.target_tokens_per_s, args.steps, args.deadline_hours)
    profile = load_profile(args.gpu)
    gpn = args.gpus_per_node or profile.gpus_per_node
    counts = gpu_counts(*parse_range(args.gpus), gpn)
    job = build_job(args)
    plan_at = planner_points(args.gpu, job, profile, gpn)
    result = run_sweep(counts, plan_at, target, job.to_dict(), profile.name, gpn)
    if args.json:
        json.dump(to_json(result), sys.stdout, indent=1)
        print()
    else:
        print(table(result))
    if args.out is not None:
        csv_path, png_path = write_outputs(result, args.out)
        print(f"wrote {csv_path} and {png_path}", file=sys.stderr if args.json else sys.stdout)
    return 0
