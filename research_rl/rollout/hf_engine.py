"""Hugging Face transformers generation engine for CPU debug mode (the GPU path uses vLLM).

Batches every pending continuation into one left-padded ``generate`` call; one stopping criterion tracks each
sequence on its own (EOS, ``</search>`` in its newly generated text, or its own token budget), so a batch never
cuts a sequence short or lets it run past its budget. Sampling is pure temperature/top-p sampling (no top-k:
transformers' default top_k=50 would make the rollout distribution differ from the policy the learner
optimises), drawn by ``_SeededSampler`` from one generator per sequence seeded with the request's seed, so a
sequence's tokens do not depend on the other sequences of its batch (the agent loop's two schedules rely on it).

The async interface (``generate_one``) is ``agent_loop.AsyncBatcher`` over ``generate``: it batches whatever
requests are pending into one ``generate`` call, run in a worker thread.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from research_rl.learner.weights import persistent_buffers
from research_rl.rollout.agent_loop import SEARCH_CLOSE, GenerationOutput, SamplingParams, request_seed


class _SeededSampler:
    """Logits processor that samples each row's next token with its own ``torch.Generator`` (temperature, then
    top-p filtered as transformers' ``TopPLogitsWarper`` does) and leaves only that token finite, so the greedy
    pick of ``generate`` takes it. Inverse-CDF sampling: one uniform draw per row per step."""

    def __init__(self, seeds: Sequence[int], temperature: float, top_p: float):
        self.generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        self.temperature, self.top_p = temperature, top_p

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        logits = scores.float() / self.temperature  # [B, V]
        if self.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=False)
            remove = sorted_logits.softmax(-1).cumsum(-1) <= (1 - self.top_p)
            remove[..., -1:] = False  # keep at least the most likely token
            logits = logits.masked_fill(remove.scatter(1, order, remove), float("-inf"))
        cdf = logits.softmax(-1).cumsum(-1)  # [B, V]
        u = torch.cat([torch.rand(1, generator=g) for g in self.generators]).to(cdf.device)  # [B]
        picked = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(-1)).clamp_(max=cdf.shape[1] - 1)  # [B, 1]
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(1, picked, 0.0)


class _PerSequenceStop:
    """Stopping criterion with per-sequence state; records where and why each sequence stopped."""

    def __init__(self, prompt_len: int, budgets: Sequence[int], eos_ids: set[int], tokenizer, stop: str):
        self.prompt_len = prompt_len
        self.budgets = list(budgets)
        self.eos_ids = eos_ids
        self.tokenizer = tokenizer
        self.stop = stop
        self.tail = len(stop) + 1  # tokens to decode: every token carries >= 1 character
        self.stopped_at: list[int | None] = [None] * len(budgets)
        self.finish: list[str] = ["length"] * len(budgets)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        n_new = input_ids.shape[1] - self.prompt_len
        last = input_ids[:, -1].tolist()
        done = []
        for i, tok in enumerate(last):
            if self.stopped_at[i] is None:
                if tok in self.eos_ids:
                    self.stopped_at[i], self.finish[i] = n_new, "eos"
                else:
                    tail = input_ids[i, max(self.prompt_len, input_ids.shape[1] - self.tail):]
                    if self.stop in self.tokenizer.decode(tail, skip_special_tokens=False):
                        self.stopped_at[i], self.finish[i] = n_new, "search"
                    elif n_new >= self.budgets[i]:
                        self.stopped_at[i], self.finish[i] = n_new, "length"
            done.append(self.stopped_at[i] is not None)
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


class HFEngine:
    """Generation and scoring with a ``transformers`` causal LM.

    Args:
        model_path: HF model id or local directory.
        tokenizer: the policy tokenizer (its ``pad_token_id`` pads; its ``eos_token_id`` ends a response unless
            ``eos_ids`` is given).
        max_batch_size: sequences per ``generate`` call.
        dtype: parameter dtype (float32 on CPU).
        eos_ids: the ids that end a response (``research_rl.rollout.eos.eos_token_ids``).
    """

    def __init__(self, model_path: str, tokenizer, max_batch_size: int = 64, dtype: torch.dtype = torch.float32,
                 device: str = "cpu", eos_ids: Sequence[int] | None = None):
        from transformers import AutoModelForCausalLM, GenerationConfig

        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(self.device).eval()
        self.max_batch_size = max_batch_size
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.eos_ids = set(eos_ids) if eos_ids else {tokenizer.eos_token_id}
        self._gen_config_cls = GenerationConfig
        self._params = dict(self.model.named_parameters(remove_duplicate=False))
        self._params.update(persistent_buffers(self.model))
        self._receiver = None  # research_rl.sync.receiver.WeightReceiver, created by the first sync

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: Sequence[int],
                 sampling: SamplingParams, seeds: Sequence[int] | None = None) -> list[GenerationOutput]:
        """``agent_loop.GenerationEngine.generate``: batches of at most ``max_batch_size``; ``seeds`` (one per
        prompt; ``None``: ``request_seed(sampling.seed, index, 0)``) seed each sequence's sampling."""
        if seeds is None:
            seeds = [request_seed(sampling.seed, i, 0) for i in range(len(prompts))]
        outputs: list[GenerationOutput] = []
        for start in range(0, len(prompts), self.max_batch_size):
            end = start + self.max_batch_size
            outputs.extend(self._generate_batch(prompts[start:end], max_new_tokens[start:end], sampling,
                                                seeds[start:end]))
        return outputs

    def _generate_batch(self, prompts, budgets, sampling: SamplingParams, seeds) -> list[GenerationOutput]:
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):  # left padding
            input_ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
            attention[i, width - len(p):] = 1
        stop = _PerSequenceStop(width, budgets, self.eos_ids, self.tokenizer, SEARCH_CLOSE)
        # greedy decoding always; sampling happens in _SeededSampler, which leaves one finite logit per row
        gen = self._gen_config_cls(do_sample=False, max_new_tokens=max(budgets), pad_token_id=self.pad_id,
                                   eos_token_id=None)
        processors = [] if sampling.is_greedy else [_SeededSampler(seeds, sampling.temperature, sampling.top_p)]
        out = self.model.generate(input_ids=input_ids.to(self.device), attention_mask=attention.to(self.device),
                                  generation_config=gen, stopping_criteria=[stop], logits_processor=processors)
        results = []
        for i in range(len(prompts)):
            n = stop.stopped_at[i] if stop.stopped_at[i] is not None else out.shape[1] - width
            n = min(n, budgets[i])
            results.append(GenerationOutput(out[i, width:width + n].tolist(), stop.finish[i]))
        return results

    @torch.no_grad()
    def log_probs(self, sequence: Sequence[int], temperature: float = 1.0) -> torch.Tensor:
        """Log-probs of tokens 1..L-1 of one sequence under the engine's weights at sampling temperature
        ``temperature`` (``log_softmax(logits / temperature)``), float32 ``[L-1]``."""
        ids = torch.tensor([list(sequence)], dtype=torch.long, device=self.device)
        logits = self.model(input_ids=ids).logits[0, :-1].float()
        if temperature != 1.0:
            logits = logits / temperature
        return torch.log_softmax(logits, dim=-1).gather(-1, ids[0, 1:, None]).squeeze(-1).cpu()

    @torch.no_grad()
    def load_weights(self, named_tensors: Mapping[str, torch.Tensor]) -> int:
        """Copy a bucket of full (unsharded) tensors into the model by name. Returns the number of elements.

        Raises:
            KeyError: a name the model does not have (weights from a different architecture).
            ValueError: a shape mismatch.
        """
        n = 0
        for name, tensor in named_tensors.items():
            if name not in self._params:
                raise KeyError(f"weight sync: the rollout model has no parameter {name!r}")
            param = self._params[name]
            if param.shape != tensor.shape:
                raise ValueError(f"weight sync: {name} has shape {tuple(tensor.shape)}, rollout model expects {tuple(param.shape)}")
            param.copy_(tensor.to(param.dtype))
            n += tensor.numel()
        return n

    # ------------------------------------------------------------------ weight sync (research_rl.sync)
    @property
    def weight_dtype(self) -> str:
        """The dtype the engine holds its weights in: the wire dtype of a sync (``research_rl.sync.buckets``)."""
        return str(next(self.model.parameters()).dtype).removeprefix("torch.")

    @property
    def receiver(self):
        """The ``WeightReceiver`` of this engine (one replica, in this process), loading through ``load_weights``."""
        if self._receiver is None:
            from research_rl.sync.receiver import WeightReceiver

            self._receiver = WeightReceiver(lambda named: self.load_weights(dict(named)), self.device)
        return self._receiver

    def sync_device_keys(self) -> list[str]:
        """The device key of each replica that receives a sync (one here): ``research_rl.sync.transport.device_key``."""
        return [self.receiver.key]

    def join_sync_group(self, host: str, port: int, first_rank: int, world_size: int) -> None:
        """Join the collective sync group as group rank ``first_rank``."""
        self.receiver.join(host, port, first_rank, world_size)

    def begin_sync(self) -> None:
        """Nothing to prepare: the weights are loaded in place."""

    def receive_ipc(self, msg) -> None:
        self.receiver.receive_ipc(msg)

    def receive_collective(self, buckets) -> None:
        self.receiver.receive_collective(buckets)

    def receive_packed(self, bucket, flat) -> None:
        self.receiver.receive_packed(bucket, flat)

    def end_sync(self):
        """What the sync delivered (``SyncStats``)."""
        return self.receiver.end()

    def parameter_names(self) -> set[str]:
        """Names that a full sync must cover: parameters (tied aliases share storage, so one of them suffices) and
        persistent buffers."""
        seen, names = set(), set()
        for name, p in self.model.named_parameters():
            if p.data_ptr() not in seen:
                seen.add(p.data_ptr())
                names.add(name)
        return names | {name for name, _ in persistent_buffers(self.model)}

    def known_names(self) -> set[str]:
        """Every name a sync may carry (tied aliases included)."""
        return set(self._params)
