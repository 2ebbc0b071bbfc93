"""`hybridflow report RUN_DIR...`: predicted vs measured seconds per stage, and tokens/s."""

from __future__ import annotations

from pathlib import Path

from hybridflow.errors import UserError, unreadable
from hybridflow.report import plots
from hybridflow.report.markdown import fmt, image, percent, table
from hybridflow.report.runs import Run, load_runs, runs_frame, throughput_frame


def _layouts(kinds: object) -> str:
    """{"train": {"pp": 1, "tp": 2, "dp": 2}} -> "train pp1-tp2-dp2"."""
    if not isinstance(kinds, dict):
        return str(kinds)
    return ", ".join(
        f"{kind} " + "-".join(f"{k}{v}" for k, v in lay.items())
        if isinstance(lay, dict)
        else f"{kind} {lay}"
        for kind, lay in kinds.items()
    )


def _object(value: object) -> dict:
    """`value` if it is a JSON object, else {}."""
    return value if isinstance(value, dict) else {}


def _describe(run: Run) -> list[str]:
    plan = run.plan
    job = _object(plan.get("job"))
    cluster = _object(plan.get("cluster"))
    models = job.get("models", {})
    models_txt = (
        ", ".join(f"{k}={v}" for k, v in models.items())
        if isinstance(models, dict)
        else str(models)
    )
    lines = [
        f"- run dir: `{run.path}`",
        f"- algorithm: {job.get('algorithm', '?')}; models: {models_txt or '?'}",
    ]
    if cluster:
        lines.append(
            f"- cluster: {cluster.get('gpu', '?')}, {cluster.get('nodes', '?')} node(s) "
            f"× {cluster.get('gpus_per_node', '?')} device(s)"
        )
    for s in plan.get("sets", []) if isinstance(plan.get("sets"), list) else []:
        layouts = s.get("layouts", {}) if isinstance(s, dict) else {}
        txt = "; ".join(f"{role} {_layouts(kinds)}" for role, kinds in layouts.items())
        lines.append(
            f"- set {'+'.join(map(str, s.get('models', [])))} on {s.get('gpus', '?')}"
            f" device(s): {txt or 'no layouts given'}"
        )
    if run.metrics:
        lines.append(f"- iterations in metrics.jsonl: {len(run.metrics)}")
    lines += [f"- {key}: {value}" for key, value in run.notes]
    return lines


def _summary(frame) -> list[str]:
    it = frame[frame["stage"] == "iteration"]["error"].abs().dropna()
    st = frame[frame["stage"] != "iteration"]["error"].abs().dropna()
    lines = []
    if len(it):
        lines.append(
            f"- median absolute error of iteration time: {100 * it.median():.1f}% "
            f"over {len(it)} run(s); largest {100 * it.max():.1f}%"
        )
    if len(st):
        worst = frame.loc[st.idxmax()]
        lines.append(
            f"- largest absolute stage error: {100 * st.max():.1f}% "
            f"({worst['stage']} of {worst['plan']})"
        )
    unpredictable = frame[frame["error"].isna()]
    for _, row in unpredictable.iterrows():
        lines.append(
            f"- {row['stage']} of {row['plan']}: predicted {fmt(row['predicted_s'])} s "
            "but nothing measured (no error computed)"
        )
    return lines


def _run_section(run: Run, sub) -> list[str]:
    """One run's stage table and, where the run wrote them, its predicted terms."""
    out = [
        f"### {run.label}",
        "",
        *_describe(run),
        "",
        table(
            ["stage", "predicted s", "measured s", "error"],
            [(r.stage, r.predicted_s, r.measured_s, percent(r.error)) for r in sub.itertuples()],
        ),
        "",
    ]
    if run.terms:
        out += [
            "Predicted terms (the simulator's, as the run wrote them):",
            "",
            table(
                ["role", "stage", "term", "seconds", "from"],
                [(*t[:4], t[4] or "–") for t in run.terms],
            ),
            "",
        ]
    return out


def _markdown(runs: list[Run], frame, tput, has_curves: bool) -> str:
    out = [
        "# HybridFlow run report: predicted vs measured",
        "",
        "Error = (predicted − measured) / measured. Predictions are the simulator's, as each "
        "run wrote them to its summary.json; measurements are the run's own.",
        "",
        "## Summary",
        "",
        *_summary(frame),
        "",
        image("predicted vs measured seconds per stage", "stages.png"),
        "",
        image("prediction fidelity", "fidelity.png"),
        "",
        "## Throughput",
        "",
        table(
            ["plan", "predicted tokens/s", "measured tokens/s", "error"],
            [
                (r.plan, r.predicted_tokens_per_s, r.measured_tokens_per_s, percent(r.error))
                for r in tput.itertuples()
            ],
        ),
        "",
        image("tokens per second", "throughput.png"),
        "",
    ]
    if has_curves:
        out += ["## Learning curves", "", image("reward, score and KL", "curves.png"), ""]
    out += ["## Runs", ""]
    for run in runs:
        out += _run_section(run, frame[frame["plan"] == run.label])
    return "\n".join(out)


def write_run_report(run_dirs: list[str | Path], out: str | Path) -> Path:
    """Write report.md, runs.csv, throughput.csv and PNG plots into `out`; return report.md."""
    runs = load_runs(list(run_dirs))
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"report output {str(out)!r} exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise unreadable("cannot write the report to", out, e) from None
    frame, tput = runs_frame(runs), throughput_frame(runs)
    frame.to_csv(out / "runs.csv", index=False)
    tput.to_csv(out / "throughput.csv", index=False)
    plots.stage_bars(frame, out / "stages.png")
    plots.throughput_bars(tput, out / "throughput.png")
    plots.fidelity_scatter(frame, out / "fidelity.png")
    curves = {r.label: list(r.metrics) for r in runs if r.metrics}
    if curves:
        plots.learning_curves(curves, out / "curves.png")
    report = out / "report.md"
    report.write_text(_markdown(runs, frame, tput, bool(curves)))
    return report
