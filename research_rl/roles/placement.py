"""Placement of the roles on a Ray cluster: a resource pool per role, checked before ``ray.init``, created as Ray
placement groups after it (docs/cluster.md).

Roles and their pools:

- ``learner`` (``learner.num_workers`` ranks), ``rollout`` (``rollout.num_workers`` engines) and, when
  ``reference.placement=separate``, ``reference`` (``reference.num_workers`` ranks) run on the GPU nodes,
  ``placement.nnodes`` × ``placement.gpus_per_node`` GPUs.
  ``placement.mode=colocated``: one pool with a bundle per GPU; every GPU hosts one worker of each of these roles,
  each asking Ray for an equal share of it (1/2, or 1/3 with a separate reference), like verl's hybrid engine.
  ``placement.mode=disaggregated``: a pool per role, ``num_workers`` bundles of ``num_gpus_per_worker`` GPUs; a role
  with ``num_gpus_per_worker=0`` runs on CPUs outside any pool.
- ``retriever`` replicas ask for CPUs only. With ``placement.retriever_nodes=cpu_only`` (default) they prefer the
  nodes that have no ``placement.gpu_resource`` (a node-affinity preference, falling back to any node when those are
  full); on a cluster without such nodes they are spread over all nodes.

``placement.gpu_resource`` names the Ray resource counted as a GPU: ``GPU`` on real clusters; a custom resource
(``ray start --resources '{"fake_gpu": 2}'``) stands in for GPUs on a CPU machine, e.g. to test multi-node placement.
With ``placement.gpus_per_node=0`` (debug mode) no placement group is made and actors ask for CPUs only.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

from research_rl.config.schema import Config, ConfigError

EPS = 1e-6


class PlacementError(RuntimeError):
    """The running cluster cannot host the pools the config asks for (the message lists what it offers)."""


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


class Placement:
    """The pools on the running cluster: placement groups and the Ray actor options of every worker.

    Use after ``ray.init``: ``create()`` (waits up to ``placement.timeout_s`` for the cluster to grant the pools),
    then ``options(role, index)`` for each GPU-role worker and ``retriever_options(n)``; ``remove()`` at the end.
    """

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.p = cfg.placement
        self.pools = {pool.role: pool for pool in gpu_role_pools(cfg)}
        self.groups: dict[str, object] = {}  # role (or "colocated") -> PlacementGroup

    # ------------------------------------------------------------ pools
    def _resources(self, gpus: float, cpus: float) -> dict:
        out = {"CPU": cpus} if cpus > 0 else {}
        if gpus > 0:
            out[self.p.gpu_resource] = gpus
        return out

    def bundles(self) -> dict[str, list[dict]]:
        """The placement groups to make: name -> bundles (``{resource: amount}``); empty on a CPU-only config."""
        if self.p.gpus_per_node == 0:
            return {}
        if self.p.mode == "colocated":
            cpus = sum(pool.cpus_per_worker for pool in self.pools.values())
            return {"colocated": [self._resources(1, cpus) for _ in range(self.p.nnodes * self.p.gpus_per_node)]}
        return {pool.role: [self._resources(pool.gpus_per_worker, pool.cpus_per_worker)] * pool.workers
                for pool in self.pools.values() if pool.gpus_per_worker > 0}

    def create(self) -> None:
        """Make the placement groups and wait for them.

        Raises:
            PlacementError: the cluster has fewer ``gpu_resource`` than the pools need, or did not grant them within
                ``placement.timeout_s`` (the message lists the cluster's resources).
        """
        import ray
        from ray.util.placement_group import placement_group

        wanted = self.bundles()
        if not wanted:
            return
        need = sum(b.get(self.p.gpu_resource, 0) for bundles in wanted.values() for b in bundles)
        have = ray.cluster_resources().get(self.p.gpu_resource, 0)
        if have + EPS < need:
            raise PlacementError(f"the pools need {need:g} {self.p.gpu_resource} but the cluster has {have:g} "
                                 f"({self._cluster_summary()}); check placement.gpus_per_node, placement.nnodes and "
                                 "placement.gpu_resource against `ray status`")
        for name, bundles in wanted.items():
            self.groups[name] = placement_group(bundles, strategy=self.p.strategy, name=f"research_rl_{name}")
        deadline = time.time() + self.p.timeout_s
        for name, pg in self.groups.items():
            if not pg.wait(max(1, int(deadline - time.time()))):
                raise PlacementError(f"the {name} pool ({len(wanted[name])} bundles of {wanted[name][0]}, strategy "
                                     f"{self.p.strategy}) was not granted within placement.timeout_s="
                                     f"{self.p.timeout_s:g}; the cluster: {self._cluster_summary()}")

    def _cluster_summary(self) -> str:
        import ray

        nodes = [n for n in ray.nodes() if n.get("Alive")]
        parts = []
        for n in nodes:
            res = {k: v for k, v in n["Resources"].items() if k in ("CPU", "GPU", self.p.gpu_resource)}
            parts.append(f"{n['NodeManagerAddress']} {res}")
        return f"{len(nodes)} nodes: " + "; ".join(parts)

    def remove(self) -> None:
        from ray.util.placement_group import remove_placement_group

        for pg in self.groups.values():
            try:
                remove_placement_group(pg)
            except Exception:  # the cluster may already be gone
                pass
        self.groups.clear()

    # ------------------------------------------------------------ actor options
    def role_options(self, role: str, n: int) -> list[dict]:
        """``options(role, i)`` of workers ``0 .. n-1`` (what ``WorkerGroup.start`` takes)."""
        return [self.options(role, i) for i in range(n)]

    def options(self, role: str, index: int) -> dict:
        """Ray actor options for worker ``index`` of ``role`` (learner, rollout or reference).

        Colocated: bundle ``index`` (its GPU), an equal share of that GPU, the role's CPUs. Disaggregated: bundle
        ``index`` of the role's own pool. CPU-only: CPUs only.
        """
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        pool = self.pools[role]
        group = self.groups.get("colocated" if self.p.mode == "colocated" else role)
        if group is None:
            return {"num_cpus": pool.cpus_per_worker, "num_gpus": 0}
        # colocated: equal shares of the bundle's GPU, rounded down to Ray's resource precision (1e-4)
        share = math.floor(1e4 / len(self.pools)) / 1e4 if self.p.mode == "colocated" else pool.gpus_per_worker
        opts = {"num_cpus": pool.cpus_per_worker,
                "scheduling_strategy": PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=index)}
        if self.p.gpu_resource == "GPU":
            opts["num_gpus"] = share
        else:
            opts.update(num_gpus=0, resources={self.p.gpu_resource: share})
        return opts

    def retriever_options(self, replicas: int) -> list[dict]:
        """Scheduling options per retriever replica: node affinity (soft) to the CPU-only nodes, round robin, when
        ``placement.retriever_nodes=cpu_only`` and the cluster has both kinds of node; ``{}`` (Ray decides, spread
        when several replicas) otherwise."""
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        nodes = [n for n in ray.nodes() if n.get("Alive")]
        cpu_only = [n["NodeID"] for n in nodes if n["Resources"].get(self.p.gpu_resource, 0) == 0
                    and n["Resources"].get("CPU", 0) > 0]
        if self.p.retriever_nodes != "cpu_only" or not cpu_only or len(cpu_only) == len(nodes):
            return [{} for _ in range(replicas)]
        return [{"scheduling_strategy": NodeAffinitySchedulingStrategy(cpu_only[i % len(cpu_only)], soft=True)}
                for i in range(replicas)]


def where() -> dict:
    """Where the calling actor runs: node id and IP, pid, and the resources Ray assigned it (for placement.json)."""
    import os

    import ray

    ctx = ray.get_runtime_context()
    return {"node_id": ctx.get_node_id(), "ip": ray.util.get_node_ip_address(), "pid": os.getpid(),
            "resources": {k: round(v, 4) for k, v in ctx.get_assigned_resources().items()}}


def write_report(path: str | Path, cfg: Config, roles: dict[str, list[dict]]) -> str:
    """Write ``placement.json`` (mode, Ray namespace, the nodes with their CPU/GPU resources, and per role the
    ``where()`` of each worker) and return a short table of the nodes each role landed on."""
    import ray

    nodes = {n["NodeID"]: {"ip": n["NodeManagerAddress"],
                           "resources": {k: v for k, v in n["Resources"].items()
                                         if k in ("CPU", "GPU", cfg.placement.gpu_resource)}}
             for n in ray.nodes() if n.get("Alive")}
    report = {"mode": cfg.placement.mode, "gpu_resource": cfg.placement.gpu_resource, "namespace": cfg.ray.namespace,
              "nodes": nodes, "roles": roles}
    Path(path).write_text(json.dumps(report, indent=2))
    lines = ["placement:"]
    for role, workers in roles.items():
        per_node: dict[str, int] = {}
        for w in workers:
            per_node[w["node_id"][:8]] = per_node.get(w["node_id"][:8], 0) + 1
        lines.append(f"  {role:<9} " + ", ".join(f"{n} × node {nid}" for nid, n in per_node.items()))
    return "\n".join(lines)
