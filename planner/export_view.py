"""A read-only view of a plan for the exports: per role, its set, GPUs, layouts, memory
settings (trained roles) and layers per pipeline stage.

The plan is validated once, where it is built (hybridflow.plan.Plan.from_dict for a plan a
user may have edited by hand); the view only derives what the exporters read.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hybridflow.errors import UserError
from hybridflow.layout import GenLayout, ParallelLayout
from hybridflow.memory import MemorySettings
from hybridflow.plan import PlacedSet, Plan
from hybridflow.simulator.job import Job
from hybridflow.simulator.train_memory import stage_split
from hybridflow.vocab import TRAINED_ROLES, VALUE_ROLES, Kind

MICRO_BATCH = 1  # sequences per micro-batch: what the simulator predicts with


class ExportError(UserError):
    """A plan that a framework cannot express."""


@dataclass(frozen=True)
class RoleView:
    name: str
    model: str
    set_index: int
    gpus: int  # GPUs of the role's set
    train: ParallelLayout | None  # training layout (actor, critics)
    infer: ParallelLayout | None  # forward-only layout (reference, reward; critic values)
    generate: GenLayout | None  # actor only
    memory: MemorySettings | None = None  # trained roles: the plan's settings, resolved
    stages: tuple[int, ...] = ()  # layers per pipeline stage of the compute layout

    @property
    def uneven(self) -> bool:
        """Whether the pipeline stages hold different numbers of layers."""
        return len(set(self.stages)) > 1

    @property
    def settings(self) -> MemorySettings:
        """The memory settings of a trained role (the actor, critics)."""
        assert self.memory is not None, f"the {self.name} is not trained"
        return self.memory

    def packed_tokens(self, seq_len: int) -> int | None:
        """A trained role's micro-batch token budget where it packs more than one
        sequence of `seq_len` (None: one sequence per micro-batch)."""
        tokens = self.settings.micro_batch_tokens
        return tokens if tokens is not None and tokens > seq_len else None

    @property
    def compute(self) -> ParallelLayout:
        """The layout the role's model weights are sharded by when it is not generating."""
        layout = self.train or self.infer
        assert layout is not None, "a placed role has a train or infer layout"
        return layout

    @property
    def training(self) -> ParallelLayout:
        """The training layout of a trained role (the actor, critics)."""
        assert self.train is not None, f"the {self.name} has no training layout"
        return self.train

    @property
    def generation(self) -> GenLayout:
        """The actor's generation layout."""
        assert self.generate is not None, f"the {self.name} has no generation layout"
        return self.generate


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
    sets: tuple[tuple[str, ...], ...]
    set_gpus: tuple[int, ...]
    roles: dict[str, RoleView] = field(default_factory=dict)
    rule_roles: tuple[str, ...] = ()  # reward/cost computed by a function: no GPUs, no set
    tokens_per_s: float | None = None
    iteration_s: float | None = None
    micro_batch: int = MICRO_BATCH

    @property
    def total_gpus(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def seq_len(self) -> int:
        """The longest sequence, prompt and response."""
        return self.prompt_len + self.response_len

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


def _kinds(
    s: PlacedSet, role: str
) -> tuple[ParallelLayout | None, ParallelLayout | None, GenLayout | None]:
    """The role's train, infer and generate layouts, None where it has none."""
    lay = s.layouts[role]
    train, infer, gen = lay.get(Kind.TRAIN), lay.get(Kind.INFER), lay.get(Kind.GENERATE)
    assert train is None or isinstance(train, ParallelLayout)
    assert infer is None or isinstance(infer, ParallelLayout)
    assert gen is None or isinstance(gen, GenLayout)
    return train, infer, gen


def _role(job: Job, s: PlacedSet, index: int, name: str) -> RoleView:
    train, infer, gen = _kinds(s, name)
    main = train or infer
    assert main is not None, "a placed role has a train or infer layout"
    return RoleView(
        name,
        job.model(name),
        index,
        s.gpus,
        train,
        infer,
        gen,
        memory=s.settings(name) if name in TRAINED_ROLES else None,
        stages=stage_split(job.spec(name), main.pp, name in VALUE_ROLES),
    )


def view(plan: Plan) -> PlanView:
    job, c = plan.job, plan.cluster
    roles = {name: _role(job, s, i, name) for i, s in enumerate(plan.sets) for name in s.models}
    predicted = plan.predicted or {}
    return PlanView(
        gpu=c.gpu,
        nodes=c.nodes,
        gpus_per_node=c.gpus_per_node,
        algorithm=job.algorithm,
        prompt_len=job.prompt_len,
        response_len=job.response_len,
        global_batch=job.global_batch,
        ppo_epochs=job.ppo_epochs,
        mini_batches=job.mini_batches,
        samples_per_prompt=job.n_samples,
        sets=tuple(tuple(s.models) for s in plan.sets),
        set_gpus=tuple(s.gpus for s in plan.sets),
        roles=roles,
        rule_roles=job.rule_roles,
        tokens_per_s=predicted.get("tokens_per_s"),
        iteration_s=predicted.get("iteration_s"),
    )


def parse_plan(plan: Plan | dict) -> PlanView:
    """The view of a plan, or of a plan dict (plan JSON), validated as every plan is."""
    plan = plan if isinstance(plan, Plan) else Plan.from_dict(plan)
    if plan.asynchronous:
        raise ExportError(
            "an asynchronous plan (a rollout set) has no verl or OpenRLHF launch script here: "
            "export a synchronous plan (plan --pipeline sync)"
        )
    return view(plan)


def settings_line(v: PlanView) -> str:
    """The trained roles' memory settings and uneven pipelines, for an export's header."""
    parts = []
    for r in v.roles.values():
        if r.memory is not None:
            parts.append(f"{r.name} {r.memory}")
        if r.uneven:
            parts.append(f"{r.name} layers per stage {'/'.join(map(str, r.stages))}")
    return "settings: " + "; ".join(parts) if parts else ""


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
    source_file: str  # the framework file the names were checked against
    entry_point: str  # e.g. "python3 -m verl.trainer.main_ppo"
    args: tuple[str, ...]  # shell words after the entry point, already quoted
    env: tuple[tuple[str, str], ...] = ()  # variables the user sets: (NAME, what it holds)
    header: tuple[str, ...] = ()  # lines describing the plan
    notes: tuple[str, ...] = ()  # differences from the plan and settings outside the command
    extra: str = ""  # e.g. verl's resource-pool mapping, rendered as text

    def __post_init__(self) -> None:
        if not self.args:
            raise ExportError(f"{self.framework} export has no arguments")

    def render(self) -> str:
        lines = [
            "#!/usr/bin/env bash",
            f"# HybridFlow plan for {self.framework} {self.version}; names checked against "
            f"{self.source_file} of {self.framework} {self.version}.",
        ]
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
