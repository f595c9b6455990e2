"""Runs inside every Ray worker of a lithos node (loaded by lithos_ray/_bootstrap/sitecustomize.py).

Wraps the function Ray is about to execute: when the task or actor was scheduled with `lithos_tpc`,
get a grant on one GPU first and pin the process to it (before user code can initialise CUDA);
release it when a task returns. A task that holds lithos TPCs runs in a fresh worker (max_calls=1,
what Ray does for GPU tasks), so its CUDA context dies with it; an actor keeps its grant for life,
and the agent reaps it when the process exits, kill -9 included.
"""
from __future__ import annotations

import functools
import logging

from .config import RESOURCE_NAME, request_from_env
from .errors import LithosRequestError

logger = logging.getLogger(__name__)
_installed = False


def _acquire_and_pin(tpcs: float, name: str, is_actor: bool):
    import ray
    from . import client

    if ray.get_runtime_context().get_assigned_resources().get("GPU"):
        raise LithosRequestError("do not combine num_gpus with lithos_tpc: lithos owns the GPUs of its nodes")
    request = request_from_env(tpcs)
    node_id = ray.get_runtime_context().get_node_id()
    grant = client.acquire(request, client.list_agents(node_id), name=name)
    client.pin_current_process(grant, release_at_exit=is_actor)
    logger.info("lithos: %s got %d TPCs on GPU %d (%s)", name, grant.tpcs, grant.gpu_index, grant.gpu_uuid)
    return grant


def _wrap(info, descriptor):
    import ray
    from . import client

    tpcs = ray.get_runtime_context().get_assigned_resources().get(RESOURCE_NAME)
    is_actor = descriptor.is_actor_method()
    if not tpcs or (is_actor and descriptor.function_name != "__init__"):
        return info
    function, name = info.function, descriptor.function_name
    if is_actor:
        name = f"{descriptor.class_name}"

    @functools.wraps(function)
    def run_with_grant(*args, **kwargs):
        _acquire_and_pin(tpcs, name, is_actor)
        if is_actor:
            return function(*args, **kwargs)
        try:
            return function(*args, **kwargs)
        finally:
            client.unpin_current_process()

    return info._replace(function=run_with_grant, max_calls=info.max_calls if is_actor else 1)


def install() -> None:
    global _installed
    if _installed:
        return
    from ray._private import function_manager

    original = function_manager.FunctionActorManager.get_execution_info

    def get_execution_info(self, job_id, function_descriptor):
        return _wrap(original(self, job_id, function_descriptor), function_descriptor)

    function_manager.FunctionActorManager.get_execution_info = get_execution_info
    _installed = True
