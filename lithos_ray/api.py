"""What plain Ray cannot say: priority, SLO and a GPU of choice, next to the TPC count.

    @lithos_ray.remote(tpc=12, priority="latency_critical", slo_ms=50)
    class Service: ...

is `@ray.remote(resources={"lithos_tpc": 12}, runtime_env={"env_vars": {"LITHOS_PRIORITY": ...}})`
with every argument checked first. `ray_options(...)` returns the same options as a dict, for
`.options(**...)` or a Serve deployment's `ray_actor_options`.
"""
from __future__ import annotations

import copy

from .config import (ENV_ACQUIRE_TIMEOUT_S, ENV_GPU_INDEX, ENV_PRIORITY, ENV_SLO_MS, RESOURCE_NAME, make_request)
from .errors import LithosRequestError


def _check_fits_cluster(tpcs: int) -> None:
    """When connected to a lithos cluster, refuse a grant no single GPU of it can hold."""
    import ray

    if not ray.is_initialized():
        return
    from .client import list_agents

    agents = list_agents()
    if agents and tpcs > max(a.tpcs for a in agents):
        largest = max(agents, key=lambda a: a.tpcs)
        raise LithosRequestError(f"tpc={tpcs} is more than any GPU of this cluster has (largest: "
                                 f"{largest.model} with {largest.tpcs} TPCs); a grant lives on one GPU")


def ray_options(tpc: int, priority: str = "best_effort", slo_ms: float | None = None, gpu_index: int | None = None,
                acquire_timeout_s: float | None = None, **ray_kwargs) -> dict:
    if isinstance(tpc, bool) or not isinstance(tpc, int):
        raise LithosRequestError(f"tpc must be a whole number of TPCs (1 TPC = 2 SMs), got {tpc!r}")
    fields = dict(tpcs=tpc, priority=priority, slo_ms=slo_ms, gpu_index=gpu_index)
    if acquire_timeout_s is not None:
        fields["acquire_timeout_s"] = acquire_timeout_s
    request = make_request(**fields)
    _check_fits_cluster(request.tpcs)
    options = copy.deepcopy(ray_kwargs)
    resources = dict(options.pop("resources", None) or {})
    if RESOURCE_NAME in resources:
        raise LithosRequestError(f"give the TPC count as tpc=..., not also as resources={{'{RESOURCE_NAME}': ...}}")
    resources[RESOURCE_NAME] = request.tpcs
    options["resources"] = resources
    runtime_env = dict(options.pop("runtime_env", None) or {})
    env_vars = dict(runtime_env.get("env_vars") or {})
    env_vars[ENV_PRIORITY] = request.priority.value
    if request.slo_ms is not None:
        env_vars[ENV_SLO_MS] = repr(request.slo_ms)
    if request.gpu_index is not None:
        env_vars[ENV_GPU_INDEX] = str(request.gpu_index)
    if acquire_timeout_s is not None:
        env_vars[ENV_ACQUIRE_TIMEOUT_S] = repr(request.acquire_timeout_s)
    runtime_env["env_vars"] = env_vars
    options["runtime_env"] = runtime_env
    return options


def remote(function_or_class=None, *, tpc: int, priority: str = "best_effort", slo_ms: float | None = None,
           gpu_index: int | None = None, acquire_timeout_s: float | None = None, **ray_kwargs):
    """`ray.remote` for lithos clients: `@lithos_ray.remote(tpc=12, priority="latency_critical", slo_ms=50)`."""
    import ray

    options = ray_options(tpc, priority, slo_ms, gpu_index, acquire_timeout_s, **ray_kwargs)
    if function_or_class is not None:
        return ray.remote(**options)(function_or_class)
    return ray.remote(**options)
