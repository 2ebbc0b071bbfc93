"""A run directory: what `hybridflow run` writes, and what `--resume` continues from.

    plan.json      the plan (hybridflow.plan)           run.json      the run's settings
    metrics.jsonl  one JSON object per iteration, and one per restart ("event": "restart")
    summary.json   measured and predicted
    checkpoints/iter_N/  every role's weights and optimizer state per rank, controller.json,
                   manifest.json (written last: the files and their sizes, the plan's
                   identity and the hybridflow version that wrote it)

A checkpoint is written into `iter_N.partial` and renamed into place, so a run that dies
while saving leaves the previous checkpoint whole; the newest two are kept. A save that
fails (a full disk) removes its partial folder and stops the run with one line. On resume
the newest whole checkpoint is taken: one whose files do not match its manifest (deleted
or cut short by hand) is skipped with a warning, and one of another plan or another
hybridflow version is refused, naming the difference. A checkpoint from before manifests
is taken as whole, with a note.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any, Protocol

import hybridflow
from hybridflow.errors import RunStopped, UserError
from hybridflow.executor.run.config import RunConfig
from hybridflow.plan import Plan

log = logging.getLogger(__name__)
KEEP = 2  # whole checkpoints kept
MANIFEST = "manifest.json"
CONTROLLER = "controller.json"
FORMAT = 2  # of a checkpoint with a manifest; those before it have none
PLAN_KEYS = ("cluster", "job", "sets")  # a plan's identity: what its checkpoints depend on


class RunError(UserError):
    """A run that cannot start: a bad plan, run dir or setting."""


class CheckpointError(RunError):
    """A checkpoint that cannot be resumed: none whole, or of another plan or version."""


class CheckpointWriteError(RunStopped):
    """A checkpoint that could not be written (a full disk); the previous ones are kept."""


class Roles(Protocol):
    """What checkpoints need of the runtime: save and load every role, on all its ranks."""

    def save_roles(self, folder: str) -> None: ...

    def load_roles(self, folder: str) -> None: ...


class RunDir:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._plan: dict | None = None  # the plan start() wrote, as plan.json holds it
        self._noted: set[str] = set()  # warnings given once

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    # ---- set-up --------------------------------------------------------------------
    def start(self, plan: Plan, cfg: RunConfig, resume: bool) -> None:
        """Write plan.json and run.json (again, when resuming: the settings may change);
        refuse a folder that already holds a run unless resuming it, and one that cannot
        be written (before any worker starts)."""
        if not resume and (self.metrics_path.exists() or self.checkpoints.exists()):
            raise RunError(
                f"run dir {self.path} already holds a run: continue it with "
                f"--resume, or give another --out"
            )
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            (self.path / "plan.json").write_text(json.dumps(plan.to_dict(), indent=1))
            (self.path / "run.json").write_text(json.dumps(cfg.to_dict(), indent=1))
            if self.checkpoints.is_dir():
                _probe(self.checkpoints)
        except OSError as e:
            where = e.filename or self.path
            reason = e.strerror or type(e).__name__
            raise RunError(f"run dir {self.path}: cannot write {where} ({reason})") from None
        self._plan = json.loads(json.dumps(plan.to_dict()))

    def saved(self) -> tuple[Plan, dict[str, Any]]:
        """The plan and the settings of the run this folder holds (for --resume)."""
        if not (self.path / "plan.json").exists() or not (self.path / "run.json").exists():
            raise RunError(f"--resume {self.path}: not a run dir (no plan.json / run.json)")
        return (
            Plan.load(self.path / "plan.json"),
            json.loads((self.path / "run.json").read_text()),
        )

    # ---- metrics -------------------------------------------------------------------
    def metrics_before(self, iteration: int) -> list[dict]:
        """The metrics of the iterations before `iteration` (a resumed run's), the file cut
        to them and to the event records (restarts), which are kept."""
        rows = (
            [json.loads(line) for line in self.metrics_path.read_text().splitlines()]
            if self.metrics_path.exists()
            else []
        )
        kept = [r for r in rows if is_event(r) or r["iteration"] < iteration]
        self.metrics_path.write_text("".join(json.dumps(m) + "\n" for m in kept))
        return [r for r in kept if not is_event(r)]

    def append(self, row: dict) -> None:
        with self.metrics_path.open("a") as f:
            f.write(json.dumps(row) + "\n")

    def write_summary(self, summary: dict) -> None:
        (self.path / "summary.json").write_text(json.dumps(summary, indent=1))

    # ---- checkpoints ---------------------------------------------------------------
    def latest_checkpoint(self) -> Path | None:
        """The newest whole checkpoint: a `.partial` folder is a save that never finished;
        one whose files do not match its manifest is skipped, with a warning."""
        for p in reversed(self._folders()):
            damage = checkpoint_damage(p)
            if damage is None:
                return p
            self._note(f"checkpoint {p} is damaged ({damage}): skipped")
        return None

    def checkpoint_iteration(self) -> int:
        """The iteration the newest whole checkpoint resumes at (0 when there is none)."""
        ckpt = self.latest_checkpoint()
        return 0 if ckpt is None else _iteration(ckpt)

    def save_checkpoint(self, roles: Roles, iteration: int, state: dict) -> None:
        """The roles and the controller's state into iter_N.partial, its manifest last,
        then renamed iter_N; on an OSError (a full disk) the partial folder is removed and
        CheckpointWriteError raised, the whole checkpoints as they were."""
        final = self.checkpoints / f"iter_{iteration:06d}"
        tmp = final.with_name(final.name + ".partial")
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            roles.save_roles(str(tmp))
            controller = {"format": FORMAT, "iteration": iteration, "state": state}
            (tmp / CONTROLLER).write_text(json.dumps(controller))
            self._write_manifest(tmp, iteration)
            _replace(tmp, final)
        except Exception as e:
            shutil.rmtree(tmp, ignore_errors=True)
            cause = _os_error(e)
            if cause is None:
                raise
            raise CheckpointWriteError(self._write_failed(final.name, cause)) from e
        self._prune()
        log.info("checkpoint %s written", final)

    def restore(self, roles: Roles) -> tuple[int, dict]:
        """(iteration, controller state) of the newest whole checkpoint, its weights
        loaded; (0, {}) when there is no checkpoint at all."""
        ckpt = self.latest_checkpoint()
        if ckpt is None:
            damaged = [f"{p.name} ({checkpoint_damage(p)})" for p in self._folders()]
            if damaged:
                raise CheckpointError(
                    f"run dir {self.path}: no whole checkpoint to resume from: "
                    f"{', '.join(damaged)}; remove {self.checkpoints} to start over"
                )
            return 0, {}
        self._check_identity(ckpt)
        try:
            saved = json.loads((ckpt / CONTROLLER).read_text())
            iteration, state = int(saved["iteration"]), dict(saved["state"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            reason = e.strerror if isinstance(e, OSError) else f"{type(e).__name__}: {e}"
            raise CheckpointError(
                f"checkpoint {ckpt}: cannot read {CONTROLLER} ({reason})"
            ) from None
        roles.load_roles(str(ckpt))
        log.info("resumed from %s", ckpt)
        return iteration, state

    # ---- checkpoint helpers --------------------------------------------------------
    def _folders(self) -> list[Path]:
        """The checkpoint folders (named iter_ and digits), oldest first."""
        found = (p for p in self.checkpoints.glob("iter_*") if _is_checkpoint(p) and p.is_dir())
        return sorted(found, key=_iteration)

    def _note(self, message: str) -> None:
        if message not in self._noted:
            self._noted.add(message)
            log.warning("%s", message)

    def plan_identity(self) -> dict | None:
        """The run's plan as its checkpoints record it (its PLAN_KEYS): the plan start()
        wrote, else the run dir's plan.json; None when there is neither."""
        d = self._plan
        if d is None:
            try:
                d = json.loads((self.path / "plan.json").read_text())
            except (OSError, ValueError):
                return None
        return {k: d[k] for k in PLAN_KEYS if k in d} if isinstance(d, dict) else None

    def _write_manifest(self, folder: Path, iteration: int) -> None:
        files = {
            f.relative_to(folder).as_posix(): f.stat().st_size
            for f in sorted(folder.rglob("*"))
            if f.is_file()
        }
        plan = self.plan_identity()
        manifest = {
            "format": FORMAT,
            "iteration": iteration,
            "hybridflow": hybridflow.__version__,
            "plan_hash": None if plan is None else plan_hash(plan),
            "plan": plan,
            "files": files,
        }
        (folder / MANIFEST).write_text(json.dumps(manifest, indent=1))

    def _check_identity(self, ckpt: Path) -> None:
        """Refuse a checkpoint of another hybridflow version or another plan."""
        m = read_manifest(ckpt)
        if m is None:
            self._note(
                f"checkpoint {ckpt} has no {MANIFEST} (written before manifests): taken "
                f"as whole, its plan and version unchecked"
            )
            return
        version = hybridflow.__version__
        if m.get("hybridflow") != version:
            raise CheckpointError(
                f"checkpoint {ckpt.name} is of another version: written by hybridflow "
                f"{m.get('hybridflow')}, this is hybridflow {version}"
            )
        ours, theirs = self.plan_identity(), m.get("plan")
        if ours is None or not isinstance(theirs, dict) or plan_hash(ours) == m.get("plan_hash"):
            return
        diff = first_difference(theirs, ours) or f"plan hash {m.get('plan_hash')}"
        raise CheckpointError(
            f"checkpoint {ckpt.name} is of another plan: {diff} (the checkpoint's vs "
            f"{self.path / 'plan.json'})"
        )

    def _write_failed(self, name: str, e: OSError) -> str:
        last = self.latest_checkpoint()
        kept = f"the last whole checkpoint {last.name} kept" if last else "no whole checkpoint"
        reason = e.strerror or str(e) or type(e).__name__
        full = e.errno in (errno.ENOSPC, errno.EDQUOT)
        what = "disk full while writing" if full else "cannot write"
        return (
            f"{what} checkpoint {name}: {reason} ({self.checkpoints}); its partial folder "
            f"removed, {kept}; continue with: hybridflow run --resume {self.path}"
        )

    def _prune(self) -> None:
        """Only the newest KEEP whole checkpoints kept, and no folder older than them."""
        folders = self._folders()
        whole = [p for p in folders if checkpoint_damage(p) is None]
        if len(whole) <= KEEP:
            return
        oldest_kept = _iteration(whole[-KEEP])
        for p in folders:
            if _iteration(p) < oldest_kept:
                shutil.rmtree(p, ignore_errors=True)


def is_event(row: dict) -> bool:
    """A metrics.jsonl record of something that happened (a restart), not an iteration."""
    return "event" in row


def plan_hash(identity: dict) -> str:
    """A short hash of a plan's identity (its PLAN_KEYS, as JSON)."""
    text = json.dumps(identity, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def read_manifest(ckpt: Path) -> dict | None:
    """A checkpoint's manifest; None when it has none (or it cannot be read as one)."""
    try:
        m = json.loads((ckpt / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return m if isinstance(m, dict) else None


def checkpoint_damage(ckpt: Path) -> str | None:
    """What is wrong with a checkpoint folder by its manifest (None: it is whole). One
    without a manifest is whole when written before manifests (its controller.json
    without "format", or none at all and no other file)."""
    if not (ckpt / MANIFEST).exists():
        return _damage_without_manifest(ckpt)
    m = read_manifest(ckpt)
    files = None if m is None else m.get("files")
    if not isinstance(files, dict):
        return f"{MANIFEST} unreadable"
    for name, size in files.items():
        f = ckpt / name
        if not f.is_file():
            return f"{name} missing"
        actual = f.stat().st_size
        if actual != size:
            return f"{name} is {actual} bytes, {MANIFEST} says {size}"
    return None


def _damage_without_manifest(ckpt: Path) -> str | None:
    try:
        controller = json.loads((ckpt / CONTROLLER).read_text())
    except FileNotFoundError:
        return f"{CONTROLLER} missing" if any(ckpt.iterdir()) else None
    except (OSError, ValueError):
        return f"{CONTROLLER} unreadable"
    if isinstance(controller, dict) and "format" in controller:
        return f"{MANIFEST} missing"
    return None


def first_difference(a: Any, b: Any, path: str = "") -> str | None:
    """The first place two JSON values differ, as "job.global_batch 64 vs 128"."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in [*a, *(k for k in b if k not in a)]:
            sub = f"{path}.{k}" if path else str(k)
            if k not in a or k not in b:
                return f"{sub} {_short(a, k)} vs {_short(b, k)}"
            diff = first_difference(a[k], b[k], sub)
            if diff:
                return diff
        return None
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return f"{path} {len(a)} entries vs {len(b)}"
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            diff = first_difference(x, y, f"{path}[{i}]")
            if diff:
                return diff
        return None
    return None if a == b else f"{path} {_short({0: a}, 0)} vs {_short({0: b}, 0)}"


def _short(d: dict, key: Any) -> str:
    if key not in d:
        return "(absent)"
    text = json.dumps(d[key])
    return text if len(text) <= 60 else text[:57] + "..."


def _replace(tmp: Path, final: Path) -> None:
    """Rename `tmp` to `final`; a `final` already there (an iteration saved again) is
    moved aside first and removed only once `tmp` is in its place."""
    if not final.exists():
        tmp.rename(final)
        return
    old = final.with_name(final.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    final.rename(old)
    try:
        tmp.rename(final)
    except OSError:
        old.rename(final)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _os_error(e: BaseException) -> OSError | None:
    """The OSError `e` is or was raised from (a worker's, chained by its group call)."""
    seen: BaseException | None = e
    for _ in range(8):
        if seen is None or isinstance(seen, OSError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _probe(folder: Path) -> None:
    """Raise the OSError writing into `folder` gives, if any."""
    probe = folder / ".write-test"
    probe.write_text("")
    probe.unlink()


def _iteration(ckpt: Path) -> int:
    return int(ckpt.name.split("_")[1])


def _is_checkpoint(path: Path) -> bool:
    """Whether `path` is named as a whole checkpoint: iter_ and digits only."""
    return path.name.startswith("iter_") and path.name[5:].isdigit()
