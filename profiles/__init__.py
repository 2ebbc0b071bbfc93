"""The hardware profiles shipped with HybridFlow, as package data (``hybridflow.profiles``).

Each ``<name>.yaml`` here is one device kind (format: profiles/README.md); the simulator
reads them through :func:`shipped` and :func:`names`, installed or from a checkout alike.
"""

from __future__ import annotations

from importlib import resources
from importlib.resources.abc import Traversable


def _folder() -> Traversable:
    return resources.files(__name__)


def names() -> list[str]:
    """The shipped profiles' names (file stems), sorted."""
    return sorted(p.name[:-5] for p in _folder().iterdir() if p.name.endswith(".yaml"))


def shipped(name: str) -> Traversable | None:
    """The shipped profile `name`, or None when there is none of that name."""
    path = _folder() / f"{name}.yaml"
    return path if path.is_file() else None
