"""The job flags `hybridflow plan` and `hybridflow sweep` share, and the Job they describe.

``add_job_arguments(parser)`` adds them; ``build_job(args)`` makes the Job, from a --job file
(the plan JSON's job object) when one is given, else from the flags.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, overload

import yaml

from hybridflow import vocab
from hybridflow.errors import UserError, unreadable
from hybridflow.simulator.job import RULE_CPU_S, RULE_CPU_S_MAX, Job, JobError
from hybridflow.vocab import ALGORITHMS, RULE, RULE_ROLES

JOB_DEFAULTS: dict[str, Any] = dict(
    model="llama-2-7b",
    algorithm="ppo",
    prompt_len=1024,
    response_len=1024,
    batch=256,
    ppo_epochs=1,
    mini_batches=4,
)
ROLE_FLAGS = ("critic", "reference", "reward", "cost")


class InputFileError(UserError):
    """A --cluster or --job file that cannot be read."""


def read_mapping(path: str, what: str) -> dict:
    """The mapping in a JSON or YAML file; InputFileError naming the file otherwise."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise InputFileError(f"{what} file {path!r} does not exist") from None
    except IsADirectoryError:
        raise InputFileError(f"{what} file {path!r} is a directory") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise InputFileError(
            f"{what} file {path!r} is not valid JSON or YAML: {' '.join(str(e).split())}"
        ) from None
    except OSError as e:
        raise unreadable(f"{what} file", path, e) from None
    if not isinstance(data, dict):
        raise InputFileError(f"{what} file {path!r} must hold a mapping, got {type(data).__name__}")
    return data


def add_job_arguments(
    p: argparse.ArgumentParser, model_default: str | None = JOB_DEFAULTS["model"]
) -> None:
    """The job flags; with model_default None, --model is required unless --job is given."""
    d = JOB_DEFAULTS
    model_help = "model of every role: catalog name, config.json or a checkpoint folder" + (
        "" if model_default else "; required unless --job names the models"
    )
    p.add_argument("--model", default=model_default, help=model_help)
    for role in ROLE_FLAGS:
        rule = f", or '{RULE}': a function on the CPU, no GPUs" if role in RULE_ROLES else ""
        p.add_argument(f"--{role}", help=f"model of the {role} (default: --model{rule})")
    p.add_argument("--algorithm", default=d["algorithm"], choices=list(ALGORITHMS))
    p.add_argument(
        "--prompt-len",
        type=int,
        default=d["prompt_len"],
        help="prompt length; the maximum when --prompt-mean is given",
    )
    p.add_argument(
        "--prompt-mean",
        type=float,
        default=0.0,
        help="mean prompt length (default: every prompt is --prompt-len long)",
    )
    p.add_argument(
        "--response-len",
        type=int,
        default=d["response_len"],
        help="response length; the maximum when --response-mean is given",
    )
    p.add_argument(
        "--response-mean",
        type=float,
        default=0.0,
        help="mean response length (default: every response is --response-len long)",
    )
    p.add_argument(
        "--rule-cpu-s",
        type=float,
        default=RULE_CPU_S,
        help=f"CPU seconds per response of a rule reward/cost (default {RULE_CPU_S})",
    )
    p.add_argument("--batch", type=int, default=d["batch"], help="global batch (prompts)")
    p.add_argument("--n-samples", type=int, help="responses per prompt (grpo; default 4)")
    p.add_argument("--ppo-epochs", type=int, default=d["ppo_epochs"])
    p.add_argument("--mini-batches", type=int, default=d["mini_batches"])
    p.add_argument(
        "--job",
        metavar="FILE",
        help="job file, the plan JSON's job object (JSON/YAML); replaces the job flags",
    )


def build_job(args: argparse.Namespace) -> Job:
    """The Job of the --job file, or of the flags; a ValueError naming what is wrong."""
    if args.job:
        try:
            return Job.from_dict(read_mapping(args.job, "job"))
        except InputFileError:
            raise
        except ValueError as e:
            e.args = (f"{args.job}: {e}",)
            raise
    if not args.model:
        raise JobError("give --model (or a --job file)")
    if args.rule_cpu_s > RULE_CPU_S_MAX:
        raise JobError(
            f"--rule-cpu-s must be at most {RULE_CPU_S_MAX:g} s per response "
            f"(a rule is a function on the CPU), got {args.rule_cpu_s!r}"
        )
    roles = {r: _folder(getattr(args, r)) for r in ROLE_FLAGS}
    algo = vocab.algorithm(args.algorithm, JobError)
    if roles["critic"] and "critic" not in algo.roles:
        raise JobError(f"--critic: {args.algorithm} has no critic")
    if roles["cost"] and "cost" not in algo.roles:
        with_cost = " and ".join(a.name for a in ALGORITHMS.values() if "cost" in a.roles)
        raise JobError(f"--cost: only {with_cost} has a cost model")
    return Job.create(
        args.algorithm,
        _folder(args.model),
        args.prompt_len,
        args.response_len,
        args.batch,
        args.ppo_epochs,
        args.mini_batches,
        args.n_samples,
        response_mean=args.response_mean,
        rule_cpu_s=args.rule_cpu_s,
        prompt_mean=args.prompt_mean,
        **roles,
    )


@overload
def _folder(model: str) -> str: ...
@overload
def _folder(model: None) -> None: ...
def _folder(model: str | None) -> str | None:
    """A checkpoint folder as an absolute path (the plan names it; workers read it from
    wherever they start); catalog names and config.json files as given."""
    if model and Path(model).is_dir():
        return str(Path(model).resolve())
    return model
