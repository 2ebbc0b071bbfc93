"""Several Ray nodes: the plan's node layout checked against the cluster's nodes and
devices before any worker starts, and each set placed as the plan lays it out.

The placement rule is tested on its own (no Ray); then a real two-node Ray cluster on this
machine (``ray.cluster_utils.Cluster``: 2 raylets x 2 "vgpu", one CPU each) is joined by
address as ``hybridflow run --ray-address`` does, and a GRPO plan of two sets of 2 runs on
it: the workers' own node ids show each set on one node and the two on different nodes,
and the held-out score equals the single-node run's with the same seed.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from hybridflow.executor.controller.cluster import (
    Cluster,
    ClusterConfig,
    RayClusterError,
    assign_nodes,
    check_nodes,
    describe_nodes,
    node_parts,
)
from hybridflow.executor.controller.worker_group import WorkerGroup
from hybridflow.executor.run.config import RunConfig
from hybridflow.plan import Plan
from tests.conftest import load_benchmark

mn = load_benchmark("multinode")


# ---- the rule (no process) -------------------------------------------------------------
@pytest.mark.parametrize(
    "gpus,per_node,parts",
    [(1, 4, (1, 1)), (4, 4, (1, 4)), (8, 4, (2, 4)), (16, 8, (2, 8)), (6, 4, (2, 3))],
)
def test_node_parts(gpus: int, per_node: int, parts: tuple[int, int]) -> None:
    assert node_parts(gpus, per_node) == parts


def test_sets_of_one_node_on_separate_nodes_when_they_fill_them() -> None:
    assert assign_nodes([2, 2], {"a": 2, "b": 2}, 2) == [["a"], ["b"]]


def test_whole_node_sets_get_nodes_of_their_own_and_small_sets_share() -> None:
    nodes = {"a": 4, "b": 4, "c": 4}
    # the 8-device set takes two whole nodes even though the small sets come first
    placed = assign_nodes([2, 2, 8], nodes, 4)
    assert placed[0] == placed[1] and len(set(placed[2])) == 2
    assert not set(placed[0]) & set(placed[2])


def test_a_set_that_does_not_fit_is_refused_in_one_line() -> None:
    with pytest.raises(RayClusterError, match=r"set 2 \(2 devices\) does not fit"):
        assign_nodes([3, 3, 2], {"a": 4, "b": 4}, 4)


def test_nodes_checked_against_the_plan() -> None:
    two = {"a": 2, "b": 2}
    assert check_nodes(two, 2, 2, 4) == ["a", "b"]
    with pytest.raises(RayClusterError, match=r"2 nodes x 4 devices; .* 2 nodes x 2 vgpu$"):
        check_nodes(two, 2, 4, 8)
    with pytest.raises(RayClusterError, match=r"1 node with 4 devices; .* 2 nodes x 2 vgpu$"):
        check_nodes(two, 1, 4, 4)
    with pytest.raises(RayClusterError, match=r"3 nodes x 2 devices"):
        check_nodes(two, 3, 2, 6)
    # a head node without devices is not counted; one-node plans may use a bigger node
    assert check_nodes({"a": 8}, 1, 4, 4) == ["a"]
    assert describe_nodes({"a": 4, "b": 2, "c": 2}, "vgpu") == "1 node x 4 + 2 nodes x 2 vgpu"


# ---- a real two-node Ray cluster -------------------------------------------------------
@pytest.fixture(scope="module")
def two_nodes() -> Iterator[str]:
    with mn.ray_nodes(2, 2) as address:
        yield address


@pytest.mark.process
def test_plan_checked_against_the_nodes_before_any_worker(two_nodes: str) -> None:
    cluster = Cluster.start(ClusterConfig(address=two_nodes))
    try:
        assert sorted(cluster.node_devices().values()) == [2, 2]
        with pytest.raises(RayClusterError, match=r"^the plan is for 2 nodes x 4 devices; "):
            cluster.reserve(mn.grpo_plan(2, 4))
        with pytest.raises(RayClusterError, match=r"^the plan is for 1 node with 4 devices; "):
            cluster.reserve(mn.single_node(mn.grpo_plan(2, 2)))
        assert not cluster.pools and not cluster._reserved
        pools = cluster.reserve(mn.grpo_plan(2, 2))
        assert [len(set(p.nodes)) for p in pools.values()] == [1, 1]
        assert set(pools["set0"].nodes) != set(pools["set1"].nodes)
    finally:
        cluster.shutdown()


@pytest.mark.slow
def test_sets_placed_as_planned_and_same_score_as_one_node(two_nodes: str, tmp_path: Path) -> None:
    plan = mn.grpo_plan(2, 2)
    cfg = RunConfig(iterations=2, checkpoint_every=2, seed=0)
    multi = mn.run_plan(plan, cfg, tmp_path / "multi", two_nodes)
    placement = list(mn.PLACEMENT)
    one = mn.run_plan(mn.single_node(plan), cfg, tmp_path / "one", None)
    # from the workers themselves: each set on one node, the two sets on different nodes
    assert [p["models"] for p in placement] == [["actor", "reference"], ["reward"]]
    assert mn.placed_as_planned(placement), placement
    assert [p["rank_nodes"] for p in placement] == [p["pool_nodes"] for p in placement]
    # on one node the same plan puts both sets on the single node
    assert len({n for p in mn.PLACEMENT for n in p["rank_nodes"]}) == 1
    a, b = multi.summary["measured"], one.summary["measured"]
    assert a["eval_score_after"] == b["eval_score_after"], (a, b)
    assert a["eval_score_before"] == b["eval_score_before"]
    for x, y in zip(multi.metrics, one.metrics):
        assert x["score"] == y["score"] and x["actor_loss"] == y["actor_loss"]


def _whole_nodes_plan() -> Plan:
    """Every GRPO role in one set of 4 devices on 2 nodes x 2: two whole nodes."""
    d = mn.grpo_plan(2, 2).to_dict()
    d.pop("predicted", None)
    dp4 = {"pp": 1, "tp": 1, "dp": 4}
    actor = {"train": {"pp": 1, "tp": 2, "dp": 2}, "generate": {"pp": 1, "tp": 1, "micro_dp": 2}}
    d["sets"] = [
        {
            "models": ["actor", "reference", "reward"],
            "gpus": 4,
            "layouts": {"actor": actor, "reference": {"infer": dp4}, "reward": {"infer": dp4}},
        }
    ]
    return Plan.from_dict(d)


@pytest.mark.process
def test_a_set_of_whole_nodes_keeps_its_tp_groups_inside_nodes(two_nodes: str) -> None:
    cluster = Cluster.start(ClusterConfig(address=two_nodes))
    try:
        pool = cluster.reserve(_whole_nodes_plan())["set0"]
        a, b = pool.nodes[0], pool.nodes[2]
        assert pool.nodes == (a, a, b, b) and a != b
        with mn.placed_runs():
            group = WorkerGroup(cluster, cluster.create_pool("set0", 4), mn.NodeWorker)
        try:
            ranks = group.run(None, "node_id")
        finally:
            group.shutdown()
        # ranks 0, 1 (TP group 0) on the first node, ranks 2, 3 (TP group 1) on the second
        assert ranks == [a, a, b, b], ranks
    finally:
        cluster.shutdown()


@pytest.mark.process
def test_pools_placed_one_by_one_by_the_same_rule(two_nodes: str) -> None:
    """create_pool without reserve: each set on the devices the others leave."""
    cluster = Cluster.start(ClusterConfig(address=two_nodes))
    try:
        a, b = cluster.create_pool("a", 2), cluster.create_pool("b", 2)
        assert len(set(a.nodes)) == 1 and len(set(b.nodes)) == 1 and a.nodes != b.nodes
        with pytest.raises(RayClusterError, match=r"needs 1 devices, the cluster has 0 free"):
            cluster.create_pool("c", 1)
        cluster.remove_pool("a")
        cluster.remove_pool("b")
        ones = [cluster.create_pool(f"one{i}", 1) for i in range(2)]
        assert ones[0].nodes == ones[1].nodes  # small sets share a node while it has room
        two = cluster.create_pool("two", 2)
        assert set(two.nodes).isdisjoint(ones[0].nodes)
        for name in ("one0", "one1", "two"):
            cluster.remove_pool(name)
        w = cluster.create_pool("w", 4).nodes
        assert w[0] == w[1] != w[2] == w[3]
    finally:
        cluster.shutdown()
