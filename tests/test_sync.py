"""Weight sync (research_rl/sync, research_rl/driver/weight_sync.py): the bucket layout, the last layer of each
transport between two real processes (a shared-memory buffer for CUDA IPC, a gloo group for NCCL), and the three
transports between real ``LearnerWorker`` and ``RolloutWorker`` actors in a real Ray cluster: what the engines
receive is the learner's policy in the engines' dtype, bytes on the wire = elements × dtype size, and a plan the
engine's model does not match fails before any byte moves."""

from __future__ import annotations

import multiprocessing as mp

import pytest
import torch

from research_rl.sync.buckets import ALIGN, pack, plan_buckets, unpack
from research_rl.sync.transport import SharedBuffer, broadcast, device_key, free_port, open_buffer, stateless_group


# ---------------------------------------------------------------------------------------------- buckets
@pytest.mark.unit
def test_plan_cuts_buckets_in_order_with_aligned_offsets_and_a_large_tensor_alone():
    shapes = [("a", (3, 5)), ("b", (1000,)), ("big", (600, 1000)), ("c", (7,))]
    buckets = plan_buckets(shapes, "bfloat16", bucket_mb=0.5)  # 524,288 bytes; "big" is 1.2 MB
    assert [b.names for b in buckets] == [["a", "b"], ["big"], ["c"]]
    a, b = buckets[0].specs
    assert (a.offset, b.offset) == (0, 2 * ALIGN) and buckets[0].nbytes == 2 * ALIGN + 2000  # 30 bytes, padded
    assert buckets[1].nbytes == 600 * 1000 * 2 and [x.index for x in buckets] == [0, 1, 2]
    with pytest.raises(ValueError, match="appears twice"):
        plan_buckets([("a", (1,)), ("a", (1,))], "bfloat16", 1)
    with pytest.raises(ValueError, match="not a floating-point"):
        plan_buckets([("a", (1,))], "int64", 1)


@pytest.mark.unit
def test_pack_casts_to_the_wire_dtype_and_unpack_gives_views_of_the_same_bytes():
    g = torch.Generator().manual_seed(0)
    tensors = {"w": torch.randn(4, 6, generator=g), "b": torch.randn(5, generator=g)}
    (bucket,) = plan_buckets([(k, v.shape) for k, v in tensors.items()], "bfloat16", 1)
    flat = torch.zeros(bucket.nbytes + 100, dtype=torch.uint8)
    pack(bucket, tensors, flat)
    out = dict(unpack(bucket, flat))
    for k, v in tensors.items():
        assert out[k].dtype == torch.bfloat16 and torch.equal(out[k], v.to(torch.bfloat16))
    out["w"][0, 0] = 7.0  # a view: no copy
    assert dict(unpack(bucket, flat))["w"][0, 0] == 7.0
    with pytest.raises(ValueError, match="shape"):
        pack(bucket, {"w": torch.zeros(6, 4), "b": tensors["b"]}, flat)
    with pytest.raises(ValueError, match="flat uint8 buffer"):
        pack(bucket, tensors, torch.zeros(8, dtype=torch.uint8))


# ---------------------------------------------------------------------------------------------- last layer
def _read_shared(handle, queue):
    t = open_buffer(handle, "cpu")
    queue.put(t[:16].tolist())  # a list: a tensor would travel by torch's own fd sharing
    t[0] = 99  # the writer must see it: one memory, two processes


@pytest.mark.unit
def test_a_shared_buffer_is_the_same_memory_in_another_process():
    buf = SharedBuffer(4096, "cpu")
    buf.tensor[:16] = torch.arange(16, dtype=torch.uint8)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    p = ctx.Process(target=_read_shared, args=(buf.handle, queue))
    p.start()
    seen = queue.get(timeout=60)
    p.join(timeout=60)
    assert p.exitcode == 0 and seen == list(range(16))
    assert int(buf.tensor[0]) == 99
    with pytest.raises(ValueError, match="ipc needs learner and engine on one device"):
        from dataclasses import replace

        open_buffer(replace(buf.handle, key="otherhost/cpu"), "cpu")
    buf.close()


def _receive_broadcast(port, queue):
    group = stateless_group("gloo", "127.0.0.1", port, 1, 2, timeout_s=60)
    t = torch.zeros(1000, dtype=torch.uint8)
    broadcast(group, t, src=0)
    queue.put(t.tolist())


@pytest.mark.unit
def test_a_stateless_gloo_group_broadcasts_beside_the_default_group():
    port = free_port()
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    p = ctx.Process(target=_receive_broadcast, args=(port, queue))
    p.start()
    group = stateless_group("gloo", "127.0.0.1", port, 0, 2, timeout_s=60)
    data = torch.randint(0, 255, (1000,), dtype=torch.uint8)
    broadcast(group, data, src=0)
    got = queue.get(timeout=60)
    p.join(timeout=60)
    assert got == data.tolist()
    assert device_key("cpu").endswith("/cpu")


# ---------------------------------------------------------------------------------------------- transports
@pytest.fixture(scope="module")
def perturbed_model_dir(debug_model_dir, tmp_path_factory):
    """The debug model with noise on every weight: the learner's policy, different from what the engines load."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(debug_model_dir, dtype=torch.float32)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5 * torch.randn(p.shape, generator=g))
    out = tmp_path_factory.mktemp("perturbed") / "model"
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(debug_model_dir).save_pretrained(out)
    return out


def _roles(debug_model_dir, perturbed_model_dir, n_learners: int, n_engines: int):
    from research_rl.config.schema import AlgoConfig, LearnerConfig, RolloutConfig
    from research_rl.retrieval.client import RetrieverClient
    from research_rl.roles.group import WorkerGroup
    from research_rl.roles.learner_worker import LearnerWorker
    from research_rl.roles.rollout_worker import RolloutWorker

    opts = [{"num_cpus": 0}] * n_learners
    learners = WorkerGroup.start("learner", LearnerWorker, opts, lambda r: (
        LearnerConfig(), AlgoConfig(), r, n_learners, "float32", False))
    learners.init_process_group()
    learners.call("load_policy", str(perturbed_model_dir))
    retriever = RetrieverClient(url="http://127.0.0.1:9")  # never called: no rollout here
    engines = WorkerGroup.start("rollout", RolloutWorker, [{"num_cpus": 0}] * n_engines, lambda r: (
        RolloutConfig(), str(debug_model_dir), retriever, 3, "float32", 256))
    return learners, engines


def _shutdown(*groups):
    import ray

    for g in groups:
        for a in g.actors:
            ray.kill(a)


@pytest.mark.ray
@pytest.mark.parametrize("requested,transport,placement,n_learners,n_engines", [
    ("auto", "ipc", "colocated", 2, 1),  # rank 0 packs for the one engine; rank 1 takes part in the gathers
    ("auto", "collective", "disaggregated", 1, 2),  # one group: learner leader + 2 engines
    ("object_store", "object_store", "colocated", 1, 1),
])
def test_each_transport_brings_the_learner_policy_to_every_engine(ray_cluster, debug_model_dir, perturbed_model_dir,
                                                                  tokenizer, requested, transport, placement,
                                                                  n_learners, n_engines):
    from research_rl.driver.weight_sync import WeightSync

    learners, engines = _roles(debug_model_dir, perturbed_model_dir, n_learners, n_engines)
    try:
        seq = tokenizer.encode("Who directed Ed Wood? <search> Ed Wood </search>")
        learner_lp = learners.call("probe_log_probs", seq)[0]
        before = engines.call("probe_log_probs", seq)
        assert all(float((lp - learner_lp).abs().mean()) > 0.05 for lp in before)  # the engines start elsewhere
        sync = WeightSync(learners, engines, requested, placement, bucket_mb=0.05)  # several buckets
        assert sync.route.transport == transport and sync.route.dtype == "float32"
        metrics = sync.sync(version=1)
        numel = sum(b.numel for b in learners.call_rank(0, "sync_plan", "float32", 0.05))
        assert metrics["sync/bytes"] == numel * 4 and metrics["sync/buckets"] > 2
        for lp in engines.call("probe_log_probs", seq):
            assert float((lp - learner_lp).abs().max()) < 1e-5  # the same fp32 weights, the same forward
        metrics = sync.sync(version=2)  # a second sync over the same route (ipc slots, the group) works too
        assert metrics["sync/bytes"] == numel * 4
    finally:
        _shutdown(learners, engines)


@pytest.mark.ray
def test_a_plan_the_engine_cannot_hold_fails_before_any_byte_moves(ray_cluster, debug_model_dir,
                                                                   perturbed_model_dir):
    from research_rl.driver.weight_sync import WeightSync
    from research_rl.roles.group import WorkerError
    from research_rl.sync.buckets import plan_buckets

    learners, engines = _roles(debug_model_dir, perturbed_model_dir, 1, 1)
    try:
        plan = learners.call_rank(0, "sync_plan", "float32", 1.0)
        names = [(s.name, s.shape) for b in plan for s in b.specs]
        with pytest.raises(WorkerError, match="has no tensor 'model.extra.weight'"):
            engines.call("sync_begin", plan_buckets(names + [("model.extra.weight", (4,))], "float32", 1.0))
        with pytest.raises(WorkerError, match="would leave 1 tensors of the rollout model stale"):
            engines.call("sync_begin", plan_buckets(names[1:], "float32", 1.0))
        with pytest.raises(ValueError, match="sync.transport=ipc needs a learner rank on every engine"):
            from research_rl.driver.weight_sync import choose

            choose("ipc", "colocated", ["a/cpu"], [["b/cpu"]])
        assert WeightSync(learners, engines, "object_store", "colocated", 1.0).sync(1)["sync/bytes"] > 0
    finally:
        _shutdown(learners, engines)


@pytest.mark.unit
def test_a_bf16_learner_and_a_bf16_engine_pass_the_probe_after_a_bf16_sync(debug_model_dir, tokenizer):
    """FSDP2 in bf16 mixed precision (fp32 master weights) and the HF engine holding bf16 weights, synced in bf16
    by the same sender and receiver code: the probe's statistic (mean |Δ log-prob| per token) is far inside the
    default tolerance; an engine left on fp32 initial weights while the learner moved is far outside it."""
    from research_rl.config.schema import AlgoConfig, LearnerConfig, TrainerConfig
    from research_rl.learner.core import Learner
    from research_rl.rollout.hf_engine import HFEngine
    from research_rl.sync.receiver import WeightReceiver

    learner = Learner(LearnerConfig(lr=0.05, weight_decay=0.0), AlgoConfig(), param_dtype=torch.bfloat16)
    learner.init_process_group("127.0.0.1", free_port())
    try:
        learner.load_policy(str(debug_model_dir))
        seq = tokenizer.encode("Who directed Ed Wood? <think> a film </think> <search> Ed Wood director </search>")
        stale = HFEngine(str(debug_model_dir), tokenizer, dtype=torch.float32)
        engine = HFEngine(str(debug_model_dir), tokenizer, dtype=torch.bfloat16)
        assert engine.weight_dtype == "bfloat16"
        from research_rl.algo.experience import Experience

        ids = torch.tensor([seq])
        for _ in range(3):  # move the policy well away from the initial weights
            learner.sft_step(Experience(ids, torch.ones_like(ids), torch.ones_like(ids)), lr=0.05)
        plan = learner.sync_plan(engine.weight_dtype, bucket_mb=0.1)
        receiver = WeightReceiver(lambda named: engine.load_weights(dict(named)), "cpu")
        for bucket, flat in zip(plan, learner.sender.host_buckets(plan)):
            receiver.receive_packed(bucket, flat)
        assert receiver.end().bytes == sum(b.numel for b in plan) * 2  # bf16 on the wire
        learner_lp = learner.probe_log_probs(seq)
        synced = float((engine.log_probs(seq) - learner_lp).abs().mean())
        behind = float((stale.log_probs(seq) - learner_lp).abs().mean())
        tolerance = TrainerConfig().probe_tolerance
        assert synced < 0.2 * tolerance < tolerance < behind, (synced, behind)
    finally:
        learner.shutdown()


@pytest.mark.ray
def test_an_engine_that_missed_a_sync_fails_the_probe_naming_the_engine_and_the_policy_version(
        ray_cluster, debug_model_dir, perturbed_model_dir, tokenizer, tmp_path):
    """Two engines; the learner's policy moves; the next sync reaches engine 0 only: the driver's probe (both
    engines at once) stops the run, naming engine 1 and the policy version it should hold."""
    from research_rl.algo.experience import Experience
    from research_rl.config.compose import compose_config
    from research_rl.driver.trainer import GRPOTrainer
    from research_rl.driver.weight_sync import WeightSync
    from research_rl.roles.group import WorkerGroup

    learners, engines = _roles(debug_model_dir, perturbed_model_dir, 1, 2)
    try:
        trainer = GRPOTrainer(compose_config(["experiment=debug_cpu", f"trainer.output_dir={tmp_path}"]))
        trainer.learners, trainer.rollout = learners, engines
        trainer.probe_sequence = tokenizer.encode("Who directed Ed Wood? <search> Ed Wood </search>")
        trainer.weight_sync = WeightSync(learners, engines, "auto", "colocated", 1.0)
        trainer.weight_sync.sync(0)
        assert trainer.probe()["sync/probe_mean_diff"] < 1e-5
        ids = torch.tensor([trainer.probe_sequence])
        learners.call("sft_step", Experience(ids, torch.ones_like(ids), torch.ones_like(ids)), 0.05)
        WeightSync(learners, WorkerGroup("rollout", engines.actors[:1]), "auto", "colocated", 1.0).sync(1)
        trainer.state.step = 1
        with pytest.raises(RuntimeError, match=r"after the weight sync to policy version 1, rollout engine 1's "
                                               r"log-probs differ from the learner's by [0-9.]+ nats per token"):
            trainer.probe()
    finally:
        _shutdown(learners, engines)
