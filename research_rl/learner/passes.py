"""Forward passes over an ``Experience``: micro-batch plans and the log-probs of the scored tokens (DESIGN: Learner).

Shared by the trainable policy (``research_rl.learner.core.Learner``) and the frozen reference policy
(``research_rl.learner.reference.ReferencePolicy``); the model is whatever a backend wraps (an FSDP2 module, a
DeepSpeed engine, or a plain module), called like the Hugging Face model.

Micro-batches: fixed ``micro_batch_size`` rows in batch order, or, with ``max_tokens_per_micro_batch``, rows
sorted by length and placed first-fit so that rows × longest row ≤ the budget, or, with ``learner.pack``, the real
tokens Σ len ≤ the budget (``plan_micro_batches``); ``balanced_shards`` splits a batch over ranks by tokens. Every
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
from research_rl.learner import chunked
from research_rl.learner.group import all_reduce


def plan_micro_batches(lengths: list[int], micro_batch_size: int, max_tokens: int | None,
                       pack: bool = False) -> list[list[int]]:
    """Group row indices into micro-batches.

    Args:
        lengths: attended length of each row (tokens).
        micro_batch_size: rows per micro-batch when ``max_tokens`` is None (batch order kept).
        max_tokens: token budget per micro-batch. Rows are sorted longest first and each goes into the first
            micro-batch it fits (first-fit decreasing); a row longer than the budget gets a micro-batch of its own.
            Unpacked, a micro-batch costs its padded tokens, rows × longest row; packed, its real tokens, Σ len.
        pack: count real tokens (``learner.pack``: rows run end to end, no padding).

    Returns:
        Lists of row indices; every row appears exactly once.
    """
    n = len(lengths)
    if max_tokens is None:
        return [list(range(i, min(i + micro_batch_size, n))) for i in range(0, n, micro_batch_size)]
    groups: list[list[int]] = []
    used: list[int] = []  # real tokens per group (packed)
    for i in sorted(range(n), key=lambda i: (-lengths[i], i)):
        for j, g in enumerate(groups):  # the first row of a group is its longest
            if (used[j] + lengths[i] if pack else (len(g) + 1) * lengths[g[0]]) <= max_tokens:
                g.append(i)
                used[j] += lengths[i]
                break
        else:
            groups.append([i])
            used.append(lengths[i])
    return groups


def balanced_shards(lengths: list[int], world_size: int) -> list[list[int]]:
    """Rows of a batch split over ``world_size`` ranks, the same number each, with balanced token counts.

    Rows are taken longest first, ``world_size`` at a time; in each round the longest goes to the rank with the
    fewest tokens so far, the next to the next-fewest, and so on. Bound: every rank's token count is within the
    longest row's length of every other rank's (after a round, the spread is at most the larger of the previous
    spread and the round's longest minus shortest row; by induction it never exceeds the longest row).
    ``Experience.shard`` cuts contiguous slices instead; a driver that uses this sends ``exp.select(rows)`` to
    each rank and puts per-rank results back with the same row lists (after verl's ``get_seqlen_balanced_partitions``).

    Args:
        lengths: ``[N]`` attended tokens per row. world_size: ranks; must divide ``N``.

    Returns:
        ``world_size`` lists of row indices, each sorted, together every row once.

    Raises:
        ValueError: ``world_size`` does not divide the number of rows.
    """
    n = len(lengths)
    if world_size < 1 or n % world_size:
        raise ValueError(f"cannot split {n} trajectories evenly over {world_size} ranks")
    order = sorted(range(n), key=lambda i: (-lengths[i], i))
    shards: list[list[int]] = [[] for _ in range(world_size)]
    load = [0] * world_size
    for r in range(0, n, world_size):
        ranks = sorted(range(world_size), key=lambda k: (load[k], k))  # lightest first
        for k, i in zip(ranks, order[r:r + world_size]):  # longest of the round to the lightest rank
            shards[k].append(i)
            load[k] += lengths[i]
    return [sorted(s) for s in shards]


def rank_plan(exp: Experience, cfg: LearnerConfig, world_size: int, device: torch.device) -> list[list[int] | None]:
    """This rank's micro-batches of ``exp`` (``plan_micro_batches`` with ``cfg``'s sizes), padded with ``None`` (a
    zero-weighted pass) to the most any rank of the group has. Every rank must call it (an all-reduce).

    Raises:
        ValueError: ``exp`` has no rows.
    """
    if len(exp) == 0:
        raise ValueError("the learner got an empty batch")
    lengths = exp.attention_mask.sum(dim=1).tolist()
    plan: list[list[int] | None] = plan_micro_batches(lengths, cfg.micro_batch_size, cfg.max_tokens_per_micro_batch,
                                                      cfg.pack)
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
                      old_log_probs=trim(mb.old_log_probs, width - 1),
                      rollout_log_probs=trim(mb.rollout_log_probs, width - 1))


def token_log_probs(model: torch.nn.Module, mb: Experience, device: torch.device, with_entropy: bool,
                    entropy_grad: bool = False, chunk: int = 0,
                    pack: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
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
        chunk: ``learner.logits_chunk_tokens``; > 0 runs the head, log-softmax and entropy over that many scored
            tokens at a time, recomputed in backward (``chunked.head_log_probs``), so no ``[K, V]`` logits are kept.
        pack: ``learner.pack``; run the micro-batch's rows end to end as one ``[1, Σ len]`` row with restarting
            position ids (``chunked.pack_rows``) instead of ``[n, l]`` with padding.

    Values at the scored positions equal the default path's (``chunk = 0``, ``pack = False``) up to float rounding.

    Raises:
        ValueError: ``pack`` with rows that are not right-padded; ``chunk`` with an LM head that has a bias.
    """
    if chunk or pack:
        return _token_log_probs_fused(model, mb, device, with_entropy, entropy_grad, chunk, pack)
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


def _token_log_probs_fused(model: torch.nn.Module, mb: Experience, device: torch.device, with_entropy: bool,
                           entropy_grad: bool, chunk: int, pack: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``token_log_probs`` with a chunked head and/or packed rows (its docstring)."""
    ids = mb.input_ids.to(device)
    n, width = ids.shape
    scored = mb.loss_mask[:, 1:].to(device).bool()  # [n, l-1]: position t scores token t+1
    labels = ids[:, 1:][scored]  # [K], row-major like the hidden states the head receives
    kwargs: dict = {"logits_to_keep": 0}
    if pack:
        flat, position_ids, lengths = chunked.pack_rows(ids, mb.attention_mask.to(device))
        real = mb.attention_mask.to(device).bool()  # [n, l]
        at = torch.cat([scored, scored.new_zeros((n, 1))], dim=1)[real].unsqueeze(0)  # [1, T]
        # no attention mask and no cache: transformers reads the restarting position ids as a block-causal mask
        kwargs.update(input_ids=flat, position_ids=position_ids, attention_mask=None, use_cache=False)
    else:
        at = torch.cat([scored, scored.new_zeros((n, 1))], dim=1)  # [n, l]
        attention = mb.attention_mask.to(device)
        if bool((attention[:, 1:] <= attention[:, :-1]).all()):
            attention = None  # right padding: the causal mask alone is exact at real positions (token_log_probs)
        kwargs.update(input_ids=ids, attention_mask=attention)

    def select(_module, args):
        return (args[0][at].unsqueeze(0), *args[1:])  # [b, t, d] -> [1, K, d]

    hf_model = getattr(model, "module", model)  # a DeepSpeed engine wraps the HF model
    head = hf_model.get_output_embeddings()
    if chunk and getattr(head, "bias", None) is not None:
        raise ValueError("learner.logits_chunk_tokens needs a bias-free LM head (Qwen2, Llama)")

    def chunked_head(hidden):  # [1, K, d] -> [1, K, 2]: log-prob and entropy per scored token
        lp, ent = chunked.head_log_probs(hidden[0], head.weight, labels, mb.temperature, chunk, with_entropy,
                                         entropy_grad)
        ent = ent if ent is not None else torch.zeros_like(lp)
        return torch.stack([lp.unsqueeze(0), ent.unsqueeze(0)], dim=-1)  # a new tensor, not a view (FSDP2's hooks)

    handle = head.register_forward_pre_hook(select)
    if chunk:
        head.forward = chunked_head  # an instance attribute: the module's hooks (FSDP2, ZeRO-3) still run around it
    try:
        out = model(**kwargs).logits[0]  # [K, 2] chunked, else [K, V]
    finally:
        handle.remove()
        if chunk:
            del head.forward
    if chunk:
        per_lp, per_ent = out[:, 0], (out[:, 1] if with_entropy else None)
    else:
        logits = out / mb.temperature if mb.temperature != 1.0 else out
        per_lp = grpo.log_probs_from_logits(logits, labels).float()
        per_ent = None
        if with_entropy:
            with contextlib.nullcontext() if entropy_grad else torch.no_grad():
                per_ent = grpo.entropy_from_logits(logits).float()
    log_probs = torch.zeros((n, width - 1), dtype=torch.float32, device=device).masked_scatter(scored, per_lp)
    entropy = None if per_ent is None else torch.zeros_like(log_probs).masked_scatter(scored, per_ent)
    return log_probs, entropy


@torch.no_grad()
def batch_log_probs(model: torch.nn.Module, exp: Experience, plan: list[list[int] | None],
                    device: torch.device, chunk: int = 0, pack: bool = False) -> torch.Tensor:
    """Log-probs of ``exp``'s scored tokens under ``model`` in eval mode, micro-batch by micro-batch of ``plan``
    (``rank_plan``; a ``None`` entry runs a discarded pass on row 0). Returns ``[N, L-1]`` float32 on CPU, rows in
    ``exp``'s order, zero where ``loss_mask[:, 1:]`` is 0. ``chunk``, ``pack``: as ``token_log_probs``."""
    n, width = exp.input_ids.shape
    out = torch.zeros(n, width - 1)
    was_training = model.training
    model.eval()
    for rows in plan:
        lp, _ = token_log_probs(model, micro_batch(exp, rows or [0]), device, with_entropy=False, chunk=chunk,
                                pack=pack)
        if rows is not None:
            out[rows, :lp.shape[1]] = lp.float().cpu()
    model.train(was_training)
    return out


def load_hf_model(path: str, trainable: bool, gradient_checkpointing: bool = False,
                  meta: bool = False) -> torch.nn.Module:
    """A causal LM from an HF directory or model id, float32 on CPU (the backend places it). ``trainable``: train
    mode (with HF activation checkpointing when ``gradient_checkpointing``, non-reentrant: it composes with
    FSDP2's hooks and with inputs that need no gradient); otherwise eval mode, no gradients. ``meta``: the same
    architecture from the config alone on the meta device, no weights read or allocated (a rank that receives
    rank 0's weights, ``FSDP2Backend(from_rank0=True)``)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if meta:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if trainable and gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train(trainable)
    if not trainable:
        model.requires_grad_(False)
    return model
