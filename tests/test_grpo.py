"""Tests for research_rl.algo.grpo, of three kinds:

1. Hand-computed cases, the arithmetic in comments.
2. A plain Python-loop reference (math module, one token at a time) against the vectorised functions.
3. Invariance: micro-batch gradient accumulation and emulated data-parallel ranks equal one full batch when the
   global token count is the token-mean denominator, and do not when each micro-batch is averaged on its own.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from research_rl.algo import grpo
from research_rl.algo.grpo import (
    GRPOLossOutput,
    broadcast_advantages,
    entropy_from_logits,
    group_advantages,
    grpo_loss,
    log_probs_from_logits,
    low_var_kl,
    masked_mean,
    masked_sum,
    policy_loss,
    tis_weights,
    token_mean,
)

pytestmark = pytest.mark.unit


# ================================================================================================================
# 1. Hand-computed cases
# ================================================================================================================


def test_group_advantages_hand_computed():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.1, 0.1, 0.1, 0.1])
    adv = group_advantages(rewards, group_size=4)
    # group 0: mean = 0.5; deviations ±0.5; sum of squares = 4 * 0.25 = 1; unbiased var = 1 / (4 - 1) = 1/3;
    #          std = sqrt(1/3) = 0.577350; advantage = ±0.5 / 0.577350 = ±0.866025 (eps = 1e-6 is below tolerance)
    # group 1: all rewards equal -> deviations 0, std 0 -> 0 / (0 + 1e-6) = 0
    expected = torch.tensor([0.866025, -0.866025, -0.866025, 0.866025, 0.0, 0.0, 0.0, 0.0])
    torch.testing.assert_close(adv, expected, atol=1e-5, rtol=0)
    assert adv.shape == (8,)


def test_group_advantages_group_of_two():
    # [3, 1]: mean 2, unbiased std = sqrt((1 + 1) / 1) = sqrt(2) -> ±1 / 1.414214 = ±0.707107
    adv = group_advantages(torch.tensor([3.0, 1.0]), group_size=2)
    torch.testing.assert_close(adv, torch.tensor([0.707107, -0.707107]), atol=1e-5, rtol=0)


def test_group_advantages_accepts_integer_rewards():
    # int rewards are promoted to float: [1, 0] -> mean 0.5, std sqrt(0.5) = 0.707107 -> ±0.707107
    adv = group_advantages(torch.tensor([1, 0]), group_size=2)
    assert adv.is_floating_point()
    torch.testing.assert_close(adv, torch.tensor([0.707107, -0.707107]), atol=1e-5, rtol=0)


@pytest.mark.parametrize("group_size", [1, 0, -3])
def test_group_advantages_rejects_group_size_below_two(group_size):
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(torch.zeros(4), group_size=group_size)


def test_group_advantages_rejects_non_divisible():
    with pytest.raises(ValueError, match="multiple of group_size=4"):
        group_advantages(torch.zeros(10), group_size=4)


def test_group_advantages_rejects_non_1d():
    with pytest.raises(ValueError, match="1-D"):
        group_advantages(torch.zeros(2, 4), group_size=4)


def test_broadcast_advantages_hand_computed():
    adv = torch.tensor([2.0, -1.0])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    # row 0: 2 on its two response tokens, 0 on padding; row 1: -1 on its one token
    expected = torch.tensor([[2.0, 2.0, 0.0], [-1.0, 0.0, 0.0]])
    torch.testing.assert_close(broadcast_advantages(adv, mask), expected)


def test_broadcast_advantages_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="advantages"):
        broadcast_advantages(torch.zeros(3), torch.ones(2, 5))
    with pytest.raises(ValueError, match="advantages"):
        broadcast_advantages(torch.zeros(2, 5), torch.ones(2, 5))


def test_policy_loss_hand_computed():
    eps = 0.2
    # token: 0: A=+1, ratio 1.5  1: A=-1, ratio 0.5  2: A=+1, ratio 0.5  3: A=-1, ratio 1.5  4: A=+1, ratio 1.1
    ratio = torch.tensor([[1.5, 0.5, 0.5, 1.5, 1.1]])
    adv = torch.tensor([[1.0, -1.0, 1.0, -1.0, 1.0]])
    old = torch.full_like(ratio, -2.0)
    logp = old + torch.log(ratio)
    loss, clipped = policy_loss(logp, old, adv, clip_eps=eps)
    # 0: l1 = -1 * 1.5 = -1.5, l2 = -1 * clamp(1.5, 0.8, 1.2) = -1.2 -> max = -1.2, clipped (l2 > l1)
    # 1: l1 = +1 * 0.5 = 0.5,  l2 = +1 * clamp(0.5) = 0.8            -> max =  0.8, clipped
    # 2: l1 = -0.5, l2 = -0.8                                         -> max = -0.5, not clipped (keeps the gradient)
    # 3: l1 = 1.5,  l2 = 1.2                                          -> max =  1.5, not clipped
    # 4: ratio inside [0.8, 1.2]: l1 = l2 = -1.1                      -> -1.1, not clipped
    torch.testing.assert_close(loss, torch.tensor([[-1.2, 0.8, -0.5, 1.5, -1.1]]))
    assert clipped.tolist() == [[True, True, False, False, False]]
    assert clipped.dtype == torch.bool


def test_policy_loss_gradient_is_zero_on_clipped_tokens():
    ratio = torch.tensor([[1.5, 0.5, 0.5, 1.5]])
    adv = torch.tensor([[1.0, -1.0, 1.0, -1.0]])
    old = torch.zeros_like(ratio)
    logp = torch.log(ratio).requires_grad_(True)
    loss, _ = policy_loss(logp, old, adv, clip_eps=0.2)
    loss.sum().backward()
    # clipped tokens 0, 1 -> 0; unclipped: d(-A * exp(logp - old))/dlogp = -A * ratio: -1 * 0.5 = -0.5, +1 * 1.5 = 1.5
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, 0.0, -0.5, 1.5]]))


def test_policy_loss_rejects_bad_input():
    with pytest.raises(ValueError, match="shape"):
        policy_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2), clip_eps=0.2)
    with pytest.raises(ValueError, match="clip_eps"):
        policy_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 3), clip_eps=-0.1)


def test_low_var_kl_hand_computed():
    logp = torch.tensor([[-1.0, -2.0, -0.5, 0.0, -30.0]])
    ref = torch.tensor([[-2.0, -1.0, -0.5, -30.0, 0.0]])
    k3 = low_var_kl(logp, ref)
    # 0: kl = ref - logp = -1; exp(-1) - (-1) - 1 = 0.367879
    # 1: kl = +1;  e - 1 - 1 = 0.718282
    # 2: equal -> exp(0) - 0 - 1 = 0
    # 3: kl = -30 -> clamped to -20: exp(-20) + 20 - 1 = 19.000000002 -> clamped to 10
    # 4: kl = +30 -> clamped to 20:  exp(20) - 21 = 4.85e8 -> clamped to 10
    torch.testing.assert_close(k3, torch.tensor([[0.367879, 0.718282, 0.0, 10.0, 10.0]]), atol=1e-5, rtol=0)
    # a custom clamp
    torch.testing.assert_close(low_var_kl(logp, ref, clamp=0.5)[0, :3], torch.tensor([0.367879, 0.5, 0.0]),
                               atol=1e-5, rtol=0)


def test_low_var_kl_is_non_negative_and_finite():
    torch.manual_seed(0)
    logp = torch.randn(16, 32) * 10
    ref = torch.randn(16, 32) * 10
    k3 = low_var_kl(logp, ref)
    assert torch.isfinite(k3).all()
    assert (k3 >= 0).all()


def test_masked_sum_and_mean_hand_computed():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    # kept: 1 + 2 + 4 = 7 over 3 tokens
    assert masked_sum(x, mask).item() == pytest.approx(7.0)
    assert masked_mean(x, mask).item() == pytest.approx(7.0 / 3.0)
    # empty mask: 0 / max(0, 1) = 0, not NaN
    assert masked_mean(x, torch.zeros_like(mask)).item() == 0.0


def test_token_mean_hand_computed():
    loss = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    # default denominator = own token count: (1 + 2 + 4) / 3 = 2.333333
    assert token_mean(loss, mask).item() == pytest.approx(7.0 / 3.0)
    # global denominator 7 (e.g. the whole mini-batch has 7 tokens): 7 / 7 = 1
    assert token_mean(loss, mask, num_tokens=7).item() == pytest.approx(1.0)
    assert token_mean(loss, mask, num_tokens=torch.tensor(14.0)).item() == pytest.approx(0.5)
    # empty mask: 0 / max(0, 1) = 0
    assert token_mean(loss, torch.zeros_like(mask)).item() == 0.0
    with pytest.raises(ValueError, match="num_tokens"):
        token_mean(loss, mask, num_tokens=0)


def test_entropy_of_uniform_is_log_vocab():
    # uniform over V = 8: H = log 8 = 2.079442, whatever the (equal) logit value
    for value in (0.0, 1000.0, -1000.0):
        logits = torch.full((2, 3, 8), value)
        torch.testing.assert_close(entropy_from_logits(logits), torch.full((2, 3), math.log(8)))


def test_entropy_hand_computed_two_outcomes():
    # logits [log 3, 0] -> p = [0.75, 0.25]; H = -(0.75 ln 0.75 + 0.25 ln 0.25) = 0.215762 + 0.346574 = 0.562335
    logits = torch.tensor([[[math.log(3.0), 0.0]]])
    torch.testing.assert_close(entropy_from_logits(logits), torch.tensor([[0.562335]]), atol=1e-6, rtol=0)


def test_entropy_matches_minus_p_log_p():
    torch.manual_seed(1)
    logits = torch.randn(3, 5, 11) * 4
    p = torch.softmax(logits, -1)
    expected = -(p * torch.log_softmax(logits, -1)).sum(-1)
    torch.testing.assert_close(entropy_from_logits(logits), expected)
    # float64 stays float64 (the invariance tests rely on it); bf16 is computed in float32
    assert entropy_from_logits(logits.double()).dtype == torch.float64
    assert entropy_from_logits(logits.bfloat16()).dtype == torch.float32


def test_log_probs_from_logits_hand_computed():
    # 4 equal logits: log(1/4) = -1.386294 at any label
    logits = torch.zeros(1, 2, 4)
    labels = torch.tensor([[0, 3]])
    torch.testing.assert_close(log_probs_from_logits(logits, labels), torch.full((1, 2), -math.log(4)))


def test_log_probs_from_logits_equals_log_softmax_gather():
    torch.manual_seed(2)
    logits = torch.randn(4, 7, 13) * 3
    labels = torch.randint(0, 13, (4, 7))
    expected = torch.log_softmax(logits, dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(log_probs_from_logits(logits, labels), expected)
    # low-precision logits come back as float32
    out = log_probs_from_logits(logits.bfloat16(), labels)
    assert out.dtype == torch.float32
    expected_bf16 = torch.log_softmax(logits.bfloat16().float(), -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(out, expected_bf16)


def test_log_probs_from_logits_rejects_mismatched_labels():
    with pytest.raises(ValueError, match="labels shape"):
        log_probs_from_logits(torch.zeros(2, 3, 5), torch.zeros(2, 4, dtype=torch.long))


def test_grpo_loss_hand_computed():
    # one trajectory, 3 positions, the last one padding
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    logp = torch.tensor([[-1.0, -1.0, -5.0]])
    old = logp.clone()  # ratio 1 -> nothing clipped
    ref = torch.tensor([[-2.0, -2.0, 0.0]])
    adv = torch.tensor([[0.5, 0.5, 0.5]])
    ent = torch.tensor([[2.0, 2.0, 99.0]])
    out = grpo_loss(logp, old, ref, adv, mask, ent, clip_eps=0.2, kl_coef=0.1, entropy_coef=0.01)
    # pg per token = -A * 1 = -0.5 -> token-mean over 2 tokens = -0.5
    # kl per token = exp(-1) + 1 - 1 = 0.367879 -> token-mean 0.367879
    # entropy token-mean = 2 (the padded 99 is masked out)
    # loss = -0.5 + 0.1 * 0.367879 - 0.01 * 2 = -0.5 + 0.0367879 - 0.02 = -0.4832121
    assert isinstance(out, GRPOLossOutput)
    assert out.loss.item() == pytest.approx(-0.4832121, abs=1e-6)
    assert out.pg_loss.item() == pytest.approx(-0.5)
    assert out.kl.item() == pytest.approx(0.367879, abs=1e-6)
    assert out.entropy.item() == pytest.approx(2.0)
    assert out.clip_frac.item() == 0.0
    assert out.approx_kl.item() == 0.0
    for field in (out.loss, out.pg_loss, out.kl, out.entropy, out.clip_frac, out.approx_kl):
        assert field.dim() == 0


def test_grpo_loss_clip_frac_and_approx_kl_hand_computed():
    # 4 masked tokens + 1 padding: ratios 1.5 (A=+1, clipped), 0.5 (A=-1, clipped), 1.0, 1.0, padding clipped-looking
    ratio = torch.tensor([[1.5, 0.5, 1.0, 1.0, 1.5]])
    adv = torch.tensor([[1.0, -1.0, 1.0, 1.0, 1.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]])
    old = torch.zeros_like(ratio)
    logp = torch.log(ratio)
    out = grpo_loss(logp, old, None, adv, mask, None, clip_eps=0.2, kl_coef=0.0, entropy_coef=0.0)
    # clip_frac = 2 clipped / 4 masked = 0.5 (the padded clipped token does not count)
    assert out.clip_frac.item() == pytest.approx(0.5)
    # approx_kl = mean(old - logp) = -(ln 1.5 + ln 0.5 + 0 + 0) / 4 = -(0.405465 - 0.693147) / 4 = 0.071921
    assert out.approx_kl.item() == pytest.approx(0.071921, abs=1e-6)
    # no reference policy and no entropy: both terms are 0 and the loss is the pg loss
    # pg = (-1.2 + 0.8 - 1 - 1) / 4 = -0.6
    assert out.kl.item() == 0.0 and out.entropy.item() == 0.0
    assert out.pg_loss.item() == pytest.approx(-0.6)
    assert out.loss.item() == pytest.approx(-0.6)


def test_grpo_loss_kl_clamp_binds_hand_computed():
    # two tokens, ratio 1 (pg = -A = 0 with A = 0); ref - logp = 3 on token 0 and 1 on token 1
    logp = torch.tensor([[-4.0, -2.0]], requires_grad=True)
    ref = torch.tensor([[-1.0, -1.0]])
    zero = torch.zeros(1, 2)
    mask = torch.ones(1, 2)
    # k3(3) = e^3 - 3 - 1 = 16.085537; k3(1) = e - 1 - 1 = 0.718282
    default = grpo_loss(logp, logp.detach(), ref, zero, mask, None, clip_eps=0.2, kl_coef=1.0, entropy_coef=0.0)
    # default clamp 10: (10 + 0.718282) / 2 = 5.359141
    assert default.kl.item() == pytest.approx(5.359141, abs=1e-5)
    out = grpo_loss(logp, logp.detach(), ref, zero, mask, None, clip_eps=0.2, kl_coef=1.0, entropy_coef=0.0,
                    kl_clamp=5.0)
    # clamp 5: (5 + 0.718282) / 2 = 2.859141; the loss is kl_coef * kl
    assert out.kl.item() == pytest.approx(2.859141, abs=1e-5)
    assert out.loss.item() == pytest.approx(2.859141, abs=1e-5)
    # a clamped token gets no KL gradient; token 1: d/dlogp (e^(ref-logp) - (ref-logp) - 1) / 2
    # = (-e^1 + 1) / 2 = -0.859141
    out.loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, -0.859141]]), atol=1e-5, rtol=0)
    unclamped = grpo_loss(logp, logp.detach(), ref, zero, mask, None, clip_eps=0.2, kl_coef=1.0, entropy_coef=0.0,
                          kl_clamp=20.0)
    # clamp 20 does not bind: (16.085537 + 0.718282) / 2 = 8.401909
    assert unclamped.kl.item() == pytest.approx(8.401909, abs=1e-5)


def test_tis_weights_hand_computed():
    learner = torch.tensor([[-1.0, -2.0, -0.5, -1.0, -3.0]])
    engine = torch.tensor([[-1.0, -2.5, -1.5, -0.5, -100.0]])
    # log ratio learner - engine = [0, 0.5, 1, -0.5, 97]
    # exp = [1, 1.648721, 2.718282, 0.606531, 1.3e42 (overflows float32 to inf)] -> min(., 2) = [1, 1.648721, 2, 0.606531, 2]
    w = tis_weights(learner, engine, cap=2.0)
    torch.testing.assert_close(w, torch.tensor([[1.0, 1.648721, 2.0, 0.606531, 2.0]]), rtol=0, atol=1e-6)
    # a looser cap: e^1 = 2.718282 is no longer truncated
    assert tis_weights(learner, engine, cap=3.0)[0, 2].item() == pytest.approx(2.718282, abs=1e-6)
    with pytest.raises(ValueError, match="cap"):
        tis_weights(learner, engine, cap=0.5)
    with pytest.raises(ValueError, match="shape"):
        tis_weights(learner, engine[:, :3], cap=2.0)


def test_grpo_loss_with_tis_weights_hand_computed():
    # one trajectory, 4 loss tokens and 1 padding; one step per batch: old = logp, so the PPO ratio is 1
    logp = torch.tensor([[-1.0, -2.0, -0.5, -1.0, -3.0]], requires_grad=True)
    engine = torch.tensor([[-1.0, -2.5, -1.5, -0.5, -7.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.0]])
    adv = torch.tensor([[1.0, 1.0, -1.0, 1.0, 1.0]])
    ref = logp.detach() + 1.0  # ref - logp = 1 everywhere
    ent = torch.tensor([[2.0, 2.0, 2.0, 2.0, 99.0]])
    # w = min(exp(logp - engine), 2) = min(exp([0, 0.5, 1, -0.5, 4]), 2) = [1, 1.648721, 2 (truncated from
    # 2.718282), 0.606531, 2 (padding)]
    w = tis_weights(logp.detach(), engine, cap=2.0)
    out = grpo_loss(logp, logp.detach(), ref, adv, mask, ent, clip_eps=0.2, kl_coef=0.1, entropy_coef=0.01,
                    is_weights=w)
    # pg per token = -A * ratio = [-1, -1, 1, -1]; weighted: [-1, -1.648721, 2, -0.606531]
    # pg_loss = (-1 - 1.648721 + 2 - 0.606531) / 4 = -1.255252 / 4 = -0.313813
    assert out.pg_loss.item() == pytest.approx(-0.313813, abs=1e-6)
    # KL and entropy are not weighted: k3(1) = e - 1 - 1 = 0.718282 per token; entropy mean 2
    assert out.kl.item() == pytest.approx(0.718282, abs=1e-6)
    assert out.entropy.item() == pytest.approx(2.0)
    # loss = -0.313813 + 0.1 * 0.718282 - 0.01 * 2 = -0.313813 + 0.0718282 - 0.02 = -0.261985
    assert out.loss.item() == pytest.approx(-0.261985, abs=1e-6)
    # clip_frac and approx_kl are unweighted diagnostics: 0 at ratio 1
    assert out.clip_frac.item() == 0.0 and out.approx_kl.item() == 0.0
    # the weight is a constant of the gradient: d pg_loss / d logp_t = -A_t * w_t * ratio / 4
    # = [-0.25, -0.412180, 0.5, -0.151633, 0]; plus the KL term's 0.1 * (1 - e^1) / 4 = -0.042957 on loss tokens
    out.loss.backward()
    want = torch.tensor([[-0.25, -0.412180, 0.5, -0.151633, 0.0]]) + torch.tensor([[-0.042957] * 4 + [0.0]])
    torch.testing.assert_close(logp.grad, want, rtol=0, atol=1e-5)
    # without weights the same batch gives the unweighted pg_loss (-1 - 1 + 1 - 1) / 4 = -0.5
    plain = grpo_loss(logp, logp.detach(), ref, adv, mask, ent, clip_eps=0.2, kl_coef=0.1, entropy_coef=0.01)
    assert plain.pg_loss.item() == pytest.approx(-0.5)


def test_grpo_loss_unit_weights_are_the_unweighted_loss_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    logp = -torch.rand(3, 6, generator=g) * 3
    old = logp + 0.1 * torch.randn(3, 6, generator=g)
    ref = logp + 0.1 * torch.randn(3, 6, generator=g)
    adv = torch.randn(3, 6, generator=g)
    mask = (torch.rand(3, 6, generator=g) > 0.3).float()
    args = (logp, old, ref, adv, mask, None)
    kwargs = dict(clip_eps=0.2, kl_coef=0.01, entropy_coef=0.0, num_tokens=7.0)
    plain, ones = grpo_loss(*args, **kwargs), grpo_loss(*args, **kwargs, is_weights=torch.ones(3, 6))
    assert torch.equal(plain.loss, ones.loss) and torch.equal(plain.pg_loss, ones.pg_loss)
    with pytest.raises(ValueError, match="is_weights"):
        grpo_loss(*args, **kwargs, is_weights=torch.ones(3, 5))


def test_grpo_loss_only_loss_carries_a_graph():
    logp = torch.zeros(2, 3, requires_grad=True)
    ent = torch.ones(2, 3, requires_grad=True)
    out = grpo_loss(logp, torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 3), torch.ones(2, 3), ent,
                    clip_eps=0.2, kl_coef=0.1, entropy_coef=0.1)
    assert out.loss.requires_grad
    for field in (out.pg_loss, out.kl, out.entropy, out.clip_frac, out.approx_kl):
        assert not field.requires_grad


def test_grpo_loss_rejects_missing_terms_and_bad_shapes():
    z = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="kl_coef"):
        grpo_loss(z, z, None, z, z, z, clip_eps=0.2, kl_coef=0.001, entropy_coef=0.0)
    with pytest.raises(ValueError, match="entropy_coef"):
        grpo_loss(z, z, z, z, z, None, clip_eps=0.2, kl_coef=0.001, entropy_coef=0.001)
    with pytest.raises(ValueError, match="advantages"):
        grpo_loss(z, z, z, torch.zeros(2), z, z, clip_eps=0.2, kl_coef=0.001, entropy_coef=0.001)


# ================================================================================================================
# 2. Plain Python-loop references
# ================================================================================================================


def reference_group_advantages(rewards: list[float], group_size: int, eps: float = 1e-6) -> list[float]:
    out = []
    for start in range(0, len(rewards), group_size):
        group = rewards[start : start + group_size]
        mean = sum(group) / len(group)
        var = sum((r - mean) ** 2 for r in group) / (len(group) - 1)  # Bessel
        std = math.sqrt(var)
        out.extend((r - mean) / (std + eps) for r in group)
    return out


def reference_grpo_loss(logp, old, ref, adv, mask, ent, clip_eps, kl_coef, entropy_coef):
    """One token at a time, with the math module; returns (loss, pg, kl, entropy, clip_frac, approx_kl)."""
    pg_sum = kl_sum = ent_sum = clip_sum = approx_sum = count = 0.0
    for n in range(len(logp)):
        for t in range(len(logp[n])):
            if not mask[n][t]:
                continue
            count += 1
            ratio = math.exp(logp[n][t] - old[n][t])
            unclipped = -adv[n][t] * ratio
            clipped = -adv[n][t] * min(max(ratio, 1 - clip_eps), 1 + clip_eps)
            pg_sum += max(unclipped, clipped)
            clip_sum += 1.0 if clipped > unclipped else 0.0
            log_ratio = min(max(ref[n][t] - logp[n][t], -20.0), 20.0)
            k3 = math.exp(log_ratio) - log_ratio - 1
            kl_sum += min(max(k3, -10.0), 10.0)
            ent_sum += ent[n][t]
            approx_sum += old[n][t] - logp[n][t]
    count = max(count, 1.0)
    pg, kl, entropy = pg_sum / count, kl_sum / count, ent_sum / count
    loss = pg + kl_coef * kl - entropy_coef * entropy
    return loss, pg, kl, entropy, clip_sum / count, approx_sum / count


@pytest.mark.parametrize("group_size", [2, 5, 8])
def test_group_advantages_matches_loop_reference(group_size):
    torch.manual_seed(group_size)
    rewards = torch.rand(6 * group_size, dtype=torch.float64)
    rewards[:group_size] = 0.1  # one degenerate group (all equal)
    rewards[group_size : 2 * group_size] = torch.bernoulli(torch.full((group_size,), 0.5, dtype=torch.float64))
    expected = reference_group_advantages(rewards.tolist(), group_size)
    torch.testing.assert_close(group_advantages(rewards, group_size), torch.tensor(expected, dtype=torch.float64))


def _random_batch(n: int, t: int, seed: int, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(n, t, generator=g, dtype=dtype) * 5
    old = logp + 0.3 * torch.randn(n, t, generator=g, dtype=dtype)  # ratios spread across the clip range
    ref = logp + 2.0 * torch.randn(n, t, generator=g, dtype=dtype)
    ref[0, :2] = logp[0, :2] - 30.0  # hit the ±20 and ±10 clamps
    adv = broadcast_advantages(torch.randn(n, generator=g, dtype=dtype), torch.ones(n, t, dtype=dtype))
    lengths = torch.randint(1, t + 1, (n,), generator=g)
    mask = (torch.arange(t)[None, :] < lengths[:, None]).to(dtype)
    ent = torch.rand(n, t, generator=g, dtype=dtype) * 3
    return logp, old, ref, adv, mask, ent


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_grpo_loss_matches_loop_reference(seed):
    logp, old, ref, adv, mask, ent = _random_batch(6, 9, seed)
    kwargs = dict(clip_eps=0.2, kl_coef=0.05, entropy_coef=0.01)
    out = grpo_loss(logp, old, ref, adv, mask, ent, **kwargs)
    expected = reference_grpo_loss(logp.tolist(), old.tolist(), ref.tolist(), adv.tolist(), mask.tolist(),
                                   ent.tolist(), **kwargs)
    got = (out.loss, out.pg_loss, out.kl, out.entropy, out.clip_frac, out.approx_kl)
    for name, g, e in zip(("loss", "pg_loss", "kl", "entropy", "clip_frac", "approx_kl"), got, expected):
        assert g.item() == pytest.approx(e, rel=1e-9, abs=1e-12), name
    assert 0.0 < out.clip_frac.item() < 1.0  # the random ratios exercised both branches


# ================================================================================================================
# 3. Invariance: gradient accumulation and data-parallel ranks
# ================================================================================================================

N, T, H, V = 8, 6, 5, 11
KWARGS = dict(clip_eps=0.2, kl_coef=0.1, entropy_coef=0.01)


def _policy_batch():
    """A tiny nn.Linear 'policy' over fixed hidden states, with ragged masks so micro-batches differ in token count."""
    torch.manual_seed(0)
    model = nn.Linear(H, V).double()
    hidden = torch.randn(N, T, H, dtype=torch.float64)
    labels = torch.randint(0, V, (N, T))
    lengths = torch.tensor([6, 1, 2, 6, 1, 5, 3, 1])  # token counts per trajectory: micro-batches get 7, 8, 6, 4, ...
    mask = (torch.arange(T)[None, :] < lengths[:, None]).double()
    with torch.no_grad():
        lp = log_probs_from_logits(model(hidden), labels)
        old = lp + 0.2 * torch.randn(N, T, dtype=torch.float64)
        ref = lp + 0.5 * torch.randn(N, T, dtype=torch.float64)
    rewards = torch.tensor([1.0, 0.0, 0.1, 1.0, 0.0, 0.1, 0.1, 1.0], dtype=torch.float64)
    adv = broadcast_advantages(group_advantages(rewards, group_size=4), mask)
    return model, hidden, labels, mask, old, ref, adv


def _micro_loss(model, hidden, labels, mask, old, ref, adv, idx, num_tokens):
    logits = model(hidden[idx])  # [n, T, V]
    logp = log_probs_from_logits(logits, labels[idx])  # [n, T]
    ent = entropy_from_logits(logits)  # [n, T]
    return grpo_loss(logp, old[idx], ref[idx], adv[idx], mask[idx], ent, num_tokens=num_tokens, **KWARGS)


def _grads(model):
    return [p.grad.detach().clone() for p in model.parameters()]


def _full_batch(model, batch):
    model.zero_grad()
    out = _micro_loss(model, *batch, slice(None), None)
    out.loss.backward()
    return out, _grads(model)


@pytest.mark.parametrize("micro_batch_size", [1, 2, 4])
def test_gradient_accumulation_with_global_token_count_equals_full_batch(micro_batch_size):
    model, *batch = _policy_batch()
    mask = batch[2]
    full, full_grads = _full_batch(model, batch)

    model.zero_grad()
    global_tokens = mask.sum()  # every micro-batch divides by the mini-batch's token count
    total = {k: 0.0 for k in ("loss", "pg_loss", "kl", "entropy", "clip_frac", "approx_kl")}
    for start in range(0, N, micro_batch_size):
        out = _micro_loss(model, *batch, slice(start, start + micro_batch_size), global_tokens)
        out.loss.backward()  # grads accumulate
        for k in total:
            total[k] += getattr(out, k).item()

    for k, v in total.items():  # every reported scalar is additive over micro-batches
        assert v == pytest.approx(getattr(full, k).item(), rel=1e-10, abs=1e-12), k
    for g_acc, g_full in zip(_grads(model), full_grads):
        torch.testing.assert_close(g_acc, g_full, rtol=1e-10, atol=1e-12)


def test_averaging_per_micro_batch_token_means_is_not_the_full_batch():
    # The same split, but each micro-batch divides by its own token count and the results are averaged: micro-batches
    # with few tokens (here 1 and 1) weigh as much as ones with many (6 and 6), so loss and gradients are off.
    model, *batch = _policy_batch()
    mask = batch[2]
    full, full_grads = _full_batch(model, batch)
    micro_batch_size = 2
    token_counts = [mask[s : s + micro_batch_size].sum().item() for s in range(0, N, micro_batch_size)]
    assert len(set(token_counts)) > 1  # the precondition that makes the difference: unequal micro-batches

    model.zero_grad()
    n_micro = N // micro_batch_size
    loss = 0.0
    for start in range(0, N, micro_batch_size):
        out = _micro_loss(model, *batch, slice(start, start + micro_batch_size), None)
        (out.loss / n_micro).backward()
        loss += out.loss.item() / n_micro

    assert abs(loss - full.loss.item()) > 1e-3
    diff = max((g - f).abs().max().item() for g, f in zip(_grads(model), full_grads))
    assert diff > 1e-3


def test_emulated_data_parallel_ranks_equal_full_batch():
    # 2 ranks x half batch (each accumulating 2 micro-batches) equals 1 rank x full batch, when every rank divides by
    # global_tokens / world_size and the gradient all-reduce averages over ranks (as DDP and FSDP do).
    model, *batch = _policy_batch()
    mask = batch[2]
    _, full_grads = _full_batch(model, batch)

    world_size, per_rank, micro = 2, N // 2, 2
    global_tokens = mask.sum()
    rank_grads = []
    for rank in range(world_size):
        model.zero_grad()
        for start in range(rank * per_rank, (rank + 1) * per_rank, micro):
            out = _micro_loss(model, *batch, slice(start, start + micro), global_tokens / world_size)
            out.loss.backward()
        rank_grads.append(_grads(model))
    averaged = [sum(gs) / world_size for gs in zip(*rank_grads)]  # what the all-reduce(AVG) produces
    for g_dp, g_full in zip(averaged, full_grads):
        torch.testing.assert_close(g_dp, g_full, rtol=1e-10, atol=1e-12)


def test_token_mean_global_count_sums_to_full_batch():
    torch.manual_seed(3)
    loss = torch.randn(8, 5)
    mask = (torch.rand(8, 5) > 0.4).float()
    full = token_mean(loss, mask)
    parts = sum(token_mean(loss[i : i + 3], mask[i : i + 3], num_tokens=mask.sum()) for i in range(0, 8, 3))
    torch.testing.assert_close(parts, full)


def test_decoupled_ppo_objective_for_stale_rollouts_hand_computed():
    """The stale-rollout correction of ``trainer.schedule=one_step_off`` / ``async``: AReaL's decoupled PPO objective
    (Fu et al., arXiv 2505.24298, eq. 5), ``J = E[ π_prox/π_behav · min(u A, clip(u, 1-ε, 1+ε) A) ]`` with
    ``u = π_θ/π_prox``, as the learner computes it: ``old_log_probs`` = the proximal policy (the learner's weights
    before the update), ``is_weights = tis_weights(prox, behav, C)`` (the behaviour weight, truncated at C).

    One trajectory, two tokens, A = +1, ε = 0.2, C = 2:
      π_behav = (0.5, 0.2)  (the engine's, one policy version old)
      π_prox  = (0.6, 0.1)  → w = min(π_prox/π_behav, 2) = (1.2, 0.5)
      π_θ     = (0.9, 0.1)  → u = (1.5, 1.0); min(u, clip(u)) = (1.2, 1.0)
      J = (1.2·1.2 + 0.5·1.0) / 2 = 0.97, loss = -0.97.
    Gradient w.r.t. log π_θ: token 1 is clipped (u = 1.5 > 1.2 with A > 0), so 0; token 2: -w·u / 2 = -0.25.
    A third, stale token whose behaviour probability is 0.01 against the proximal 0.5 would weigh 50: C caps it
    at 2 (checked on ``tis_weights`` alone)."""
    behav = torch.tensor([[0.5, 0.2]]).log()
    prox = torch.tensor([[0.6, 0.1]]).log()
    theta = torch.tensor([[0.9, 0.1]]).log().requires_grad_(True)
    w = grpo.tis_weights(prox, behav, cap=2.0)
    assert torch.allclose(w, torch.tensor([[1.2, 0.5]]))
    out = grpo.grpo_loss(theta, prox, None, torch.ones(1, 2), torch.ones(1, 2), None, clip_eps=0.2, kl_coef=0.0,
                         entropy_coef=0.0, is_weights=w)
    assert out.loss.item() == pytest.approx(-0.97, abs=1e-6)
    out.loss.backward()
    assert torch.allclose(theta.grad, torch.tensor([[0.0, -0.25]]), atol=1e-6)
    assert grpo.tis_weights(torch.tensor([0.5]).log(), torch.tensor([0.01]).log(), cap=2.0).item() == 2.0
