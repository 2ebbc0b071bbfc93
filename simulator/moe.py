"""Mixture-of-experts costs: expert-parallel all-to-all and the experts a batch touches.

Expert parallelism (ep) splits each MoE layer's routed experts over ep ranks taken from the
data-parallel ranks (Megatron's rule: ep divides dp; experts keep the layout's tp). Every
MoE layer sends each token to its top-k experts and back: two all-to-alls per forward pass
(dispatch, combine) and two more in the backward pass. With uniform routing a rank keeps
1/ep of its k copies and sends the rest, one equal share to each other rank.
"""

from __future__ import annotations

from hybridflow.simulator.architecture import ModelSpec
from hybridflow.simulator.profile import Profile

ACT_BYTES = 2  # bf16 activations


def alltoall_bytes(spec: ModelSpec, tokens: float, ep: int) -> float:
    """Bytes one rank sends in one dispatch (or combine) of one MoE layer, for `tokens`
    tokens of its own: each goes to experts_per_token experts, (ep-1)/ep of them elsewhere."""
    if ep <= 1 or not spec.is_moe:
        return 0.0
    return tokens * spec.experts_per_token * spec.hidden * ACT_BYTES * (ep - 1) / ep


def alltoall_seconds(profile: Profile, nbytes: float, ep: int, stride: int, gpn: int) -> float:
    """One all-to-all of `nbytes` sent per rank over ep ranks `stride` devices apart: the
    shares to peers inside the node go over NVLink, the rest over the network, at once."""
    if ep <= 1 or nbytes <= 0:
        return 0.0
    share = nbytes / (ep - 1)
    local_peers = min(ep, max(1, gpn // stride)) - 1
    remote_peers = ep - 1 - local_peers
    eff = profile.eff_communication
    wire = max(
        local_peers * share / (profile.intra_node_bandwidth * eff),
        remote_peers * share / (profile.inter_node_bandwidth * eff),
    )
    return profile.comm_latency_s + wire


def moe_alltoall_seconds(
    profile: Profile,
    spec: ModelSpec,
    tokens: float,
    ep: int,
    tp: int,
    pp: int,
    gpn: int,
    passes: int,
    stride: int | None = None,
) -> float:
    """All-to-all seconds of one rank's pipeline stage for `tokens` tokens (split over tp
    ranks by sequence parallelism) and `passes` all-to-alls per MoE layer (forward 2,
    forward+backward 4); ep ranks lie `stride` devices apart (default tp)."""
    if ep <= 1 or not spec.is_moe:
        return 0.0
    one = alltoall_seconds(
        profile, alltoall_bytes(spec, tokens / tp, ep), ep, tp if stride is None else stride, gpn
    )
    return spec.moe_layers / pp * passes * one


def touched_fraction(spec: ModelSpec, tokens: float) -> float:
    """Expected fraction of a layer's routed experts that `tokens` tokens use (uniform
    routing): a small decode batch reads few experts, a large one reads all of them."""
    if not spec.is_moe or tokens <= 0:
        return 1.0 if not spec.is_moe else 0.0
    miss = 1.0 - spec.experts_per_token / spec.experts
    return 1.0 - miss**tokens
