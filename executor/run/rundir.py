"""A run directory: what `hybridflow run` writes, and what `--resume` continues from.

    plan.json      the plan (hybridflow.plan)           run.json      the run's settings
    metrics.jsonl  one JSON object per iteration, and one per restart ("event": "restart")
    summary.json   measured and predicted
    checkpoints/iter_N/  every role's weights and optimizer state per rank, controller.json

A checkpoint is written into a temporary folder and renamed into place, so a run that dies
while saving leaves the previous checkpoint whole; the newest two are kept.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any, Protocol

from hybridflow.errors import UserError
from hybridflow.executor.run.config import RunConfig
from hybridflow.plan import Plan

log = logging.getLogger(__name__)
KEEP = 2  # checkpoints kept


class RunError(UserError):
    """A run that cannot start: a bad plan, run dir or setting."""


class Roles(Protocol):
    """What checkpoints need of the runtime: save and load every role, on all its ranks."""

    def save_roles(self, folder: str) -> None: ...

    def load_roles(self, folder: str) -> None: ...


class RunDir:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    # ---- set-up --------------------------------------------------------------------
    def start(self, plan: Plan, cfg: RunConfig, resume: bool) -> None:
        """Write plan.json and run.json (again, when resuming: the settings may change);
        refuse a folder that already holds a run unless resuming it."""
        if not resume and (self.metrics_path.exists() or self.checkpoints.exists()):
            raise RunError(
                f"run dir {self.path} already holds a run: continue it with "
                f"--resume, or give another --out"
            )
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            (self.path / "plan.json").write_text(json.dumps(plan.to_dict(), indent=1))
            (self.path / "run.json").write_text(json.dumps(cfg.to_dict(), indent=1))
        except OSError as e:
            raise RunError(f"run dir {self.path}: cannot write it ({e.strerror})") from None

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
        """The newest whole checkpoint (a `.partial` folder is a save that never finished)."""
        done = sorted(
            (p for p in self.checkpoints.glob("iter_*") if p.is_dir() and _is_checkpoint(p)),
            key=lambda p: int(p.name.split("_")[1]),
        )
        return done[-1] if done else None

    def checkpoint_iteration(self) -> int:
        """The iteration the newest whole checkpoint resumes at (0 when there is none)."""
        ckpt = self.latest_checkpoint()
        return 0 if ckpt is None else int(ckpt.name.split("_")[1])

    def save_checkpoint(self, roles: Roles, iteration: int, state: dict) -> None:
        final = self.checkpoints / f"iter_{iteration:06d}"
        tmp = final.with_name(final.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        if final.exists():  # a resumed run saving an iteration again
            shutil.rmtree(final)
        roles.save_roles(str(tmp))
        (tmp / "controller.json").write_text(json.dumps({"iteration": iteration, "state": state}))
        tmp.rename(final)
        for old in sorted(p for p in self.checkpoints.glob("iter_*") if _is_checkpoint(p))[:-KEEP]:
            if old.is_dir():
                shutil.rmtree(old, ignore_errors=True)
        log.info("checkpoint %s written", final)

    def restore(self, roles: Roles) -> tuple[int, dict]:
        """(iteration, controller state) of the newest checkpoint, its weights loaded;
        (0, {}) when there is none."""
        ckpt = self.latest_checkpoint()
        if ckpt is None:
            return 0, {}
        roles.load_roles(str(ckpt))
        saved = json.loads((ckpt / "controller.json").read_text())
        log.info("resumed from %s", ckpt)
        return saved["iteration"], saved["state"]


def is_event(row: dict) -> bool:
    """A metrics.jsonl record of something that happened (a restart), not an iteration."""
    return "event" in row


def _is_checkpoint(path: Path) -> bool:
    """Whether `path` is named as a whole checkpoint: iter_ and digits only."""
    return path.name.startswith("iter_") and path.name[5:].isdigit()
