"""Where an iteration's time goes: each stage's wall time (the controller's) split into the
work the ranks timed (executor.engines.timers) and the rest.

For each stage, the worker group whose calls of that stage took longest is its critical
path; of its seconds, model compute (megatron-core's forward and backward passes and the
optimizer step, vLLM's generation), resharding, collectives for metrics, and the rest of the
worker method (batch packing, per-call set-up: ``worker``). What the critical group's calls
do not cover is the controller's: its own work (rules, advantages: ``controller``) and
``dispatch``: Ray dispatch and object transfer, serialisation, waiting for a group.
"""

from __future__ import annotations

from hybridflow.vocab import Stage

# the stage each worker method's calls belong to
METHOD_STAGE = {
    "generate": Stage.GENERATE,
    "response_outputs": Stage.PREPARE,
    "sequence_scores": Stage.PREPARE,
    "update": Stage.TRAIN,
}
# timers inside a call (kind:role.what) -> (stage, part)
INNER = {
    ("generate", "vllm"): (Stage.GENERATE, "vllm"),
    ("generate", "reshard"): (Stage.GENERATE, "reshard"),
    ("compute", "forward"): (Stage.PREPARE, "compute"),
    ("compute", "forward_backward"): (Stage.TRAIN, "compute"),
    ("compute", "optimizer"): (Stage.TRAIN, "optimizer"),
    ("sync", "metrics"): (Stage.TRAIN, "metrics"),
}


def _split(key: str) -> tuple[str, str, str]:
    """The kind, role and what of a timer key "kind:role.what"."""
    kind, _, rest = key.partition(":")
    role, _, what = rest.rpartition(".")
    return kind, role, what


def _group_part(timed: dict[str, float], stage: Stage) -> tuple[float, dict[str, float]]:
    """A group's busy seconds in `stage` (its calls' sum) and their split by inner timer."""
    busy = 0.0
    inner: dict[str, float] = {}
    for key, v in timed.items():
        kind, _, what = _split(key)
        if kind == "call" and METHOD_STAGE.get(what) == stage:
            busy += v
        elif INNER.get((kind, what), (None,))[0] == stage:
            part = INNER[(kind, what)][1]
            inner[part] = inner.get(part, 0.0) + v
    return busy, inner


def breakdown(
    stages: dict[str, float], groups: list[dict[str, float]], controller: dict[str, float]
) -> dict[str, float]:
    """`stage.part` -> seconds of one iteration: `stages` the controller's wall time per
    stage (reshard apart), `groups` each worker group's timers (slowest rank per key),
    `controller` the controller's own timers (``controller:<stage>.<what>``)."""
    out: dict[str, float] = {}
    for stage in (Stage.GENERATE, Stage.PREPARE, Stage.TRAIN):
        wall = stages.get(stage, 0.0) + (
            stages.get(Stage.RESHARD, 0.0) if stage == "generate" else 0.0
        )
        parts = [_group_part(g, stage) for g in groups]
        busy, inner = max(parts, key=lambda p: p[0], default=(0.0, {}))
        own = sum(v for k, v in controller.items() if k.startswith(f"controller:{stage}."))
        for name, v in inner.items():
            out[f"{stage}.{name}"] = v
        out[f"{stage}.worker"] = max(0.0, busy - sum(inner.values()))
        out[f"{stage}.controller"] = own
        out[f"{stage}.dispatch"] = max(0.0, wall - busy - own)
    return out
