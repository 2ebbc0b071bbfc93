"""`hybridflow plan`: choose placement and parallelism for an RLHF job (auto-mapping).

With no flags: PPO on Llama-2-7B (every role), prompt and response 1,024 tokens, batch 256
prompts, 2 nodes of 8 A100-80GB.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

from cli.planfmt import format_plan, format_standard
from planner.plan import Plan
from planner.search import Planner
from simulator.cluster import Cluster, ClusterError
from simulator.job import ALGORITHMS, RULE_CPU_S, Job, JobError
from simulator.profile import load_profile

DEFAULTS = dict(gpu="a100-80gb", gpus=16, model="llama-2-7b", algorithm="ppo",
                prompt_len=1024, response_len=1024, batch=256, ppo_epochs=1, mini_batches=4)


class InputFileError(ValueError):
    """A --cluster or --job file that cannot be read."""


def configure(p: argparse.ArgumentParser) -> None:
    d = DEFAULTS
    p.add_argument("--gpu", default=None, help=f"GPU kind (a profile name or .yaml path; default {d['gpu']})")
    p.add_argument("--gpus", type=int, default=None, help=f"number of GPUs (default {d['gpus']})")
    p.add_argument("--nodes", type=int, help="number of nodes (instead of --gpus)")
    p.add_argument("--gpus-per-node", type=int, help="GPUs per node (default: the profile's)")
    p.add_argument("--model", default=d["model"], help="model of every role: catalog name or config.json")
    for role in ("critic", "reference", "reward", "cost"):
        rule = ", or 'rule': a function on the CPU, no GPUs" if role in ("reward", "cost") else ""
        p.add_argument(f"--{role}", help=f"model of the {role} (default: --model{rule})")
    p.add_argument("--algorithm", default=d["algorithm"], choices=list(ALGORITHMS))
    p.add_argument("--prompt-len", type=int, default=d["prompt_len"])
    p.add_argument("--response-len", type=int, default=d["response_len"],
                   help="response length; the maximum when --response-mean is given")
    p.add_argument("--response-mean", type=float, default=0.0,
                   help="mean response length (default: every response is --response-len long)")
    p.add_argument("--rule-cpu-s", type=float, default=RULE_CPU_S,
                   help=f"CPU seconds per response of a rule reward/cost (default {RULE_CPU_S})")
    p.add_argument("--batch", type=int, default=d["batch"], help="global batch (prompts)")
    p.add_argument("--n-samples", type=int, help="responses per prompt (grpo; default 4)")
    p.add_argument("--ppo-epochs", type=int, default=d["ppo_epochs"])
    p.add_argument("--mini-batches", type=int, default=d["mini_batches"])
    p.add_argument("--top", type=int, default=1, help="show the K best plans")
    p.add_argument("--out", help="write the best plan's JSON here")
    p.add_argument("--json", action="store_true", help="print the plan JSON (a list if --top > 1)")
    p.add_argument("--cluster", metavar="FILE", help="cluster file {gpu, nodes, gpus_per_node} (JSON/YAML)")
    p.add_argument("--job", metavar="FILE", help="job file, the plan JSON's job object (JSON/YAML)")
    p.add_argument("--export", metavar="FORMAT", help="print the best plan as a verl or openrlhf launch script")


def read_mapping(path: str, what: str) -> dict:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise InputFileError(f"{what} file {path!r} does not exist") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise InputFileError(f"{what} file {path!r} is not valid JSON or YAML: "
                             f"{' '.join(str(e).split())}") from None
    if not isinstance(data, dict):
        raise InputFileError(f"{what} file {path!r} must hold a mapping, got {type(data).__name__}")
    return data


def build_cluster(args: argparse.Namespace) -> Cluster:
    if args.cluster:
        try:
            return Cluster.from_dict(read_mapping(args.cluster, "cluster"))
        except ValueError as e:
            e.args = (f"{args.cluster}: {e}",)
            raise
    gpu = args.gpu or DEFAULTS["gpu"]
    gpn = args.gpus_per_node or load_profile(gpu).gpus_per_node
    if args.nodes is not None:
        cluster = Cluster(gpu, args.nodes, gpn)
        if args.gpus is not None and args.gpus != cluster.n_gpus:
            raise ClusterError(f"--gpus {args.gpus} disagrees with --nodes {args.nodes} x "
                               f"--gpus-per-node {gpn} = {cluster.n_gpus}")
        return cluster
    return Cluster.from_gpus(gpu, DEFAULTS["gpus"] if args.gpus is None else args.gpus, gpn)


def build_job(args: argparse.Namespace) -> Job:
    if args.job:
        try:
            return Job.from_dict(read_mapping(args.job, "job"))
        except ValueError as e:
            e.args = (f"{args.job}: {e}",)
            raise
    roles = {r: getattr(args, r) for r in ("critic", "reference", "reward", "cost")}
    if args.algorithm in ("grpo", "remax") and roles["critic"]:
        raise JobError(f"--critic: {args.algorithm} has no critic")
    if args.algorithm != "safe-rlhf" and roles["cost"]:
        raise JobError("--cost: only safe-rlhf has a cost model")
    return Job.create(args.algorithm, args.model, args.prompt_len, args.response_len, args.batch,
                      args.ppo_epochs, args.mini_batches, args.n_samples,
                      response_mean=args.response_mean, rule_cpu_s=args.rule_cpu_s, **roles)


def _export(plan: Plan, fmt: str) -> str:
    try:
        from planner.export import export_plan
    except ImportError as e:
        raise ValueError(f"--export is not available: planner.export cannot be imported ({e})") from None
    return export_plan(plan.to_dict(), fmt)


def main(args: argparse.Namespace) -> int:
    if args.top < 1:
        raise ValueError(f"--top must be a positive integer, got {args.top}")
    cluster, job = build_cluster(args), build_job(args)
    profile = load_profile(cluster.gpu)
    planner = Planner(job, profile, cluster.gpus_per_node)
    plans = planner.plan(cluster, args.top)
    if args.out:
        plans[0].save(args.out)
    if args.export:
        print(_export(plans[0], args.export))
    elif args.json:
        out = plans[0].to_dict() if args.top == 1 else [p.to_dict() for p in plans]
        print(json.dumps(out, indent=2))
    else:
        for i, plan in enumerate(plans):
            print(format_plan(plan, profile, "Best plan" if i == 0 else f"Plan #{i + 1}"))
        print(format_standard(planner.standard(cluster), plans[0]))
        if args.out:
            print(f"\nplan written to {args.out}")
    return 0
