"""Typed configuration: dataclass schemas registered in Hydra's ConfigStore.

One source of defaults. Every YAML under ``conf/`` composes onto ``Config`` (the ``base_config`` schema),
so an unknown key or a value of the wrong type fails at composition with the key named by OmegaConf.
``load_config`` converts the composed config with ``OmegaConf.to_object`` (so ``__post_init__`` checks run)
and ``validate`` runs the cross-field checks; both happen before ``ray.init``. Every number is checked by one helper,
``_number``: finite (NaN and ±inf are refused by name) and within its range (rates and timeouts > 0, coefficients
>= 0, probabilities and fractions in their intervals, counts >= 1 where 0 means nothing). This module imports no
other research_rl module; the checks of files, packages and the cluster are ``research_rl.config.preflight``.

Defaults follow the paper's settings (ReSearch §3.1 and the released training script; see DESIGN.md):
group size 5, clip 0.2, KL 0.001 (low_var_kl), entropy 0.001, lr 1e-6, grad clip 1.0, 256 prompts per step,
2 epochs, temperature 1.0, prompt limit 512, response budget 8192, top-5 retrieval, validation every 10 steps
on 100 questions. ``eval.*`` configures ``python -m research_rl.evaluate`` (same tree; ``conf/evaluate.yaml`` only
moves Hydra's output directory to ``eval.output_dir``).
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

TEMPLATES = ("base", "instruct")
ROLLOUT_ENGINES = ("hf", "vllm")
ROLLOUT_MODES = ("async", "turn_sync")  # research_rl.rollout.agent_loop.MODES
LEARNER_BACKENDS = ("fsdp2", "deepspeed")
LEARNER_OFFLOAD = ("none", "optimizer", "all")
ROLLOUT_IS = ("auto", "none", "tis")  # algo.rollout_is: by trainer.schedule, no correction, or truncated IS
SCHEDULES = ("sync", "one_step_off", "async")  # trainer.schedule (research_rl/driver/schedule.py)
RETRIEVER_KINDS = ("bm25", "dense")
PLACEMENTS = ("colocated", "disaggregated")
PG_STRATEGIES = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
LOGGERS = ("tensorboard", "wandb")
EVAL_METHODS = ("research", "naive_generation", "naive_rag")  # research_rl.algo.evaluation.METHODS
VAL_METRICS = ("em", "f1", "cover_em", "searches", "response_len", "format_fail", "searches_per_question")


class ConfigError(ValueError):
    """A configuration value is invalid. The message names the key and what was expected."""

    def __init__(self, key: str, message: str):
        super().__init__(f"config error at '{key}': {message}")
        self.key = key


def _one_of(key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(key, f"got {value!r}, expected one of {list(allowed)}")


def _number(key: str, value: Any, low: float | None = None, high: float | None = None, *, low_open: bool = False,
            high_open: bool = False) -> None:
    """The one numeric check of every ``__post_init__``: ``value`` is a finite number in ``[low, high]`` (an end is
    open when ``low_open``/``high_open``; ``None`` = unbounded). NaN and ±inf are refused by name rather than
    slipping past comparisons (``nan < 0`` is False, so ``nan`` passed every ``value < 0`` check).

    Raises:
        ConfigError: naming ``key``, the value and the range expected.
    """
    def text(x: float) -> str:
        return str(x) if isinstance(x, int) else f"{x:g}"

    name = key.rsplit(".", 1)[-1]
    if low is not None and high is None:
        expected = f"{name} {'>' if low_open else '>='} {text(low)}"
    elif low is None and high is None:
        expected = ""
    else:
        expected = (f"{text(low)} {'<' if low_open else '<='} " if low is not None else "") + name + \
            f" {'<' if high_open else '<='} {text(high)}"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(key, f"got {value!r}, expected a number{' with ' + expected if expected else ''}")
    if not math.isfinite(value):
        raise ConfigError(key, f"got {value!r}, expected a finite number{' with ' + expected if expected else ''}")
    if (low is not None and (value < low or (low_open and value == low))) or \
            (high is not None and (value > high or (high_open and value == high))):
        raise ConfigError(key, f"got {value!r}, expected {expected}")


def _positive(key: str, value: float, allow_zero: bool = False) -> None:
    """A finite number > 0 (>= 0 with ``allow_zero``); counts, sizes, rates and timeouts."""
    _number(key, value, 0, low_open=not allow_zero)


def _seed(key: str, value: int) -> None:
    """A seed numpy accepts too (``np.random.seed`` takes 0 <= seed < 2**32)."""
    _number(key, value, 0, 2**32, high_open=True)


@dataclass
class DebugModelConfig:
    """Shape of the tiny Qwen2 model and tokenizer built from config for CPU debug mode (no downloads)."""

    vocab_size: int = 4096
    hidden_size: int = 128
    intermediate_size: int = 384
    num_layers: int = 2
    num_heads: int = 2
    num_kv_heads: int = 1
    max_position_embeddings: int = 4096
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads",
                     "max_position_embeddings"):
            _positive(f"model.debug.{name}", getattr(self, name))
        _seed("model.debug.seed", self.seed)
        if self.hidden_size % self.num_heads:
            raise ConfigError("model.debug.hidden_size", f"{self.hidden_size} is not divisible by num_heads={self.num_heads}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError("model.debug.num_kv_heads", f"num_heads={self.num_heads} is not divisible by {self.num_kv_heads}")


@dataclass
class ModelConfig:
    """Policy model. ``path`` is any Hugging Face model id or local directory."""

    path: str = "Qwen/Qwen2.5-7B-Instruct"
    template: str = "instruct"  # base: the paper's raw prompt; instruct: system prompt + chat template
    dtype: str = "bfloat16"  # parameter dtype on GPU; CPU always trains in float32
    gradient_checkpointing: bool = False
    debug: DebugModelConfig = field(default_factory=DebugModelConfig)

    def __post_init__(self) -> None:
        _one_of("model.template", self.template, TEMPLATES)
        _one_of("model.dtype", self.dtype, ("float32", "bfloat16", "float16"))
        if not self.path:
            raise ConfigError("model.path", "must name a Hugging Face model id or a local directory")


@dataclass
class DataConfig:
    """Question files, FlashRAG JSONL (``.jsonl``: ``id``, ``question``, ``golden_answers``) or verl / Search-R1
    parquet (``.parquet``: ``data_source``, ``prompt``, ``reward_model.ground_truth.target``, ``extra_info``; the
    field mapping is in research_rl/data.py), and the passage corpus (FlashRAG JSONL)."""

    train_files: list[str] = field(default_factory=lambda: ["data/musique/train.jsonl"])
    val_files: list[str] = field(default_factory=lambda: ["data/musique/dev.jsonl"])
    corpus_path: str = "data/corpus/corpus.jsonl"
    max_prompt_len: int = 512  # tokens; longer prompts are dropped, as in the paper
    shuffle: bool = True
    # an epoch's last batch smaller than trainer.prompts_per_step: carried into the next epoch (false: every
    # question once per epoch), or dropped as the reference's data loader does (true)
    drop_last: bool = False

    def __post_init__(self) -> None:
        if not self.train_files:
            raise ConfigError("data.train_files", "needs at least one question file (.jsonl or .parquet)")
        _positive("data.max_prompt_len", self.max_prompt_len)


@dataclass
class RetrieverConfig:
    """The retriever the rollout searches (DESIGN: Retrieval; docs/retriever.md).

    In-cluster (``url: null``): ``num_replicas`` ``RetrieverActor`` replicas over the index at ``index_dir``, each
    batching concurrent calls (``max_batch_size``, ``max_wait_ms``) behind an LRU cache (``cache_size``). Remote
    (``url`` set): a service speaking Search-R1 ``POST /retrieve`` (``python -m retriever_service.serve``); no actor
    is started. Either way a call slower than ``timeout_s`` or failing gives the observation ``search failed``.
    """

    kind: str = "bm25"  # bm25 (pyserini) | dense (faiss)
    index_dir: str = "artifacts/bm25_index"
    top_k: int = 5
    threads: int = 1  # backend search threads (pyserini batch_search threads / faiss OpenMP threads)
    num_cpus: float = 0.5  # Ray CPUs per replica
    num_replicas: int = 1
    max_restarts: int = 3  # Ray restarts per replica after a crash; -1 = forever
    timeout_s: float = 30.0  # per search call, seconds
    max_batch_size: int = 256  # distinct uncached queries per backend call
    max_wait_ms: float = 0.0  # extra wait for a batch to fill; 0 = send when the owner thread is free
    cache_size: int = 65536  # LRU entries keyed by (normalised query, k); 0 = off
    url: Optional[str] = None  # remote retrieval service instead of in-cluster actors

    def __post_init__(self) -> None:
        _one_of("retriever.kind", self.kind, RETRIEVER_KINDS)
        _positive("retriever.top_k", self.top_k)
        _positive("retriever.threads", self.threads)
        _positive("retriever.num_cpus", self.num_cpus, allow_zero=True)
        _positive("retriever.num_replicas", self.num_replicas)
        if self.max_restarts < -1:
            raise ConfigError("retriever.max_restarts", f"must be >= -1 (-1 = forever), got {self.max_restarts}")
        _positive("retriever.timeout_s", self.timeout_s)
        _positive("retriever.max_batch_size", self.max_batch_size)
        _positive("retriever.max_wait_ms", self.max_wait_ms, allow_zero=True)
        _positive("retriever.cache_size", self.cache_size, allow_zero=True)
        if self.url is not None and not self.url.startswith(("http://", "https://")):
            raise ConfigError("retriever.url", f"expected an http(s):// URL or null, got {self.url!r}")


@dataclass
class RolloutConfig:
    """Rollout engine and the agent loop (DESIGN: Rollout; docs/rollout.md).

    ``mode``: ``async`` runs each trajectory as its own coroutine on an engine that batches the in-flight requests;
    ``turn_sync`` is the reference implementations' turn-by-turn schedule. ``engine``: ``hf`` (transformers,
    CPU debug mode) or ``vllm`` (GPU; ``research_rl/rollout/vllm_engine.py``). The ``vllm_*`` keys configure only vLLM.
    """

    engine: str = "hf"  # hf: transformers generate (CPU debug); vllm: GPU
    mode: str = "async"  # async: per-trajectory coroutines; turn_sync: every active trajectory per turn (reference)
    num_workers: int = 1
    num_cpus_per_worker: float = 1.0
    num_gpus_per_worker: float = 0.0
    torch_threads: int = 0  # torch intra-op threads inside the worker; 0 = Ray's default for its num_cpus
    group_size: int = 5  # n rollouts per prompt (GRPO group)
    temperature: float = 1.0
    top_p: float = 1.0
    max_response_len: int = 8192  # shared budget: generated + inserted result tokens
    max_turns: Optional[int] = None  # cap on searches per trajectory; None = unlimited (paper)
    max_batch_size: int = 64  # hf: trajectories per generate call; vllm: max_num_seqs (sequences per step)
    # which ids end a response: every EOS id of the model's generation config (the reference rollout; Qwen2.5-Instruct:
    # <|im_end|> and <|endoftext|>), or the tokenizer's eos_token alone (research_rl/rollout/eos.py)
    eos_ids_from: str = "generation_config"
    batch_wait_ms: float = 0.0  # hf + async: how long a request may wait for others to join its generate call
    # the HF engine's weight dtype (and so the weight sync's wire dtype): None = model.dtype on GPU, float32 on CPU
    hf_dtype: Optional[str] = None
    vllm_tensor_parallel_size: int = 1  # GPUs per vLLM engine
    vllm_gpu_memory_utilization: float = 0.5  # fraction of each GPU's memory vLLM takes (weights + KV cache)
    vllm_max_model_len: Optional[int] = None  # tokens per sequence; None = data.max_prompt_len + max_response_len
    # after each rollout (docs/rollout.md): 0 stays awake; 2 also frees the weights, which the next sync rewrites
    vllm_sleep_level: Optional[int] = None  # null: 2 colocated, 0 disaggregated; 1 frees KV cache, weights to host; 2 both
    vllm_enforce_eager: bool = False  # no CUDA graphs (faster start, slower decoding)
    vllm_cpu_kv_cache_gb: int = 1  # CPU backend only (VLLM_CPU_KVCACHE_SPACE), GiB

    def __post_init__(self) -> None:
        _one_of("rollout.engine", self.engine, ROLLOUT_ENGINES)
        _one_of("rollout.mode", self.mode, ROLLOUT_MODES)
        _one_of("rollout.eos_ids_from", self.eos_ids_from, ("generation_config", "tokenizer"))
        if self.group_size < 2:
            raise ConfigError("rollout.group_size", f"got {self.group_size}; GRPO needs at least 2 rollouts per group")
        _positive("rollout.num_workers", self.num_workers)
        _positive("rollout.num_cpus_per_worker", self.num_cpus_per_worker, allow_zero=True)
        _positive("rollout.num_gpus_per_worker", self.num_gpus_per_worker, allow_zero=True)
        _positive("rollout.temperature", self.temperature, allow_zero=True)
        _number("rollout.top_p", self.top_p, 0, 1, low_open=True)
        _positive("rollout.max_response_len", self.max_response_len)
        if self.max_turns is not None:
            _positive("rollout.max_turns", self.max_turns)
        _positive("rollout.max_batch_size", self.max_batch_size)
        _positive("rollout.batch_wait_ms", self.batch_wait_ms, allow_zero=True)
        if self.hf_dtype is not None:
            _one_of("rollout.hf_dtype", self.hf_dtype, ("float32", "bfloat16", "float16"))
        _positive("rollout.torch_threads", self.torch_threads, allow_zero=True)
        _positive("rollout.vllm_tensor_parallel_size", self.vllm_tensor_parallel_size)
        _number("rollout.vllm_gpu_memory_utilization", self.vllm_gpu_memory_utilization, 0, 1, low_open=True)
        if self.vllm_max_model_len is not None:
            _positive("rollout.vllm_max_model_len", self.vllm_max_model_len)
        if self.vllm_sleep_level is not None:
            _one_of("rollout.vllm_sleep_level", self.vllm_sleep_level, (0, 1, 2))
        _positive("rollout.vllm_cpu_kv_cache_gb", self.vllm_cpu_kv_cache_gb)


@dataclass
class AlgoConfig:
    """GRPO hyperparameters with the paper's symbols (ReSearch §2.2, DeepSeekMath GRPO).

    Each batch gets ``ppo_epochs`` × (trajectories / ``ppo_mini_batch_size``) optimizer steps; the defaults take one,
    as the paper does, and the ratio is then 1. With more, each step is clipped against the log-probs recorded
    before the first (docs/learner.md). ``ppo_mini_batch_size`` must divide ``trainer.prompts_per_step`` ×
    ``rollout.group_size`` and be a multiple of ``learner.num_workers``.

    ``rollout_is=tis`` corrects for the rollout engine sampling from slightly different probabilities than the
    learner computes (vLLM's bf16 kernels against the learner's model): each token's policy-gradient term is
    multiplied by ``min(π_learner / π_engine, rollout_is_cap)`` (truncated importance sampling, as verl's
    ``rollout_is``; docs/learner.md#engine-learner-mismatch-truncated-importance-sampling). It needs sampled
    rollouts (``rollout.temperature > 0``). Under ``trainer.schedule=one_step_off`` or ``async`` the same weight
    is the decoupled PPO objective's behaviour correction for stale rollouts (docs/rollout.md#training-schedules);
    ``auto`` (the default) means ``tis`` there and ``none`` with ``trainer.schedule=sync`` (``rollout_is_mode``).
    """

    clip_eps: float = 0.2  # PPO ε: the ratio π_θ/π_θold is clipped to [1-ε, 1+ε]
    kl_coef: float = 0.001  # β of the KL term to the reference policy
    kl_clamp: float = 10.0  # bound on the per-token k3 KL estimate (verl's ±10)
    entropy_coef: float = 0.001  # entropy bonus (verl's reference config; the paper has none)
    adv_eps: float = 1e-6  # added to the group std of the rewards (advantage 0 for equal rewards)
    ppo_epochs: int = 1  # passes over each batch; >1 (or mini-batches) clips against recomputed old log-probs
    ppo_mini_batch_size: int = 0  # trajectories per optimizer step, all ranks; 0 = the whole batch (one step)
    # token_mean: sum over the step's loss tokens / their count (all micro-batches and ranks; verl's token-mean);
    # reference: the authors' fork, each micro-batch's own masked mean weighted by its share of the rank's
    # trajectories, averaged over ranks (docs/concepts.md#grpo)
    loss_agg: str = "token_mean"
    # auto | none | tis: weight each token's policy-gradient term by min(π_learner/π_engine, cap); auto: tis when
    # trainer.schedule is one_step_off or async (stale rollouts), none with sync
    rollout_is: str = "auto"
    rollout_is_cap: float = 2.0  # C, the truncation of the TIS weight (verl's rollout_is_threshold default)

    def __post_init__(self) -> None:
        _positive("algo.clip_eps", self.clip_eps)
        _positive("algo.kl_coef", self.kl_coef, allow_zero=True)
        _positive("algo.kl_clamp", self.kl_clamp)  # the bound on the per-token k3 KL; 0 would zero the KL term
        _positive("algo.entropy_coef", self.entropy_coef, allow_zero=True)
        _positive("algo.adv_eps", self.adv_eps)  # std + eps: 0 divides by zero in a group with equal rewards
        _number("algo.ppo_epochs", self.ppo_epochs, 1)
        _positive("algo.ppo_mini_batch_size", self.ppo_mini_batch_size, allow_zero=True)
        _one_of("algo.loss_agg", self.loss_agg, ("token_mean", "reference"))
        _one_of("algo.rollout_is", self.rollout_is, ROLLOUT_IS)
        # a cap below 1 would shrink every token's weight even where engine and learner agree (w = 1)
        _number("algo.rollout_is_cap", self.rollout_is_cap, 1)


@dataclass
class LearnerConfig:
    """The learner ranks (DESIGN: Learner; docs/learner.md).

    ``backend``: ``fsdp2`` (``fully_shard`` per decoder layer) or ``deepspeed`` (ZeRO ``zero_stage`` 2 or 3; needs
    ``pip install -e '.[deepspeed]'``); both take the same keys. ``cpu_offload`` keeps sharded parameters,
    gradients and optimizer state on CPU (FSDP2 ``CPUOffloadPolicy``; DeepSpeed optimizer and, under ZeRO-3,
    parameter offload). Micro-batches hold ``micro_batch_size`` trajectories, or, with
    ``max_tokens_per_micro_batch`` set, as many as fit that many padded tokens (rows × longest row), grouped by
    length; either way the update is the token-mean over the whole batch.

    At 7B scale (docs/learner.md#the-learner-at-7b): ``logits_chunk_tokens`` computes the LM head, log-softmax and
    entropy over that many scored tokens at a time, recomputed in backward (0 = all at once); ``pack`` runs each
    micro-batch's rows end to end without padding (the budget then counts real tokens); ``offload`` moves the
    optimizer state (``optimizer``) or also the parameters (``all``) to CPU between updates, dropping the
    gradients, when ``offload()`` / ``reload()`` are called around rollout (DeepSpeed: ZeRO-3 only);
    ``rank0_load`` (FSDP2) builds the model on the meta device on every rank but 0 and fills it with rank 0's
    weights (one full copy per node at start; DeepSpeed ranks each read the model).
    """

    backend: str = "fsdp2"  # fsdp2 | deepspeed
    zero_stage: int = 3  # deepspeed only: 2 (shard optimizer state and gradients) or 3 (and parameters)
    cpu_offload: bool = False
    num_workers: int = 1  # ranks of one torch.distributed group
    num_cpus_per_worker: float = 1.0
    num_gpus_per_worker: float = 0.0
    torch_threads: int = 0
    lr: float = 1e-6
    lr_warmup_steps: int = 0  # GRPO steps of linear warm-up: step s trains at lr * min(1, s / this); 0 = none
    lr_schedule: str = "constant"  # after the warm-up: constant (the paper) | cosine (down to lr * min_lr_ratio)
    min_lr_ratio: float = 0.0  # cosine: the rate at the last step, as a fraction of lr (verl's min_lr_ratio)
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    grad_clip: float = 1.0
    micro_batch_size: int = 8  # trajectories per forward/backward (when max_tokens_per_micro_batch is null)
    max_tokens_per_micro_batch: Optional[int] = None  # padded tokens per forward/backward; null = micro_batch_size
    weight_sync_bucket_mb: int = 64
    logits_chunk_tokens: int = 0  # scored tokens per LM-head chunk, recomputed in backward; 0 = unchunked
    pack: bool = False  # micro-batch rows end to end without padding; max_tokens_per_micro_batch counts real tokens
    offload: str = "none"  # none | optimizer | all: what offload() moves to CPU between updates (colocated rollout)
    rank0_load: bool = True  # fsdp2: ranks > 0 build on the meta device and receive rank 0's weights
    plan_gpu_memory_gib: float = 0.0  # GPU size the memory plan checks (python -m research_rl.plan); 0 = local GPU's

    def __post_init__(self) -> None:
        _one_of("learner.backend", self.backend, LEARNER_BACKENDS)
        _positive("learner.logits_chunk_tokens", self.logits_chunk_tokens, allow_zero=True)
        _positive("learner.plan_gpu_memory_gib", self.plan_gpu_memory_gib, allow_zero=True)
        _one_of("learner.offload", self.offload, LEARNER_OFFLOAD)
        if self.offload != "none" and self.cpu_offload:
            raise ConfigError("learner.offload", f"{self.offload!r} moves state to CPU between updates, but "
                              "learner.cpu_offload=true keeps it there always; set one of them")
        if self.offload != "none" and self.backend == "deepspeed" and self.zero_stage != 3:
            raise ConfigError("learner.offload", f"{self.offload!r} under DeepSpeed needs learner.zero_stage=3 "
                              f"(engine.offload_states), got {self.zero_stage}")
        _one_of("learner.zero_stage", self.zero_stage, (2, 3))
        _positive("learner.num_workers", self.num_workers)
        _positive("learner.num_cpus_per_worker", self.num_cpus_per_worker, allow_zero=True)
        _positive("learner.num_gpus_per_worker", self.num_gpus_per_worker, allow_zero=True)
        _positive("learner.torch_threads", self.torch_threads, allow_zero=True)
        _positive("learner.lr", self.lr)
        _positive("learner.lr_warmup_steps", self.lr_warmup_steps, allow_zero=True)
        _one_of("learner.lr_schedule", self.lr_schedule, ("constant", "cosine"))
        _number("learner.min_lr_ratio", self.min_lr_ratio, 0, 1)
        _positive("learner.weight_decay", self.weight_decay, allow_zero=True)
        _positive("learner.grad_clip", self.grad_clip)  # clip_grad_norm_ max norm; 0 would zero every gradient
        _positive("learner.micro_batch_size", self.micro_batch_size)
        if self.max_tokens_per_micro_batch is not None:
            _positive("learner.max_tokens_per_micro_batch", self.max_tokens_per_micro_batch)
        _positive("learner.weight_sync_bucket_mb", self.weight_sync_bucket_mb)
        if len(self.betas) != 2:
            raise ConfigError("learner.betas", f"expected two values, got {self.betas}")
        for i, beta in enumerate(self.betas):  # AdamW's moment decay rates
            _number(f"learner.betas[{i}]", beta, 0, 1, high_open=True)


@dataclass
class RewardConfig:
    # research: the ReSearch rule reward on the response; research_reference: the authors' compute_score exactly
    # (prompt + response, split on the assistant marker; docs/concepts.md#deviations-from-the-paper); search_format:
    # a shaped reward (1 for a well-formed search call) used to check that the pipeline learns
    kind: str = "research"

    def __post_init__(self) -> None:
        _one_of("reward.kind", self.kind, ("research", "research_reference", "search_format"))


@dataclass
class WarmupConfig:
    """Supervised warm-up for debug mode only (a documented deviation: the paper uses none).

    A randomly initialised model never writes the format, so GRPO would see reward 0 everywhere. The warm-up
    trains on trajectories synthesised from training questions' gold passages and the real retriever's results,
    loss-masked exactly like RL trajectories.

    ``question_share`` > 0 sets that share of ``data.train_files``' questions apart for the warm-up (a split by
    question id, seeded by ``seed``): GRPO trains on the others only, so no GRPO prompt's answer was shown in the
    warm-up. At 0 the warm-up synthesises from every training question, GRPO's included. ``answer_from``:
    ``gold`` answers each trajectory with the question's first gold answer; ``results`` keeps only the
    trajectories whose retrieved passages hold a gold answer and answers it as the passage writes it, so the model
    learns to copy its answer out of the results instead of recalling it.
    """

    enabled: bool = False
    steps: int = 150
    batch_size: int = 8
    lr: float = 3e-3
    search_fraction: float = 1.0  # share of synthesised trajectories that search before answering
    max_seq_len: int = 1024
    seed: int = 0
    question_share: float = 0.0  # training questions set apart for the warm-up, GRPO gets the rest; 0: warm-up uses all
    answer_from: str = "gold"  # gold | results: the answer copied from a retrieved passage that holds it

    def __post_init__(self) -> None:
        _positive("warmup.steps", self.steps)
        _positive("warmup.batch_size", self.batch_size)
        _positive("warmup.lr", self.lr)
        _number("warmup.search_fraction", self.search_fraction, 0, 1)
        _positive("warmup.max_seq_len", self.max_seq_len)
        _seed("warmup.seed", self.seed)
        _number("warmup.question_share", self.question_share, 0, 1, high_open=True)  # GRPO needs questions too
        _one_of("warmup.answer_from", self.answer_from, ("gold", "results"))


@dataclass
class ValidationConfig:
    """Greedy validation during training, scored by ``research_rl.algo.evaluation`` (the evaluator's metrics, logged as
    ``val/<dataset>/<metric>`` and overall ``val/<metric>``); the checkpoint with the highest ``best_metric`` is kept
    as ``RUN_DIR/checkpoints/best``."""

    every: int = 10  # steps; 0 disables validation during training
    num_questions: int = 100  # split evenly over data.val_files
    before_training: bool = True
    seed: int = 0
    best_metric: str = "val/em"  # higher is better; val/<metric> or val/<dataset>/<metric>

    def __post_init__(self) -> None:
        _positive("validation.every", self.every, allow_zero=True)
        _positive("validation.num_questions", self.num_questions)
        _seed("validation.seed", self.seed)
        parts = self.best_metric.split("/")
        if parts[0] != "val" or len(parts) not in (2, 3) or parts[-1] not in VAL_METRICS:
            raise ConfigError("validation.best_metric", f"got {self.best_metric!r}, expected val/<metric> or "
                              f"val/<dataset>/<metric> with <metric> one of {list(VAL_METRICS)}")


@dataclass
class TrainerConfig:
    # a fresh directory per run, as Hydra's own default (outputs/DATE/TIME); name one to resume or extend a run
    output_dir: str = "outputs/${experiment_name}/${now:%Y-%m-%d}/${now:%H-%M-%S}"
    total_steps: Optional[int] = None  # None: run `epochs` epochs over the training prompts
    epochs: int = 2
    prompts_per_step: int = 256
    max_minutes: Optional[float] = None  # stop (with a checkpoint) after this much training time
    save_every: int = 10
    keep_last: int = 2
    save_hf_model: bool = True  # also write a Hugging Face model/ into each checkpoint (best/model, the evaluator)
    # auto | never | force | PATH to a checkpoint directory. auto: continue the newest checkpoint of output_dir when
    # its saved config.yaml matches (run-control keys aside); force: continue it even when the config differs
    resume: str = "auto"
    seed: int = 42
    rollouts_to_log: int = -1  # trajectories dumped per step (-1: all)
    weight_sync: bool = True  # debug only: False syncs once at start, so rollouts stay on the initial policy
    # sync: rollout, then the update, then the weight sync; one_step_off: step t+1's rollout runs while the learner
    # trains step t; async: rollout workers fill a bounded buffer continuously (docs/rollout.md#training-schedules)
    schedule: str = "sync"
    max_staleness: int = 1  # async: a group generated more than this many policy versions ago is dropped, counted
    async_groups_per_request: int = 1  # async: groups (prompts × rollout.group_size) per generate request
    # after each sync: the largest mean |log-prob difference| (nats per token of the probe sequence) allowed between
    # the learner and any rollout engine; bf16 engines differ from a bf16 learner by ~0.01-0.03 (docs/rollout.md)
    probe_tolerance: float = 0.05
    logger: str = "tensorboard"  # tensorboard | wandb (needs the extra: pip install -e '.[wandb]')
    wandb_project: str = "research-rl"

    def __post_init__(self) -> None:
        _one_of("trainer.logger", self.logger, LOGGERS)
        _positive("trainer.prompts_per_step", self.prompts_per_step)
        _positive("trainer.epochs", self.epochs)
        if self.total_steps is not None:
            _positive("trainer.total_steps", self.total_steps)
        if self.max_minutes is not None:
            _positive("trainer.max_minutes", self.max_minutes)
        _positive("trainer.save_every", self.save_every, allow_zero=True)
        _positive("trainer.keep_last", self.keep_last)
        _seed("trainer.seed", self.seed)
        _number("trainer.rollouts_to_log", self.rollouts_to_log, -1)
        _positive("trainer.probe_tolerance", self.probe_tolerance, allow_zero=True)
        _one_of("trainer.schedule", self.schedule, SCHEDULES)
        _positive("trainer.max_staleness", self.max_staleness, allow_zero=True)
        _positive("trainer.async_groups_per_request", self.async_groups_per_request)


SYNC_TRANSPORTS = ("auto", "ipc", "collective", "object_store")  # research_rl.driver.weight_sync.TRANSPORTS


@dataclass
class SyncConfig:
    """Learner → rollout engine weight sync (``research_rl/driver/weight_sync.py``; docs/rollout.md).

    ``ipc``: learner ranks hand the engines on their device a handle to a bucket on that device (CUDA IPC; shared
    memory on CPU); ``collective``: learner rank 0 broadcasts buckets to every engine worker (NCCL; gloo on CPU);
    ``object_store``: buckets through the Ray object store. ``auto``: ipc when colocated and every engine shares a
    device with a learner rank, collective when disaggregated, else object_store. Buckets are
    ``learner.weight_sync_bucket_mb`` MiB in the engines' dtype.
    """

    transport: str = "auto"

    def __post_init__(self) -> None:
        _one_of("sync.transport", self.transport, SYNC_TRANSPORTS)


@dataclass
class PlacementConfig:
    """Where the roles run (``research_rl/roles/placement.py``; the arithmetic in ``research_rl/config/pools.py``;
    docs/cluster.md).

    The GPU nodes are ``nnodes`` × ``gpus_per_node``. ``colocated``: one pool of every GPU; each GPU hosts one learner
    rank and one rollout worker (and one reference worker when ``reference.placement=separate``), which share it.
    ``disaggregated``: each role has its own pool of ``num_workers`` × ``num_gpus_per_worker`` GPUs. Pools are Ray
    placement groups with ``strategy``. Retriever replicas go to nodes without GPUs (``retriever_nodes=cpu_only``)
    when the cluster has any. Checked before ``ray.init`` with the arithmetic shown when the GPUs do not add up.
    """

    mode: str = "colocated"  # colocated | disaggregated
    nnodes: int = 1  # GPU nodes
    gpus_per_node: int = 0  # 0: CPU only (debug mode)
    strategy: str = "PACK"  # placement-group strategy of each GPU pool: PACK | SPREAD | STRICT_PACK | STRICT_SPREAD
    gpu_resource: str = "GPU"  # the Ray resource counted as a GPU (a custom resource can stand in for GPUs)
    retriever_nodes: str = "cpu_only"  # cpu_only: nodes without gpu_resource, if any (else any node) | any
    timeout_s: float = 300.0  # how long to wait for the cluster to grant the pools before failing

    def __post_init__(self) -> None:
        _one_of("placement.mode", self.mode, PLACEMENTS)
        _positive("placement.nnodes", self.nnodes)
        _positive("placement.gpus_per_node", self.gpus_per_node, allow_zero=True)
        _one_of("placement.strategy", self.strategy, PG_STRATEGIES)
        if not self.gpu_resource:
            raise ConfigError("placement.gpu_resource", "must name a Ray resource, e.g. GPU")
        _one_of("placement.retriever_nodes", self.retriever_nodes, ("cpu_only", "any"))
        _positive("placement.timeout_s", self.timeout_s)


@dataclass
class ReferenceConfig:
    """The reference policy of the KL term (the initial policy, frozen).

    ``colocated``: each learner rank also holds a shard of it. ``separate``: its own worker group of ``num_workers``
    ranks (one torch.distributed group) that only computes reference log-probs; in ``placement.mode=colocated`` it
    shares each GPU with a learner rank and a rollout worker. ``offload`` keeps its parameters on CPU between passes.
    """

    placement: str = "colocated"  # colocated | separate
    num_workers: int = 1  # separate only
    num_cpus_per_worker: float = 1.0  # separate only
    num_gpus_per_worker: float = 0.0  # separate only
    offload: bool = False

    def __post_init__(self) -> None:
        _one_of("reference.placement", self.placement, ("colocated", "separate"))
        _positive("reference.num_workers", self.num_workers)
        _positive("reference.num_cpus_per_worker", self.num_cpus_per_worker, allow_zero=True)
        _positive("reference.num_gpus_per_worker", self.num_gpus_per_worker, allow_zero=True)


@dataclass
class JudgeConfig:
    """LLM-as-judge for evaluation (optional): any OpenAI-compatible chat endpoint; the key is read from the
    environment variable named by ``api_key_env``, never from config. ``base_url: null`` = no judge."""

    base_url: Optional[str] = None  # e.g. https://api.openai.com/v1
    model: Optional[str] = None  # e.g. gpt-4o-mini (the paper's judge)
    api_key_env: str = "OPENAI_API_KEY"
    timeout_s: float = 60.0
    max_retries: int = 3
    max_concurrency: int = 8

    def __post_init__(self) -> None:
        _positive("eval.judge.timeout_s", self.timeout_s)
        _positive("eval.judge.max_retries", self.max_retries, allow_zero=True)
        _positive("eval.judge.max_concurrency", self.max_concurrency)
        if self.base_url is None:
            if self.model is not None:
                raise ConfigError("eval.judge.base_url", f"eval.judge.model={self.model} needs an endpoint; set "
                                  "eval.judge.base_url (an OpenAI-compatible http(s):// URL)")
            return
        if not self.base_url.startswith(("http://", "https://")):
            raise ConfigError("eval.judge.base_url", f"expected an http(s):// URL or null, got {self.base_url!r}")
        if not self.model:
            raise ConfigError("eval.judge.model", "the judge needs a model name, e.g. eval.judge.model=gpt-4o-mini")
        if not self.api_key_env:
            raise ConfigError("eval.judge.api_key_env", "must name the environment variable holding the API key")


@dataclass
class EvalConfig:
    """``python -m research_rl.evaluate`` (ReSearch §3.1 evaluation; research_rl/algo/evaluation.py).

    Questions: ``datasets`` are names resolved to ``<data_dir>/<name>/dev.jsonl`` (``test.jsonl`` for Bamboogle);
    ``files`` (explicit FlashRAG JSONL paths, dataset = the file's folder name) replaces them when non-empty.
    ``limit`` questions per dataset are drawn with ``seed`` (null = every question, in file order). Generation is
    greedy with ``rollout.max_response_len`` tokens and ``rollout.max_turns``; retrieval is ``retriever.*`` (top-k
    ``retriever.top_k``); the prompt template is ``model.template``.
    """

    method: str = "research"  # research | naive_generation | naive_rag
    datasets: list[str] = field(default_factory=lambda: ["hotpotqa", "2wikimultihopqa", "musique", "bamboogle"])
    data_dir: str = "data"
    files: list[str] = field(default_factory=list)
    limit: Optional[int] = None  # questions per dataset; null = all
    seed: int = 0
    batch_size: int = 32  # questions per agent-loop call
    # the evaluated model's name in the output path; default from model.path (model_tag: RUN-step_000040 for a
    # checkpoint, RUN-best-step_000030 for checkpoints/best, the folder or hub name otherwise)
    tag: str = "${model_tag:${model.path}}"
    output_dir: str = "outputs/eval/${eval.tag}/${eval.method}"  # refused when it holds an evaluation already
    model_size: Optional[str] = None  # which Table 2 row to compare with, e.g. 7b; null = read from model.path
    # the reference evaluation's rules (docs/concepts.md#deviations-from-the-paper): rollout.max_response_len counts
    # the prompt too, and a response that did not end with EOS predicts "" instead of its extracted answer
    budget_includes_prompt: bool = False
    over_length_prediction: str = "extract"  # extract: the answer if one can be read; empty: "" (the reference)
    judge: JudgeConfig = field(default_factory=JudgeConfig)

    def __post_init__(self) -> None:
        _one_of("eval.method", self.method, EVAL_METHODS)
        _one_of("eval.over_length_prediction", self.over_length_prediction, ("extract", "empty"))
        if not self.files and not self.datasets:
            raise ConfigError("eval.datasets", "needs at least one dataset name (or question files in eval.files)")
        for name in self.datasets:
            if not name or "/" in name:
                raise ConfigError("eval.datasets", f"got {name!r}, expected a dataset folder name such as hotpotqa "
                                  "(explicit paths go in eval.files)")
        if self.limit is not None:
            _positive("eval.limit", self.limit)
        _seed("eval.seed", self.seed)
        _positive("eval.batch_size", self.batch_size)
        if not self.output_dir:
            raise ConfigError("eval.output_dir", "must name a directory")
        if not self.tag or "/" in self.tag:
            raise ConfigError("eval.tag", f"got {self.tag!r}, expected a name without '/' (it names a directory)")
        if self.model_size is not None and not re.fullmatch(r"\d+(\.\d+)?[bB]", self.model_size):
            raise ConfigError("eval.model_size", f"got {self.model_size!r}, expected a size such as 7b or 32b")


@dataclass
class RayConfig:
    address: Optional[str] = None  # None: start a local cluster; "auto" or host:port to join one
    namespace: str = "research_rl"
    num_cpus: Optional[int] = None  # local cluster only; None = detected

    def __post_init__(self) -> None:
        if self.num_cpus is not None:
            _positive("ray.num_cpus", self.num_cpus)


@dataclass
class Config:
    experiment_name: str = "default"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    retriever: RetrieverConfig = field(default_factory=RetrieverConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    warmup: WarmupConfig = field(default_factory=WarmupConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    placement: PlacementConfig = field(default_factory=PlacementConfig)
    sync: SyncConfig = field(default_factory=SyncConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


_TIME_DIR = re.compile(r"^\d{2}-\d{2}-\d{2}$")  # the default trainer.output_dir's last part: outputs/EXP/DATE/TIME


def model_tag(path: str) -> str:
    """A name for the model at ``path``, for ``eval.tag``: ``RUN-step_000040`` for ``RUN/checkpoints/step_000040/
    model``, ``RUN-best-step_000030`` for ``checkpoints/best`` (its step read from its ``trainer_state.json``),
    ``RUN-warmup_model`` for debug mode's warm-up model, else the last part of the path or hub id. ``RUN`` is the run
    directory's name, ``EXP_DATE_TIME`` for the default ``outputs/EXP/DATE/TIME``."""
    import json
    from pathlib import Path

    p = Path(str(path).rstrip("/"))
    if p.name == "model" and p.parent.parent.name == "checkpoints":
        p = p.parent  # RUN/checkpoints/step_N/model -> RUN/checkpoints/step_N
    if p.parent.name == "checkpoints":
        run, name = p.parent.parent, p.name
        if name == "best":
            try:
                name = f"best-step_{int(json.loads((p / 'trainer_state.json').read_text())['step']):06d}"
            except (OSError, ValueError, KeyError, TypeError):
                pass
    elif p.name == "warmup_model":
        run, name = p.parent, p.name
    else:
        return p.name or "model"
    label = run.name
    if _TIME_DIR.match(label) and run.parent.parent.name:
        label = f"{run.parent.parent.name}_{run.parent.name}_{label}"
    return f"{label}-{name}"


def register_configs() -> None:
    """Register the schema as ``base_config`` and the ``model_tag`` resolver (idempotent)."""
    ConfigStore.instance().store(name="base_config", node=Config)
    OmegaConf.register_new_resolver("model_tag", model_tag, replace=True)


def validate(cfg: Config) -> Config:
    """Cross-field checks of the config alone, which no single field can make; raises ``ConfigError`` naming the key.

    Batch divisibility across workers and the group size. Pure: no file, package or cluster is looked at, and
    nothing else of research_rl is imported; what depends on them (placement arithmetic, the local cluster's CPUs,
    installed backends, the vLLM settings, files) is ``research_rl.config.preflight``.
    """
    trajectories = cfg.trainer.prompts_per_step * cfg.rollout.group_size
    if cfg.trainer.prompts_per_step % cfg.rollout.num_workers:
        raise ConfigError(
            "trainer.prompts_per_step",
            f"{cfg.trainer.prompts_per_step} prompts do not split evenly over rollout.num_workers={cfg.rollout.num_workers}",
        )
    if trajectories % cfg.learner.num_workers:
        raise ConfigError(
            "learner.num_workers",
            f"{trajectories} trajectories per step (trainer.prompts_per_step={cfg.trainer.prompts_per_step} × "
            f"rollout.group_size={cfg.rollout.group_size}) do not split evenly over {cfg.learner.num_workers} learner ranks",
        )
    mini = cfg.algo.ppo_mini_batch_size
    if mini and (trajectories % mini or mini % cfg.learner.num_workers):
        raise ConfigError("algo.ppo_mini_batch_size", f"{mini} trajectories per optimizer step must divide the "
                          f"{trajectories} trajectories per step (trainer.prompts_per_step={cfg.trainer.prompts_per_step}"
                          f" × rollout.group_size={cfg.rollout.group_size}) and be a multiple of "
                          f"learner.num_workers={cfg.learner.num_workers}")
    if cfg.reference.placement == "separate" and trajectories % cfg.reference.num_workers:
        raise ConfigError("reference.num_workers", f"{trajectories} trajectories per step do not split evenly over "
                          f"{cfg.reference.num_workers} reference ranks")
    if cfg.sync.transport == "ipc" and cfg.placement.mode == "disaggregated":
        raise ConfigError("sync.transport", "ipc hands the engines a handle to memory on the learner's own device; "
                          "placement.mode=disaggregated puts them on other devices: use collective (or auto)")
    if rollout_is_mode(cfg) != "none" and cfg.rollout.temperature == 0:
        raise ConfigError("algo.rollout_is", f"{rollout_is_mode(cfg)!r} weights sampled tokens by the engine's "
                          "log-probs, but rollout.temperature=0 is greedy decoding (no log-probs); set "
                          "rollout.temperature > 0 or algo.rollout_is=none")
    schedule = cfg.trainer.schedule
    if schedule != "sync":
        if cfg.learner.offload != "none":
            raise ConfigError("learner.offload", f"trainer.schedule={schedule} trains while the engines generate; "
                              "learner.offload moves the learner's state off the GPU for each rollout, while the "
                              "learner would be training: set learner.offload=none (disaggregated placement gives "
                              "each role its own GPUs) or trainer.schedule=sync")
        if cfg.placement.mode == "colocated" and cfg.placement.gpus_per_node > 0:
            raise ConfigError("trainer.schedule", f"{schedule} overlaps rollout and training, which colocated "
                              "placement runs on the same GPUs one after the other: use "
                              "placement.mode=disaggregated or trainer.schedule=sync")
        if schedule == "async" and cfg.trainer.prompts_per_step % cfg.trainer.async_groups_per_request:
            raise ConfigError("trainer.async_groups_per_request", f"{cfg.trainer.async_groups_per_request} groups "
                              f"per request do not divide trainer.prompts_per_step={cfg.trainer.prompts_per_step}: "
                              "a batch must end where a request does")
        if cfg.rollout.vllm_sleep_level not in (None, 0):
            raise ConfigError("rollout.vllm_sleep_level", f"trainer.schedule={schedule} keeps the engines "
                              "generating while the learner trains: they never sleep; set it to 0 or null")
    if cfg.validation.every and not cfg.data.val_files:
        raise ConfigError("data.val_files", f"validation.every={cfg.validation.every} validates on data.val_files, "
                          "which is empty; name a question file or set validation.every=0")
    return cfg


def rollout_is_mode(cfg: Config) -> str:
    """``algo.rollout_is`` resolved: ``auto`` is ``tis`` under ``trainer.schedule`` one_step_off or async (the
    rollouts come from an older policy than the one trained: the decoupled correction), ``none`` with ``sync``
    (today's loss, exactly)."""
    if cfg.algo.rollout_is != "auto":
        return cfg.algo.rollout_is
    return "none" if cfg.trainer.schedule == "sync" else "tis"


def schema_keys(schema: type | None = None, prefix: str = "") -> list[str]:
    """Every dotted key of the schema (``Config`` by default): sections (``learner``) and fields (``learner.lr``)."""
    import typing

    out = []
    for name, hint in typing.get_type_hints(schema or Config).items():
        out.append(f"{prefix}{name}")
        if dataclasses.is_dataclass(hint):
            out += schema_keys(hint, f"{prefix}{name}.")
    return out


def suggest_keys(key: str, n: int = 3) -> list[str]:
    """The schema keys closest to an unknown ``key`` (difflib over ``schema_keys``): close full keys first
    (``learner.lrr`` -> ``learner.lr``), after the keys with the same last part in another section (``trainer.lr``
    -> ``learner.lr``), else keys with a close last part in any section (``trainer.lrr`` -> ``learner.lr``)."""
    import difflib

    keys = [k for k in schema_keys() if not key.startswith(f"{k}.")]  # never the key's own section
    leaf = key.rsplit(".", 1)[-1]
    same_leaf = [k for k in keys if k.rsplit(".", 1)[-1] == leaf and k != key]
    close = [k for k in difflib.get_close_matches(key, keys, n=n, cutoff=0.75) if k not in same_leaf]
    if same_leaf or close:
        return (same_leaf + close)[:n]
    leaves: dict[str, list[str]] = {}
    for k in keys:
        leaves.setdefault(k.rsplit(".", 1)[-1], []).append(k)
    return [k for name in difflib.get_close_matches(leaf, list(leaves), n=n, cutoff=0.75) for k in leaves[name]][:n]


def did_you_mean(key: str) -> str:
    """``"; did you mean 'learner.lr'?"`` for an unknown ``key`` (``suggest_keys``), or ``""`` when nothing is close."""
    close = suggest_keys(key)
    return f"; did you mean {' or '.join(repr(k) for k in close)}?" if close else ""


def unknown_key(key: str) -> ConfigError:
    """The error for a key the schema lacks: its suggestions, and the keys valid in its section."""
    section = key.rsplit(".", 1)[0] if "." in key else ""
    valid = sorted(k.rsplit(".", 1)[-1] for k in schema_keys() if k.rsplit(".", 1)[0] == section and "." in k) \
        if section else sorted(k for k in schema_keys() if "." not in k)
    where = f"valid keys under {section}: {valid}" if section else f"top-level keys: {valid}"
    return ConfigError(key, f"unknown key{did_you_mean(key)}" + (f" ({where})" if valid else
                                                                 f" (no section {section!r})"))


def _check_known_keys(node: DictConfig, schema: type, prefix: str = "") -> None:
    """Every key is a field of the schema (Hydra's ``+key=value`` can add keys the schema lacks, which
    ``OmegaConf.to_object`` would then drop silently).

    Raises:
        ConfigError: naming the unknown key, the schema keys closest to it and the keys valid beside it.
    """
    import typing

    hints = typing.get_type_hints(schema)
    for key in node.keys():
        full = f"{prefix}{key}"
        if key not in hints:
            raise unknown_key(full)
        child = node._get_node(key)
        if dataclasses.is_dataclass(hints[key]) and isinstance(child, DictConfig):
            _check_known_keys(child, hints[key], f"{full}.")


def load_config(cfg: DictConfig | Config) -> Config:
    """Composed DictConfig -> validated ``Config`` object (runs every ``__post_init__`` and ``validate``).

    Only the config itself is checked here; an entry point adds the checks of what it uses with
    ``research_rl.config.preflight`` (``check_train``, ``check_evaluate``, ``check_submit``).

    Raises:
        ConfigError: an unknown key, a value out of its range, or a failed cross-field check (the key is named).
    """
    if isinstance(cfg, DictConfig):
        _check_known_keys(cfg, Config)
        OmegaConf.resolve(cfg)
        cfg = OmegaConf.to_object(cfg)
    if not isinstance(cfg, Config):
        raise TypeError(f"expected a Config, got {type(cfg).__name__}")
    return validate(cfg)


def to_dict(cfg: Config) -> dict:
    """Plain-dict form for logs and checkpoints."""
    return dataclasses.asdict(cfg)


register_configs()
