"""Simulator fidelity on the local cluster: plan, run and compare predicted with measured time.

Runs ten plans of the tiny job on the local 4-device CPU cluster with `hybridflow run`'s
executor (executor.controller.run): the PPO plan the planner ranks first, the three standard
PPO placements (colocated, split, separate: each with the planner's best allocation and
layouts), PPO data parallel over all 4 devices colocated and as two concurrent sets of 2,
PPO with a TP x DP actor that reshards into micro-DP generation and a PP critic, GRPO
generating with TP 2, ReMax split and Safe-RLHF colocated. Each run's first iteration (and
for PPO and Safe-RLHF the critic warm-up iterations, which do not train the actor) is left
out of the timing by summarize().
Prints predicted vs measured iteration and stage seconds with the relative error, the median
absolute error of iteration time, and whether the planner's first plan is the fastest PPO
plan measured. Predictions use the profile only (nothing is fitted to these runs); the jobs
describe their responses as the starting actor samples them (response_lengths(): the
SFT checkpoint every run starts from, sampled once here at the runs' temperature), and
predicted tokens/s count tokens as the run does.

Run (a quiet machine: ~30-60 s per plan and pass, more under load):
    .venv/bin/python benchmarks/fidelity.py --iterations 12 --passes 5 --out reports/local-cpu
    .venv/bin/python benchmarks/fidelity.py --plans ppo-colocated,grpo-gen-tp2 --profile /tmp/p.yaml
`--out` writes the `hybridflow report` of the runs (report.md, runs.csv, PNGs) plus
fidelity.md with this table; run dirs go under --runs (default a temporary folder).
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

STAGES = ("generate", "reshard", "prepare", "train")
JOB = dict(model="tiny", prompt_len=16, response_len=8, global_batch=32, ppo_epochs=1,
           mini_batches=2)
GOAL_MEDIAN, GOAL_STAGE = 0.10, 0.25


@functools.lru_cache(maxsize=None)
def response_lengths(response_len: int, prompts: int = 1024) -> tuple[tuple[int, float], ...]:
    """The responses as the job describes them to the simulator: the lengths (up to and
    including EOS, at most `response_len`) the runs' starting actor (the task's SFT
    checkpoint) samples at the runs' temperature on the first `prompts` training prompts;
    (length, share) pairs. Sampled once with transformers in this process, not taken from
    any run. (The task's answers plus EOS understate them: at temperature 1 about one
    response in sixteen runs to the cap, and a generate call lasts as long as its longest.)"""
    import torch
    from transformers import LlamaForCausalLM

    from executor.artifacts import ensure_artifacts
    from executor.run_config import RunConfig
    from executor.warmup import generate
    art = ensure_artifacts(model=JOB["model"], seed=0)
    actor = LlamaForCausalLM.from_pretrained(str(art.actor_dir)).eval()
    pool, counts = art.prompts.train[:prompts], Counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    try:
        for i in range(0, len(pool), 256):
            counts.update(len(r) for r in generate(actor, pool[i:i + 256], response_len,
                                                   art.special, RunConfig().temperature, i))
    finally:
        torch.set_num_threads(threads)
    return tuple((n, c / sum(counts.values())) for n, c in sorted(counts.items()))


def _job(algorithm: str):
    from simulator.job import Job
    kw = dict(JOB, algorithm=algorithm)
    if algorithm == "grpo":
        kw.update(n_samples=4, global_batch=8)
    job = Job.create(**kw)
    return dataclasses.replace(job, response_dist=response_lengths(job.response_len))


def _colocated(cluster, job, layouts: dict[str, dict]) -> dict:
    """Every role of `job` on all of the cluster's devices, with the layouts given (data
    parallel over all of them for the roles not named)."""
    from planner.plan import Plan
    from simulator.layout import GenLayout, TrainLayout
    from simulator.placement import PlacedSet, layout_kinds
    n = cluster.n_gpus
    plain = {"train": TrainLayout(1, 1, n), "infer": TrainLayout(1, 1, n),
             "generate": GenLayout(1, 1, 1)}
    sets = (PlacedSet(job.gpu_roles, n, {
        role: {k: (GenLayout.from_dict(layouts[role][k]) if k == "generate" else
                   TrainLayout.from_dict(layouts[role][k])) if k in layouts.get(role, {})
               else plain[k] for k in layout_kinds(role)} for role in job.gpu_roles}),)
    return Plan(cluster, job, sets).to_dict()


def _split(cluster, job, sets: tuple[tuple[str, ...], ...]) -> dict:
    """The roles in `sets` of equal devices, each role data parallel over its set."""
    from planner.plan import Plan
    from simulator.layout import GenLayout, TrainLayout
    from simulator.placement import PlacedSet, layout_kinds
    n = cluster.n_gpus // len(sets)
    lay = TrainLayout(1, 1, n)
    placed = tuple(PlacedSet(roles, n, {r: {k: GenLayout(1, 1, 1) if k == "generate" else lay
                                            for k in layout_kinds(r)} for r in roles})
                   for roles in sets)
    return Plan(cluster, job, placed).to_dict()


def build_plans(profile) -> dict[str, dict]:
    """name -> plan dict (the planner's, its standard placements, and hand-set layouts)."""
    from planner import plan_job, standard_placements
    from simulator.cluster import Cluster
    cluster = Cluster.from_gpus("local-cpu", 4, 4)
    ppo = _job("ppo")
    std = {k: p.to_dict() for k, p in standard_placements(cluster, ppo, profile,
                                                          max_gen_pp=1).items()}
    plans = {"ppo-planner": plan_job(cluster, ppo, profile, max_gen_pp=1)[0].to_dict()}
    plans.update({f"ppo-{k}": v for k, v in std.items()})
    # data parallel over all 4 devices, colocated and as two concurrent sets of 2
    plans["ppo-colocated-dp4"] = _colocated(cluster, ppo, {})
    plans["ppo-split-2x2"] = _split(cluster, ppo, (("actor", "reference"), ("critic", "reward")))
    plans["ppo-tp2-pp2"] = _colocated(cluster, ppo, {
        "actor": {"train": {"pp": 1, "tp": 2, "dp": 2},
                  "generate": {"pp": 1, "tp": 1, "micro_dp": 2}},
        "critic": {"train": {"pp": 2, "tp": 1, "dp": 2}}})
    plans["grpo-gen-tp2"] = _colocated(cluster, _job("grpo"), {
        "actor": {"train": {"pp": 1, "tp": 2, "dp": 2},
                  "generate": {"pp": 1, "tp": 2, "micro_dp": 1}}})
    plans["remax-split"] = standard_placements(cluster, _job("remax"), profile,
                                               max_gen_pp=1)["split"].to_dict()
    plans["safe-rlhf-colocated"] = standard_placements(cluster, _job("safe-rlhf"), profile,
                                                       max_gen_pp=1)["colocated"].to_dict()
    return plans


def wait_for_quiet(max_load: float, limit_s: float = 600.0) -> float:
    """Wait (up to `limit_s`) until the 1-minute load average is below `max_load` (other
    programs on a shared machine inflate what is measured); the load when it returns."""
    deadline = time.monotonic() + limit_s
    while os.getloadavg()[0] >= max_load and time.monotonic() < deadline:
        time.sleep(5)
    return os.getloadavg()[0]


def run_plan(name: str, plan: dict, runs: Path, iterations: int, profile: str) -> dict:
    from executor.controller import run
    from executor.run_config import RunConfig
    out = runs / name
    t0 = time.perf_counter()
    res = run(plan, RunConfig(iterations=iterations, checkpoint_every=iterations), out,
              profile=profile)
    print(f"  {name}: {time.perf_counter() - t0:.0f} s wall, load {os.getloadavg()[0]:.1f}",
          flush=True)
    summary = with_terms(res.summary, profile, out)
    timed = res.metrics[len(res.metrics) - summary["measured"].get("timed_iterations",
                                                                   len(res.metrics)):]
    summary["each_iteration_s"] = [sum(m["stages"][s] for s in STAGES) for m in timed]
    return summary


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
    measured = dict(ms[0], iteration_s=median(lambda m: m["iteration_s"]),
                    stages={st: median(lambda m: m["stages"][st]) for st in STAGES},
                    tokens_per_s=median(lambda m: m["tokens_per_s"]),
                    iterations=sum(m.get("iterations", 0) for m in ms),
                    timed_iterations=sum(m.get("timed_iterations", 1) for m in ms),
                    passes=len(passes), pass_iteration_s=[m["iteration_s"] for m in ms])
    out = runs / name
    out.mkdir(parents=True, exist_ok=True)
    for f in ("plan.json", "run.json", "metrics.jsonl"):
        if (pass_dirs[0] / f).exists():
            shutil.copy(pass_dirs[0] / f, out / f)
    pooled = dict(passes[0], measured=measured,
                  each_iteration_s=[x for p in passes for x in p["each_iteration_s"]])
    (out / "summary.json").write_text(json.dumps(
        {k: v for k, v in pooled.items() if k != "each_iteration_s"}, indent=1))
    return pooled


def with_terms(summary: dict, profile: str, run_dir: Path) -> dict:
    """The run's summary with the prediction's named terms and their sources (what
    `hybridflow report` tabulates per run), written back to its summary.json."""
    from planner.plan import Plan
    from simulator import predict_plan
    from simulator.profile import load_profile
    pred = predict_plan(Plan.from_dict(summary["plan"]), load_profile(profile))
    # tokens/s on the run's count (prompt + response_len per sequence), as measured; the
    # simulator's own counts the job's mean response
    tokens = summary["measured"]["tokens_per_s"] * summary["measured"]["iteration_s"]
    summary = dict(summary, predicted=dict(
        summary["predicted"], terms=pred.to_dict()["terms"], sources=pred.sources(),
        tokens_per_s=tokens / summary["predicted"]["iteration_s"]))
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def _err(pred: float, meas: float) -> float:
    return (pred - meas) / meas if meas > 0 else float("nan")


def table(summaries: dict[str, dict]) -> tuple[str, dict]:
    """Markdown table of predicted / measured seconds and errors, and the headline numbers."""
    head = "| plan | " + " | ".join(f"{s} pred / meas (err)" for s in (*STAGES, "iteration")) + " |"
    lines = [head, "|" + "---|" * (len(STAGES) + 2)]
    it_errs, worst = [], 0.0
    for name, s in summaries.items():
        m, p = s["measured"], s["predicted"]
        cells = []
        for st in STAGES:
            e = _err(p["stages"][st], m["stages"][st])
            worst = max(worst, abs(e))
            cells.append(f"{p['stages'][st]:.3f} / {m['stages'][st]:.3f} ({e:+.0%})")
        e = _err(p["iteration_s"], m["iteration_s"])
        it_errs.append(abs(e))
        cells.append(f"{p['iteration_s']:.3f} / {m['iteration_s']:.3f} ({e:+.0%})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    ppo = {k: v for k, v in summaries.items() if k.startswith("ppo-")}
    fastest = min(ppo, key=lambda k: ppo[k]["measured"]["iteration_s"]) if ppo else None
    top = _same_plan(summaries, "ppo-planner", ppo)
    stats = {"median_abs_error": statistics.median(it_errs), "worst_stage_error": worst,
             "fastest_ppo": fastest, "planner_first": top,
             "planner_first_is_fastest": fastest is not None and fastest in top,
             "ppo_measured_s": {k: _spread(v) for k, v in ppo.items()}}
    return "\n".join(lines), stats


def _spread(summary: dict) -> tuple[float, float]:
    """(measured iteration seconds, standard deviation of the timed iterations: 0 with one)."""
    each = summary.get("each_iteration_s") or [summary["measured"]["iteration_s"]]
    return summary["measured"]["iteration_s"], statistics.stdev(each) if len(each) > 1 else 0.0


def _same_plan(summaries: dict, name: str, ppo: dict) -> list[str]:
    """The runs whose sets and layouts equal the planner's first plan (itself included)."""
    if name not in summaries:
        return []
    key = json.dumps(summaries[name]["plan"]["sets"], sort_keys=True)
    return [k for k, v in ppo.items() if json.dumps(v["plan"]["sets"], sort_keys=True) == key]


def report(summaries: dict[str, dict], runs: Path, out: Path, profile: str, header: str) -> None:
    from reports.run_report import write_run_report
    write_run_report([runs / n for n in summaries], out)
    text, stats = table(summaries)
    (out / "fidelity.md").write_text(
        f"# Simulator fidelity on the local cluster\n\n{header}\n\nprofile: `{profile}`\n\n"
        f"{text}\n\n{_verdict(stats)}{_passes(summaries)}\n")


def _verdict(stats: dict) -> str:
    first = ", ".join(stats["planner_first"]) or "not run"
    return (f"median |error| of iteration time: {stats['median_abs_error']:.1%} "
            f"(goal <= {GOAL_MEDIAN:.0%}); worst stage |error|: "
            f"{stats['worst_stage_error']:.0%} (goal <= {GOAL_STAGE:.0%}); "
            f"fastest PPO plan measured: {stats['fastest_ppo']}; planner's first plan "
            f"(= {first}) is the fastest: "
            f"{stats['planner_first_is_fastest']}" + _ranking(stats))


def _ranking(stats: dict) -> str:
    """The PPO plans' measured seconds (mean +- std over the timed iterations), fastest
    first: whether the planner's first plan is behind the fastest by more than the spread."""
    ranked = sorted(stats["ppo_measured_s"].items(), key=lambda kv: kv[1][0])
    if not ranked:
        return ""
    cells = [f"{k}{' (planner)' if k in stats['planner_first'] else ''} {m:.3f} ± {s:.3f}"
             for k, (m, s) in ranked]
    same = [stats["ppo_measured_s"][k][0] for k in stats["planner_first"]]
    twice = (f"\n\nThe same plan under {len(same)} names ({', '.join(stats['planner_first'])})"
             f" measured {' and '.join(f'{x:.3f}' for x in same)} s per iteration: "
             f"{max(same) / min(same) - 1:.0%} apart, the runs' own reproducibility "
             f"on this machine") if len(same) > 1 else ""
    return "\n\nPPO plans measured, fastest first (s per iteration ± std of its timed " + \
        "iterations): " + "; ".join(cells) + twice


def _passes(summaries: dict[str, dict]) -> str:
    """Each plan's iteration error in each pass alone: how far a plan's runs minutes apart
    differ (the runs' share of the error; what they share is the profile's)."""
    cells = [f"{k} " + " / ".join(f"{_err(v['predicted']['iteration_s'], x):+.0%}"
                                  for x in v["measured"]["pass_iteration_s"])
             for k, v in summaries.items() if "pass_iteration_s" in v["measured"]]
    return ("\n\nIteration error of each pass alone: " + "; ".join(cells)) if cells else ""


def run_passes(chosen: list[str], plans: dict, runs: Path, args) -> dict[str, dict]:
    """Each plan's summary: one run, or with --passes P the pool of P runs, pass i in the
    order of `chosen` rotated by i/P of its length, so that a plan's runs lie apart in time."""
    if args.passes < 1:
        raise SystemExit("--passes must be at least 1")
    got: dict[str, list[tuple[dict, Path]]] = {n: [] for n in chosen}
    for i in range(args.passes):
        shift = i * len(chosen) // args.passes
        where = runs / f"pass{i + 1}" if args.passes > 1 else runs
        for n in chosen[shift:] + chosen[:shift]:
            if args.max_load > 0:
                print(f"  {n}: starting at load {wait_for_quiet(args.max_load):.1f}", flush=True)
            got[n].append((run_plan(n, plans[n], where, args.iterations, args.profile),
                           where / n))
    if args.passes == 1:
        return {n: got[n][0][0] for n in chosen}
    return {n: pool_passes(n, [s for s, _ in got[n]], [d for _, d in got[n]], runs)
            for n in chosen}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--iterations", type=int, default=4)
    ap.add_argument("--plans", default="", help="comma-separated subset of plan names")
    ap.add_argument("--passes", type=int, default=1,
                    help="run every plan this many times, each pass in a rotated order, and "
                         "pool each plan's passes (this VM's speed drifts over minutes)")
    ap.add_argument("--profile", default="local-cpu", help="profile name or .yaml path")
    ap.add_argument("--runs", default="", help="folder for the run dirs (default: temporary)")
    ap.add_argument("--out", default="", help="write the report folder here")
    ap.add_argument("--max-load", type=float, default=0.0,
                    help="before each plan, wait up to 10 min for the 1-minute load average "
                         "to fall below this (0: do not wait)")
    args = ap.parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from executor.profiler.machine import host_name
    from simulator.profile import load_profile
    plans = build_plans(load_profile(args.profile))
    chosen = [p for p in args.plans.split(",") if p] or list(plans)
    unknown = set(chosen) - set(plans)
    if unknown:
        ap.error(f"unknown plans {', '.join(sorted(unknown))}; known: {', '.join(plans)}")
    runs = Path(args.runs or tempfile.mkdtemp(prefix="fidelity-"))
    load0 = os.getloadavg()
    print(f"runs in {runs}; load average {load0[0]:.1f} at start", flush=True)
    summaries = run_passes(chosen, plans, runs, args)
    text, stats = table(summaries)
    passes = f" x {args.passes} passes" if args.passes > 1 else ""
    header = (f"{len(summaries)} plans{passes} x {args.iterations} iterations (first dropped); "
              f"load average {load0[0]:.1f} at start, {os.getloadavg()[0]:.1f} at end; "
              f"ended {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on "
              f"{host_name()}")
    print(text + "\n\n" + _verdict(stats) + _passes(summaries) + "\n" + header)
    (runs / "fidelity.json").write_text(json.dumps({"stats": stats, "header": header}, indent=1))
    if args.out:
        report(summaries, runs, Path(args.out), args.profile, header)
        print(f"report: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
