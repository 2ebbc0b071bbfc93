"""`hybridflow` command line: parse, build the nouns, call one package, print.

Each subcommand lives in hybridflow/cli/<name>.py with ``configure(parser)`` and
``main(args) -> int``. Bad input (hybridflow.errors.UserError) becomes one line on stderr
and exit code 2, a run that stopped (RunStopped) one line and exit code 1; anything else is
a bug and keeps its traceback. ``--log-level debug`` also logs the traceback of the first two.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import math
import sys
from types import ModuleType

from hybridflow.errors import RunStopped, UserError

COMMANDS = {
    "plan": "choose placement and parallelism for an RLHF job (auto-mapping)",
    "simulate": "predict the time and memory of a given plan",
    "sweep": "best plan at every GPU count: how many GPUs do I need?",
    "run": "execute a plan on a Ray cluster (default: plan and run on the local cluster)",
    "profile": "measure this machine and write a hardware profile",
    "report": "predicted vs measured reports and placement comparisons",
}
LOG_LEVELS = ("debug", "info", "warning", "error")
log = logging.getLogger("hybridflow")


class UsageError(UserError):
    """A command line that names something impossible."""


def _module(name: str) -> ModuleType:
    return importlib.import_module(f"hybridflow.cli.{name.replace('-', '_')}")


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hybridflow", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--log-level",
        choices=LOG_LEVELS,
        default="warning",
        help="what the library logs to stderr (default warning)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    wanted = next((a for a in argv if a in COMMANDS), None)
    for name, help_text in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == wanted:  # import only the module that runs: torch/ray stay unloaded for plan
            _module(name).configure(p)
    return parser


NAME_MAX = 255  # bytes of one file name (every common file system)


def check_values(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """What no flag or argument of any command takes: an empty value (read as "not given"
    otherwise), a name longer than a file name can be (each is a path or a name) or a
    number that is not finite (NaN, inf)."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for action in sub.choices[args.command]._actions:
        name = (action.option_strings or [action.metavar or action.dest])[-1]
        value = getattr(args, action.dest, None)
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, str) and not v.strip():
                raise UsageError(f"{name} is empty: give {name} a value")
            if isinstance(v, str) and any(
                len(part.encode()) > NAME_MAX for part in v.replace(",", "/").split("/")
            ):
                raise UsageError(
                    f"{name}: a name longer than {NAME_MAX} bytes (no file or model is named "
                    f"so), got {v[:40]}..."
                )
            if isinstance(v, float) and not math.isfinite(v):
                raise UsageError(f"{name} must be a finite number, got {v}")


def _logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    )
    log.addHandler(handler)
    log.setLevel(level.upper())


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    _logging(args.log_level)
    try:
        check_values(parser, args)
        return int(_module(args.command).main(args) or 0)
    except UserError as e:
        log.debug("bad input", exc_info=True)
        print(f"hybridflow {args.command}: error: {e}", file=sys.stderr)
        return 2
    except RunStopped as e:
        log.debug("run stopped", exc_info=True)
        print(f"hybridflow {args.command}: stopped: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # e.g. `hybridflow plan | head`
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print(f"hybridflow {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        logging.getLogger("hybridflow").handlers.clear()


if __name__ == "__main__":
    sys.exit(main())
