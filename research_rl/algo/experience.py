"""The experience batch: what one GRPO step's trajectories become on their way to the learner ranks.

One typed record crosses every process boundary between the rollout and the update (after OpenRLHF's
``Experience`` and torchtune's GRPO trajectory type). Rows are trajectories in group order (group ``i`` is rows
``i*G .. i*G+G-1``, ``G`` = ``rollout.group_size``); sequences are right-padded prompt + response:

    input_ids      [N, L]   int64    prompt ids, then the response (generated and inserted ``<result>`` ids), pad
    attention_mask [N, L]   int64    1 on prompt + response, 0 on padding
    loss_mask      [N, L]   int64    1 on generated response tokens, 0 on prompt, inserted results and padding
    advantages     [N]      float32  group-normalised score (ReSearch eq. 2); None until the advantages phase
    ref_log_probs  [N, L-1] float32  reference policy log-probs; position t scores token t+1; 0 off the loss mask
    old_log_probs  [N, L-1] float32  behaviour policy log-probs (same layout); None when the update uses the
                                     policy's own, detached (one optimizer step per batch)
    rollout_log_probs [N, L-1] float32  the sampled tokens' log-probs as the rollout engine reported them (same
                                     layout; the engine's sampling distribution, ``GenerationOutput.log_probs``);
                                     None when the engine reported none (greedy rollouts)

and per row, for the driver's metrics and rollout dumps (never read by the learner): ``question_ids``,
``rewards`` (``[N]`` float32 scores), ``reward_reasons``, ``finish_reasons`` (``eos | length | max_turns``),
``num_searches``; ``policy_version``, the learner step whose weights generated the batch; and ``temperature``, the
sampling temperature: log-probs and entropy are computed from ``logits / temperature``, the distribution the
tokens were sampled from (the reference's ``dp_actor`` does the same).

``shard(n)`` cuts ``n`` equal row slices as copies: a pickled view carries its whole storage, so a view of the
batch sent to each of ``n`` ranks would ship the whole batch ``n`` times.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor

ROW_TENSORS = ("input_ids", "attention_mask", "loss_mask", "advantages", "ref_log_probs", "old_log_probs",
               "rollout_log_probs", "rewards")
ROW_LISTS = ("question_ids", "reward_reasons", "finish_reasons", "num_searches")


@dataclass
class Experience:
    """One step's batch of ``N`` trajectories (shapes in the module docstring)."""

    input_ids: Tensor
    attention_mask: Tensor
    loss_mask: Tensor
    advantages: Tensor | None = None
    ref_log_probs: Tensor | None = None
    old_log_probs: Tensor | None = None
    rollout_log_probs: Tensor | None = None
    rewards: Tensor | None = None
    question_ids: list[str] = field(default_factory=list)
    reward_reasons: list[str] = field(default_factory=list)
    finish_reasons: list[str] = field(default_factory=list)
    num_searches: list[int] = field(default_factory=list)
    policy_version: int = 0
    temperature: float = 1.0

    def __post_init__(self) -> None:
        n, width = self.input_ids.shape
        for name in ROW_TENSORS:
            value = getattr(self, name)
            if value is not None and value.shape[0] != n:
                raise ValueError(f"Experience.{name} has {value.shape[0]} rows, input_ids has {n}")
        for name in ("attention_mask", "loss_mask"):
            if getattr(self, name).shape != (n, width):
                raise ValueError(f"Experience.{name} has shape {tuple(getattr(self, name).shape)}, expected {(n, width)}")
        for name in ROW_LISTS:
            value = getattr(self, name)
            if value and len(value) != n:
                raise ValueError(f"Experience.{name} has {len(value)} entries for {n} rows")

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @classmethod
    def from_sequences(cls, prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]],
                       response_loss_masks: Sequence[Sequence[int]], pad_id: int,
                       response_log_probs: Sequence[Sequence[float]] | None = None, **rows) -> "Experience":
        """Right-padded ``[N, L]`` tensors of prompt + response, ``L`` = the longest row; the loss mask is the
        response's own mask placed after its prompt. ``response_log_probs``: per response token, the engine's
        log-prob of it, placed as ``rollout_log_probs`` ``[N, L-1]`` (position ``t`` scores token ``t+1``; 0 off
        the loss mask); None leaves ``rollout_log_probs`` None. ``rows``: the other fields (``question_ids``, ...).

        Raises:
            ValueError: a row's ``response_log_probs`` is not as long as its response, or a prompt is empty while
                log-probs are given (its first response token would have no position to be scored at).
        """
        n = len(prompts)
        width = max(len(p) + len(r) for p, r in zip(prompts, responses))
        ids = torch.full((n, width), pad_id, dtype=torch.long)
        attn = torch.zeros((n, width), dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        for i, (p, r, m) in enumerate(zip(prompts, responses, response_loss_masks)):
            lp, lr = len(p), len(r)
            ids[i, :lp + lr] = torch.tensor(list(p) + list(r))
            attn[i, :lp + lr] = 1
            mask[i, lp:lp + lr] = torch.tensor(list(m), dtype=torch.long)
        rollout = None
        if response_log_probs is not None:
            rollout = torch.zeros((n, width - 1), dtype=torch.float32)
            for i, (p, r, lps) in enumerate(zip(prompts, responses, response_log_probs)):
                if len(lps) != len(r):
                    raise ValueError(f"row {i}: {len(lps)} rollout log-probs for {len(r)} response tokens")
                if r and not p:
                    raise ValueError(f"row {i}: an empty prompt leaves the first response token unscored")
                lp, lr = len(p), len(r)
                rollout[i, lp - 1:lp - 1 + lr] = torch.tensor(list(lps), dtype=torch.float32)
            rollout = rollout.masked_fill(mask[:, 1:] == 0, 0.0)  # 0 off the loss mask (inserted results too)
        return cls(ids, attn, mask, rollout_log_probs=rollout, **rows)

    def select(self, rows: Sequence[int]) -> "Experience":
        """Rows ``rows`` (in that order) as a new batch whose tensors own their storage."""
        idx = torch.as_tensor(list(rows), dtype=torch.long)
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in ROW_TENSORS:
                out[f.name] = None if value is None else value.index_select(0, idx)  # a copy
            elif f.name in ROW_LISTS:
                out[f.name] = [value[i] for i in rows] if value else []
            else:
                out[f.name] = value
        return Experience(**out)

    def shard(self, n: int) -> list["Experience"]:
        """``n`` equal, contiguous row slices, each a copy (rank ``r`` gets rows ``r*N/n .. (r+1)*N/n - 1``).

        Raises:
            ValueError: ``n`` does not divide the number of rows (the preflight checks the config for it).
        """
        if n < 1 or len(self) % n:
            raise ValueError(f"cannot split {len(self)} trajectories evenly over {n} ranks")
        size = len(self) // n
        return [self.select(range(r * size, (r + 1) * size)) for r in range(n)]

    @staticmethod
    def concat_rows(parts: Sequence[Tensor]) -> Tensor:
        """Per-rank results (``[N/n, ...]`` each, in rank order) back into one ``[N, ...]`` tensor, right-padding
        the last dimension of 2-D parts to the widest (ranks may trim their shard to its longest row)."""
        if parts[0].dim() == 1:
            return torch.cat(list(parts))
        width = max(p.shape[1] for p in parts)
        return torch.cat([torch.nn.functional.pad(p, (0, width - p.shape[1])) for p in parts])

    def replace(self, **changes) -> "Experience":
        """A shallow copy with ``changes`` applied (e.g. ``advantages=…``)."""
        return dataclasses.replace(self, **changes)
