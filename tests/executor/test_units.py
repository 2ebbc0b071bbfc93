"""Batch, protocols, layouts and the TP shard rule: single-process, no Ray."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hybridflow.executor.controller.batch import Batch, BatchError
from hybridflow.executor.controller.protocols import (
    CallContext,
    ProtocolError,
    dispatch_mode_of,
    get_mode,
    megatron_3d_output_ranks,
    register,
    register_mode,
)
from hybridflow.layout import LayoutError, ParallelLayout


def _batch(n: int = 8) -> Batch:
    return Batch(
        {"x": torch.arange(n * 2).view(n, 2), "y": torch.arange(n).float()},
        {"s": [f"p{i}" for i in range(n)]},
        {"temp": 1.0},
    )


def test_batch_split_concat_roundtrip():
    b = _batch()
    parts = b.split(4)
    assert [len(p) for p in parts] == [2] * 4
    assert parts[1]["s"].tolist() == ["p2", "p3"] and parts[1].meta == {"temp": 1.0}
    assert Batch.concat(parts).equals(b)
    with pytest.raises(BatchError):
        b.split(3)


def test_batch_union_select_repeat_index():
    b = _batch(4)
    u = b.union(Batch({"z": torch.ones(4)}, meta={"k": 2}))
    assert sorted(u.keys()) == ["s", "x", "y", "z"] and u.meta == {"temp": 1.0, "k": 2}
    with pytest.raises(BatchError):
        b.union(Batch({"x": torch.zeros(4, 2, dtype=torch.long)}))
    s = u.select(["x", "s"], meta_keys=[])
    assert sorted(s.keys()) == ["s", "x"] and s.meta == {}
    r = b.repeat(2)
    assert r["y"].tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert r["s"].tolist()[:4] == ["p0", "p0", "p1", "p1"]
    t = b.repeat(2, interleave=False)
    assert t["y"].tolist() == [0, 1, 2, 3, 0, 1, 2, 3] and t["x"].shape == (8, 2)
    assert b.index([3, 0])["s"].tolist() == ["p3", "p0"]
    with pytest.raises(BatchError):
        Batch({"a": torch.zeros(3), "b": torch.zeros(4)})


def test_layout_coordinates_follow_megatron_order():
    lay = ParallelLayout(tp=2, pp=2, dp=2)
    assert lay.coords(0) == (0, 0, 0) and lay.coords(1) == (0, 0, 1)
    assert lay.coords(2) == (0, 1, 0) and lay.coords(4) == (1, 0, 0)
    assert all(lay.rank_of(*lay.coords(r)) == r for r in range(8))
    with pytest.raises(LayoutError):
        ParallelLayout(tp=0)
    with pytest.raises(LayoutError):
        ParallelLayout(tp=2).check_model(layers=2, heads=4, kv_heads=1, vocab=512)
    with pytest.raises(LayoutError):
        ParallelLayout(pp=4).check_model(layers=2, heads=4, kv_heads=4, vocab=512)


def test_one_to_all_and_all_to_all():
    ctx = CallContext(3, None)
    assert get_mode("ONE_TO_ALL").dispatch(ctx, (1,), {"k": 2}) == [((1,), {"k": 2})] * 3
    out = get_mode("ALL_TO_ALL").dispatch(ctx, ([1, 2, 3],), {"k": ["a", "b", "c"]})
    assert out == [((1,), {"k": "a"}), ((2,), {"k": "b"}), ((3,), {"k": "c"})]
    with pytest.raises(ProtocolError):
        get_mode("ALL_TO_ALL").dispatch(ctx, ([1, 2],), {})
    assert get_mode("ALL_TO_ALL").collect(ctx, [1, 2, 3]) == [1, 2, 3]


def test_dp_compute_splits_over_all_ranks_and_concats():
    ctx = CallContext(4, None)
    b = _batch()
    per = get_mode("DP_COMPUTE").dispatch(ctx, (b, 7), {})
    assert [a[0]["y"].tolist() for a, _ in per] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert all(a[1] == 7 for a, _ in per)
    assert get_mode("DP_COMPUTE").collect(ctx, [a[0] for a, _ in per]).equals(b)


def test_megatron_3d_feeds_dp_slices_and_collects_last_stage_tp0():
    lay = ParallelLayout(tp=2, pp=2, dp=2)
    ctx = CallContext(8, lay)
    b = _batch()
    per = get_mode("MEGATRON_3D").dispatch(ctx, (b,), {})
    for rank, (args, _) in enumerate(per):
        dp = lay.coords(rank)[1]
        assert args[0]["y"].tolist() == list(range(dp * 4, dp * 4 + 4))
    assert megatron_3d_output_ranks(lay) == [lay.rank_of(1, 0, 0), lay.rank_of(1, 1, 0)]
    outs = [Batch({"r": torch.tensor([r])}) for r in range(8)]
    got = get_mode("MEGATRON_3D").collect(ctx, outs)
    assert got["r"].tolist() == [4, 6]
    with pytest.raises(ProtocolError):
        get_mode("MEGATRON_3D").dispatch(CallContext(8, None), (b,), {})


def test_mode_table_is_open_and_register_marks_methods():
    name = "TEST_FIRST_ONLY"
    register_mode(
        name,
        lambda ctx, a, k: [(a, k)] + [((), {})] * (ctx.world_size - 1),
        lambda ctx, outs: outs[0],
    )
    with pytest.raises(ProtocolError):
        register_mode(name, lambda *a: [], lambda *a: None)

    class W:
        @register(dispatch_mode=name)
        def m(self):
            return 1

    assert dispatch_mode_of(W, "m") == name and dispatch_mode_of(W, "other") is None
    assert get_mode(name).collect(CallContext(2, None), [5, 6]) == 5


def test_tp_shard_rule_matches_megatron_split_and_merges_back():
    from hybridflow.executor.engines.megatron_model import merge_shards, shard_of

    full = torch.arange(8 * 3).view(8, 3).float()
    # stride 2 (fused gate/up): rank r holds [gate_r; up_r]
    s0, s1 = (shard_of(full, (0, 2), r, 2) for r in range(2))
    assert torch.equal(s0, torch.cat([full[0:2], full[4:6]]))
    assert torch.equal(s1, torch.cat([full[2:4], full[6:8]]))
    assert torch.equal(merge_shards([s0, s1], (0, 2)), full)
    cols = [shard_of(full, (1, 1), r, 3) for r in range(3)]
    assert torch.equal(cols[1], full[:, 1:2]) and torch.equal(merge_shards(cols, (1, 1)), full)
    assert shard_of(full, None, 1, 2) is full


def test_object_fields_survive_numpy():
    b = Batch(non_tensors={"d": [{"a": 1}, {"b": 2}]})
    assert len(b) == 2 and b.split(2)[1]["d"][0] == {"b": 2}
    assert isinstance(b["d"], np.ndarray)


def test_bridge_fails_loudly_on_an_unchecked_megatron_version(monkeypatch):
    import megatron.core

    from hybridflow.executor.engines import cuda_bridge

    cuda_bridge.check_version()  # the installed, pinned version passes
    monkeypatch.setattr(megatron.core, "__version__", "0.99.0")
    with pytest.raises(cuda_bridge.BridgeError, match="0.99.0"):
        cuda_bridge.check_version()


def test_cpu_rng_tracker_forks_named_streams():
    from hybridflow.executor.engines.cuda_bridge import CpuRNGStatesTracker

    tr = CpuRNGStatesTracker()
    tr.add("model-parallel-rng", 5)
    torch.manual_seed(0)
    outer_expected = torch.rand(3)
    torch.manual_seed(0)
    with tr.fork("model-parallel-rng"):
        a = torch.rand(3)
    with tr.fork("model-parallel-rng"):
        b = torch.rand(3)
    assert torch.equal(torch.rand(3), outer_expected)  # outer stream untouched
    both = torch.rand(6, generator=torch.Generator().manual_seed(5))
    assert torch.equal(torch.cat([a, b]), both)  # named stream continues across forks
    with pytest.raises(Exception, match="already exists"):  # megatron raises a bare one
        tr.add("other", 5)


def test_bridge_maps_cuda_requests_to_cpu():
    from hybridflow.executor.engines import cuda_bridge

    if cuda_bridge.cuda_available():
        pytest.skip("the bridge is only used without CUDA")
    with cuda_bridge.active():
        t = torch.zeros(2, device="cuda")
        assert t.device.type == "cpu" and t.cuda() is t
        assert t.type() == "torch.cuda.FloatTensor"
        assert torch.cuda.current_device() == torch.device("cpu")
    assert torch.zeros(1).type() == "torch.FloatTensor"


def test_roles_share_one_process_group_per_rank_list(tmp_path):
    """Colocated roles reuse megatron's groups over the same ranks (gloo threads grow with
    groups); a re-initialised world gets fresh groups that still work."""
    import torch.distributed as dist

    from hybridflow.executor.engines.groups import build_role_groups

    def world(n: int) -> None:
        dist.init_process_group(
            "gloo", init_method=f"file://{tmp_path}/store{n}", rank=0, world_size=1
        )

    world(0)
    try:
        a = build_role_groups("a", ParallelLayout())
        b = build_role_groups("b", ParallelLayout())
        assert a.group("tp") is b.group("tp") and a.group("dp") is b.group("dp")
        assert a.group("tp") is a.group("dp")  # both over rank 0
        first = a.group("tp")
        dist.destroy_process_group()
        world(1)
        c = build_role_groups("c", ParallelLayout())
        assert c.group("tp") is not first
        x = torch.ones(2)
        dist.all_reduce(x, group=c.group("dp"))
        assert torch.equal(x, torch.ones(2))
    finally:
        dist.destroy_process_group()


def test_world_watch_sees_a_new_world(tmp_path):
    """What a process keeps of its world (shared groups, vLLM's world group) is dropped
    when it joins a new one: WorldWatch tells."""
    import torch.distributed as dist

    from hybridflow.executor.engines.groups import WorldWatch

    watch = WorldWatch()
    for n in range(2):
        dist.init_process_group("gloo", init_method=f"file://{tmp_path}/w{n}", rank=0, world_size=1)
        try:
            assert watch.changed() and not watch.changed()
        finally:
            dist.destroy_process_group()


def test_new_groups_shared_per_rank_list_inside_the_context(tmp_path):
    """vLLM's groups (built through torch.distributed.new_group) are shared per rank list
    while an engine starts, so engines started one after another reuse them."""
    import torch.distributed as dist

    from hybridflow.executor.engines.groups import shared_new_groups

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    original = dist.new_group
    try:
        with shared_new_groups():
            a = dist.new_group([0], backend="gloo")
            assert dist.new_group([0], backend="gloo") is a
        assert dist.new_group is original
        with shared_new_groups():  # the next engine finds the same group
            assert dist.new_group([0], backend="gloo") is a
        assert dist.new_group([0], backend="gloo") is not a  # outside: torch's own
        x = torch.ones(2)
        dist.all_reduce(x, group=a)
        assert torch.equal(x, torch.ones(2))
    finally:
        dist.destroy_process_group()


def test_rank_pool_lends_groups_and_raises_the_blocks_own_error():
    """RankPool.lent releases every group the block made; a broken group raises after a
    block that ended well, while a block's own error is raised as it is."""
    from hybridflow.executor.profiler.rank_pool import RankPool

    class Group:
        def __init__(self, name: str, broken: str | None = None) -> None:
            self.name, self.broken, self.calls = name, broken, []

        def run(self, role, method):
            self.calls.append(method)

        def shutdown(self, kill: bool = True) -> None:
            self.calls.append(("shutdown", kill))

    pool = RankPool.__new__(RankPool)
    groups: list = []
    with pytest.raises(ValueError, match="measuring"):
        with pool.lent(groups):
            groups += [Group("a"), Group("b", broken="rank 1 died")]
            raise ValueError("measuring failed")
    assert groups[0].calls == ["close_engine", "drop_roles", ("shutdown", False)]
    assert groups[1].calls == [("shutdown", False)]  # a broken group is only left
    with pytest.raises(RuntimeError, match="'c' failed: rank 0 died"):
        with pool.lent([Group("c", broken="rank 0 died")]):
            pass
    ok = Group("d")
    with pool.lent([ok]):
        pass
    assert ok.calls[-1] == ("shutdown", False)
