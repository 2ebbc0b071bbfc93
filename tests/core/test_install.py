"""A plain, non-editable `pip install .` into a fresh venv runs `hybridflow plan` and
`hybridflow simulate` from outside the checkout: profiles and the exporters' reference
lists come from package data, nothing from the repository."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.process


def _run(*cmd: str | Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run(
        [str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The bin folder of a fresh venv with hybridflow installed from the checkout. Its
    dependencies are the project venv's (a .pth file), so nothing is downloaded; its own
    setuptools gives way to the project's, which builds the wheel."""
    venv = tmp_path_factory.mktemp("fresh") / "venv"
    subprocess.run([sys._base_executable, "-m", "venv", str(venv)], check=True)
    pure = subprocess.run(
        [
            venv / "bin" / "python",
            "-c",
            "import sysconfig; print(sysconfig.get_paths()['purelib'])",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    (Path(pure) / "project_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    done = _run(venv / "bin" / "pip", "uninstall", "-q", "-y", "setuptools", cwd=venv)
    assert done.returncode == 0, done.stderr
    done = _run(
        venv / "bin" / "pip", "install", "-q", "--no-deps", "--no-build-isolation", REPO, cwd=venv
    )
    assert done.returncode == 0, done.stderr
    return venv / "bin"


def test_the_installed_package_is_not_the_checkout(installed: Path, tmp_path: Path) -> None:
    where = _run(
        installed / "python",
        "-c",
        "import hybridflow.planner.search as m, "
        "hybridflow.profiles as p; print(m.__file__); print(p.names())",
        cwd=tmp_path,
    )
    assert where.returncode == 0, where.stderr
    module, names = where.stdout.splitlines()
    assert str(installed.parent) in module and str(REPO) not in module
    assert {"a100-80gb", "h100-80gb", "local-cpu"} <= set(ast.literal_eval(names))


def test_plan_and_simulate_from_another_folder(installed: Path, tmp_path: Path) -> None:
    plan = _run(
        installed / "hybridflow",
        "plan",
        "--gpu",
        "h100-80gb",
        "--gpus",
        "16",
        "--model",
        "llama-3.1-8b",
        "--algorithm",
        "grpo",
        "--reward",
        "rule",
        "--out",
        "plan.json",
        cwd=tmp_path,
    )
    assert plan.returncode == 0, plan.stderr
    assert "Best plan" in plan.stdout and (tmp_path / "plan.json").exists()
    sim = _run(installed / "hybridflow", "simulate", "plan.json", "--json", cwd=tmp_path)
    assert sim.returncode == 0, sim.stderr
    predicted = json.loads(sim.stdout)["predicted"]
    saved = json.loads((tmp_path / "plan.json").read_text())["predicted"]
    assert predicted["iteration_s"] == pytest.approx(saved["iteration_s"])
    export = _run(installed / "hybridflow", "plan", "--export", "verl", cwd=tmp_path)
    assert export.returncode == 0 and "verl 0.9.1" in export.stdout, export.stderr
    bad = _run(installed / "hybridflow", "plan", "--gpu", "tpu-v9", cwd=tmp_path)
    assert bad.returncode == 2 and "unknown GPU kind" in bad.stderr
