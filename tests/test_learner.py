"""The learner core under FSDP2 (gloo, world size 1) on the tiny model: update direction, micro-batch
invariance, weight buckets that reproduce the policy in an engine, the reference policy as its own object, the
kept shard of the colocated reference pass, PPO mini-batches and epochs that make the clip bind; and the layout
(one concrete learner over a backend object, no import cycles)."""

from __future__ import annotations

import ast
import socket
from pathlib import Path

import pytest
import torch

from research_rl.algo.experience import Experience
from research_rl.config.schema import AlgoConfig, LearnerConfig
from research_rl.learner.core import Learner
from research_rl.learner.passes import token_log_probs
from research_rl.learner.reference import ReferencePolicy

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def learner(debug_model_dir):
    torch.manual_seed(0)
    lr = Learner(LearnerConfig(lr=1e-3, micro_batch_size=4, weight_decay=0.0),
                 AlgoConfig(kl_coef=0.0, entropy_coef=0.0))
    lr.init_process_group("127.0.0.1", _free_port())
    yield lr
    lr.shutdown()


def _batch(n=4, width=40, prompt=10, seed=0) -> Experience:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, 2000, (n, width), generator=g)
    attn = torch.ones_like(ids)
    attn[1, width - 8:] = 0  # one right-padded row
    mask = torch.zeros_like(ids)
    mask[:, prompt:] = 1
    return Experience(ids, attn, mask * attn)


def _seq_logp(learner, batch):
    lp = learner.compute_log_probs(batch)
    return (lp * batch.loss_mask[:, 1:]).sum(dim=1)  # [N]


def _params(learner) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in learner.full_state_dict().items()}


def test_update_moves_log_probs_in_the_advantage_direction(learner, debug_model_dir):
    learner.load_policy(str(debug_model_dir))
    learner.load_reference(str(debug_model_dir))
    batch = _batch()
    before = _seq_logp(learner, batch)
    batch = batch.replace(ref_log_probs=learner.compute_ref_log_probs(batch),
                          advantages=torch.tensor([1.0, -1.0, 1.0, -1.0]))
    for _ in range(3):
        metrics = learner.update(batch)
    after = _seq_logp(learner, batch)
    delta = after - before
    assert delta[0] > 0 and delta[2] > 0, delta  # positive advantage: more likely
    assert delta[1] < 0 and delta[3] < 0, delta  # negative advantage: less likely
    assert metrics["actor/grad_norm"] > 0 and metrics["actor/optimizer_steps"] == 1


def test_micro_batching_does_not_change_the_update(learner, debug_model_dir):
    """4 micro-batches of 1 and 1 micro-batch of 4 give the same parameters (global token-mean), within 1e-5 = 1% of
    lr: the first AdamW step is lr·g/(|g|+1e-8), so an element whose gradient is near 1e-8 turns a summation-order
    difference of ~1e-12 into ~1e-6 (tests/test_learner_dist.py); a dropped or mis-weighted micro-batch moves
    parameters by ~lr."""
    batch = _batch(seed=1).replace(advantages=torch.tensor([0.5, -1.0, 1.5, -1.0]))
    results = []
    for size in (4, 1):
        learner.cfg.micro_batch_size = size
        learner.load_policy(str(debug_model_dir))
        learner.update(batch)
        results.append(_params(learner))
    learner.cfg.micro_batch_size = 4
    for name in results[0]:
        torch.testing.assert_close(results[0][name], results[1][name], rtol=0, atol=1e-5, msg=name)


def test_weight_buckets_reproduce_the_policy_in_the_engine(learner, debug_model_dir, tokenizer):
    from research_rl.rollout.hf_engine import HFEngine

    learner.load_policy(str(debug_model_dir))
    batch = _batch(seed=2).replace(advantages=torch.tensor([1.0, -1.0, 1.0, -1.0]))
    learner.update(batch)  # the learner now differs from the saved model
    engine = HFEngine(str(debug_model_dir), tokenizer)
    seq = batch.input_ids[0].tolist()
    assert (engine.log_probs(seq) - learner.probe_log_probs(seq)).abs().max() > 1e-4
    buckets = list(learner.weight_buckets(bucket_mb=0))  # a bucket per tensor
    assert len(buckets) > 1
    for b in buckets:
        engine.load_weights(b)
    assert (engine.log_probs(seq) - learner.probe_log_probs(seq)).abs().max() < 1e-5


def test_reference_policy_alone_gives_the_policy_log_probs_of_the_same_model(learner, debug_model_dir):
    """A ``ReferencePolicy`` built on its own (what a separate ``ReferenceWorker`` holds), offloaded or not, gives
    the log-probs the learner's policy gives for the same model; neither runs before it is loaded."""
    batch = _batch(seed=3)
    learner.load_policy(str(debug_model_dir))
    old = learner.compute_log_probs(batch)
    assert old.shape == (4, 39) and old.dtype == torch.float32 and old.device.type == "cpu"
    assert not old[~batch.loss_mask[:, 1:].bool()].any() and old[batch.loss_mask[:, 1:].bool()].lt(0).all()
    for offload in (False, True):
        ref = ReferencePolicy(learner.cfg)
        ref.init_process_group("127.0.0.1", 0)  # the group exists already: a no-op
        ref.load(str(debug_model_dir), offload=offload)
        torch.testing.assert_close(ref.compute_log_probs(batch), old, rtol=0, atol=1e-6)
        assert not any(p.requires_grad for p in ref.model.module.parameters())
    with pytest.raises(RuntimeError, match="load"):
        ReferencePolicy(learner.cfg).compute_log_probs(batch)
    with pytest.raises(RuntimeError, match="load_reference"):
        Learner(learner.cfg, learner.algo).compute_ref_log_probs(batch)


def test_kept_shard_gives_the_update_of_the_shard_sent_again(learner, debug_model_dir):
    """``compute_ref_log_probs(keep=True)`` returns nothing and ``update()`` then trains on that shard with its
    reference log-probs filled in: the parameters equal an ``update(exp)`` of the same batch with them; the kept
    shard is used once."""
    kl = Learner(learner.cfg, AlgoConfig(kl_coef=0.5, entropy_coef=0.0))
    kl.load_reference(str(debug_model_dir))
    batch = _batch(seed=6).replace(advantages=torch.tensor([1.0, -0.5, 0.25, -1.0]))
    ref = kl.compute_ref_log_probs(batch)
    results = []
    for kept in (True, False):
        kl.load_policy(str(debug_model_dir))
        kl.update(batch.replace(ref_log_probs=ref.clone()))  # one step: the policy now differs from the reference
        if kept:
            assert kl.compute_ref_log_probs(batch, keep=True) is None
            metrics = kl.update()
        else:
            metrics = kl.update(batch.replace(ref_log_probs=ref))
        assert metrics["actor/kl"] > 0  # the KL term read the kept reference log-probs
        results.append((_params(kl), metrics))
    assert results[0][1] == results[1][1]
    for name, value in results[0][0].items():
        assert torch.equal(results[1][0][name], value), name
    with pytest.raises(RuntimeError, match="keep=True"):
        kl.update()
    with pytest.raises(ValueError, match="ref_log_probs"):
        kl.update(batch)


def test_algo_kl_clamp_bounds_the_kl_term_of_the_update(learner, debug_model_dir):
    """Reference log-probs 5 nats above the policy's: k3 = e^5 - 5 - 1 = 142.4 per token, so the token-mean KL
    is the clamp itself, ``algo.kl_clamp``."""
    batch = _batch(seed=9).replace(advantages=torch.zeros(4))
    for clamp in (0.5, 10.0):
        lrn = Learner(learner.cfg, AlgoConfig(kl_coef=0.1, entropy_coef=0.0, kl_clamp=clamp))
        lrn.load_policy(str(debug_model_dir))
        ref = (lrn.compute_log_probs(batch) + 5.0) * batch.loss_mask[:, 1:]
        metrics = lrn.update(batch.replace(ref_log_probs=ref))
        assert metrics["actor/kl"] == pytest.approx(clamp, rel=1e-6)


def test_rollout_log_probs_are_a_diagnostic_unless_tis(learner, debug_model_dir):
    """Engine log-probs 0.5 nats below the learner's on every loss token (the engine found each token less likely):
    w = min(e^0.5, C) = 1.648721 under C = 2, and the k3 estimate of KL(π_engine || π_learner) is
    e^0.5 - 0.5 - 1 = 0.148721. With ``algo.rollout_is=none`` both are logged and the update is bit for bit the
    one without rollout log-probs; with ``tis`` the policy-gradient term (and so its gradient) is scaled by w, and
    at 1 nat below (e^1 = 2.718 > C) by the cap, 2. ``tis`` without rollout log-probs is refused."""
    batch = _batch(seed=11).replace(advantages=torch.tensor([1.0, -0.5, 0.25, -1.0]))
    mask = batch.loss_mask[:, 1:]
    algo = dict(kl_coef=0.0, entropy_coef=0.0)
    results = {}
    for name, rollout_is, shift in (("plain", "none", None), ("diagnostic", "none", 0.5), ("tis", "tis", 0.5),
                                    ("capped", "tis", 1.0)):
        lrn = Learner(learner.cfg, AlgoConfig(**algo, rollout_is=rollout_is))
        lrn.load_policy(str(debug_model_dir))
        b = batch
        if shift is not None:
            b = batch.replace(rollout_log_probs=(lrn.compute_log_probs(batch) - shift) * mask)
        results[name] = (lrn.update(b), _params(lrn))
    plain, diagnostic = results["plain"], results["diagnostic"]
    assert "rollout/is_weight_mean" not in plain[0]
    assert diagnostic[0]["rollout/is_weight_mean"] == pytest.approx(1.648721, abs=1e-5)
    assert diagnostic[0]["rollout/engine_learner_kl"] == pytest.approx(0.148721, abs=1e-5)
    assert all(torch.equal(plain[1][k], diagnostic[1][k]) for k in plain[1])  # the loss did not change
    assert {k: v for k, v in diagnostic[0].items() if k.startswith("actor/")} == plain[0]
    for name, w in (("tis", 1.648721), ("capped", 2.0)):
        metrics = results[name][0]
        assert metrics["rollout/is_weight_mean"] == pytest.approx(w, abs=1e-5)
        assert metrics["actor/pg_loss"] == pytest.approx(w * plain[0]["actor/pg_loss"], rel=1e-5)
        assert metrics["actor/grad_norm"] == pytest.approx(w * plain[0]["actor/grad_norm"], rel=1e-4)
    assert results["capped"][0]["rollout/engine_learner_kl"] == pytest.approx(0.718282, abs=1e-5)  # e - 1 - 1
    lrn = Learner(learner.cfg, AlgoConfig(**algo, rollout_is="tis"))
    lrn.load_policy(str(debug_model_dir))
    with pytest.raises(ValueError, match="algo.rollout_is=tis needs the batch's rollout_log_probs"):
        lrn.update(batch)


def _reference_log_probs(model_dir, batch):
    """Log-probs the plain way: the full model, its full logits over every position, the padding mask."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
    lp = torch.log_softmax(logits.float(), -1).gather(-1, batch.input_ids[:, 1:, None]).squeeze(-1)
    return lp, torch.distributions.Categorical(logits=logits.float()).entropy()


def test_forward_scores_only_loss_positions_and_matches_the_full_forward(learner, debug_model_dir):
    """Logits only under the loss mask, no padding mask for right padding: the same values at scored positions as
    the plain full forward, zero elsewhere; a left-padded batch (mask kept) too."""
    learner.load_policy(str(debug_model_dir))
    batch = _batch(seed=4)
    batch.loss_mask[0, 20:25] = 0  # an inserted <result> span inside the response
    batch.loss_mask[2, :] = 0
    batch.loss_mask[2, 30] = 1  # one scored token
    flipped = [t.flip(1) for t in (batch.input_ids, batch.attention_mask, batch.loss_mask)]
    left = Experience(flipped[0], flipped[1], flipped[2] * flipped[1])  # row 1 left-padded: the mask must stay
    for b in (batch, left):
        want_lp, want_ent = _reference_log_probs(str(debug_model_dir), b)
        scored = b.loss_mask[:, 1:].bool()
        lp, ent = token_log_probs(learner.policy.module, b, learner.device, with_entropy=True)
        assert lp.shape == ent.shape == scored.shape
        torch.testing.assert_close(lp[scored], want_lp[scored], rtol=0, atol=2e-5)
        torch.testing.assert_close(ent[scored], want_ent[scored], rtol=0, atol=2e-5)
        assert not lp[~scored].any() and not ent[~scored].any()
        assert not ent.requires_grad  # a metric unless algo.entropy_coef != 0


def test_update_without_old_log_probs_equals_the_recomputed_one(learner, debug_model_dir):
    """With one optimizer step per batch, the detached current log-probs give the update that a separate
    ``old_log_probs`` pass gives (what lets the default update skip that pass)."""
    batch = _batch(seed=5).replace(advantages=torch.tensor([1.0, -0.5, 0.25, -1.0]))
    results = []
    for recompute in (True, False):
        learner.load_policy(str(debug_model_dir))
        b = batch.replace(old_log_probs=learner.compute_log_probs(batch)) if recompute else batch
        metrics = learner.update(b)
        assert metrics["actor/grad_norm"] > 0 and metrics["actor/approx_kl"] == pytest.approx(0, abs=1e-6)
        results.append(_params(learner))
    for name in results[0]:
        torch.testing.assert_close(results[0][name], results[1][name], rtol=1e-5, atol=1e-7, msg=name)


def _count_forwards(learner) -> list[int]:
    calls = [0]
    learner.policy.module.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_default_update_is_one_step_without_an_old_log_prob_pass(learner, debug_model_dir):
    """Defaults (``ppo_epochs=1``, ``ppo_mini_batch_size=0``) and a mini-batch of the whole batch both run one
    forward per micro-batch (no π_θold pass) and take one optimizer step; two mini-batches add exactly one
    no-grad pass before the first step."""
    batch = _batch(seed=7).replace(advantages=torch.tensor([1.0, -0.5, 0.25, -1.0]))
    for mini, forwards, steps in ((0, 1, 1), (4, 1, 1), (2, 1 + 2, 2)):
        lrn = Learner(learner.cfg, AlgoConfig(kl_coef=0.0, entropy_coef=0.0, ppo_mini_batch_size=mini))
        lrn.load_policy(str(debug_model_dir))
        calls = _count_forwards(lrn)
        metrics = lrn.update(batch)
        assert (calls[0], metrics["actor/optimizer_steps"]) == (forwards, steps), mini


def test_mini_batches_and_epochs_make_the_clip_bind(learner, debug_model_dir):
    """Several optimizer steps per batch (2 mini-batches × 3 epochs) clip against the log-probs recorded before the
    first step: the ratio departs from 1 (``approx_kl > 0``) and the clip binds (``clip_frac > 0``), which one step
    per batch never does; the metrics average over the 6 steps."""
    batch = _batch(seed=8).replace(advantages=torch.tensor([1.0, -1.0, 1.0, -1.0]))
    algo = AlgoConfig(kl_coef=0.0, entropy_coef=0.0, clip_eps=0.05, ppo_epochs=3, ppo_mini_batch_size=2)
    lrn = Learner(LearnerConfig(lr=1e-2, micro_batch_size=1, weight_decay=0.0), algo)
    lrn.load_policy(str(debug_model_dir))
    before = lrn.compute_log_probs(batch)
    metrics = lrn.update(batch)
    assert metrics["actor/optimizer_steps"] == 6
    assert metrics["actor/clip_frac"] > 0 and metrics["actor/approx_kl"] > 0, metrics
    assert metrics["actor/micro_batches"] == 2  # per step: 2 rows in micro-batches of 1
    assert metrics["actor/num_tokens"] == pytest.approx(float(batch.loss_mask[:, 1:].sum()) / 2)
    assert (lrn.compute_log_probs(batch) - before).abs().max() > 0.05
    one_step = Learner(lrn.cfg, AlgoConfig(kl_coef=0.0, entropy_coef=0.0, clip_eps=0.05))
    one_step.load_policy(str(debug_model_dir))
    m1 = one_step.update(batch)
    assert m1["actor/clip_frac"] == 0 and m1["actor/approx_kl"] == 0


def test_mini_batches_take_every_kth_trajectory(learner):
    """Mini-batch ``j`` of ``S`` is rows ``j, j+S, ...`` of the shard: the same trajectories at any world size."""
    one = Learner(learner.cfg, AlgoConfig(ppo_mini_batch_size=4, ppo_epochs=2))
    assert [list(r) for r in one._mini_batches(8)] == [[0, 2, 4, 6], [1, 3, 5, 7]] * 2
    two = Learner(learner.cfg, AlgoConfig(ppo_mini_batch_size=4), rank=1, world_size=2)  # rows 4..7 of the batch
    assert [[4 + i for i in r] for r in two._mini_batches(4)] == [[4, 6], [5, 7]]
    with pytest.raises(ValueError, match="algo.ppo_mini_batch_size=3"):
        Learner(learner.cfg, AlgoConfig(ppo_mini_batch_size=3))._mini_batches(8)


def test_ppo_keys_are_checked_before_ray():
    from research_rl.config.schema import Config, ConfigError, TrainerConfig, RolloutConfig, validate

    def cfg(mini, workers=1):
        return Config(trainer=TrainerConfig(prompts_per_step=4), rollout=RolloutConfig(group_size=5),
                      learner=LearnerConfig(num_workers=workers, num_cpus_per_worker=0.0),
                      algo=AlgoConfig(ppo_mini_batch_size=mini))

    for mini, workers in ((5, 1), (20, 1), (10, 2)):
        validate(cfg(mini, workers))
    for mini, workers in ((6, 1), (5, 2)):  # 6 does not divide 20; 5 is not a multiple of 2 ranks
        with pytest.raises(ConfigError, match="algo.ppo_mini_batch_size"):
            validate(cfg(mini, workers))
    with pytest.raises(ConfigError, match="algo.ppo_epochs"):
        AlgoConfig(ppo_epochs=0)
    with pytest.raises(ConfigError, match="algo.kl_clamp"):
        AlgoConfig(kl_clamp=0.0)


def test_backend_is_picked_by_name():
    from research_rl.learner.backend import backend_class
    from research_rl.learner.fsdp2 import FSDP2Backend

    assert backend_class("fsdp2") is FSDP2Backend
    with pytest.raises(ValueError, match="expected fsdp2 or deepspeed"):
        backend_class("ddp")


def _imports(path: Path, package: str) -> set[str]:
    """research_rl modules ``path`` imports, at module level or inside functions."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)  # `from research_rl.learner import group`
    return {n for n in names if n.startswith(package)}


def test_no_import_cycles_in_the_learner_and_the_roles():
    """No module of research_rl/learner or research_rl/roles reaches itself through imports (function-level ones
    included), and no backend imports the learner core."""
    modules = {f"research_rl.{sub}.{p.stem}": p for sub in ("learner", "roles")
               for p in (ROOT / "research_rl" / sub).glob("*.py") if p.stem != "__init__"}
    graph = {m: _imports(p, "research_rl") & set(modules) for m, p in modules.items()}
    for start in graph:
        seen, todo = set(), list(graph[start])
        while todo:
            m = todo.pop()
            assert m != start, f"{start} imports itself through {sorted(seen)}"
            if m not in seen:
                seen.add(m)
                todo += graph[m]
    for backend in ("fsdp2", "deepspeed_backend"):
        assert not graph[f"research_rl.learner.{backend}"] & {"research_rl.learner.core", "research_rl.learner.backend"}


def test_only_the_deepspeed_backend_imports_deepspeed():
    import subprocess
    import sys

    modules = ["research_rl.learner.core", "research_rl.learner.fsdp2", "research_rl.learner.reference",
               "research_rl.roles.learner_worker", "research_rl.roles.reference_worker"]
    code = "import sys\n" + "".join(f"import {m}\n" for m in modules) + "print('deepspeed' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_log_probs_at_the_sampling_temperature_equal_the_engines(learner, debug_model_dir, tokenizer):
    """At T = 0.7 the learner scores tokens under logits / T, the distribution the engine sampled them from: its
    log-probs of a sampled response equal the engine's at T = 0.7 and differ from T = 1 (where nothing changes)."""
    from research_rl.rollout.agent_loop import SamplingParams
    from research_rl.rollout.hf_engine import HFEngine

    learner.load_policy(str(debug_model_dir))
    engine = HFEngine(str(debug_model_dir), tokenizer)
    prompt = tokenizer.encode("User: Where is Nissedal?", add_special_tokens=False)
    out = engine.generate([prompt], [12], SamplingParams(temperature=0.7, seed=5))[0]
    seq = prompt + out.token_ids
    ids = torch.tensor([seq])
    mask = torch.zeros_like(ids)
    mask[0, len(prompt):] = 1
    exp = Experience(ids, torch.ones_like(ids), mask, temperature=0.7)
    lp = learner.compute_log_probs(exp)[0, len(prompt) - 1:]  # position t scores token t+1
    torch.testing.assert_close(lp, engine.log_probs(seq, temperature=0.7)[len(prompt) - 1:], rtol=0, atol=2e-5)
    at_one = learner.compute_log_probs(exp.replace(temperature=1.0))[0, len(prompt) - 1:]
    torch.testing.assert_close(at_one, engine.log_probs(seq)[len(prompt) - 1:], rtol=0, atol=2e-5)
    assert (lp - at_one).abs().max() > 1e-3
    # entropy at the temperature too: the update's actor/entropy changes with it
    sharp = learner.update(exp.replace(advantages=torch.zeros(1), temperature=0.5))["actor/entropy"]
    learner.load_policy(str(debug_model_dir))
    flat = learner.update(exp.replace(advantages=torch.zeros(1), temperature=2.0))["actor/entropy"]
    assert sharp < flat


def test_reference_loss_aggregation_is_a_mean_of_micro_batch_means(learner, debug_model_dir):
    """``algo.loss_agg=reference``: with 2 micro-batches of 2 rows whose loss-token counts differ (30+22 and 30+30),
    the loss is 1/2 · mean_mb1 + 1/2 · mean_mb2 (each micro-batch's share of the rank's rows), not the token-mean
    over all 112 tokens; so, unlike token_mean, it changes with the micro-batch size (no invariance by
    construction). Checked against the per-row pg terms computed by hand (ratio 1, so pg = -A per token)."""
    batch = _batch(seed=3).replace(advantages=torch.tensor([1.0, -2.0, 0.5, 3.0]))
    tokens = batch.loss_mask[:, 1:].sum(dim=1).float()  # [30, 22, 30, 30]
    assert tokens.tolist() == [30.0, 22.0, 30.0, 30.0]
    adv = batch.advantages
    expect = {"token_mean": float(-(adv * tokens).sum() / tokens.sum()),
              "reference": float(0.5 * -(adv[:2] * tokens[:2]).sum() / tokens[:2].sum()
                                 + 0.5 * -(adv[2:] * tokens[2:]).sum() / tokens[2:].sum())}
    assert abs(expect["token_mean"] - expect["reference"]) > 0.05
    got = {}
    algo, size0 = learner.algo, learner.cfg.micro_batch_size
    for agg in ("token_mean", "reference"):
        for size in (2, 4):
            learner.cfg.micro_batch_size = size
            learner.algo = AlgoConfig(kl_coef=0.0, entropy_coef=0.0, loss_agg=agg)
            learner.load_policy(str(debug_model_dir))
            got[agg, size] = learner.update(batch)["actor/pg_loss"]
    learner.algo, learner.cfg.micro_batch_size = algo, size0
    assert got["token_mean", 2] == pytest.approx(expect["token_mean"], abs=1e-5)
    assert got["token_mean", 4] == pytest.approx(expect["token_mean"], abs=1e-5)
    assert got["reference", 2] == pytest.approx(expect["reference"], abs=1e-5)
    assert got["reference", 4] == pytest.approx(expect["token_mean"], abs=1e-5)  # one micro-batch: its own mean
