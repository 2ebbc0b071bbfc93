"""The installed names map the top-level folders: every package folder is in the wheel."""

from __future__ import annotations

import tomllib

from tests.conftest import REPO


def _config() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]


def _folder(package: str, package_dir: dict[str, str]) -> str:
    """Where setuptools takes `package` from: the longest mapped prefix, then the rest."""
    best = max((p for p in package_dir if package == p or package.startswith(p + ".")), key=len)
    return "/".join([package_dir[best], *package[len(best) :].split(".")[1:]])


def test_every_package_folder_is_listed() -> None:
    cfg = _config()
    listed = {_folder(p, cfg["package-dir"]) for p in cfg["packages"]}
    found = {
        str(f.parent.relative_to(REPO))
        for top in ("hybridflow", "simulator", "planner", "executor", "profiles")
        for f in (REPO / top).rglob("__init__.py")
    }
    assert listed == found


def test_data_files_are_package_data() -> None:
    data = _config()["package-data"]
    assert data["hybridflow.profiles"] == ["*.yaml"] and data["hybridflow.planner"] == ["*.json"]
    assert list((REPO / "profiles").glob("*.yaml")) and list((REPO / "planner").glob("*.json"))
