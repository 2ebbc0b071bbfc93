"""Measured per-call tables of a profile (`calls:`, written by `hybridflow profile`): what
one call of the executor's worker methods costs on a set of k devices, for the model it was
measured with. Data only; the predictors in training, generation and reshard read them
through the lookups here and fall back to their analytic terms (saying so: source
"roofline") where a table has no row for the model, layout or set size.

Rows (every value a positive number; `ranks` is the set's device count, all of them busy):
  forward:    {ranks, tp, pp, sequences, seconds}     sequences per DP rank, one call
  train_step: {ranks, tp, pp, sequences, seconds, optimizer_s}   one optimizer step
  forward_value, train_step_value: the same of a model with a value head (critic, reward
              model: its own loss and head); optional, the LM rows serve where absent
  generate:   {ranks, tg, micro_dp, sequences, tokens, seconds, vllm_s}   per replica
  reshard:    {ranks, tg, micro_dp, seconds}          to the generation layout and back
  dispatch:   {forward|train|generate: [{ranks, sequences, seconds}]}   the controller's
              share of one call carrying `sequences` (all of the call's, over its ranks)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hybridflow.simulator.table import ProfileError, num, rows
from hybridflow.simulator.table import interpolate_linear as interpolate

Row = tuple[float, ...]
KEYS = {
    "forward": ("ranks", "tp", "pp", "sequences", "seconds"),
    "train_step": ("ranks", "tp", "pp", "sequences", "seconds", "optimizer_s"),
    "generate": ("ranks", "tg", "micro_dp", "sequences", "tokens", "seconds", "vllm_s"),
    "reshard": ("ranks", "tg", "micro_dp", "seconds"),
}
KEYS["forward_value"], KEYS["train_step_value"] = KEYS["forward"], KEYS["train_step"]
_FIELDS = {"train_step": "train_rows", "train_step_value": "train_value_rows"}
DISPATCH = ("forward", "train", "generate")
_HEADER = ("model", "prompt_len", "response_len", "micro_batch", "scheme")


def _series(
    table: tuple[Row, ...], key: tuple[float, ...], col: int = -1
) -> tuple[tuple[float, float], ...]:
    """(sequences, value) of the rows whose leading columns equal `key`."""
    n = len(key)
    return tuple(sorted((r[n], r[col]) for r in table if r[:n] == key))


def _engine_series(table: list[Row], tokens: float) -> tuple[tuple[float, float], ...]:
    """(sequences, mean vLLM seconds) of the generate rows at `tokens` new tokens."""
    by: dict[float, list[float]] = {}
    for r in table:
        if r[4] == tokens:
            by.setdefault(r[3], []).append(r[6])
    return tuple(sorted((s, sum(v) / len(v)) for s, v in by.items()))


@dataclass(frozen=True)
class Calls:
    model: str = ""
    prompt_len: int = 0
    response_len: int = 0
    micro_batch: int = 0
    scheme: str = ""
    forward_rows: tuple[Row, ...] = ()
    train_rows: tuple[Row, ...] = ()
    generate_rows: tuple[Row, ...] = ()
    reshard_rows: tuple[Row, ...] = ()
    forward_value_rows: tuple[Row, ...] = ()
    train_value_rows: tuple[Row, ...] = ()
    dispatch_rows: tuple[tuple[str, tuple[Row, ...]], ...] = ()

    def applies(self, model: str) -> bool:
        return bool(self.model) and model == self.model

    def same_work(self, sequences: float, seq_len: float) -> float:
        """Sequences of the tables' length doing the work of `sequences` of `seq_len`
        tokens: how a job of other lengths reads the rows (a per-call cost plus a
        per-token one)."""
        return sequences * seq_len / (self.prompt_len + self.response_len)

    def dispatch(self, kind: str, ranks: int, sequences: float) -> float | None:
        """Seconds of the controller's side of one call to `ranks` workers carrying
        `sequences` (interpolated), None without rows for that many ranks."""
        table = dict(self.dispatch_rows).get(kind, ())
        pts = _series(table, (float(ranks),))
        return interpolate(pts, sequences) if pts else None

    def forward(
        self, ranks: int, tp: int, pp: int, sequences: float, value: bool = False
    ) -> float | None:
        """Seconds of one forward call (`value`: a value-head model's, where measured)."""
        table = self.forward_value_rows if value and self.forward_value_rows else self.forward_rows
        pts = _series(table, (ranks, tp, pp))
        return interpolate(pts, sequences) if pts else None

    def train_step(
        self, ranks: int, tp: int, pp: int, sequences: float, value: bool = False
    ) -> tuple[float, float] | None:
        """(seconds of one optimizer step, the optimizer's part of it)."""
        table = self.train_value_rows if value and self.train_value_rows else self.train_rows
        pts = _series(table, (ranks, tp, pp), 4)
        if not pts:
            return None
        opt = _series(table, (ranks, tp, pp), 5)
        return interpolate(pts, sequences), interpolate(opt, sequences)

    def generate(
        self, ranks: int, tg: int, micro_dp: int, sequences: float, steps: float, prompt_len: float
    ) -> tuple[float, float, float] | None:
        """(first-token call, the decode steps after it, micro-DP gather) seconds of one
        generate call over `sequences` per replica of `prompt_len` tokens, `steps` new
        tokens each (the longest); the prefill reads the rows at the same prompt tokens."""
        key = (ranks, tg, micro_dp)
        rows_ = [r for r in self.generate_rows if r[:3] == key]
        tokens = sorted({r[4] for r in rows_})
        if len(tokens) < 2 or tokens[0] != 1:
            return None
        # vLLM's own seconds are the same engine work whatever training layout the weights
        # came from: pooled over every micro-DP row of (ranks, tg), less noise than one's
        engine = [r for r in self.generate_rows if r[:2] == key[:2]]
        one, full = _engine_series(engine, 1), _engine_series(engine, tokens[-1])
        gather = tuple(sorted((r[3], max(r[5] - r[6], 0.0)) for r in rows_ if r[4] == tokens[-1]))
        first = interpolate(one, sequences * prompt_len / self.prompt_len)
        per_step = max(interpolate(full, sequences) - interpolate(one, sequences), 0.0) / (
            tokens[-1] - 1
        )
        return first, per_step * max(steps - 1, 0.0), interpolate(gather, sequences)

    def reshard(self, ranks: int, tg: int, micro_dp: int) -> float | None:
        found = [r[3] for r in self.reshard_rows if r[:3] == (ranks, tg, micro_dp)]
        return found[0] if found else None


def parse_calls(raw: Any) -> Calls:
    if raw is None:
        return Calls()
    if not isinstance(raw, dict) or not isinstance(raw.get("model"), str):
        raise ProfileError(
            "calls: expected {model: NAME, prompt_len, response_len, "
            "micro_batch, scheme, forward, train_step, generate, reshard, "
            "dispatch}"
        )
    unknown = set(raw) - set(_HEADER) - set(KEYS) - {"dispatch"}
    if unknown:
        raise ProfileError(f"calls: unknown keys {', '.join(sorted(unknown))}")
    kw: dict[str, Any] = {"model": raw["model"], "scheme": str(raw.get("scheme", ""))}
    for k in ("prompt_len", "response_len", "micro_batch"):
        kw[k] = int(num(f"calls.{k}", raw.get(k)))
    for name, keys in KEYS.items():
        if raw.get(name):
            field = _FIELDS.get(name, f"{name}_rows")
            kw[field] = rows(f"calls.{name}", raw[name], keys)
    disp = raw.get("dispatch") or {}
    if not isinstance(disp, dict) or set(disp) - set(DISPATCH):
        raise ProfileError(
            f"calls.dispatch: expected a mapping with keys among {', '.join(DISPATCH)}"
        )
    kw["dispatch_rows"] = tuple(
        sorted(
            (k, rows(f"calls.dispatch.{k}", v, ("ranks", "sequences", "seconds")))
            for k, v in disp.items()
        )
    )
    return Calls(**kw)
