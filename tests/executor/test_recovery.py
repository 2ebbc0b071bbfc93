"""Recovery and preemption of `hybridflow run` (issue #26).

A worker killed in iteration 2 of 4 with ``--max-restarts 1``: the controller restarts the
worker groups from the newest checkpoint and ends with the weights of an uninterrupted run
(same seed). A SIGTERM mid-run: the iteration finishes, a checkpoint is written, the command
exits 143; ``--resume`` reaches the uninterrupted weights. The signal logic and the run dir's
records are also tested without any process, on a stand-in runtime.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from hybridflow.cli.main import main as cli_main
from hybridflow.executor.rl import loops
from hybridflow.executor.run.config import RunConfig
from hybridflow.executor.run.driver import (
    RunAborted,
    RunInterrupted,
    RunOptions,
    StopSignals,
    _Controller,
    run,
)
from hybridflow.executor.run.rundir import RunDir
from hybridflow.plan import Plan

ITERATIONS = 4


def _plan() -> Plan:
    from tests.executor.test_run_e2e import local_plans

    return local_plans("ppo")["colocated"]


def _weights(ckpt: Path) -> dict[str, dict]:
    return {p.name: torch.load(p, weights_only=False)["params"] for p in sorted(ckpt.glob("*.pt"))}


def _assert_same_weights(a_dir: Path, b_dir: Path) -> None:
    a, b = _weights(a_dir), _weights(b_dir)
    assert a.keys() == b.keys() and a
    for name in a:
        assert a[name].keys() == b[name].keys()
        for k in a[name]:
            assert torch.equal(a[name][k], b[name][k]), (name, k)


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The final checkpoint of an uninterrupted 4-iteration run (checkpoint every iteration)."""
    out = tmp_path_factory.mktemp("full") / "run"
    run(_plan(), RunConfig(iterations=ITERATIONS, checkpoint_every=1), out)
    return out / "checkpoints" / f"iter_{ITERATIONS:06d}"


# ---- end to end ----------------------------------------------------------------------------
@pytest.mark.slow
def test_killed_worker_restarts_and_ends_with_uninterrupted_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, uninterrupted: Path
) -> None:
    import ray

    original = loops.LOOPS["ppo"]
    killed: list[int] = []

    def dies_once_in_iteration_2(rt: Any, it: int, state: dict) -> dict:
        if it == 2 and not killed:
            killed.append(it)
            ray.kill(rt.groups["actor"].actors[1], no_restart=True)
        return original(rt, it, state)

    monkeypatch.setitem(loops.LOOPS, "ppo", dies_once_in_iteration_2)
    out = tmp_path / "run"
    res = run(
        _plan(),
        RunConfig(iterations=ITERATIONS, checkpoint_every=1),
        out,
        RunOptions(max_restarts=1),
    )
    assert killed == [2]
    assert [m["iteration"] for m in res.metrics] == [0, 1, 2, 3]
    restarts = [r for r in _records(out) if r.get("event") == "restart"]
    assert len(restarts) == 1, restarts
    r = restarts[0]
    assert (r["restart"], r["iteration"], r["failed_iteration"]) == (1, 2, 2)
    assert "role 'actor' rank 1" in r["died"] and r["time"]
    _assert_same_weights(uninterrupted, out / "checkpoints" / f"iter_{ITERATIONS:06d}")


@pytest.mark.slow
def test_sigterm_leaves_a_checkpoint_that_resume_takes_to_uninterrupted_weights(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    uninterrupted: Path,
) -> None:
    original = loops.LOOPS["ppo"]

    def preempted_in_iteration_1(rt: Any, it: int, state: dict) -> dict:
        if it == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(rt, it, state)

    monkeypatch.setitem(loops.LOOPS, "ppo", preempted_in_iteration_1)
    (tmp_path / "plan.json").write_text(json.dumps(_plan().to_dict()))
    out = tmp_path / "run"
    # no checkpoint due before the last iteration: the one after the signal is the stop's
    argv = ["run", str(tmp_path / "plan.json"), "--out", str(out)]
    assert cli_main(argv + ["--iterations", "4", "--checkpoint-every", "4"]) == 143
    assert (
        f"hybridflow run: SIGTERM: iteration 1 finished, checkpoint iter_000002 written; "
        f"continue with: hybridflow run --resume {out}\n"
    ) in capsys.readouterr().err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["iter_000002"]
    assert not (out / "summary.json").exists()

    monkeypatch.setitem(loops.LOOPS, "ppo", original)
    assert cli_main(["run", "--resume", str(out)]) == 0
    assert [r["iteration"] for r in _records(out)] == [0, 1, 2, 3]
    _assert_same_weights(uninterrupted, out / "checkpoints" / f"iter_{ITERATIONS:06d}")


# ---- without processes: a stand-in runtime -------------------------------------------------
class _FakeRuntime:
    """What the controller's iterations use of a Runtime; 'weights' are a counter."""

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.plan = SimpleNamespace(job=SimpleNamespace(algorithm="fake", sequences=1, seq_len=1))
        self.weights = 0

    def evaluate(self) -> float:
        return 0.5

    def take_timings(self) -> dict[str, float]:
        return {"generate": 1.0}

    def take_breakdown(self, stages: dict[str, float]) -> dict[str, float]:
        return {"generate.dispatch": stages["generate"]}

    def save_roles(self, folder: str) -> None:
        Path(folder, "w.json").write_text(json.dumps(self.weights))

    def load_roles(self, folder: str) -> None:
        self.weights = json.loads(Path(folder, "w.json").read_text())


def _controller(tmp_path: Path, stop: StopSignals, cfg: RunConfig) -> _Controller:
    rundir = RunDir(tmp_path / "run")
    rundir.start(_tiny_plan(), cfg, resume=False)
    none: Any = None
    return _Controller(none, cfg, none, none, rundir, RunOptions(), None, stop)


def _tiny_plan() -> Any:
    return SimpleNamespace(to_dict=lambda: {"fake": True})


def _signalling_loop(signals: dict[int, int]) -> Any:
    """A loop that trains (weights += 1) and sends itself SIGTERM `signals[it]` times."""

    def loop(rt: _FakeRuntime, it: int, state: dict) -> dict:
        for _ in range(signals.get(it, 0)):
            os.kill(os.getpid(), signal.SIGTERM)
        rt.weights += 1
        return {"score": float(it)}

    return loop


def test_first_signal_finishes_the_iteration_checkpoints_and_stops(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(loops.LOOPS, "fake", _signalling_loop({1: 1}))
    cfg = RunConfig(iterations=4, checkpoint_every=3)
    previous = signal.getsignal(signal.SIGTERM)
    with StopSignals() as stop, pytest.raises(RunInterrupted) as e:
        _controller(tmp_path, stop, cfg).iterations(_FakeRuntime(cfg), resume=False)
    assert signal.getsignal(signal.SIGTERM) is previous
    assert type(e.value) is RunInterrupted and e.value.exit_code == 143
    assert str(e.value).startswith("SIGTERM: iteration 1 finished, checkpoint iter_000002 written")
    rundir = RunDir(tmp_path / "run")
    assert rundir.checkpoint_iteration() == 2
    assert json.loads((rundir.checkpoints / "iter_000002" / "w.json").read_text()) == 2
    # resumed: iterations 2 and 3 run on from the checkpoint's weights
    rt = _FakeRuntime(cfg)
    with StopSignals() as stop:
        metrics, _ = _controller_resumed(tmp_path, stop, cfg).iterations(rt, resume=True)
    assert [m["iteration"] for m in metrics] == [0, 1, 2, 3] and rt.weights == 4


def _controller_resumed(tmp_path: Path, stop: StopSignals, cfg: RunConfig) -> _Controller:
    none: Any = None
    return _Controller(none, cfg, none, none, RunDir(tmp_path / "run"), RunOptions(), None, stop)


def test_second_signal_stops_at_once_keeping_the_last_whole_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(loops.LOOPS, "fake", _signalling_loop({2: 2}))
    cfg = RunConfig(iterations=4, checkpoint_every=1)
    with StopSignals() as stop, pytest.raises(RunAborted) as e:
        _controller(tmp_path, stop, cfg).iterations(_FakeRuntime(cfg), resume=False)
    assert e.value.exit_code == 143 and "second SIGTERM: stopped at once" in str(e.value)
    rundir = RunDir(tmp_path / "run")
    assert rundir.checkpoint_iteration() == 2  # iteration 2 abandoned, not recorded
    assert [r["iteration"] for r in _records(rundir.path)] == [0, 1]


def test_sigint_exit_code() -> None:
    with StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGINT)
    assert stop.signum == signal.SIGINT
    assert stop.interrupted("x", RunDir("d")).exit_code == 130


def test_resume_keeps_restart_records_and_skips_partial_checkpoints(tmp_path: Path) -> None:
    rundir = RunDir(tmp_path)
    # iterations 0..2 ran, a worker died, the restart resumes at iteration 1
    restart = {"event": "restart", "iteration": 1}
    rows = [{"iteration": 0}, {"iteration": 1}, {"iteration": 2}, restart]
    rundir.metrics_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert rundir.metrics_before(1) == [{"iteration": 0}]
    assert _records(tmp_path) == [{"iteration": 0}, restart]
    (rundir.checkpoints / "iter_000002").mkdir(parents=True)
    (rundir.checkpoints / "iter_000003.partial").mkdir()
    assert rundir.checkpoint_iteration() == 2


@pytest.mark.parametrize("value", ["-1", "101"])
def test_max_restarts_is_checked(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["run", "--max-restarts", value]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"hybridflow run: error: --max-restarts must be in 0..100 (restarts after a "
        f"worker dies), got {value}"
    ]


def test_a_restart_that_no_longer_fits_says_so(tmp_path: Path) -> None:
    """One node of the plan's 4 devices lost 2 (the cluster still answers): no restart."""
    from hybridflow.errors import RunStopped

    plan: Any = SimpleNamespace(cluster=SimpleNamespace(nodes=1, gpus_per_node=4), gpus=4)
    cluster: Any = SimpleNamespace(pools={}, resource="vgpu", node_devices=lambda: {"n1": 2})
    rundir = RunDir(tmp_path / "run")
    none: Any = None
    ctl = _Controller(
        plan, none, none, cluster, rundir, RunOptions(max_restarts=1), None, StopSignals()
    )
    with pytest.raises(RunStopped) as e:
        ctl._restart("worker group 'actor' rank 1 died", 1)
    assert str(e.value) == (
        "worker group 'actor' rank 1 died; no restart: the plan no longer fits on the nodes "
        "alive (the plan is for 1 node with 4 devices; the Ray cluster has 1 node x 2 vgpu); "
        "the last whole checkpoint resumes at iteration 0"
    )
    assert not rundir.metrics_path.exists()
