"""vLLM rollout engine (``rollout.engine=vllm``): the only module that imports vllm.

The agent loop (ReSearch §2.1; research_rl/rollout/agent_loop.py) talks to vLLM's ``AsyncLLM`` token-in/token-out: every
request is a ``TokensPrompt`` of the trajectory's ids so far (prompt + generated + inserted result ids), and the
continuation comes back as token ids, never as re-tokenised text. Each request stops at the ``</search>`` stop
string (kept in the output) or an EOS id, with the shared response budget as ``max_tokens``. The EOS ids are
``eos_ids`` (``research_rl.rollout.eos``: by default every EOS id of the model's generation config, as the
reference rollout), passed as ``stop_token_ids`` with ``ignore_eos``, exactly the set the HF engine stops on. Sampling: temperature, top-p (no top-k) and a
per-request ``seed`` (``agent_loop.request_seed``), so a trajectory's tokens do not depend on which requests share
its decoding steps.

``AsyncLLM`` runs on an event loop of its own, in a background thread, so one engine serves the agent loop's
``asyncio.run`` calls one after the other (``generate_one`` from any loop), the turn-synchronous ``generate`` and
the driver's blocking calls (weight sync, log-prob probe, sleep/wake).

vLLM version: ``VLLM_MIN_VERSION`` or newer (the ``vllm`` extra's floor in pyproject.toml, the version
``make test-vllm`` runs); an older one is refused when the engine is built, naming the floor.

Executor: with ``tensor_parallel_size`` > 1 the engine asks for vLLM's ``mp`` executor (worker processes on the GPUs
this process was given), as verl's vLLM rollout does. Left to choose inside a Ray placement group (a rollout worker
is always in one on a GPU cluster), vLLM picks its ``ray`` executor, whose workers ask Ray for GPUs the rollout
actor already holds and wait forever. With one GPU vLLM's own choice, ``uni`` (the worker runs in the engine-core
process), needs no Ray resources and is kept.

Weight sync: ``WeightSyncExtension`` is vLLM's ``worker_extension_cls``: ``collective_rpc("rl_load_bucket", ...)``
runs it in every vLLM worker (every tensor-parallel rank), which hands the bucket (full tensors with the learner's
Hugging Face names, sent as ``torch.save`` bytes through vLLM's RPC) to the model's own ``load_weights`` (it fuses
q/k/v and gate/up and shards for tensor parallelism), straight into the live parameters on GPUs, as verl's and
OpenRLHF's vLLM weight updates do. The CPU backend repacks weights after loading (e.g. linear layers into oneDNN
handles), so there one sync is one session of vLLM's layerwise reload (``rl_begin_sync`` … ``rl_finish_sync``). The
buckets come from learner rank 0 through the Ray object store (``RolloutWorker.load_weights``). After a sync the
prefix cache is reset (its KV entries were computed with the old weights). The log-prob probe (``log_probs``) asks
vLLM for ``prompt_logprobs`` of a fixed sequence.

Every placement syncs through the Ray object store; there is no NCCL broadcast path (disaggregated GPU placement
sends the same buckets through the object store).

Sleep (``sleep_level``; the config's ``rollout.vllm_sleep_level``, resolved by
``research_rl.config.pools.vllm_sleep_level``: 2 in colocated placement, 0 in disaggregated): after a rollout the
engine sleeps so the learner has the GPU memory. vLLM sleep mode tags its memory ``weights`` and ``kv_cache``;
level 1 discards the KV cache and copies the weights to pinned host memory, level 2 discards both (vLLM keeps a
CPU copy of the model's buffers, e.g. rotary tables, and restores them when the weights wake:
``vllm/v1/worker/gpu_worker.py``, ``Worker.sleep`` / ``wake_up``). The next sync overwrites every parameter, so
level 1's host copy is wasted work and pinned memory; level 2 is the colocated default. The engine tracks which
tags sleep and wakes only those: a sync wakes ``weights``, the probe and the next rollout wake what still sleeps
(``kv_cache``); a tag already awake is never woken again (the allocator of older vLLM releases maps every allocation of
the tags it is given again, awake or not). The same protocol as verl's ``vllm_rollout`` (wake weights, load,
wake KV cache) and OpenRLHF's ``vllm_engine`` ``wake_up(tags=...)``. vLLM's CPU backend has no sleep mode
(``current_platform.is_sleep_mode_available()``): there the engine never sleeps.
"""

from __future__ import annotations

import asyncio
import io
import itertools
import os
import threading
from typing import Iterable, Mapping, Sequence

import torch

from research_rl.rollout.agent_loop import SEARCH_CLOSE, GenerationOutput, SamplingParams, request_seed

VLLM_MIN_VERSION = "0.32.0"  # tested floor; pyproject.toml's vllm extra says the same (tests/test_imports.py)
SLEEP_TAGS = ("weights", "kv_cache")  # vLLM sleep mode's memory tags, in the order a sync then a rollout wakes them


def check_vllm_version(version: str) -> None:
    """Refuse a vLLM older than ``VLLM_MIN_VERSION``. Compares the release numbers only, so a local build
    (``0.32.0+cpu``) or a pre-release of the floor (``0.32.0rc1``) passes.

    Raises:
        ImportError: naming the installed version, the floor and the install command.
    """
    from packaging.version import Version

    if Version(version).release < Version(VLLM_MIN_VERSION).release:
        raise ImportError(f"rollout.engine=vllm needs vllm>={VLLM_MIN_VERSION}, but vllm {version} is installed: "
                          f"pip install -e '.[vllm]' (or pip install 'vllm>={VLLM_MIN_VERSION}')")


class WeightSyncExtension:
    """Mixed into each vLLM worker (``worker_extension_cls``); its methods run through ``collective_rpc``.

    A sync is ``rl_begin_sync``, one ``rl_load_bucket`` per bucket, ``rl_finish_sync``. Each bucket goes through the
    model's ``load_weights`` (Hugging Face names; fuses q/k/v and gate/up and takes this rank's tensor-parallel
    shard, so a layer's weights may arrive in any buckets). On GPUs it loads into the live parameters (verl's
    ``vllm_rollout``, OpenRLHF's ``WorkerWrap.update_weight``) and begin/finish do nothing: unquantized models only
    (a quantized rollout model would need its weights processed after loading). Where vLLM repacks weights after
    loading (the CPU backend: linear layers into oneDNN handles), loading into the live parameters would fail, so
    begin/finish wrap the sync in vLLM's layerwise reload (kernel-format tensors set aside; a layer is processed
    into kernel format again once all its weights arrived); that module is imported only there.
    """

    @staticmethod
    def _repacks_weights() -> bool:
        from vllm.platforms import current_platform

        return current_platform.is_cpu()

    def rl_begin_sync(self) -> None:
        if not self._repacks_weights():
            return
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload.layerwise import initialize_layerwise_reload

        with set_current_vllm_config(self.vllm_config):
            initialize_layerwise_reload(self.model_runner.model)

    def rl_load_bucket(self, bucket: Mapping[str, torch.Tensor] | bytes) -> int:
        """Load full tensors named as in the Hugging Face checkpoint (a dict, or one serialised with ``torch.save``
        as ``VLLMEngine`` sends it); returns the number of elements received."""
        from vllm.config import set_current_vllm_config

        if isinstance(bucket, bytes):
            bucket = torch.load(io.BytesIO(bucket), weights_only=True)
        with set_current_vllm_config(self.vllm_config):
            self.model_runner.model.load_weights(weights=list(bucket.items()))
        return sum(t.numel() for t in bucket.values())

    def rl_finish_sync(self) -> None:
        if not self._repacks_weights():
            return
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding
        from vllm.model_executor.model_loader.reload.layerwise import finalize_layerwise_reload

        model = self.model_runner.model
        with set_current_vllm_config(self.vllm_config):
            finalize_layerwise_reload(model, self.vllm_config.model_config)
            # The CPU backend's (tied) LM head multiplies with a oneDNN handle packed from the embedding at load
            # time; the reload updates the embedding in place but not the handle: pack it again.
            for module in model.modules():
                if isinstance(module, VocabParallelEmbedding) and hasattr(module, "cpu_linear"):
                    module.quant_method.process_weights_after_loading(module)


class VLLMEngine:
    """A vLLM ``AsyncLLM`` behind the agent loop's engine interfaces (``generate`` and ``generate_one``).

    Args:
        model_path: HF model id or local directory (weights are then replaced by weight sync).
        tokenizer: the policy tokenizer (its ``eos_token_id`` ends a response unless ``eos_ids`` is given).
        dtype: ``float32`` | ``bfloat16`` | ``float16`` (``model.dtype``; float32 on CPU).
        max_model_len: tokens per sequence (prompt + response).
        max_num_seqs: sequences per decoding step (``rollout.max_batch_size``).
        tensor_parallel_size: GPUs per engine; > 1 runs vLLM's ``mp`` executor (module docstring).
        gpu_memory_utilization: fraction of each GPU's memory for weights + KV cache.
        sleep_level: what ``sleep()`` frees after a rollout: 0 nothing, 1 KV cache (weights to host memory), 2 both
            (module docstring). Ignored, and sleep mode off, where vLLM has none (its CPU backend).
        enforce_eager: no CUDA graphs.
        seed: engine seed (requests carry their own).
        cpu_kv_cache_gb: KV cache on the CPU backend, GiB.
        eos_ids: the ids that end a response (``research_rl.rollout.eos.eos_token_ids``).
    Raises:
        ImportError: vllm is not installed (``pip install -e '.[vllm]'`` on GPU machines), or is older than
            ``VLLM_MIN_VERSION``.
        ValueError: ``sleep_level`` is not 0, 1 or 2.
    """

    def __init__(self, model_path: str, tokenizer, dtype: str = "bfloat16", max_model_len: int = 8704,
                 max_num_seqs: int = 256, tensor_parallel_size: int = 1, gpu_memory_utilization: float = 0.5,
                 sleep_level: int = 0, enforce_eager: bool = False, seed: int = 0,
                 cpu_kv_cache_gb: int = 1, eos_ids: Sequence[int] | None = None):
        try:
            import vllm  # (fail here, with the install hint, rather than in the event-loop thread)
        except ImportError as e:
            raise ImportError("rollout.engine=vllm needs vllm: pip install -e '.[vllm]' on a GPU machine (CPU "
                              "contract tests: make test-vllm)") from e
        check_vllm_version(vllm.__version__)
        if sleep_level not in (0, 1, 2):
            raise ValueError(f"sleep_level must be 0, 1 or 2, got {sleep_level}")
        from vllm.platforms import current_platform

        self.tokenizer = tokenizer
        self.eos_ids = list(eos_ids) if eos_ids else [tokenizer.eos_token_id]
        self.model_path = model_path
        self.on_cpu = not torch.cuda.is_available()
        if self.on_cpu:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cpu_kv_cache_gb))
            dtype = "float32"
        self.sleep_level = sleep_level if current_platform.is_sleep_mode_available() else 0
        self.asleep: set[str] = set()  # the SLEEP_TAGS whose memory vLLM has released
        self._ids = itertools.count()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="vllm-engine", daemon=True)
        self._thread.start()
        args = dict(model=model_path, tokenizer=model_path, dtype=dtype, max_model_len=max_model_len,
                    max_num_seqs=max_num_seqs, tensor_parallel_size=tensor_parallel_size,
                    gpu_memory_utilization=gpu_memory_utilization, enable_sleep_mode=self.sleep_level > 0,
                    enforce_eager=enforce_eager or self.on_cpu, seed=seed, disable_log_stats=True,
                    worker_extension_cls=f"{__name__}.WeightSyncExtension")
        if tensor_parallel_size > 1:
            args["distributed_executor_backend"] = "mp"  # not "ray" inside the rollout actor (module docstring)
        if self.on_cpu:
            # vLLM's CPU worker fails on a seeded request caught in a partial (chunked) prefill ("CPU Generator
            # does not use offset"): prefill every prompt whole
            args.update(enable_chunked_prefill=False, max_num_batched_tokens=max(max_model_len, 8192))
        self.engine_args = args
        self.llm = self._call(self._start(args))
        self._names = self._parameter_names(model_path)

    @classmethod
    def from_config(cls, cfg, model_path: str, tokenizer, dtype: str, max_model_len: int,
                    eos_ids: Sequence[int] | None = None, sleep_level: int = 0) -> "VLLMEngine":
        """From ``RolloutConfig`` (``rollout.vllm_*``, ``max_batch_size``), ``model.dtype``, the sequence limit, the
        EOS ids and the sleep level (``research_rl.config.pools.vllm_sleep_level``: the config's
        ``rollout.vllm_sleep_level`` may be null, meaning the placement decides)."""
        return cls(model_path, tokenizer, dtype=dtype, max_model_len=max_model_len, max_num_seqs=cfg.max_batch_size,
                   eos_ids=eos_ids, sleep_level=sleep_level,
                   tensor_parallel_size=cfg.vllm_tensor_parallel_size,
                   gpu_memory_utilization=cfg.vllm_gpu_memory_utilization,
                   enforce_eager=cfg.vllm_enforce_eager, cpu_kv_cache_gb=cfg.vllm_cpu_kv_cache_gb)

    async def _start(self, args: dict):
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        return AsyncLLM.from_engine_args(AsyncEngineArgs(**args))

    def _call(self, coro):
        """Run a coroutine on the engine's loop and wait for it (from a thread that is not that loop's)."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    @staticmethod
    def _parameter_names(model_path: str) -> set[str]:
        """The Hugging Face parameter names a full sync must cover (tied aliases counted once), from the model's
        config on the meta device."""
        from transformers import AutoConfig, AutoModelForCausalLM

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_path))
        seen, names = set(), set()
        for name, p in model.named_parameters():
            if id(p) not in seen:
                seen.add(id(p))
                names.add(name)
        return names

    # ------------------------------------------------------------------ generation
    def _params(self, budget: int, sampling: SamplingParams, seed: int):
        from vllm import SamplingParams as VSamplingParams

        common = dict(max_tokens=budget, stop=[SEARCH_CLOSE], include_stop_str_in_output=True,
                      stop_token_ids=list(self.eos_ids), ignore_eos=True, skip_special_tokens=False,
                      spaces_between_special_tokens=False, detokenize=True)
        if sampling.is_greedy:
            return VSamplingParams(temperature=0.0, **common)
        return VSamplingParams(temperature=sampling.temperature, top_p=sampling.top_p, top_k=-1, seed=seed, **common)

    async def _generate(self, prompt_ids: Sequence[int], max_new_tokens: int, sampling: SamplingParams,
                        seed: int) -> GenerationOutput:
        from vllm.inputs import TokensPrompt

        if max_new_tokens <= 0:
            return GenerationOutput([], "length")
        final = None
        async for out in self.llm.generate(TokensPrompt(prompt_token_ids=list(prompt_ids)),
                                           self._params(max_new_tokens, sampling, seed), f"rollout-{next(self._ids)}"):
            final = out
        c = final.outputs[0]
        ids = list(c.token_ids)
        if ids and ids[-1] in self.eos_ids:
            finish = "eos"
        elif c.finish_reason == "stop" and c.stop_reason == SEARCH_CLOSE:
            finish = "search"
        else:
            finish = "length"
        return GenerationOutput(ids, finish)

    async def generate_one(self, prompt_ids: Sequence[int], max_new_tokens: int,
                           sampling: SamplingParams) -> GenerationOutput:
        """``agent_loop.AsyncGenerationEngine.generate_one``, callable from any event loop; vLLM batches the
        in-flight requests at every decoding step."""
        fut = asyncio.run_coroutine_threadsafe(
            self._generate(prompt_ids, max_new_tokens, sampling, sampling.seed), self._loop)
        return await asyncio.wrap_future(fut)

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: Sequence[int],
                 sampling: SamplingParams, seeds: Sequence[int] | None = None) -> list[GenerationOutput]:
        """``agent_loop.GenerationEngine.generate``: all prompts submitted at once, results in order."""
        if seeds is None:
            seeds = [request_seed(sampling.seed, i, 0) for i in range(len(prompts))]

        async def run():
            return await asyncio.gather(*(self._generate(p, b, sampling, s)
                                          for p, b, s in zip(prompts, max_new_tokens, seeds)))

        return self._call(run())

    # ------------------------------------------------------------------ weights, probe, sleep
    def load_buckets(self, buckets: Iterable[Mapping[str, torch.Tensor]]) -> int:
        """One weight sync: every bucket of full tensors (Hugging Face names) into every worker
        (``WeightSyncExtension``), after waking the weights if they sleep (the KV cache stays asleep until the probe
        or the next rollout); buckets are consumed one at a time. Returns the elements loaded.

        Raises:
            KeyError: a name the rollout model does not have (the sync session is still closed).
        """
        n = 0
        self.wake_up(["weights"])
        self._call(self.llm.collective_rpc("rl_begin_sync"))
        try:
            for bucket in buckets:
                unknown = set(bucket) - self._names
                if unknown:
                    raise KeyError(f"weight sync: the rollout model has no parameter {sorted(unknown)[0]!r}")
                buf = io.BytesIO()  # vLLM's RPC serialiser does not carry tensors inside a dict; torch.save's bytes do
                torch.save({k: v.detach().cpu().contiguous() for k, v in bucket.items()}, buf)
                self._call(self.llm.collective_rpc("rl_load_bucket", args=(buf.getvalue(),)))
                n += sum(t.numel() for t in bucket.values())
        finally:
            self._call(self.llm.collective_rpc("rl_finish_sync"))
            self._call(self.llm.reset_prefix_cache())  # cached KV was computed with the old weights
        return n

    def load_weights(self, named_tensors: Mapping[str, torch.Tensor]) -> int:
        """A whole sync in one bucket (``load_buckets([named_tensors])``): a layer whose weights are only partly
        in it would be re-processed from partial weights, so send a sync's buckets through ``load_buckets``."""
        return self.load_buckets([named_tensors])

    def parameter_names(self) -> set[str]:
        return set(self._names)

    def log_probs(self, sequence: Sequence[int]) -> torch.Tensor:
        """Log-probs of tokens 1..L-1 of one sequence under the engine's weights (vLLM ``prompt_logprobs``,
        raw model log-probs), float32 ``[L-1]``."""
        from vllm import SamplingParams as VSamplingParams
        from vllm.inputs import TokensPrompt

        async def run():
            final = None
            async for out in self.llm.generate(TokensPrompt(prompt_token_ids=list(sequence)),
                                               VSamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0),
                                               f"probe-{next(self._ids)}"):
                final = out
            return final.prompt_logprobs

        self.wake_up()  # the probe runs right after a sync, when the KV cache may still sleep
        plp = self._call(run())
        return torch.tensor([plp[i][tok].logprob for i, tok in enumerate(sequence) if i > 0], dtype=torch.float32)

    def sleep(self) -> None:
        """After a rollout: release GPU memory at ``sleep_level`` (module docstring): every tag sleeps. A no-op at
        level 0, where vLLM has no sleep mode, or while any tag still sleeps."""
        if self.sleep_level and not self.asleep:
            self._call(self.llm.sleep(self.sleep_level))
            self.asleep = set(SLEEP_TAGS)

    def wake_up(self, tags: Sequence[str] | None = None) -> None:
        """Bring back the memory of ``tags`` (of ``SLEEP_TAGS``; ``None`` = all) that sleeps; vLLM is asked for
        exactly the tags that sleep, never for one already awake, and not at all when none does.

        Raises:
            ValueError: a tag that is not one of ``SLEEP_TAGS``.
        """
        wanted = SLEEP_TAGS if tags is None else tuple(tags)
        unknown = set(wanted) - set(SLEEP_TAGS)
        if unknown:
            raise ValueError(f"unknown vLLM sleep tag {sorted(unknown)[0]!r}; expected one of {SLEEP_TAGS}")
        waking = [t for t in SLEEP_TAGS if t in wanted and t in self.asleep]
        if waking:
            self._call(self.llm.wake_up(waking))
            self.asleep.difference_update(waking)

    def shutdown(self) -> None:
        """Stop the engine (its core process) and the event-loop thread."""
        import gc

        async def stop():
            self.llm.shutdown()

        self._call(stop())
        self.llm = None
        gc.collect()  # AsyncLLM.__del__ now, not at interpreter exit (where it fails on torn-down globals)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
