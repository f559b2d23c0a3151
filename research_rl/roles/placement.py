"""Placement of the roles on a Ray cluster: a resource pool per role (``research_rl.config.pools``, checked by the
preflight before ``ray.init``), created as Ray placement groups after it (docs/cluster.md).

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
from pathlib import Path

from research_rl.config.pools import EPS, gpu_role_pools
from research_rl.config.schema import Config


class PlacementError(RuntimeError):
    """The running cluster cannot host the pools the config asks for (the message lists what it offers)."""


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


def write_report(path: str | Path, cfg: Config, roles: dict[str, list[dict]], sync: dict | None = None) -> str:
    """Write ``placement.json`` (mode, Ray namespace, the nodes with their CPU/GPU resources, per role the
    ``where()`` of each worker, and the weight sync's transport and wire dtype) and return a short table of the
    nodes each role landed on."""
    import ray

    nodes = {n["NodeID"]: {"ip": n["NodeManagerAddress"],
                           "resources": {k: v for k, v in n["Resources"].items()
                                         if k in ("CPU", "GPU", cfg.placement.gpu_resource)}}
             for n in ray.nodes() if n.get("Alive")}
    report = {"mode": cfg.placement.mode, "gpu_resource": cfg.placement.gpu_resource, "namespace": cfg.ray.namespace,
              "nodes": nodes, "roles": roles, "sync": sync}
    Path(path).write_text(json.dumps(report, indent=2))
    lines = ["placement:"]
    for role, workers in roles.items():
        per_node: dict[str, int] = {}
        for w in workers:
            per_node[w["node_id"][:8]] = per_node.get(w["node_id"][:8], 0) + 1
        lines.append(f"  {role:<9} " + ", ".join(f"{n} × node {nid}" for nid, n in per_node.items()))
    if sync:
        lines.append(f"  {'sync':<9} {sync['transport']} ({sync['dtype']})")
    return "\n".join(lines)
