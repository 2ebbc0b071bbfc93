"""The steady-state step of an asynchronous plan, as named terms.

Two sides work at once: the rollout set produces batch i+1 (generation, and the forward
passes of the scoring roles placed beside it) while the training sets consume batch i
(preparation: reference, critic, reward forward passes and the actor's old log-probs; then
training). After each actor update its weights go to the rollout engines: ``weight_send``
(training ranks to rollout ranks over the link between them) and ``weight_load`` (into
vLLM's parameters in the engine's tp layout).

- staleness k >= 1: the rollout side may generate with weights up to k updates old, so the
  send overlaps the next generation and only the engine's load (it pauses to swap its
  weights) is exposed: step = max(produce, consume) + weight_load. A larger k changes
  nothing in this model (it only absorbs jitter, which the model has none of).
- staleness 0: no overlap, the dataflow of a synchronous split plan: step = produce +
  consume + weight_send + weight_load.

Generation is not streamed by default: a rollout batch is handed over whole, when its
longest responses finish (each wave of the KV cache lasts as long as its longest response),
so produce follows the expected longest response of each wave, not the mean. A plan whose
pipeline says "streamed" hands finished responses over as they complete and refills each
freed KV slot at once (vLLM's continuous batching, paged KV cache): no batch waits for its
stragglers, and the engines run as if every response had the mean length
(simulator.rollout.streamed_job).
"""

from __future__ import annotations

from dataclasses import dataclass

from hybridflow.simulator.costs import Cost

WEIGHT_SEND, WEIGHT_LOAD = "weight_send", "weight_load"
ROLLOUT_BASIS = (
    "not streamed: a rollout batch is handed over whole when its longest responses finish"
)
STREAMED_BASIS = (
    "streamed: finished responses are handed over as they complete and their KV slots "
    "refilled, so the engines run at the mean response length"
)


@dataclass(frozen=True)
class PipelineTerms:
    """produce and consume (each a sum of named stage terms), the weight sync and the
    staleness that decides how much of it is exposed."""

    staleness: int
    produce: Cost
    consume: Cost
    sync: Cost
    streamed: bool = False

    def __post_init__(self) -> None:
        assert self.staleness >= 0
        assert {t.name for t in self.sync.terms} <= {WEIGHT_SEND, WEIGHT_LOAD}

    @property
    def exposed(self) -> Cost:
        """The part of the weight sync on the critical path."""
        if self.staleness == 0:
            return self.sync
        return Cost(tuple(t for t in self.sync.terms if t.name == WEIGHT_LOAD))

    @property
    def overlap(self) -> bool:
        return self.staleness >= 1

    @property
    def step_s(self) -> float:
        sides = (
            max(self.produce.seconds, self.consume.seconds)
            if self.overlap
            else self.produce.seconds + self.consume.seconds
        )
        return sides + self.exposed.seconds

    @property
    def bound(self) -> str:
        """Which side sets the step ("produce" or "consume"; both add up at k = 0)."""
        if not self.overlap:
            return "produce + consume"
        return "produce" if self.produce.seconds >= self.consume.seconds else "consume"

    def formula(self) -> str:
        if self.overlap:
            return "max(produce, consume) + weight_load"
        return "produce + consume + weight_send + weight_load"

    def to_dict(self) -> dict:
        return {
            "mode": "async",
            "staleness": self.staleness,
            "step_s": self.step_s,
            "step": self.formula(),
            "bound": self.bound,
            "produce_s": self.produce.seconds,
            "produce": self.produce.as_dict(),
            "consume_s": self.consume.seconds,
            "consume": self.consume.as_dict(),
            "weight_sync": self.sync.as_dict(),
            "exposed_sync_s": self.exposed.seconds,
            "rollout": STREAMED_BASIS if self.streamed else ROLLOUT_BASIS,
        }
