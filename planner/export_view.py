"""A checked, read-only view of a plan dict (the plan JSON of issue 2) for the exports.

The exports read plans that users may have edited by hand, so every field they use is
checked here once and a bad plan gets one clear ExportError naming the field.
"""
from __future__ import annotations

from dataclasses import dataclass, field

ROLES = ("actor", "critic", "reference", "reward", "cost", "cost_critic")
RULE = "rule"  # hybridflow.simulator.job.RULE: a reward or cost computed by a function, no GPUs
RULE_ROLES = ("reward", "cost")
ALGORITHMS = ("ppo", "grpo", "remax", "safe-rlhf")


class ExportError(ValueError):
    """A plan that cannot be exported, or that a framework cannot express."""


def _pos_int(value: object, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ExportError(f"plan: {where} must be a positive integer, got {value!r}")
    return value


def _get(d: object, key: str, where: str) -> object:
    if not isinstance(d, dict) or key not in d:
        raise ExportError(f"plan: missing {where}.{key}" if where else f"plan: missing {key}")
    return d[key]


@dataclass(frozen=True)
class Layout:
    """One stage kind's parallel degrees: pp, tp and dp (micro_dp for generation), and the
    expert parallel degree ep of a mixture-of-experts model (ep ranks are dp ranks)."""
    pp: int
    tp: int
    dp: int
    ep: int = 1

    def __post_init__(self) -> None:
        for name in ("pp", "tp", "dp", "ep"):
            _pos_int(getattr(self, name), f"layout {name}")
        if self.dp % self.ep:
            raise ExportError(f"plan: layout ep {self.ep} must divide dp {self.dp}")

    @property
    def gpus(self) -> int:
        return self.pp * self.tp * self.dp

    @classmethod
    def parse(cls, d: object, where: str) -> "Layout":
        if not isinstance(d, dict):
            raise ExportError(f"plan: {where} must be an object with pp, tp and dp")
        dp_key = "micro_dp" if "micro_dp" in d else "dp"
        return cls(_pos_int(_get(d, "pp", where), f"{where}.pp"),
                   _pos_int(_get(d, "tp", where), f"{where}.tp"),
                   _pos_int(_get(d, dp_key, where), f"{where}.{dp_key}"),
                   _pos_int(d.get("ep", 1), f"{where}.ep"))


@dataclass(frozen=True)
class RoleView:
    name: str
    model: str
    set_index: int
    gpus: int                 # GPUs of the role's set
    train: Layout | None      # training layout (actor, critics)
    infer: Layout | None      # forward-only layout (reference, reward; critic values)
    generate: Layout | None   # actor only

    @property
    def compute(self) -> Layout:
        """The layout the role's model weights are sharded by when it is not generating."""
        layout = self.train or self.infer
        assert layout is not None, "parse() guarantees a train or infer layout"
        return layout


@dataclass(frozen=True)
class PlanView:
    gpu: str
    nodes: int
    gpus_per_node: int
    algorithm: str
    prompt_len: int
    response_len: int
    global_batch: int
    ppo_epochs: int
    mini_batches: int
    samples_per_prompt: int
    micro_batch: int  # sequences per micro-batch; the simulator predicts with 1
    sets: tuple[tuple[str, ...], ...]
    set_gpus: tuple[int, ...]
    roles: dict[str, RoleView] = field(default_factory=dict)
    rule_roles: tuple[str, ...] = ()  # reward/cost computed by a function: no GPUs, no set
    tokens_per_s: float | None = None
    iteration_s: float | None = None

    def __post_init__(self) -> None:
        if self.algorithm not in ALGORITHMS:
            raise ExportError(f"plan: unknown algorithm {self.algorithm!r} ({', '.join(ALGORITHMS)})")
        if "actor" not in self.roles:
            raise ExportError("plan: no set holds the actor")
        if self.global_batch % self.mini_batches:
            raise ExportError(f"plan: global_batch {self.global_batch} is not a multiple of "
                              f"mini_batches {self.mini_batches}")
        if sum(self.set_gpus) > self.nodes * self.gpus_per_node:
            raise ExportError(f"plan: sets use {sum(self.set_gpus)} GPUs, the cluster has "
                              f"{self.nodes * self.gpus_per_node}")

    @property
    def total_gpus(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def mini_batch(self) -> int:
        """Prompts per PPO mini-batch."""
        return self.global_batch // self.mini_batches

    def role(self, name: str) -> RoleView | None:
        return self.roles.get(name)

    def is_rule(self, name: str) -> bool:
        return name in self.rule_roles

    @property
    def expert_parallel(self) -> dict[str, int]:
        """{role: ep} of the roles whose layout splits experts (ep > 1)."""
        return {r.name: r.compute.ep for r in self.roles.values() if r.compute.ep > 1}

    def set_of(self, name: str) -> tuple[str, ...]:
        return self.sets[self.roles[name].set_index]


def _parse_role(name: str, model: str, index: int, gpus: int, layouts: dict) -> RoleView:
    where = f"sets[{index}].layouts.{name}"
    d = layouts.get(name)
    if not isinstance(d, dict):
        raise ExportError(f"plan: missing {where}")
    kinds = {k: Layout.parse(d[k], f"{where}.{k}") if k in d else None
             for k in ("train", "infer", "generate")}
    if kinds["train"] is None and kinds["infer"] is None:
        raise ExportError(f"plan: {where} has neither a train nor an infer layout")
    if name == "actor" and (kinds["train"] is None or kinds["generate"] is None):
        raise ExportError(f"plan: {where} needs a train and a generate layout")
    for kind, layout in kinds.items():
        if layout is not None and layout.gpus > gpus:
            raise ExportError(f"plan: {where}.{kind} uses {layout.gpus} GPUs, its set has {gpus}")
    return RoleView(name, model, index, gpus, kinds["train"], kinds["infer"], kinds["generate"])


def _parse_sets(plan: dict, models: dict) -> tuple[list[tuple[str, ...]], list[int], dict]:
    raw = _get(plan, "sets", "")
    if not isinstance(raw, list) or not raw:
        raise ExportError("plan: sets must be a non-empty list")
    sets, gpus, roles = [], [], {}
    for i, s in enumerate(raw):
        names = _get(s, "models", f"sets[{i}]")
        n = _pos_int(_get(s, "gpus", f"sets[{i}]"), f"sets[{i}].gpus")
        if not isinstance(names, list) or not names:
            raise ExportError(f"plan: sets[{i}].models must be a non-empty list of roles")
        for name in names:
            if name not in ROLES:
                raise ExportError(f"plan: sets[{i}] names unknown role {name!r} ({', '.join(ROLES)})")
            if name in roles:
                raise ExportError(f"plan: role {name!r} is in more than one set")
            if name not in models:
                raise ExportError(f"plan: role {name!r} has no model in job.models")
            if models[name] == RULE:
                raise ExportError(f"plan: sets[{i}] places the {name}, but job.models says it "
                                  f"is a rule (a function on the CPU, no GPUs)")
            roles[name] = _parse_role(name, str(models[name]), i, n, s.get("layouts") or {})
        sets.append(tuple(names))
        gpus.append(n)
    missing = sorted(r for r in set(models) - set(roles) if models[r] != RULE)
    if missing:
        raise ExportError(f"plan: job roles {missing} are in no set")
    return sets, gpus, roles


def parse_plan(plan: object) -> PlanView:
    """Check a plan dict and return its view; raises ExportError naming the bad field."""
    if not isinstance(plan, dict):
        raise ExportError("plan: expected a JSON object")
    cluster, job = _get(plan, "cluster", ""), _get(plan, "job", "")
    models = _get(job, "models", "job")
    if not isinstance(models, dict) or not models:
        raise ExportError("plan: job.models must map roles to models")
    rules = tuple(r for r in ROLES if models.get(r) == RULE)
    bad = [r for r in rules if r not in RULE_ROLES]
    if bad:
        raise ExportError(f"plan: the {bad[0]} cannot be a rule (only "
                          f"{' and '.join(RULE_ROLES)} can)")
    sets, gpus, roles = _parse_sets(plan, models)
    predicted = plan.get("predicted") or {}
    n = job.get("n_samples", job.get("n", 1))  # hybridflow.simulator.job.Job names it n_samples
    return PlanView(
        gpu=str(_get(cluster, "gpu", "cluster")),
        nodes=_pos_int(_get(cluster, "nodes", "cluster"), "cluster.nodes"),
        gpus_per_node=_pos_int(cluster.get("gpus_per_node", 8), "cluster.gpus_per_node"),
        algorithm=str(_get(job, "algorithm", "job")),
        prompt_len=_pos_int(_get(job, "prompt_len", "job"), "job.prompt_len"),
        response_len=_pos_int(_get(job, "response_len", "job"), "job.response_len"),
        global_batch=_pos_int(_get(job, "global_batch", "job"), "job.global_batch"),
        ppo_epochs=_pos_int(job.get("ppo_epochs", 1), "job.ppo_epochs"),
        mini_batches=_pos_int(job.get("mini_batches", 1), "job.mini_batches"),
        samples_per_prompt=_pos_int(n, "job.n_samples"),
        micro_batch=_pos_int(job.get("micro_batch", 1), "job.micro_batch"),
        sets=tuple(sets), set_gpus=tuple(gpus), roles=roles, rule_roles=rules,
        tokens_per_s=predicted.get("tokens_per_s"), iteration_s=predicted.get("iteration_s"))


def node_split(gpus: int, gpus_per_node: int) -> tuple[int, int]:
    """(nodes, GPUs per node) for a set, uniform per node as verl and OpenRLHF want them.

    Whole nodes when the set is a multiple of a node, one node when it fits in one;
    otherwise the most GPUs per node that divides the set evenly.
    """
    if gpus <= gpus_per_node:
        return 1, gpus
    per_node = max(d for d in range(1, gpus_per_node + 1) if gpus % d == 0)
    return gpus // per_node, per_node


@dataclass(frozen=True)
class FrameworkExport:
    """A plan as one framework's launch command, with what differs from the plan."""
    framework: str
    version: str
    source_file: str              # the framework file the names were checked against
    entry_point: str              # e.g. "python3 -m verl.trainer.main_ppo"
    args: tuple[str, ...]         # shell words after the entry point, already quoted
    env: tuple[tuple[str, str], ...] = ()   # variables the user sets: (NAME, what it holds)
    header: tuple[str, ...] = ()  # lines describing the plan
    notes: tuple[str, ...] = ()   # differences from the plan and settings outside the command
    extra: str = ""               # e.g. verl's resource-pool mapping, rendered as text

    def __post_init__(self) -> None:
        if not self.args:
            raise ExportError(f"{self.framework} export has no arguments")

    def render(self) -> str:
        lines = ["#!/usr/bin/env bash",
                 f"# HybridFlow plan for {self.framework} {self.version}; names checked against "
                 f"{self.source_file} of {self.framework} {self.version}."]
        lines += [f"# {h}" for h in self.header]
        if self.env:
            lines.append("# Set before running:")
            lines += [f"#   {name}: {what}" for name, what in self.env]
        if self.notes:
            lines.append("# Differences from the plan and settings outside this command:")
            lines += [f"#   - {n}" for n in self.notes]
        lines.append("set -euo pipefail")
        lines.append(f"{self.entry_point} \\")
        lines += [f"    {a} \\" for a in self.args[:-1]] + [f"    {self.args[-1]}"]
        if self.extra:
            lines += ["", *[f"# {x}" if x else "#" for x in self.extra.splitlines()]]
        return "\n".join(lines) + "\n"
