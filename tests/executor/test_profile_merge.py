"""`hybridflow profile --merge`: measured profiles of one machine merged number by number."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from hybridflow.cli.main import main as cli_main
from hybridflow.executor.profiler.merge import merge_profiles, merge_values
from hybridflow.executor.profiler.writer import Measurements, build_profile, write_profile
from hybridflow.simulator.profile import ProfileError, load_profile
from tests.conftest import REPO, load_benchmark
from tests.executor.test_profile_writer import INFO, measurements, tables


def _profile(tmp_path: Path, name: str, scale: float) -> Path:
    m = measurements()
    m = Measurements(
        tables(scale),
        {1: tables(scale), 2: tables(1.5 * scale)},
        m.collectives,
        m.generate,
        m.generate_model,
        m.train_layer,
        m.dispatch,
    )
    return write_profile(build_profile(name, INFO, m, 10.0 * scale), tmp_path / f"{name}.yaml")


def test_merge_takes_the_median_of_three_and_the_mean_of_two() -> None:
    rows = [[{"ranks": 2, "seconds": s}] for s in (1.0, 9.0, 2.0)]
    assert merge_values(rows) == [{"ranks": 2, "seconds": 2.0}]
    assert merge_values([{"a": 1.0, "b": "x"}, {"a": 3.0, "b": "x"}]) == {"a": 2.0, "b": "x"}


@pytest.mark.parametrize(
    "values, message",
    [
        ([[1.0, 2.0], [1.0]], "rows of profile"),
        ([{"a": 1.0}, {"b": 1.0}], "keys of profile"),
        (["cpu a", "cpu b"], "not measured alike"),
    ],
)
def test_merge_refuses_profiles_not_measured_alike(values, message) -> None:
    with pytest.raises(ProfileError, match=message):
        merge_values(values)


def test_merged_profile_loads_with_median_numbers(tmp_path: Path) -> None:
    paths = [_profile(tmp_path, f"p{i}", s) for i, s in enumerate((1.0, 4.0, 2.0))]
    out = merge_profiles(paths, tmp_path / "merged.yaml")
    prof, mid = load_profile(str(out)), load_profile(str(paths[2]))
    assert prof.name == "merged"
    assert prof.measured.matmul == mid.measured.matmul
    assert prof.peak_flops == pytest.approx(mid.peak_flops)
    raw = yaml.safe_load(out.read_text())
    assert raw["generated"]["merged"] == 3 and len(raw["generated"]["inputs"]) == 3
    assert raw["generated"]["seconds"] == pytest.approx(70.0)


def test_profile_cli_merge(tmp_path: Path, capsys) -> None:
    a, b = _profile(tmp_path, "a", 1.0), _profile(tmp_path, "b", 3.0)
    assert cli_main(["profile", "--merge", str(a), str(b), "--out", str(tmp_path / "m.yaml")]) == 0
    assert load_profile(str(tmp_path / "m.yaml")).measured.matmul[0][3] == pytest.approx(8e-5)


@pytest.mark.parametrize(
    "which, message",
    [
        ("missing", "does not exist"),
        ("estimate", "not measured by `hybridflow profile`"),
        ("one", "at least two"),
        ("no-out", "--merge needs --out"),
    ],
)
def test_profile_cli_merge_bad_input(tmp_path: Path, capsys, which, message) -> None:
    a = _profile(tmp_path, "a", 1.0)
    other = {
        "missing": [str(tmp_path / "nope.yaml")],
        "one": [],
        "estimate": [str(REPO / "profiles" / "a100-80gb.yaml")],
        "no-out": [str(a)],
    }[which]
    out = [] if which == "no-out" else ["--out", str(tmp_path / "m.yaml")]
    assert cli_main(["profile", "--merge", str(a), *other, *out]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_fidelity_predicts_from_the_merge_of_the_profiles_between_passes(tmp_path) -> None:
    from argparse import Namespace

    load_benchmark("fidelity")
    from fidelity import predicting_profile

    paths = [str(_profile(tmp_path, f"p{i}", s)) for i, s in enumerate((2.0, 1.0, 5.0))]
    args = Namespace(measuring=True, profiles=paths, profile="measure")
    merged = load_profile(predicting_profile(tmp_path, args))
    assert merged.measured.matmul == load_profile(paths[0]).measured.matmul
    assert (
        predicting_profile(
            tmp_path, Namespace(measuring=True, profiles=paths[1:2], profile="measure")
        )
        == paths[1]
    )
    assert (
        predicting_profile(tmp_path, Namespace(measuring=False, profiles=[], profile="local-cpu"))
        == "local-cpu"
    )
