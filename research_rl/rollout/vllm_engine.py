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

Weight sync (research_rl/sync, ``sync.transport``): ``VLLMEngine`` offers ``RolloutWorker`` the engine side that
``research_rl.sync.receiver`` describes, and ``WeightSyncExtension``, vLLM's ``worker_extension_cls``, runs one
``WeightReceiver`` in every vLLM worker (every tensor-parallel rank; ``collective_rpc``), which hands each bucket's
tensors (Hugging Face names, the engine's dtype) to the model's own ``load_weights`` (it fuses q/k/v and gate/up and
keeps its tensor-parallel shard): straight into the live parameters on GPUs, as verl's and OpenRLHF's vLLM weight
updates do; within a session of vLLM's layerwise reload on the CPU backend, which repacks weights after loading
(e.g. linear layers into oneDNN handles). Each worker is one replica: ipc maps the learner's slot on its own
device, collective makes it a rank of the sync group, the object store's buckets reach it through vLLM's RPC.
After a sync the prefix cache is reset (its KV entries were computed with the old weights). The log-prob probe
(``log_probs``) asks vLLM for ``prompt_logprobs`` of a fixed sequence.

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
wake KV cache) and OpenRLHF's PPO trainer (``wake_up`` with ``tags=["weights"]`` before its broadcast to vLLM). vLLM's CPU backend has no sleep mode
(``current_platform.is_sleep_mode_available()``): there the engine never sleeps.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import os
import pickle
import threading
from typing import Sequence

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
    """Mixed into each vLLM worker (``worker_extension_cls``); its ``rl_*`` methods run in every worker (every
    tensor-parallel rank) through ``collective_rpc``.

    Each worker holds one ``research_rl.sync.receiver.WeightReceiver`` on its own device: it receives the sync's
    buckets by ipc (the learner's slot on this device), collective (this worker is group rank ``first_rank`` + its
    vLLM rank) or as a packed host buffer (object store), and hands each bucket's ``(Hugging Face name, tensor)``
    views to the model's ``load_weights``, which fuses q/k/v and gate/up and copies this rank's tensor-parallel
    shard. On GPUs that loads into the live parameters (verl's ``vllm_rollout``, OpenRLHF's
    ``WorkerWrap.update_weight``): ``rl_begin_sync`` does nothing and ``rl_end_sync`` only closes the receiver.
    Unquantized models only (a quantized rollout model would need its weights processed after loading). Where vLLM repacks weights
    after loading (the CPU backend: linear layers into oneDNN handles), loading into the live parameters would fail,
    so the sync is a session of vLLM's layerwise reload (kernel-format tensors set aside; a layer is processed into
    kernel format again once all its weights arrived, wherever the bucket boundaries fall); that module is imported
    only there. The layerwise reload holds on to what it is given until its layer is complete, and the receiver
    reuses its buffers (the ipc slots, the collective buffer), so there each bucket's tensors are copied first.

    Messages arrive pickled (bytes): vLLM's RPC serialiser carries bytes and plain values but not these dataclasses.
    """

    @staticmethod
    def _repacks_weights() -> bool:
        from vllm.platforms import current_platform

        return current_platform.is_cpu()

    def _rl_receiver(self):
        receiver = getattr(self, "_rl_weight_receiver", None)
        if receiver is None:
            from research_rl.sync.receiver import WeightReceiver

            device = next(self.model_runner.model.parameters()).device
            receiver = self._rl_weight_receiver = WeightReceiver(self._rl_load, device)
        return receiver

    def _rl_load(self, named: list[tuple[str, torch.Tensor]]) -> None:
        from vllm.config import set_current_vllm_config

        if self._repacks_weights():
            named = [(name, t.clone()) for name, t in named]  # kept by the layerwise reload (class docstring)
        with set_current_vllm_config(self.vllm_config):
            self.model_runner.model.load_weights(weights=named)

    def rl_sync_info(self) -> dict:
        """``{"dtype": this worker's weight dtype, "device_key": its device's key}``."""
        dtype = next(self.model_runner.model.parameters()).dtype
        return {"dtype": str(dtype).removeprefix("torch."), "device_key": self._rl_receiver().key}

    def rl_join_sync_group(self, host: str, port: int, first_rank: int, world_size: int) -> None:
        self._rl_receiver().join(host, port, first_rank + self.rank, world_size)

    def rl_begin_sync(self) -> None:
        if not self._repacks_weights():
            return
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload.layerwise import initialize_layerwise_reload

        with set_current_vllm_config(self.vllm_config):
            initialize_layerwise_reload(self.model_runner.model)

    def rl_receive_ipc(self, msg: bytes) -> None:
        self._rl_receiver().receive_ipc(pickle.loads(msg))

    def rl_receive_collective(self, buckets: bytes) -> None:
        self._rl_receiver().receive_collective(pickle.loads(buckets))

    def rl_receive_packed(self, bucket: bytes, flat: bytes) -> None:
        self._rl_receiver().receive_packed(pickle.loads(bucket), flat)

    def rl_end_sync(self) -> dict:
        """Close the sync (CPU: process the layers not yet processed); returns this worker's ``SyncStats`` fields."""
        if self._repacks_weights():
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
        return dataclasses.asdict(self._rl_receiver().end())


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
                    logprobs_mode="processed_logprobs",  # sampled tokens' log-probs after temperature and top-p
                    worker_extension_cls=f"{__name__}.WeightSyncExtension")
        if tensor_parallel_size > 1:
            args["distributed_executor_backend"] = "mp"  # not "ray" inside the rollout actor (module docstring)
        if self.on_cpu:
            # vLLM's CPU worker fails on a seeded request caught in a partial (chunked) prefill ("CPU Generator
            # does not use offset"): prefill every prompt whole
            args.update(enable_chunked_prefill=False, max_num_batched_tokens=max(max_model_len, 8192))
        self.engine_args = args
        self.llm = self._call(self._start(args))
        self._names, self._known = self._parameter_names(model_path)
        self._worker_info: list[dict] | None = None  # WeightSyncExtension.rl_sync_info of each worker

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
    def _parameter_names(model_path: str) -> tuple[set[str], set[str]]:
        """``(names a full sync must cover, names a sync may carry)`` in Hugging Face terms, from the model's config
        on the meta device: parameters (tied aliases once, resp. all of them) and persistent buffers."""
        from transformers import AutoConfig, AutoModelForCausalLM

        from research_rl.learner.weights import persistent_buffers

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_path))
        buffers = {name for name, _ in persistent_buffers(model)}
        unique = {name for name, _ in model.named_parameters()}
        every = {name for name, _ in model.named_parameters(remove_duplicate=False)}
        return unique | buffers, every | buffers

    # ------------------------------------------------------------------ generation
    def _params(self, budget: int, sampling: SamplingParams, seed: int):
        from vllm import SamplingParams as VSamplingParams

        common = dict(max_tokens=budget, stop=[SEARCH_CLOSE], include_stop_str_in_output=True,
                      stop_token_ids=list(self.eos_ids), ignore_eos=True, skip_special_tokens=False,
                      spaces_between_special_tokens=False, detokenize=True)
        if sampling.is_greedy:
            return VSamplingParams(temperature=0.0, **common)
        # logprobs=0: the sampled token's log-prob alone, under the engine's logprobs_mode="processed_logprobs" (after
        # temperature and top-p, as the HF engine reports it); asking for it leaves the sampled tokens unchanged
        return VSamplingParams(temperature=sampling.temperature, top_p=sampling.top_p, top_k=-1, seed=seed,
                               logprobs=0, **common)

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
        log_probs = None if c.logprobs is None else [c.logprobs[i][tok].logprob for i, tok in enumerate(ids)]
        if ids and ids[-1] in self.eos_ids:
            finish = "eos"
        elif c.finish_reason == "stop" and c.stop_reason == SEARCH_CLOSE:
            finish = "search"
        else:
            finish = "length"
        return GenerationOutput(ids, finish, log_probs)

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
    # ------------------------------------------------------------------ weight sync (research_rl.sync.receiver)
    def _rpc(self, method: str, *args) -> list:
        """``method`` of ``WeightSyncExtension`` in every vLLM worker; one result per worker."""
        return self._call(self.llm.collective_rpc(method, args=args))

    def _sync_info(self) -> list[dict]:
        if self._worker_info is None:
            self._worker_info = self._rpc("rl_sync_info")
        return self._worker_info

    @property
    def weight_dtype(self) -> str:
        """The dtype vLLM holds the weights in: the wire dtype of a sync (``research_rl.sync.buckets``)."""
        return self._sync_info()[0]["dtype"]

    def sync_device_keys(self) -> list[str]:
        """One device key per vLLM worker (tensor-parallel rank), in rank order: each is a replica that receives."""
        return [info["device_key"] for info in self._sync_info()]

    def join_sync_group(self, host: str, port: int, first_rank: int, world_size: int) -> None:
        """Every worker joins the collective sync group, worker ``i`` as group rank ``first_rank + i``."""
        self._rpc("rl_join_sync_group", host, port, first_rank, world_size)

    def begin_sync(self) -> None:
        """Wake the weights if they sleep (the KV cache stays asleep until the probe or the next rollout), then open
        the sync in every worker."""
        self.wake_up(["weights"])
        self._rpc("rl_begin_sync")

    def receive_ipc(self, msg) -> None:
        """One bucket from the learner's shared slot on each worker's device (``IpcBucket``)."""
        self._rpc("rl_receive_ipc", pickle.dumps(msg))

    def receive_collective(self, buckets) -> None:
        """Every bucket by broadcast from the learner leader, received by every worker."""
        self._rpc("rl_receive_collective", pickle.dumps(list(buckets)))

    def receive_packed(self, bucket, flat) -> None:
        """One bucket from a flat host buffer (the object store's NumPy array, bytes or a CPU ``uint8`` tensor),
        sent to every worker."""
        data = flat.numpy() if isinstance(flat, torch.Tensor) else flat
        self._rpc("rl_receive_packed", pickle.dumps(bucket), memoryview(data).tobytes())

    def end_sync(self):
        """Close the sync in every worker and reset the prefix cache (its KV entries were computed with the old
        weights). Returns worker 0's ``SyncStats``.

        Raises:
            RuntimeError: the workers received different amounts (a tensor-parallel rank missed a bucket).
        """
        from research_rl.sync.receiver import SyncStats

        stats = self._rpc("rl_end_sync")
        self._call(self.llm.reset_prefix_cache())
        if any(s != stats[0] for s in stats):
            raise RuntimeError(f"weight sync: the vLLM workers received different amounts: {stats}")
        return SyncStats(**stats[0])

    def parameter_names(self) -> set[str]:
        """What a full sync must cover: the Hugging Face parameter names (tied aliases once) and persistent
        buffers."""
        return set(self._names)

    def known_names(self) -> set[str]:
        """Every name a sync may carry (tied aliases included)."""
        return set(self._known)

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
