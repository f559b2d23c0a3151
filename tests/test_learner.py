"""The learner core under FSDP2 (gloo, world size 1) on the tiny model: update direction, micro-batch
invariance, weight buckets that reproduce the policy in an engine."""

from __future__ import annotations

import socket

import pytest
import torch

from research_rl.config.schema import AlgoConfig, LearnerConfig
from research_rl.learner.core import FSDP2Learner

pytestmark = pytest.mark.unit


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def learner(debug_model_dir):
    torch.manual_seed(0)
    lr = FSDP2Learner(LearnerConfig(lr=1e-3, micro_batch_size=4, weight_decay=0.0), AlgoConfig(kl_coef=0.0, entropy_coef=0.0))
    lr.init_process_group("127.0.0.1", _free_port())
    yield lr
    lr.shutdown()


def _batch(n=4, width=40, prompt=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, 2000, (n, width), generator=g)
    attn = torch.ones_like(ids)
    attn[1, width - 8:] = 0  # one right-padded row
    mask = torch.zeros_like(ids)
    mask[:, prompt:] = 1
    return {"input_ids": ids, "attention_mask": attn, "loss_mask": mask * attn}


def _seq_logp(learner, batch):
    lp = learner.compute_log_probs(batch)["old_log_probs"]
    return (lp * batch["loss_mask"][:, 1:]).sum(dim=1)  # [N]


def test_update_moves_log_probs_in_the_advantage_direction(learner, debug_model_dir):
    learner.load_policy(str(debug_model_dir))
    learner.load_reference(str(debug_model_dir))
    batch = _batch()
    before = _seq_logp(learner, batch)
    batch.update(learner.compute_log_probs(batch))
    batch["advantages"] = torch.tensor([1.0, -1.0, 1.0, -1.0])
    for _ in range(3):
        metrics = learner.update(batch)
    after = _seq_logp(learner, batch)
    delta = after - before
    assert delta[0] > 0 and delta[2] > 0, delta  # positive advantage: more likely
    assert delta[1] < 0 and delta[3] < 0, delta  # negative advantage: less likely
    assert metrics["actor/grad_norm"] > 0


def test_micro_batching_does_not_change_the_update(learner, debug_model_dir):
    """4 micro-batches of 1 and 1 micro-batch of 4 give the same parameters (global token-mean)."""
    batch = _batch(seed=1)
    results = []
    for size in (4, 1):
        learner.cfg.micro_batch_size = size
        learner.load_policy(str(debug_model_dir))
        learner.load_reference(str(debug_model_dir))
        b = dict(batch)
        b.update(learner.compute_log_probs(b))
        b["advantages"] = torch.tensor([0.5, -1.0, 1.5, -1.0])
        learner.update(b)
        results.append({k: v.clone() for k, v in learner.full_state_dict().items()})
    learner.cfg.micro_batch_size = 4
    for name in results[0]:
        torch.testing.assert_close(results[0][name], results[1][name], rtol=1e-4, atol=1e-6, msg=name)


def test_weight_buckets_reproduce_the_policy_in_the_engine(learner, debug_model_dir, tokenizer):
    from research_rl.rollout.hf_engine import HFEngine

    learner.load_policy(str(debug_model_dir))
    batch = _batch(seed=2)
    batch.update(learner.compute_log_probs(batch))
    batch["advantages"] = torch.tensor([1.0, -1.0, 1.0, -1.0])
    learner.update(batch)  # the learner now differs from the saved model
    engine = HFEngine(str(debug_model_dir), tokenizer)
    seq = batch["input_ids"][0].tolist()
    assert (engine.log_probs(seq) - learner.probe_log_probs(seq)).abs().max() > 1e-4
    buckets = list(learner.weight_buckets(bucket_mb=0))  # a bucket per tensor
    assert len(buckets) > 1
    for b in buckets:
        engine.load_weights(b)
    assert (engine.log_probs(seq) - learner.probe_log_probs(seq)).abs().max() < 1e-5


def test_log_probs_with_only_a_reference_or_only_a_policy(learner, debug_model_dir):
    """A reference-only learner (a separate reference worker group) returns ``ref_log_probs`` alone, offloaded or
    not; a policy-only learner returns ``old_log_probs`` alone; the same model gives the same numbers."""
    batch = _batch(seed=3)
    policy_only = FSDP2Learner(learner.cfg, learner.algo)
    policy_only.init_process_group("127.0.0.1", 0)  # the group exists already; this only builds the mesh
    policy_only.load_policy(str(debug_model_dir))
    old = policy_only.compute_log_probs(batch)
    assert set(old) == {"old_log_probs"}
    for offload in (False, True):
        ref_only = FSDP2Learner(learner.cfg, learner.algo)
        ref_only.init_process_group("127.0.0.1", 0)
        ref_only.load_reference(str(debug_model_dir), offload=offload)
        ref = ref_only.compute_log_probs(batch)
        assert set(ref) == {"ref_log_probs"}
        torch.testing.assert_close(ref["ref_log_probs"], old["old_log_probs"], rtol=0, atol=1e-6)
    with pytest.raises(RuntimeError, match="load_policy or load_reference"):
        FSDP2Learner(learner.cfg, learner.algo).compute_log_probs(batch)


def _reference_log_probs(model_dir, batch):
    """Log-probs the plain way: the full model, its full logits over every position, the padding mask."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    lp = torch.log_softmax(logits.float(), -1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    return lp, torch.distributions.Categorical(logits=logits.float()).entropy()


def test_forward_scores_only_loss_positions_and_matches_the_full_forward(learner, debug_model_dir):
    """Logits only under the loss mask, no padding mask for right padding: the same values at scored positions as
    the plain full forward, zero elsewhere; a left-padded batch (mask kept) too."""
    learner.load_policy(str(debug_model_dir))
    batch = _batch(seed=4)
    batch["loss_mask"][0, 20:25] = 0  # an inserted <result> span inside the response
    batch["loss_mask"][2, :] = 0
    batch["loss_mask"][2, 30] = 1  # one scored token
    left = {k: v.flip(1) for k, v in batch.items()}  # row 1 becomes left-padded: the padding mask must stay
    left["loss_mask"] = left["loss_mask"] * left["attention_mask"]
    for b in (batch, left):
        want_lp, want_ent = _reference_log_probs(str(debug_model_dir), b)
        scored = b["loss_mask"][:, 1:].bool()
        lp, ent = learner._forward(learner.policy, b, with_entropy=True)
        assert lp.shape == ent.shape == scored.shape
        torch.testing.assert_close(lp[scored], want_lp[scored], rtol=0, atol=2e-5)
        torch.testing.assert_close(ent[scored], want_ent[scored], rtol=0, atol=2e-5)
        assert not lp[~scored].any() and not ent[~scored].any()
        assert not ent.requires_grad  # a metric unless algo.entropy_coef != 0


def test_update_without_old_log_probs_equals_the_recomputed_one(learner, debug_model_dir):
    """With one optimizer step per batch, the detached current log-probs give the update that a separate
    ``old_log_probs`` pass gives (what the trainer relies on to skip that pass)."""
    batch = _batch(seed=5)
    batch["advantages"] = torch.tensor([1.0, -0.5, 0.25, -1.0])
    results = []
    for recompute in (True, False):
        learner.load_policy(str(debug_model_dir))
        learner.load_reference(str(debug_model_dir))
        b = dict(batch, **learner.compute_log_probs(batch, ("old_log_probs", "ref_log_probs") if recompute
                                                    else ("ref_log_probs",)))
        assert ("old_log_probs" in b) == recompute
        metrics = learner.update(b)
        assert metrics["actor/grad_norm"] > 0 and metrics["actor/approx_kl"] == pytest.approx(0, abs=1e-6)
        results.append({k: v.clone() for k, v in learner.full_state_dict().items()})
    for name in results[0]:
        torch.testing.assert_close(results[0][name], results[1][name], rtol=1e-5, atol=1e-7, msg=name)
