"""`hybridflow sweep`: how many GPUs do I need? The best plan at every GPU count."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def configure(p: argparse.ArgumentParser) -> None:
    from cli.plan import DEFAULTS as d
    from simulator.job import ALGORITHMS

    p.add_argument("--gpu", required=True, help="GPU kind: a profile name (profiles/) or YAML path")
    p.add_argument("--model", help="model of every role (catalog name or config.json); "
                   "required unless --job names the models")
    p.add_argument("--algorithm", default=d["algorithm"], choices=list(ALGORITHMS))
    for role in ("critic", "reference", "reward", "cost"):
        p.add_argument(f"--{role}", help=f"model of the {role} (default: --model)")
    p.add_argument("--prompt-len", type=int, default=d["prompt_len"])
    p.add_argument("--response-len", type=int, default=d["response_len"])
    p.add_argument("--batch", type=int, default=d["batch"], help="global batch (prompts)")
    p.add_argument("--n-samples", type=int, help="responses per prompt (grpo; default 4)")
    p.add_argument("--ppo-epochs", type=int, default=d["ppo_epochs"])
    p.add_argument("--mini-batches", type=int, default=d["mini_batches"])
    p.add_argument("--job", metavar="FILE", help="job file, the plan JSON's job object (JSON/YAML)")
    p.add_argument("--gpus", default="1:256", metavar="LO:HI",
                   help="GPU counts to try: 1, 2, 4 below one node, then whole nodes (default 1:256)")
    p.add_argument("--gpus-per-node", type=int, help="GPUs per node (default: the profile's)")
    p.add_argument("--target-tokens-per-s", type=float, metavar="X",
                   help="mark the smallest count predicted to reach X tokens/s")
    p.add_argument("--steps", type=int, metavar="S", help="with --deadline-hours: S iterations ...")
    p.add_argument("--deadline-hours", type=float, metavar="H", help="... must finish within H hours")
    p.add_argument("--out", type=Path, metavar="DIR", help="write sweep.csv and sweep.png to DIR")
    p.add_argument("--json", action="store_true", help="print the sweep (with each best plan) as JSON")


def main(args: argparse.Namespace) -> int:
    from planner.sweep import Target, gpu_counts, parse_range, planner_points, run_sweep
    from planner.sweep_output import table, to_json, write_outputs
    from simulator.profile import load_profile

    target = Target(args.target_tokens_per_s, args.steps, args.deadline_hours)
    profile = load_profile(args.gpu)
    gpn = args.gpus_per_node or profile.gpus_per_node
    counts = gpu_counts(*parse_range(args.gpus), gpn)
    job = _job(args)
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


class JobFileError(ValueError):
    """A --job file that cannot be read."""


def _job(args: argparse.Namespace):
    from simulator.job import Job

    if args.job:
        import yaml
        try:
            data = yaml.safe_load(Path(args.job).read_text())
        except FileNotFoundError:
            raise JobFileError(f"job file {args.job!r} does not exist") from None
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise JobFileError(f"job file {args.job!r} is not valid JSON or YAML: "
                               f"{' '.join(str(e).split())}") from None
        try:
            return Job.from_dict(data)
        except ValueError as e:
            raise JobFileError(f"{args.job}: {e}") from None
    if not args.model:
        raise JobFileError("give --model (or a --job file)")
    return Job.create(args.algorithm, args.model, args.prompt_len, args.response_len, args.batch,
                      args.ppo_epochs, args.mini_batches, args.n_samples, critic=args.critic,
                      reference=args.reference, reward=args.reward, cost=args.cost)
