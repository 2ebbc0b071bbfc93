"""`hybridflow report`: predicted vs measured reports of runs, and simulated placement
comparisons."""

from __future__ import annotations

import argparse

from hybridflow.errors import UserError
from hybridflow.report.compare import write_compare_report
from hybridflow.report.run_report import write_run_report


class ReportUsageError(UserError):
    """A report command line that cannot be carried out."""


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "run_dirs",
        nargs="*",
        metavar="RUN_DIR",
        help="run directories written by `hybridflow run` (summary.json)",
    )
    parser.add_argument(
        "--out", default=None, help="report folder (default reports/runs, or reports/compare)"
    )
    parser.add_argument(
        "--compare",
        action="store_true",
        help="simulate the planner's plan against the standard placements and "
        "the resharding schemes over model sizes and GPU counts",
    )
    parser.add_argument("--gpu", default="a100-80gb", help="GPU profile for --compare")
    parser.add_argument(
        "--models",
        default="llama-2-7b,llama-2-13b,codellama-34b,llama-2-70b",
        help="comma-separated models for --compare (all PPO roles the same)",
    )
    parser.add_argument(
        "--gpus", default="8,16,32,64,128", help="comma-separated GPU counts for --compare"
    )
    parser.add_argument("--algorithm", default="ppo", help="RLHF algorithm for --compare")


def _csv(value: str, what: str, cast=str) -> list:
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        raise ReportUsageError(f"--{what} is empty")
    try:
        return [cast(v) for v in items]
    except ValueError:
        raise ReportUsageError(
            f"--{what} must be a comma-separated list of integers, got {value!r}"
        ) from None


def main(args: argparse.Namespace) -> int:
    if args.compare:
        if args.run_dirs:
            raise ReportUsageError("--compare simulates; it takes no RUN_DIR arguments")
        gpus = _csv(args.gpus, "gpus", int)
        if any(g <= 0 for g in gpus):
            raise ReportUsageError(f"--gpus must be positive, got {args.gpus!r}")
        path = write_compare_report(
            args.gpu,
            _csv(args.models, "models"),
            gpus,
            args.out or "reports/compare",
            algorithm=args.algorithm,
        )
    else:
        if not args.run_dirs:
            raise ReportUsageError("give one or more RUN_DIRs, or --compare")
        path = write_run_report(args.run_dirs, args.out or "reports/runs")
    print(f"wrote {path}")
    return 0
