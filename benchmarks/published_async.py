"""The asynchronous rows of ../shared/published-calibration.md (verl's one-step-off and
fully-async trainers), each rebuilt as an asynchronous plan with the row's own split of
rollout and training GPUs, its training layout and rollout tp, and predicted with the
simulator's steady-state step (simulator.steady): max(produce, consume) + exposed weight
sync, staleness 1, generation not streamed.

Conventions beyond benchmarks/published_rows.py's (the same for every row):
- the training set holds the actor (and the simulator's GRPO reference, whose prepare
  seconds a DAPO row leaves out, as the synchronous rows do); the rollout set dp engines of
  the row's rollout tp; the reward is a rule (the controller's CPU).
- verl's staleness 0.5 (fully async) is no integer: built with staleness 1 (overlap).
- verl's partial rollout (fully async) hands over finished responses across steps, closer
  to streamed generation than the simulator's non-streamed rollout: said in each row.
- one step = the train batch of the colocated rows (512 prompts): for fully async,
  trigger_parameter_sync_step 4 x require_batches 4 x mini-batch 32 (an assumption).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from published_rows import FULLY_ASYNC, HALF_MAX, ONE_STEP, PROMPT_MAX, ROWS, Row, _dapo_7b

from hybridflow.errors import UserError
from hybridflow.layout import ParallelLayout, RolloutLayout
from hybridflow.memory import MemorySettings
from hybridflow.pipeline import ASYNC, Pipeline
from hybridflow.plan import PlacedSet, Plan
from hybridflow.simulator.cluster import Cluster
from hybridflow.simulator.job import Job
from hybridflow.simulator.predict import Prediction, predict_plan
from hybridflow.vocab import ROLLOUT, TRAINED_ROLES

STALENESS = 1


@dataclass(frozen=True)
class AsyncRow:
    """A published asynchronous step: the workload (`row`: its GPUs are all of them, its
    layout the training side's) and the split."""

    row: Row
    rollout_gpus: int
    phases: dict[str, float] = field(default_factory=dict)  # produce/prepare/train -> s
    notes: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return self.row.name

    @property
    def training_gpus(self) -> int:
        return self.row.gpus - self.rollout_gpus


JobOf = Callable[[Row], Job]


def build_async_plan(a: AsyncRow, build_job: JobOf) -> Plan:
    row, job = a.row, build_job(a.row)
    mem = MemorySettings(True, row.recompute, row.offload, row.micro_batch_tokens, row.fsdp)
    train = ParallelLayout(row.pp, row.tp, row.dp, row.ep, cp=row.cp)
    roles = job.gpu_roles
    layouts = {r: {"train" if r in TRAINED_ROLES else "infer": train} for r in roles}
    training = PlacedSet(
        roles, a.training_gpus, layouts, {r: mem for r in roles if r in TRAINED_ROLES}
    )
    engines = RolloutLayout(1, row.rollout_tp, a.rollout_gpus // row.rollout_tp)
    rollout = PlacedSet((ROLLOUT,), a.rollout_gpus, {ROLLOUT: {"generate": engines}})
    cluster = Cluster.from_gpus(row.gpu, row.gpus)
    return Plan(cluster, job, (training, rollout), pipeline=Pipeline(ASYNC, STALENESS))


def async_step(a: AsyncRow, pred: Prediction) -> dict[str, float]:
    """produce, prepare, train, exposed sync and the step; a DAPO row's consume without the
    reference's forward passes (no reference model)."""
    p = pred.pipeline
    assert p is not None
    prepare = p.consume.as_dict().get("prepare", 0.0)
    if not a.row.reference:
        own = [
            sum(r.stages["prepare"].seconds for r in s.roles if "prepare" in r.stages)
            - sum(r.stages["prepare"].seconds for r in s.roles if r.role == "reference")
            for s in pred.sets
            if ROLLOUT not in s.placed.models
        ]
        rules = sum(r.stages["prepare"].seconds for r in pred.rules)
        prepare = max(max(own), rules)
    train = p.consume.as_dict().get("train", 0.0)
    extra = p.consume.seconds - p.consume.as_dict().get("prepare", 0.0) - train  # sharing
    consume = prepare + train + extra
    produce = p.produce.seconds
    step = max(produce, consume) + p.exposed.seconds
    return {"produce": produce, "prepare": prepare, "train": train, "step": step}


def evaluate_async(a: AsyncRow, build_job: JobOf) -> dict:
    out = {
        "name": a.name,
        "gpus": a.row.gpus,
        "gpu": a.row.gpu,
        "split": f"{a.rollout_gpus}:{a.training_gpus}",
        "included": a.row.excluded is None,
        "published_s": a.row.published_s,
        "predicted_s": None,
        "error": None,
        "phases": {},
        "result": "",
    }
    try:
        got = async_step(a, predict_plan(build_async_plan(a, build_job), a.row.gpu))
    except UserError as e:
        out["result"] = f"{type(e).__name__}: {e}"
        return out
    out.update(predicted_s=got["step"], error=got["step"] / a.row.published_s - 1)
    out["phases"] = {k: (got[k], v) for k, v in a.phases.items()}
    return out


_ONE_STEP = (
    "dapo_7b_math_*_4_12.sh: 4 rollout + 12 training GPUs, 12 responses per prompt",
    HALF_MAX,
    PROMPT_MAX,
    "generate_sequences compared with produce (the doc's wait for the previous generation "
    "is the exposed part)",
)
_FULLY = (
    "staleness 0.5 built as 1; partial rollout on (closer to streamed generation than the "
    "simulator's non-streamed rollout); 512 prompts a step (assumption)",
    HALF_MAX,
    PROMPT_MAX,
    "the doc's gen s is the trainer's wait for samples, not generation: not compared",
)


def _one_step(name: str, published: float, phases: dict[str, float], **kw: Any) -> AsyncRow:
    row = _dapo_7b(name, ONE_STEP, 16, published, response_len=8192, n_samples=12, **kw)
    return AsyncRow(row, 4, phases, _ONE_STEP)


def _fully(rollout: int, train: int, published: float, update: float) -> AsyncRow:
    row = _dapo_7b(
        f"verl-fully-async-{rollout}-{train}",
        FULLY_ASYNC,
        rollout + train,
        published,
        response_len=28 * 1024,
        cp=4,
        dp=train // 4,
        rollout_tp=4,
        micro_batch_tokens=2 * 30720 * 4,
        fsdp=True,
    )
    notes = _FULLY
    if rollout == 16:
        notes += (
            "update_actor 313.81 s as the calibration table gives it (published_rows.py "
            "notes that the doc may swap it with the colocated 32-GPU row's 269.80)",
        )
    return AsyncRow(row, rollout, {"train": update}, notes)


# the colocated Qwen3-30B-A3B row's workload, run fully async on 96 rollout + 32 training GPUs
_QWEN3 = replace(
    next(r for r in ROWS if r.name == "verl-fully-async-colocated-qwen3-30b-a3b"),
    name="verl-fully-async-qwen3-30b-a3b-96-32",
    published_s=282.75,
    dp=8,
    phases={},
    notes=(),
)

ASYNC_ROWS: tuple[AsyncRow, ...] = (
    _one_step(
        "verl-one-step-overlap-megatron",
        566.0,
        {"produce": 501.0, "prepare": 120.0, "train": 347.0},
        pp=2,
        tp=2,
        dp=3,
        rollout_tp=2,
        micro_batch_tokens=2 * (2048 + 8192),
    ),
    _one_step(
        "verl-one-step-overlap-fsdp2",
        520.0,
        {"produce": 458.0, "prepare": 108.0, "train": 337.0},
        cp=4,
        dp=3,
        rollout_tp=2,
        micro_batch_tokens=2 * (2048 + 8192) * 4,
        fsdp=True,
        excluded="maximum response ambiguous: the doc says 20,480 for FSDP2, the script 8,192 "
        "(built with 8,192)",
    ),
    _fully(16, 16, 294.77, 313.81),
    _fully(32, 32, 189.26, 156.98),
    _fully(64, 64, 150.63, 113.16),
    AsyncRow(
        _QWEN3,
        96,
        {"prepare": 50.05, "train": 206.63},
        (
            "96 rollout + 32 training GPUs; training tp 2 cp 2 ep 8 (dp 8), rollout tp 4",
            HALF_MAX,
            "prompt 2,048 (assumption, as the colocated row); GRPO with a reference: its "
            "ref 50.05 s compared with prepare",
            _FULLY[0],
        ),
    ),
)
