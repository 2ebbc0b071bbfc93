"""A plan over several Ray nodes: where its sets land and how long its iterations take.

Starts a real multi-node Ray cluster on this machine (``ray.cluster_utils.Cluster``: a head
and worker nodes, each a raylet of its own with ``--per-node`` "vgpu" devices and one CPU),
joins it the way ``hybridflow run --ray-address`` does, and runs a GRPO plan of two sets of
one node each (actor+reference: actor TP 2; reward) for a few iterations. Prints every
rank's node as the worker itself reports it (``ray.get_runtime_context().get_node_id()``),
whether each set lies on one node and the sets on different nodes, and the iteration times.
``--single`` runs the same plan with the same seed on one local node of all the devices too
and compares the held-out scores.

Run (about 2 min on the 2-core VM, twice that with --single):
    .venv/bin/python benchmarks/multinode.py --nodes 2 --per-node 2 --iterations 3 --single
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import ray  # noqa: E402

from hybridflow.executor.controller.protocols import ONE_TO_ALL, register  # noqa: E402
from hybridflow.executor.rl import runtime as runtime_mod  # noqa: E402
from hybridflow.executor.rl.worker import RLWorker  # noqa: E402
from hybridflow.executor.run import driver  # noqa: E402
from hybridflow.executor.run.config import RunConfig  # noqa: E402
from hybridflow.plan import Plan  # noqa: E402

# what the workers of the last run reported: one row per set
PLACEMENT: list[dict[str, Any]] = []


class NodeWorker(RLWorker):
    """The RL worker, plus the id of the Ray node its process runs on."""

    @register(dispatch_mode=ONE_TO_ALL)
    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()


class PlacedRuntime(runtime_mod.Runtime):
    """The runtime with every set placed up front (Cluster.reserve: the plan checked against
    the nodes before any worker starts) and each rank's node recorded in PLACEMENT."""

    def start(self) -> None:
        self.cluster.reserve(self.plan)
        super().start()
        PLACEMENT.clear()
        for i, s in enumerate(self.plan.sets):
            group = self.groups[s.models[0]]
            PLACEMENT.append(
                {
                    "set": i,
                    "models": list(s.models),
                    "pool_nodes": list(group.pool.nodes),
                    "rank_nodes": group.run(None, "node_id"),
                }
            )


@contextlib.contextmanager
def placed_runs() -> Iterator[None]:
    """driver.run with PlacedRuntime and NodeWorker (the workers pickled by value)."""
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    with (
        mock.patch.object(driver, "Runtime", PlacedRuntime),
        mock.patch.object(runtime_mod, "RLWorker", NodeWorker),
    ):
        yield


@contextlib.contextmanager
def ray_nodes(nodes: int, per_node: int) -> Iterator[str]:
    """A Ray cluster of `nodes` nodes (the head one of them) with `per_node` vgpu each and
    one CPU; yields its address. Its files in a temporary folder of its own."""
    from ray.cluster_utils import Cluster

    tmp = tempfile.mkdtemp(prefix="hf-mn-")
    old = os.environ.get("RAY_TMPDIR")
    os.environ["RAY_TMPDIR"] = tmp
    args = dict(num_cpus=1, resources={"vgpu": per_node})
    cluster = Cluster(initialize_head=True, head_node_args=dict(include_dashboard=False, **args))
    try:
        for _ in range(nodes - 1):
            cluster.add_node(**args)
        cluster.wait_for_nodes()
        yield cluster.address
    finally:
        cluster.shutdown()
        if old is None:
            os.environ.pop("RAY_TMPDIR", None)
        else:
            os.environ["RAY_TMPDIR"] = old
        shutil.rmtree(tmp, ignore_errors=True)


def grpo_plan(nodes: int, per_node: int) -> Plan:
    """GRPO on `nodes` x `per_node`: actor+reference on one node (actor TP 2 when a node has
    2 devices or more, generating TP 1 x micro-DP 2), the reward model on another."""
    from hybridflow.simulator.job import Job

    job = Job.create(
        algorithm="grpo",
        model="tiny",
        prompt_len=16,
        response_len=8,
        global_batch=8,
        n_samples=4,
        ppo_epochs=1,
        mini_batches=2,
    )
    tp = 2 if per_node % 2 == 0 else 1
    dp = {"pp": 1, "tp": 1, "dp": per_node}
    actor = {
        "train": {"pp": 1, "tp": tp, "dp": per_node // tp},
        "generate": {"pp": 1, "tp": 1, "micro_dp": tp},
    }
    sets = [
        {"models": ["actor", "reference"], "layouts": {"actor": actor, "reference": {"infer": dp}}},
        {"models": ["reward"], "layouts": {"reward": {"infer": dp}}},
    ]
    return Plan.from_dict(
        {
            "version": 1,
            "cluster": {"gpu": "local-cpu", "nodes": nodes, "gpus_per_node": per_node},
            "job": job.to_dict(),
            "sets": [{**s, "gpus": per_node} for s in sets],
        }
    )


def single_node(plan: Plan) -> Plan:
    """The plan on one node of all its cluster's devices."""
    d = plan.to_dict()
    d["cluster"] = {**d["cluster"], "nodes": 1, "gpus_per_node": plan.cluster.n_gpus}
    d.pop("predicted", None)
    return Plan.from_dict(d)


def placed_as_planned(placement: list[dict[str, Any]]) -> bool:
    """Each set's ranks on one node, and the sets on different nodes."""
    nodes = [set(p["rank_nodes"]) for p in placement]
    return all(len(n) == 1 for n in nodes) and len(set().union(*nodes)) == len(nodes)


def run_plan(plan: Plan, cfg: RunConfig, out: Path, address: str | None) -> driver.RunResult:
    with placed_runs():
        options = driver.RunOptions(ray_address=address, devices=plan.cluster.n_gpus)
        return driver.run(plan, cfg, out, options)


def _print_run(what: str, res: driver.RunResult) -> None:
    m = res.summary["measured"]
    print(f"{what}: held-out score {m['eval_score_before']:.4f} -> {m['eval_score_after']:.4f}")
    for row in res.metrics:
        stages = "  ".join(f"{k} {v:.2f}" for k, v in row["stages"].items())
        print(f"  iteration {row['iteration']}: {sum(row['stages'].values()):.2f} s ({stages})")
    print(f"  mean of the timed iterations: {m['iteration_s']:.2f} s")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nodes", type=int, default=2)
    ap.add_argument("--per-node", type=int, default=2)
    ap.add_argument("--iterations", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--single", action="store_true", help="also run it on one node, compare")
    a = ap.parse_args(argv)
    plan = grpo_plan(a.nodes, a.per_node)
    cfg = RunConfig(iterations=a.iterations, checkpoint_every=a.iterations, seed=a.seed)
    runs = Path(tempfile.mkdtemp(prefix="hf-mn-runs-"))
    try:
        t0 = time.perf_counter()
        with ray_nodes(a.nodes, a.per_node) as address:
            print(
                f"Ray cluster of {a.nodes} nodes x {a.per_node} vgpu at {address} "
                f"({time.perf_counter() - t0:.1f} s to start)"
            )
            multi = run_plan(plan, cfg, runs / "multi", address)
        for p in PLACEMENT:
            ranks = " ".join(n[:8] for n in p["rank_nodes"])
            print(f"  set {p['set']} {'+'.join(p['models'])}: ranks on nodes {ranks}")
        ok = placed_as_planned(PLACEMENT)
        print(f"  each set on one node, sets on different nodes: {ok}")
        _print_run("multi-node", multi)
        if a.single:
            one = run_plan(single_node(plan), cfg, runs / "single", None)
            _print_run("single node", one)
            same = (
                multi.summary["measured"]["eval_score_after"]
                == one.summary["measured"]["eval_score_after"]
            )
            print(f"same held-out score as the single-node run: {same}")
            ok = ok and same
    finally:
        shutil.rmtree(runs, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
