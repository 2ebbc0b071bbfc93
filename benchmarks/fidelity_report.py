"""The tables and verdicts of benchmarks/fidelity.py: predicted against measured per stage,
each plan's passes, the ranking of the PPO placements. Run the benchmark, not this file."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from hybridflow.vocab import STAGES

GOAL_MEDIAN, GOAL_STAGE = 0.10, 0.25


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
    stats = {
        "median_abs_error": statistics.median(it_errs),
        "worst_stage_error": worst,
        "fastest_ppo": fastest,
        "planner_first": top,
        "planner_first_is_fastest": fastest is not None and fastest in top,
        "ppo_measured_s": {k: _spread(v) for k, v in ppo.items()},
    }
    return "\n".join(lines), stats


def _spread(summary: dict) -> tuple[float, float]:
    """(measured iteration seconds, standard deviation of the timed iterations: 0 with one)."""
    each = summary.get("each_iteration_s") or [summary["measured"]["iteration_s"]]
    return summary["measured"]["iteration_s"], statistics.stdev(each) if len(each) > 1 else 0.0


def _same_plan(summaries: dict, name: str, ppo: dict) -> list[str]:
    """The runs whose sets and layouts equal the planner's first plan (itself included)."""
    return _runs_of(summaries[name]["plan"], ppo) if name in summaries else []


def _runs_of(plan: dict, summaries: dict[str, dict]) -> list[str]:
    """The runs of `summaries` whose sets and layouts equal `plan`'s."""
    key = json.dumps(plan["sets"], sort_keys=True)
    return [k for k, v in summaries.items() if json.dumps(v["plan"]["sets"], sort_keys=True) == key]


def report(
    summaries: dict[str, dict], runs: Path, out: Path, profile: str, header: str, stats: dict
) -> None:
    from hybridflow.report.run_report import write_run_report

    write_run_report([runs / n for n in summaries], out)
    text, _ = table(summaries)
    (out / "fidelity.md").write_text(
        f"# Simulator fidelity on the local cluster\n\n{header}\n\nprofile: `{profile}`\n\n"
        f"{text}\n\n{_verdict(stats)}{_passes(summaries)}\n"
    )


def _verdict(stats: dict) -> str:
    first = ", ".join(stats["planner_first"]) or "not run"
    return (
        f"median |error| of iteration time: {stats['median_abs_error']:.1%} "
        f"(goal <= {GOAL_MEDIAN:.0%}); worst stage |error|: "
        f"{stats['worst_stage_error']:.0%} (goal <= {GOAL_STAGE:.0%}); "
        f"fastest PPO plan measured: {stats['fastest_ppo']}; planner's first plan "
        f"(= {first}) is the fastest: "
        f"{stats['planner_first_is_fastest']}" + _replanning(stats) + _ranking(stats)
    )


def _replanning(stats: dict) -> str:
    if "planner_first_with_prediction_profile" not in stats:
        return ""
    again = stats["planner_first_with_prediction_profile"]
    return "; the planner with the predicting profile ranks first: " + (
        ", ".join(again) if again else "a plan not run"
    )


def _ranking(stats: dict) -> str:
    """The PPO plans' measured seconds (mean +- std over the timed iterations), fastest
    first: whether the planner's first plan is behind the fastest by more than the spread."""
    ranked = sorted(stats["ppo_measured_s"].items(), key=lambda kv: kv[1][0])
    if not ranked:
        return ""
    cells = [
        f"{k}{' (planner)' if k in stats['planner_first'] else ''} {m:.3f} ± {s:.3f}"
        for k, (m, s) in ranked
    ]
    same = [stats["ppo_measured_s"][k][0] for k in stats["planner_first"]]
    twice = (
        (
            f"\n\nThe same plan under {len(same)} names ({', '.join(stats['planner_first'])})"
            f" measured {' and '.join(f'{x:.3f}' for x in same)} s per iteration: "
            f"{max(same) / min(same) - 1:.0%} apart, the runs' own reproducibility "
            f"on this machine"
        )
        if len(same) > 1
        else ""
    )
    return (
        "\n\nPPO plans measured, fastest first (s per iteration ± std of its timed "
        + "iterations): "
        + "; ".join(cells)
        + twice
    )


def _passes(summaries: dict[str, dict]) -> str:
    """Each plan's iteration error in each pass alone: how far a plan's runs minutes apart
    differ (the runs' share of the error; what they share is the profile's)."""
    cells = [
        f"{k} "
        + " / ".join(
            f"{_err(v['predicted']['iteration_s'], x):+.0%}"
            for x in v["measured"]["pass_iteration_s"]
        )
        for k, v in summaries.items()
        if "pass_iteration_s" in v["measured"]
    ]
    return ("\n\nIteration error of each pass alone: " + "; ".join(cells)) if cells else ""
