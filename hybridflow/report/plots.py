"""PNG plots of report tables (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (backend must be chosen first)

from hybridflow.report.sweep import Series, draw_lines, mark_twins  # noqa: E402

PREDICTED, MEASURED = "#4C72B0", "#DD8452"


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _short(label: str, width: int = 38) -> str:
    return label if len(label) <= width else label[: width - 1] + "…"


def stage_bars(frame, path: Path) -> Path:
    """One panel per plan: predicted vs measured seconds of each stage and the iteration."""
    plans = list(dict.fromkeys(frame["plan"]))
    cols = min(3, len(plans))
    rows = math.ceil(len(plans) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.4 * rows), squeeze=False)
    for ax, plan in zip(axes.flat, plans):
        sub = frame[frame["plan"] == plan]
        x = range(len(sub))
        ax.bar([i - 0.2 for i in x], sub["predicted_s"], 0.4, label="predicted", color=PREDICTED)
        ax.bar([i + 0.2 for i in x], sub["measured_s"], 0.4, label="measured", color=MEASURED)
        ax.set_xticks(list(x), list(sub["stage"]), rotation=20)
        ax.set_ylabel("seconds")
        ax.set_title(_short(plan), fontsize=9)
    for ax in list(axes.flat)[len(plans) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    return _save(fig, path)


def throughput_bars(frame, path: Path) -> Path:
    """Predicted vs measured tokens/s per plan."""
    fig, ax = plt.subplots(figsize=(max(5.0, 1.3 * len(frame) + 2), 3.8))
    x = range(len(frame))
    ax.bar(
        [i - 0.2 for i in x],
        frame["predicted_tokens_per_s"],
        0.4,
        label="predicted",
        color=PREDICTED,
    )
    ax.bar(
        [i + 0.2 for i in x], frame["measured_tokens_per_s"], 0.4, label="measured", color=MEASURED
    )
    ax.set_xticks(
        list(x), [_short(p, 24) for p in frame["plan"]], rotation=25, ha="right", fontsize=8
    )
    ax.set_ylabel("tokens / s")
    ax.set_title("Throughput per plan")
    ax.legend(fontsize=8)
    return _save(fig, path)


def fidelity_scatter(frame, path: Path) -> Path:
    """Predicted against measured seconds, every stage of every plan, with the y = x line."""
    fig, ax = plt.subplots(figsize=(4.8, 4.4))
    for stage, sub in frame.groupby("stage", sort=False):
        ax.scatter(sub["measured_s"], sub["predicted_s"], label=stage, s=22)
    top = float(max(frame["measured_s"].max(), frame["predicted_s"].max(), 1e-9)) * 1.1
    ax.plot([0, top], [0, top], color="gray", lw=0.8, ls="--")
    ax.set_xlim(0, top)
    ax.set_ylim(0, top)
    ax.set_xlabel("measured seconds")
    ax.set_ylabel("predicted seconds")
    ax.set_title("Prediction fidelity")
    ax.legend(fontsize=8)
    return _save(fig, path)


def learning_curves(curves: dict[str, list[dict]], path: Path) -> Path:
    """Reward, rule score and KL over iterations, one line per plan (metrics.jsonl)."""
    keys = ("reward", "score", "kl")
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.4))
    for ax, key in zip(axes, keys):
        for label, rows in curves.items():
            pts = [
                (r["iteration"], r[key])
                for r in rows
                if isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool)
            ]
            if pts:
                ax.plot(*zip(*pts), marker=".", label=_short(label, 24))
        ax.set_xlabel("iteration")
        ax.set_title(key)
    axes[0].legend(fontsize=7)
    return _save(fig, path)


def compare_bars(frame, systems: tuple[str, ...], path: Path) -> Path:
    """Tokens/s per system over GPU counts, one panel per model (the paper's Figures 8-10)."""
    models = list(dict.fromkeys(frame["model"]))
    cols = min(2, len(models))
    rows = math.ceil(len(models) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.0 * cols, 3.6 * rows), squeeze=False)
    width = 0.8 / len(systems)
    for ax, model in zip(axes.flat, models):
        sub = frame[frame["model"] == model]
        counts = sorted(set(sub["gpus"]))
        for i, system in enumerate(systems):
            vals = [
                sub[(sub["gpus"] == g) & (sub["system"] == system)]["tokens_per_s"].iloc[0]
                for g in counts
            ]
            ax.bar(
                [j + (i - (len(systems) - 1) / 2) * width for j in range(len(counts))],
                [0 if math.isnan(v) else v for v in vals],
                width,
                label=system,
            )
        ax.set_xticks(range(len(counts)), [str(c) for c in counts])
        ax.set_xlabel("GPUs")
        ax.set_ylabel("tokens / s")
        ax.set_title(model, fontsize=10)
    for ax in list(axes.flat)[len(models) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    return _save(fig, path)


def scheme_series(sub, key: str) -> list[Series]:
    """One line per scheme of `key` over GPU counts (NaN: the scheme's plan does not fit),
    each marked with the earlier schemes' lines it would be drawn over."""
    lines = []
    for scheme, g in sub.groupby("scheme", sort=False):
        pts = [(int(n), float(v)) for n, v in zip(g["gpus"], g[key])]
        fit = [(n, v) for n, v in pts if not math.isnan(v)]
        lines.append(
            Series(
                str(scheme),
                tuple(n for n, _ in fit),
                tuple(v for _, v in fit),
                tuple(n for n, v in pts if math.isnan(v)),
            )
        )
    return mark_twins(lines)


def reshard_lines(frame, path: Path) -> Path:
    """Per model: resharding seconds of the planner's plan under each scheme (the paper's
    Figure 13), and tokens/s of the best plan the planner finds with each scheme; linear
    from zero, 'x' where a scheme's plan does not fit, coinciding lines dashed and labelled."""
    models = list(dict.fromkeys(frame["model"])) or ["(none fits)"]
    panels = (("reshard_s", "reshard seconds"), ("replanned_tokens_per_s", "tokens / s"))
    fig, axes = plt.subplots(2, len(models), figsize=(4.2 * len(models), 6.4), squeeze=False)
    for col, model in enumerate(models):
        sub = frame[frame["model"] == model]
        for row, (key, label) in enumerate(panels):
            ax = axes[row][col]
            draw_lines(ax, scheme_series(sub, key))
            if len(sub):
                ax.set_xscale("log", base=2)
                ax.set_ylim(bottom=0)
                ax.legend(fontsize=7)
            ax.set_xlabel("GPUs")
            ax.set_ylabel(label)
            ax.set_title(model, fontsize=10)
    return _save(fig, path)
