"""The vLLM adapter (research_rl/rollout/vllm_engine.py) against the real vLLM API, on CPU (``make test-vllm``: a separate
venv with the CPU build of vLLM). Skipped where vllm is not importable.

The tiny model has head_dim 64 (vLLM's CPU attention rejects smaller heads). A few supervised steps teach it two
scripted trajectories (search, then answer), so that greedy decoding emits ``</search>`` and EOS; those weights
reach the engine only through weight sync (``research_rl.sync``: a planned sync of packed buckets, received by every
vLLM worker's ``WeightReceiver``), as the learner's would. The transports between real learner and rollout actors
(ipc, collective, object store): tests/test_vllm_train.py.
"""

from __future__ import annotations

import pytest

vllm = pytest.importorskip("vllm")

import torch  # noqa: E402

from research_rl.rollout.agent_loop import MODES, AgentLoop, SamplingParams, format_observation  # noqa: E402

pytestmark = pytest.mark.vllm
QUESTIONS = ["Who directed Ed Wood?", "Where is Nissedal?"]
SCRIPT = {  # question -> (first segment, answer after the result)
    QUESTIONS[0]: ("<think> director </think> <search> Ed Wood film </search>", " <answer> \\boxed{Tim Burton} </answer>"),
    QUESTIONS[1]: ("<think> place </think> <search> Nissedal </search>", " <answer> \\boxed{Norway} </answer>"),
}


def _passages(query: str) -> list[str]:
    return [f"passage on {query}"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from research_rl.config.schema import DebugModelConfig
    from research_rl.debug_model import build_debug_model
    from tests.conftest import ROOT

    out = tmp_path_factory.mktemp("vllm") / "model"
    build_debug_model(str(out), str(ROOT / "data/corpus/corpus.jsonl"), [str(ROOT / "data/musique/train.jsonl")],
                      DebugModelConfig(vocab_size=2048, hidden_size=128, intermediate_size=256, num_layers=2,
                                       num_heads=2, num_kv_heads=1))
    return out


@pytest.fixture(scope="module")
def tok(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def _prompt(tok, q):
    from research_rl.algo.templates import encode_prompt

    return encode_prompt(q, "base", tok)


@pytest.fixture(scope="module")
def trained(model_dir, tok):
    """The 'learner': the HF model after supervised steps on the scripted trajectories (the token stream the agent
    loop builds: prompt + segment + inserted result + answer + EOS), the loss on the model's own tokens only (the
    segment, the answer and EOS; the prompt and the result masked, as in RL). It trains until every scripted token
    has probability > 0.9 under teacher forcing, so that greedy decoding follows the script on any CPU: a loss
    averaged with the prompt's tokens could pass while one scripted token lost its argmax by a float32 rounding
    margin, which made greedy decoding on another machine's kernels leave the script."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    torch.set_num_threads(1)  # on a shared 2-core machine, 2 OpenMP threads ran these steps ~40× slower
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    seqs = []  # (ids [1, L], labels [1, L]; -100 where masked)
    for q, (first, answer) in SCRIPT.items():
        query = first.split("<search>")[1].split("</search>")[0].strip()
        prompt, segment = _prompt(tok, q), tok.encode(first, add_special_tokens=False)
        result = tok.encode(format_observation(_passages(query)), add_special_tokens=False, split_special_tokens=True)
        reply = tok.encode(answer, add_special_tokens=False) + [tok.eos_token_id]
        seqs.append((torch.tensor([prompt + segment + result + reply]),
                     torch.tensor([[-100] * len(prompt) + segment + [-100] * len(result) + reply])))

    def min_scripted_prob() -> float:
        return min(float(_hf_log_probs(model, ids[0].tolist())[labels[0, 1:] != -100].exp().min())
                   for ids, labels in seqs)

    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(400):
        loss = sum(model(input_ids=ids, labels=labels).loss for ids, labels in seqs)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 25 == 24 and min_scripted_prob() > 0.9:
            break
    assert min_scripted_prob() > 0.9, (step, loss.item())
    return model.eval()


def _packed(model, bucket_mb: float = 0.1) -> list:
    """The learner's side of a sync: every parameter (tied aliases once) planned in float32 buckets of
    ``bucket_mb`` MiB, each packed into a flat host buffer (what the object-store transport carries)."""
    from research_rl.sync.buckets import pack, plan_buckets

    tensors = dict(model.named_parameters())  # remove_duplicate: tied aliases once, as Learner.sync_plan lists them
    buckets = plan_buckets([(n, t.shape) for n, t in tensors.items()], "float32", bucket_mb)
    return [(b, pack(b, tensors, torch.empty(b.nbytes, dtype=torch.uint8))) for b in buckets]


def _hf_log_probs(model, seq):
    ids = torch.tensor([seq])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, :-1]
    return torch.log_softmax(logits.float(), -1).gather(-1, ids[0, 1:, None]).squeeze(-1)


@pytest.fixture(scope="module")
def engine(model_dir, tok):
    from research_rl.rollout.vllm_engine import VLLMEngine

    eng = VLLMEngine(str(model_dir), tok, dtype="float32", max_model_len=1024, max_num_seqs=8)
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def synced(engine, trained, tok):
    """The engine after a weight sync from the 'learner'; checks the log-prob probe before and after."""
    seq = _prompt(tok, QUESTIONS[0]) + tok.encode(SCRIPT[QUESTIONS[0]][0], add_special_tokens=False)
    before = (engine.log_probs(seq) - _hf_log_probs(trained, seq)).abs().max()
    from research_rl.sync.transport import device_key

    packed = _packed(trained)
    assert len(packed) > 1 and engine.weight_dtype == "float32" and engine.sync_device_keys() == [device_key("cpu")]
    planned = {n for b, _ in packed for n in b.names}
    assert planned == engine.parameter_names() and planned < engine.known_names()  # + the tied lm_head alias
    engine.begin_sync()  # one sync; q/k/v of a layer may sit in different buckets
    for bucket, flat in packed:
        engine.receive_packed(bucket, flat)
    stats = engine.end_sync()
    assert (stats.bytes, stats.buckets) == (sum(b.nbytes for b, _ in packed), len(packed))
    after = (engine.log_probs(seq) - _hf_log_probs(trained, seq)).abs().max()
    return float(before), float(after)


def test_weight_update_brings_engine_log_probs_to_the_learners(synced, engine):
    before, after = synced
    assert before > 0.1, before  # the engine started from the untrained weights
    assert after < 1e-4, after  # fp32 on both sides; trainer.probe_tolerance allows a mean of 0.05 (bf16)


def test_generation_stops_at_search_and_eos(synced, engine, tok):
    p = _prompt(tok, QUESTIONS[0])
    (out,) = engine.generate([p], [64], SamplingParams(greedy=True))
    first = tok.encode(SCRIPT[QUESTIONS[0]][0], add_special_tokens=False)
    assert (out.finish, out.token_ids) == ("search", first)  # stops right after </search>, kept in the output
    result = tok.encode(format_observation(_passages("Ed Wood film")), add_special_tokens=False,
                        split_special_tokens=True)
    (out2,) = engine.generate([p + first + result], [64], SamplingParams(greedy=True))
    assert out2.finish == "eos" and out2.token_ids[-1] == tok.eos_token_id
    assert tok.decode(out2.token_ids[:-1]) == tok.decode(tok.encode(SCRIPT[QUESTIONS[0]][1], add_special_tokens=False))
    (cut,) = engine.generate([p], [3], SamplingParams(greedy=True))
    assert (cut.finish, cut.token_ids) == ("length", first[:3])


def test_continuation_from_token_ids_equals_single_pass(synced, engine, tok):
    p = _prompt(tok, "An unseen question about Oslo?")
    (whole,) = engine.generate([p], [40], SamplingParams(greedy=True))
    n = len(whole.token_ids) // 2
    assert n > 0
    (rest,) = engine.generate([p + whole.token_ids[:n]], [40 - n], SamplingParams(greedy=True))
    assert whole.token_ids[:n] + rest.token_ids == whole.token_ids
    # seeded sampling: the same request seed reproduces the same tokens, in any batch
    s = SamplingParams(temperature=1.0, seed=11)
    a = engine.generate([p, p, p], [20, 20, 20], s, seeds=[1, 2, 1])
    assert a[0].token_ids == a[2].token_ids


@pytest.mark.parametrize("mode", MODES)
def test_agent_loop_on_vllm_matches_the_hf_engine(synced, engine, trained, tok, model_dir, tmp_path, mode):
    """The same weights in the HF engine and in vLLM: greedy trajectories (ids, loss masks, queries, finish) agree."""
    from research_rl.rollout.hf_engine import HFEngine

    trained.save_pretrained(tmp_path / "hf")
    tok.save_pretrained(tmp_path / "hf")
    hf = HFEngine(str(tmp_path / "hf"), tok, max_batch_size=4)
    prompts = [_prompt(tok, q) for q in QUESTIONS] * 2

    def search(queries):
        return [_passages(q) for q in queries]

    g = SamplingParams(greedy=True)
    on_vllm = AgentLoop(engine, search, tok, 120, mode=mode).run(prompts, g)
    on_hf = AgentLoop(hf, search, tok, 120, mode=mode).run(prompts, g)
    assert [t.queries for t in on_vllm] == [["Ed Wood film"], ["Nissedal"]] * 2
    assert all(t.finish_reason == "eos" for t in on_vllm)
    for v, h in zip(on_vllm, on_hf):
        assert (v.response_ids, v.loss_mask, v.queries, v.finish_reason) == \
            (h.response_ids, h.loss_mask, h.queries, h.finish_reason)


def test_generation_stops_at_every_eos_id(synced, engine, tok):
    """vLLM stops on the whole EOS set (``stop_token_ids``), as the HF engine does: the greedy first token of a
    prompt, made a second EOS id, ends the response after one token with finish "eos"; without it generation runs
    on (the engine's set is what ``VLLMEngine(eos_ids=...)`` was given; swapped here to reuse the started engine)."""
    p = _prompt(tok, QUESTIONS[1])
    (first,) = engine.generate([p], [1], SamplingParams(greedy=True))
    assert first.finish == "length" and len(first.token_ids) == 1
    saved = engine.eos_ids
    engine.eos_ids = [tok.eos_token_id, first.token_ids[0]]
    try:
        (out,) = engine.generate([p], [16], SamplingParams(greedy=True))
    finally:
        engine.eos_ids = saved
    assert (out.token_ids, out.finish) == (first.token_ids, "eos")


def _hf_sampling_log_probs(model, seq, start, temperature, top_p):
    """Log-probs of tokens ``start..`` of ``seq`` under the HF model's sampling distribution: ``log_softmax(logits /
    T)``, with top_p < 1 restricted to the nucleus (transformers' ``TopPLogitsWarper`` rule) and renormalised."""
    ids = torch.tensor([seq])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, start - 1:-1].float() / temperature  # [n, V]
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1)
        remove = sorted_logits.softmax(-1).cumsum(-1) <= 1 - top_p
        remove[:, -1] = False
        logits = logits.masked_fill(remove.scatter(1, order, remove), float("-inf"))
    return torch.log_softmax(logits, -1).gather(-1, ids[0, start:, None]).squeeze(-1)


@pytest.mark.parametrize("temperature, top_p", [(0.7, 1.0), (1.2, 0.9)])
def test_sampled_log_probs_are_the_hf_models_at_the_sampling_temperature(synced, engine, trained, tok, temperature,
                                                                        top_p):
    """vLLM's log-probs of its sampled tokens (``logprobs=0``, ``logprobs_mode=processed_logprobs``) are the HF
    model's ``log_softmax(logits / T)`` over the top-p nucleus, the quantity the HF engine returns, within 1e-4 (the
    float32 CPU kernels of the two; the probe test above gets the same bound); vLLM's default ``raw_logprobs``
    (T = 1, no nucleus) would be off by more than 1e-2. Through the agent loop, a trajectory's
    ``rollout_log_probs`` line up with its response, 0.0 on the inserted result."""
    sampling = SamplingParams(temperature=temperature, top_p=top_p)
    prompts = [_prompt(tok, q) for q in QUESTIONS]
    outs = engine.generate(prompts, [48, 48], sampling, seeds=[3, 4])
    for p, out in zip(prompts, outs):
        assert out.log_probs is not None and len(out.log_probs) == len(out.token_ids) > 4
        want = _hf_sampling_log_probs(trained, p + out.token_ids, len(p), temperature, top_p)
        got = torch.tensor(out.log_probs)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
        raw = _hf_log_probs(trained, p + out.token_ids)[len(p) - 1:]
        assert (got - raw).abs().max() > 1e-2
    assert engine.generate(prompts[:1], [8], SamplingParams(greedy=True))[0].log_probs is None

    def search(queries):
        return [_passages(q) for q in queries]

    trajs = AgentLoop(engine, search, tok, 120).run(prompts, SamplingParams(temperature=0.5, seed=2))
    searched = [t for t in trajs if 0 in t.loss_mask]
    assert searched, "the trained model searches at T = 0.5"
    for t in trajs:
        assert len(t.rollout_log_probs) == len(t.response_ids)
        assert all(lp == 0.0 for lp, m in zip(t.rollout_log_probs, t.loss_mask) if not m)
        want = _hf_sampling_log_probs(trained, t.prompt_ids + t.response_ids, len(t.prompt_ids), 0.5, 1.0)
        generated = torch.tensor(t.loss_mask, dtype=torch.bool)
        torch.testing.assert_close(torch.tensor(t.rollout_log_probs)[generated], want[generated], rtol=0, atol=1e-4)


def test_gpu_sync_loads_into_the_live_model_without_the_layerwise_reload(monkeypatch):
    """Where vLLM does not repack weights after loading (CUDA), each worker's receiver hands a bucket's views to the
    model's ``load_weights`` and the sync neither begins nor finishes a layerwise reload: that module (absent from
    older vLLM releases) is not imported. Only the platform check and the worker around the extension are stand-ins;
    the CPU path is the tests above."""
    import pickle
    import sys
    from types import SimpleNamespace

    from vllm.platforms import current_platform

    from research_rl.rollout.vllm_engine import WeightSyncExtension
    from research_rl.sync.buckets import pack, plan_buckets

    layerwise = "vllm.model_executor.model_loader.reload.layerwise"
    monkeypatch.delitem(sys.modules, layerwise, raising=False)
    monkeypatch.setattr(current_platform, "is_cpu", lambda: False)
    loaded = {}
    model = torch.nn.Linear(2, 4)
    model.load_weights = lambda weights: loaded.update((n, t.clone()) for n, t in weights)
    worker = WeightSyncExtension()
    worker.vllm_config, worker.model_runner, worker.rank = SimpleNamespace(), SimpleNamespace(model=model), 0
    tensors = {"model.layers.0.self_attn.q_proj.weight": torch.randn(4, 2), "model.norm.weight": torch.randn(2)}
    (bucket,) = plan_buckets([(n, t.shape) for n, t in tensors.items()], "float32", 1)
    flat = pack(bucket, tensors, torch.empty(bucket.nbytes, dtype=torch.uint8))
    assert worker.rl_sync_info()["dtype"] == "float32"
    worker.rl_begin_sync()
    worker.rl_receive_packed(pickle.dumps(bucket), flat.numpy().tobytes())
    assert worker.rl_end_sync() == {"bytes": bucket.nbytes, "elements": 10, "tensors": 2, "buckets": 1}
    assert loaded.keys() == tensors.keys() and all(torch.equal(loaded[n], t) for n, t in tensors.items())
    assert layerwise not in sys.modules
