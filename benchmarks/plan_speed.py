"""How long the planner takes: a Llama-2-70B PPO job (every role 70B, prompt and response
1,024 tokens, batch 1,024 prompts, 8 mini-batches) planned for 128 and 1,024 A100-80GB GPUs.
Goals: < 2 s and < 10 s on a 2-core machine (the paper's search took up to half an hour).

Run:  .venv/bin/python benchmarks/plan_speed.py [--out reports/plan_speed.md] [--repeat N]
Each size is planned from cold tables (a fresh Planner), best of --repeat runs.
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

CASES = [(128, 2.0), (1024, 10.0)]


def measure(gpus: int, repeat: int) -> tuple[float, float, dict]:
    """Best wall-clock and process CPU seconds over `repeat` cold runs, and the plan."""
    job = Job.create("ppo", "llama-2-70b", 1024, 1024, 1024, mini_batches=8)
    profile, wall, cpu, plan = load_profile("a100-80gb"), float("inf"), float("inf"), None
    for _ in range(repeat):
        start, start_cpu = time.perf_counter(), time.process_time()
        plan = Planner(job, profile, 8).plan(Cluster.from_gpus("a100-80gb", gpus))[0]
        wall = min(wall, time.perf_counter() - start)
        cpu = min(cpu, time.process_time() - start_cpu)
    return wall, cpu, plan.to_dict()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--out", help="also write the table (markdown) to this file, e.g. reports/plan_speed.md"
    )
    ap.add_argument("--repeat", type=int, default=1)
    args = ap.parse_args()
    rows = [
        "| GPUs | goal s | planning s (wall) | CPU s | met | best placement (GPUs) "
        "| iteration s | tokens/s |",
        "|---:|---:|---:|---:|:---:|---|---:|---:|",
    ]
    for gpus, goal in CASES:
        seconds, cpu, plan = measure(gpus, args.repeat)
        sets = " ".join(f"{'+'.join(s['models'])}:{s['gpus']}" for s in plan["sets"])
        rows.append(
            f"| {gpus} | {goal:g} | {seconds:.2f} | {cpu:.2f} | "
            f"{'yes' if seconds < goal else 'NO'} | "
            f"{sets} | {plan['predicted']['iteration_s']:.1f} | "
            f"{plan['predicted']['tokens_per_s']:,.0f} |"
        )
    head = (
        f"Planner speed, llama-2-70b PPO on a100-80gb; "
        f"{platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, Python {platform.python_version()}, "
        f"load average {os.getloadavg()[0]:.1f}\n"
    )
    text = head + "\n" + "\n".join(rows) + "\n"
    emit(text, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
