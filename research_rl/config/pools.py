"""The GPU pools each role asks for, and the arithmetic that checks them against the cluster the config describes
(``placement.nnodes`` × ``placement.gpus_per_node``). Pure: config in, notes or ``ConfigError`` out; it runs in the
preflight before ``ray.init`` (``research_rl.config.preflight.check_config``), and ``research_rl.roles.placement``
builds the Ray placement groups from the same ``gpu_role_pools`` after it (docs/cluster.md).
"""

from __future__ import annotations

from dataclasses import dataclass

from research_rl.config.schema import Config, ConfigError

EPS = 1e-6


@dataclass(frozen=True)
class Pool:
    """The demand of one GPU role: ``workers`` × (``gpus_per_worker`` GPUs, ``cpus_per_worker`` CPUs)."""

    role: str
    workers: int
    gpus_per_worker: float
    cpus_per_worker: float

    @property
    def gpus(self) -> float:
        return self.workers * self.gpus_per_worker


def gpu_role_pools(cfg: Config) -> list[Pool]:
    """Learner, rollout and (when separate) reference demands from the config, in that order."""
    pools = [Pool("learner", cfg.learner.num_workers, cfg.learner.num_gpus_per_worker, cfg.learner.num_cpus_per_worker),
             Pool("rollout", cfg.rollout.num_workers, cfg.rollout.num_gpus_per_worker, cfg.rollout.num_cpus_per_worker)]
    ref = cfg.reference
    if ref.placement == "separate":
        pools.append(Pool("reference", ref.num_workers, ref.num_gpus_per_worker, ref.num_cpus_per_worker))
    return pools


def vllm_sleep_level(cfg: Config) -> int:
    """The level the vLLM engines sleep at between rollouts (research_rl/rollout/vllm_engine.py): an explicit
    ``rollout.vllm_sleep_level`` (0, 1 or 2) as given; null (auto) means 2 in ``placement.mode=colocated``, where
    the learner needs the GPU memory during the update and the next sync rewrites every weight (level 1 would copy
    the weights to pinned host memory only to overwrite them; verl sleeps at 2 too: ``VLLM_SLEEP_LEVEL`` in
    verl/third_party/vllm/__init__.py, 1 only with LoRA), and 0 in ``disaggregated``, where nothing else uses the
    rollout GPUs, or under ``trainer.schedule`` one_step_off or async, where the engines generate while the
    learner trains."""
    level = cfg.rollout.vllm_sleep_level
    if level is not None:
        return level
    return 2 if cfg.placement.mode == "colocated" and cfg.trainer.schedule == "sync" else 0


def check_placement(cfg: Config) -> list[str]:
    """Check that the GPU roles fit ``placement.nnodes`` × ``placement.gpus_per_node``; runs before ``ray.init``.

    Returns notes worth printing (GPUs left idle). Raises:
        ConfigError: the pools do not add up; the message shows the arithmetic and names the key to change.
    """
    p = cfg.placement
    total = p.nnodes * p.gpus_per_node
    cluster = f"placement.nnodes={p.nnodes} × placement.gpus_per_node={p.gpus_per_node} = {total} GPUs"
    pools = gpu_role_pools(cfg)
    if p.gpus_per_node == 0:
        for pool in pools:
            if pool.gpus_per_worker > 0:
                raise ConfigError(f"{pool.role}.num_gpus_per_worker",
                                  f"{pool.gpus_per_worker:g} GPUs per worker but {cluster}; set placement.nnodes and "
                                  "placement.gpus_per_node to the cluster's GPU nodes")
        return []
    if cfg.ray.address is None and p.nnodes > 1:
        raise ConfigError("placement.nnodes", f"{p.nnodes} GPU nodes, but ray.address=null starts a local one-node "
                          "cluster; set ray.address (auto or host:port) to run on a multi-node cluster")
    if p.mode == "colocated":
        roles = " + ".join(pool.role for pool in pools)
        for pool in pools:
            if abs(pool.gpus_per_worker - 1) > EPS:
                raise ConfigError(f"{pool.role}.num_gpus_per_worker",
                                  f"placement.mode=colocated gives each {pool.role} worker one GPU, shared by {roles}; "
                                  f"got {pool.gpus_per_worker:g}. Use 1, or placement.mode=disaggregated for workers "
                                  "with more or less than one GPU")
            if pool.workers != total:
                raise ConfigError(f"{pool.role}.num_workers",
                                  f"placement.mode=colocated puts one {pool.role} worker on every GPU: {cluster}, but "
                                  f"{pool.role}.num_workers={pool.workers}")
        return []
    gpu_pools = [pool for pool in pools if pool.gpus_per_worker > 0]
    terms = " + ".join(f"{pool.role} {pool.workers} × {pool.gpus_per_worker:g}" for pool in gpu_pools) or "0"
    need = sum(pool.gpus for pool in gpu_pools)
    if need > total + EPS:
        raise ConfigError("placement.gpus_per_node",
                          f"placement.mode=disaggregated needs {terms} = {need:g} GPUs (num_workers × "
                          f"num_gpus_per_worker per role) but {cluster}")
    for pool in gpu_pools:
        if pool.gpus_per_worker > p.gpus_per_node + EPS:
            raise ConfigError(f"{pool.role}.num_gpus_per_worker",
                              f"a worker's GPUs are on one node: {pool.role}.num_gpus_per_worker="
                              f"{pool.gpus_per_worker:g} > placement.gpus_per_node={p.gpus_per_node}")
    free = [float(p.gpus_per_node)] * p.nnodes  # first-fit decreasing, as a node-by-node check of the sum
    for role, g in sorted(((pool.role, pool.gpus_per_worker) for pool in gpu_pools for _ in range(pool.workers)),
                          key=lambda x: -x[1]):
        node = next((i for i, f in enumerate(free) if f + EPS >= g), None)
        if node is None:
            raise ConfigError("placement.gpus_per_node",
                              f"the pools fit in total ({terms} = {need:g} ≤ {total}) but not node by node: a "
                              f"{role} worker of {g:g} GPUs finds no node with that many free "
                              f"({p.gpus_per_node} per node); make num_gpus_per_worker divide placement.gpus_per_node")
        free[node] -= g
    if need < total - EPS:
        return [f"placement: {total - need:g} of {total} GPUs stay idle ({terms} = {need:g} of {cluster})"]
    return []
