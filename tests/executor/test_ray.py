"""Worker groups through Ray: protocols end to end, an extended worker, ordering and
concurrency of pools, a killed rank, quiet start-up and shutdown on Ctrl-C."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
import ray
import torch

from hybridflow.executor.controller.batch import Batch
from hybridflow.executor.controller.protocols import (
    ALL_TO_ALL,
    DP_COMPUTE,
    MEGATRON_3D,
    ONE_TO_ALL,
    register,
)
from hybridflow.executor.controller.worker import Worker
from tests.conftest import REPO

pytestmark = pytest.mark.process  # multi-process Ray/megatron: in `make test`
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


class ProbeWorker(Worker):
    """An extended worker: methods that report what each rank received."""

    @register(dispatch_mode=ONE_TO_ALL)
    def echo_all(self, value: object) -> tuple[int, object]:
        return self.rank, value

    @register(dispatch_mode=ALL_TO_ALL)
    def echo_each(self, value: object) -> tuple[int, object]:
        return self.rank, value

    @register(dispatch_mode=DP_COMPUTE)
    def tag_rows(self, batch: Batch) -> Batch:
        return batch.with_fields({"rank": torch.full((len(batch),), self.rank)})

    @register(dispatch_mode=MEGATRON_3D)
    def tag_3d(self, role: str, batch: Batch) -> Batch:
        g = self.role(role).groups
        return batch.with_fields(
            {
                "rank": torch.full((len(batch),), self.rank),
                "dp": torch.full((len(batch),), g.dp_rank),
            }
        )

    @register(dispatch_mode=ONE_TO_ALL)
    def env(self) -> dict[str, str]:
        keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
        return {k: os.environ[k] for k in keys} | {"torch_rank": torch.distributed.get_rank()}

    @register(dispatch_mode=ONE_TO_ALL)
    def stamp(self, label: str, seconds: float) -> tuple[str, float, float]:
        start = time.time()
        time.sleep(seconds)
        return label, start, time.time()

    @register(dispatch_mode=ONE_TO_ALL)
    def drop_role_for_test(self, role: str) -> None:
        self.roles.pop(role)

    @register(dispatch_mode=ONE_TO_ALL)
    def pid(self) -> int:
        return os.getpid()

    @register(dispatch_mode=ONE_TO_ALL)
    def barrier_after(self, seconds: float) -> int:
        time.sleep(seconds)
        torch.distributed.barrier()
        return self.rank


@pytest.fixture(scope="module")
def cluster():
    from hybridflow.executor.controller.cluster import Cluster, ClusterConfig

    c = Cluster.start(ClusterConfig(devices=9))
    yield c
    c.shutdown()


@pytest.fixture(scope="module")
def probe4(cluster):
    from hybridflow.executor.controller.worker_group import WorkerGroup
    from hybridflow.executor.engines.train_engine import EngineConfig
    from hybridflow.layout import ParallelLayout

    g = WorkerGroup(cluster, cluster.create_pool("probe4", 4), worker_cls=ProbeWorker)
    g.add_role("m", "tiny", ParallelLayout(tp=1, pp=2, dp=2), EngineConfig(trainable=False))
    yield g
    g.shutdown()


def test_protocols_split_and_collect_as_declared(probe4):
    assert probe4.run(None, "echo_all", "x") == [(r, "x") for r in range(4)]
    assert probe4.run(None, "echo_each", ["a", "b", "c", "d"]) == list(enumerate("abcd"))
    b = Batch({"i": torch.arange(8)}, {"s": list("abcdefgh")})
    out = probe4.run(None, "tag_rows", b)
    assert out["i"].tolist() == list(range(8)) and out["s"].tolist() == list("abcdefgh")
    assert out["rank"].tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    # PP2xDP2: DP slices go to ranks (0,2) and (1,3); outputs come from the last stage
    out3 = probe4.run("m", "tag_3d", b)
    assert out3["i"].tolist() == list(range(8))
    assert out3["dp"].tolist() == [0] * 4 + [1] * 4
    assert out3["rank"].tolist() == [2] * 4 + [3] * 4


def test_torchrun_environment(probe4):
    envs = probe4.run(None, "env")
    assert [e["RANK"] for e in envs] == ["0", "1", "2", "3"]
    assert [e["torch_rank"] for e in envs] == [0, 1, 2, 3]
    assert {e["WORLD_SIZE"] for e in envs} == {"4"} and len({e["MASTER_PORT"] for e in envs}) == 1
    assert [e["LOCAL_RANK"] for e in envs] == ["0", "1", "2", "3"]


def test_same_pool_in_order_other_pool_concurrently(cluster, probe4):
    from hybridflow.executor.controller.worker_group import WorkerGroup

    other = WorkerGroup(cluster, cluster.create_pool("other", 1), worker_cls=ProbeWorker)
    try:
        first = probe4.call(None, "stamp", "first", 1.0)
        second = probe4.call(None, "stamp", "second", 0.1)
        elsewhere = other.call(None, "stamp", "other", 0.5)
        f, s, o = first.result(), second.result(), elsewhere.result()
        for rank in range(4):  # same pool: the second call starts after the first ends
            assert s[rank][1] >= f[rank][2]
        # other pool: ran while the first call was still running
        assert o[0][1] < max(end for _, _, end in f)
    finally:
        other.shutdown()


def test_killed_rank_stops_the_call_with_a_clear_error(cluster):
    from hybridflow.executor.controller.worker_group import WorkerDiedError, WorkerGroup
    from hybridflow.executor.engines.train_engine import EngineConfig
    from hybridflow.layout import ParallelLayout

    g = WorkerGroup(
        cluster, cluster.create_pool("victim", 2), worker_cls=ProbeWorker, name="victim"
    )
    try:
        g.add_role("critic", "tiny", ParallelLayout(dp=2), EngineConfig(trainable=False))
        pids = g.run(None, "pid")
        fut = g.call(None, "barrier_after", 2.0)  # rank 0 will wait in the barrier forever
        os.kill(pids[1], signal.SIGKILL)
        start = time.time()
        with pytest.raises(WorkerDiedError, match=r"'victim'.*rank 1.*died"):
            fut.result(timeout=120)
        assert time.time() - start < 120
        with pytest.raises(WorkerDiedError, match="stopped"):
            g.call("critic", "role_info")
    finally:
        g.shutdown()


def test_live_processes_form_new_worlds(cluster):
    """WorkerGroup(actors=...): the same processes as one-rank worlds, then as a world of
    two in the other order; a process still holding a role cannot leave its world."""
    from hybridflow.executor.controller.worker_group import WorkerGroup
    from hybridflow.executor.engines.train_engine import EngineConfig
    from hybridflow.layout import ParallelLayout

    pool = cluster.create_pool("reuse", 2)
    pair = WorkerGroup(cluster, pool, worker_cls=ProbeWorker, name="pair")
    actors, pids = pair.actors, pair.run(None, "pid")
    try:
        pair.add_role("m", "tiny", ParallelLayout(dp=2), EngineConfig(trainable=False))
        with pytest.raises(RuntimeError, match="still holds roles"):
            WorkerGroup(cluster, pool, ProbeWorker, name="early", actors=actors)
        pair.run(None, "drop_role_for_test", "m")
        pair.shutdown(kill=False)
        for i, actor in enumerate(actors):
            one = WorkerGroup(cluster, pool, ProbeWorker, name=f"one{i}", actors=[actor])
            env = one.run(None, "env")[0]
            assert (env["WORLD_SIZE"], env["torch_rank"]) == ("1", 0)
            assert one.run(None, "pid") == [pids[i]] and one.run(None, "barrier_after", 0) == [0]
            one.shutdown(kill=False)
        swapped = WorkerGroup(cluster, pool, ProbeWorker, name="swapped", actors=actors[::-1])
        assert swapped.run(None, "pid") == pids[::-1]
        assert [e["torch_rank"] for e in swapped.run(None, "env")] == [0, 1]
        assert swapped.run(None, "barrier_after", 0) == [0, 1]
    finally:
        for a in actors:
            ray.kill(a, no_restart=True)


DRIVER = textwrap.dedent("""
    import sys, time
    from hybridflow.executor.controller.cluster import Cluster, ClusterConfig
    from hybridflow.executor.controller.worker_group import WorkerGroup
    c = Cluster.start(ClusterConfig(devices=2))
    g = WorkerGroup(c, c.create_pool("p", 2))
    print("ready", flush=True)
    time.sleep(600)
""")


def _processes_using(path: str) -> list[int]:
    pids = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if path.encode() in (p / "cmdline").read_bytes():
                    pids.append(int(p.name))
            except OSError:
                pass
    return pids


def test_quiet_start_and_clean_exit_on_ctrl_c():
    raytmp = tempfile.mkdtemp(prefix="hfq-")  # short: Ray's socket paths must fit 107 bytes
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}
    env["RAY_TMPDIR"] = raytmp
    proc = subprocess.Popen(
        [sys.executable, "-c", DRIVER],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        assert line.strip() == "ready", proc.stderr.read()
        assert _processes_using(raytmp)  # Ray runs from its own folder
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
        err = proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    for noise in ("dashboard", "token", "auth", "Started a local Ray instance"):
        assert noise.lower() not in err.replace("KeyboardInterrupt", "").lower(), err
    deadline = time.time() + 30
    while _processes_using(raytmp) and time.time() < deadline:
        time.sleep(0.5)
    assert not _processes_using(raytmp)
    shutil.rmtree(raytmp, ignore_errors=True)
