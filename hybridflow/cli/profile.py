"""`hybridflow profile`: measure this machine and write a profile the simulator reads."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from hybridflow.errors import UserError
from hybridflow.executor.profiler.machine import ProfileOptions, profile_machine
from hybridflow.executor.profiler.merge import merge_profiles


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--merge",
        nargs="+",
        metavar="PROFILE",
        default=None,
        help="measure nothing: write to --out the merge of these measured "
        "profiles of this machine (each number the median of theirs; "
        "profiles taken between runs see the speeds the runs see)",
    )
    parser.add_argument(
        "--out",
        default=None,
        help="profile path (default profiles/local-cpu.yaml on CPU, "
        "profiles/<gpu>-measured.yaml on a GPU)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smaller grids, fewer repeats (the full profile takes 3.5-5 min on a 2-core VM)",
    )
    parser.add_argument(
        "--sweeps",
        type=int,
        default=1,
        help="CPU: split the per-call tables' rounds among this many passes "
        "over all their worker groups, minutes apart, each row the "
        "median of the passes' (default 1; merging profiles taken at "
        "other times with --merge predicted better)",
    )
    _what_to_measure(parser)


def _what_to_measure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--devices",
        type=int,
        default=4,
        help="CPU only: logical devices (ranks) sharing the host (default 4)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads per rank, as the executor's workers use (default 1)",
    )
    parser.add_argument(
        "--model", default="tiny", help="model for the vLLM and train-layer tables (default tiny)"
    )
    parser.add_argument("--no-generate", action="store_true", help="skip the vLLM tables")
    parser.add_argument(
        "--no-dispatch",
        action="store_true",
        help="skip timing the controller's Ray calls to the workers",
    )
    parser.add_argument(
        "--no-calls",
        action="store_true",
        help="CPU: skip the executor's per-call tables (worker groups of 1, 2, "
        "4 ranks running RLWorker's methods, a vLLM engine started per "
        "generation tp: about 4 of the 5 min on a 2-core VM)",
    )
    parser.add_argument(
        "--no-train-options",
        action="store_true",
        help="skip timing a train step with activation recompute and without the "
        "distributed optimizer against the default (extra.train_options)",
    )


def _default_out() -> Path:
    if torch.cuda.is_available():
        slug = "".join(c if c.isalnum() else "-" for c in torch.cuda.get_device_name(0).lower())
        return Path("profiles") / f"{slug.strip('-')}-measured.yaml"
    return Path("profiles") / "local-cpu.yaml"


def main(args: argparse.Namespace) -> int:
    if args.merge:
        if not args.out:
            raise UserError("--merge needs --out (where to write the merged profile)")
        print(f"wrote {merge_profiles([Path(p) for p in args.merge], Path(args.out))}")
        return 0
    options = ProfileOptions(
        out=Path(args.out) if args.out else _default_out(),
        quick=args.quick,
        devices=args.devices,
        threads_per_rank=args.threads,
        model=args.model,
        generate=not args.no_generate,
        dispatch=not args.no_dispatch,
        calls=not args.no_calls,
        train_options=not args.no_train_options,
        sweeps=args.sweeps,
    )
    busy = os.getloadavg()[0]
    if busy > 1.0:
        print(
            f"note: load average {busy:.1f} before measuring: other programs using the "
            f"cores inflate what is measured (above all the sharing factors); profile a quiet "
            f"machine",
            file=sys.stderr,
        )
    path = profile_machine(options)
    print(f"wrote {path}")
    return 0
