"""`hybridflow simulate PLAN.json`: predict a given (hand-written or edited) plan."""

from __future__ import annotations

import argparse
import json

from hybridflow.cli.planfmt import format_prediction
from hybridflow.plan import Plan
from hybridflow.simulator.predict import predict_plan
from hybridflow.simulator.profile import load_profile
from hybridflow.simulator.reshard import SCHEMES


def configure(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "plan", metavar="PLAN.json", help="a plan file (as `hybridflow plan --out` writes)"
    )
    p.add_argument(
        "--reshard",
        default="hybridengine",
        choices=list(SCHEMES),
        help="actor resharding scheme (paper Table 2)",
    )
    p.add_argument(
        "--profile", help="hardware profile name or .yaml path (default: the plan's GPU kind)"
    )
    p.add_argument("--json", action="store_true", help="print the plan JSON with this prediction")


def main(args: argparse.Namespace) -> int:
    plan = Plan.load(args.plan)
    profile = load_profile(args.profile or plan.cluster.gpu)
    pred = predict_plan(plan, profile, args.reshard)
    plan = plan.with_prediction(pred.to_dict())
    if args.json:
        print(json.dumps(plan.to_dict(), indent=2))
    else:
        print(format_prediction(plan, pred, profile, args.reshard))
    return 0
