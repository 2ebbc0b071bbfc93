"""Ray start/join and resource pools (placement groups of devices).

On a GPU machine a device is a GPU; on a CPU-only machine it is a logical ``{"vgpu": 1}``
resource, so a "4-GPU cluster" runs here as 4 ranks. ``Cluster.start()`` starts a quiet local
Ray (no dashboard, no token-auth warning, its files in a temporary folder of its own) or joins
an existing cluster given by ``address`` / ``RAY_ADDRESS``. Everything it started is shut down
by :meth:`Cluster.shutdown`, at interpreter exit and on Ctrl-C (SIGINT ends in exit too).

Several nodes: :meth:`Cluster.reserve` reads the devices of every alive node
(``ray.nodes()``), checks them against the plan's cluster (nodes x gpus_per_node) and places
every set before any worker starts, by the plan's node layout (:func:`node_parts`):

- a set of at most one node's devices lies on one node (STRICT_PACK);
- a set of k whole nodes gets k nodes of its own, ranks [j*n, (j+1)*n) on the j-th, so
  its consecutive tensor-parallel groups (tp divides n) stay inside a node;
- any other size (hand-written plans only) is cut into equal parts of the largest divisor of
  its size that fits in a node, each part on one node.

Whole-node sets are placed first, then the others largest first on the fullest node they
fit (best fit). A pool is one placement group of one bundle per device, rank i in bundle i,
each bundle pinned to its node by the ``ray.io/node-id`` label. :meth:`Cluster.create_pool`
without :meth:`Cluster.reserve` places one set the same way on the devices its pools leave.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import tempfile
import time
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # read when ray is imported/started
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

import ray  # noqa: E402
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group  # noqa: E402

from hybridflow.errors import UserError  # noqa: E402

if TYPE_CHECKING:
    from hybridflow.plan import Plan

VGPU = "vgpu"
NODE_ID = "ray.io/node-id"  # the label Ray gives every node
log = logging.getLogger(__name__)


class RayClusterError(UserError):
    """A cluster that cannot be started, joined or does not have the devices asked for."""


@dataclass(frozen=True)
class ClusterConfig:
    address: str | None = None  # join this Ray cluster; None: RAY_ADDRESS or start locally
    devices: int = 4  # logical devices of a local CPU-only cluster
    pool_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        if not isinstance(self.devices, int) or self.devices < 1:
            raise RayClusterError(f"devices must be a positive integer, got {self.devices!r}")
        if self.pool_timeout_s <= 0:
            raise RayClusterError("pool_timeout_s must be positive")

    @property
    def join_address(self) -> str | None:
        return self.address or os.environ.get("RAY_ADDRESS") or None


@dataclass
class ResourcePool:
    """A set of devices for one colocated model set (one placement group, one bundle each)."""

    name: str
    devices: int
    resource: str
    placement_group: PlacementGroup = field(repr=False)
    nodes: tuple[str, ...] = ()  # the node id bundle (rank) i is pinned to

    def __post_init__(self) -> None:
        if self.devices < 1:
            raise RayClusterError(f"pool {self.name!r} needs at least one device")


def node_parts(gpus: int, per_node: int) -> tuple[int, int]:
    """(parts, devices per part) of a set of `gpus` devices on nodes of `per_node`: one part
    if it fits in a node, whole nodes if it is a multiple of one, else equal parts of the
    largest divisor of `gpus` that fits in a node."""
    if gpus <= per_node:
        return 1, gpus
    part = max(d for d in range(1, per_node + 1) if gpus % d == 0)
    return gpus // part, part


def describe_nodes(devices: Mapping[str, int], resource: str) -> str:
    """'2 nodes x 2 vgpu' (or '1 node x 4 + 2 nodes x 2 vgpu' where they differ)."""
    counts = sorted(set(devices.values()), reverse=True)
    if not counts:
        return f"no node with {resource} devices"
    n = [sum(1 for d in devices.values() if d == c) for c in counts]
    return (
        " + ".join(f"{k} node{'s' if k > 1 else ''} x {c}" for k, c in zip(n, counts))
        + f" {resource}"
    )


def check_nodes(
    devices: Mapping[str, int], nodes: int, per_node: int, gpus: int, resource: str = VGPU
) -> list[str]:
    """The nodes a plan for `nodes` x `per_node` (using `gpus`) runs on, from the cluster's
    devices per node; raises one RayClusterError line if they do not match. A one-node plan
    needs one node with its `gpus`; a plan of several nodes that many nodes of `per_node`."""
    if nodes == 1:
        usable = [n for n, d in devices.items() if d >= gpus]
        wanted = f"1 node with {gpus} devices"
    else:
        usable = [n for n, d in devices.items() if d == per_node]
        wanted = f"{nodes} nodes x {per_node} devices"
    if len(usable) < (1 if nodes == 1 else nodes):
        raise RayClusterError(
            f"the plan is for {wanted}; the Ray cluster has {describe_nodes(devices, resource)}"
        )
    return usable


def assign_nodes(sets: Sequence[int], devices: Mapping[str, int], per_node: int) -> list[list[str]]:
    """For each set (its device count), the node of each of its parts (:func:`node_parts`):
    whole-node parts first, then the rest largest first on the fullest node they fit."""
    free = dict(devices)
    out: list[list[str]] = [[] for _ in sets]
    parts = [(i, node_parts(g, per_node)) for i, g in enumerate(sets)]
    order = sorted(parts, key=lambda p: (p[1][1] < per_node, -p[1][1], p[0]))
    for i, (k, size) in order:
        for _ in range(k):
            fits = [n for n in free if free[n] >= size and n not in out[i]] or [
                n for n in free if free[n] >= size
            ]
            if not fits:
                raise RayClusterError(
                    f"set {i} ({sets[i]} devices) does not fit on the devices left on the "
                    f"nodes ({', '.join(str(free[n]) for n in free)} free)"
                )
            node = min(fits, key=lambda n: (free[n], list(free).index(n)))
            free[node] -= size
            out[i].append(node)
    return out


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


class Cluster:
    """The Ray runtime of one controller."""

    def __init__(
        self, config: ClusterConfig, started_here: bool, tmpdir: str | None, resource: str
    ) -> None:
        self.config, self.started_here, self.tmpdir = config, started_here, tmpdir
        self.resource = resource
        self.pools: dict[str, ResourcePool] = {}
        self._reserved: dict[str, ResourcePool] = {}  # placed by reserve(), not yet handed out
        self._closed = False
        atexit.register(_shutdown_ref, weakref.ref(self))

    @classmethod
    def start(cls, config: ClusterConfig | None = None) -> Cluster:
        config = config or ClusterConfig()
        if ray.is_initialized():
            raise RayClusterError("Ray is already initialised in this process")
        address = config.join_address
        quiet = dict(
            include_dashboard=False,
            logging_level=logging.WARNING,
            log_to_driver=False,
            configure_logging=True,
        )
        if address:
            try:
                ray.init(address=address, **quiet)
            except (ConnectionError, ValueError, RuntimeError) as e:
                raise RayClusterError(f"cannot join the Ray cluster at {address!r}: {e}") from None
            resource = "GPU" if ray.cluster_resources().get("GPU") else VGPU
            log.info("joined the Ray cluster at %s (%s devices)", address, resource)
            return cls(config, started_here=False, tmpdir=None, resource=resource)
        own_tmp = not os.environ.get("RAY_TMPDIR")
        tmpdir = tempfile.mkdtemp(prefix="hf-ray-") if own_tmp else os.environ["RAY_TMPDIR"]
        gpu = _cuda_available()
        resources = {} if gpu else {VGPU: config.devices}
        _init_local(dict(num_cpus=os.cpu_count(), resources=resources, _temp_dir=tmpdir, **quiet))
        log.info(
            "started a local Ray: %d %s devices, files in %s",
            config.devices,
            "GPU" if gpu else VGPU,
            tmpdir,
        )
        return cls(
            config,
            started_here=True,
            tmpdir=tmpdir if own_tmp else None,
            resource="GPU" if gpu else VGPU,
        )

    @property
    def total_devices(self) -> int:
        return int(ray.cluster_resources().get(self.resource, 0))

    def node_devices(self) -> dict[str, int]:
        """Devices of every alive node that has any, by node id (in Ray's order)."""
        out = {}
        for n in ray.nodes():
            d = int(n.get("Resources", {}).get(self.resource, 0))
            if n.get("Alive") and d > 0:
                out[n["NodeID"]] = d
        return out

    def reserve(self, plan: Plan) -> dict[str, ResourcePool]:
        """Check the cluster's nodes against the plan's and place every set (pools
        ``set0``, ``set1``, ... as the runtime names them) before any worker starts;
        :meth:`create_pool` then hands them out. Sets placed already keep their pools."""
        names = [f"set{i}" for i in range(len(plan.sets))]
        devices = self.node_devices()
        nodes, gpn = plan.cluster.nodes, plan.cluster.gpus_per_node
        usable = check_nodes(devices, nodes, gpn, plan.gpus, self.resource)
        todo = [i for i, n in enumerate(names) if n not in self._reserved and n not in self.pools]
        per_node = gpn if nodes > 1 else max(devices[n] for n in usable)
        left = {n: d for n, d in self._left().items() if n in usable}
        placed = assign_nodes([plan.sets[i].gpus for i in todo], left, per_node)
        log.info(
            "Ray cluster: %s; plan: %d nodes x %d; sets %s on nodes %s",
            describe_nodes(devices, self.resource),
            nodes,
            gpn,
            todo,
            [[n[:8] for n in on] for on in placed],
        )
        try:
            for i, on in zip(todo, placed):
                size = plan.sets[i].gpus
                self._reserved[names[i]] = self._place(names[i], size, _per_device(on, size))
        except RayClusterError:
            for i in todo:
                if names[i] in self._reserved:
                    remove_placement_group(self._reserved.pop(names[i]).placement_group)
            raise
        return {n: self._reserved.get(n) or self.pools[n] for n in names}

    def create_pool(self, name: str, devices: int) -> ResourcePool:
        """Reserve `devices` devices: the pool :meth:`reserve` placed under `name`, or
        placed now by the same rule on the devices the other pools leave."""
        if name in self.pools:
            raise RayClusterError(f"resource pool {name!r} already exists")
        reserved = self._reserved.pop(name, None)
        if reserved is not None and reserved.devices == devices:
            self.pools[name] = reserved
            return reserved
        if reserved is not None:
            remove_placement_group(reserved.placement_group)
        free = int(ray.available_resources().get(self.resource, 0))
        if devices > free:
            raise RayClusterError(
                f"pool {name!r} needs {devices} devices, the cluster has "
                f"{free} free of {self.total_devices} ({self.resource})"
            )
        left = self._left()
        per_node = max(self.node_devices().values(), default=devices)
        try:
            on = assign_nodes([devices], left, per_node)[0]
        except RayClusterError:
            raise RayClusterError(
                f"pool {name!r}: {devices} devices do not fit on the devices its pools leave "
                f"free on the nodes ({describe_nodes(left, self.resource)})"
            ) from None
        self.pools[name] = self._place(name, devices, _per_device(on, devices))
        return self.pools[name]

    def _left(self) -> dict[str, int]:
        """Devices of each node that this controller's pools leave free."""
        left = self.node_devices()
        for pool in [*self.pools.values(), *self._reserved.values()]:
            for node in pool.nodes:
                left[node] = left.get(node, 0) - 1
        return left

    def _place(self, name: str, devices: int, nodes: Sequence[str]) -> ResourcePool:
        """One placement group of one bundle per device, bundle i pinned to nodes[i]."""
        bundle = {self.resource: 1} if self.resource == VGPU else {"GPU": 1, "CPU": 1}
        pg = placement_group(
            [dict(bundle) for _ in nodes],
            strategy="STRICT_PACK" if len(set(nodes)) == 1 else "PACK",
            name=f"hybridflow-{name}",
            bundle_label_selector=[{NODE_ID: n} for n in nodes],
        )
        ready, _ = ray.wait([pg.ready()], timeout=self.config.pool_timeout_s)
        if not ready:
            remove_placement_group(pg)
            raise RayClusterError(
                f"pool {name!r}: {devices} devices not placed within "
                f"{self.config.pool_timeout_s:.0f} s"
            )
        return ResourcePool(name, devices, self.resource, pg, tuple(nodes))

    def remove_pool(self, name: str, wait_s: float = 30.0) -> None:
        """Release a pool; returns once Ray counts its devices free again (removal is
        asynchronous: a pool created right after would otherwise not find them)."""
        pool = self.pools.pop(name, None)
        if pool is None:
            return
        before = ray.available_resources().get(self.resource, 0)
        remove_placement_group(pool.placement_group)
        deadline = time.monotonic() + wait_s
        while (
            ray.available_resources().get(self.resource, 0) < before + pool.devices
            and time.monotonic() < deadline
        ):
            time.sleep(0.05)

    def shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        if ray.is_initialized():
            for pool in self._reserved.values():
                remove_placement_group(pool.placement_group)
            self._reserved.clear()
            for name in list(self.pools):
                try:
                    self.remove_pool(name)
                except Exception:  # noqa: BLE001 - best effort while tearing down
                    log.debug("removing pool %s while shutting down failed", name, exc_info=True)
            ray.shutdown()
        if self.started_here and self.tmpdir:
            shutil.rmtree(self.tmpdir, ignore_errors=True)

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


def _per_device(parts: Sequence[str], devices: int) -> list[str]:
    """The node of each device of a set of `devices` laid out in `parts` equal parts."""
    return [n for n in parts for _ in range(devices // len(parts))]


def _init_local(kwargs: dict, attempts: int = 3) -> None:
    """Start a local Ray; retried because Ray gives its raylet a fixed 30 s to register,
    which an overloaded machine can miss."""
    for attempt in range(1, attempts + 1):
        try:
            ray.init(**kwargs)
            return
        except Exception as e:  # noqa: BLE001 - Ray raises a bare Exception here
            ray.shutdown()
            if "timed out during startup" not in str(e) or attempt == attempts:
                raise RayClusterError(f"cannot start a local Ray: {e}") from e
            log.warning(
                "local Ray did not start in time (attempt %d of %d): retrying", attempt, attempts
            )


def _shutdown_ref(ref: weakref.ref[Cluster]) -> None:
    cluster = ref()
    if cluster is not None:
        cluster.shutdown()
