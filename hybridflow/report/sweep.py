"""A sweep's table (text, CSV, JSON) and plot (PNG: throughput vs GPUs per placement)."""

from __future__ import annotations

import csv
import math
from pathlib import Path

from hybridflow.errors import unreadable
from hybridflow.planner.sweep import Row, SweepResult

BEST = "HybridFlow (best plan)"


def _standard_names(result: SweepResult) -> list[str]:
    names: list[str] = []
    for row in result.rows:
        names += [n for n in row.standard if n not in names]
    return names


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isinf(x)) else format(x, spec)


def table(result: SweepResult) -> str:
    """The readable table printed by `hybridflow sweep`."""
    job = result.job
    mark = result.smallest_meeting_target
    lines = [
        f"{job['algorithm']} {job['models'].get('actor')}, prompt {job['prompt_len']} + "
        f"response {job['response_len']}, batch {job['global_batch']} on {result.gpu} "
        f"({result.gpus_per_node} per node); target: {result.target.describe()}",
        f"{'GPUs':>5} {'placement':<14} {'tokens/s':>10} {'iter s':>8} {'peak GiB':>8} "
        f"{'scaling':>7} {'GPU-h/1k':>9}  sets",
    ]
    for r in result.rows:
        if not r.feasible:
            lines.append(f"{r.gpus:>5} {'infeasible':<14} {r.reason}")
            continue
        star = "  <= smallest meeting target" if mark is not None and r.gpus == mark.gpus else ""
        lines.append(
            f"{r.gpus:>5} {r.category:<14} {r.tokens_per_s:>10,.0f} {r.iteration_s:>8.1f} "
            f"{r.peak_memory_gib:>8.1f} {r.scaling_efficiency:>7.0%} "
            f"{r.gpu_hours_per_1k_steps:>9,.0f}  {r.sets}{star}"
        )
    if result.target.given:
        lines.append(f"smallest count meeting the target: {mark.gpus if mark else 'none in range'}")
    return "\n".join(lines)


def to_json(result: SweepResult) -> dict:
    mark = result.smallest_meeting_target
    return {
        "gpu": result.gpu,
        "gpus_per_node": result.gpus_per_node,
        "job": result.job,
        "target": {
            "tokens_per_s": result.target.tokens_per_s,
            "steps": result.target.steps,
            "deadline_hours": result.target.deadline_hours,
        },
        "smallest_meeting_target": mark.gpus if mark else None,
        "rows": [_row_dict(r) | {"plan": r.plan} for r in result.rows],
    }


def _row_dict(r: Row) -> dict:
    d = {
        "gpus": r.gpus,
        "feasible": r.feasible,
        "category": r.category,
        "sets": r.sets,
        "tokens_per_s": r.tokens_per_s,
        "iteration_s": r.iteration_s,
        "peak_memory_gib": r.peak_memory_gib,
        "scaling_efficiency": r.scaling_efficiency,
        "gpu_hours_per_1k_steps": r.gpu_hours_per_1k_steps,
        "meets_target": r.meets_target,
        "reason": r.reason,
    }
    if not r.feasible:
        d |= dict.fromkeys(
            (
                "tokens_per_s",
                "iteration_s",
                "peak_memory_gib",
                "scaling_efficiency",
                "gpu_hours_per_1k_steps",
            )
        )
    return d | {f"{name} tokens_per_s": tps for name, tps in r.standard.items()}


def write_csv(result: SweepResult, path: Path) -> None:
    names = _standard_names(result)
    columns = [
        "gpus",
        "feasible",
        "category",
        "sets",
        "tokens_per_s",
        "iteration_s",
        "peak_memory_gib",
        "scaling_efficiency",
        "gpu_hours_per_1k_steps",
        "meets_target",
        "smallest_meeting_target",
        *[f"{n} tokens_per_s" for n in names],
        "reason",
    ]
    mark = result.smallest_meeting_target
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns)
        w.writeheader()
        for r in result.rows:
            d = _row_dict(r) | {"smallest_meeting_target": mark is not None and r.gpus == mark.gpus}
            w.writerow({k: ("" if d.get(k) is None else d.get(k, "")) for k in columns})


def write_png(result: SweepResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401 (matplotlib.ticker.FuncFormatter below)

    fig, ax = plt.subplots(figsize=(8, 5))
    best = [r for r in result.rows if r.feasible]
    if best:  # drawn wide and pale underneath, so a standard placement that is best shows on it
        ax.plot(
            [r.gpus for r in best],
            [r.tokens_per_s for r in best],
            color="black",
            marker="o",
            markersize=9,
            linewidth=5,
            alpha=0.3,
            zorder=1,
            label=BEST,
        )
    for name in _standard_names(result):
        pts = [(r.gpus, r.standard[name]) for r in result.rows if r.standard.get(name)]
        if pts:
            ax.plot(*zip(*pts), marker=".", linewidth=1.3, zorder=2, label=name)
    mark = result.smallest_meeting_target
    if mark is not None:
        ax.plot(
            [mark.gpus],
            [mark.tokens_per_s],
            marker="*",
            markersize=18,
            color="red",
            linestyle="none",
            label=f"smallest meeting target: {mark.gpus} GPUs",
        )
    if result.target.tokens_per_s is not None:
        ax.axhline(result.target.tokens_per_s, color="red", linestyle="--", linewidth=0.8)
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x:g}"))
    ax.set_xlabel(f"GPUs ({result.gpu})")
    ax.set_ylabel("predicted tokens/s")
    job = result.job
    ax.set_title(f"{job['algorithm']} {job['models'].get('actor')}: best plan per GPU count")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(result: SweepResult, out_dir: Path) -> tuple[Path, Path]:
    csv_path, png_path = out_dir / "sweep.csv", out_dir / "sweep.png"
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_csv(result, csv_path)
        write_png(result, png_path)
    except OSError as e:
        raise unreadable("cannot write the sweep to", out_dir, e) from None
    return csv_path, png_path
