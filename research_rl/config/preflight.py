"""Preflight: every check that can fail on bad input before Ray or any actor starts.

Entry points call the checks they need (``train``: all; ``evaluate``: model, data and retriever; ``submit`` and the
sweep: the config itself) and fail with a message naming the key, before ``ray.init``.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from research_rl.config.schema import Config, ConfigError


def looks_local(path: str) -> bool:
    """Whether ``model.path`` names a local directory rather than a hub id (``org/name``)."""
    return path.startswith((".", "/", "~")) or os.path.exists(path) or path.count("/") != 1


def check_service(url: str, timeout_s: float) -> None:
    """Fail before any actor starts when ``retriever.url`` does not answer ``GET /health``."""
    import requests

    try:
        r = requests.get(f"{url.rstrip('/')}/health", timeout=min(timeout_s, 10.0))
        r.raise_for_status()
    except requests.RequestException as e:
        raise ConnectionError(f"retriever.url={url} does not answer GET /health ({e}); start the service with: "
                              "python -m retriever_service.serve --index DIR --port PORT") from e


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


def check_inputs(cfg: Config) -> None:
    """Data files, the model directory and the retriever (index manifest or service) exist."""
    for f in [*cfg.data.train_files, *cfg.data.val_files, cfg.data.corpus_path]:
        if not Path(f).is_file():
            raise FileNotFoundError(f"data file not found: {f}")
    local = cfg.warmup.enabled or looks_local(cfg.model.path)  # debug mode always runs a built local model
    if local and not (Path(cfg.model.path) / "config.json").is_file():
        hint = ("; build the debug model with: python -m research_rl.debug_model experiment="
                f"{cfg.experiment_name}" if cfg.warmup.enabled else "")
        raise FileNotFoundError(f"model.path={cfg.model.path} is not a model directory{hint}")
    if cfg.retriever.url:
        check_service(cfg.retriever.url, cfg.retriever.timeout_s)
    else:
        from research_rl.retrieval.index import read_manifest

        read_manifest(cfg.retriever.index_dir)  # IndexNotFoundError names the build command


def check_best_metric(cfg: Config, datasets: set[str]) -> None:
    """``validation.best_metric=val/<dataset>/<metric>`` must name a dataset that is validated on."""
    parts = cfg.validation.best_metric.split("/")
    if cfg.validation.every and len(parts) == 3 and parts[1] not in datasets:
        raise ConfigError("validation.best_metric", f"{cfg.validation.best_metric} names dataset "
                          f"{parts[1]!r}, but validation covers {sorted(datasets)} (data.val_files)")
