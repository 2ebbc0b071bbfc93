"""Ray start/join and resource pools (placement groups of devices).

On a GPU machine a device is a GPU; on a CPU-only machine it is a logical ``{"vgpu": 1}``
resource, so a "4-GPU cluster" runs here as 4 ranks. ``Cluster.start()`` starts a quiet local
Ray (no dashboard, no token-auth warning, its files in a temporary folder of its own) or joins
an existing cluster given by ``address`` / ``RAY_ADDRESS``. Everything it started is shut down
by :meth:`Cluster.shutdown`, at interpreter exit and on Ctrl-C (SIGINT ends in exit too).
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import tempfile
import time
import weakref
from dataclasses import dataclass, field

os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # read when ray is imported/started
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

import ray  # noqa: E402
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group  # noqa: E402

from hybridflow.errors import UserError  # noqa: E402

VGPU = "vgpu"
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

    def __post_init__(self) -> None:
        if self.devices < 1:
            raise RayClusterError(f"pool {self.name!r} needs at least one device")


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

    def create_pool(self, name: str, devices: int) -> ResourcePool:
        """Reserve `devices` devices (STRICT_PACK on one node when they fit, else PACK)."""
        if name in self.pools:
            raise RayClusterError(f"resource pool {name!r} already exists")
        free = int(ray.available_resources().get(self.resource, 0))
        if devices > free:
            raise RayClusterError(
                f"pool {name!r} needs {devices} devices, the cluster has "
                f"{free} free of {self.total_devices} ({self.resource})"
            )
        bundle = {self.resource: 1} if self.resource == VGPU else {"GPU": 1, "CPU": 1}
        per_node = max(
            int(n["Resources"].get(self.resource, 0)) for n in ray.nodes() if n.get("Alive")
        )
        strategy = "STRICT_PACK" if devices <= per_node else "PACK"
        pg = placement_group(
            [dict(bundle) for _ in range(devices)], strategy=strategy, name=f"hybridflow-{name}"
        )
        ready, _ = ray.wait([pg.ready()], timeout=self.config.pool_timeout_s)
        if not ready:
            remove_placement_group(pg)
            raise RayClusterError(
                f"pool {name!r}: {devices} devices not placed within "
                f"{self.config.pool_timeout_s:.0f} s"
            )
        self.pools[name] = ResourcePool(name, devices, self.resource, pg)
        return self.pools[name]

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
