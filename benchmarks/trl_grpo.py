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
        [--trl-threads 1 2] [--prompts 16] [--out reports/trl_grpo.md]
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
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from hybridflow.executor.run.config import RunConfig  # noqa: E402
from hybridflow.plan import Plan  # noqa: E402

TRL_MISSING = (
    "trl_grpo: TRL is not installed in this environment; install the benchmark's "
    "extra packages with: .venv/bin/pip install -r benchmarks/requirements-trl.txt"
)


@dataclass(frozen=True)
class Workload:
    prompts: int = 16  # prompts per iteration (the job's global batch)
    samples: int = 4  # responses per prompt
    prompt_len: int = 16
    response_len: int = 8
    mini_batches: int = 2  # optimizer steps per iteration
    iterations: int = 8
    seed: int = 0
    trl_beta: float = 1e-3

    def __post_init__(self) -> None:
        if (
            min(self.prompts, self.prompt_len, self.response_len, self.mini_batches) < 1
            or self.iterations < 2
            or self.samples < 2
        ):
            raise ValueError(
                "need prompts, lengths, mini-batches >= 1, samples >= 2 and "
                "iterations >= 2 (the first is a warm-up)"
            )
        if (self.prompts * self.samples) % self.mini_batches:
            raise ValueError("mini_batches must divide prompts x samples")

    def job(self):
        from hybridflow.simulator.job import Job

        return Job.create(
            algorithm="grpo",
            model="tiny",
            prompt_len=self.prompt_len,
            response_len=self.response_len,
            global_batch=self.prompts,
            n_samples=self.samples,
            mini_batches=self.mini_batches,
            reward="rule",
        )


def planned_tokens(plan: Plan) -> int:
    """Tokens of one iteration as the controller counts them (its tokens/s numerator)."""
    return plan.job.sequences * plan.job.seq_len


def iteration_seconds(t0: float, step_ends: list[float], steps_per_iteration: int) -> list[float]:
    """Seconds of each whole iteration from the start time and every optimizer step's end."""
    if steps_per_iteration < 1:
        raise ValueError("steps_per_iteration must be >= 1")
    bounds = [t0] + step_ends[steps_per_iteration - 1 :: steps_per_iteration]
    return [b - a for a, b in zip(bounds, bounds[1:])]


def throughput(tokens: int, seconds: list[float]) -> tuple[float, float]:
    """(mean seconds per iteration, tokens/s) with the first iteration (warm-up) left out."""
    rows = seconds[1:] if len(seconds) > 1 else seconds
    mean = statistics.mean(rows)
    return mean, tokens / mean


def make_plan(w: Workload, devices: int) -> Plan:
    """The planner's best GRPO plan for `devices` local devices (generation pp=1, as
    `hybridflow run` plans its default job)."""
    from hybridflow.planner.search import plan_job
    from hybridflow.simulator.cluster import Cluster
    from hybridflow.simulator.profile import load_profile

    cluster = Cluster.from_gpus("local-cpu", devices, devices)
    return plan_job(cluster, w.job(), load_profile("local-cpu"), max_gen_pp=1)[0]


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


def run_hybridflow(plan: Plan, w: Workload, devices: int, runs: Path) -> dict:
    """`hybridflow run` on the plan; one table row."""
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
    ]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise RuntimeError(f"hybridflow run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())["measured"]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    tokens = planned_tokens(plan)
    if abs(summary["tokens_per_s"] * summary["iteration_s"] - tokens) > 1e-6 * tokens:
        raise RuntimeError("the controller's token count differs from planned_tokens()")
    measured = metrics[-summary.get("timed_iterations", len(metrics) - 1) :]  # as timed
    return {
        "system": "hybridflow run",
        "setup": f"{devices} device(s): {describe(plan)}",
        "iterations": len(metrics),
        "seconds": summary["iteration_s"],
        "tokens_per_s": summary["tokens_per_s"],
        "response_tokens": statistics.mean(m["response_tokens"] for m in measured),
        "score": statistics.mean(m["score"] for m in measured),
        "wall": wall,
        "per_iteration_s": [round(sum(m["stages"].values()), 3) for m in metrics],
        "stages": " / ".join(
            f"{summary['stages'][k]:.3f}" for k in ("generate", "reshard", "prepare", "train")
        ),
    }


def prompt_texts(plan: Plan, w: Workload, art) -> list[str]:
    """The prompts of every iteration in the controller's order, as text."""
    from hybridflow.executor.rl.runtime import Runtime

    rt = Runtime(plan, RunConfig(seed=w.seed), art, cluster=None)  # prompts() needs no cluster
    ids = [p for it in range(w.iterations) for p in rt.prompts(it)]
    return [art.decode_prompt(p) for p in ids]


def trl_tokenizer(art):
    """The actor's tokenizer for TRL, which tokenizes prompt text itself: BOS + the text's
    tokens, the layout of every prompt in the artifacts (Artifacts.encode_prompt)."""
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(art.actor_dir))
    tok.backend_tokenizer.post_processor = TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", art.special.bos)]
    )
    return tok


class RuleReward:
    """TRL reward function: the task's rule score; records each generation batch's mean score
    and response tokens (TRL's completion ids run up to and including EOS)."""

    def __init__(self, art) -> None:
        self.art, self.batches = art, []
        self.__name__ = "rule_score"  # TRL names reward columns after the function

    def __call__(
        self,
        prompts: list[str],
        completions: list[str],
        completion_ids: list[list[int]],
        **_: object,
    ) -> list[float]:
        from hybridflow.executor.task import rules as task

        scores = [task.score(p, self.art.decode(ids)) for p, ids in zip(prompts, completion_ids)]
        self.batches.append(
            {
                "score": statistics.mean(scores),
                "response_tokens": sum(len(ids) for ids in completion_ids),
            }
        )
        return scores


def trl_config(w: Workload, out_dir: str):
    """GRPOConfig for the workload: one generation batch of prompts x samples per iteration,
    `mini_batches` optimizer steps on it, hybridflow's micro-batch and optimizer settings."""
    from trl import GRPOConfig

    cfg = RunConfig()
    per_step = w.prompts * w.samples // w.mini_batches
    micro = cfg.micro_batch_size if per_step % cfg.micro_batch_size == 0 else per_step
    accum = per_step // micro
    return GRPOConfig(
        output_dir=out_dir,
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        report_to="none",
        save_strategy="no",
        logging_steps=10**6,
        disable_tqdm=True,
        seed=w.seed,
        data_seed=w.seed,
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=accum,
        steps_per_generation=accum * w.mini_batches,
        num_iterations=1,
        max_steps=w.iterations * w.mini_batches,
        num_generations=w.samples,
        max_completion_length=w.response_len,
        shuffle_dataset=False,
        use_vllm=False,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        top_k=0,
        learning_rate=cfg.actor_lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=cfg.clip_grad,
        epsilon=0.2,
        beta=w.trl_beta,
        loss_type="bnpo",
        scale_rewards="group",
        log_completions=False,
    )


def run_trl(w: Workload, art, texts: list[str], tokens: int, threads: int) -> dict:
    """TRL's GRPOTrainer on the workload in this process; one table row."""
    import torch
    from datasets import Dataset
    from transformers import LlamaForCausalLM, TrainerCallback
    from trl import GRPOTrainer

    class StepClock(TrainerCallback):
        t0, ends = 0.0, []

        def on_train_begin(self, *args, **kw):
            self.t0, self.ends = time.perf_counter(), []

        def on_step_end(self, *args, **kw):
            self.ends.append(time.perf_counter())

    torch.set_num_threads(threads)
    wall0 = time.perf_counter()
    torch.manual_seed(w.seed)
    model = LlamaForCausalLM.from_pretrained(str(art.actor_dir)).float()
    reward, clock = RuleReward(art), StepClock()
    with tempfile.TemporaryDirectory() as out_dir:
        trainer = GRPOTrainer(
            model=model,
            reward_funcs=reward,
            args=trl_config(w, out_dir),
            train_dataset=Dataset.from_dict({"prompt": texts}),
            processing_class=trl_tokenizer(art),
            callbacks=[clock],
        )
        trainer.train()
    seconds = iteration_seconds(clock.t0, clock.ends, w.mini_batches)
    if len(seconds) != w.iterations or len(reward.batches) != w.iterations:
        raise RuntimeError(
            f"TRL ran {len(seconds)} iterations and {len(reward.batches)} "
            f"generation batches, expected {w.iterations}"
        )
    mean, tok_s = throughput(tokens, seconds)
    return {
        "system": "TRL GRPOTrainer",
        "iterations": len(seconds),
        "setup": f"1 process, {threads} torch thread{'s' if threads > 1 else ''}, "
        f"HF generate (no vLLM)",
        "seconds": mean,
        "tokens_per_s": tok_s,
        "response_tokens": statistics.mean(b["response_tokens"] for b in reward.batches[1:]),
        "score": statistics.mean(b["score"] for b in reward.batches[1:]),
        "stages": "–",
        "wall": time.perf_counter() - wall0,
        "per_iteration_s": [round(x, 3) for x in seconds],
    }


def check_prompts(art, texts: list[str], plan: Plan) -> None:
    """TRL must see the very token ids hybridflow generates from."""
    tok = trl_tokenizer(art)
    for text in set(texts):
        if tok(text)["input_ids"] != art.encode_prompt(text):
            raise RuntimeError(f"TRL's tokenizer gives other ids for prompt {text!r}")
    if max(len(art.encode_prompt(t)) for t in texts) > plan.job.prompt_len:
        raise ValueError("a prompt is longer than --prompt-len")


def render(rows: list[dict], w: Workload, tokens: int, load: str) -> str:
    from hybridflow.report.markdown import table

    trl = [r for r in rows if r["system"].startswith("TRL")]
    header = [
        "system",
        "plan / set-up",
        "iterations",
        "s / iteration",
        "each iteration s",
        "generate / reshard / prepare / train s",
        "tokens/s",
        "response tokens / iteration",
        "rule score",
        "wall s (with start-up)",
        "load start / end",
    ]
    header += [f"ratio to TRL ({r['setup'].split(', ')[1]})" for r in trl]
    body = [
        [
            r["system"],
            r["setup"],
            r["iterations"],
            r["seconds"],
            " ".join(f"{x:.2f}" for x in r["per_iteration_s"]),
            r["stages"],
            round(r["tokens_per_s"], 1),
            round(r["response_tokens"], 1),
            r["score"],
            round(r["wall"], 1),
            r["load"],
        ]
        + [f"{r['tokens_per_s'] / t['tokens_per_s']:.2f}x" for t in trl]
        for r in rows
    ]
    return "\n".join(
        [
            "# GRPO throughput: `hybridflow run` against TRL's GRPOTrainer",
            "",
            f"Workload: tiny actor, GRPO with the rule reward; {w.prompts} prompts x {w.samples} "
            f"responses per iteration, prompt_len {w.prompt_len}, response_len {w.response_len} "
            f"(responses stop at EOS), {w.mini_batches} optimizer steps per iteration, "
            f"{w.iterations} iterations (the first, a warm-up, is left out of s / iteration); "
            f"{tokens} tokens per iteration as the controller counts them (prompts x responses x "
            f"(prompt_len + response_len)), tokens/s = that over s / iteration for every row.",
            f"Machine: {os.cpu_count()} CPU cores, no GPU, shared; load average (1, 5, 15 min) "
            f"{load}.",
            "",
            table(header, body),
            "",
            "Each iteration's seconds are listed to show the noise of the shared machine "
            "(the first, a warm-up, is not in s / iteration). "
            "Stage seconds are hybridflow's means from summary.json (their sum is s / iteration); "
            "TRL's step is not split. Response tokens are the real ones (up to and including EOS), "
            "mean per iteration; the rule score is the batch mean over the measured iterations. "
            "Written by benchmarks/trl_grpo.py.",
            "",
        ]
    )


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
    for f in (
        "prompts",
        "samples",
        "prompt_len",
        "response_len",
        "mini_batches",
        "iterations",
        "seed",
        "trl_beta",
    ):
        ap.add_argument("--" + f.replace("_", "-"), type=type(getattr(d, f)), default=getattr(d, f))
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
    ap.add_argument("--runs", help="folder for hybridflow's run dirs (default: a temporary one)")
    ap.add_argument("--out", help="write the table (Markdown) here, e.g. reports/trl_grpo.md")
    args = ap.parse_args(argv)
    if importlib.util.find_spec("trl") is None:
        print(TRL_MISSING, file=sys.stderr)
        return 2
    try:
        w = Workload(**{f: getattr(args, f) for f in Workload.__dataclass_fields__})
        return _run(w, args)
    except ValueError as e:
        print(f"trl_grpo: error: {e}", file=sys.stderr)
        return 2


def _run(w: Workload, args: argparse.Namespace) -> int:
    from hybridflow.executor.task.artifacts import ensure_artifacts
    from hybridflow.report.markdown import emit

    load = _load()
    art = ensure_artifacts("tiny", seed=w.seed)
    plans = {d: make_plan(w, d) for d in args.devices}
    first = plans[args.devices[0]]
    tokens, texts = planned_tokens(first), prompt_texts(first, w, art)
    check_prompts(art, texts, first)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        runs = Path(args.runs or tmp)
        runs.mkdir(parents=True, exist_ok=True)
        for d in args.devices:
            rows.append(_with_load(run_hybridflow, plans[d], w, d, runs))
    for threads in args.trl_threads:
        rows.append(_with_load(run_trl, w, art, texts, tokens, threads))
    load = f"{load} before the runs, {_load()} after"
    emit(render(rows, w, tokens, load), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
