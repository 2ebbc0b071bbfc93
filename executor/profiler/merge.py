"""`hybridflow profile --merge`: one profile from several of one machine, taken at other times.

On a VM whose speed moves in phases of minutes, a profile measured in one stretch of a few
minutes sees one phase; profiles taken between the runs they predict see the mix the runs
see. Each measured number of the merged profile is the median of the inputs' (their mean
with two); rows, keys and texts must agree (one machine, one grid, one set of options).
"""

from __future__ import annotations

from pathlib import Path

import yaml

from hybridflow.executor.profiler.calls_tables import pool
from hybridflow.executor.profiler.writer import write_profile
from hybridflow.simulator.profile import ProfileError, load_profile


def _number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def merge_values(values: list, where: str = "profile") -> object:
    """The inputs' values at one place of their trees, merged: numbers pooled
    (calls_tables.pool), dicts key by key, lists item by item; equal values kept.
    ProfileError where they differ in shape or text (not measured alike)."""
    first = values[0]
    if all(v == first for v in values[1:]):
        return first
    if all(_number(v) for v in values):
        return pool([float(v) for v in values])
    if all(isinstance(v, dict) for v in values):
        if any(list(v) != list(first) for v in values):
            raise ProfileError(
                f"the profiles differ in the keys of {where}: measured with "
                f"other options or grids, they cannot be merged"
            )
        return {k: merge_values([v[k] for v in values], f"{where}.{k}") for k in first}
    if all(isinstance(v, list) for v in values):
        if any(len(v) != len(first) for v in values):
            raise ProfileError(
                f"the profiles differ in the rows of {where} "
                f"({', '.join(str(len(v)) for v in values)}): measured with "
                f"other grids, they cannot be merged"
            )
        return [merge_values([v[i] for v in values], f"{where}[{i}]") for i in range(len(first))]
    raise ProfileError(
        f"the profiles differ at {where} ({first!r} against "
        f"{next(v for v in values if v != first)!r}): not measured alike"
    )


def _read(path: Path) -> dict:
    if not path.is_file():
        raise ProfileError(f"profile {str(path)!r} does not exist")
    load_profile(str(path))  # names the problem of a missing or malformed file
    data = yaml.safe_load(path.read_text())
    if "generated" not in data or data["generated"].get("by") != "hybridflow profile":
        raise ProfileError(
            f"profile {str(path)!r} was not measured by `hybridflow profile` "
            f"(no generated.by): only measured profiles can be merged"
        )
    return data


def merge_profiles(paths: list[Path], out: Path) -> Path:
    """Write the merge of the measured profiles at `paths` (at least two) to `out`."""
    if len(paths) < 2:
        raise ProfileError("--merge needs at least two profiles")
    out = Path(out)
    if out.suffix not in (".yaml", ".yml"):
        raise ProfileError(f"--out must be a .yaml path, got {str(out)!r}")
    data = [_read(Path(p)) for p in paths]
    gens = [d.pop("generated") for d in data]
    for d in data:
        d.pop("name", None)
    top = merge_values(data)
    assert isinstance(top, dict)  # the merge of dicts (the profiles' top levels)
    merged = {"name": out.stem, **top}
    merged["generated"] = {
        "by": "hybridflow profile",
        "merged": len(paths),
        "seconds": round(sum(g.get("seconds", 0.0) for g in gens), 1),
        "at": max(str(g.get("at", "")) for g in gens),
        "device": merge_values([g.get("device") for g in gens], "generated.device"),
        "backend": merge_values([g.get("backend") for g in gens], "generated.backend"),
        "inputs": [{k: g[k] for k in ("at", "seconds", "load_average") if k in g} for g in gens],
    }
    draft = out.with_name(f".{out.stem}.draft{out.suffix}")
    write_profile(merged, draft)
    try:
        load_profile(str(draft))
    except ValueError:
        draft.unlink()
        raise
    return draft.replace(out)
