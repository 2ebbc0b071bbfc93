"""Simulator fidelity on the local cluster: plan, run and compare predicted with measured time.

Runs ten plans of the tiny job on the local 4-device CPU cluster with `hybridflow run`'s
executor (executor.run.driver.run): the PPO plan the planner ranks first, the three standard
PPO placements (colocated, split, separate: each with the planner's best allocation and
layouts), PPO data parallel over all 4 devices colocated and as two concurrent sets of 2,
PPO with a TP x DP actor that reshards into micro-DP generation and a PP critic, GRPO
generating with TP 2, ReMax split and Safe-RLHF colocated. Each run's first --warmup
iterations (default 3: start-up, the critic's warm-up iterations that do not train the actor,
the first weight updates: GRPO's TP-2 vLLM engine generates about twice as slowly after its
first two) are left out of the timing.
Prints predicted vs measured iteration and stage seconds with the relative error, the median
absolute error of iteration time, and whether the planner's first plan is the fastest PPO
plan measured. Predictions use a profile only (nothing is fitted to these runs): by default
(--profile measure) a one-sweep `hybridflow profile` of this machine taken before every
pass, merged with `hybridflow profile --merge` (each number the median of the passes'), so
that the profile sees the same phases of this VM's speed as the runs (they last minutes,
and the same plan's runs minutes apart differed by up to 60%); the plans come from the
first of them. The jobs describe their responses as the starting actor samples them
(response_lengths(): the SFT checkpoint every run starts from, sampled once here at the
runs' temperature), and predicted tokens/s count tokens as the run does.

Run (a quiet machine; on the 2-core VM about 3.5 min per profile and 7 min per pass of the
ten plans, 55 min in all with the defaults):
    .venv/bin/python benchmarks/fidelity.py --out reports/local-cpu
    .venv/bin/python benchmarks/fidelity.py --plans ppo-colocated,grpo-gen-tp2 --passes 1 \
        --profile profiles/local-cpu.yaml
`--out` writes the `hybridflow report` of the runs (report.md, runs.csv, PNGs) plus
fidelity.md with this table; run dirs (and the measured profiles) go under --runs
(default a temporary folder).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from fidelity_plans import build_plans, planner_first  # noqa: E402
from fidelity_report import (  # noqa: E402, F401
    _passes,
    _ranking,
    _replanning,
    _runs_of,
    _verdict,
    report,
    table,
)

from hybridflow.vocab import STAGES  # noqa: E402


def wait_for_quiet(max_load: float, limit_s: float = 600.0) -> float:
    """Wait (up to `limit_s`) until the 1-minute load average is below `max_load` (other
    programs on a shared machine inflate what is measured); the load when it returns."""
    deadline = time.monotonic() + limit_s
    while os.getloadavg()[0] >= max_load and time.monotonic() < deadline:
        time.sleep(5)
    return os.getloadavg()[0]


def run_plan(name: str, plan: dict, runs: Path, args) -> dict:
    """Run `plan` once; its summary timed over the iterations after the first `args.warmup`
    (or after the run's own warm-up, the critic's, where that is longer)."""
    from hybridflow.executor.run.config import RunConfig
    from hybridflow.executor.run.driver import RunOptions, run, summarize
    from hybridflow.plan import Plan

    out = runs / name
    t0 = time.perf_counter()
    res = run(
        Plan.from_dict(plan),
        RunConfig(iterations=args.iterations, checkpoint_every=args.iterations),
        out,
        RunOptions(profile=args.planning_profile),
    )
    print(
        f"  {name}: {time.perf_counter() - t0:.0f} s wall, load {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    own = res.summary["measured"]["iterations"] - res.summary["measured"]["timed_iterations"]
    warmup = max(args.warmup, own)
    summary = summarize(
        Plan.from_dict(res.summary["plan"]), res.metrics, res.summary["predicted"], warmup=warmup
    )
    summary["each_iteration_s"] = [
        sum(m["stages"][s] for s in STAGES) for m in res.metrics[warmup:]
    ]
    return summary


def measure_profile(path: Path) -> str:
    """`hybridflow profile --sweeps 1 --out path` in this process; the path."""
    from hybridflow.executor.profiler.machine import ProfileOptions, profile_machine

    t0 = time.perf_counter()
    profile_machine(ProfileOptions(out=path, sweeps=1), progress=False)
    print(
        f"  profile {path.name}: {time.perf_counter() - t0:.0f} s, load {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    return str(path)


def pool_passes(name: str, passes: list[dict], pass_dirs: list[Path], runs: Path) -> dict:
    """One plan's passes as one run: each stage's and the iteration's measured seconds are
    the median over the passes of each pass's mean (tokens/s likewise), so that one pass in
    another speed of this VM (a whole 40-s run came out 40% faster than the same plan's
    other passes, every stage alike) does not decide the plan's number; with two passes,
    their mean. Written to runs/name (summary.json; plan, settings and metrics of the first
    pass) for the report."""
    import shutil

    ms = [p["measured"] for p in passes]

    def median(get) -> float:
        return statistics.median(get(m) for m in ms)

    measured = dict(
        ms[0],
        iteration_s=median(lambda m: m["iteration_s"]),
        stages={st: median(lambda m: m["stages"][st]) for st in STAGES},
        tokens_per_s=median(lambda m: m["tokens_per_s"]),
        iterations=sum(m.get("iterations", 0) for m in ms),
        timed_iterations=sum(m.get("timed_iterations", 1) for m in ms),
        passes=len(passes),
        pass_iteration_s=[m["iteration_s"] for m in ms],
    )
    out = runs / name
    out.mkdir(parents=True, exist_ok=True)
    for f in ("plan.json", "run.json", "metrics.jsonl"):
        if (pass_dirs[0] / f).exists():
            shutil.copy(pass_dirs[0] / f, out / f)
    pooled = dict(
        passes[0],
        measured=measured,
        each_iteration_s=[x for p in passes for x in p["each_iteration_s"]],
    )
    (out / "summary.json").write_text(
        json.dumps({k: v for k, v in pooled.items() if k != "each_iteration_s"}, indent=1)
    )
    return pooled


def with_prediction(summary: dict, profile: str, run_dir: Path) -> dict:
    """The run's summary with the simulator's prediction from `profile` (stages, iteration,
    the named terms and their sources: what `hybridflow report` tabulates per run), written
    back to its summary.json."""
    from hybridflow.executor.run.config import RunConfig
    from hybridflow.plan import Plan
    from hybridflow.simulator.predict import predict_plan
    from hybridflow.simulator.profile import load_profile

    prediction = predict_plan(
        Plan.from_dict(summary["plan"]), load_profile(profile), reshard=RunConfig().reshard
    )
    pred = prediction.to_dict()
    # tokens/s on the run's count (prompt + response_len per sequence), as measured; the
    # simulator's own counts the job's mean response
    tokens = summary["measured"]["tokens_per_s"] * summary["measured"]["iteration_s"]
    summary = dict(
        summary,
        predicted={
            "iteration_s": pred["iteration_s"],
            "stages": pred["stages"],
            "profile": profile,
            "terms": pred["terms"],
            "sources": prediction.sources(),
            "tokens_per_s": tokens / pred["iteration_s"],
        },
    )
    (run_dir / "summary.json").write_text(
        json.dumps({k: v for k, v in summary.items() if k != "each_iteration_s"}, indent=1)
    )
    return summary


def run_passes(chosen: list[str], plans: dict, runs: Path, args) -> dict[str, dict]:
    """Each plan's summary: one run, or with --passes P the pool of P runs, pass i in the
    order of `chosen` rotated by i/P of its length, so that a plan's runs lie apart in time.
    With --profile measure, a one-sweep profile before every pass (the first one already
    taken, for planning): args.profiles gets their paths."""
    got: dict[str, list[tuple[dict, Path]]] = {n: [] for n in chosen}
    for i in range(args.passes):
        if args.measuring and i > 0:
            args.profiles.append(measure_profile(runs / f"profile-pass{i + 1}.yaml"))
        shift = i * len(chosen) // args.passes
        where = runs / f"pass{i + 1}" if args.passes > 1 else runs
        for n in chosen[shift:] + chosen[:shift]:
            if args.max_load > 0:
                print(f"  {n}: starting at load {wait_for_quiet(args.max_load):.1f}", flush=True)
            got[n].append((run_plan(n, plans[n], where, args), where / n))
    if args.passes == 1:
        return {n: got[n][0][0] for n in chosen}
    return {n: pool_passes(n, [s for s, _ in got[n]], [d for _, d in got[n]], runs) for n in chosen}


def predicting_profile(runs: Path, args) -> str:
    """The profile the predictions use: --profile, or the merge of the profiles measured
    between the passes (`hybridflow profile --merge`: each number the median of theirs)."""
    if not args.measuring:
        return args.profile
    if len(args.profiles) == 1:
        return args.profiles[0]
    from hybridflow.executor.profiler.merge import merge_profiles

    return str(merge_profiles([Path(p) for p in args.profiles], runs / "profile.yaml"))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--iterations", type=int, default=14)
    ap.add_argument(
        "--warmup",
        type=int,
        default=3,
        help="iterations left out of each run's timing (default 3: start-up, "
        "the critic's warm-up, the first weight updates)",
    )
    ap.add_argument("--plans", default="", help="comma-separated subset of plan names")
    ap.add_argument(
        "--passes",
        type=int,
        default=5,
        help="run every plan this many times, each pass in a rotated order, and "
        "pool each plan's passes (this VM's speed drifts over minutes)",
    )
    ap.add_argument(
        "--profile",
        default="measure",
        help="profile name or .yaml path, or `measure` (default): a one-sweep "
        "`hybridflow profile` of this machine before every pass, merged",
    )
    ap.add_argument("--runs", default="", help="folder for the run dirs (default: temporary)")
    ap.add_argument("--out", default="", help="write the report folder here")
    ap.add_argument(
        "--max-load",
        type=float,
        default=0.0,
        help="before each plan, wait up to 10 min for the 1-minute load average "
        "to fall below this (0: do not wait)",
    )
    args = ap.parse_args(argv)
    if args.passes < 1 or args.iterations <= args.warmup or args.warmup < 1:
        ap.error("need --passes >= 1 and --iterations > --warmup >= 1")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from hybridflow.executor.profiler.machine import host_name
    from hybridflow.simulator.profile import load_profile

    if args.profile != "measure":
        try:
            load_profile(args.profile)
        except ValueError as e:
            ap.error(str(e))
    runs = Path(args.runs or tempfile.mkdtemp(prefix="fidelity-"))
    runs.mkdir(parents=True, exist_ok=True)
    load0 = os.getloadavg()
    print(f"runs in {runs}; load average {load0[0]:.1f} at start", flush=True)
    args.measuring = args.profile == "measure"
    args.profiles = [measure_profile(runs / "profile-pass1.yaml")] if args.measuring else []
    args.planning_profile = args.profiles[0] if args.measuring else args.profile
    plans = build_plans(load_profile(args.planning_profile))
    chosen = [p for p in args.plans.split(",") if p] or list(plans)
    unknown = set(chosen) - set(plans)
    if unknown:
        ap.error(f"unknown plans {', '.join(sorted(unknown))}; known: {', '.join(plans)}")
    pooled = run_passes(chosen, plans, runs, args)
    profile = predicting_profile(runs, args)
    summaries = {n: with_prediction(s, profile, runs / n) for n, s in pooled.items()}
    text, stats = table(summaries)
    stats["planner_first_with_prediction_profile"] = _replanned(profile, summaries)
    passes = f" x {args.passes} passes" if args.passes > 1 else ""
    header = (
        f"{len(summaries)} plans{passes} x {args.iterations} iterations (first "
        f"{args.warmup} left out); load average {load0[0]:.1f} at start, "
        f"{os.getloadavg()[0]:.1f} at end; ended "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {host_name()}"
    )
    print(text + "\n\n" + _verdict(stats) + _passes(summaries) + "\n" + header)
    (runs / "fidelity.json").write_text(
        json.dumps({"stats": stats, "header": header, "profile": profile}, indent=1)
    )
    if args.out:
        report(summaries, runs, Path(args.out), profile, header, stats)
        print(f"report: {args.out}")
    return 0


def _replanned(profile: str, summaries: dict[str, dict]) -> list[str]:
    """The runs whose sets and layouts equal the plan the planner ranks first with the
    profile the predictions use (the runs were planned with the first pass's profile)."""
    from hybridflow.simulator.profile import load_profile

    return _runs_of(planner_first(load_profile(profile)), summaries)


if __name__ == "__main__":
    sys.exit(main())
