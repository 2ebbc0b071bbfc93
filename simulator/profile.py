"""Hardware profiles: datasheet numbers of one device kind and its links, plus optional
measured tables (written by `hybridflow profile`). Data, never code: profiles/<name>.yaml.

The format is documented in profiles/README.md. Every top-level number needs a `sources`
entry (a public source, or the word "estimate" with a reason).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from hybridflow import profiles as shipped_profiles
from hybridflow.errors import unreadable
from hybridflow.simulator.calls import Calls, parse_calls
from hybridflow.simulator.table import ProfileError, interpolate  # noqa: F401 (re-exported)
from hybridflow.simulator.table import in_range as _in_range
from hybridflow.simulator.table import num as _num
from hybridflow.simulator.table import positive_int as _int
from hybridflow.simulator.table import rows as _rows

log = logging.getLogger(__name__)

COLLECTIVES = ("all_reduce", "all_gather", "broadcast", "p2p")
_NUMBERS = (
    "peak_flops",
    "hbm_gib",
    "hbm_bandwidth",
    "intra_node_bandwidth",
    "inter_node_bandwidth",
    "comm_latency_s",
    "step_overhead_s",
    "reserved_gib",
)
_EFFICIENCY = ("matmul", "memory", "communication")
_BANDWIDTH = (1e6, 1e15, "1 MB/s to 1 PB/s")
# the numbers' bounds, beyond which no device lies (and times would not be numbers)
_RANGES: dict[str, tuple[float, float, str]] = {
    "peak_flops": (1e9, 1e18, "1 GFLOP/s, a CPU core, to 1 EFLOP/s"),
    "hbm_gib": (0.0, 2.0**20, "up to 1 PiB"),
    "hbm_bandwidth": _BANDWIDTH,
    "intra_node_bandwidth": _BANDWIDTH,
    "inter_node_bandwidth": _BANDWIDTH,
    "host_bandwidth": _BANDWIDTH,
    "comm_latency_s": (0.0, 1.0, "seconds per collective step"),
    "step_overhead_s": (0.0, 10.0, "seconds per generation step"),
    "reserved_gib": (0.0, 2.0**20, "up to 1 PiB"),
}


@dataclass(frozen=True)
class Measured:
    """Measured tables; each entry is a sorted tuple of numeric rows."""

    matmul: tuple[tuple[float, float, float, float], ...] = ()  # m, n, k, seconds
    collectives: tuple[
        tuple[str, tuple[tuple[float, float, float], ...]], ...
    ] = ()  # op -> ranks, bytes, s
    generate_model: str = ""
    prefill: tuple[tuple[float, float, float], ...] = ()  # batch, tokens, seconds
    decode: tuple[tuple[float, float, float], ...] = ()  # batch, context, seconds
    train_layer_model: str = ""
    train_layer: tuple[tuple[float, float], ...] = ()  # tokens, seconds

    def collective(self, op: str) -> tuple[tuple[float, float, float], ...]:
        return dict(self.collectives).get(op, ())


@dataclass(frozen=True)
class Overheads:
    """What a measured CPU profile adds to FLOPs and bytes: ranks sharing the host's cores and
    the single controller's per-call cost (`sharing:` and `extra.dispatch` of the file)."""

    sharing: tuple[tuple[float, float], ...] = ()  # ranks active on the host, slowdown
    dispatch_s: float = 0.0  # no-op call to every worker of a pool
    dispatch_transfer: tuple[tuple[float, float], ...] = ()  # bytes sent to each, seconds

    def slowdown(self, ranks: float) -> float:
        """Factor on compute and memory time with `ranks` ranks busy on one host (1: alone)."""
        if not self.sharing or ranks <= 1:
            return 1.0
        # beyond the largest measured count the slowdown grows in proportion (interpolate)
        points = ((1.0, 1.0),) + tuple(r for r in self.sharing if r[0] > 1)
        return max(1.0, interpolate(points, ranks))

    def dispatch(self, nbytes: float) -> float:
        """Seconds of one controller call carrying `nbytes` to each worker (0: not measured)."""
        if self.dispatch_transfer:
            return interpolate(self.dispatch_transfer, nbytes)
        return self.dispatch_s


def _overheads(sharing: Any, extra: Any) -> Overheads:
    kw: dict[str, Any] = {}
    if sharing is not None:
        if not isinstance(sharing, dict) or "slowdown" not in sharing:
            raise ProfileError("sharing: expected {host_cores: N, slowdown: [{ranks, factor}]}")
        kw["sharing"] = _rows("sharing.slowdown", sharing["slowdown"], ("ranks", "factor"))
    dispatch = extra.get("dispatch") if isinstance(extra, dict) else None
    if dispatch is not None:
        if not isinstance(dispatch, dict) or "call_s" not in dispatch:
            raise ProfileError("extra.dispatch: expected {call_s: s, transfer: [{bytes, seconds}]}")
        kw["dispatch_s"] = _num("extra.dispatch.call_s", dispatch["call_s"])
        if dispatch.get("transfer"):
            kw["dispatch_transfer"] = _rows(
                "extra.dispatch.transfer", dispatch["transfer"], ("bytes", "seconds")
            )
    return Overheads(**kw)


def _measured(raw: Any) -> Measured:
    if raw is None:
        return Measured()
    if not isinstance(raw, dict):
        raise ProfileError("measured: expected a mapping")
    unknown = set(raw) - {"matmul", "collectives", "generate", "train_layer"}
    if unknown:
        raise ProfileError(f"measured: unknown tables {', '.join(sorted(unknown))}")
    kw: dict[str, Any] = {}
    if "matmul" in raw:
        kw["matmul"] = _rows("measured.matmul", raw["matmul"], ("m", "n", "k", "seconds"))
    coll = raw.get("collectives") or {}
    if not isinstance(coll, dict) or set(coll) - set(COLLECTIVES):
        raise ProfileError(
            f"measured.collectives: expected a mapping with keys among {', '.join(COLLECTIVES)}"
        )
    kw["collectives"] = tuple(
        sorted(
            (op, _rows(f"measured.collectives.{op}", rows, ("ranks", "bytes", "seconds")))
            for op, rows in coll.items()
        )
    )
    if "generate" in raw:
        gen = raw["generate"]
        if not isinstance(gen, dict) or not isinstance(gen.get("model"), str):
            raise ProfileError(
                "measured.generate: expected {model: NAME, prefill: [...], decode: [...]}"
            )
        kw["generate_model"] = gen["model"]
        kw["prefill"] = _rows(
            "measured.generate.prefill", gen.get("prefill"), ("batch", "tokens", "seconds")
        )
        kw["decode"] = _rows(
            "measured.generate.decode", gen.get("decode"), ("batch", "context", "seconds")
        )
    if "train_layer" in raw:
        tl = raw["train_layer"]
        if not isinstance(tl, dict) or not isinstance(tl.get("model"), str):
            raise ProfileError("measured.train_layer: expected {model: NAME, points: [...]}")
        kw["train_layer_model"] = tl["model"]
        kw["train_layer"] = _rows(
            "measured.train_layer.points", tl.get("points"), ("tokens", "seconds")
        )
    return Measured(**kw)


@dataclass(frozen=True)
class Profile:
    name: str
    gpus_per_node: int
    peak_flops: float  # dense bf16 FLOP/s per device
    hbm_gib: float  # device memory
    hbm_bandwidth: float  # bytes/s
    intra_node_bandwidth: float  # bytes/s per device, one direction (NVLink)
    inter_node_bandwidth: float  # bytes/s per device, one direction (NIC share)
    comm_latency_s: float  # per collective step
    step_overhead_s: float  # per generation step (scheduler, launches)
    reserved_gib: float  # framework context, allocator slack
    eff_matmul: float
    eff_memory: float
    eff_communication: float
    estimate: bool = False
    host_cores: int = 0  # >0: devices share this many CPU cores (local-cpu)
    host_bandwidth: float = 0.0  # bytes/s per device to host memory, one way (0: no offload)
    sources: tuple[tuple[str, str], ...] = ()
    measured: Measured = field(default_factory=Measured)
    overheads: Overheads = field(default_factory=Overheads)
    calls: Calls = field(default_factory=Calls)  # per-call tables of the executor's methods
    slowdown: float = 1.0  # compute and memory time factor (ranks sharing the host)

    def __post_init__(self) -> None:
        if not self.name:
            raise ProfileError("profile: name is empty")
        for f in ("eff_matmul", "eff_memory", "eff_communication"):
            if not 0 < getattr(self, f) <= 1:
                raise ProfileError(f"profile {self.name}: efficiency {f[4:]} must be in (0, 1]")
        if self.reserved_gib >= self.hbm_gib:
            raise ProfileError(f"profile {self.name}: reserved_gib >= hbm_gib")
        assert self.slowdown >= 1.0, f"slowdown {self.slowdown} < 1"

    def shared(self, ranks: int) -> Profile:
        """This profile with `ranks` ranks busy on each host at once (a measured `sharing`
        table; unchanged without one)."""
        factor = self.overheads.slowdown(ranks)
        return self if factor == self.slowdown else replace(self, slowdown=factor)

    @property
    def usable_bytes(self) -> float:
        return (self.hbm_gib - self.reserved_gib) * 2**30

    def matmul_flops(self, m: float, n: float, k: float) -> tuple[float, str]:
        """Achieved FLOP/s for an (m x k) @ (k x n) product, and its source."""
        if self.measured.matmul:
            pts = tuple(sorted((2 * a * b * c, s) for a, b, c, s in self.measured.matmul))
            work = 2.0 * m * n * k
            return work / interpolate(pts, work) / self.slowdown, "measured"
        return self.peak_flops * self.eff_matmul / self.slowdown, "roofline"

    def memory_seconds(self, nbytes: float) -> float:
        return nbytes * self.slowdown / (self.hbm_bandwidth * self.eff_memory)


def _number(origin: str, key: str, value: Any) -> float:
    """A top-level number of the profile, within the bounds of any device."""
    x = _num(f"{origin}.{key}", value, positive=key != "reserved_gib")
    return _in_range(f"{origin}.{key}", x, *_RANGES[key])


def _parse(data: Any, origin: str) -> Profile:
    if not isinstance(data, dict):
        raise ProfileError(f"profile {origin}: expected a YAML mapping at top level")
    name = data.get("name", origin)  # a missing one is named below
    if not isinstance(name, str) or not name.strip():
        raise ProfileError(f"profile {origin}: name must be a non-empty string")
    missing = [k for k in ("name", "gpus_per_node", *_NUMBERS, "efficiency") if k not in data]
    if missing:
        raise ProfileError(f"profile {origin}: missing {', '.join(missing)}")
    sources = data.get("sources") or {}
    if not isinstance(sources, dict):
        raise ProfileError(f"profile {origin}: sources must be a mapping")
    unsourced = [k for k in (*_NUMBERS, "efficiency") if not sources.get(k)]
    if unsourced:
        raise ProfileError(f"profile {origin}: no source for {', '.join(unsourced)}")
    eff = data["efficiency"]
    if not isinstance(eff, dict) or set(eff) != set(_EFFICIENCY):
        raise ProfileError(f"profile {origin}: efficiency needs exactly {', '.join(_EFFICIENCY)}")
    return Profile(
        name=str(data["name"]),
        gpus_per_node=_int(f"{origin}.gpus_per_node", data["gpus_per_node"]),
        **{k: _number(origin, k, data[k]) for k in _NUMBERS},
        **{f"eff_{k}": _num(f"{origin}.efficiency.{k}", eff[k]) for k in _EFFICIENCY},
        estimate=bool(data.get("estimate", False)),
        host_cores=_int(f"{origin}.host_cores", data["host_cores"]) if "host_cores" in data else 0,
        host_bandwidth=_optional_number(data, sources, origin, "host_bandwidth"),
        sources=tuple(sorted((str(k), str(v)) for k, v in sources.items())),
        measured=_measured(data.get("measured")),
        overheads=_overheads(data.get("sharing"), data.get("extra")),
        calls=parse_calls(data.get("calls")),
    )


def _optional_number(data: dict, sources: dict, origin: str, key: str) -> float:
    """An optional positive number, sourced like the required ones; 0.0 when absent."""
    if key not in data:
        return 0.0
    if not sources.get(key):
        raise ProfileError(f"profile {origin}: no source for {key}")
    return _number(origin, key, data[key])


def available_profiles() -> list[str]:
    return shipped_profiles.names()


def load_profile(name_or_path: str) -> Profile:
    """A shipped profile's name (e.g. "a100-80gb", see profiles/) or the path of a YAML file."""
    source = shipped_profiles.shipped(name_or_path)
    if source is None:
        path = Path(name_or_path)
        if path.suffix not in (".yaml", ".yml") or not path.exists():
            raise ProfileError(
                f"unknown GPU kind {name_or_path!r}: known profiles are "
                f"{', '.join(available_profiles())} (or give a .yaml path)"
            )
        source, stem = path, path.stem
    else:
        stem = name_or_path
    try:
        data = yaml.safe_load(source.read_text())
    except yaml.YAMLError as e:
        raise ProfileError(
            f"profile {str(source)!r} is not valid YAML: {e}".replace("\n", " ")
        ) from None
    except OSError as e:
        raise unreadable("profile", source, e) from None
    log.debug("profile %s from %s", stem, source)
    return _parse(data, stem)
