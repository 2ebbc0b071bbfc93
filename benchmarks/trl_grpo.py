"""GRPO throughput on this machine: `hybridflow run` against TRL's GRPOTrainer, same workload.

Both run the built-in task from the same cached artifacts (executor.task.artifacts's
ensure_artifacts, as benchmarks/local_rl.py uses them): the same warmed-up tiny actor, the
same prompts in the same order (the controller's seeded pass over the training prompts,
Runtime.prompts), the same number of responses per prompt, maximum response length, prompts
per iteration, mini-batches (optimizer steps per iteration), micro-batch, learning rate,
clipping and number of iterations, and the rule score (executor.task.rules.score) as the
reward. TRL runs in this process without vLLM (use_vllm=False: Hugging Face generate on the
CPU); `hybridflow run` runs as a subprocess on a plan the planner makes for D local devices
(default 4 and 1: 1 is the like-for-like single
process, one torch thread as each hybridflow rank has).

Tokens/s is the paper's definition, counted the way hybridflow's controller counts it:
prompts x responses per prompt x (prompt_len + response_len) of the job per iteration, the
planned lengths even though responses stop at EOS, over the mean iteration time with the
first iteration (a warm-up) left out. Hybridflow's iteration time is the sum of its stage
times (summary.json); TRL's is the time between the ends of the last optimizer step of two
consecutive iterations (one iteration = one generation batch = `mini_batches` optimizer
steps). The real response tokens (up to and including EOS) are printed beside it for both.
TRL's reference model: beta > 0 (default 1e-3) so that it computes the reference log-probs as
the plan's reference role does (hybridflow computes them with no KL term in the loss).
Start-up (Ray, workers, vLLM; model loading) is not in tokens/s; the wall column shows it.
On a shared machine compare rows only at a low load (each row shows the 1-minute load at its
start and end): under contention the 4-process run gets a larger share of the cores than the
single TRL process, and a 2-thread torch process slows down far more than a 1-thread one.

Run (the TRL packages once, then a few minutes on a 2-core machine):
    .venv/bin/pip install -r benchmarks/requirements-trl.txt
    .venv/bin/python benchmarks/trl_grpo.py [--iterations 8] [--devices 4 1] \
        [--trl-threads 1 2] [--prompts 16] [--old-logprobs engine recompute] \
        [--out reports/trl_grpo.md]
Each hybridflow row's summary.json breakdown (where its iteration goes) is printed below the
table.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hybridflow.executor.run.config import RunConfig  # noqa: E402
from hybridflow.plan import Plan  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

from trl_models import REWARD_FN, SIZES, actor_folder, data_file, parameters  # noqa: E402
from trl_report import render  # noqa: E402
from trl_side import RuleReward, run_trl, trl_tokenizer  # noqa: E402, F401
from trl_workload import (  # noqa: E402, F401
    TRL_MISSING,
    Workload,
    iteration_seconds,
    planned_tokens,
    throughput,
)


def make_plan(w: Workload, devices: int) -> Plan:
    """The planner's best GRPO plan for `devices` local devices (generation pp=1, as
    `hybridflow run` plans its default job)."""
    from hybridflow.planner.search import plan_job
    from hybridflow.simulator.cluster import Cluster
    from hybridflow.simulator.profile import load_profile

    cluster = Cluster.from_gpus("local-cpu", devices, devices)
    return plan_job(cluster, w.job(), load_profile("local-cpu"), max_gen_pp=1)[0]


def one_sequence_micro_batches(plan: Plan) -> Plan:
    """The plan with its trained roles' micro-batches one sequence long (what the planner
    chose for the local cluster before this round's cuts)."""
    import dataclasses

    seq = plan.job.seq_len
    sets = tuple(
        dataclasses.replace(
            s,
            memory={
                r: dataclasses.replace(s.settings(r), micro_batch_tokens=seq) for r in s.memory
            },
        )
        for s in plan.sets
    )
    return dataclasses.replace(plan, sets=sets)


def describe(plan: Plan) -> str:
    """A plan's sets with the actor's layouts: 'actor+reference:4 train tp1pp1dp4, gen tp1'."""
    parts = []
    for s in plan.sets:
        text = f"{'+'.join(s.models)}:{s.gpus}"
        if "actor" in s.models:
            train, gen = s.layout("actor"), s.generation()
            text += f" train tp{train.tp}pp{train.pp}dp{train.dp}, gen tp{gen.tp}"
        parts.append(text)
    return "; ".join(parts)


def run_hybridflow(
    plan: Plan, w: Workload, devices: int, runs: Path, extra: tuple[str, ...] = ()
) -> dict:
    """`hybridflow run` on the plan (with the `extra` flags); one table row."""
    out = runs / f"hybridflow-{devices}dev"
    plan_path = runs / f"plan-{devices}dev.json"
    plan_path.write_text(json.dumps(plan.to_dict(), indent=1))
    cmd = [
        sys.executable,
        "-m",
        "hybridflow.cli.main",
        "run",
        str(plan_path),
        "--iterations",
        str(w.iterations),
        "--out",
        str(out),
        "--devices",
        str(devices),
        "--seed",
        str(w.seed),
        *extra,
    ]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise RuntimeError(f"hybridflow run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    whole = json.loads((out / "summary.json").read_text())
    summary = whole["measured"]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    tokens = planned_tokens(plan)
    if abs(summary["tokens_per_s"] * summary["iteration_s"] - tokens) > 1e-6 * tokens:
        raise RuntimeError("the controller's token count differs from planned_tokens()")
    measured = metrics[-summary.get("timed_iterations", len(metrics) - 1) :]  # as timed
    return {
        "system": "hybridflow run",
        "setup": f"{devices} device(s): {describe(plan)}{_mode(extra)}",
        "breakdown": summary.get("breakdown", {}),
        "iterations": len(metrics),
        "seconds": summary["iteration_s"],
        "tokens_per_s": summary["tokens_per_s"],
        "response_tokens": statistics.mean(m["response_tokens"] for m in measured),
        "score": statistics.mean(m["score"] for m in measured),
        "wall": wall,
        "startup": whole.get("startup", {}).get("total_s", float("nan")),
        "per_iteration_s": [round(sum(m["stages"].values()), 3) for m in metrics],
        "stages": " / ".join(
            f"{summary['stages'][k]:.3f}" for k in ("generate", "reshard", "prepare", "train")
        ),
    }


def _mode(extra: tuple[str, ...]) -> str:
    """The row's --old-logprobs mode, as the set-up column says it."""
    if "--old-logprobs" in extra:
        return f"; old log-probs: {extra[extra.index('--old-logprobs') + 1]}"
    return ""


def prompt_texts(plan: Plan, w: Workload, art) -> list[str]:
    """The prompts of every iteration in the controller's order, as text."""
    from hybridflow.executor.rl.runtime import Runtime
    from hybridflow.executor.run.inputs import task_inputs

    inputs = task_inputs(plan, w.seed, art)
    rt = Runtime(plan, RunConfig(seed=w.seed), inputs, cluster=None)  # prompts() needs none
    ids = [p for it in range(w.iterations) for p in rt.prompt_ids(rt.prompts(it))]
    return [art.decode_prompt(p) for p in ids]


def check_prompts(art, texts: list[str], plan: Plan) -> None:
    """TRL must see the very token ids hybridflow generates from."""
    tok = trl_tokenizer(art)
    for text in set(texts):
        if tok(text)["input_ids"] != art.encode_prompt(text):
            raise RuntimeError(f"TRL's tokenizer gives other ids for prompt {text!r}")
    if max(len(art.encode_prompt(t)) for t in texts) > plan.job.prompt_len:
        raise ValueError("a prompt is longer than --prompt-len")


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _with_load(fn, *args) -> dict:
    """fn's row with the 1-minute load average at its start and end (the machine is shared)."""
    start = os.getloadavg()[0]
    row = fn(*args)
    row["load"] = f"{start:.1f} / {os.getloadavg()[0]:.1f}"
    print(json.dumps(row), flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    d = Workload()
    for f in ("prompts", "samples", "prompt_len", "mini_batches", "iterations", "seed", "trl_beta"):
        ap.add_argument("--" + f.replace("_", "-"), type=type(getattr(d, f)), default=getattr(d, f))
    ap.add_argument("--sizes", nargs="+", choices=["tiny", *SIZES], default=["tiny", *SIZES])
    ap.add_argument("--response-lens", type=int, nargs="+", default=[8, 128])
    ap.add_argument(
        "--big-prompts",
        type=int,
        default=4,
        help="prompts per iteration of the 25m and 100m actors (default 4)",
    )
    ap.add_argument("--big-iterations", type=int, default=3, help="their iterations (default 3)")
    ap.add_argument(
        "--devices",
        type=int,
        nargs="+",
        default=[4, 1],
        help="local devices of each hybridflow run (default 4 1)",
    )
    ap.add_argument(
        "--trl-threads",
        type=int,
        nargs="+",
        default=[1],
        help="torch threads of each TRL run (default 1, as each hybridflow rank)",
    )
    ap.add_argument(
        "--old-logprobs",
        nargs="+",
        choices=["engine", "recompute"],
        default=["engine"],
        help="hybridflow's behaviour log-probs, a row each (default engine, as TRL with "
        "num_iterations=1 reuses its sampling policy's; recompute is the run default)",
    )
    ap.add_argument(
        "--before",
        action="store_true",
        help="a row more for the first tiny workload: 1 device as planned before this "
        "round's cuts (one-sequence micro-batches, recomputed log-probs)",
    )
    ap.add_argument("--runs", help="folder for hybridflow's run dirs (default: a temporary one)")
    ap.add_argument("--out", help="write the table (Markdown) here, e.g. reports/trl_grpo.md")
    args = ap.parse_args(argv)
    if importlib.util.find_spec("trl") is None:
        print(TRL_MISSING, file=sys.stderr)
        return 2
    try:
        return _run(args)
    except ValueError as e:
        print(f"trl_grpo: error: {e}", file=sys.stderr)
        return 2


def _workload(args: argparse.Namespace, size: str, response_len: int, model: str) -> Workload:
    big = size != "tiny"
    return Workload(
        prompts=args.big_prompts if big else args.prompts,
        samples=args.samples,
        prompt_len=args.prompt_len,
        response_len=response_len,
        mini_batches=args.mini_batches,
        iterations=args.big_iterations if big else args.iterations,
        seed=args.seed,
        trl_beta=args.trl_beta,
        model=model,
    )


def sized_tokenizer(art, w: Workload, data: Path, plan: Plan, texts: list[str]):
    """The TRL tokenizer that gives the ids hybridflow's data path gives each prompt (the
    folder's own, or the task's with BOS)."""
    from transformers import AutoTokenizer

    from hybridflow.executor.run.config import DataConfig
    from hybridflow.executor.run.inputs import user_inputs

    cfg = DataConfig(data=str(data), answer_key="prompt", reward_fn=REWARD_FN, reward_processes=1)
    inputs = user_inputs(plan, cfg)
    inputs.close()
    rows = [json.loads(line)["prompt"] for line in data.read_text().splitlines()]
    want = dict(zip(rows, inputs.train))
    for tok in (AutoTokenizer.from_pretrained(w.model), trl_tokenizer(art)):
        if all(tok(t)["input_ids"] == list(want[t]) for t in set(texts)):
            return tok
    raise RuntimeError("no TRL tokenizer gives the prompt ids hybridflow's data path gives")


def _sized(args, art, runs: Path, size: str, length: int):
    """One workload's rows: hybridflow on each device count, then TRL."""
    model = "tiny"
    if size != "tiny":
        model = str(actor_folder(size, art, runs / "models", args.seed, args.prompt_len + length))
    w = _workload(args, size, length, model)
    plans = {d: make_plan(w, d) for d in args.devices}
    first = plans[args.devices[0]]
    tokens, texts = planned_tokens(first), prompt_texts(first, w, art)
    tok, extra = None, ()
    if size == "tiny":
        check_prompts(art, texts, first)
    else:
        data = data_file(art, runs)
        tok = sized_tokenizer(art, w, data, first, texts)
        extra = ("--data", str(data), "--answer-key", "prompt", "--reward-fn", REWARD_FN)
    rows = []
    if args.before and size == "tiny" and length == args.response_lens[0]:
        where = runs / "before"
        where.mkdir(parents=True, exist_ok=True)
        before = one_sequence_micro_batches(make_plan(w, 1))
        row = _with_load(run_hybridflow, before, w, 1, where, ("--old-logprobs", "recompute"))
        row["setup"] += (
            " [before: one-sequence micro-batches and recomputed log-probs, as planned and "
            "run before this round's cuts; the other cuts stay]"
        )
        rows.append(row)
    for d in args.devices:
        for mode in args.old_logprobs:
            where = runs / f"{size}-{length}" / mode
            where.mkdir(parents=True, exist_ok=True)
            flags = (*extra, "--old-logprobs", mode)
            rows.append(_with_load(run_hybridflow, plans[d], w, d, where, flags))
    for threads in args.trl_threads:
        rows.append(_with_load(run_trl, w, art, texts, tokens, threads, tok))
    params = parameters(model)
    return (f"{size} actor, {length}-token responses", w, rows, tokens, params)


def _run(args: argparse.Namespace) -> int:
    from hybridflow.executor.task.artifacts import ensure_artifacts
    from hybridflow.report.markdown import emit

    load = _load()
    art = ensure_artifacts("tiny", seed=args.seed)
    sections = []
    with tempfile.TemporaryDirectory() as tmp:
        runs = Path(args.runs or tmp)
        runs.mkdir(parents=True, exist_ok=True)
        for size in args.sizes:
            for length in args.response_lens:
                sections.append(_sized(args, art, runs, size, length))
                emit(render(sections, f"{load} before the runs"), args.out)  # as they come
    emit(render(sections, f"{load} before the runs, {_load()} after"), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
