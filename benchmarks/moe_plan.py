"""Planning today's RL workloads: a Qwen3-235B-A22B GRPO job (rule reward, responses up to
8,192 tokens with a 2,048 mean, 512 prompts x 8 samples, 8 mini-batches) planned on 1,024
and 4,096 H100-80GB GPUs, and a 6-model Safe-RLHF job on 4,096, with the search time.

Run:  .venv/bin/python benchmarks/moe_plan.py [--out reports/moe_plan.md] [--skip-six]
Each row plans from cold tables (a fresh Planner). CPU s is this process's CPU time, the
fair number on a shared machine; wall s includes waiting for the CPU.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from hybridflow.planner.search import Planner  # noqa: E402
from hybridflow.report.markdown import emit  # noqa: E402
from hybridflow.simulator.cluster import Cluster  # noqa: E402
from hybridflow.simulator.job import Job  # noqa: E402
from hybridflow.simulator.profile import load_profile  # noqa: E402

GPU = "h100-80gb"
MOE = Job.create(
    "grpo",
    "qwen3-235b-a22b",
    1024,
    8192,
    512,
    mini_batches=8,
    n_samples=8,
    response_mean=2048,
    reward="rule",
)
SIX = Job.create(
    "safe-rlhf", "llama-3.1-8b", 1024, 1024, 1024, mini_batches=8, critic="llama-2-13b"
)


def measure(job: Job, gpus: int) -> tuple[float, float, dict]:
    planner = Planner(job, load_profile(GPU), 8)
    cpu, wall = time.process_time(), time.perf_counter()
    plan = planner.plan(Cluster.from_gpus(GPU, gpus))[0]
    return time.process_time() - cpu, time.perf_counter() - wall, plan.to_dict()


def _layouts(plan: dict) -> str:
    out = []
    for s in plan["sets"]:
        for role, kinds in s["layouts"].items():
            out.append(
                f"{role}: "
                + "; ".join(
                    f"{k} " + ",".join(f"{a}{v}" for a, v in lay.items())
                    for k, lay in kinds.items()
                )
            )
    return "<br>".join(out)


def row(name: str, job: Job, gpus: int) -> str:
    cpu, wall, plan = measure(job, gpus)
    pred = plan["predicted"]
    sets = " ".join(f"{'+'.join(s['models'])}:{s['gpus']}" for s in plan["sets"])
    st = pred["stages"]
    gen = pred.get("response_tokens", {}).get("generate", {})
    wave = f"{gen['tokens']:,.0f}" if gen.get("tokens") is not None else "-"
    return (
        f"| {name} | {gpus:,} | {cpu:.1f} | {wall:.1f} | {sets} | {_layouts(plan)} | "
        f"{st['generate']:.1f} / {st['prepare']:.1f} / {st['train']:.1f} / "
        f"{st['reshard']:.2f} | {wave} | {pred['iteration_s']:.1f} | "
        f"{pred['tokens_per_s']:,.0f} |"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="also write the table (markdown) here, e.g. reports/moe_plan.md")
    ap.add_argument("--skip-six", action="store_true", help="only the MoE job")
    args = ap.parse_args()
    rows = [
        "| job | GPUs | search CPU s | search wall s | sets (GPUs) | layouts | "
        "stages gen / prep / train / reshard s | wave length (tokens) | iteration s | "
        "tokens/s |",
        "|---|---:|---:|---:|---|---|---|---:|---:|---:|",
    ]
    for gpus in (1024, 4096):
        rows.append(row("qwen3-235b-a22b GRPO, rule reward", MOE, gpus))
    if not args.skip_six:
        rows.append(row("safe-rlhf, 6 models (8B actor, 13B critics)", SIX, 4096))
    head = (
        f"Planner on MoE and 6-model jobs, {GPU}; {platform.machine()}, {os.cpu_count()} "
        f"cores, Python {platform.python_version()}, load average "
        f"{os.getloadavg()[0]:.1f}\n"
    )
    text = head + "\n" + "\n".join(rows) + "\n"
    emit(text, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
