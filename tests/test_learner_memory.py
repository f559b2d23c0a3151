"""The learner's memory at 7B scale, on CPU (float32): the chunked LM head equals the unchunked one (values and
gradients) and saves under 10% of its memory per scored token at a 152,064-token vocabulary; packed micro-batches
equal padded ones; rank balancing and the real-token budget keep their bounds; offload and reload round-trip bit
for bit; ranks that build on the meta device and receive rank 0's weights end with the weights every rank would
have read, at a lower peak RSS.

Tolerances: float32, only the summation order differs (matmul blocking over chunks, packed vs padded rows):
log-probs and entropy within 1e-5 absolute, gradients within 1e-5 of their largest element; loss terms within
1e-6 relative. A dropped chunk, a mis-aligned label or a row attending to its neighbour moves them by ~1e-1.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

import pytest
import torch

from research_rl.algo.experience import Experience
from research_rl.config.schema import AlgoConfig, ConfigError, LearnerConfig
from research_rl.learner.chunked import head_log_probs, pack_rows
from research_rl.learner.core import Learner
from research_rl.learner.passes import balanced_shards, plan_micro_batches

pytestmark = [pytest.mark.unit, pytest.mark.timeout(300)]

VOCAB_7B = 152064


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def group():
    """One gloo group of world size 1 for every learner of this module (a process joins once)."""
    import torch.distributed as dist

    first = Learner(LearnerConfig(), AlgoConfig())
    first.init_process_group("127.0.0.1", _free_port())
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


def _head_inputs(k=37, d=16, v=1000, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(k, d, generator=g), torch.randn(v, d, generator=g) * 0.5,
            torch.randint(0, v, (k,), generator=g))


@pytest.mark.parametrize("entropy_grad", [True, False])
def test_chunked_head_equals_the_unchunked_values_and_gradients(entropy_grad):
    hidden, weight, labels = _head_inputs()
    results = []
    for chunk in (0, 8, 5, 64):  # 64 > K: a single chunk
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        lp, ent = head_log_probs(h, w, labels, temperature=0.7, chunk=chunk, with_entropy=True,
                                 entropy_grad=entropy_grad)
        assert ent.requires_grad == entropy_grad and lp.requires_grad
        g = torch.Generator().manual_seed(1)
        weights = torch.randn(lp.shape, generator=g)  # an arbitrary loss: every token's gradient matters
        loss = (weights * lp).sum() + (0.3 * ent.sum() if entropy_grad else 0)
        loss.backward()
        results.append((lp.detach(), ent.detach(), h.grad, w.grad))
    base = results[0]
    for lp, ent, gh, gw in results[1:]:
        torch.testing.assert_close(lp, base[0], rtol=0, atol=1e-5)
        torch.testing.assert_close(ent, base[1], rtol=0, atol=1e-5)
        torch.testing.assert_close(gh, base[2], rtol=0, atol=1e-5 * float(base[2].abs().max()))
        torch.testing.assert_close(gw, base[3], rtol=0, atol=1e-5 * float(base[3].abs().max()))
    assert float(base[3].abs().max()) > 1e-2  # the gradients compared are not ~0


def test_chunked_head_without_entropy_and_bad_arguments():
    hidden, weight, labels = _head_inputs()
    lp, ent = head_log_probs(hidden, weight, labels, chunk=4, with_entropy=False)
    assert ent is None
    torch.testing.assert_close(lp, head_log_probs(hidden, weight, labels, chunk=0, with_entropy=False)[0])
    with pytest.raises(ValueError, match="chunk"):
        head_log_probs(hidden, weight, labels, chunk=-1)
    with pytest.raises(ValueError, match="hidden"):
        head_log_probs(hidden, weight[:, :3], labels, chunk=4)


def _saved_bytes_per_token(chunk: int, k: int = 64, d: int = 64) -> float:
    """Bytes autograd saves per scored token for the head + log-probs + entropy (in the graph), parameters
    excluded, the head's input included."""
    g = torch.Generator().manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(VOCAB_7B, d, generator=g) * 0.02)
    x = torch.randn(k, d, generator=g).requires_grad_()
    labels = torch.randint(0, VOCAB_7B, (k,), generator=g)
    seen: dict[int, int] = {}

    def pack(t):
        if t.untyped_storage().data_ptr() != weight.untyped_storage().data_ptr():
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        lp, ent = head_log_probs(x * 1.0, weight, labels, chunk=chunk, with_entropy=True, entropy_grad=True)
    (lp.sum() + ent.sum()).backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0
    return sum(seen.values()) / k


def test_chunked_head_saves_under_a_tenth_of_the_unchunked_memory_per_scored_token():
    unchunked, chunked = _saved_bytes_per_token(0), _saved_bytes_per_token(16)
    assert unchunked >= 3 * 4 * VOCAB_7B  # the measurement sees the [K, V] fp32 tensors (~1.74 MiB per token)
    assert chunked <= 0.10 * unchunked, (chunked, unchunked)
    assert chunked <= 4 * 64 + 64  # the head's input (d fp32 values) and per-token scalars


def test_pack_rows_restarts_positions_and_refuses_left_padding():
    ids = torch.tensor([[5, 6, 7, 0], [8, 9, 0, 0], [1, 2, 3, 4]])
    attn = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
    flat, pos, lengths = pack_rows(ids, attn)
    assert flat.tolist() == [[5, 6, 7, 8, 9, 1, 2, 3, 4]]
    assert pos.tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3]]
    assert lengths.tolist() == [3, 2, 4]
    with pytest.raises(ValueError, match="right-padded"):
        pack_rows(ids, torch.tensor([[0, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 1]]))


def _batch(seed=0) -> Experience:
    g = torch.Generator().manual_seed(seed)
    lengths = [60, 35, 50, 20, 44, 59]
    ids = torch.randint(10, 2000, (len(lengths), max(lengths)), generator=g)
    attn = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        attn[i, :n] = 1
    mask = torch.zeros_like(ids)
    mask[:, 8:] = 1
    mask[2, 20:25] = 0  # an inserted <result> span inside a response
    return Experience(ids * attn, attn, mask * attn, advantages=torch.tensor([1.0, -1.0, 0.5, -0.5, 2.0, -2.0]),
                      temperature=0.7)


def _grads_of_one_step(model_dir, **settings):
    """Loss terms, gradients and log-probs of one GRPO micro-batched backward (no optimizer step)."""
    learner = Learner(LearnerConfig(lr=1e-3, micro_batch_size=2, weight_decay=0.0, **settings),
                      AlgoConfig(kl_coef=0.0, entropy_coef=0.01))
    learner.load_policy(str(model_dir))
    exp = _batch()
    learner.policy.zero_grad()
    sums, _ = learner._accumulate(exp, learner._grpo_loss)
    grads = {k: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
             for k, p in learner.policy.module.named_parameters()}
    return sums, grads, learner.compute_log_probs(exp)


@pytest.mark.parametrize("settings", [dict(logits_chunk_tokens=7), dict(pack=True),
                                      dict(pack=True, max_tokens_per_micro_batch=100, logits_chunk_tokens=32)],
                         ids=["chunked", "packed", "packed-budget-chunked"])
def test_chunked_and_packed_learner_equal_the_default_path(group, debug_model_dir, settings):
    """Loss, entropy and every parameter's gradient of the update, and the log-probs, equal the default (padded,
    unchunked) path, with the entropy bonus in the graph and the sampling temperature 0.7."""
    base_sums, base_grads, base_lp = _grads_of_one_step(debug_model_dir)
    sums, grads, lp = _grads_of_one_step(debug_model_dir, **settings)
    for key in ("loss", "pg_loss", "entropy"):
        assert sums[key] == pytest.approx(base_sums[key], rel=1e-6, abs=1e-7), key
    assert sorted(grads) == sorted(base_grads)
    for key, g in base_grads.items():
        torch.testing.assert_close(grads[key], g, rtol=0, atol=1e-5 * float(g.abs().max()) + 1e-12, msg=key)
    scored = _batch().loss_mask[:, 1:]
    torch.testing.assert_close(lp * scored, base_lp * scored, rtol=0, atol=1e-5)
    if settings.get("max_tokens_per_micro_batch"):
        assert sums["micro_batches"] == 3  # 268 real tokens in budgets of 100: [60, 35] [59, 20] [50, 44]


def test_packed_budget_counts_real_tokens():
    lengths = [60, 35, 50, 20, 44, 59]
    # first-fit decreasing: 60 | 59 (119 > 100) | 50 | 44 joins 50 (94) | 35 joins 60 (95) | 20 joins 59 (79)
    assert plan_micro_batches(lengths, 2, 100, pack=True) == [[0, 1], [5, 3], [2, 4]]
    # padded, rows × longest: 44 joins 50 (2 × 50 = 100), 20 joins 35 (2 × 35); 35 fits nowhere (2 × 50 + ...)
    assert plan_micro_batches(lengths, 2, 100) == [[0], [5], [2, 4], [1, 3]]
    assert plan_micro_batches([130, 10], 2, 120, pack=True) == [[0], [1]]  # too long: a micro-batch of its own


def test_balanced_shards_stay_within_the_longest_row():
    """Every rank gets the same number of rows and a token count within the longest row of every other's, on
    random length distributions (uniform, heavy-tailed, one very long row)."""
    rng = random.Random(0)
    for trial in range(200):
        ranks = rng.choice([2, 4, 8])
        n = ranks * rng.randint(1, 12)
        kind = trial % 3
        lengths = [rng.randint(300, 8704) if kind == 0 else int(300 * (1 + rng.paretovariate(1.2))) if kind == 1
                   else rng.randint(1, 50) for _ in range(n)]
        if kind == 2:
            lengths[0] = 5000
        shards = balanced_shards(lengths, ranks)
        assert sorted(i for s in shards for i in s) == list(range(n))
        assert {len(s) for s in shards} == {n // ranks}
        loads = [sum(lengths[i] for i in s) for s in shards]
        assert max(loads) - min(loads) <= max(lengths), (lengths, shards)
    with pytest.raises(ValueError, match="evenly"):
        balanced_shards([1, 2, 3], 2)


def _storages(learner) -> set[int]:
    """Where the optimizer state and the parameter shards live (FSDP2: DTensors; their local tensors)."""
    def ptr(t):
        return (t.to_local() if hasattr(t, "to_local") else t).untyped_storage().data_ptr()

    state = {ptr(t) for st in learner.policy.optimizer.state.values() for t in st.values()
             if torch.is_tensor(t) and t.dim() > 0}
    return state | {ptr(p) for p in learner.policy.module.parameters()}


@pytest.mark.parametrize("offload", ["optimizer", "all"])
def test_offload_and_reload_round_trip_bit_for_bit(group, debug_model_dir, offload):
    """Update, offload, reload, update: the parameters equal two updates without the round trip exactly, and the
    reference log-probs after reload equal those before; the round trip really moved state (new storages)."""
    exp = _batch()

    def run(mode: str, round_trip: bool):
        learner = Learner(LearnerConfig(lr=1e-3, micro_batch_size=2, offload=mode),
                          AlgoConfig(kl_coef=0.05, entropy_coef=0.01))
        learner.load_policy(str(debug_model_dir))
        learner.load_reference(str(debug_model_dir))
        ref = learner.compute_ref_log_probs(exp)
        learner.update(exp.replace(ref_log_probs=ref))
        moved = None
        if round_trip:
            before = _storages(learner)
            seconds = learner.offload()
            assert all(p.grad is None for p in learner.policy.module.parameters())  # dropped, not kept
            assert seconds >= 0 and learner.reload() >= 0
            moved = before - _storages(learner)
            torch.testing.assert_close(learner.compute_ref_log_probs(exp), ref, rtol=0, atol=0)
        learner.update(exp.replace(ref_log_probs=ref))
        return learner.full_state_dict(), moved

    plain, _ = run("none", False)
    after, moved = run(offload, True)
    assert moved  # every moved tensor now lives in a new storage
    assert sorted(after) == sorted(plain)
    for key, value in plain.items():
        assert torch.equal(after[key], value), key


def test_reference_offload_refuses_a_pass_until_reload(group, debug_model_dir):
    from research_rl.learner.reference import ReferencePolicy

    ref = ReferencePolicy(LearnerConfig())
    ref.load(str(debug_model_dir))
    exp = _batch()
    before = ref.compute_log_probs(exp)
    ref.offload()
    with pytest.raises(RuntimeError, match="reload"):
        ref.compute_log_probs(exp)
    ref.reload()
    assert torch.equal(ref.compute_log_probs(exp), before)


def test_offload_keys_are_checked():
    with pytest.raises(ConfigError, match="learner.offload"):
        LearnerConfig(offload="params")
    with pytest.raises(ConfigError, match="cpu_offload"):
        LearnerConfig(offload="optimizer", cpu_offload=True)
    with pytest.raises(ConfigError, match="zero_stage=3"):
        LearnerConfig(offload="all", backend="deepspeed", zero_stage=2)
    with pytest.raises(ConfigError, match="logits_chunk_tokens"):
        LearnerConfig(logits_chunk_tokens=-1)


# ------------------------------------------------------------------------------------------ one copy at start
# ~98M parameters (374 MiB fp32), largest tensor 16 MiB (as at 7B, small beside a rank's share: 2.2 of 30 GiB)
RSS_SHAPE = dict(vocab_size=4096, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                 num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=False)


def _rss(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _load_worker(rank: int, port: int, model_dir: str, out: str) -> None:
    """Load with ``rank0_load``, then the old way, in one process; rank 1's peak-RSS growth of each (``VmHWM``,
    reset to the current RSS before each load through ``/proc/self/clear_refs``)."""
    import gc

    import torch.distributed as dist
    import transformers.models.qwen2.modeling_qwen2  # noqa: F401  (code, not weights: before the baseline)

    torch.set_num_threads(1)
    result = {}
    try:
        for rank0_load in (True, False):
            learner = Learner(LearnerConfig(rank0_load=rank0_load), AlgoConfig(), rank, 2)
            learner.init_process_group("127.0.0.1", port)  # joins once
            gc.collect()
            Path("/proc/self/clear_refs").write_text("5")  # peak RSS := current RSS
            before = _rss("VmHWM")
            learner.load_policy(model_dir)
            grown = _rss("VmHWM") - before
            result[rank0_load] = {"grown": grown, "state": learner.full_state_dict(),
                                  "log_probs": learner.compute_log_probs(_batch())}
            del learner
        if rank == 1:
            result = {k: {"grown": v["grown"]} for k, v in result.items()}
        torch.save(result, f"{out}.rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_meta_device_ranks_receive_rank0_weights_at_a_fraction_of_a_copy(tmp_path):
    """2 ranks (FSDP2, gloo): with ``rank0_load`` rank 1 builds on the meta device and receives rank 0's weights.
    The gathered weights and the log-probs equal those of every rank reading the model itself, bit for bit, and
    rank 1's peak RSS grows by its half of the weights plus a few copies of the largest tensor (the one in flight:
    received whole, then cut to its shard), under 80% of one full copy."""
    import torch.multiprocessing as mp
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(Qwen2Config(**RSS_SHAPE), dtype=torch.float32)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    largest = max(p.numel() * p.element_size() for p in model.parameters())
    model.save_pretrained(str(tmp_path / "model"))
    del model
    out = str(tmp_path / "load")
    mp.start_processes(_load_worker, args=(_free_port(), str(tmp_path / "model"), out), nprocs=2, join=True,
                       start_method="spawn")
    rank0, rank1 = torch.load(out + ".rank0.pt"), torch.load(out + ".rank1.pt")
    new, old = rank0[True], rank0[False]
    assert sorted(new["state"]) == sorted(old["state"])
    for key, value in old["state"].items():
        assert torch.equal(new["state"][key], value), key
    assert torch.equal(new["log_probs"], old["log_probs"])
    grown = rank1[True]["grown"]
    # a rank that reads the model itself holds a full copy at its peak (> 0.8 of one), so this bound fails without
    # rank 0's weights; the old way's growth measured second in this process is not compared: it reuses the pages
    # the first load freed (bench/learner.py --memory measures both in fresh processes)
    assert grown < model_bytes / 2 + 4 * largest and grown < 0.8 * model_bytes, (grown, model_bytes, largest)
