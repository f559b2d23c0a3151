"""The preflight: every number refuses nonsense by key, each entry point checks what it uses (and only that) before
Ray or any actor starts, and the checks fail fast, as a user meets them on the command line."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
import typing
from pathlib import Path

import pytest

from research_rl.config import preflight
from research_rl.config.compose import compose_config
from research_rl.config.schema import Config, ConfigError

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[1]
DEBUG = "experiment=debug_cpu"


def _refused(*overrides: str) -> ConfigError:
    with pytest.raises(ConfigError) as e:
        compose_config([DEBUG, *overrides])
    return e.value


# --------------------------------------------------------------------------- numbers

@pytest.mark.parametrize("override, key", [
    ("learner.lr=nan", "learner.lr"),
    ("learner.lr=inf", "learner.lr"),
    ("learner.lr=0", "learner.lr"),
    ("trainer.probe_tolerance=nan", "trainer.probe_tolerance"),  # NaN: the weight-sync probe could never fire
    ("trainer.probe_tolerance=-1e-3", "trainer.probe_tolerance"),
    ("learner.betas=[2.0,-1.0]", "learner.betas[0]"),
    ("learner.betas=[0.9,1.0]", "learner.betas[1]"),  # β = 1 never forgets: AdamW's moments stop moving
    ("learner.betas=[0.9,nan]", "learner.betas[1]"),
    ("learner.weight_decay=-5", "learner.weight_decay"),
    ("trainer.max_minutes=-1", "trainer.max_minutes"),
    ("trainer.max_minutes=0", "trainer.max_minutes"),
    ("trainer.max_minutes=nan", "trainer.max_minutes"),
    ("rollout.temperature=nan", "rollout.temperature"),
    ("rollout.temperature=-0.5", "rollout.temperature"),
    ("rollout.top_p=nan", "rollout.top_p"),
    ("algo.clip_eps=nan", "algo.clip_eps"),
    ("algo.kl_coef=nan", "algo.kl_coef"),
    ("algo.entropy_coef=-inf", "algo.entropy_coef"),
    ("algo.adv_eps=0", "algo.adv_eps"),  # std + eps: a group of equal rewards would divide 0 by 0
    ("algo.kl_clamp=0", "algo.kl_clamp"),
    ("learner.grad_clip=nan", "learner.grad_clip"),
    ("learner.grad_clip=0", "learner.grad_clip"),  # clip_grad_norm_(max_norm=0) zeroes every gradient
    ("retriever.timeout_s=nan", "retriever.timeout_s"),
    ("retriever.timeout_s=-1", "retriever.timeout_s"),
    ("placement.timeout_s=inf", "placement.timeout_s"),
    ("placement.timeout_s=0", "placement.timeout_s"),
    ("eval.judge.timeout_s=nan", "eval.judge.timeout_s"),  # checked even with no judge configured
    ("warmup.search_fraction=1.5", "warmup.search_fraction"),
    ("rollout.vllm_gpu_memory_utilization=nan", "rollout.vllm_gpu_memory_utilization"),
    ("learner.num_cpus_per_worker=-1", "learner.num_cpus_per_worker"),
    ("rollout.num_gpus_per_worker=nan", "rollout.num_gpus_per_worker"),
    ("warmup.max_seq_len=0", "warmup.max_seq_len"),
    ("trainer.seed=-1", "trainer.seed"),  # np.random.seed refuses it, after Ray has started
    ("trainer.rollouts_to_log=-2", "trainer.rollouts_to_log"),
    ("validation.every=-1", "validation.every"),
    ("ray.num_cpus=0", "ray.num_cpus"),
])
def test_a_bad_number_is_refused_naming_its_key(override, key):
    e = _refused(override)
    assert e.key == key and f"'{key}'" in str(e)
    value = override.split("=", 1)[1]
    if value in ("nan", "inf", "-inf"):
        assert "expected a finite number" in str(e)


def _numeric_fields(schema: type = Config, prefix: str = "") -> typing.Iterator[tuple[str, type]]:
    """``(key, int | float)`` for every numeric field of the schema, Optional ones included."""
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from _numeric_fields(tp, f"{prefix}{f.name}.")
            continue
        union = typing.get_origin(tp) is typing.Union
        args = [a for a in typing.get_args(tp) if a is not type(None)] if union else [tp]
        if args in ([int], [float]):
            yield f"{prefix}{f.name}", args[0]


NUMERIC = list(_numeric_fields())


def test_the_schema_has_the_numbers_this_file_walks():
    keys = dict(NUMERIC)
    assert len(NUMERIC) > 60 and keys["learner.lr"] is float and keys["trainer.max_minutes"] is float
    assert keys["rollout.group_size"] is int and keys["ray.num_cpus"] is int


@pytest.mark.parametrize("key", [k for k, tp in NUMERIC if tp is float])
def test_every_float_refuses_nan_and_inf(key):
    for value in ("nan", "inf", "-inf"):
        e = _refused(f"{key}={value}")
        assert e.key == key, (value, str(e))
        assert "expected a finite number" in str(e)


@pytest.mark.parametrize("key", [k for k, _ in NUMERIC])
def test_every_number_refuses_a_negative_count(key):
    """No numeric key means anything at -2 (the smallest meaningful values are 0 and -1 = unlimited)."""
    assert _refused(f"{key}=-2").key == key


def test_meaningful_edge_values_are_kept():
    cfg = compose_config([DEBUG, "rollout.temperature=0", "algo.kl_coef=0", "algo.entropy_coef=0",
                          "trainer.probe_tolerance=0", "trainer.max_minutes=null", "learner.weight_decay=0",
                          "learner.betas=[0.0,0.999]", "rollout.top_p=1", "warmup.search_fraction=0",
                          "retriever.max_restarts=-1", "trainer.rollouts_to_log=-1", "retriever.cache_size=0",
                          "validation.every=0", "trainer.save_every=0", "retriever.num_cpus=0"])
    assert (cfg.rollout.temperature, cfg.algo.kl_coef, cfg.trainer.probe_tolerance, cfg.trainer.max_minutes) == \
        (0.0, 0.0, 0.0, None)
    assert cfg.learner.betas == [0.0, 0.999] and cfg.retriever.max_restarts == -1


# --------------------------------------------------------------------------- what each entry point checks

def test_schema_and_the_config_package_import_no_roles_and_no_heavy_modules():
    code = ("import sys\nimport research_rl.config.schema\n"
            "print(sorted(m for m in sys.modules if m.startswith('research_rl')))\n"
            "import research_rl.config.preflight, research_rl.config.compose, research_rl.config.pools\n"
            "print(sorted(m for m in sys.modules if m.startswith(('research_rl.roles', 'research_rl.driver', "
            "'ray', 'torch'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    schema_deps, heavy = out.stdout.splitlines()
    assert schema_deps == "['research_rl', 'research_rl.config', 'research_rl.config.schema']"
    assert heavy == "[]"


def test_composing_checks_the_config_alone_and_check_config_the_machine():
    # 2.5 CPUs of actors on a 2-CPU local cluster, and GPUs on a CPU-only config: composing accepts both
    cfg = compose_config([DEBUG, "ray.num_cpus=2"])
    with pytest.raises(ConfigError, match=r"'ray.num_cpus'.*= 2.5 CPUs"):
        preflight.check_config(cfg)
    cfg = compose_config([DEBUG, "learner.num_gpus_per_worker=1"])
    with pytest.raises(ConfigError) as e:
        preflight.check_config(cfg)
    assert e.value.key == "learner.num_gpus_per_worker"
    # vLLM settings are training's: the evaluator always runs HF transformers
    cfg = compose_config([DEBUG, "rollout.engine=vllm"])
    with pytest.raises(ConfigError, match="rollout.num_gpus_per_worker"):
        preflight.check_config(cfg)


VLLM_ON_ONE_GPU = [DEBUG, "rollout.engine=vllm", "placement.gpus_per_node=1", "rollout.num_gpus_per_worker=1",
                   "learner.num_gpus_per_worker=1", "ray.address=auto"]


@pytest.mark.parametrize("overrides, level, note", [
    (["placement.mode=colocated"], 2, "rollout.vllm_sleep_level=null: 2 in placement.mode=colocated"),
    (["placement.mode=disaggregated", "placement.gpus_per_node=2"], 0,
     "rollout.vllm_sleep_level=null: 0 in placement.mode=disaggregated"),
    (["placement.mode=colocated", "rollout.vllm_sleep_level=1"], 1, None),  # explicit levels are kept as given
    (["placement.mode=disaggregated", "placement.gpus_per_node=2", "rollout.vllm_sleep_level=2"], 2, None),
    (["placement.mode=colocated", "rollout.vllm_sleep_level=0"], 0, None),
])
def test_vllm_sleep_level_null_is_chosen_by_the_placement_and_printed(overrides, level, note):
    from research_rl.config.pools import vllm_sleep_level

    cfg = compose_config(VLLM_ON_ONE_GPU + overrides)
    assert vllm_sleep_level(cfg) == level
    notes = [n for n in preflight.check_submit(cfg) if "vllm_sleep_level" in n]
    if note is None:
        assert notes == []
    else:
        assert len(notes) == 1 and notes[0].startswith(note), notes


def test_check_submit_checks_the_config_but_not_this_machine(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else real(name, *a))
    # deepspeed is the cluster's to have, the files are on the cluster, and ray.address is set by the submitter
    cfg = compose_config([DEBUG, "learner.backend=deepspeed", "model.path=/nowhere/model", "ray.address=auto",
                          "data.train_files=[/nowhere/train.jsonl]"])
    assert preflight.check_submit(cfg) == []
    with pytest.raises(ConfigError, match="learner.backend"):
        preflight.check_config(cfg)
    with pytest.raises(ConfigError) as e:
        preflight.check_submit(compose_config([DEBUG, "rollout.num_gpus_per_worker=1", "ray.address=auto"]))
    assert e.value.key == "rollout.num_gpus_per_worker"


def test_check_train_checks_the_inputs_naming_the_key(debug_model_dir, bm25_index, tmp_path):
    base = [DEBUG, f"model.path={debug_model_dir}", f"retriever.index_dir={bm25_index}"]
    assert preflight.check_train(compose_config(base)) == []

    def fails(*overrides, error=ConfigError):
        with pytest.raises(error) as e:
            preflight.check_train(compose_config([*base, *overrides]))
        return str(e.value)

    assert "data.val_files: data file not found" in fails(f"data.val_files=[{tmp_path}/dev.jsonl]",
                                                          error=FileNotFoundError)
    assert "data.corpus_path" in fails(f"data.corpus_path={tmp_path}/c.jsonl", error=FileNotFoundError)
    msg = fails(f"model.path={tmp_path}", error=FileNotFoundError)
    assert f"model.path={tmp_path} is not a model directory" in msg and "python -m research_rl.debug_model" in msg
    msg = fails(f"retriever.index_dir={tmp_path}/idx", error=FileNotFoundError)
    assert "retriever.index_dir" in msg and "retriever_service.build_index" in msg
    assert "'retriever.kind'" in fails("retriever.kind=dense")  # the manifest says bm25
    # the best-metric dataset is read from the validation files themselves
    msg = fails("validation.best_metric=val/bamboogle/em")
    assert "'validation.best_metric'" in msg and "['hotpotqa', 'musique']" in msg
    preflight.check_train(compose_config([*base, "validation.best_metric=val/musique/f1"]))
    # a remote retriever that does not answer
    from helpers import free_port

    url = f"http://127.0.0.1:{free_port()}"
    msg = fails(f"retriever.url={url}")
    assert f"retriever.url={url} does not answer GET /health" in msg and "retriever_service.serve" in msg


def test_check_evaluate_skips_placement_and_the_cpu_budget(debug_model_dir, bm25_index, tmp_path):
    # CPUs and GPUs that no local cluster could host, as a training config: evaluation starts no Ray
    cfg = compose_config([f"model.path={debug_model_dir}", f"retriever.index_dir={bm25_index}",
                          "learner.num_cpus_per_worker=512", "learner.num_gpus_per_worker=1"])
    with pytest.raises(ConfigError, match="num_gpus_per_worker"):
        preflight.check_config(cfg)
    preflight.check_evaluate(cfg)
    with pytest.raises(ConfigError, match="'retriever.kind'"):  # research and naive_rag search
        preflight.check_evaluate(dataclasses.replace(cfg, retriever=dataclasses.replace(cfg.retriever, kind="dense")))
    no_index = dataclasses.replace(cfg, retriever=dataclasses.replace(cfg.retriever, index_dir=str(tmp_path)))
    with pytest.raises(FileNotFoundError, match="retriever.index_dir"):
        preflight.check_evaluate(no_index)
    preflight.check_evaluate(dataclasses.replace(no_index, eval=dataclasses.replace(cfg.eval,
                                                                                    method="naive_generation")))
    with pytest.raises(FileNotFoundError, match=f"model.path={tmp_path} is not a model directory"):
        preflight.check_evaluate(dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, path=str(tmp_path))))


def test_check_evaluate_needs_the_judges_key(debug_model_dir, bm25_index, monkeypatch):
    monkeypatch.delenv("NO_SUCH_JUDGE_KEY", raising=False)
    cfg = compose_config([f"model.path={debug_model_dir}", f"retriever.index_dir={bm25_index}",
                          "eval.judge.base_url=https://judge.example.com/v1", "eval.judge.model=gpt-4o-mini",
                          "eval.judge.api_key_env=NO_SUCH_JUDGE_KEY"])
    with pytest.raises(ConfigError, match=r"'eval.judge.api_key_env'.*NO_SUCH_JUDGE_KEY is not set"):
        preflight.check_evaluate(cfg)
    monkeypatch.setenv("NO_SUCH_JUDGE_KEY", "k")
    preflight.check_evaluate(cfg)


# --------------------------------------------------------------------------- as a user meets them

def _run(module: str, *args: str, tmp_path: Path,
         importtime: bool = False) -> tuple[subprocess.CompletedProcess, float]:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1", "RAY_TMPDIR": str(tmp_path / "ray_tmp")}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, *(["-X", "importtime"] if importtime else []), "-m", module, *args]
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    return proc, time.monotonic() - t0


def _imported(stderr: str) -> set[str]:
    """Module names from ``python -X importtime`` (``import time: self | cumulative | name``)."""
    return {line.rsplit("|", 1)[1].strip() for line in stderr.splitlines() if line.startswith("import time:")}


@pytest.mark.parametrize("override, key", [
    ("learner.lr=nan", "'learner.lr'"),
    ("data.val_files=[data/no_such/dev.jsonl]", "data.val_files: data file not found"),
])
def test_train_refuses_before_the_trainer_or_ray_is_imported(override, key, tmp_path):
    """The refusal names the key, and comes before research_rl.driver or ray is even imported: no Ray session
    directory is made under RAY_TMPDIR."""
    proc, seconds = _run("research_rl.train", DEBUG, override, f"trainer.output_dir={tmp_path / 'run'}",
                         tmp_path=tmp_path, importtime=True)
    assert proc.returncode != 0
    assert key in proc.stderr, proc.stderr[-3000:]
    imported = _imported(proc.stderr)
    assert {"hydra", "research_rl.config.preflight"} <= imported  # importtime saw what ran
    assert not {m for m in imported if m == "ray" or m.startswith(("ray.", "research_rl.driver", "torch"))}
    assert not (tmp_path / "ray_tmp").exists() and not (tmp_path / "run" / "metrics.jsonl").exists()
    print(f"{override}: refused in {seconds:.2f} s of wall time (process start to exit)")


@pytest.mark.slow
def test_evaluate_runs_on_a_small_machine_without_a_cpu_override(debug_model_dir, bm25_index, tmp_path):
    """``python -m research_rl.evaluate model.path=DIR`` with the default config on any machine: the training
    actors' CPU shares (here far beyond any local cluster) and placement are not evaluation's to check."""
    out = tmp_path / "eval"
    proc, _ = _run("research_rl.evaluate", f"model.path={debug_model_dir}", f"retriever.index_dir={bm25_index}",
                   "learner.num_cpus_per_worker=512", "eval.datasets=[bamboogle]", "eval.limit=2",
                   "rollout.max_response_len=16", f"eval.output_dir={out}", tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert (out / "metrics.json").is_file() and len((out / "examples_bamboogle.jsonl").read_text().splitlines()) == 2
    assert not (tmp_path / "ray_tmp").exists()
