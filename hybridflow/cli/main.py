"""`hybridflow` command line: parse, build the nouns, call one package, print.

Each subcommand lives in cli/<name>.py with ``configure(parser)`` and ``main(args) -> int``.
User errors (ValueError and its subclasses, missing files) become one line on stderr and
exit code 2; nothing else is caught here.
"""
from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "plan": "choose placement and parallelism for an RLHF job (auto-mapping)",
    "simulate": "predict the time and memory of a given plan",
    "sweep": "best plan at every GPU count: how many GPUs do I need?",
    "run": "execute a plan on a Ray cluster (default: plan and run on the local cluster)",
    "profile": "measure this machine and write a hardware profile",
    "report": "predicted vs measured reports and placement comparisons",
}


class UsageError(ValueError):
    """A command line that names something impossible."""


def _module(name: str):
    return importlib.import_module(f"hybridflow.cli.{name.replace('-', '_')}")


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hybridflow", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    wanted = next((a for a in argv if not a.startswith("-")), None)
    for name, help_text in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == wanted:  # import only the module that runs: torch/ray stay unloaded for plan
            _module(name).configure(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    try:
        return int(_module(args.command).main(args) or 0)
    except (ValueError, FileNotFoundError, IsADirectoryError, PermissionError) as e:
        print(f"hybridflow {args.command}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `hybridflow plan | head`
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print(f"hybridflow {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
