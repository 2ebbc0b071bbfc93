"""The run dir's state on disk (issue #26, "Disk and state"), on RunDir without Ray.

A run dir that cannot be written is refused before any worker starts; a full disk while
checkpointing stops the run with one line, the partial folder removed and the previous
checkpoint whole; a checkpoint cut short or with files deleted by hand is skipped on resume
(the newest whole one is resumed); one of another plan or version is refused, naming the
difference; a checkpoint from before manifests still resumes.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from hybridflow.cli.main import main as cli_main
from hybridflow.errors import RunStopped, UserError
from hybridflow.executor.run.config import RunConfig
from hybridflow.executor.run.rundir import (
    MANIFEST,
    CheckpointError,
    CheckpointWriteError,
    RunDir,
    RunError,
    first_difference,
)

IT2, IT4 = "iter_000002", "iter_000004"


def _plan(global_batch: int = 64) -> Any:
    d = {
        "version": 1,
        "cluster": {"gpu": "local-cpu", "nodes": 1, "gpus_per_node": 4},
        "job": {"algorithm": "ppo", "global_batch": global_batch},
        "sets": [{"models": ["actor"], "gpus": 4}],
        "predicted": {"iteration_s": 1.0},
    }
    return SimpleNamespace(to_dict=lambda: d)


class _Roles:
    """Stand-in roles: each rank's 'weights' a file of `size` bytes; `fail`: the OSError
    the save raises after writing a part."""

    def __init__(self, size: int = 1000, fail: OSError | None = None) -> None:
        self.size, self.fail = size, fail
        self.loaded: str | None = None

    def save_roles(self, folder: str) -> None:
        for rank in range(2):
            with open(Path(folder, f"actor.rank{rank}.pt"), "wb") as f:
                f.write(bytes([rank]) * self.size)
                if self.fail is not None:
                    raise self.fail

    def load_roles(self, folder: str) -> None:
        self.loaded = folder


def _started(path: Path, plan: Any = None, resume: bool = False) -> RunDir:
    rundir = RunDir(path)
    rundir.start(plan or _plan(), RunConfig(), resume)
    return rundir


def _saved_twice(tmp_path: Path) -> RunDir:
    """A run dir with whole checkpoints iter_000002 and iter_000004."""
    rundir = _started(tmp_path / "run")
    rundir.save_checkpoint(_Roles(), 2, {"k": 2})
    rundir.save_checkpoint(_Roles(), 4, {"k": 4})
    return rundir


def _names(rundir: RunDir) -> list[str]:
    return sorted(p.name for p in rundir.checkpoints.iterdir())


# ---- a run dir that cannot be written ------------------------------------------------------
def test_a_run_dir_under_a_regular_file_is_refused_naming_path_and_reason(
    tmp_path: Path,
) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(RunError) as e:
        _started(tmp_path / "file" / "run")
    assert str(e.value) == (
        f"run dir {tmp_path}/file/run: cannot write {tmp_path}/file/run (Not a directory)"
    )


@pytest.fixture
def read_only_dir(tmp_path: Path) -> Iterator[Path]:
    """A folder chmod 555; skipped as root, whom chmod does not stop (the run dir under a
    regular file, above, and the checkpoints folder below stand for it there)."""
    path = tmp_path / "ro"
    path.mkdir()
    path.chmod(0o555)
    try:
        probe = path / "probe"
        try:
            probe.write_text("")
        except PermissionError:
            yield path
            return
        probe.unlink()
        pytest.skip("running as root: chmod 555 does not stop writes")
    finally:
        path.chmod(0o755)


def test_a_read_only_run_dir_is_refused_naming_path_and_reason(read_only_dir: Path) -> None:
    with pytest.raises(RunError) as e:
        _started(read_only_dir)
    assert str(e.value) == (
        f"run dir {read_only_dir}: cannot write {read_only_dir}/plan.json (Permission denied)"
    )


def test_resuming_into_read_only_checkpoints_is_refused_at_start(tmp_path: Path) -> None:
    rundir = _saved_twice(tmp_path)
    if os.geteuid() == 0:  # root writes anyway: a regular file where the folder was
        blocked = rundir.checkpoints / ".write-test"
        blocked.mkdir()
        (blocked / "x").write_text("")
        reason = "Is a directory"
    else:
        rundir.checkpoints.chmod(0o555)
        reason = "Permission denied"
    try:
        with pytest.raises(RunError) as e:
            _started(rundir.path, resume=True)
    finally:
        rundir.checkpoints.chmod(0o755)
    assert str(e.value) == (
        f"run dir {rundir.path}: cannot write {rundir.checkpoints}/.write-test ({reason})"
    )


def test_cli_refuses_an_unwritable_out_before_any_worker(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from hybridflow.executor.run import driver
    from tests.executor.test_run_e2e import local_plans

    def no_cluster(*a: object) -> None:
        raise AssertionError("Ray started")

    monkeypatch.setattr(driver.Cluster, "start", no_cluster)
    (tmp_path / "plan.json").write_text(json.dumps(local_plans("ppo")["colocated"].to_dict()))
    (tmp_path / "file").write_text("")
    out = tmp_path / "file" / "run"
    assert cli_main(["run", str(tmp_path / "plan.json"), "--out", str(out)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"hybridflow run: error: run dir {out}: cannot write {out} (Not a directory)"
    ]


# ---- a full disk while checkpointing -------------------------------------------------------
def _assert_disk_full_kept_iter2(rundir: RunDir, e: CheckpointWriteError) -> None:
    assert isinstance(e, RunStopped) and "\n" not in str(e)
    assert str(e) == (
        f"disk full while writing checkpoint {IT4}: No space left on device "
        f"({rundir.checkpoints}); its partial folder removed, the last whole checkpoint "
        f"{IT2} kept; continue with: hybridflow run --resume {rundir.path}"
    )
    assert _names(rundir) == [IT2]
    roles = _Roles()
    assert _started(rundir.path, resume=True).restore(roles) == (2, {"k": 2})
    assert roles.loaded == str(rundir.checkpoints / IT2)


def test_disk_full_while_checkpointing_removes_the_partial_keeps_the_previous(
    tmp_path: Path,
) -> None:
    rundir = _started(tmp_path / "run")
    rundir.save_checkpoint(_Roles(), 2, {"k": 2})
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    with pytest.raises(CheckpointWriteError) as e:
        rundir.save_checkpoint(_Roles(fail=full), 4, {"k": 4})
    _assert_disk_full_kept_iter2(rundir, e.value)


def test_a_workers_disk_full_chained_by_its_group_call_says_disk_full(tmp_path: Path) -> None:
    from hybridflow.executor.controller.worker_group import WorkerGroupError

    class _GroupRoles(_Roles):
        def save_roles(self, folder: str) -> None:
            try:
                super().save_roles(folder)
            except OSError as cause:
                raise WorkerGroupError(f"rank 0 failed: {cause}") from cause

    rundir = _started(tmp_path / "run")
    rundir.save_checkpoint(_Roles(), 2, {"k": 2})
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    with pytest.raises(CheckpointWriteError) as e:
        rundir.save_checkpoint(_GroupRoles(fail=full), 4, {"k": 4})
    _assert_disk_full_kept_iter2(rundir, e.value)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 256 KiB tmpfs (as root); skipped where it cannot be mounted."""
    path = tmp_path / "disk"
    path.mkdir()
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(path)], capture_output=True
    ).returncode:
        pytest.skip("cannot mount a tmpfs here (not root?): the monkeypatched tests stand")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=False)


@pytest.mark.process  # mount and umount
def test_a_real_full_disk_while_checkpointing(small_disk: Path) -> None:
    rundir = _started(small_disk / "run")
    rundir.save_checkpoint(_Roles(size=10_000), 2, {"k": 2})
    with pytest.raises(CheckpointWriteError) as e:
        rundir.save_checkpoint(_Roles(size=400_000), 4, {"k": 4})
    _assert_disk_full_kept_iter2(rundir, e.value)


def test_another_error_while_checkpointing_is_named_and_other_errors_pass(
    tmp_path: Path,
) -> None:
    rundir = _started(tmp_path / "run")
    rundir.save_checkpoint(_Roles(), 2, {"k": 2})
    with pytest.raises(CheckpointWriteError) as e:
        rundir.save_checkpoint(_Roles(fail=PermissionError(13, "Permission denied")), 4, {})
    assert str(e.value).startswith(f"cannot write checkpoint {IT4}: Permission denied (")
    with pytest.raises(ZeroDivisionError):
        rundir.save_checkpoint(_Roles(fail=ZeroDivisionError()), 4, {})  # type: ignore[arg-type]
    assert _names(rundir) == [IT2]


def test_saving_an_iteration_again_replaces_it_whole_and_keeps_two(tmp_path: Path) -> None:
    rundir = _saved_twice(tmp_path)
    rundir.save_checkpoint(_Roles(size=7), 4, {"k": "again"})
    assert _names(rundir) == [IT2, IT4]
    assert rundir.restore(_Roles()) == (4, {"k": "again"})
    rundir.save_checkpoint(_Roles(), 6, {})
    assert _names(rundir) == [IT4, "iter_000006"]


# ---- checkpoints damaged by hand -----------------------------------------------------------
@pytest.mark.parametrize(
    "damage,why",
    [
        (lambda p: (p / "actor.rank1.pt").unlink(), "actor.rank1.pt missing"),
        (lambda p: os.truncate(p / "actor.rank0.pt", 10), "actor.rank0.pt is 10 bytes, "),
        (lambda p: (p / "controller.json").unlink(), "controller.json missing"),
        (lambda p: (p / MANIFEST).unlink(), "manifest.json missing"),
        (lambda p: (p / MANIFEST).write_text("{"), "manifest.json unreadable"),
    ],
)
def test_a_damaged_newest_checkpoint_is_skipped_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: Any, why: str
) -> None:
    rundir = _saved_twice(tmp_path)
    damage(rundir.checkpoints / IT4)
    resumed = _started(rundir.path, resume=True)
    roles = _Roles()
    with caplog.at_level(logging.WARNING):
        assert resumed.restore(roles) == (2, {"k": 2})
    assert roles.loaded == str(rundir.checkpoints / IT2)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and warned[0].startswith(
        f"checkpoint {rundir.checkpoints / IT4} is damaged ({why}"
    ), warned
    assert warned[0].endswith("): skipped")
    assert resumed.checkpoint_iteration() == 2
    assert _names(rundir) == [IT2, IT4]  # nothing lost


def test_a_deleted_newest_checkpoint_resumes_the_one_before(tmp_path: Path) -> None:
    import shutil

    rundir = _saved_twice(tmp_path)
    shutil.rmtree(rundir.checkpoints / IT4)
    assert _started(rundir.path, resume=True).restore(_Roles()) == (2, {"k": 2})


def test_no_whole_checkpoint_is_one_clear_message(tmp_path: Path) -> None:
    rundir = _saved_twice(tmp_path)
    (rundir.checkpoints / IT4 / "actor.rank0.pt").unlink()
    os.truncate(rundir.checkpoints / IT2 / "actor.rank1.pt", 0)
    with pytest.raises(CheckpointError) as e:
        _started(rundir.path, resume=True).restore(_Roles())
    assert isinstance(e.value, UserError)
    assert str(e.value) == (
        f"run dir {rundir.path}: no whole checkpoint to resume from: {IT2} (actor.rank1.pt "
        f"is 0 bytes, manifest.json says 1000), {IT4} (actor.rank0.pt missing); remove "
        f"{rundir.checkpoints} to start over"
    )


def test_a_checkpoint_from_before_manifests_resumes_with_a_note(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rundir = _started(tmp_path / "run")
    old = rundir.checkpoints / IT2
    old.mkdir(parents=True)
    (old / "actor.rank0.pt").write_bytes(b"w")
    (old / "controller.json").write_text(json.dumps({"iteration": 2, "state": {"k": 1}}))
    with caplog.at_level(logging.WARNING):
        assert rundir.restore(_Roles()) == (2, {"k": 1})
    assert [r.getMessage() for r in caplog.records] == [
        f"checkpoint {old} has no manifest.json (written before manifests): taken as whole, "
        f"its plan and version unchecked"
    ]
    # an old folder with nothing in it still counts (as before manifests), one with files
    # but no controller.json does not
    (rundir.checkpoints / IT4).mkdir()
    assert rundir.checkpoint_iteration() == 4
    (rundir.checkpoints / IT4 / "actor.rank0.pt").write_bytes(b"w")
    assert rundir.checkpoint_iteration() == 2


# ---- another plan, another version ---------------------------------------------------------
def test_a_checkpoint_of_another_plan_is_refused_naming_the_difference(tmp_path: Path) -> None:
    rundir = _saved_twice(tmp_path)
    with pytest.raises(CheckpointError) as e:
        _started(rundir.path, plan=_plan(global_batch=128), resume=True).restore(_Roles())
    assert str(e.value) == (
        f"checkpoint {IT4} is of another plan: job.global_batch 64 vs 128 (the checkpoint's "
        f"vs {rundir.path}/plan.json)"
    )
    # the prediction is not the plan's identity; a RunDir not started reads plan.json
    again = RunDir(rundir.path)
    (rundir.path / "plan.json").write_text(json.dumps({**_plan().to_dict(), "predicted": {}}))
    assert again.restore(_Roles()) == (4, {"k": 4})


def test_a_checkpoint_of_another_version_is_refused(tmp_path: Path) -> None:
    rundir = _saved_twice(tmp_path)
    manifest = rundir.checkpoints / IT4 / MANIFEST
    manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "hybridflow": "0.0.9"}))
    with pytest.raises(CheckpointError) as e:
        _started(rundir.path, resume=True).restore(_Roles())
    assert str(e.value).startswith(
        f"checkpoint {IT4} is of another version: written by hybridflow 0.0.9, this is hybridflow "
    )


def test_first_difference_names_the_path() -> None:
    a = {"job": {"n": 1}, "sets": [{"gpus": 2}], "cluster": {"nodes": 1}}
    assert first_difference(a, a) is None
    assert first_difference(a, {**a, "sets": [{"gpus": 4}]}) == "sets[0].gpus 2 vs 4"
    assert first_difference(a, {**a, "sets": []}) == "sets 1 entries vs 0"
    assert first_difference(a, {"job": {"n": 1}}) == 'sets [{"gpus": 2}] vs (absent)'
