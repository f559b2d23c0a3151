"""The warm-up's collate: synthetic examples become the learner's ``Experience``, right-padded, each example's own
loss mask in place."""

from __future__ import annotations

import pytest
import torch

from research_rl.algo.experience import Experience
from research_rl.rollout.warmup import collate

pytestmark = pytest.mark.unit


def test_collate_right_pads_examples_into_an_experience():
    examples = [{"input_ids": [5, 6, 7, 8], "loss_mask": [0, 0, 1, 1]}, {"input_ids": [9, 10], "loss_mask": [0, 1]}]
    exp = collate(examples, pad_id=0)
    assert isinstance(exp, Experience) and len(exp) == 2
    assert exp.input_ids.tolist() == [[5, 6, 7, 8], [9, 10, 0, 0]]
    assert exp.attention_mask.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert exp.loss_mask.tolist() == [[0, 0, 1, 1], [0, 1, 0, 0]]
    assert all(t.dtype == torch.int64 for t in (exp.input_ids, exp.attention_mask, exp.loss_mask))
    assert exp.advantages is None and exp.ref_log_probs is None
