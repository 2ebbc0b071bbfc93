"""Readable tables of plans and predictions for `hybridflow plan` and `hybridflow simulate`."""

from __future__ import annotations

from hybridflow.plan import Plan
from hybridflow.planner.pipelines import PipelineChoice
from hybridflow.simulator.job import Job
from hybridflow.simulator.model_info import model_summary, warning_line
from hybridflow.simulator.predict import Prediction
from hybridflow.simulator.profile import Profile
from hybridflow.simulator.train_memory import stage_split
from hybridflow.vocab import STAGES, VALUE_ROLES

STANDARD_NAMES = {
    "colocated": "colocated (verl, DeepSpeed-Chat)",
    "split": "split (actor+reference | rest)",
    "separate": "separate (OpenRLHF)",
}


def rate(tokens_per_s: float) -> str:
    """Tokens/s with thousands separators; below 10 two significant digits, so that a slow
    prediction never reads as 0 tokens/s."""
    return f"{tokens_per_s:,.0f}" if tokens_per_s >= 10 else f"{tokens_per_s:.2g}"


def _layouts(plan: Plan, role: str) -> str:
    placed = plan.set_of(role)
    text = " | ".join(
        f"{kind} " + " ".join(f"{k}={v}" for k, v in layout.to_dict().items() if k != "cp" or v > 1)
        for kind, layout in placed.layouts[role].items()
    )
    if role in placed.memory:
        text += f" | {_settings(plan, role)}"
    return text


def _settings(plan: Plan, role: str) -> str:
    """The role's memory settings, and its pipeline's stages where they are uneven."""
    placed = plan.set_of(role)
    mem = placed.settings(role)
    parts = [mem.label(plan.job.seq_len)]
    pp = placed.layout(role).pp
    split = stage_split(plan.job.spec(role), pp, role in VALUE_ROLES)
    if len(set(split)) > 1:
        parts.append("stages " + "/".join(map(str, split)))
    return " ".join(parts)


def models_lines(job: Job) -> list[str]:
    """Each model's counts, and a warning line for what the simulator does not model."""
    lines, seen = [], set()
    for role in job.gpu_roles:
        spec = job.spec(role)
        info = model_summary(spec, value_head=role in VALUE_ROLES)
        active = info["active_params"]
        act = f" ({active / 1e9:.2f}B active)" if active != info["params"] else ""
        lines.append(
            f"  {role:<12}{spec.name}: {info['params'] / 1e9:.2f}B parameters{act}, "
            f"{info['layers']} layers, KV {info['kv_bytes_per_token'] / 1024:.0f} KiB/token"
        )
        warning = warning_line(spec)
        if warning and spec.name not in seen:
            seen.add(spec.name)
            lines.append(f"  {warning}")
    return lines


def _response(job: Job) -> str:
    """'response N tokens', or its mean and max when the lengths spread."""
    lengths = job.lengths
    if lengths.points:
        top = max(n for n, _ in lengths.points)
        return (
            f"response mean {lengths.mean:,.0f} / max {top:,} tokens "
            f"({len(lengths.points)}-point distribution)"
        )
    if lengths.spread:
        return f"response mean {lengths.mean:,.0f} / max {lengths.max:,} tokens"
    return f"response {job.response_len} tokens"


def _header(plan: Plan, profile: Profile) -> str:
    job, c = plan.job, plan.cluster
    models = sorted(set(m for r, m in job.models if not job.is_rule(r)))
    models += [f"{r}: rule" for r in job.rule_roles]
    extra = f", {job.n_samples} samples/prompt" if job.dataflow.grouped else ""
    src = "estimates" if profile.estimate else "datasheet"
    if profile.measured.matmul or profile.measured.collectives:
        src = "measured tables + datasheet"
    return (
        f"Job: {job.algorithm}, {', '.join(models)}; prompt {job.prompt_len} + "
        f"{_response(job)}, batch {job.global_batch} prompts{extra}, "
        f"{job.ppo_epochs} epoch(s) x {job.mini_batches} mini-batches\n"
        f"Cluster: {c.nodes} node(s) x {c.gpus_per_node} {c.gpu} = {c.n_gpus} GPUs "
        f"(profile {profile.name}: {src})"
    )


def _kind(plan: Plan) -> str:
    """'iteration ', or an asynchronous plan's pipeline and 'step '."""
    p = plan.pipeline
    if not p.asynchronous:
        return "iteration "
    return f"asynchronous (staleness {p.staleness}{', streamed' if p.streamed else ''}), step "


def format_plan(plan: Plan, profile: Profile, title: str = "Best plan") -> str:
    pred = plan.predicted or {}
    lines = [
        _header(plan, profile),
        "Models:",
        *models_lines(plan.job),
        "",
        f"{title}: {len(plan.sets)} set(s), {plan.gpus} GPUs, {_kind(plan)}"
        f"{pred.get('iteration_s', 0):.2f} s, {rate(pred.get('tokens_per_s', 0))} tokens/s",
    ]
    layouts = {r: _layouts(plan, r) for s in plan.sets for r in s.models}
    width = max([52, *(len(text) + 1 for text in layouts.values())])
    lines.append(f"  {'set':<4}{'GPUs':>5}  {'role':<12}{'layouts':<{width}}{'peak GiB':>9}")
    for i, s in enumerate(plan.sets, 1):
        for j, role in enumerate(s.models):
            peak = pred.get("peak_memory_gib", {}).get(role, 0.0)
            head = f"{i:<4}{s.gpus:>5}" if j == 0 else " " * 9
            lines.append(f"  {head}  {role:<12}{layouts[role]:<{width}}{peak:>9.2f}")
    stages = pred.get("stages", {})
    lines.append("  stages: " + " | ".join(f"{st} {stages.get(st, 0.0):.2f} s" for st in STAGES))
    if "pipeline" in pred:
        lines += step_lines(pred["pipeline"])
    return "\n".join(lines)


def _sum(terms: dict[str, float]) -> str:
    return " + ".join(f"{k} {v:.2f} s" for k, v in terms.items()) or "0 s"


def step_lines(p: dict) -> list[str]:
    """An asynchronous plan's step: its two sides' terms, the weight sync and what of it is
    exposed (simulator.steady)."""
    sync = p["weight_sync"]
    send, load = sync.get("weight_send", 0.0), sync.get("weight_load", 0.0)
    if p["staleness"] >= 1:
        step = (
            f"max(produce {p['produce_s']:.2f} s, consume {p['consume_s']:.2f} s) + "
            f"weight_load {load:.2f} s = {p['step_s']:.2f} s ({p['bound']}-bound); "
            f"weight_send {send:.2f} s overlaps the next generation"
        )
    else:
        step = (
            f"produce {p['produce_s']:.2f} s + consume {p['consume_s']:.2f} s + weight_send "
            f"{send:.2f} s + weight_load {load:.2f} s = {p['step_s']:.2f} s (staleness 0: no "
            f"overlap)"
        )
    return [
        f"  step: {step}",
        f"    produce = {_sum(p['produce'])}; consume = {_sum(p['consume'])}",
        f"    rollout {p['rollout']}",
    ]


def _split(plan: Plan) -> str:
    """rollout GPUs : training GPUs of an asynchronous plan."""
    r = plan.rollout_set.gpus
    return f"{r}:{plan.gpus - r}"


def format_pipelines(choice: PipelineChoice) -> str:
    """The best synchronous and the best asynchronous plan side by side, and the choice."""
    rows = [
        ("synchronous", choice.sync[0] if choice.sync else None, "sync"),
        ("asynchronous", choice.asynchronous, "async"),
    ]
    texts = {m: " ".join(f"{'+'.join(s.models)}:{s.gpus}" for s in p.sets) for _, p, m in rows if p}
    w = max([50, *(len(t) + 2 for t in texts.values())])
    lines = [
        "",
        "Pipelines, the best plan of each:",
        f"  {'pipeline':<14}{'sets (GPUs)':<{w}}{'split':>8}{'staleness':>11}{'step s':>9}"
        f"{'tokens/s':>11}",
    ]
    for label, plan, mode in rows:
        if plan is None:
            searched = choice.mode in (mode, "auto")
            why = (
                "does not fit in memory" if searched else f"not searched (--pipeline {choice.mode})"
            )
            lines.append(f"  {label:<14}{why}")
            continue
        split = _split(plan) if plan.asynchronous else "-"
        k = str(plan.pipeline.staleness) if plan.asynchronous else "-"
        pred = plan.prediction
        lines.append(
            f"  {label:<14}{texts[mode]:<{w}}{split:>8}{k:>11}{pred['iteration_s']:>9.2f}"
            f"{rate(pred['tokens_per_s']):>11}"
        )
    lines.append(f"  {choice.reason()}")
    return "\n".join(lines)


def format_standard(standard: dict[str, Plan], best: Plan) -> str:
    best_s = best.prediction["iteration_s"]
    lines = [
        "",
        "Standard placements, each with its best allocation and layouts:",
        f"  {'placement':<34}{'sets (GPUs)':<50}{'iter s':>9}{'tokens/s':>11}{'best is':>10}",
    ]
    for name, label in STANDARD_NAMES.items():
        plan = standard.get(name)
        if plan is None:
            lines.append(f"  {label:<34}{'does not fit in memory':<50}")
            continue
        sets = " ".join(f"{'+'.join(s.models)}:{s.gpus}" for s in plan.sets)
        it = plan.prediction["iteration_s"]
        lines.append(
            f"  {label:<34}{sets:<50}{it:>9.2f}{rate(plan.prediction['tokens_per_s']):>11}"
            f"{it / best_s:>9.2f}x"
        )
    return "\n".join(lines)


def format_prediction(plan: Plan, pred: Prediction, profile: Profile, scheme: str) -> str:
    """Every term of every role and stage, with where its number came from."""
    lines = [
        format_plan(
            plan,
            profile,
            "Prediction (weights synced to the rollout engines)"
            if plan.asynchronous
            else f"Prediction ({scheme} resharding)",
        ),
        "",
        "Terms (seconds; source):",
    ]
    for r in pred.roles():
        for stage in STAGES:
            c = r.stages.get(stage)
            if c is None:
                continue
            src = c.sources()
            terms = ", ".join(f"{k} {v:.3f} ({src[k]})" for k, v in c.as_dict().items())
            lines.append(f"  {r.role:<12}{stage:<9}{c.seconds:>9.3f}  {terms or '-'}")
    lines.append("Peak memory per GPU (GiB):")
    for r in pred.roles():
        terms = ", ".join(f"{k} {v / 2**30:.2f}" for k, v in r.memory.as_dict().items())
        lines.append(f"  {r.role:<12}{r.memory.gib:>7.2f}  {terms}")
    lines.append(
        "Sets' peak memory per GPU (GiB): "
        + ", ".join(f"{'+'.join(s.placed.models)} {s.peak_bytes / 2**30:.1f}" for s in pred.sets)
    )
    return "\n".join(lines)
