"""`hybridflow plan --export verl|openrlhf`: a plan as what those frameworks take.

The key and flag names are checked against the frameworks' released code, named by version
in the output (planner/export_refdata.py says how the lists were taken).
"""

from __future__ import annotations

from hybridflow.plan import Plan
from hybridflow.planner.export_openrlhf import to_openrlhf
from hybridflow.planner.export_verl import to_verl
from hybridflow.planner.export_view import ExportError, FrameworkExport

EXPORTERS = {"verl": to_verl, "openrlhf": to_openrlhf}
FORMATS = tuple(EXPORTERS)


def export(plan: Plan | dict, fmt: str) -> FrameworkExport:
    """The structured export of a plan (or plan dict, validated as a Plan); ExportError for
    an unknown format or a plan the framework cannot express."""
    if fmt not in EXPORTERS:
        raise ExportError(f"unknown export format {fmt!r} (choose from {', '.join(FORMATS)})")
    return EXPORTERS[fmt](plan)


def export_plan(plan: Plan | dict, fmt: str) -> str:
    """The plan as a runnable shell script for ``fmt``."""
    return export(plan, fmt).render()


__all__ = ["ExportError", "FORMATS", "FrameworkExport", "export", "export_plan"]
