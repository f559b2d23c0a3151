"""Every experiment composes and validates; bad overrides fail naming the key, before any actor starts.
Range checks of every number and the preflight's composition: tests/test_preflight.py."""

import subprocess
import sys

import pytest

from research_rl.config.compose import CONF_DIR, compose_config
from research_rl.config.preflight import check_config
from research_rl.config.schema import Config, ConfigError, rollout_is_mode

pytestmark = pytest.mark.unit
EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))


def test_experiments_exist():
    assert {"debug_cpu", "research_qwen2.5_7b_instruct"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_composes_and_validates(name):
    cfg = compose_config([f"experiment={name}"])
    assert isinstance(cfg, Config)
    assert cfg.experiment_name == name
    check_config(cfg)  # placement, vLLM settings, and (local clusters) the CPU budget


def test_paper_settings_in_7b_experiment():
    cfg = compose_config(["experiment=research_qwen2.5_7b_instruct"])
    assert (cfg.rollout.group_size, cfg.algo.clip_eps, cfg.algo.kl_coef, cfg.algo.entropy_coef) == (5, 0.2, 0.001, 0.001)
    assert (cfg.learner.lr, cfg.learner.grad_clip, cfg.trainer.prompts_per_step, cfg.trainer.epochs) == (1e-6, 1.0, 256, 2)
    assert (cfg.rollout.temperature, cfg.data.max_prompt_len, cfg.rollout.max_response_len, cfg.retriever.top_k) == (1.0, 512, 8192, 5)
    assert cfg.rollout.max_turns is None and cfg.model.template == "instruct"
    assert (cfg.validation.every, cfg.validation.num_questions) == (10, 100)


def test_lr_warmup_rises_linearly_then_holds_or_follows_a_cosine():
    from research_rl.driver.trainer import learning_rate

    learner = compose_config(["experiment=debug_cpu", "learner.lr=1e-3", "learner.lr_warmup_steps=4"]).learner
    assert [learning_rate(learner, s, 6) for s in range(1, 7)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3])
    constant = compose_config(["experiment=debug_cpu", "learner.lr=1e-3"]).learner
    assert [learning_rate(constant, s, 50) for s in (1, 2, 50)] == [1e-3, 1e-3, 1e-3]  # the paper's: no schedule
    cosine = compose_config(["experiment=debug_cpu", "learner.lr=1e-3", "learner.lr_warmup_steps=4",
                             "learner.lr_schedule=cosine", "learner.min_lr_ratio=0.1"]).learner
    # the warm-up, then a half cosine from lr at step 4 to 0.1 lr at step 8 (its midpoint, step 6, halfway)
    assert [learning_rate(cosine, s, 8) for s in range(1, 9)] == pytest.approx(
        [2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-4 + 9e-4 * (1 + 2 ** -0.5) / 2, 5.5e-4, 1e-4 + 9e-4 * (1 - 2 ** -0.5) / 2, 1e-4])


@pytest.mark.parametrize("override, key", [
    ("rollout.group_sise=4", "group_sise"),            # unknown key
    ("+rollout.group_sise=4", "rollout.group_sise"),   # an unknown key added with Hydra's +
    ("+tracer.level=1", "tracer"),
    ("placement.mode=hybrid", "placement.mode"),
    ("placement.strategy=pack", "placement.strategy"),
    ("reference.placement=remote", "reference.placement"),
    ("rollout.group_size=many", "rollout.group_size"),  # wrong type
    ("rollout.group_size=1", "rollout.group_size"),     # GRPO needs >= 2
    ("model.template=chat", "model.template"),
    ("rollout.top_p=1.5", "rollout.top_p"),
    ("learner.lr=-1", "learner.lr"),
    ("learner.lr_warmup_steps=-1", "learner.lr_warmup_steps"),
    ("learner.lr_schedule=linear", "learner.lr_schedule"),
    ("learner.min_lr_ratio=1.5", "learner.min_lr_ratio"),
    ("retriever.kind=splade", "retriever.kind"),
    ("retriever.timeout_s=0", "retriever.timeout_s"),
    ("retriever.num_replicas=0", "retriever.num_replicas"),
    ("retriever.max_restarts=-2", "retriever.max_restarts"),
    ("retriever.url=localhost:8000", "retriever.url"),
    ("learner.backend=megatron", "learner.backend"),
    ("learner.zero_stage=1", "learner.zero_stage"),
    ("learner.max_tokens_per_micro_batch=0", "learner.max_tokens_per_micro_batch"),
    ("rollout.mode=sync", "rollout.mode"),
    ("rollout.batch_wait_ms=-1", "rollout.batch_wait_ms"),
    ("rollout.vllm_sleep_level=3", "rollout.vllm_sleep_level"),
    ("rollout.vllm_gpu_memory_utilization=1.5", "rollout.vllm_gpu_memory_utilization"),
    ("rollout.vllm_max_model_len=1000", "rollout.vllm_max_model_len"),  # < max_prompt_len + max_response_len
    ("rollout.engine=vllm", "rollout.num_gpus_per_worker"),  # vLLM runs on GPUs
    ("algo.rollout_is=sequence", "algo.rollout_is"),
    ("trainer.schedule=pipelined", "trainer.schedule"),
    ("trainer.max_staleness=-1", "trainer.max_staleness"),
    ("trainer.async_groups_per_request=0", "trainer.async_groups_per_request"),
    ("trainer.schedule=async trainer.async_groups_per_request=3", "trainer.async_groups_per_request"),
    ("trainer.schedule=one_step_off learner.offload=optimizer", "learner.offload"),
    ("trainer.schedule=one_step_off rollout.temperature=0", "algo.rollout_is"),  # auto: tis needs sampling
    ("trainer.schedule=async placement.gpus_per_node=2 rollout.num_gpus_per_worker=1", "trainer.schedule"),
    ("algo.rollout_is_cap=0.5", "algo.rollout_is_cap"),  # a cap below 1 shrinks even matching tokens
    ("algo.rollout_is_cap=inf", "algo.rollout_is_cap"),
])
def test_bad_override_names_the_key(override, key):
    with pytest.raises(ConfigError) as e:
        check_config(compose_config(["experiment=debug_cpu", *override.split()]))
    assert key in str(e.value)


def test_rollout_is_keys():
    """``auto`` by default with verl's cap, which is off under the sync schedule and TIS under the overlapping ones;
    ``tis`` composes with a cap of choice, and is refused with greedy training rollouts (temperature 0: the engine
    reports no log-probs), naming the key."""
    cfg = compose_config(["experiment=debug_cpu"])
    assert (cfg.algo.rollout_is, cfg.algo.rollout_is_cap) == ("auto", 2.0)
    assert rollout_is_mode(cfg) == "none"
    for schedule in ("one_step_off", "async"):
        assert rollout_is_mode(compose_config(["experiment=debug_cpu", f"trainer.schedule={schedule}"])) == "tis"
    assert rollout_is_mode(compose_config(["experiment=debug_cpu", "trainer.schedule=async",
                                           "algo.rollout_is=none"])) == "none"
    cfg = compose_config(["experiment=debug_cpu", "algo.rollout_is=tis", "algo.rollout_is_cap=5"])
    assert (cfg.algo.rollout_is, cfg.algo.rollout_is_cap) == ("tis", 5.0)
    check_config(cfg)
    with pytest.raises(ConfigError, match=r"algo.rollout_is.*rollout.temperature=0"):
        compose_config(["experiment=debug_cpu", "algo.rollout_is=tis", "rollout.temperature=0"])
    compose_config(["experiment=debug_cpu", "rollout.temperature=0"])  # without TIS greedy training composes


def test_batch_divisibility_and_gpu_budget():
    with pytest.raises(ConfigError, match="learner.num_workers"):
        compose_config(["experiment=debug_cpu", "trainer.prompts_per_step=3", "rollout.group_size=5", "learner.num_workers=2"])
    with pytest.raises(ConfigError, match="rollout.num_workers"):
        compose_config(["experiment=debug_cpu", "trainer.prompts_per_step=3", "rollout.num_workers=2"])
    # GPU arithmetic: tests/test_placement.py


def test_actors_must_fit_the_local_cluster():
    cfg = compose_config(["experiment=debug_cpu", "ray.num_cpus=2"])  # composing checks the config alone
    with pytest.raises(ConfigError, match=r"ray.num_cpus.*= 2.5 CPUs"):
        check_config(cfg)
    with pytest.raises(ConfigError, match=r"retriever 2.5 \(num_replicas × num_cpus\).*= 4.5 CPUs"):
        check_config(compose_config(["experiment=debug_cpu", "retriever.num_replicas=5"]))
    # a remote retrieval service takes no local CPUs
    cfg = compose_config(["experiment=debug_cpu", "ray.num_cpus=2", "retriever.url=http://127.0.0.1:8000"])
    assert check_config(cfg) == [] and cfg.retriever.url == "http://127.0.0.1:8000"
    # joining a running cluster: its CPUs are Ray's to count
    check_config(compose_config(["experiment=debug_cpu", "ray.num_cpus=2", "ray.address=auto"]))


def test_train_cli_rejects_unknown_key_before_ray_starts(tmp_path):
    """The train entry point exits non-zero naming the key; no Ray session directory is created."""
    env_tmp = tmp_path / "ray_tmp"
    proc = subprocess.run(
        [sys.executable, "-m", "research_rl.train", "experiment=debug_cpu", "learner.learning_rate=1",
         f"trainer.output_dir={tmp_path / 'run'}"],
        capture_output=True, text=True, timeout=120, env={**__import__("os").environ, "RAY_TMPDIR": str(env_tmp)})
    assert proc.returncode != 0
    assert "learning_rate" in proc.stderr + proc.stdout
    assert not env_tmp.exists()
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_configuration_reference_is_generated_and_current(tmp_path, capsys):
    """docs/configuration.md is what the schema gives today, and it lists every key with its default."""
    from research_rl import config_reference

    assert config_reference.main(["--check"]) == 0, "regenerate: python -m research_rl.config_reference"
    text = config_reference.render()
    cfg = compose_config(["experiment=debug_cpu"])
    assert "| `retriever.timeout_s` | float | `30.0` |" in text
    assert "| `eval.judge.base_url` | str or null | `null` |" in text
    for section in ("model", "data", "retriever", "rollout", "algo", "learner", "trainer", "validation", "eval"):
        for name in vars(getattr(cfg, section)):
            assert f"`{section}.{name}`" in text, f"{section}.{name} missing from the reference"
    stale = tmp_path / "configuration.md"
    stale.write_text(text.replace("`30.0`", "`31.0`"))
    assert config_reference.main(["--check", "--out", str(stale)]) == 1
    assert "is stale" in capsys.readouterr().err


def test_deepspeed_backend_without_deepspeed_names_the_install_command(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "deepspeed" else real(name, *a))
    cfg = compose_config(["experiment=debug_cpu", "learner.backend=deepspeed"])
    with pytest.raises(ConfigError, match=r"learner.backend.*pip install -e '\.\[deepspeed\]'"):
        check_config(cfg)
    cfg = compose_config(["experiment=debug_cpu", "learner.backend=fsdp2"])  # fsdp2 never needs it
    assert check_config(cfg) == [] and cfg.learner.backend == "fsdp2"
