"""Preflight: every check that can fail on bad input before Ray or any actor starts.

``schema.load_config`` has checked the config itself (each field's range, and ``schema.validate``'s cross-field
checks). What else an entry point uses is checked here, by the functions it composes:

- ``check_config``: the config against this machine and the cluster it describes: ``schema.validate``, the GPU
  placement arithmetic (``research_rl.config.pools.check_placement``), the vLLM settings, the local cluster's CPU
  budget (``ray.address=null``) and an installed DeepSpeed (``learner.backend=deepspeed``). Returns the placement
  notes to print.
- ``check_train`` (``python -m research_rl.train``): ``check_config`` plus the data files, the model directory, the
  retriever's index manifest (or its service at ``retriever.url``), the dataset ``validation.best_metric`` names,
  read from the validation files themselves, and the run directory (``check_run_dir``): continuing a run whose saved
  ``config.yaml`` differs in anything but the run-control keys (``RUN_CONTROL_KEYS``) is refused.
- ``check_evaluate`` (``python -m research_rl.evaluate``): the model directory, the question files, the retriever
  when the method searches, and the judge's API key; never placement or the Ray CPU budget, since evaluation runs
  in one process without Ray.
- ``check_submit`` (``python -m research_rl.submit``): the config alone (``schema.validate``, placement, the vLLM
  settings); files and packages live on the cluster, where the job's own ``check_train`` reads them.

Every failure is a ``ConfigError`` or a ``FileNotFoundError`` whose message names the key (a malformed question
file: ``research_rl.data.DataError``, naming the file and line or row). Nothing here imports
torch, Ray or research_rl's roles; the retriever service is asked only for ``GET /health``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
from pathlib import Path

from research_rl.config.pools import check_placement, vllm_sleep_level
from research_rl.config.schema import Config, ConfigError, EvalConfig, validate


def looks_local(path: str) -> bool:
    """Whether ``model.path`` names a local directory rather than a hub id (``org/name``)."""
    return path.startswith((".", "/", "~")) or os.path.exists(path) or path.count("/") != 1


def check_service(url: str, timeout_s: float) -> None:
    """Fail before any actor starts when ``retriever.url`` does not answer ``GET /health`` within
    ``min(timeout_s, 10)`` seconds.

    Raises:
        ConfigError: at ``retriever.url``, with the reason and the command that starts the service.
    """
    import requests

    try:
        r = requests.get(f"{url.rstrip('/')}/health", timeout=min(timeout_s, 10.0))
        r.raise_for_status()
    except requests.RequestException as e:
        raise ConfigError("retriever.url", f"retriever.url={url} does not answer GET /health ({e}); start the "
                          "service with: python -m retriever_service.serve --index DIR --port PORT") from e


def absolute_paths(cfg: Config) -> Config:
    """``cfg`` with its relative file paths made absolute against the current directory, so that every actor (and
    a Ray job's driver, whose working directory is an unpacked copy) reads and writes the same files. A
    ``model.path`` that is not a local path (a hub id) is left alone."""
    def absolute(path: str) -> str:
        return str(Path(path).expanduser().resolve())

    return dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model, path=absolute(cfg.model.path) if os.path.exists(cfg.model.path)
                                  else cfg.model.path),
        data=dataclasses.replace(cfg.data, train_files=[absolute(f) for f in cfg.data.train_files],
                                 val_files=[absolute(f) for f in cfg.data.val_files],
                                 corpus_path=absolute(cfg.data.corpus_path)),
        retriever=dataclasses.replace(cfg.retriever, index_dir=absolute(cfg.retriever.index_dir)),
        trainer=dataclasses.replace(cfg.trainer, output_dir=absolute(cfg.trainer.output_dir)))


# ------------------------------------------------------------------------------------------------ the config

def check_vllm(cfg: Config) -> list[str]:
    """``rollout.engine=vllm``: GPUs per worker, tensor parallelism within them, and a context that holds a prompt
    plus the response budget. Training rollouts only (the evaluator always runs HF transformers). Returns a note
    with the sleep level the placement chose when ``rollout.vllm_sleep_level`` is null
    (``research_rl.config.pools.vllm_sleep_level``).

    Raises:
        ConfigError: at ``rollout.num_gpus_per_worker``, ``rollout.vllm_tensor_parallel_size`` or
            ``rollout.vllm_max_model_len``.
    """
    ro = cfg.rollout
    if ro.engine == "vllm" and ro.num_gpus_per_worker <= 0:
        raise ConfigError("rollout.num_gpus_per_worker", "rollout.engine=vllm runs on GPUs; set a GPU share per worker")
    if (ro.engine == "vllm" and ro.vllm_tensor_parallel_size > 1
            and ro.num_gpus_per_worker < ro.vllm_tensor_parallel_size):
        raise ConfigError("rollout.vllm_tensor_parallel_size", f"{ro.vllm_tensor_parallel_size} GPUs per engine, but "
                          f"each rollout worker holds rollout.num_gpus_per_worker={ro.num_gpus_per_worker:g}")
    if ro.vllm_max_model_len is not None and ro.vllm_max_model_len < cfg.data.max_prompt_len + ro.max_response_len:
        raise ConfigError("rollout.vllm_max_model_len", f"{ro.vllm_max_model_len} tokens cannot hold a prompt of "
                          f"data.max_prompt_len={cfg.data.max_prompt_len} plus rollout.max_response_len="
                          f"{ro.max_response_len}")
    if ro.engine != "vllm" or ro.vllm_sleep_level is not None:
        return []
    level = vllm_sleep_level(cfg)
    why = ("the engines free their weights and KV cache between rollouts for the learner; each sync rewrites the "
           "weights" if level == 2 else "the rollout GPUs are the engines' own: they stay awake")
    return [f"rollout.vllm_sleep_level=null: {level} in placement.mode={cfg.placement.mode} ({why})"]


def check_local_cpus(cfg: Config, cpus: int | None = None) -> None:
    """On a local cluster (``ray.address=null``) every actor's CPUs must fit ``ray.num_cpus`` (default: this
    machine's ``os.cpu_count()``, or ``cpus`` when given), or Ray waits forever to place one. Logical CPUs may exceed
    the cores: rollout and learner take turns.

    Raises:
        ConfigError: at ``ray.num_cpus``, with the sum of the shares.
    """
    if cfg.ray.address is not None:
        return
    if cpus is None:
        cpus = cfg.ray.num_cpus if cfg.ray.num_cpus is not None else os.cpu_count()
    retriever_cpus = 0.0 if cfg.retriever.url else cfg.retriever.num_replicas * cfg.retriever.num_cpus
    ref = cfg.reference
    ref_cpus = ref.num_workers * ref.num_cpus_per_worker if ref.placement == "separate" else 0.0
    demand = (retriever_cpus + cfg.rollout.num_workers * cfg.rollout.num_cpus_per_worker
              + cfg.learner.num_workers * cfg.learner.num_cpus_per_worker + ref_cpus)
    if demand > cpus:
        raise ConfigError(
            "ray.num_cpus",
            f"the actors need retriever {retriever_cpus:g} (num_replicas × num_cpus) + rollout "
            f"{cfg.rollout.num_workers} × {cfg.rollout.num_cpus_per_worker:g} + learner "
            f"{cfg.learner.num_workers} × {cfg.learner.num_cpus_per_worker:g}"
            + (f" + reference {ref.num_workers} × {ref.num_cpus_per_worker:g}" if ref_cpus else "")
            + f" = {demand:g} CPUs but the local cluster has {cpus}; raise ray.num_cpus (logical CPUs may "
            "exceed cores: rollout and learner take turns) or lower the shares")


def check_deepspeed(cfg: Config) -> None:
    """``learner.backend=deepspeed`` needs deepspeed importable here (found, not imported: it is slow to import).

    Raises:
        ConfigError: at ``learner.backend``, with the install command.
    """
    if cfg.learner.backend == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
        raise ConfigError("learner.backend", "deepspeed is not installed; install it with: "
                          "pip install -e '.[deepspeed]' (or use learner.backend=fsdp2)")


def check_submit(cfg: Config) -> list[str]:
    """The config alone, for a job that runs elsewhere: ``schema.validate``, the placement arithmetic and the vLLM
    settings. Returns the notes to print (idle GPUs, the vLLM sleep level the placement chose).

    Raises:
        ConfigError: naming the key.
    """
    validate(cfg)
    notes = check_vllm(cfg)
    return check_placement(cfg) + notes


def check_config(cfg: Config) -> list[str]:
    """``check_submit`` plus what this machine must provide to start the cluster here: the local cluster's CPU budget
    and an installed DeepSpeed. Returns the placement notes to print.

    Raises:
        ConfigError: naming the key.
    """
    notes = check_submit(cfg)
    check_local_cpus(cfg)
    check_deepspeed(cfg)
    return notes


# ------------------------------------------------------------------------------------------------ the inputs

def _need_file(key: str, path: str) -> None:
    if not Path(path).is_file():
        raise FileNotFoundError(f"{key}: data file not found: {path}")


def check_model(cfg: Config, built: bool = False) -> None:
    """A local ``model.path`` (``built``: always, as in debug mode, whose model is built from config) is a Hugging
    Face model directory (holds ``config.json``); a hub id is left to the hub.

    Raises:
        FileNotFoundError: naming ``model.path`` (and, when ``built``, the command that builds the debug model).
    """
    if (built or looks_local(cfg.model.path)) and not (Path(cfg.model.path) / "config.json").is_file():
        hint = ("; build the debug model with: python -m research_rl.debug_model experiment="
                f"{cfg.experiment_name}" if built else "")
        raise FileNotFoundError(f"model.path={cfg.model.path} is not a model directory (no config.json){hint}")


def check_retriever(cfg: Config) -> None:
    """The retriever the rollout searches: the service at ``retriever.url`` answers, or the index at
    ``retriever.index_dir`` has a manifest of ``retriever.kind`` and ``data.corpus_path`` exists (the retriever
    compares the corpus' sha256 with the manifest's when it opens the index; that read is left to it).

    Raises:
        ConfigError: the service does not answer (``retriever.url``), the manifest is unreadable
            (``retriever.index_dir``) or of another kind (``retriever.kind``).
        FileNotFoundError: the index or the corpus is missing (``IndexNotFoundError`` names the build command).
    """
    from research_rl.retrieval.index import MANIFEST_NAME, index_not_found, missing_index, read_manifest

    r = cfg.retriever
    if r.url:
        check_service(r.url, r.timeout_s)
        return
    reason = missing_index(r.index_dir)
    if reason:
        raise index_not_found(r.index_dir, f"retriever.index_dir: {reason}", cfg.data.corpus_path, r.kind)
    try:
        manifest = read_manifest(r.index_dir)
    except ValueError as e:
        raise ConfigError("retriever.index_dir", str(e)) from e
    if manifest.get("kind") != r.kind:
        raise ConfigError("retriever.kind", f"got {r.kind!r}, but the index at retriever.index_dir={r.index_dir} "
                          f"was built as {manifest.get('kind')!r} ({Path(r.index_dir) / MANIFEST_NAME})")
    _need_file("data.corpus_path", cfg.data.corpus_path)


def check_inputs(cfg: Config) -> None:
    """Training's inputs: the data files (``data.train_files``, ``data.val_files``: ``.jsonl`` or ``.parquet``;
    ``data.corpus_path``), the model
    directory and the retriever (``check_model``, ``check_retriever``).

    Raises:
        FileNotFoundError, ConfigError: naming the key.
    """
    from research_rl.data import QUESTION_FORMATS

    for key in ("train_files", "val_files"):
        for f in getattr(cfg.data, key):
            if Path(f).suffix not in QUESTION_FORMATS:
                raise ConfigError(f"data.{key}", f"{f}: expected a question file ending in "
                                  + " or ".join(f"{ext} ({name})" for ext, name in QUESTION_FORMATS.items()))
            _need_file(f"data.{key}", f)
    _need_file("data.corpus_path", cfg.data.corpus_path)
    check_model(cfg, built=cfg.warmup.enabled)  # debug mode (warm-up) always runs a model built from config
    check_retriever(cfg)


def validation_datasets(cfg: Config) -> set[str]:
    """The dataset names validation reports (``val/<dataset>/<metric>``): those of ``data.val_files``' questions,
    read from the files (so a malformed file fails here too).

    Raises:
        research_rl.data.DataError: a malformed line (``FILE:LINE: reason``).
    """
    from research_rl.data import load_questions

    return {q.dataset for f in cfg.data.val_files for q in load_questions(f)}


def check_best_metric(cfg: Config, datasets: set[str]) -> None:
    """``validation.best_metric=val/<dataset>/<metric>`` must name a dataset that is validated on."""
    parts = cfg.validation.best_metric.split("/")
    if cfg.validation.every and len(parts) == 3 and parts[1] not in datasets:
        raise ConfigError("validation.best_metric", f"{cfg.validation.best_metric} names dataset "
                          f"{parts[1]!r}, but validation covers {sorted(datasets)} (data.val_files)")


# ------------------------------------------------------------------------------------------------ the run directory

CONFIG_FILE = "config.yaml"  # RUN_DIR/config.yaml: the resolved config of the run's latest start
# keys that may change when a run is continued: where and how long it runs, how often it saves, validates and logs,
# where its services run; anything else (a hyperparameter, the data, the model) makes it another run
RUN_CONTROL_KEYS = (
    "trainer.output_dir", "trainer.resume", "trainer.total_steps", "trainer.epochs", "trainer.max_minutes",
    "trainer.save_every", "trainer.keep_last", "trainer.save_hf_model", "trainer.logger", "trainer.wandb_project",
    "trainer.rollouts_to_log", "validation.every", "validation.before_training", "retriever.url",
    "retriever.timeout_s", "retriever.num_replicas", "retriever.num_cpus", "retriever.cache_size",
    "retriever.max_batch_size", "retriever.max_wait_ms", "retriever.threads", "ray", "eval")
LENGTH_KEYS = ("trainer.total_steps", "trainer.epochs", "trainer.max_minutes")  # how long the run trains


def _flat(tree: dict, prefix: str = "") -> dict[str, object]:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _is_run_control(key: str) -> bool:
    return any(key == c or key.startswith(f"{c}.") for c in RUN_CONTROL_KEYS)


def resolved_config(cfg: Config) -> dict:
    """The config as the run directory's ``config.yaml`` holds it: absolute paths (``absolute_paths``), plain
    YAML values (tuples as lists)."""
    from omegaconf import OmegaConf

    from research_rl.config.schema import to_dict

    return OmegaConf.to_container(OmegaConf.create(to_dict(absolute_paths(cfg))))


def write_run_config(cfg: Config, run_dir: str | Path) -> Path:
    """Write ``RUN_DIR/config.yaml`` (``resolved_config``), replacing the previous start's."""
    from omegaconf import OmegaConf

    path = Path(run_dir) / CONFIG_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".yaml.tmp")
    tmp.write_text(OmegaConf.to_yaml(OmegaConf.create(resolved_config(cfg))))
    tmp.replace(path)
    return path


def config_differences(saved: dict, current: dict) -> list[str]:
    """The dotted keys whose values differ between two resolved configs, run-control keys aside, as
    ``key: saved -> current`` lines."""
    a, b = _flat(saved), _flat(current)
    return [f"{k}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}" for k in sorted(set(a) | set(b))
            if not _is_run_control(k) and a.get(k) != b.get(k)]


def check_run_dir(cfg: Config) -> str | None:
    """What ``trainer.output_dir`` already holds, before anything is written there or Ray starts.

    Returns:
        ``"already finished at step N ..."`` when the directory holds a finished run of this config (its
        ``summary.json`` is at the newest checkpoint's step and the run length, ``LENGTH_KEYS``, is unchanged),
        else None (a new run, or one to continue).
    Raises:
        ConfigError: at ``trainer.resume``, when ``trainer.resume=auto`` would continue a run whose saved
            ``config.yaml`` differs in anything but ``RUN_CONTROL_KEYS``; the message lists each differing key
            with both values and the two ways on (``trainer.output_dir=NEW_DIR`` or ``trainer.resume=force``).
    """
    from omegaconf import OmegaConf

    from research_rl.driver.checkpoint import latest_valid, load_state

    t = cfg.trainer
    run_dir = Path(t.output_dir)
    saved_path = run_dir / CONFIG_FILE
    if t.resume not in ("auto", "force") or not saved_path.is_file():
        return None
    newest = latest_valid(run_dir)
    if newest is None:
        return None  # nothing to continue: the run starts over and config.yaml is rewritten
    saved = OmegaConf.to_container(OmegaConf.load(saved_path))
    current = resolved_config(cfg)
    diff = config_differences(saved, current)
    if diff and t.resume != "force":
        raise ConfigError("trainer.resume", f"{run_dir} holds a run with another config ({saved_path}); "
                          f"{len(diff)} key(s) differ:\n  " + "\n  ".join(diff) + "\nStart a new run with "
                          "trainer.output_dir=NEW_DIR, or continue this one with the new values with "
                          "trainer.resume=force")
    summary = run_dir / "summary.json"
    if not summary.is_file():
        return None
    try:
        steps = int(json.loads(summary.read_text())["steps"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    a, b = _flat(saved), _flat(current)
    if steps == load_state(newest)["step"] and all(a.get(k) == b.get(k) for k in LENGTH_KEYS):
        return (f"{run_dir}: already finished at step {steps} ({summary}); to train it further raise "
                "trainer.total_steps (or trainer.epochs, trainer.max_minutes), or start a new run with "
                "trainer.output_dir=NEW_DIR")
    return None


def check_train(cfg: Config) -> list[str]:
    """Everything ``python -m research_rl.train`` can check before ``ray.init``: ``check_config``, the inputs
    (``check_inputs``), the dataset of ``validation.best_metric`` and the run directory (``check_run_dir``; the
    entry point calls it after this). Returns the placement notes to print, and the memory plan's warnings when a
    phase exceeds the GPU (``research_rl.plan.check``).

    Raises:
        ConfigError, FileNotFoundError: naming the key; research_rl.data.DataError: a malformed validation file.
    """
    from research_rl import plan  # the per-GPU memory plan: warnings, not errors (its estimates have margins)

    notes = check_config(cfg) + plan.check(cfg)
    check_inputs(cfg)
    if cfg.validation.every and cfg.validation.best_metric.count("/") == 2:
        check_best_metric(cfg, validation_datasets(cfg))
    return notes


# ------------------------------------------------------------------------------------------------ evaluation

def question_files(ev: EvalConfig) -> list[tuple[str, str]]:
    """``(dataset, path)`` pairs to evaluate, in order: ``eval.files`` when given (dataset = the file's folder name),
    else ``eval.datasets`` resolved by ``research_rl.algo.evaluation.question_file``.

    Raises:
        ConfigError: a file does not exist (naming ``eval.files`` or ``eval.datasets``) or two files share a dataset
            name.
    """
    from research_rl.algo.evaluation import question_file

    if ev.files:
        key, pairs = "eval.files", [(Path(f).parent.name, f) for f in ev.files]
    else:
        key, pairs = "eval.datasets", [(name, question_file(ev.data_dir, name)) for name in ev.datasets]
    for name, path in pairs:
        if not Path(path).is_file():
            hint = (f"dataset {name!r} resolves to {path} (eval.data_dir={ev.data_dir}: <name>/dev.jsonl, "
                    "bamboogle/test.jsonl); pass explicit files with eval.files=[PATH,...]") if key == "eval.datasets" \
                else "expected a FlashRAG JSONL question file"
            raise ConfigError(key, f"no question file {path}: {hint}")
    names = [n for n, _ in pairs]
    if len(set(names)) != len(names):
        raise ConfigError(key, f"two question files share a dataset name in {names}; each file's folder names its "
                          "dataset")
    return pairs


def check_eval_output(ev: EvalConfig) -> None:
    """Evaluations are never overwritten: ``eval.output_dir`` must not hold one (its ``metrics.json``) already.

    Raises:
        ConfigError: at ``eval.output_dir``, naming the evaluation there and the ways to name a new one.
    """
    done = Path(ev.output_dir) / "metrics.json"
    if done.is_file():
        try:
            what = json.loads(done.read_text()).get("model", "?")
        except (OSError, ValueError, AttributeError):
            what = "?"
        raise ConfigError("eval.output_dir", f"{ev.output_dir} already holds an evaluation ({done}, of {what}); "
                          "evaluations are never overwritten: name this one with eval.tag=NAME (outputs/eval/NAME/"
                          "METHOD) or eval.output_dir=DIR, or remove that folder")


def check_evaluate(cfg: Config) -> None:
    """What ``python -m research_rl.evaluate`` uses: the question files (``question_files``), an unused output
    folder (``check_eval_output``), the model directory,
    the retriever when ``eval.method`` searches (``research``, ``naive_rag``), and the judge's API key when
    ``eval.judge.base_url`` is set. Placement and the Ray CPU budget are not checked: evaluation starts no Ray.

    Raises:
        ConfigError, FileNotFoundError: naming the key.
    """
    question_files(cfg.eval)
    check_eval_output(cfg.eval)
    check_model(cfg)
    if cfg.eval.method != "naive_generation":
        check_retriever(cfg)
    j = cfg.eval.judge
    if j.base_url:
        from research_rl.algo.judge import JudgeClient

        try:  # builds no connection; refuses a missing key for a non-loopback endpoint
            JudgeClient(base_url=j.base_url, model=j.model, api_key_env=j.api_key_env, timeout_s=j.timeout_s,
                        max_retries=j.max_retries, max_concurrency=j.max_concurrency)
        except ValueError as e:
            raise ConfigError("eval.judge.api_key_env", str(e)) from e
