"""The ReSearch agent loop (ReSearch §2.1 "rollout with search"; docs/concepts.md#the-search-agent-loop).

Generation stops at ``</search>`` or EOS. On ``</search>`` the query is the text between the last ``<search>``
and ``</search>`` of what the model just generated; the retriever's top-k passages' ``contents`` are joined by a
blank line and appended as the token ids of ``" <result>\\n" + passages + "\\n</result>"``; generation continues.
An empty query gets the observation ``nothing to search``; a query the retriever failed to serve (timeout, dead actor,
backend error) gets ``search failed`` and the trajectory goes on. One shared response budget counts generated and
inserted tokens. Generated ids are kept verbatim (token-in/token-out); only inserted result text is encoded.

Loss mask: 1 on generated tokens (through the first EOS, where generation stops), 0 on inserted results.

Rollout log-probs: each sampled token's log-prob as the engine reports it (``GenerationOutput.log_probs``: under the
distribution it was drawn from, ``log_softmax`` of ``logits / temperature`` after top-p), 0.0 at inserted result
tokens; the learner's truncated importance sampling (``algo.rollout_is``) reads them. Greedy requests report none,
and a trajectory with any generation without log-probs carries ``rollout_log_probs=None``.

Two schedules of the same loop (``rollout.mode``), with identical outputs for the same engine and seeds:

- ``async`` (default): each trajectory is its own coroutine (generate → on ``</search>`` await the retriever →
  append the result ids → generate again). Requests reach the engine one trajectory at a time and the engine
  batches whatever is in flight (vLLM continuously, per decoding step; the HF engine through ``AsyncBatcher``,
  per ``generate`` call). A query goes to the retriever as soon as it is produced (with the other queries produced
  in the same event-loop iteration), so no trajectory waits for the slowest one of its turn.
- ``turn_sync``: the reference implementations' schedule (ReSearch, Search-R1): every active trajectory takes
  part in each engine call, all of a turn's queries go to the retriever in one batched call, then the next turn.

Sampling is seeded per request (``request_seed``: the run's seed, the trajectory's index and its response length
so far), never from a shared generator, so a trajectory's tokens do not depend on which others share its batch:
that is what makes the two schedules give the same trajectories.

Deviations and choices:
- ``max_turns`` caps the number of searches (the paper has none; default unlimited). A ``</search>`` past the
  cap ends the trajectory (``finish_reason="max_turns"``) without a result; the reward then judges its format.
- Result text is encoded with ``split_special_tokens=True``, so a passage that happens to contain a special
  token's string (``<|im_end|>``) cannot inject that token into the sequence.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Awaitable, Callable, Protocol, Sequence

SEARCH_OPEN, SEARCH_CLOSE = "<search>", "</search>"
EMPTY_QUERY_OBSERVATION = "nothing to search"
SEARCH_FAILED_OBSERVATION = "search failed"
MODES = ("async", "turn_sync")


@dataclass(frozen=True)
class SamplingParams:
    """Sampling of one engine request. ``temperature=0`` or ``greedy`` is argmax decoding; ``seed`` seeds the
    request's own generator (the agent loop sets it per request with ``request_seed``)."""

    temperature: float = 1.0
    top_p: float = 1.0
    greedy: bool = False
    seed: int = 0

    @property
    def is_greedy(self) -> bool:
        return self.greedy or self.temperature == 0


def request_seed(seed: int, trajectory: int, position: int) -> int:
    """The seed of one engine request: a hash of the run's sampling seed, the trajectory's index in the call and
    the number of response tokens it already has (a non-negative 63-bit int). Independent of batch composition."""
    digest = hashlib.blake2b(f"{seed}/{trajectory}/{position}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@dataclass
class GenerationOutput:
    """One engine continuation: the generated ids, why it stopped (``eos`` | ``search`` | ``length``) and, per
    generated id, its log-prob (natural log, float) under the distribution the engine sampled it from:
    ``log_softmax(logits / temperature)`` restricted to the top-p nucleus and renormalised over it (with the default
    ``top_p=1`` exactly the learner's ``log_softmax(logits / temperature)``). ``None`` for greedy requests (no
    sampling distribution at temperature 0) or an engine that does not report them."""

    token_ids: list[int]
    finish: str
    log_probs: list[float] | None = None


class GenerationEngine(Protocol):
    """What the agent loop needs from an engine (HF transformers on CPU, vLLM on GPU)."""

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: Sequence[int],
                 sampling: SamplingParams, seeds: Sequence[int] | None = None) -> list[GenerationOutput]:
        """Continue each prompt; each stops at ``</search>`` (finish ``search``), EOS (``eos``) or its own
        ``max_new_tokens`` (``length``). Returned ids include the stop token(s). ``seeds``: one sampling seed per
        prompt (``None``: derived from ``sampling.seed`` and the prompt's index)."""
        ...


class AsyncGenerationEngine(Protocol):
    """An engine that takes requests one at a time and batches the in-flight ones itself (vLLM ``AsyncLLM``)."""

    async def generate_one(self, prompt_ids: Sequence[int], max_new_tokens: int,
                           sampling: SamplingParams) -> GenerationOutput:
        """Continue one prompt (same stop rules as ``GenerationEngine.generate``), sampling with ``sampling.seed``."""
        ...


# queries -> per query, the top-k passages' contents, or None where the retriever failed on that query
SearchFn = Callable[[list[str]], list[list[str] | None]]
AsyncSearchFn = Callable[[list[str]], Awaitable[list[list[str] | None]]]


@dataclass
class Trajectory:
    prompt_ids: list[int]
    response_ids: list[int] = field(default_factory=list)  # generated + inserted result ids
    loss_mask: list[int] = field(default_factory=list)  # per response token: 1 generated, 0 inserted
    queries: list[str] = field(default_factory=list)
    finish_reason: str = ""  # eos | length | max_turns
    failed_searches: int = 0  # searches answered with SEARCH_FAILED_OBSERVATION
    response_text: str = ""  # decoded with special tokens kept, cut after the first EOS (the reward's input)
    # per response token: the engine's log-prob of a generated token (GenerationOutput.log_probs), 0.0 at inserted
    # result tokens; None when a generation came without log-probs (greedy) or the trajectory was not rolled out
    rollout_log_probs: list[float] | None = None
    # the policy version of the weights that generated each segment (each engine call between searches), set by
    # the rollout worker; weights change only between generate requests, so a trajectory's entries are equal
    segment_versions: list[int] = field(default_factory=list)

    @property
    def num_searches(self) -> int:
        return len(self.queries)

    @property
    def num_generated(self) -> int:
        """Response length in model tokens (inserted results excluded)."""
        return sum(self.loss_mask)


def extract_query(generated_text: str) -> str:
    """Text between the last ``<search>`` and the ``</search>`` that follows it, stripped ("" if none)."""
    end = generated_text.rfind(SEARCH_CLOSE)
    if end < 0:
        return ""
    start = generated_text.rfind(SEARCH_OPEN, 0, end)
    if start < 0:
        return ""
    return generated_text[start + len(SEARCH_OPEN):end].strip()


def format_observation(passages: list[str]) -> str:
    """The text inserted after a search: ``" <result>\\n" + passages joined by a blank line + "\\n</result>"``."""
    return " <result>\n" + "\n\n".join(passages) + "\n</result>"


class AsyncBatcher:
    """The async interface (``generate_one``) over a batched engine (``generate``): requests queue; one scheduler
    task takes everything pending (up to ``max_batch_size``, same sampling settings), runs one batched
    ``generate`` in a worker thread, and resolves the requests' futures. Requests that arrive while a batch runs
    form the next one.

    A batch starts when every trajectory that could still ask is waiting (``live`` of them), when it is full, or
    ``max_wait_s`` after its first request arrived, whichever comes first.

    Args:
        engine: a ``GenerationEngine``.
        max_batch_size: requests per ``generate`` call (> 0).
        max_wait_s: how long a request may wait for others to join its batch, in seconds (>= 0).
    """

    def __init__(self, engine: GenerationEngine, max_batch_size: int, max_wait_s: float = 0.0):
        if max_batch_size <= 0:
            raise ValueError(f"max_batch_size must be > 0, got {max_batch_size}")
        self.engine, self.max_batch_size, self.max_wait_s = engine, max_batch_size, max_wait_s
        self.live = 0  # trajectories that may still send a request
        self.batch_sizes: list[int] = []
        self._pending: list[tuple[list[int], int, SamplingParams, asyncio.Future, float]] = []
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="engine")

    async def generate_one(self, prompt_ids: Sequence[int], max_new_tokens: int,
                           sampling: SamplingParams) -> GenerationOutput:
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done():
            self._wake = asyncio.Event()
            self._task = loop.create_task(self._serve())
        fut = loop.create_future()
        self._pending.append((list(prompt_ids), max_new_tokens, sampling, fut, time.monotonic()))
        self._wake.set()
        return await fut

    def retire(self) -> None:
        """A trajectory finished and will send no more requests."""
        self.live -= 1
        if self._wake is not None:
            self._wake.set()

    async def close(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._executor.shutdown(wait=True)

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._pending:
                self._wake.clear()
                await self._wake.wait()
                continue
            await asyncio.sleep(0)  # let every coroutine that is ready now send its request
            deadline = self._pending[0][4] + self.max_wait_s
            while len(self._pending) < min(max(self.live, 1), self.max_batch_size):
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), left)
                except asyncio.TimeoutError:
                    break
            key = _sampling_key(self._pending[0][2])
            batch = [r for r in self._pending if _sampling_key(r[2]) == key][: self.max_batch_size]
            taken = {id(r) for r in batch}
            self._pending = [r for r in self._pending if id(r) not in taken]
            self.batch_sizes.append(len(batch))
            try:
                outs = await loop.run_in_executor(
                    self._executor, self.engine.generate, [r[0] for r in batch], [r[1] for r in batch], batch[0][2],
                    [r[2].seed for r in batch])
            except Exception as e:  # every request of the batch fails with the engine's error
                for r in batch:
                    if not r[3].done():
                        r[3].set_exception(e)
                continue
            for r, out in zip(batch, outs):
                if not r[3].done():
                    r[3].set_result(out)


class _SearchCoalescer:
    """Async mode's retriever calls: a query is sent as soon as it is produced, in one call with the other queries
    produced in the same event-loop iteration (trajectories whose generations finished together), so concurrent
    trajectories do not each pay a call's overhead. Waits for nothing: the call goes out on the next iteration."""

    def __init__(self, call: AsyncSearchFn):
        self.call = call
        self.pending: list[tuple[str, asyncio.Future]] = []
        self.tasks: set[asyncio.Task] = set()

    async def search(self, query: str) -> list[str] | None:
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self.pending.append((query, fut))
        if len(self.pending) == 1:
            loop.call_soon(self._flush)  # runs after the callbacks already ready in this iteration
        return await fut

    def _flush(self) -> None:
        batch, self.pending = self.pending, []
        task = asyncio.ensure_future(self._send(batch))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _send(self, batch: list[tuple[str, asyncio.Future]]) -> None:
        queries = [q for q, _ in batch]
        try:
            results = list(await self.call(queries))
        except Exception as e:
            err = RuntimeError(f"search function raised on a batch of {len(queries)} queries: {e!r}")
            err.__cause__ = e
            return self._fail(batch, err)
        if len(results) != len(queries):
            return self._fail(batch, RuntimeError(
                f"search function returned {len(results)} results for {len(queries)} queries"))
        for (_, fut), result in zip(batch, results):
            if not fut.done():
                fut.set_result(result)

    @staticmethod
    def _fail(batch: list[tuple[str, asyncio.Future]], err: Exception) -> None:
        for _, fut in batch:
            if not fut.done():
                fut.set_exception(err)


def _sampling_key(s: SamplingParams) -> tuple:
    return (s.is_greedy, s.temperature, s.top_p)


class AgentLoop:
    """Runs trajectories to completion against an engine and a search function (ReSearch §2.1).

    Args:
        engine: a ``GenerationEngine`` (batched ``generate``), or an ``AsyncGenerationEngine`` (``generate_one``;
            used as is in ``async`` mode; ``turn_sync`` needs ``generate``).
        search_fn: batched search: ``list[str] -> list[list[str] | None]`` (passage contents, ranked; ``None``
            where the retriever failed on that query).
        tokenizer: the policy's tokenizer (decodes generated ids, encodes inserted results).
        max_response_len: shared budget in tokens (generated + inserted).
        max_turns: cap on searches per trajectory, ``None`` for unlimited.
        mode: ``async`` (per-trajectory coroutines) or ``turn_sync`` (turn by turn, one batched search per turn).
        async_search_fn: ``async`` mode: an awaitable search (same contract as ``search_fn``) called with one query
            as soon as they are produced (the queries produced in one event-loop iteration in one call); ``None``:
            ``search_fn`` in a thread.
        max_batch_size: ``async`` mode with a batched engine: requests per ``generate`` call (``AsyncBatcher``).
        batch_wait_s: ``async`` mode with a batched engine: ``AsyncBatcher.max_wait_s``, in seconds.
        eos_ids: the ids that end a response (``research_rl.rollout.eos``; default the tokenizer's ``eos_token_id``);
            the engine must stop on the same set.
        budget_includes_prompt: ``max_response_len`` counts the prompt too (the reference evaluation's budget); a
            prompt that fills it gets an empty response with ``finish_reason="length"``.
    Raises:
        ValueError: an unknown ``mode`` (from the constructor).
        RuntimeError (from ``run``): the search function raised or returned the wrong number of results (a bug,
            not a retriever outage: outages come back as ``None``).
    """

    def __init__(self, engine, search_fn: SearchFn, tokenizer, max_response_len: int,
                 max_turns: int | None = None, mode: str = "async", async_search_fn: AsyncSearchFn | None = None,
                 max_batch_size: int = 64, batch_wait_s: float = 0.0, eos_ids: Sequence[int] | None = None,
                 budget_includes_prompt: bool = False):
        if mode not in MODES:
            raise ValueError(f"rollout.mode: got {mode!r}, expected one of {list(MODES)}")
        self.engine = engine
        self.search_fn = search_fn
        self.async_search_fn = async_search_fn
        self.tokenizer = tokenizer
        self.max_response_len = max_response_len
        self.budget_includes_prompt = budget_includes_prompt
        self.max_turns = max_turns
        self.mode = mode
        self.max_batch_size = max_batch_size
        self.batch_wait_s = batch_wait_s
        # the ids that end a response (research_rl.rollout.eos; the engine stops on the same set)
        self.eos_ids = frozenset(eos_ids) if eos_ids else frozenset({tokenizer.eos_token_id})
        self.last_batch_sizes: list[int] = []  # engine batch sizes of the last async run (batched engines)

    def run(self, prompts: Sequence[Sequence[int]], sampling: SamplingParams) -> list[Trajectory]:
        """Trajectories for ``prompts`` (token ids), in order, in ``self.mode``. In ``async`` mode this runs an
        event loop (``asyncio.run``); from inside a running loop, await ``run_async`` instead."""
        if self.mode == "turn_sync":
            return self.run_turn_sync(prompts, sampling)
        return asyncio.run(self.run_async(prompts, sampling))

    # ---------------------------------------------------------------- the steps both schedules share
    def _budget(self, t: Trajectory) -> int:
        """The trajectory's response budget: ``max_response_len``, less its prompt with ``budget_includes_prompt``
        (the reference evaluation's 8,192 tokens count prompt and response)."""
        return self.max_response_len - (len(t.prompt_ids) if self.budget_includes_prompt else 0)

    def _new(self, prompts: Sequence[Sequence[int]]) -> list[Trajectory]:
        """Empty trajectories; one whose prompt leaves no budget is finished at once (``length``)."""
        trajs = [Trajectory(prompt_ids=list(p), rollout_log_probs=[]) for p in prompts]
        for t in trajs:
            if self._budget(t) <= 0:
                t.finish_reason = "length"
        return trajs

    def _take_generation(self, t: Trajectory, out: GenerationOutput) -> str | None:
        """Append one engine continuation. Returns the query when the trajectory now waits for a result
        (``""`` for an empty query), ``None`` when it finished or simply continues.

        Raises:
            ValueError: the engine returned a different number of log-probs than of token ids.
        """
        if out.log_probs is None:
            t.rollout_log_probs = None
        elif t.rollout_log_probs is not None:
            if len(out.log_probs) != len(out.token_ids):
                raise ValueError(f"the engine returned {len(out.log_probs)} log-probs for {len(out.token_ids)} "
                                 "generated tokens")
            t.rollout_log_probs.extend(out.log_probs)
        t.response_ids.extend(out.token_ids)
        t.loss_mask.extend([1] * len(out.token_ids))
        if out.finish == "eos":
            t.finish_reason = "eos"
        elif len(t.response_ids) >= self._budget(t):
            t.finish_reason = "length"
        elif out.finish == "search":
            if self.max_turns is not None and t.num_searches >= self.max_turns:
                t.finish_reason = "max_turns"
            else:
                query = extract_query(self.tokenizer.decode(out.token_ids, skip_special_tokens=False))
                t.queries.append(query)
                return query
        else:  # engine hit the budget we gave it
            t.finish_reason = "length"
        return None

    def _insert_result(self, t: Trajectory, query: str, passages: list[str] | None) -> None:
        """Append the ``<result>`` ids for ``query`` (loss mask 0), cut to the budget."""
        if not query:
            passages = [EMPTY_QUERY_OBSERVATION]
        elif passages is None:
            passages = [SEARCH_FAILED_OBSERVATION]
            t.failed_searches += 1
        obs = format_observation(passages)
        ids = self.tokenizer.encode(obs, add_special_tokens=False, split_special_tokens=True)
        room = self._budget(t) - len(t.response_ids)
        t.response_ids.extend(ids[:room])
        t.loss_mask.extend([0] * min(len(ids), room))
        if t.rollout_log_probs is not None:
            t.rollout_log_probs.extend([0.0] * min(len(ids), room))  # inserted, not sampled: off the loss mask
        if len(ids) >= room:
            t.finish_reason = "length"

    def _request(self, i: int, t: Trajectory, sampling: SamplingParams) -> tuple[list[int], int, SamplingParams]:
        seed = request_seed(sampling.seed, i, len(t.response_ids))
        return (t.prompt_ids + t.response_ids, self._budget(t) - len(t.response_ids),
                dataclasses.replace(sampling, seed=seed))

    def _finish(self, trajs: list[Trajectory]) -> list[Trajectory]:
        for t in trajs:
            t.response_text = self.response_text(t.response_ids, t.loss_mask)
        return trajs

    # ---------------------------------------------------------------- turn_sync
    def run_turn_sync(self, prompts: Sequence[Sequence[int]], sampling: SamplingParams) -> list[Trajectory]:
        """Turn by turn: every active trajectory in one ``generate`` call, the turn's queries in one search call."""
        trajs = self._new(prompts)
        active = [i for i, t in enumerate(trajs) if not t.finish_reason]
        while active:
            requests = [self._request(i, trajs[i], sampling) for i in active]
            outputs = self.engine.generate([r[0] for r in requests], [r[1] for r in requests], sampling,
                                           [r[2].seed for r in requests])
            searching: list[tuple[int, str]] = []
            for i, out in zip(active, outputs):
                query = self._take_generation(trajs[i], out)
                if query is not None:
                    searching.append((i, query))
            for (i, query), passages in zip(searching, self._search([q for _, q in searching])):
                self._insert_result(trajs[i], query, passages)
            active = [i for i in active if not trajs[i].finish_reason]
        return self._finish(trajs)

    def _search(self, queries: list[str]) -> list[list[str] | None]:
        """Search the non-empty queries in one batched call; empty queries get ``None`` (never searched)."""
        nonempty = [q for q in queries if q]
        if not nonempty:
            return [None] * len(queries)
        try:
            results = list(self.search_fn(nonempty))
        except Exception as e:
            raise RuntimeError(f"search function raised on a batch of {len(nonempty)} queries: {e!r}") from e
        if len(results) != len(nonempty):
            raise RuntimeError(f"search function returned {len(results)} results for {len(nonempty)} queries")
        it = iter(results)
        return [next(it) if q else None for q in queries]

    # ---------------------------------------------------------------- async
    async def run_async(self, prompts: Sequence[Sequence[int]], sampling: SamplingParams) -> list[Trajectory]:
        """One coroutine per trajectory; the engine batches the in-flight requests (module docstring)."""
        trajs = self._new(prompts)
        batcher = None
        if hasattr(self.engine, "generate_one"):
            generate_one = self.engine.generate_one
        else:
            batcher = AsyncBatcher(self.engine, self.max_batch_size, self.batch_wait_s)
            batcher.live = len(trajs)
            generate_one = batcher.generate_one
        search_pool = None
        if self.async_search_fn is None:  # the blocking search function, in threads
            search_pool = ThreadPoolExecutor(max(1, min(64, len(trajs))), thread_name_prefix="search")

            async def call(queries: list[str]) -> list[list[str] | None]:
                return await asyncio.get_running_loop().run_in_executor(search_pool, self.search_fn, queries)
        else:
            call = self.async_search_fn
        searcher = _SearchCoalescer(call)

        async def one(i: int, t: Trajectory) -> None:
            try:
                while not t.finish_reason:
                    ids, budget, params = self._request(i, t, sampling)
                    query = self._take_generation(t, await generate_one(ids, budget, params))
                    if query is not None:
                        self._insert_result(t, query, await searcher.search(query) if query else None)
            finally:
                if batcher is not None:
                    batcher.retire()

        try:
            await asyncio.gather(*(one(i, t) for i, t in enumerate(trajs)))
        finally:
            if batcher is not None:
                self.last_batch_sizes = batcher.batch_sizes
                await batcher.close()
            if search_pool is not None:
                search_pool.shutdown(wait=False)
        return self._finish(trajs)

    def response_text(self, response_ids: Sequence[int], loss_mask: Sequence[int] | None = None) -> str:
        """Decoded response with special tokens kept, cut after the first generated EOS (any of ``eos_ids``; the
        reward's input, docs/concepts.md#the-reward). ``loss_mask`` marks generated ids (1) and inserted result ids
        (0); without it every id counts as generated. Inserted ids never end a response, and since a passage's
        special-token strings are encoded as plain text, neither does a passage that contains one."""
        mask = loss_mask if loss_mask is not None else [1] * len(response_ids)
        end = next((i + 1 for i, (tok, m) in enumerate(zip(response_ids, mask)) if m and tok in self.eos_ids),
                   len(response_ids))
        return self.tokenizer.decode(list(response_ids[:end]), skip_special_tokens=False)
