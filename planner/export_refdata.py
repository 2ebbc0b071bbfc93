"""Reference data for the exports: verl's config keys and OpenRLHF's argument names.

The exports must only emit keys and flags that the frameworks accept. Both lists are taken
from a released wheel (``pip download --no-deps verl==V openrlhf==V``, then unzip) and
committed as JSON beside this module, named by package version and source file:

    python -m hybridflow.planner.export_refdata verl UNZIPPED_VERL_WHEEL_DIR
    python -m hybridflow.planner.export_refdata openrlhf UNZIPPED_OPENRLHF_WHEEL_DIR

The exports and their tests read the JSON files only; nothing here is needed at run time.
"""

from __future__ import annotations

import argparse
import ast
import datetime
import functools
import hashlib
import json
import sys
from importlib import resources
from pathlib import Path

import yaml

from hybridflow.errors import UserError

HERE = Path(__file__).resolve().parent  # where `main` writes new lists (a checkout)
VERL_VERSION = "0.9.1"
OPENRLHF_VERSION = "0.11.2"
VERL_KEYS_FILE = f"verl_{VERL_VERSION}_ppo_megatron_keys.json"
OPENRLHF_ARGS_FILE = f"openrlhf_{OPENRLHF_VERSION}_train_ppo_ray_args.json"
VERL_SOURCE = "verl/trainer/config/_generated_ppo_megatron_trainer.yaml"
OPENRLHF_SOURCE = "openrlhf/cli/train_ppo_ray.py"
# megatron-core TransformerConfig fields (megatron/core/transformer/transformer_config.py)
# that verl's config does not list but hands on from a megatron section's
# override_transformer_config ("additional transformer config like:
# num_layers_in_first(/last)_pipeline_stage", verl/trainer/config/engine/megatron.yaml);
# a Hydra override appends them with "+".
MCORE_APPENDED_FIELDS = ("num_layers_in_first_pipeline_stage", "num_layers_in_last_pipeline_stage")


class RefDataError(UserError):
    """A wheel directory that does not hold the expected source file."""


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _flatten(node: object, prefix: str, out: list[str]) -> None:
    """Every dotted key of a nested mapping; a mapping's own key is listed too."""
    if not isinstance(node, dict):
        return
    for key, value in node.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        out.append(dotted)
        _flatten(value, dotted, out)


def verl_keys(wheel_dir: Path) -> dict:
    src = wheel_dir / VERL_SOURCE
    if not src.is_file():
        raise RefDataError(f"{src} not found: unzip verl's wheel into {wheel_dir}")
    version = (wheel_dir / "verl/version/version").read_text().strip()
    keys: list[str] = []
    _flatten(yaml.safe_load(src.read_text()), "", keys)
    engines = sorted(
        p.stem for p in (wheel_dir / "verl/trainer/config/model_engine").glob("*.yaml")
    )
    return {
        "package": "verl",
        "version": version,
        "source_file": VERL_SOURCE,
        "source_sha256": _sha256(src),
        "entry_point": "python3 -m verl.trainer.main_ppo",
        "group_overrides": {"model_engine": engines},
        "keys": sorted(set(keys)),
    }


def _parser_statements(tree: ast.Module) -> list[ast.stmt]:
    """The statements of the ``__main__`` block up to ``parser.parse_args()``."""
    for node in tree.body:
        if isinstance(node, ast.If) and "__main__" in ast.unparse(node.test):
            body: list[ast.stmt] = []
            for stmt in node.body:
                if "parse_args" in ast.unparse(stmt):
                    return body
                body.append(stmt)
    raise RefDataError("no `if __name__ == '__main__':` block building an argparse parser")


def _action_record(action: argparse.Action) -> dict:
    kinds = {
        argparse._StoreTrueAction: "store_true",
        argparse._StoreFalseAction: "store_false",
        argparse._StoreAction: "store",
    }
    kind = kinds.get(type(action))
    if kind is None:
        raise RefDataError(f"unsupported argparse action {type(action).__name__} for {action.dest}")
    default = action.default
    if isinstance(default, float) and default in (float("inf"), float("-inf")):
        default = str(default)
    elif isinstance(default, tuple):
        default = list(default)
    return {
        "flags": list(action.option_strings),
        "dest": action.dest,
        "action": kind,
        "type": getattr(action.type, "__name__", None),
        "nargs": action.nargs,
        "choices": list(action.choices) if action.choices else None,
        "default": default,
    }


def openrlhf_args(wheel_dir: Path) -> dict:
    matches = list(wheel_dir.glob(f"**/{OPENRLHF_SOURCE}"))
    if not matches:
        raise RefDataError(
            f"{OPENRLHF_SOURCE} not found under {wheel_dir}: unzip OpenRLHF's wheel there"
        )
    src = matches[0]
    tree = ast.parse(src.read_text())
    module = ast.Module(body=_parser_statements(tree), type_ignores=[])
    scope: dict = {"argparse": argparse, "datetime": datetime.datetime, "__name__": "refdata"}
    # Only the parser construction of the released script runs here, never its training code.
    exec(compile(module, str(src), "exec"), scope)  # noqa: S102
    parser: argparse.ArgumentParser = scope["parser"]
    actions = [a for a in parser._actions if not isinstance(a, argparse._HelpAction)]
    version = next(
        p.name.removesuffix(".dist-info").split("-")[1]
        for p in wheel_dir.glob("openrlhf-*.dist-info")
    )
    return {
        "package": "openrlhf",
        "version": version,
        "source_file": OPENRLHF_SOURCE,
        "source_sha256": _sha256(src),
        "entry_point": "python3 -m openrlhf.cli.train_ppo_ray",
        "arguments": [_action_record(a) for a in actions],
    }


def _packaged(name: str) -> str:
    """A reference list shipped as package data of hybridflow.planner."""
    return resources.files(__package__).joinpath(name).read_text()


@functools.cache
def load_verl_reference() -> dict:
    """The committed verl key list (see the module doc for how it was made)."""
    data = json.loads(_packaged(VERL_KEYS_FILE))
    data["key_set"] = frozenset(data["keys"])
    return data


def verl_accepts(key: str) -> bool:
    """Whether verl's config takes the override key: a config group, a key it lists, or
    ("+key") a megatron-core field appended under an override_transformer_config it lists."""
    ref = load_verl_reference()
    if key in ref["group_overrides"] or key in ref["key_set"]:
        return True
    if not key.startswith("+") or key[1:] in ref["key_set"]:
        return False  # Hydra refuses to append a key the config already has
    parent, _, field = key[1:].rpartition(".")
    return (
        parent.endswith(".override_transformer_config")
        and parent in ref["key_set"]
        and field in MCORE_APPENDED_FIELDS
    )


@functools.cache
def load_openrlhf_reference() -> dict:
    """The committed OpenRLHF argument list (see the module doc for how it was made)."""
    return json.loads(_packaged(OPENRLHF_ARGS_FILE))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("package", choices=["verl", "openrlhf"])
    p.add_argument("wheel_dir", type=Path)
    args = p.parse_args(argv)
    data = verl_keys(args.wheel_dir) if args.package == "verl" else openrlhf_args(args.wheel_dir)
    suffix = "ppo_megatron_keys.json" if args.package == "verl" else "train_ppo_ray_args.json"
    out = HERE / f"{data['package']}_{data['version']}_{suffix}"
    out.write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {out} ({len(data.get('keys', data.get('arguments', [])))} entries)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
