"""Evaluation (ReSearch §3.1):
``python -m research_rl.evaluate model.path=… eval.datasets=[hotpotqa,2wikimultihopqa,musique,bamboogle]``;
``python -m research_rl.evaluate summary [DIR]`` prints the table of every evaluation under DIR (``outputs/eval``).

The ReSearch inference pipeline of the paper's §3.1 evaluation, in one process (no Ray): the policy on Hugging Face
transformers (CUDA when available, else CPU), the same ``AgentLoop`` as training, greedy decoding, the shared
``rollout.max_response_len`` token budget and ``rollout.max_turns``, and the retriever core
(``research_rl.retrieval.retriever.Retriever`` over ``retriever.index_dir``, or the HTTP service at ``retriever.url``) with
top-k ``retriever.top_k`` (5 in the paper). The prompt template is ``model.template`` (``base``: the paper's raw
prompt; ``instruct``: system prompt + chat template), honoured for the method and the baselines alike.

``eval.method``: ``research`` (the agent loop), ``naive_generation`` or ``naive_rag`` (the paper's baselines, FlashRAG
prompts; see ``research_rl.algo.evaluation``). Scoring is ``research_rl.algo.evaluation`` (also used by the trainer's
validation); an LLM judge runs when ``eval.judge.base_url`` is set.

Writes to ``eval.output_dir``, by default ``outputs/eval/<eval.tag>/<eval.method>`` with the tag read from
``model.path`` (``RUN-step_000040`` for a step checkpoint, ``RUN-best-step_000030`` for ``checkpoints/best``, the
model's name otherwise: ``research_rl.config.schema.model_tag``), so every model and step has its own folder; a folder
that holds an evaluation is never written again (``preflight.check_eval_output``). The files: ``examples_<dataset>.jsonl`` (question, golden answers, prediction, the prompt, the
full trajectory text, searches and queries, per-example metrics, the judge's verdict), ``metrics.json`` (per-dataset
and overall metrics plus what was run) and ``results.md`` (our numbers next to the paper's Table 2 row for the same
model size, template and method, "n/a" where the paper's row is not stored); the table is also printed. Then
``summary.md`` two levels up (``outputs/eval/summary.md``) is rewritten: one row per evaluation found under it
(``summary_table``; ``python -m research_rl.evaluate summary [DIR]`` prints it). Everything printed is also in
``eval.output_dir/evaluate.log``.

Choices: every question is evaluated whatever its prompt length (``data.max_prompt_len`` only filters training
prompts); the engine is always HF transformers (``rollout.engine`` configures training rollouts only); a baseline's
generation that writes ``</search>`` is continued without retrieval (baselines never search).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig

from research_rl.config.compose import CONF_DIR, exit_on_bad_overrides
from research_rl.config.preflight import check_evaluate, question_files
from research_rl.config.schema import Config, ConfigError, load_config

METHOD_LABELS = {"research": "ReSearch", "naive_generation": "Naive Generation", "naive_rag": "Naive RAG"}


def paper_label(method: str, size: str | None, template: str) -> str:
    """The paper's name for a Table 2 row, e.g. "ReSearch on Qwen2.5-7B-Instruct"."""
    if not size:
        return f"{METHOD_LABELS[method]} on a model of unknown size (set eval.model_size, e.g. 7b)"
    return f"{METHOD_LABELS[method]} on Qwen2.5-{size.upper()}{'-Instruct' if template == 'instruct' else ''}"


class Evaluator:
    """Holds the engine, the agent loop and the search function; runs one batch of questions at a time. Expects a
    config that passed ``research_rl.config.preflight.check_evaluate`` (the model, the retriever, the files)."""

    def __init__(self, cfg: Config):
        import torch
        from transformers import AutoTokenizer

        from research_rl.rollout.agent_loop import AgentLoop, SamplingParams
        from research_rl.rollout.eos import eos_token_ids
        from research_rl.rollout.hf_engine import HFEngine

        self.cfg = cfg
        if cfg.rollout.torch_threads:
            torch.set_num_threads(cfg.rollout.torch_threads)
        self.search_fn = None
        if cfg.eval.method != "naive_generation":
            if cfg.retriever.url:
                from research_rl.retrieval.client import RetrieverClient

                client = RetrieverClient(url=cfg.retriever.url, timeout_s=cfg.retriever.timeout_s)
                self.search_fn = lambda qs: [None if ps is None else [p.contents for p in ps]
                                             for ps in client.search(qs, cfg.retriever.top_k)]
            else:
                from research_rl.retrieval.retriever import Retriever

                retriever = Retriever(cfg.retriever.index_dir, cfg.retriever.kind, cfg.retriever.top_k,
                                      cfg.retriever.threads, corpus_path=cfg.data.corpus_path)
                self.search_fn = lambda qs: [[p.contents for p in ps] for ps in retriever.search(qs)]
        self.tokenizer = AutoTokenizer.from_pretrained(cfg.model.path)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = getattr(torch, cfg.model.dtype) if self.device == "cuda" else torch.float32
        eos_ids = eos_token_ids(cfg.model.path, self.tokenizer, cfg.rollout.eos_ids_from)
        self.engine = HFEngine(cfg.model.path, self.tokenizer, cfg.rollout.max_batch_size, dtype=dtype,
                               device=self.device, eos_ids=eos_ids)
        self.loop = AgentLoop(self.engine, self.search_fn or (lambda qs: [None] * len(qs)), self.tokenizer,
                              cfg.rollout.max_response_len, cfg.rollout.max_turns, mode=cfg.rollout.mode,
                              max_batch_size=cfg.rollout.max_batch_size, batch_wait_s=cfg.rollout.batch_wait_ms / 1000,
                              eos_ids=eos_ids, budget_includes_prompt=cfg.eval.budget_includes_prompt)
        self.sampling = SamplingParams(temperature=0.0, greedy=True, seed=cfg.eval.seed)

    def run_batch(self, questions: list, dataset: str) -> list[dict]:
        """Generate and score; one row per question (the ``examples_<dataset>.jsonl`` record)."""
        from research_rl.algo.evaluation import render_baseline_prompt, score_example
        from research_rl.algo.templates import render_prompt

        cfg, tok, method = self.cfg, self.tokenizer, self.cfg.eval.method
        extra: list[dict] = [{} for _ in questions]
        if method == "research":
            texts = [render_prompt(q.question, cfg.model.template, tok) for q in questions]
            trajs = self.loop.run([tok.encode(t, add_special_tokens=False) for t in texts], self.sampling)
            outs = [(t.response_text, t.num_searches, t.num_generated, len(t.response_ids) - t.num_generated,
                     t.finish_reason) for t in trajs]
            for e, t in zip(extra, trajs):
                e.update(queries=t.queries, failed_searches=t.failed_searches)
        else:
            passages: list[list[str] | None] = [None] * len(questions)
            if method == "naive_rag":
                passages = self.search_fn([q.question for q in questions])
                for e, q, ps in zip(extra, questions, passages):
                    e.update(queries=[q.question], failed_searches=int(ps is None))
            texts = [render_baseline_prompt(q.question, method, cfg.model.template, tok,
                                            (ps or []) if method == "naive_rag" else None)
                     for q, ps in zip(questions, passages)]
            outs = [(self.loop.response_text(ids), int(method == "naive_rag"), len(ids), 0, finish)
                    for ids, finish in self._generate_plain([tok.encode(t, add_special_tokens=False) for t in texts])]
        rows = []
        for q, text, (response, searches, n_gen, n_inserted, finish), e in zip(questions, texts, outs, extra):
            scores = score_example(response, q.golden_answers, tok.eos_token, method, searches, n_gen,
                                   cfg.eval.over_length_prediction)
            rows.append({"id": q.id, "dataset": dataset, "question": q.question,
                         "golden_answers": list(q.golden_answers), **scores, "finish_reason": finish,
                         "result_tokens": n_inserted, **e, "prompt": text, "trajectory": response})
        return rows

    def _generate_plain(self, prompts: list[list[int]]) -> list[tuple[list[int], str]]:
        """One answer per prompt, no retrieval: the engine stops at ``</search>`` too, so continue until EOS or the
        budget. Returns ``(generated ids, finish reason eos | length)``."""
        cfg = self.cfg
        budgets = [cfg.rollout.max_response_len - (len(p) if cfg.eval.budget_includes_prompt else 0) for p in prompts]
        ids: list[list[int]] = [[] for _ in prompts]
        finish = ["" if b > 0 else "length" for b in budgets]
        active = [i for i in range(len(prompts)) if not finish[i]]
        while active:
            outs = self.engine.generate([prompts[i] + ids[i] for i in active],
                                        [budgets[i] - len(ids[i]) for i in active], self.sampling)
            for i, out in zip(active, outs):
                ids[i].extend(out.token_ids)
                if out.finish == "eos":
                    finish[i] = "eos"
                elif out.finish == "length" or len(ids[i]) >= budgets[i]:
                    finish[i] = "length"
            active = [i for i in active if not finish[i]]
        return list(zip(ids, finish))


def apply_judge(rows: list[dict], client) -> list:
    """Judge every row's prediction (``client.judge_many`` over ``(question, golden_answers, prediction)``) and store
    the verdict in ``row["judge"]``; returns the verdicts in row order."""
    verdicts = client.judge_many([(r["question"], r["golden_answers"], r["prediction"]) for r in rows])
    if len(verdicts) != len(rows):
        raise RuntimeError(f"the judge returned {len(verdicts)} verdicts for {len(rows)} predictions")
    for r, v in zip(rows, verdicts):
        r["judge"] = {"correct": v.correct, "raw": v.raw, "error": v.error}
    return verdicts


def run_evaluation(cfg: Config) -> dict:
    """Evaluate ``cfg.eval.method`` on the configured datasets and write the outputs (module docstring). ``main``
    runs ``research_rl.config.preflight.check_evaluate`` first; a caller building ``cfg`` itself may too.

    Returns:
        ``{"metrics": {...}, "table": markdown, "output_dir": path}``.
    Raises:
        ConfigError: a question file is missing (``question_files``), or ``eval.output_dir`` holds an evaluation.
        FileNotFoundError: the model directory, corpus or index is missing.
    """
    from research_rl.algo import evaluation
    from research_rl.data import load_questions
    from research_rl.driver.metrics import progress

    from research_rl.config.preflight import check_eval_output

    ev = cfg.eval
    files = question_files(ev)
    check_eval_output(ev)
    out_dir = Path(ev.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    samples = {name: evaluation.sample_questions(load_questions(path, name), ev.limit, ev.seed)
               for name, path in files}
    judge = summarize = None
    if ev.judge.base_url:
        from research_rl.algo.judge import JudgeClient, summarize

        judge = JudgeClient(base_url=ev.judge.base_url, model=ev.judge.model, api_key_env=ev.judge.api_key_env,
                            timeout_s=ev.judge.timeout_s, max_retries=ev.judge.max_retries,
                            max_concurrency=ev.judge.max_concurrency)
    t0 = time.time()
    evaluator = Evaluator(cfg)
    print(f"evaluating {ev.method} with {cfg.model.path} ({cfg.model.template} template, greedy, "
          f"{evaluator.device}) on {', '.join(f'{n} ({len(q)})' for n, q in samples.items())} -> {out_dir}",
          flush=True)
    all_rows: list[dict] = []
    judge_metrics: dict[str, float] = {}
    all_verdicts: list = []
    bar = progress(sum(len(q) for q in samples.values()), f"evaluate {ev.method}", "questions")
    for name, questions in samples.items():
        rows: list[dict] = []
        for start in range(0, len(questions), ev.batch_size):
            batch = questions[start:start + ev.batch_size]
            rows += evaluator.run_batch(batch, name)
            bar.update(len(batch))
            bar.set_postfix(dataset=name, em=f"{sum(r['em'] for r in rows) / len(rows):.3f}")
        if judge is not None:
            verdicts = apply_judge(rows, judge)
            all_verdicts += verdicts
            judge_metrics.update({f"{name}/{k}": v for k, v in summarize(verdicts).items()})
        with (out_dir / f"examples_{name}.jsonl").open("w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        all_rows += rows
    bar.close()

    metrics = evaluation.aggregate(all_rows)
    if judge is not None:
        metrics.update(judge_metrics)
        metrics.update(summarize(all_verdicts))
    size = ev.model_size.lower() if ev.model_size else evaluation.model_size(cfg.model.path)
    paper = evaluation.paper_row(ev.method, size, cfg.model.template)
    label = paper_label(ev.method, size, cfg.model.template)
    table = evaluation.markdown_table(
        metrics, list(samples), f"{METHOD_LABELS[ev.method]} evaluation: {cfg.model.path} "
        f"({cfg.model.template} template)", paper, label)
    record = {
        "metrics": metrics,
        "method": ev.method, "model": cfg.model.path, "template": cfg.model.template, "model_size": size,
        "questions": {name: {"file": path, "n": len(samples[name])} for name, path in files},
        "limit": ev.limit, "seed": ev.seed, "decoding": "greedy", "device": evaluator.device,
        "max_response_len": cfg.rollout.max_response_len, "max_turns": cfg.rollout.max_turns,
        "retriever": None if ev.method == "naive_generation" else
        {"kind": cfg.retriever.kind, "index_dir": cfg.retriever.index_dir, "url": cfg.retriever.url,
         "top_k": cfg.retriever.top_k},
        "judge": {"base_url": ev.judge.base_url, "model": ev.judge.model} if judge is not None else None,
        "paper": {"row": label, "table2": paper, "source": evaluation.PAPER_SOURCE} if paper else None,
        "seconds": round(time.time() - t0, 1),
    }
    (out_dir / "metrics.json").write_text(json.dumps(record, indent=2) + "\n")
    (out_dir / "results.md").write_text(table)
    root = out_dir.resolve().parents[1]
    (root / "summary.md").write_text(summary_table(root))
    return {"metrics": metrics, "table": table, "output_dir": str(out_dir), "summary": str(root / "summary.md")}


def evaluations(root: str | Path) -> list[tuple[str, dict]]:
    """``(folder relative to root, metrics.json record)`` of every evaluation one or two levels under ``root``
    (``TAG/METHOD/metrics.json``), oldest first."""
    root = Path(root)
    found = []
    for path in [*root.glob("*/metrics.json"), *root.glob("*/*/metrics.json")]:
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(record, dict) and "metrics" in record and "method" in record:
            found.append((path.stat().st_mtime, str(path.parent.relative_to(root)), record))
    return [(rel, record) for _, rel, record in sorted(found, key=lambda t: t[:2])]


def summary_table(root: str | Path) -> str:
    """A markdown table of every evaluation under ``root`` (``evaluations``): one row per folder with its method,
    model, questions, EM and F1 per dataset (as %) and overall."""
    rows = evaluations(root)
    datasets = sorted({name for _, r in rows for name in r.get("questions", {})})
    head = ["evaluation", "method", "model", "n", *[f"{d} EM / F1" for d in datasets], "all EM / F1"]
    lines = [f"# Evaluations under {Path(root)}", "", "| " + " | ".join(head) + " |",
             "|" + "---|" * len(head)]

    def pair(m: dict, prefix: str) -> str:
        em, f1 = m.get(f"{prefix}em"), m.get(f"{prefix}f1")
        return "" if em is None else f"{100 * em:.1f} / {100 * f1:.1f}"

    for rel, r in rows:
        m = r["metrics"]
        lines.append("| " + " | ".join([rel, r["method"], str(r.get("model")), str(m.get("n", "")),
                                         *[pair(m, f"{d}/") for d in datasets], pair(m, "")]) + " |")
    return "\n".join(lines) + "\n"


@hydra.main(config_path=str(CONF_DIR), config_name="evaluate", version_base="1.3")
def main(dcfg: DictConfig) -> dict:
    from research_rl.driver.metrics import plain_output, tee_output

    plain_output()

    try:
        cfg = load_config(dcfg)
        check_evaluate(cfg)  # the files, model and retriever this run uses, before loading the model
    except (ConfigError, FileNotFoundError) as e:
        sys.exit(str(e))
    with tee_output(Path(cfg.eval.output_dir) / "evaluate.log"):
        result = run_evaluation(cfg)
        print("\n" + result["table"])
        print(f"examples, metrics.json and results.md in {result['output_dir']}; all evaluations: "
              f"{result['summary']}")
    return result["metrics"]


if __name__ == "__main__":
    if sys.argv[1:2] == ["summary"]:  # python -m research_rl.evaluate summary [DIR]: the table of every evaluation
        print(summary_table(sys.argv[2] if len(sys.argv) > 2 else "outputs/eval"), end="")
        sys.exit(0)
    exit_on_bad_overrides()  # an unknown key fails with "did you mean", before Hydra composes
    main()
