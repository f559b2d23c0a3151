"""The supervised warm-up of debug mode (``warmup.enabled``; DESIGN.md: Debug mode), run by the driver before GRPO.

A randomly initialised debug model never writes the search format, so GRPO on it would have no reward signal. The
warm-up trains it for ``warmup.steps`` supervised steps on search traces synthesised from the training questions
and real retriever results (``research_rl.rollout.warmup.synthesize``) and saves it as an HF model directory, which
then is the initial and reference policy of GRPO. A deviation from the paper (which starts from Qwen2.5), for CPU
time only.
"""

from __future__ import annotations

import random
import shutil
import time
from pathlib import Path

from research_rl.config.schema import Config
from research_rl.data import Question, load_corpus


def warm_up(cfg: Config, questions: list[Question], tokenizer, retriever, learners, logger,
            out_dir: Path) -> tuple[float, float]:
    """Train ``model.path`` on the learner group (``WorkerGroup``) by ``warmup.steps`` ``sft_step`` calls, each on
    one shard per rank of a ``warmup.batch_size`` sample, and save it to ``out_dir`` (written beside it, then
    renamed). Every 10th step's metrics go to ``logger`` at step -1, on the warm-up's own step axis
    (``warmup/step``) in TensorBoard. Returns the seconds it took and the last
    step's NLL (nats per loss token).

    Raises:
        RuntimeError: the retriever (a ``RetrieverClient``) failed to answer a search.
    """
    from research_rl.driver.metrics import progress
    from research_rl.rollout.warmup import collate, synthesize

    w = cfg.warmup
    corpus = load_corpus(cfg.data.corpus_path)
    titles = {pid: row.get("title") or row["contents"].split("\n", 1)[0].strip('"') for pid, row in corpus.items()}

    def search(queries):
        results = retriever.search(queries, cfg.retriever.top_k)
        if any(r is None for r in results):
            raise RuntimeError("the retriever failed to answer a warm-up search (see the warnings above)")
        return [[p.contents for p in ps] for ps in results]

    t0 = time.time()
    examples = synthesize(questions, titles, search, tokenizer, cfg.model.template, w.search_fraction, w.max_seq_len,
                          w.seed, w.answer_from)
    learners.call("load_policy", cfg.model.path)
    rng = random.Random(w.seed)
    bar = progress(w.steps, "warm-up (supervised, debug only)", "steps")
    for i in range(w.steps):
        batch = collate(rng.sample(examples, min(w.batch_size, len(examples))), tokenizer.pad_token_id)
        m = learners.scatter("sft_step", batch.shard(len(learners)), w.lr)[0]
        bar.set_postfix(nll=f"{m['warmup/nll']:.3f}")
        bar.update(1)
        if i % 10 == 0 or i == w.steps - 1:
            logger.log(-1, {**m, "warmup/step": i}, console=False, axis_step=i)
    bar.close()
    tmp = out_dir.parent / f".tmp-{out_dir.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    learners.call("save_hf", str(tmp), cfg.model.path)
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return round(time.time() - t0, 1), m["warmup/nll"]
