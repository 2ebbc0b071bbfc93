"""RL math against values computed by hand (see the comment above each expected value)."""

import math

import pytest
import torch

from hybridflow.executor.rl import algorithms as A
from hybridflow.executor.rl import losses as L

T = torch.tensor


def close(a, b, tol=1e-6):
    return torch.allclose(
        torch.as_tensor(a, dtype=torch.float64),
        torch.as_tensor(b, dtype=torch.float64),
        atol=tol,
        rtol=0,
    )


def test_masked_mean_and_whiten():
    x = T([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = T([[1, 1, 0], [1, 0, 0]])
    assert close(A.masked_mean(x, mask), 7 / 3)  # (1 + 2 + 4) / 3
    assert close(A.masked_mean(x, mask, dim=1), [1.5, 4.0])
    assert close(A.masked_mean(x, torch.zeros_like(mask)), 0.0)
    # mean 2, unbiased variance 1 over the three masked entries; 100 is ignored
    w = A.masked_whiten(T([[1.0, 2.0, 3.0, 100.0]]), T([[1, 1, 1, 0]]))
    assert close(w, [[-1.0, 0.0, 1.0, 0.0]], 1e-6)
    with pytest.raises(A.AlgorithmError):
        A.masked_var(x, T([[1, 0, 0], [0, 0, 0]]))


def test_logprobs_entropy_and_response_slice():
    logits = T([[[0.0, math.log(3.0)]]])  # p = (1/4, 3/4)
    assert close(A.logprobs_from_logits(logits, T([[1]])), [[math.log(0.75)]])
    assert close(A.logprobs_from_logits(logits, T([[0]])), [[math.log(0.25)]])
    # temperature 2: logits (0, ln3 / 2) -> p1 = sqrt3 / (1 + sqrt3)
    s3 = math.sqrt(3)
    assert close(A.logprobs_from_logits(logits, T([[1]]), 2.0), [[math.log(s3 / (1 + s3))]])
    assert close(
        A.entropy_from_logits(logits), [[-(0.25 * math.log(0.25) + 0.75 * math.log(0.75))]]
    )
    full = torch.arange(2 * 6).view(2, 6)
    # prompt 3, response 2: positions 2 and 3 predict tokens 3 and 4
    assert A.response_slice(full, 3, 2).tolist() == [[2, 3], [8, 9]]
    with pytest.raises(A.AlgorithmError):
        A.response_slice(full, 6, 2)


def test_kl_estimators():
    lp, ref = T([math.log(0.5)]), T([math.log(0.25)])  # log r = ln 2
    ln2 = math.log(2)
    assert close(A.kl_divergence(lp, ref, "k1"), [ln2])
    assert close(A.kl_divergence(ref, lp, "abs"), [ln2])
    assert close(A.kl_divergence(lp, ref, "k2"), [ln2**2 / 2])
    assert close(A.kl_divergence(lp, ref, "k3"), [0.5 - 1 + ln2])  # exp(-ln2) - 1 + ln2
    with pytest.raises(A.AlgorithmError):
        A.kl_divergence(lp, ref, "k9")


def test_token_level_rewards_put_score_on_last_token():
    mask = T([[1, 1, 1], [1, 1, 0]])
    lp = torch.full((2, 3), 0.3)
    ref = torch.full((2, 3), 0.2)  # KL 0.1 per token, coefficient 0.5
    rewards, kl = A.token_level_rewards(T([1.0, 2.0]), lp, ref, mask, 0.5)
    assert close(rewards, [[-0.05, -0.05, 0.95], [-0.05, 1.95, 0.0]])
    assert close(kl, [[0.1, 0.1, 0.1], [0.1, 0.1, 0.0]])
    with pytest.raises(A.AlgorithmError):
        A.terminal_rewards(T([1.0]), T([[0, 0]]))


def test_gae_by_hand():
    rewards = T([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    values = T([[0.5, 0.6, 0.7], [0.5, 0.6, 9.0]])
    mask = T([[1, 1, 1], [1, 1, 0]])
    adv, ret = A.gae(rewards, values, mask, gamma=0.9, lam=0.8)
    # row 0: d2 = 1 - .7 = .3; d1 = .9*.7 - .6 = .03, a1 = .03 + .72*.3 = .246;
    #        d0 = .9*.6 - .5 = .04, a0 = .04 + .72*.246 = .21712
    # row 1 (2 tokens; the padded value 9 is never used): a1 = 1 - .6 = .4, a0 = .04 + .72*.4
    assert close(adv, [[0.21712, 0.246, 0.3], [0.328, 0.4, 0.0]])
    assert close(ret, [[0.71712, 0.846, 1.0], [0.828, 1.0, 0.0]])
    # gamma = lambda = 1 and zero values: advantages are the returns-to-go
    adv, _ = A.gae(T([[1.0, 2.0, 3.0]]), torch.zeros(1, 3), torch.ones(1, 3), 1.0, 1.0)
    assert close(adv, [[6.0, 5.0, 3.0]])


def test_ppo_policy_loss_clips():
    old = torch.zeros(1, 2)
    lp = torch.log(T([[1.5, 0.5]])).requires_grad_()  # ratios 1.5 and 0.5
    mask = torch.ones(1, 2)
    loss, m = L.ppo_policy_loss(lp, old, torch.ones(1, 2), mask, 0.2)
    # A = 1: max(-1.5, -1.2) = -1.2 and max(-0.5, -0.8) = -0.5 -> mean -0.85
    assert close(loss, -0.85) and m["pg_clipfrac"] == 0.5
    loss.backward()
    assert close(lp.grad, [[0.0, -0.25]])  # clipped token has no gradient; -r/2 for the other
    loss, _ = L.ppo_policy_loss(lp.detach(), old, -torch.ones(1, 2), mask, 0.2)
    assert close(loss, 1.15)  # A = -1: max(1.5, 1.2) and max(0.5, 0.8)


def test_value_loss_clips():
    values, old, ret = T([[1.0, 0.0]]), T([[0.5, 0.5]]), T([[2.0, 0.0]])
    loss, m = L.value_loss(values, old, ret, torch.ones(1, 2), 0.2)
    # clipped values (0.7, 0.3): squared errors max(1, 1.69), max(0, 0.09) -> 0.5 * 0.89
    assert close(loss, 0.445) and m["vf_clipfrac"] == 1.0


def test_grpo_advantages():
    mask = T([[1, 1], [1, 0], [1, 1], [1, 1]])
    adv = A.grpo_advantages(T([1.0, 0.0, 0.5, 0.5]), mask, group_size=2)
    # group 1: mean .5, std sqrt(.5); group 2: identical scores -> 0
    a = 0.5 / (math.sqrt(0.5) + 1e-6)
    assert close(adv, [[a, a], [-a, 0.0], [0.0, 0.0], [0.0, 0.0]])
    with pytest.raises(A.AlgorithmError):
        A.grpo_advantages(T([1.0, 0.0, 0.5]), mask[:3], group_size=2)


def test_remax_and_safe_rlhf_advantages():
    mask = torch.ones(1, 3)
    assert close(A.remax_advantages(T([[0.0, 0.0, 1.0]]), T([0.25]), mask), [[0.75] * 3])
    # returns-to-go of (-.1, -.1, .9) are (.7, .8, .9), minus the baseline .25
    assert close(A.remax_advantages(T([[-0.1, -0.1, 0.9]]), T([0.25]), mask), [[0.45, 0.55, 0.65]])
    assert close(A.safe_rlhf_advantages(T(1.0), T(2.0), 0.5), 0.0)  # (1 - 1) / 1.5
    assert close(A.safe_rlhf_advantages(T(1.0), T(2.0), 1.0), -0.5)  # (1 - 2) / 2
    with pytest.raises(A.AlgorithmError):
        A.safe_rlhf_advantages(T(1.0), T(2.0), -1.0)


def test_controllers():
    lag = A.LagrangeMultiplier(value=1.0, lr=0.1, threshold=0.2)
    assert close(lag.update(0.7), 1.05)  # 1 + 0.1 * (0.7 - 0.2)
    assert lag.update(-20.0) == 0.0  # projected onto lambda >= 0
    kl = A.AdaptiveKLController(0.1, target=6.0, horizon=10000)
    kl.update(12.0, n_steps=100)  # error clipped to 0.2: 0.1 * (1 + 0.2 * 100 / 10000)
    assert close(kl.value, 0.1002)
    kl.update(6.0, n_steps=100)  # on target: unchanged
    assert close(kl.value, 0.1002)
    fixed = A.FixedKLController(0.05)
    fixed.update(100.0, 10)
    assert fixed.value == 0.05
    with pytest.raises(A.AlgorithmError):
        A.LagrangeMultiplier(value=-1.0)


def _batch(seed=0, B=4, Tn=3, V=5):
    g = torch.Generator().manual_seed(seed)
    return {
        "responses": torch.randint(V, (B, Tn), generator=g),
        "response_mask": T([[1, 1, 1], [1, 1, 0], [1, 0, 0], [1, 1, 1]]),
        "old_log_probs": -torch.rand(B, Tn, generator=g),
        "ref_log_probs": -torch.rand(B, Tn, generator=g),
        "advantages": torch.randn(B, Tn, generator=g),
        "values": torch.randn(B, Tn, generator=g),
        "returns": torch.randn(B, Tn, generator=g),
    }, torch.randn(B, Tn, V, generator=g)


def test_actor_loss_composes_the_terms():
    batch, logits = _batch()
    cfg = A.RLConfig(algorithm="grpo", group_size=2, kl_loss_coef=0.1, entropy_coef=0.01)
    logits.requires_grad_()
    loss, m = L.actor_loss(logits, batch, cfg)
    lp = A.logprobs_from_logits(logits, batch["responses"])
    mask = batch["response_mask"]
    pg, _ = L.ppo_policy_loss(lp, batch["old_log_probs"], batch["advantages"], mask, 0.2)
    kl = A.seq_token_mean(A.kl_divergence(lp, batch["ref_log_probs"], "k3"), mask)
    ent = A.seq_token_mean(A.entropy_from_logits(logits), mask)
    assert close(loss, pg + 0.1 * kl - 0.01 * ent) and close(m["kl_loss"], kl)
    loss.backward()
    assert logits.grad[2, 1:].abs().sum() == 0  # padded tokens get no gradient
    vloss, vm = L.critic_loss(batch["values"] + 0.1, batch, cfg, prefix="")
    assert (
        close(
            vloss,
            L.value_loss(batch["values"] + 0.1, batch["values"], batch["returns"], mask, 0.2)[0],
        )
        and "vf_loss" in vm
    )


def test_compute_advantages_per_algorithm():
    batch, _ = _batch(1)
    mask = batch["response_mask"]
    batch.update(
        scores=T([1.0, 0.0, 0.5, 0.2]),
        log_probs=batch["old_log_probs"],
        baseline_scores=T([0.5, 0.5, 0.5, 0.5]),
        costs=T([0.0, 1.0, 0.0, 0.5]),
        cost_values=torch.zeros(4, 3),
    )
    ppo = A.compute_advantages(A.RLConfig(), batch, kl_coef=0.05)
    rewards, _ = A.token_level_rewards(
        batch["scores"], batch["log_probs"], batch["ref_log_probs"], mask, 0.05
    )
    adv, ret = A.gae(rewards, batch["values"], mask, 1.0, 0.95)
    assert close(ppo["advantages"], A.masked_whiten(adv, mask)) and close(ppo["returns"], ret)
    grpo = A.compute_advantages(A.RLConfig(algorithm="grpo", group_size=2), batch, 0.0)
    assert close(grpo["advantages"], A.grpo_advantages(batch["scores"], mask, 2))
    remax = A.compute_advantages(A.RLConfig(algorithm="remax"), batch, 0.0)
    assert close(remax["advantages"][:, 0], batch["scores"] - 0.5)  # no KL: score - baseline
    safe0 = A.compute_advantages(A.RLConfig(algorithm="safe-rlhf"), batch, 0.05, lagrange=0.0)
    assert close(safe0["advantages"], ppo["advantages"], 1e-5)  # lambda 0: reward side only
    safe = A.compute_advantages(A.RLConfig(algorithm="safe-rlhf"), batch, 0.05, lagrange=1.0)
    cost_adv, cost_ret = A.gae(
        A.terminal_rewards(batch["costs"], mask), batch["cost_values"], mask, 1.0, 0.95
    )
    assert close(safe["cost_returns"], cost_ret)
    assert close(
        safe["advantages"], (ppo["advantages"] - A.masked_whiten(cost_adv, mask)) / 2, 1e-5
    )


def test_config_validation():
    with pytest.raises(A.AlgorithmError):
        A.RLConfig(algorithm="dpo")
    with pytest.raises(A.AlgorithmError):
        A.RLConfig(algorithm="grpo", group_size=1)
    with pytest.raises(A.AlgorithmError):
        A.RLConfig(gamma=1.5)
    with pytest.raises(A.AlgorithmError):
        A.RLConfig(kl_kind="k7")
    assert A.RLConfig(algorithm="safe-rlhf").uses_critic
    assert not A.RLConfig(algorithm="remax").uses_critic


def test_losses_do_not_depend_on_the_micro_batch_size():
    """Equal micro-batches of 1, 2 or 4 sequences, their losses averaged (as megatron's
    schedule does), give the whole batch's: each sequence weighs the same, whatever its
    length and whoever shares its micro-batch."""
    batch, logits = _batch()
    cfg = A.RLConfig(algorithm="grpo", group_size=2, kl_loss_coef=0.1)
    whole, _ = L.actor_loss(logits, batch, cfg)
    values = batch["values"] + 0.1
    whole_v, _ = L.critic_loss(values, batch, cfg)
    B = logits.shape[0]
    for size in (1, 2):
        parts = [
            (
                L.actor_loss(
                    logits[i : i + size], {k: v[i : i + size] for k, v in batch.items()}, cfg
                )[0],
                L.critic_loss(
                    values[i : i + size], {k: v[i : i + size] for k, v in batch.items()}, cfg
                )[0],
            )
            for i in range(0, B, size)
        ]
        assert close(sum(a for a, _ in parts) / len(parts), whole)
        assert close(sum(c for _, c in parts) / len(parts), whole_v)
    assert batch["response_mask"].sum(1).unique().numel() > 1  # lengths differ
