"""The LM head over chunks of scored tokens, and sequences packed into one row (DESIGN: Learner; docs/learner.md).

Two ways the learner spends memory and compute at 7B scale that this module removes:

- **Logits.** With a 152,064-token vocabulary, ``[K, V]`` logits of ``K`` scored tokens and the log-softmax and
  entropy built on them hold ~2.3 MiB of saved activations per token until backward. ``head_log_probs`` computes
  the head, ``logits / T``, the log-prob of each label and the entropy ``chunk`` tokens at a time and keeps only
  the head's input ``[K, d]`` (and its weight, a parameter) for backward, where each chunk is recomputed and
  differentiated on its own: at most one ``[chunk, V]`` block exists at a time, in forward and in backward. The
  same recompute-in-backward as ``torch.utils.checkpoint`` (reentrant form), written as one autograd function so
  that every chunk shares one saved input and its gradients accumulate in float32. After verl's
  ``entropy_from_logits_with_chunking`` and Liger-Kernel's fused linear cross-entropy (which fuses further, in
  Triton); the math is ``research_rl.algo.grpo``'s, so values equal the unchunked path up to float rounding.
- **Padding.** ``pack_rows`` lays right-padded rows end to end in one ``[1, T]`` row with position ids that restart
  at 0 per sequence; transformers turns restarting position ids (with no attention mask and no cache) into a
  block-diagonal causal mask (``masking_utils.find_packed_sequence_indices``), so each sequence attends to itself
  alone and the values equal the padded batch's at every real position (RoPE reads the same positions).

This module imports torch and ``research_rl.algo.grpo`` only, so ``bench/gpu_check_learner.py`` runs it on a
machine with torch and transformers alone.
"""

from __future__ import annotations

import torch
from torch import Tensor

from research_rl.algo import grpo


def _head(hidden: Tensor, weight: Tensor, labels: Tensor, temperature: float, with_entropy: bool,
          entropy_grad: bool) -> tuple[Tensor, Tensor | None]:
    """log π(label) and the entropy for one chunk: ``hidden [k, d]``, ``weight [V, d]`` -> ``[k]``, ``[k]`` float32."""
    logits = torch.nn.functional.linear(hidden, weight)  # [k, V]
    if temperature != 1.0:
        logits = logits / temperature
    log_probs = grpo.log_probs_from_logits(logits, labels).float()  # [k]
    entropy = None
    if with_entropy:
        if entropy_grad:
            entropy = grpo.entropy_from_logits(logits).float()
        else:
            with torch.no_grad():
                entropy = grpo.entropy_from_logits(logits).float()
    return log_probs, entropy


class _ChunkedHead(torch.autograd.Function):
    """Forward without a graph, chunk by chunk; backward recomputes each chunk with a graph and differentiates it."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, temperature, chunk, with_entropy, entropy_grad):
        ctx.temperature, ctx.chunk, ctx.with_entropy, ctx.entropy_grad = temperature, chunk, with_entropy, entropy_grad
        ctx.save_for_backward(hidden, weight, labels)
        lp, ent = [], []
        with torch.no_grad():
            for s in range(0, hidden.shape[0], chunk):
                a, b = _head(hidden[s:s + chunk], weight, labels[s:s + chunk], temperature, with_entropy, False)
                lp.append(a)
                ent.append(b if with_entropy else a.new_zeros(a.shape))
        log_probs, entropy = torch.cat(lp), torch.cat(ent)  # [K], [K]
        if not (with_entropy and entropy_grad):
            ctx.mark_non_differentiable(entropy)
        return log_probs, entropy

    @staticmethod
    def backward(ctx, grad_lp, grad_ent):
        hidden, weight, labels = ctx.saved_tensors
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        acc = torch.promote_types(weight.dtype, torch.float32)  # accumulate half-precision weight gradients in fp32
        grad_h = torch.zeros_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        use_ent = ctx.with_entropy and ctx.entropy_grad and grad_ent is not None
        for s in range(0, hidden.shape[0], ctx.chunk):
            h = hidden[s:s + ctx.chunk].detach().requires_grad_(need_h)
            w = weight.detach().requires_grad_(need_w)
            with torch.enable_grad():
                lp, ent = _head(h, w, labels[s:s + ctx.chunk], ctx.temperature, use_ent, use_ent)
                outputs, grads = [lp], [grad_lp[s:s + ctx.chunk]]
                if use_ent:
                    outputs.append(ent)
                    grads.append(grad_ent[s:s + ctx.chunk])
                inputs = [t for t, need in ((h, need_h), (w, need_w)) if need]
                got = list(torch.autograd.grad(outputs, inputs, grads))
            if need_h:
                grad_h[s:s + ctx.chunk] = got.pop(0)
            if need_w:
                grad_w += got.pop(0)
        return grad_h, (grad_w.to(weight.dtype) if need_w else None), None, None, None, None, None


def head_log_probs(hidden: Tensor, weight: Tensor, labels: Tensor, temperature: float = 1.0, chunk: int = 0,
                   with_entropy: bool = True, entropy_grad: bool = False) -> tuple[Tensor, Tensor | None]:
    """Log-probs of ``labels`` and the entropy under ``softmax(hidden @ weight.T / temperature)``.

    Args:
        hidden: ``[K, d]`` final hidden states of the scored positions (the LM head's input).
        weight: ``[V, d]`` the LM head's weight (bias-free, as in Qwen2 and Llama).
        labels: ``[K]`` int64 next-token ids.
        temperature: the sampling temperature (logits are divided by it; nothing is divided at 1).
        chunk: scored tokens per chunk; ``0`` computes the ``[K, V]`` logits at once with autograd (today's path).
        with_entropy: also return the entropy (``grpo.entropy_from_logits``), else None.
        entropy_grad: keep the entropy in the graph (an entropy bonus); otherwise it is detached.

    Returns:
        ``([K], [K] or None)`` float32 on ``hidden``'s device: log π(label) and the entropy in nats. With ``chunk > 0``
        both equal the ``chunk = 0`` values, and so do the gradients of ``hidden`` and ``weight``, up to float
        rounding (tests/test_learner_memory.py).

    Raises:
        ValueError: ``chunk < 0``, or shapes that do not match.
    """
    if chunk < 0:
        raise ValueError(f"chunk must be >= 0 (0 = unchunked), got {chunk}")
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1] or labels.shape != hidden.shape[:1]:
        raise ValueError(f"expected hidden [K, d], weight [V, d], labels [K]; got {tuple(hidden.shape)}, "
                         f"{tuple(weight.shape)}, {tuple(labels.shape)}")
    if chunk == 0:
        return _head(hidden, weight, labels, temperature, with_entropy, entropy_grad)
    log_probs, entropy = _ChunkedHead.apply(hidden, weight, labels, temperature, chunk, with_entropy, entropy_grad)
    return log_probs, (entropy if with_entropy else None)


def pack_rows(input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Right-padded rows end to end in one row, without padding.

    Args:
        input_ids: ``[n, l]`` int64. attention_mask: ``[n, l]``, 1 on each row's first ``len_i`` tokens, then 0.

    Returns:
        ``ids [1, T]``, ``position_ids [1, T]`` (0 .. len_i - 1 per row) and ``lengths [n]``; ``T = Σ len_i``.

    Raises:
        ValueError: a row is not right-padded (a 0 before a 1) or is empty.
    """
    attention = attention_mask.bool()
    lengths = attention.sum(dim=1)  # [n]
    if bool((attention[:, 1:] & ~attention[:, :-1]).any()) or bool((lengths == 0).any()):
        raise ValueError("packing needs right-padded, non-empty rows (attention_mask 1...1 0...0)")
    ids = input_ids[attention].unsqueeze(0)  # [1, T], row-major: row 0's tokens, then row 1's, ...
    starts = torch.cumsum(lengths, 0) - lengths  # [n]
    pos = torch.arange(ids.shape[1], device=ids.device) - torch.repeat_interleave(starts, lengths)
    return ids, pos.unsqueeze(0), lengths
