"""`hybridflow plan`: choose placement and parallelism for an RLHF job (auto-mapping).

With no flags: PPO on Llama-2-7B (every role), prompt and response 1,024 tokens, batch 256
prompts, 2 nodes of 8 A100-80GB.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from hybridflow.cli.jobargs import (
    JOB_DEFAULTS,
    InputFileError,
    add_job_arguments,
    build_job,
    read_mapping,
)
from hybridflow.cli.planfmt import format_pipelines, format_plan, format_standard
from hybridflow.errors import UserError
from hybridflow.pipeline import SYNC
from hybridflow.planner.export import export_plan
from hybridflow.planner.idle import idle_reason
from hybridflow.planner.pipelines import CHOICES, plan_pipelines
from hybridflow.planner.search import Planner
from hybridflow.simulator.cluster import Cluster, ClusterError
from hybridflow.simulator.profile import load_profile

DEFAULTS: dict[str, Any] = dict(gpu="a100-80gb", gpus=16, **JOB_DEFAULTS)
__all__ = [
    "DEFAULTS",
    "InputFileError",
    "build_cluster",
    "build_job",
    "configure",
    "main",
    "read_mapping",
]


def configure(p: argparse.ArgumentParser) -> None:
    d = DEFAULTS
    p.add_argument(
        "--gpu", default=None, help=f"GPU kind (a profile name or .yaml path; default {d['gpu']})"
    )
    p.add_argument("--gpus", type=int, default=None, help=f"number of GPUs (default {d['gpus']})")
    p.add_argument("--nodes", type=int, help="number of nodes (instead of --gpus)")
    p.add_argument("--gpus-per-node", type=int, help="GPUs per node (default: the profile's)")
    add_job_arguments(p)
    p.add_argument("--top", type=int, default=1, help="show the K best plans")
    p.add_argument("--out", help="write the best plan's JSON here")
    p.add_argument("--json", action="store_true", help="print the plan JSON (a list if --top > 1)")
    p.add_argument(
        "--cluster", metavar="FILE", help="cluster file {gpu, nodes, gpus_per_node} (JSON/YAML)"
    )
    p.add_argument(
        "--export", metavar="FORMAT", help="print the best plan as a verl or openrlhf launch script"
    )
    p.add_argument(
        "--pipeline",
        choices=CHOICES,
        default=SYNC,
        help="synchronous plans (the actor generates between updates; the default, as "
        "`hybridflow run` runs them), asynchronous (a rollout set generates the next batch "
        "while the training sets train: planned and simulated, not yet run), or auto: the "
        "faster of both, side by side",
    )
    p.add_argument(
        "--staleness",
        type=int,
        default=1,
        metavar="K",
        help="asynchronous plans: updates the generating weights may lag, at most (default 1)",
    )


def build_cluster(args: argparse.Namespace) -> Cluster:
    if args.cluster:
        try:
            return Cluster.from_dict(read_mapping(args.cluster, "cluster"))
        except ValueError as e:
            e.args = (f"{args.cluster}: {e}",)
            raise
    gpu = args.gpu or DEFAULTS["gpu"]
    gpn = load_profile(gpu).gpus_per_node if args.gpus_per_node is None else args.gpus_per_node
    if args.nodes is not None:
        cluster = Cluster(gpu, args.nodes, gpn)
        if args.gpus is not None and args.gpus != cluster.n_gpus:
            raise ClusterError(
                f"--gpus {args.gpus} disagrees with --nodes {args.nodes} x "
                f"--gpus-per-node {gpn} = {cluster.n_gpus}"
            )
        return cluster
    return Cluster.from_gpus(gpu, DEFAULTS["gpus"] if args.gpus is None else args.gpus, gpn)


def main(args: argparse.Namespace) -> int:
    if args.top < 1:
        raise UserError(f"--top must be a positive integer, got {args.top}")
    cluster, job = build_cluster(args), build_job(args)
    profile = load_profile(cluster.gpu)
    planner = Planner(job, profile, cluster.gpus_per_node)
    mode = args.pipeline
    if args.export:  # the launch scripts are synchronous trainers'
        if mode == "async":
            raise UserError(
                "--export writes synchronous launch scripts (verl, OpenRLHF): use "
                "--pipeline sync or auto"
            )
        mode = "sync"
    choice = plan_pipelines(planner, cluster, mode, args.staleness, args.top)
    plans = choice.plans(args.top)
    if args.out:
        plans[0].save(args.out)
    if args.export:
        print(export_plan(plans[0], args.export))
    elif args.json:
        out = plans[0].to_dict() if args.top == 1 else [p.to_dict() for p in plans]
        print(json.dumps(out, indent=2))
    else:
        for i, plan in enumerate(plans):
            print(format_plan(plan, profile, "Best plan" if i == 0 else f"Plan #{i + 1}"))
            if i == 0 and not plan.asynchronous and (idle := idle_reason(planner, plan)):
                print(f"  {idle}")
        if mode != SYNC:
            print(format_pipelines(choice))
        print(format_standard(planner.standard(cluster), plans[0]))
        if args.out:
            print(f"\nplan written to {args.out}")
    return 0
