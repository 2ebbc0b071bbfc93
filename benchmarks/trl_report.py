"""The report of benchmarks/trl_grpo.py: a summary row per workload (actor size, response
length), then each workload's rows and hybridflow's breakdown. Run the benchmark, not this
file."""

from __future__ import annotations

import os

from trl_workload import Workload

from hybridflow.report.markdown import table

ROW_HEADER = [
    "system",
    "plan / set-up",
    "iterations",
    "s / iteration",
    "each iteration s",
    "generate / reshard / prepare / train s",
    "tokens/s",
    "response tokens / iteration",
    "rule score",
    "start-up s",
    "wall s (with start-up)",
    "load start / end",
]


def _trl(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r["system"].startswith("TRL")]


def _ours(rows: list[dict]) -> list[dict]:
    return [r for r in rows if not r["system"].startswith("TRL")]


def breakdown_table(rows: list[dict]) -> str:
    """Where each hybridflow row's iteration goes (summary.json's breakdown, s/iteration)."""
    ours = [r for r in rows if r.get("breakdown")]
    parts = sorted({k for r in ours for k in r["breakdown"]})
    body = [[r["setup"]] + [f"{r['breakdown'].get(k, 0.0):.3f}" for k in parts] for r in ours]
    return table(["hybridflow run", *parts], body)


def summary_table(sections: list[tuple[str, Workload, list[dict]]]) -> str:
    """A line per hybridflow row: its tokens/s against the best TRL row's, start-ups."""
    body = []
    for label, _, rows in sections:
        trl = max(_trl(rows), key=lambda r: r["tokens_per_s"], default=None)
        for r in _ours(rows):
            ratio = r["tokens_per_s"] / trl["tokens_per_s"] if trl else float("nan")
            body.append(
                [
                    label,
                    r["setup"],
                    round(r["tokens_per_s"], 1),
                    round(trl["tokens_per_s"], 1) if trl else "–",
                    f"{ratio:.2f}x",
                    round(r["startup"], 1),
                    round(trl["startup"], 1) if trl else "–",
                    r["load"],
                ]
            )
    header = [
        "workload",
        "hybridflow plan",
        "hybridflow tokens/s",
        "TRL tokens/s (its best row)",
        "ratio",
        "hybridflow start-up s",
        "TRL start-up s",
        "load start / end",
    ]
    return table(header, body)


def _row(r: dict, trl: list[dict]) -> list:
    return [
        r["system"],
        r["setup"],
        r["iterations"],
        r["seconds"],
        " ".join(f"{x:.2f}" for x in r["per_iteration_s"]),
        r["stages"],
        round(r["tokens_per_s"], 1),
        round(r["response_tokens"], 1),
        r["score"],
        round(r["startup"], 1),
        round(r["wall"], 1),
        r["load"],
    ] + [f"{r['tokens_per_s'] / t['tokens_per_s']:.2f}x" for t in trl]


def section(label: str, w: Workload, rows: list[dict], tokens: int, params: int) -> str:
    """One workload's rows and hybridflow's breakdown."""
    trl = _trl(rows)
    header = ROW_HEADER + [f"ratio to TRL ({t['setup'].split(', ')[1]})" for t in trl]
    return "\n".join(
        [
            f"## {label}",
            "",
            f"Actor {params / 1e6:.2f} M parameters; GRPO with the rule reward; {w.prompts} "
            f"prompts x {w.samples} responses per iteration, prompt_len {w.prompt_len}, "
            f"response_len {w.response_len}, {w.mini_batches} optimizer steps per iteration, "
            f"{w.iterations} iterations (the first, a warm-up, left out of s / iteration); "
            f"{tokens} tokens per iteration as the controller counts them.",
            "",
            table(header, [_row(r, trl) for r in rows]),
            "",
            "Where hybridflow's iteration goes (s / iteration):",
            "",
            breakdown_table(rows),
            "",
        ]
    )


def render(sections: list[tuple[str, Workload, list[dict], int, int]], load: str) -> str:
    return "\n".join(
        [
            "# GRPO throughput: `hybridflow run` against TRL's GRPOTrainer",
            "",
            f"Machine: {os.cpu_count()} CPU cores, no GPU, shared; load average (1, 5, 15 min) "
            f"{load}. Written by benchmarks/trl_grpo.py.",
            "",
            "Both systems: the same actor (the built-in task's SFT'd tiny model, or a "
            "random-initialised Llama-style folder of the stated size over the task's "
            "tokenizer), the same prompts in the same order, responses per prompt, response "
            "length, optimizer steps, micro-batch, learning rate, fp32 and the task's rule as "
            "the reward. tokens/s = prompts x responses x (prompt_len + response_len) over the "
            "mean iteration time (first iteration left out). Start-up: hybridflow's from its "
            "process's start to its first iteration (summary.json's startup: Python, Ray, "
            "worker groups, megatron-core, vLLM, the held-out evaluation); TRL's from model "
            "loading to its first step (it runs in the benchmark's process, trl and torch "
            "already imported).",
            "",
            "## Summary",
            "",
            summary_table([(s[0], s[1], s[2]) for s in sections]),
            "",
            "Each iteration's seconds are listed per row to show the noise of the shared "
            "machine. Stage seconds are hybridflow's means from summary.json; TRL's step is "
            "not split. The breakdown comes from the executor's own timers "
            "(executor/rl/breakdown.py): per stage, the worker group on the critical path "
            "split into model compute (megatron-core's forward and backward passes, optimizer "
            "step; vLLM's generation), resharding, metric collectives and the rest of the "
            "worker call (`worker`); `controller` is the controller's own work (rules, "
            "advantages) and `dispatch` the rest of the stage's wall time: Ray dispatch, "
            "object transfer, serialisation, waiting.",
            "",
            *(section(*s) for s in sections),
        ]
    )
