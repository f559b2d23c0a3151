"""Forward passes over an ``Experience``: micro-batch plans and the log-probs of the scored tokens (DESIGN: Learner).

Shared by the trainable policy (``research_rl.learner.core.Learner``) and the frozen reference policy
(``research_rl.learner.reference.ReferencePolicy``); the model is whatever a backend wraps (an FSDP2 module, a
DeepSpeed engine, or a plain module), called like the Hugging Face model.

Micro-batches: fixed ``micro_batch_size`` rows in batch order, or, with ``max_tokens_per_micro_batch``, rows
sorted by length and packed first-fit so that rows × longest row ≤ the budget (``plan_micro_batches``). Every
rank of a group runs the same number of micro-batches (collectives in FSDP2/ZeRO-3 forward and in backward need
it): a rank with fewer pads with zero-weighted ones (``rank_plan``).
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from research_rl.algo import grpo
from research_rl.algo.experience import Experience
from research_rl.config.schema import LearnerConfig
from research_rl.learner.group import all_reduce


def plan_micro_batches(lengths: list[int], micro_batch_size: int, max_tokens: int | None) -> list[list[int]]:
    """Group row indices into micro-batches.

    Args:
        lengths: attended length of each row (tokens).
        micro_batch_size: rows per micro-batch when ``max_tokens`` is None (batch order kept).
        max_tokens: token budget per micro-batch, counted as padded tokens = rows × longest row. Rows are sorted
            longest first and each goes into the first micro-batch it fits (first-fit decreasing); a row longer
            than the budget gets a micro-batch of its own.

    Returns:
        Lists of row indices; every row appears exactly once.
    """
    n = len(lengths)
    if max_tokens is None:
        return [list(range(i, min(i + micro_batch_size, n))) for i in range(0, n, micro_batch_size)]
    groups: list[list[int]] = []
    for i in sorted(range(n), key=lambda i: (-lengths[i], i)):
        for g in groups:  # the first row of a group is its longest
            if (len(g) + 1) * lengths[g[0]] <= max_tokens:
                g.append(i)
                break
        else:
            groups.append([i])
    return groups


def rank_plan(exp: Experience, cfg: LearnerConfig, world_size: int, device: torch.device) -> list[list[int] | None]:
    """This rank's micro-batches of ``exp`` (``plan_micro_batches`` with ``cfg``'s sizes), padded with ``None`` (a
    zero-weighted pass) to the most any rank of the group has. Every rank must call it (an all-reduce).

    Raises:
        ValueError: ``exp`` has no rows.
    """
    if len(exp) == 0:
        raise ValueError("the learner got an empty batch")
    lengths = exp.attention_mask.sum(dim=1).tolist()
    plan: list[list[int] | None] = plan_micro_batches(lengths, cfg.micro_batch_size, cfg.max_tokens_per_micro_batch)
    most = int(all_reduce([float(len(plan))], world_size, device, op=dist.ReduceOp.MAX)[0])
    return plan + [None] * (most - len(plan))


def micro_batch(exp: Experience, rows: list[int]) -> Experience:
    """Rows ``rows`` of ``exp`` (copies), trimmed to their longest attended sequence (no compute on shared
    padding): ``[n, l]`` sequences and ``[n, l-1]`` log-probs, ``l`` = the longest row of the micro-batch."""
    mb = exp.select(rows)
    width = int(mb.attention_mask.sum(dim=1).max())

    def trim(t: torch.Tensor | None, w: int) -> torch.Tensor | None:
        return None if t is None else t[:, :w]

    return mb.replace(input_ids=mb.input_ids[:, :width], attention_mask=mb.attention_mask[:, :width],
                      loss_mask=mb.loss_mask[:, :width], ref_log_probs=trim(mb.ref_log_probs, width - 1),
                      old_log_probs=trim(mb.old_log_probs, width - 1))


def token_log_probs(model: torch.nn.Module, mb: Experience, device: torch.device, with_entropy: bool,
                    entropy_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs (and entropy) of the next token at every position ``t`` with ``loss_mask[t + 1] = 1``, each
    ``[n, l-1]`` float32 on ``device``; zero at every other position.

    Logits are only computed where the loss reads them: a forward pre-hook on the output embeddings (the LM head)
    hands it the final hidden states of the scored positions alone, ``[1, K, d]`` for ``K`` loss tokens, instead
    of ``[n, l, d]``. In a ReSearch trajectory most positions are prompt and inserted ``<result>`` passages, so
    this skips most of the vocabulary projection, the log-softmax and their backward (a generalisation of
    transformers' ``logits_to_keep``). The values at the scored positions are those of the full forward.
    Logits are divided by ``mb.temperature`` first (the sampling distribution; nothing is divided at 1).

    Args:
        model: the wrapped model (a DeepSpeed engine's HF model is its ``.module``).
        mb: a micro-batch (``micro_batch``); its ``input_ids``, ``attention_mask`` and ``loss_mask`` are read.
        with_entropy: also return the entropy of the next-token distribution (``grpo.entropy_from_logits``).
        entropy_grad: keep the entropy in the graph (an entropy bonus); otherwise it is a detached metric.
    """
    ids = mb.input_ids.to(device)
    n, width = ids.shape
    scored = mb.loss_mask[:, 1:].to(device).bool()  # [n, l-1]: position t scores token t+1
    at = torch.cat([scored, scored.new_zeros((n, 1))], dim=1)  # [n, l]: the hidden states the head needs

    def select(_module, args):
        return (args[0][at].unsqueeze(0), *args[1:])  # [n, l, d] -> [1, K, d]

    attention = mb.attention_mask.to(device)
    if bool((attention[:, 1:] <= attention[:, :-1]).all()):
        # right padding: under the causal mask no real token attends to a pad, so the padding mask changes
        # nothing at real positions, and without it SDPA runs its causal kernel (skips the upper triangle)
        attention = None
    hf_model = getattr(model, "module", model)  # a DeepSpeed engine wraps the HF model
    handle = hf_model.get_output_embeddings().register_forward_pre_hook(select)
    try:
        logits = model(input_ids=ids, attention_mask=attention, logits_to_keep=0).logits[0]  # [K, V]
    finally:
        handle.remove()
    if mb.temperature != 1.0:
        logits = logits / mb.temperature
    log_probs = torch.zeros((n, width - 1), dtype=torch.float32, device=device)
    log_probs = log_probs.masked_scatter(scored, grpo.log_probs_from_logits(logits, ids[:, 1:][scored]).float())
    entropy = None
    if with_entropy:
        with contextlib.nullcontext() if entropy_grad else torch.no_grad():
            per_token = grpo.entropy_from_logits(logits).float()  # [K]
        entropy = torch.zeros_like(log_probs).masked_scatter(scored, per_token)
    return log_probs, entropy


@torch.no_grad()
def batch_log_probs(model: torch.nn.Module, exp: Experience, plan: list[list[int] | None],
                    device: torch.device) -> torch.Tensor:
    """Log-probs of ``exp``'s scored tokens under ``model`` in eval mode, micro-batch by micro-batch of ``plan``
    (``rank_plan``; a ``None`` entry runs a discarded pass on row 0). Returns ``[N, L-1]`` float32 on CPU, rows in
    ``exp``'s order, zero where ``loss_mask[:, 1:]`` is 0."""
    n, width = exp.input_ids.shape
    out = torch.zeros(n, width - 1)
    was_training = model.training
    model.eval()
    for rows in plan:
        lp, _ = token_log_probs(model, micro_batch(exp, rows or [0]), device, with_entropy=False)
        if rows is not None:
            out[rows, :lp.shape[1]] = lp.float().cpu()
    model.train(was_training)
    return out


def load_hf_model(path: str, trainable: bool, gradient_checkpointing: bool = False) -> torch.nn.Module:
    """A causal LM from an HF directory or model id, float32 on CPU (the backend places it). ``trainable``: train
    mode (with HF activation checkpointing when ``gradient_checkpointing``); otherwise eval mode, no gradients."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if trainable and gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model.train(trainable)
    if not trainable:
        model.requires_grad_(False)
    return model
