"""Apply a placement plan on Ray: turn (replica -> planned GPU, reserved TPCs) into actor options.

Plain data in, plain dicts out; Ray itself is not imported. How a replica lands where the plan says:
- node: Ray's `ray.io/node-id` node label through `label_selector` when the node id is known (from
  the live status), else the built-in per-node resource `node:<node_ip>` (a tiny amount); Serve
  accepts both in `ray_actor_options` (it forbids `scheduling_strategy`);
- GPU: `runtime_env.env_vars.LITHOS_GPU_INDEX`, which makes the node's agent grant TPCs only on that
  GPU;
- TPCs: `resources={"lithos_tpc": reserved_tpcs}`; the reservations of one GPU add up to its TPCs, so
  Ray's node-level accounting never refuses a planned replica and no GPU is oversubscribed.
The replica's SLO goes along as LITHOS_SLO_MS.

Planned GPU indices (0, 1, ...) are mapped to real GPUs by `assign_plan_gpus` from a list of cluster
GPUs ({"node_ip", "gpu_index", "model", "tpcs"}); pass the previous assignment to keep replicas that
did not move on the same physical GPU after a re-plan.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

from .config import ENV_GPU_INDEX, ENV_SLO_MS, RESOURCE_NAME
from .errors import LithosRequestError
from .placement.planner import Placement, Plan
from .scheduler.gpu_models import lookup_model

NODE_RESOURCE_AMOUNT = 0.001
# ray 2.60 serve/_private/config.py: the only keys Serve accepts in ray_actor_options.
SERVE_ALLOWED_ACTOR_OPTIONS = frozenset({"accelerator_type", "memory", "num_cpus", "num_gpus", "resources",
                                         "runtime_env", "label_selector", "fallback_strategy"})


@dataclass(frozen=True)
class ClusterGpu:
    node_ip: str
    gpu_index: int
    model: str      # GPU model short name, e.g. "H100"
    tpcs: int
    node_id: str = ""   # when known, replicas target the node by Ray's `ray.io/node-id` label


NODE_ID_LABEL = "ray.io/node-id"


def cluster_gpus_from_status(status) -> list[ClusterGpu]:
    """The live cluster's GPUs from `lithos_ray.status.cluster_status()`."""
    return [ClusterGpu(node.node_ip, gpu.index, gpu.model, gpu.total_tpcs, node.node_id)
            for node in status.nodes for gpu in node.gpus]


def parse_cluster_gpus(entries: list[dict]) -> list[ClusterGpu]:
    """Validate the cluster's GPU list (dicts with node_ip, gpu_index, model, tpcs)."""
    gpus, seen = [], set()
    for position, entry in enumerate(entries):
        missing = {"node_ip", "gpu_index", "model", "tpcs"} - set(entry)
        if missing:
            raise LithosRequestError(f"cluster GPU #{position} lacks {sorted(missing)}; each entry needs "
                                     f"node_ip, gpu_index, model, tpcs")
        node_ip, gpu_index, tpcs = entry["node_ip"], entry["gpu_index"], entry["tpcs"]
        if not isinstance(node_ip, str) or not node_ip:
            raise LithosRequestError(f"cluster GPU #{position}: node_ip must be a non-empty string, got {node_ip!r}")
        if not isinstance(gpu_index, int) or gpu_index < 0:
            raise LithosRequestError(f"cluster GPU #{position}: gpu_index must be an integer >= 0, got {gpu_index!r}")
        if not isinstance(tpcs, int) or tpcs < 1:
            raise LithosRequestError(f"cluster GPU #{position}: tpcs must be an integer >= 1, got {tpcs!r}")
        try:
            model = lookup_model(str(entry["model"])).name
        except ValueError as error:
            raise LithosRequestError(f"cluster GPU #{position}: {error}") from None
        if (node_ip, gpu_index) in seen:
            raise LithosRequestError(f"cluster GPU {node_ip} #{gpu_index} is listed twice")
        seen.add((node_ip, gpu_index))
        gpus.append(ClusterGpu(node_ip, gpu_index, model, tpcs))
    return gpus


def assign_plan_gpus(plan: Plan, cluster_gpus: list[ClusterGpu],
                     previous_assignment: dict[int, tuple[str, int]] | None = None) -> dict[int, ClusterGpu]:
    """Planned GPU index -> cluster GPU. Only GPUs of the plan's model with at least its TPCs qualify;
    planned GPUs keep their previous (node_ip, gpu_index) where that GPU still qualifies and is free;
    the rest take free GPUs in (node_ip, gpu_index) order."""
    fitting = sorted((g for g in cluster_gpus if g.model == plan.gpu_model and g.tpcs >= plan.gpu_tpcs),
                     key=lambda g: (g.node_ip, g.gpu_index))
    planned = sorted({p.gpu_index for p in plan.placements})
    if len(planned) > len(fitting):
        raise LithosRequestError(f"the plan needs {len(planned)} {plan.gpu_model} GPUs with {plan.gpu_tpcs} "
                                 f"TPCs; the cluster has {len(fitting)}")
    by_location = {(g.node_ip, g.gpu_index): g for g in fitting}
    assignment: dict[int, ClusterGpu] = {}
    taken: set[tuple[str, int]] = set()
    for planned_gpu, location in (previous_assignment or {}).items():
        location = tuple(location)
        if planned_gpu in planned and location in by_location and location not in taken:
            assignment[planned_gpu] = by_location[location]
            taken.add(location)
    free = iter(g for g in fitting if (g.node_ip, g.gpu_index) not in taken)
    for planned_gpu in planned:
        if planned_gpu not in assignment:
            assignment[planned_gpu] = next(free)
    return assignment


def actor_options(placement: Placement, gpu: ClusterGpu, base_options: dict | None = None) -> dict:
    """Ray actor options that put this replica on `gpu` with its reserved TPCs (base options kept)."""
    options = copy.deepcopy(base_options or {})
    resources = dict(options.get("resources") or {})
    if RESOURCE_NAME in resources:
        raise LithosRequestError(f"base options already ask for {RESOURCE_NAME}; the plan sets it "
                                 f"({placement.reserved_tpcs} TPCs for {placement.item})")
    resources[RESOURCE_NAME] = placement.reserved_tpcs
    if gpu.node_id:   # exact even with several Ray nodes on one host
        options["label_selector"] = {**(options.get("label_selector") or {}), NODE_ID_LABEL: gpu.node_id}
    else:
        resources[f"node:{gpu.node_ip}"] = NODE_RESOURCE_AMOUNT
    options["resources"] = resources
    runtime_env = dict(options.get("runtime_env") or {})
    env_vars = dict(runtime_env.get("env_vars") or {})
    env_vars[ENV_GPU_INDEX] = str(gpu.gpu_index)
    env_vars[ENV_SLO_MS] = f"{placement.slo_ms:g}"
    runtime_env["env_vars"] = env_vars
    options["runtime_env"] = runtime_env
    return options


def plan_actor_options(plan: Plan, assignment: dict[int, ClusterGpu],
                       base_options_by_model: dict[str, dict] | None = None) -> dict[str, dict]:
    """Replica item name -> Ray actor options (for `ray.remote(...)` / `.options(...)`)."""
    base = base_options_by_model or {}
    return {p.item: actor_options(p, assignment[p.gpu_index], base.get(p.model)) for p in plan.placements}


def serve_deployment_name(placement: Placement) -> str:
    """Serve forbids '#' in deployment names; replica r of a split model becomes '<model>-replica-<r>'."""
    return placement.model if placement.replicas == 1 else f"{placement.model}-replica-{placement.replica_index}"


def serve_deployment_options(plan: Plan, assignment: dict[int, ClusterGpu],
                             base_options_by_model: dict[str, dict] | None = None) -> dict[str, dict]:
    """Deployment name -> kwargs for `serve.deployment(...)` / `.options(...)`: one deployment per
    planned replica (num_replicas=1), since the replicas of one model can sit on different GPUs."""
    base = base_options_by_model or {}
    deployments = {}
    for p in plan.placements:
        model_base = base.get(p.model) or {}
        not_allowed = sorted(set(model_base) - SERVE_ALLOWED_ACTOR_OPTIONS)
        if not_allowed:
            raise LithosRequestError(f"ray_actor_options for {p.model!r} has {not_allowed}, which Serve does "
                                     f"not accept; allowed: {sorted(SERVE_ALLOWED_ACTOR_OPTIONS)}")
        deployments[serve_deployment_name(p)] = {
            "name": serve_deployment_name(p),
            "num_replicas": 1,
            "ray_actor_options": actor_options(p, assignment[p.gpu_index], model_base),
        }
    return deployments
