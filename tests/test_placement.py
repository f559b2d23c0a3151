"""Placement arithmetic, checked before ray.init: the message shows the sums when the GPUs do not add up.

Where roles actually land on a two-node cluster is tested in tests/test_cluster.py."""

from __future__ import annotations

import pytest

from research_rl.config.compose import compose_config
from research_rl.config.pools import check_placement
from research_rl.config.preflight import check_config
from research_rl.config.schema import ConfigError
from research_rl.roles.placement import Placement

pytestmark = pytest.mark.unit

PAPER = "experiment=research_qwen2.5_7b_instruct"


def compose_checked(overrides: list[str]):
    """The config as ``python -m research_rl.train`` sees it after the preflight's config checks."""
    cfg = compose_config(overrides)
    check_config(cfg)
    return cfg


def test_paper_recipe_fits_its_cluster():
    cfg = compose_config([PAPER])
    assert check_placement(cfg) == []
    bundles = Placement(cfg).bundles()
    assert list(bundles) == ["colocated"] and len(bundles["colocated"]) == 64  # 8 nodes × 8 GPUs
    assert bundles["colocated"][0] == {"CPU": 2.0, "GPU": 1}  # a learner rank and a rollout engine per GPU


def test_disaggregated_oversubscription_shows_the_sum():
    with pytest.raises(ConfigError, match=r"learner 64 × 1 \+ rollout 64 × 1 = 128 GPUs.*"
                                          r"placement.nnodes=8 × placement.gpus_per_node=8 = 64 GPUs") as e:
        compose_checked([PAPER, "placement.mode=disaggregated"])
    assert e.value.key == "placement.gpus_per_node"


def test_disaggregated_pools_and_idle_gpus():
    cfg = compose_config([PAPER, "placement.mode=disaggregated", "learner.num_workers=32", "rollout.num_workers=16",
                          "rollout.num_gpus_per_worker=2"])
    assert check_placement(cfg) == []
    bundles = Placement(cfg).bundles()
    assert len(bundles["learner"]) == 32 and bundles["rollout"][0] == {"CPU": 1.0, "GPU": 2}
    cfg = compose_config([PAPER, "placement.mode=disaggregated", "learner.num_workers=32", "rollout.num_workers=16"])
    assert check_placement(cfg) == [
        "placement: 16 of 64 GPUs stay idle (learner 32 × 1 + rollout 16 × 1 = 48 of placement.nnodes=8 × "
        "placement.gpus_per_node=8 = 64 GPUs)"]


def test_pools_that_fit_in_sum_but_not_node_by_node():
    # 3 workers of 2 GPUs on 2 nodes of 3 GPUs: 6 ≤ 6 in total, but each node holds one
    with pytest.raises(ConfigError, match=r"not node by node: a .* worker of 2 GPUs"):
        compose_checked([PAPER, "placement.mode=disaggregated", "placement.nnodes=2", "placement.gpus_per_node=3",
                         "learner.num_workers=1", "learner.num_gpus_per_worker=2", "rollout.num_workers=2",
                         "rollout.num_gpus_per_worker=2", "trainer.prompts_per_step=4"])
    with pytest.raises(ConfigError, match=r"rollout.num_gpus_per_worker=16 > placement.gpus_per_node=8"):
        compose_checked([PAPER, "placement.mode=disaggregated", "learner.num_workers=16", "rollout.num_workers=2",
                         "rollout.num_gpus_per_worker=16"])


def test_colocated_needs_one_worker_of_each_role_per_gpu():
    with pytest.raises(ConfigError, match=r"one learner worker on every GPU: placement.nnodes=8 × "
                                          r"placement.gpus_per_node=8 = 64 GPUs, but learner.num_workers=32") as e:
        compose_checked([PAPER, "learner.num_workers=32"])
    assert e.value.key == "learner.num_workers"
    with pytest.raises(ConfigError, match=r"shared by learner \+ rollout; got 2"):
        compose_checked([PAPER, "rollout.num_gpus_per_worker=2"])


def test_separate_reference_takes_a_third_of_each_gpu():
    cfg = compose_config([PAPER, "reference.placement=separate", "reference.num_workers=64",
                          "reference.num_gpus_per_worker=1"])
    p = Placement(cfg)
    assert p.bundles()["colocated"][0] == {"CPU": 3.0, "GPU": 1}
    p.groups["colocated"] = object()  # stands in for the placement group: only the options' arithmetic is checked
    shares = [p.options(role, 0)["num_gpus"] for role in ("learner", "rollout", "reference")]
    assert shares == [0.3333] * 3 and sum(shares) <= 1


def test_cpu_only_config_with_gpu_workers_fails_naming_the_key():
    with pytest.raises(ConfigError, match=r"1 GPUs per worker but placement.nnodes=1 × placement.gpus_per_node=0") as e:
        compose_checked(["experiment=debug_cpu", "learner.num_gpus_per_worker=1"])
    assert e.value.key == "learner.num_gpus_per_worker"
    with pytest.raises(ConfigError, match="ray.address=null starts a local one-node cluster"):
        compose_checked([PAPER, "ray.address=null"])


def test_custom_gpu_resource_is_requested_instead_of_gpus():
    cfg = compose_checked(["experiment=debug_cpu", "placement.gpus_per_node=2", "placement.gpu_resource=fake_gpu",
                           "learner.num_workers=2", "rollout.num_workers=2", "learner.num_gpus_per_worker=1",
                           "rollout.num_gpus_per_worker=1", "ray.num_cpus=5"])
    p = Placement(cfg)
    assert p.bundles() == {"colocated": [{"CPU": 2.0, "fake_gpu": 1}] * 2}
    p.groups["colocated"] = object()
    opts = p.options("learner", 1)
    assert opts["num_gpus"] == 0 and opts["resources"] == {"fake_gpu": 0.5} and opts["num_cpus"] == 1.0
    assert opts["scheduling_strategy"].placement_group_bundle_index == 1
