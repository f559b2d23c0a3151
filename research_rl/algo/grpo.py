"""GRPO math: group-normalised advantages, the clipped policy loss, KL and entropy terms, loss aggregation.

Implements the training objective of ReSearch (Chen et al., arXiv 2503.19470), §2.2 (the GRPO objective):

    J(θ) = E[ 1/G Σ_i 1/|o_i| Σ_t ( min(r_{i,t}(θ) Â_{i,t}, clip(r_{i,t}(θ), 1-ε, 1+ε) Â_{i,t})
                                    - β D_KL(π_θ || π_ref) ) ]

with r_{i,t}(θ) = π_θ(o_{i,t} | ·) / π_θ_old(o_{i,t} | ·), where the group-relative outcome advantage
Â_{i,t} = (r_i - mean(r)) / std(r) over the G rollouts of one prompt is broadcast to every response token, as in
DeepSeekMath (Shao et al., arXiv 2402.03300), §4.1.2 "Outcome Supervision RL with GRPO". Tokens the model did not
generate (prompt, inserted ``<result>`` passages, padding) carry loss mask 0 and never contribute.

Choices made here, each matching the reference implementation (verl, ``verl/trainer/ppo/core_algos.py``):

- std is ``torch.std`` (unbiased, Bessel's correction) and the denominator is ``std + eps`` with eps = 1e-6, as verl's
  ``compute_grpo_outcome_advantage``; a group whose rewards are all equal gets advantage 0 on every trajectory.
- The KL to the frozen reference policy is a term in the loss (not a penalty folded into the reward), estimated per
  token with the k3 estimator ``exp(ref - logp) - (ref - logp) - 1`` (Schulman, "Approximating KL Divergence", 2020),
  which is what DeepSeekMath eq. (4) uses; verl calls it ``low_var_kl`` and clamps it to ±10 (``algo.kl_clamp``).

Engine/learner mismatch (off by default, ``algo.rollout_is=tis``): the rollout engine (vLLM's bf16 kernels) samples
from probabilities π_engine slightly different from the π_learner the learner computes for the same weights, so
the batch is off-policy by that much. Truncated importance sampling (TIS; Yao et al., "Your Efficient RL Framework
Secretly Brings You Off-Policy RL Training", 2025; verl's ``rollout_is`` in ``verl/trainer/ppo/mismatch_helper.py``
and ``compute_policy_loss``) multiplies each token's clipped policy-gradient term by the detached weight
``w_t = min(π_learner(y_t) / π_engine(y_t), C)`` (``tis_weights``); the KL and entropy terms are not weighted.

Deliberate deviations from the paper's formula, following the reference (verl) training configuration:

- **Token-mean aggregation.** The paper's objective averages each trajectory over its own length (1/|o_i|) and then
  over the group (sequence-mean). We sum over every unmasked token of the batch and divide by the batch's token count
  (``loss_agg_mode=token-mean``), so long trajectories weigh in proportion to their length. ``token_mean`` takes the
  global token count so that gradient accumulation over micro-batches and data-parallel ranks is exact.
- **Entropy bonus.** The loss subtracts ``entropy_coef`` (0.001 in the reference config) times the token-mean entropy
  of the policy; the paper's objective has no entropy term.

Everything here is a pure function over tensors: no config objects and no ``torch.distributed`` calls.
Shapes: N = trajectories in the (micro-)batch (= B prompts × G group size), T = padded response length, V = vocab.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "GRPOLossOutput",
    "broadcast_advantages",
    "entropy_from_logits",
    "group_advantages",
    "grpo_loss",
    "log_probs_from_logits",
    "low_var_kl",
    "masked_mean",
    "masked_sum",
    "policy_loss",
    "tis_weights",
    "token_mean",
]


def _check_same_shape(**tensors: Tensor | None) -> None:
    """Raise ValueError unless every non-None tensor has the shape of the first one."""
    named = [(name, t) for name, t in tensors.items() if t is not None]
    first_name, first = named[0]
    for name, t in named[1:]:
        if t.shape != first.shape:
            raise ValueError(
                f"{name} has shape {tuple(t.shape)} but {first_name} has shape {tuple(first.shape)}; "
                "all per-token tensors must be [N, T]"
            )


def _compute_dtype(logits: Tensor) -> torch.dtype:
    """float32 for half-precision logits (softmax in bf16 is too coarse), the input dtype otherwise."""
    return torch.promote_types(logits.dtype, torch.float32)


# ----------------------------------------------------------------------------------------------------------------
# Advantages
# ----------------------------------------------------------------------------------------------------------------


def group_advantages(rewards: Tensor, group_size: int, eps: float = 1e-6) -> Tensor:
    """Group-normalised outcome advantages, one per trajectory.

    Args:
        rewards: [B*G] float, one scalar reward per trajectory. Consecutive blocks of ``group_size`` are the rollouts of
            one prompt: trajectory i belongs to group ``i // group_size``.
        group_size: G, rollouts per prompt (the paper uses 5). Must be >= 2, since a group std needs two samples.
        eps: added to the group std, so a group with identical rewards gets advantage 0 rather than NaN.

    Returns:
        [B*G] float, ``(r - mean_group) / (std_group + eps)`` with ``std`` unbiased (Bessel's correction).

    Raises:
        ValueError: if ``rewards`` is not 1-D, ``group_size < 2``, or ``rewards.numel()`` is not a multiple of
            ``group_size``.

    Source: DeepSeekMath (arXiv 2402.03300) §4.1.2; verl ``compute_grpo_outcome_advantage`` (``torch.std``, ``+ eps``).
    """
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2 for a group std, got {group_size}")
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [B*G], got shape {tuple(rewards.shape)}")
    if rewards.numel() % group_size != 0:
        raise ValueError(
            f"rewards has {rewards.numel()} entries, not a multiple of group_size={group_size}; "
            "each prompt must contribute exactly group_size trajectories"
        )
    if not rewards.is_floating_point():
        rewards = rewards.float()
    grouped = rewards.view(-1, group_size)  # [B, G]
    mean = grouped.mean(dim=1, keepdim=True)  # [B, 1]
    std = grouped.std(dim=1, keepdim=True)  # [B, 1], unbiased
    return ((grouped - mean) / (std + eps)).reshape(-1)  # [B*G]


def broadcast_advantages(advantages: Tensor, loss_mask: Tensor) -> Tensor:
    """Put each trajectory's advantage on every one of its response tokens.

    Args:
        advantages: [N] float, one per trajectory (from ``group_advantages``).
        loss_mask: [N, T], 1 on trained (generated) tokens, 0 elsewhere; bool, int or float.

    Returns:
        [N, T] in ``advantages``' dtype: ``advantages[i] * loss_mask[i, t]`` (0 on masked-out tokens).

    Raises:
        ValueError: if ``advantages`` is not [N] or ``loss_mask`` is not [N, T] with the same N.

    Source: DeepSeekMath (arXiv 2402.03300) §4.1.2, "Â_{i,t} = r̃_i for every token"; verl
    ``compute_grpo_outcome_advantage`` (``scores.unsqueeze(-1) * response_mask``).
    """
    if advantages.dim() != 1 or loss_mask.dim() != 2 or advantages.shape[0] != loss_mask.shape[0]:
        raise ValueError(
            f"expected advantages [N] and loss_mask [N, T], got {tuple(advantages.shape)} and {tuple(loss_mask.shape)}"
        )
    return advantages.unsqueeze(-1) * loss_mask.to(advantages.dtype)  # [N, 1] * [N, T] -> [N, T]


# ----------------------------------------------------------------------------------------------------------------
# Aggregation
# ----------------------------------------------------------------------------------------------------------------


def masked_sum(x: Tensor, mask: Tensor) -> Tensor:
    """Sum of ``x`` over the positions where ``mask`` is non-zero, over all elements.

    Args:
        x: any shape, float. mask: same shape as ``x`` (or broadcastable), bool/int/float.

    Returns:
        scalar, ``sum(x * mask)``.
    """
    return (x * mask.to(x.dtype)).sum()


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``x`` over the positions where ``mask`` is non-zero, over all elements.

    Args:
        x: any shape, float. mask: same shape as ``x`` (or broadcastable), bool/int/float.

    Returns:
        scalar, ``sum(x * mask) / max(sum(mask), 1)``; 0 (not NaN) when the mask is empty.
    """
    mask = mask.to(x.dtype)
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


def token_mean(loss: Tensor, mask: Tensor, num_tokens: float | Tensor | None = None) -> Tensor:
    """Masked token-mean aggregation of a per-token loss: ``sum(loss * mask) / num_tokens``.

    Args:
        loss: [N, T] float, per-token values.
        mask: [N, T], loss mask.
        num_tokens: the denominator. ``None`` uses this batch's own count, ``max(mask.sum(), 1)``. Pass the token count
            of the WHOLE mini-batch (every micro-batch on every rank) to make gradient accumulation exact: summing
            ``token_mean(micro, num_tokens=global)`` over micro-batches gives ``token_mean(full batch)``, whereas
            averaging per-micro-batch token-means over-weights the tokens of short micro-batches. Under data-parallel
            training whose all-reduce *averages* gradients over W ranks (DDP, FSDP), pass ``global / W`` instead so
            that the average of the ranks' gradients equals the full-batch gradient.

    Returns:
        scalar.

    Raises:
        ValueError: if ``num_tokens`` is a Python number <= 0. (A tensor is not checked, to avoid a device sync.)

    Source: verl ``agg_loss(loss_agg_mode="token-mean")``; the global denominator as in OpenRLHF/TRL loss
    aggregation for gradient accumulation.
    """
    if num_tokens is None:
        num_tokens = mask.to(loss.dtype).sum().clamp(min=1.0)
    elif isinstance(num_tokens, numbers.Real) and num_tokens <= 0:
        raise ValueError(f"num_tokens must be > 0, got {num_tokens}")
    return masked_sum(loss, mask) / num_tokens


# ----------------------------------------------------------------------------------------------------------------
# Per-token terms
# ----------------------------------------------------------------------------------------------------------------


def low_var_kl(log_probs: Tensor, ref_log_probs: Tensor, clamp: float = 10.0) -> Tensor:
    """Per-token k3 estimate of KL(π_θ || π_ref): ``exp(ref - logp) - (ref - logp) - 1``, clamped to ±``clamp``.

    Non-negative and unbiased for samples from π_θ; lower variance than ``logp - ref`` (k1).

    Args:
        log_probs: [N, T] log π_θ of the sampled tokens. ref_log_probs: [N, T] log π_ref of the same tokens.
        clamp: bound on the returned value (verl uses 10). The log-ratio is also clamped to ±20 before ``exp`` so a
            far-off token cannot overflow.

    Returns:
        [N, T] float, elementwise (unmasked; aggregate with ``token_mean``).

    Raises:
        ValueError: if the shapes differ.

    Source: J. Schulman, "Approximating KL Divergence" (2020), k3; DeepSeekMath (arXiv 2402.03300) eq. (4);
    verl ``kl_penalty(..., "low_var_kl")``.
    """
    _check_same_shape(log_probs=log_probs, ref_log_probs=ref_log_probs)
    kl = (ref_log_probs - log_probs).clamp(min=-20.0, max=20.0)  # [N, T] log(π_ref / π_θ)
    ratio = torch.exp(kl)  # [N, T]
    k3 = ratio - kl - 1.0  # [N, T]
    return k3.clamp(min=-clamp, max=clamp)


def policy_loss(log_probs: Tensor, old_log_probs: Tensor, advantages: Tensor, clip_eps: float) -> tuple[Tensor, Tensor]:
    """PPO clipped surrogate loss per token (to be minimised).

    ``ratio = exp(logp - old)``; ``l1 = -A * ratio``; ``l2 = -A * clamp(ratio, 1 - eps, 1 + eps)``;
    ``loss = max(l1, l2)`` (the negation of PPO's pessimistic ``min``).

    Args:
        log_probs: [N, T] log π_θ (carries the gradient).
        old_log_probs: [N, T] log π_θ_old at rollout time (no grad).
        advantages: [N, T], already broadcast to tokens. clip_eps: ε (the paper uses 0.2).

    Returns:
        ``(loss [N, T], clipped [N, T] bool)``, ``clipped`` where the clipped branch is active (``l2 > l1``), i.e.
        the token gets no gradient. Both unmasked.

    Raises:
        ValueError: if the shapes differ or ``clip_eps`` is negative.

    Source: Schulman et al., PPO (arXiv 1707.06347) eq. (7); ReSearch (arXiv 2503.19470) §2.2;
    verl ``compute_policy_loss`` (``pg_losses = max(pg_losses1, pg_losses2)``, clipfrac ``pg_losses2 > pg_losses1``).
    """
    _check_same_shape(log_probs=log_probs, old_log_probs=old_log_probs, advantages=advantages)
    if clip_eps < 0:
        raise ValueError(f"clip_eps must be >= 0, got {clip_eps}")
    ratio = torch.exp(log_probs - old_log_probs)  # [N, T]
    l1 = -advantages * ratio  # [N, T]
    l2 = -advantages * ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps)  # [N, T]
    return torch.maximum(l1, l2), l2 > l1


def tis_weights(learner_log_probs: Tensor, engine_log_probs: Tensor, cap: float) -> Tensor:
    """Truncated importance-sampling weights of the sampled tokens: ``w_t = min(exp(learner - engine), cap)``.

    The batch was sampled by the rollout engine (π_engine) but the loss differentiates the learner's π_learner; per
    token, ``π_learner / π_engine`` re-weights the engine's samples toward the learner's distribution, and the
    truncation at ``cap`` (C) bounds the variance a token the engine found unlikely would add. No lower bound: a
    weight near 0 only shrinks that token's term. The result carries no gradient.

    Args:
        learner_log_probs: [N, T] log π_learner of the sampled tokens on the behaviour side (``old_log_probs``, or
            the policy's own log-probs, detached, with one optimizer step per batch).
        engine_log_probs: [N, T] log π_engine, as the rollout engine reported them (``rollout_log_probs``).
        cap: C >= 1 (verl's default 2.0).

    Returns:
        [N, T] float, detached, in ``(0, cap]`` where both log-probs are finite (unmasked; 1 where both are 0).

    Raises:
        ValueError: if the shapes differ or ``cap < 1``.

    Source: Yao et al. 2025 (TIS, token level, truncation C); verl ``compute_rollout_importance_weights``
    (``rollout_is_level=token``, ``rollout_is_mode=truncate``: ``exp(old_log_prob - rollout_log_prob)`` clamped
    above at ``rollout_is_threshold``).
    """
    _check_same_shape(learner_log_probs=learner_log_probs, engine_log_probs=engine_log_probs)
    if cap < 1:
        raise ValueError(f"cap must be >= 1, got {cap}")
    with torch.no_grad():
        return torch.exp(learner_log_probs.detach() - engine_log_probs).clamp(max=cap)  # [N, T]; inf -> cap


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of the categorical distribution at every position.

    ``H = logsumexp(z) - Σ_v softmax(z)_v z_v`` (equal to ``-Σ p log p``, without forming ``log p``), computed on
    ``z - max(z)``: the formula is shift-invariant, and shifting removes the cancellation between two terms of the
    size of the logits (at |z| ~ 1000, float32 would otherwise lose ~1e-4 nats).

    Args:
        logits: [N, T, V] finite logits. bf16/fp16 are computed in float32; float32/float64 keep their dtype.

    Returns:
        [N, T] in nats, float32 (or float64 for float64 logits).

    Source: verl ``verl/utils/torch_functional.py::entropy_from_logits`` (plus the max shift).
    """
    z = logits.to(_compute_dtype(logits))  # [N, T, V]
    z = z - z.amax(dim=-1, keepdim=True)  # [N, T, V], max 0
    probs = torch.softmax(z, dim=-1)  # [N, T, V]
    return torch.logsumexp(z, dim=-1) - (probs * z).sum(dim=-1)  # [N, T]


def log_probs_from_logits(logits: Tensor, labels: Tensor) -> Tensor:
    """Log-probability of each label under the softmax of its logits.

    Computed as ``z[label] - logsumexp(z)``, which never materialises a full [N, T, V] log-softmax copy; bf16/fp16
    logits are upcast to float32 (float32/float64 keep their dtype).

    Args:
        logits: [N, T, V], position t predicts ``labels[:, t]`` (shift before calling). labels: [N, T] int64 token ids.

    Returns:
        [N, T] float32 (or float64 for float64 logits).

    Raises:
        ValueError: if ``labels.shape != logits.shape[:-1]``.

    Source: OpenRLHF ``log_probs_from_logits`` (gathered logit minus logsumexp); equal to verl's
    ``logprobs_from_logits_naive`` (log-softmax, then gather).
    """
    if labels.shape != logits.shape[:-1]:
        raise ValueError(f"labels shape {tuple(labels.shape)} does not match logits {tuple(logits.shape)} minus vocab")
    logits = logits.to(_compute_dtype(logits))  # [N, T, V]
    picked = logits.gather(dim=-1, index=labels.unsqueeze(-1)).squeeze(-1)  # [N, T]
    return picked - torch.logsumexp(logits, dim=-1)  # [N, T]


# ----------------------------------------------------------------------------------------------------------------
# The GRPO loss
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class GRPOLossOutput:
    """Result of ``grpo_loss``. Only ``loss`` carries a graph; the rest are detached scalars for logging.

    With ``num_tokens`` set to the global count, every field is this micro-batch's share: summing a field over the
    micro-batches (and ranks) of a mini-batch gives its full-batch value.
    """

    loss: Tensor  # scalar to backprop
    pg_loss: Tensor  # scalar, token-mean clipped surrogate (weighted by is_weights when given)
    kl: Tensor  # scalar, token-mean of low_var_kl(logp, ref); 0 without a reference policy
    entropy: Tensor  # scalar, token-mean entropy; 0 when no entropy was given
    clip_frac: Tensor  # scalar, fraction of masked tokens where the clip is active
    approx_kl: Tensor  # scalar, token-mean of (old - logp): drift from the rollout policy, diagnostic


def grpo_loss(
    log_probs: Tensor,
    old_log_probs: Tensor,
    ref_log_probs: Tensor | None,
    advantages: Tensor,
    loss_mask: Tensor,
    entropy: Tensor | None,
    clip_eps: float,
    kl_coef: float,
    entropy_coef: float,
    num_tokens: float | Tensor | None = None,
    kl_clamp: float = 10.0,
    is_weights: Tensor | None = None,
) -> GRPOLossOutput:
    """The GRPO loss of one (micro-)batch.

    ``loss = token_mean(w * pg) + kl_coef * token_mean(low_var_kl(logp, ref)) - entropy_coef * token_mean(entropy)``,
    every term with the same ``num_tokens`` (see ``token_mean``), where ``pg`` is the clipped surrogate per token
    (``policy_loss``) and ``w`` the per-token weight ``is_weights`` (1 when None). With truncated importance sampling
    ``w_t = min(π_learner(y_t) / π_engine(y_t), C)`` (``tis_weights``): it multiplies the clipped term after the
    clip, and the KL and entropy terms are not weighted (verl ``compute_policy_loss``: ``pg_losses *
    rollout_is_weights``; Yao et al. 2025).

    Args:
        log_probs: [N, T] log π_θ of the response tokens (with grad).
        old_log_probs: [N, T] log π_θ_old, recorded before the update (no grad).
        ref_log_probs: [N, T] log π_ref of the frozen initial policy, or None when ``kl_coef == 0``.
        advantages: [N, T], already broadcast (``broadcast_advantages``).
        loss_mask: [N, T], 1 on generated tokens, 0 on prompt / ``<result>`` insertions / padding.
        entropy: [N, T] policy entropy per position (``entropy_from_logits``, with grad), or None when
            ``entropy_coef == 0``.
        clip_eps: PPO ε (paper: 0.2). kl_coef: β (paper: 0.001). entropy_coef: entropy bonus (reference: 0.001).
        num_tokens: token-mean denominator; None = this batch's own token count. Pass the mini-batch's global count
            for gradient accumulation.
        kl_clamp: bound on the per-token KL estimate (``low_var_kl``'s ``clamp``; verl and the default use 10), so
            one far-off token cannot dominate the KL term; a clamped token gets no KL gradient.
        is_weights: [N, T] per-token weights of the policy-gradient term (``tis_weights``), or None (no
            weighting: the loss is exactly the unweighted one). Used detached; ``clip_frac`` and ``approx_kl`` are
            not weighted.

    Returns:
        ``GRPOLossOutput``.

    Raises:
        ValueError: if shapes differ, or ``kl_coef != 0`` without ``ref_log_probs``, or ``entropy_coef != 0``
            without ``entropy`` (we refuse rather than silently drop a term).

    Source: ReSearch (arXiv 2503.19470) §2.2 with verl's token-mean aggregation and entropy bonus (see
    module docstring); verl ``DataParallelPPOActor.update_policy``.
    """
    _check_same_shape(
        log_probs=log_probs,
        old_log_probs=old_log_probs,
        ref_log_probs=ref_log_probs,
        advantages=advantages,
        loss_mask=loss_mask,
        entropy=entropy,
        is_weights=is_weights,
    )
    if kl_coef != 0 and ref_log_probs is None:
        raise ValueError(f"kl_coef={kl_coef} needs ref_log_probs, got None")
    if entropy_coef != 0 and entropy is None:
        raise ValueError(f"entropy_coef={entropy_coef} needs entropy, got None")

    pg, clipped = policy_loss(log_probs, old_log_probs, advantages, clip_eps)  # [N, T], [N, T]
    if is_weights is not None:
        pg = pg * is_weights.detach()  # [N, T]; after the clip, as verl
    pg_loss = token_mean(pg, loss_mask, num_tokens)
    loss = pg_loss

    zero = log_probs.new_zeros(())
    kl = zero
    if ref_log_probs is not None:
        kl = token_mean(low_var_kl(log_probs, ref_log_probs, clamp=kl_clamp), loss_mask, num_tokens)
        if kl_coef != 0:
            loss = loss + kl_coef * kl

    ent = zero
    if entropy is not None:
        ent = token_mean(entropy, loss_mask, num_tokens)
        if entropy_coef != 0:
            loss = loss - entropy_coef * ent  # a bonus: higher entropy lowers the loss

    with torch.no_grad():
        clip_frac = token_mean(clipped.to(log_probs.dtype), loss_mask, num_tokens)
        approx_kl = token_mean(old_log_probs - log_probs, loss_mask, num_tokens)

    return GRPOLossOutput(
        loss=loss,
        pg_loss=pg_loss.detach(),
        kl=kl.detach(),
        entropy=ent.detach(),
        clip_frac=clip_frac,
        approx_kl=approx_kl,
    )
