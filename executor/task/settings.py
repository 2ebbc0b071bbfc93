"""Everything the task artifacts depend on (its hash names their cache entry)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

from hybridflow.errors import UserError
from hybridflow.executor.task import rules as task
from hybridflow.simulator.model import load_model

FORMAT_VERSION = 1


class ArtifactError(UserError):
    """Artifact settings that cannot be used, or a damaged cache entry."""


@dataclass(frozen=True)
class BuildSettings:
    """Everything the artifacts depend on; its hash names the cache entry."""

    model: str = "tiny"
    seed: int = 0
    task: task.TaskConfig = field(default_factory=task.TaskConfig)
    n_train: int = 4096
    n_eval: int = 256
    sft_steps: int = 300
    sft_noise: float = 0.5
    sft_lr: float = 1e-3
    batch: int = 64
    rm_steps: int = 2000
    rm_lr: float = 3e-4
    cost_steps: int = 150
    max_response_len: int = 8

    def __post_init__(self) -> None:
        for f in ("n_train", "n_eval", "batch", "max_response_len"):
            if getattr(self, f) <= 0:
                raise ArtifactError(f"{f} must be positive, got {getattr(self, f)}")
        for f in ("sft_steps", "rm_steps", "cost_steps"):
            if getattr(self, f) < 0:
                raise ArtifactError(f"{f} must be >= 0, got {getattr(self, f)}")
        if not 0 <= self.sft_noise < 1:
            raise ArtifactError(f"sft_noise must lie in [0, 1), got {self.sft_noise}")
        if self.sft_lr <= 0 or self.rm_lr <= 0:
            raise ArtifactError("learning rates must be positive")
        if self.max_response_len < self.task.max_answer_len + 1:
            raise ArtifactError(
                f"max_response_len {self.max_response_len} cannot hold the "
                f"longest answer ({self.task.max_answer_len}) and EOS"
            )

    def to_dict(self) -> dict:
        d = asdict(self)
        d["task"] = self.task.to_dict()
        d["architecture"] = load_model(self.model).to_dict()
        d["format_version"] = FORMAT_VERSION
        return d

    def key(self) -> str:
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]
