"""Assemble measured tables into a profile YAML in the simulator's format (profiles/README.md).

Header numbers (peak FLOP/s, memory bandwidth, link bandwidth, latency, step overhead) are
derived from the tables, each with a `sources` line saying how; `measured:` holds the tables
simulator.profile reads. Tables it does not read yet (attention, elementwise, matmul under
sharing, the controller's Ray dispatch cost) and the sharing slowdowns go under `sharing:` and
`extra:`.
"""

from __future__ import annotations

import datetime as _dt
import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from hybridflow.errors import UserError, unreadable
from hybridflow.executor.profiler.ops import OpTables, slowdown


@dataclass(frozen=True)
class MachineInfo:
    kind: str  # "cpu" or "gpu"
    device_name: str
    devices: int  # logical devices (CPU ranks) or GPUs on this node
    memory_gib: float  # per device
    host_cores: int
    threads_per_rank: int
    backend: str  # gloo or nccl

    def __post_init__(self) -> None:
        if self.kind not in ("cpu", "gpu"):
            raise ValueError(f"machine kind must be cpu or gpu, got {self.kind!r}")
        if self.devices < 1 or self.host_cores < 1 or self.threads_per_rank < 1:
            raise ValueError("devices, host_cores and threads_per_rank must be >= 1")
        if not self.memory_gib > 0:
            raise ValueError(f"memory per device must be positive, got {self.memory_gib}")


@dataclass(frozen=True)
class Measurements:
    alone: OpTables
    shared: dict[int, OpTables]  # concurrent ranks -> tables (1 included)
    collectives: dict[str, list[dict]]
    generate: dict[str, list[dict]] | None  # {"prefill": [...], "decode": [...]}
    generate_model: str
    train_layer: list[dict] = field(default_factory=list)  # rows of measure_train_layer
    dispatch: dict | None = None  # measure_dispatch: Ray round trips of the controller
    calls: dict | None = None  # calls.calls_section: the executor's per-call tables
    sharing: dict[int, float] | None = None  # ranks -> slowdown (the calls' concurrency, or
    # sharing.measure_sharing's interleaved kernel factors)
    kernel_sharing: dict[int, float] | None = None  # the kernel's, when `sharing` is the calls'
    train_options: list[dict] | None = None  # train_options.measure_train_options's rows

    def __post_init__(self) -> None:
        if not self.alone.matmul:
            raise ValueError("a profile needs at least the matmul table")


def _peak_flops(tables: OpTables) -> float:
    return max(2.0 * r["m"] * r["n"] * r["k"] / r["seconds"] for r in tables.matmul)


def _memory_bandwidth(tables: OpTables) -> float:
    rows = [r for r in tables.elementwise if r["op"] == "add"] or tables.elementwise
    return max(r["bytes"] / r["seconds"] for r in rows)


def _link(collectives: dict[str, list[dict]]) -> tuple[float, float]:
    """(latency per ring step, bandwidth) from the smallest and largest all-reduce."""
    rows = collectives.get("all_reduce") or []
    if not rows:
        return 0.0, 0.0
    small = min(rows, key=lambda r: (r["bytes"], r["ranks"]))
    latency = small["seconds"] / (2 * (small["ranks"] - 1))
    big = max(rows, key=lambda r: (r["bytes"], r["ranks"]))
    r = big["ranks"]
    transfer = max(big["seconds"] - 2 * (r - 1) * latency, big["seconds"] * 0.1)
    return latency, 2 * (r - 1) / r * big["bytes"] / transfer


def _per_sequence_points(rows: list[dict]) -> list[dict]:
    """train_layer rows -> {tokens: sequence length, seconds: one layer fwd+bwd per sequence},
    taken at the largest measured batch (the per-sequence cost of a batched micro-step)."""
    if not rows:
        return []
    rows = [r for r in rows if r["model"] == rows[0]["model"]]
    batch = max(r["batch"] for r in rows)
    return [
        {"tokens": r["seq"], "seconds": r["seconds"] / r["batch"]}
        for r in sorted(rows, key=lambda r: r["seq"])
        if r["batch"] == batch
    ]


def _sharing(m: Measurements, info: MachineInfo) -> dict:
    factors = m.sharing or {k: slowdown(m.alone, t) for k, t in m.shared.items()}
    return {
        "host_cores": info.host_cores,
        "threads_per_rank": info.threads_per_rank,
        "slowdown": [{"ranks": k, "factor": round(f, 4)} for k, f in sorted(factors.items())],
    }


# Used only where nothing could be measured (one GPU: no link; --no-generate: no decode step).
_FALLBACK_LATENCY_S = 1e-5
_FALLBACK_STEP_S = {"cpu": 5e-3, "gpu": 1e-3}


def _link_numbers(info: MachineInfo, m: Measurements, who: str) -> tuple[dict, dict]:
    latency, bandwidth = _link(m.collectives)
    if bandwidth > 0 and latency > 0:
        return (
            {
                "intra_node_bandwidth": bandwidth,
                "inter_node_bandwidth": bandwidth,
                "comm_latency_s": latency,
            },
            {
                "intra_node_bandwidth": f"{who}: largest all_reduce over {info.backend}, "
                "ring model",
                "inter_node_bandwidth": "estimate: one node measured; set equal to "
                "intra_node_bandwidth",
                "comm_latency_s": f"{who}: smallest all_reduce / ring steps over {info.backend}",
            },
        )
    memory_bw = _memory_bandwidth(m.alone)
    why = "estimate: one device, no link to measure"
    return (
        {
            "intra_node_bandwidth": memory_bw,
            "inter_node_bandwidth": memory_bw,
            "comm_latency_s": _FALLBACK_LATENCY_S,
        },
        {
            "intra_node_bandwidth": f"{why}; set to the device memory bandwidth",
            "inter_node_bandwidth": f"{why}; set to the device memory bandwidth",
            "comm_latency_s": f"{why}; a typical kernel launch latency",
        },
    )


def _header(name: str, info: MachineInfo, m: Measurements) -> tuple[dict, dict]:
    who = f"measured by `hybridflow profile` on {info.device_name}"
    link, link_sources = _link_numbers(info, m, who)
    decode = (m.generate or {}).get("decode") or []
    step = min(decode, key=lambda r: (r["batch"], r["context"]))["seconds"] if decode else 0.0
    numbers = {
        "name": name,
        "estimate": False,
        "gpus_per_node": info.devices,
        "host_cores": info.host_cores,
        "peak_flops": _peak_flops(m.alone),
        "hbm_gib": round(info.memory_gib, 3),
        "hbm_bandwidth": _memory_bandwidth(m.alone),
        **link,
        "step_overhead_s": step if step > 0 else _FALLBACK_STEP_S[info.kind],
        "reserved_gib": min(1.0 if info.kind == "cpu" else 2.0, info.memory_gib / 2),
        "efficiency": {"matmul": 1.0, "memory": 1.0, "communication": 1.0},
    }
    devices = "logical devices (ranks)" if info.kind == "cpu" else "GPUs"
    sources = {
        "gpus_per_node": f"{who}: {info.devices} {devices}",
        "peak_flops": f"{who}: best achieved FLOP/s in measured.matmul, one rank alone",
        "hbm_gib": f"{who}: {'host RAM / devices' if info.kind == 'cpu' else 'device memory'}",
        "hbm_bandwidth": f"{who}: best elementwise add bytes/s (extra.elementwise), one rank",
        **link_sources,
        "step_overhead_s": f"{who}: vLLM decode step at batch 1, shortest context"
        if step > 0
        else "estimate: no generation measured; a typical engine step overhead",
        "reserved_gib": "estimate: per-process runtime footprint (python, torch, engine)",
        "efficiency": "measured: peak numbers above are achieved values, so efficiency is 1",
    }
    return numbers, sources


def build_profile(
    name: str,
    info: MachineInfo,
    m: Measurements,
    seconds_taken: float,
    steps: dict[str, float] | None = None,
    load: tuple[float, ...] = (),
) -> dict:
    """The profile as a dict; `steps`: seconds each measurement took, `load`: the host's
    load average before and after (other programs' work inflates what is measured)."""
    numbers, sources = _header(name, info, m)
    measured: dict = {
        "matmul": m.alone.matmul,
        "collectives": {op: rows for op, rows in m.collectives.items() if rows},
    }
    if m.generate:
        measured["generate"] = {"model": m.generate_model, **m.generate}
    points = _per_sequence_points(m.train_layer)
    if points:
        measured["train_layer"] = {"model": m.train_layer[0]["model"], "points": points}
    calls = {"calls": m.calls} if m.calls else {}
    return {
        **numbers,
        "sources": sources,
        "measured": measured,
        "sharing": _sharing(m, info),
        **calls,
        "extra": _extra(m),
        "generated": {
            "by": "hybridflow profile",
            "seconds": round(seconds_taken, 1),
            "at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "device": info.device_name,
            "backend": info.backend,
            **({"step_seconds": steps} if steps else {}),
            **({"load_average": list(load)} if load else {}),
        },
    }


def _extra(m: Measurements) -> dict:
    """The tables the simulator does not read (yet): kept in the profile as measured."""
    kernel = (
        {
            "kernel_sharing": [
                {"ranks": k, "factor": round(f, 4)} for k, f in sorted(m.kernel_sharing.items())
            ]
        }
        if m.kernel_sharing
        else {}
    )
    options = {"train_options": m.train_options} if m.train_options else {}
    return {
        "attention": m.alone.attention,
        "elementwise": m.alone.elementwise,
        "train_layer_rows": m.train_layer,
        "dispatch": m.dispatch,
        **kernel,
        **options,
        "shared_ops": {
            k: {"matmul": t.matmul, "attention": t.attention, "elementwise": t.elementwise}
            for k, t in m.shared.items()
        },
    }


def _clean(value: object) -> object:
    """Plain Python types with floats rounded to 6 significant digits for a readable file."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, float):
        assert math.isfinite(value), "non-finite measurement"
        return float(f"{value:.6g}")
    return value


def write_profile(profile: dict, path: str | Path) -> Path:
    path = Path(path)
    if path.suffix not in (".yaml", ".yml"):
        raise UserError(f"profile output must end in .yaml, got {str(path)!r}")
    head = (
        f"# Measured by `hybridflow profile` on {profile['generated']['device']} "
        f"({profile['generated']['backend']}). Format: profiles/README.md.\n"
    )
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(head + yaml.safe_dump(_clean(profile), sort_keys=False, width=100))
    except OSError as e:
        raise unreadable("cannot write the profile", path, e) from None
    return path
