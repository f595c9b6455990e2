"""Client side of a grant: find this node's GPU agents, get TPCs on one GPU, pin the process to it.

Used by the Ray worker hook (plain `resources={"lithos_tpc": N}`) and by `lithos-ray run`. Runs once
per task or actor start, never per kernel launch.
"""
from __future__ import annotations

import atexit
import logging
import os
import time
from dataclasses import dataclass

import grpc

from .config import NAMESPACE, ClientRequest, Priority
from .errors import LithosNotRunning, LithosPlacementTimeout, LithosRequestError
from .proto import agent_pb2 as pb
from .proto import agent_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)

AGENT_NAME_PREFIX = "lithos-gpu"
PROGRESS_EVERY_S = 10.0
_PRIORITY_PB = {Priority.LATENCY_CRITICAL: pb.LATENCY_CRITICAL, Priority.BEST_EFFORT: pb.BEST_EFFORT}


def agent_name(node_id: str, gpu_index: int) -> str:
    return f"{AGENT_NAME_PREFIX}:{node_id}:{gpu_index}"


@dataclass(frozen=True)
class AgentRef:
    node_id: str
    node_ip: str
    port: int
    index: int
    uuid: str
    model: str
    tpcs: int
    simulated: bool

    def target(self) -> str:
        """gRPC address; the agent listens on loopback, so only processes of its node use it."""
        return f"127.0.0.1:{self.port}"


@dataclass(frozen=True)
class Grant:
    grant_id: str
    gpu_uuid: str
    gpu_index: int
    gpu_model: str
    simulated: bool
    tpc_ids: tuple[int, ...]
    slot: int
    shm_path: str
    agent_target: str

    @property
    def tpcs(self) -> int:
        return len(self.tpc_ids)


def list_agents(node_id: str | None = None) -> list[AgentRef]:
    """Agents of one node (or of the whole cluster), from Ray's named actors. Needs ray.init()."""
    import ray

    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a.get("namespace") == NAMESPACE and a["name"].startswith(AGENT_NAME_PREFIX + ":")]
    if node_id is not None:
        names = [n for n in names if n.split(":")[1] == node_id]
    refs = []
    deadline = time.monotonic() + 60
    for name in names:
        while True:   # an agent that is restarting answers again within seconds
            try:
                handle = ray.get_actor(name, namespace=NAMESPACE)
                refs.append(AgentRef(**ray.get(handle.describe.remote(), timeout=60)))
                break
            except ray.exceptions.ActorUnavailableError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
            except (ray.exceptions.ActorDiedError, ValueError) as exc:   # gone for good
                logger.warning("lithos: skipping agent %s: %s", name, exc)
                break
    return sorted(refs, key=lambda r: (r.node_id, r.index))


def _stub(target: str) -> pb_grpc.GpuAgentStub:
    return pb_grpc.GpuAgentStub(grpc.insecure_channel(target))


def agent_status(agent: AgentRef, local_node_id: str | None = None, timeout_s: float = 10.0) -> pb.GpuStatus:
    """Over gRPC on the agent's node, through the agent actor from any other node."""
    if local_node_id == agent.node_id:
        return _stub(agent.target()).Status(pb.StatusRequest(), timeout=timeout_s)
    import ray
    handle = ray.get_actor(agent_name(agent.node_id, agent.index), namespace=NAMESPACE)
    return pb.GpuStatus.FromString(ray.get(handle.status_proto.remote(), timeout=timeout_s))


def _identity(name: str) -> pb.ClientIdentity:
    from .agent import process_start_ticks

    ident = pb.ClientIdentity(pid=os.getpid(), pid_start_ticks=process_start_ticks(os.getpid()) or 0, name=name)
    try:
        import ray
        if ray.is_initialized():
            ctx = ray.get_runtime_context()
            ident.ray_job_id = ctx.get_job_id() or ""
            ident.ray_actor_id = ctx.get_actor_id() or ""
            ident.ray_task_id = ctx.get_task_id() or ""
    except Exception:  # identity is informational
        pass
    return ident


def acquire(request: ClientRequest, agents: list[AgentRef], name: str = "") -> Grant:
    """Get request.tpcs TPCs on one GPU among `agents`; wait for room up to request.acquire_timeout_s."""
    if not agents:
        raise LithosNotRunning("no lithos GPU agent runs on this node; start lithos with `lithos-ray start`")
    if request.gpu_index is not None:
        agents = [a for a in agents if a.index == request.gpu_index]
        if not agents:
            raise LithosRequestError(f"LITHOS_GPU_INDEX={request.gpu_index}: this node has no lithos GPU with that index")
    largest = max(a.tpcs for a in agents)
    if request.tpcs > largest:
        models = ", ".join(sorted({f"{a.model} ({a.tpcs} TPCs)" for a in agents}))
        raise LithosRequestError(
            f"lithos_tpc={request.tpcs} does not fit on one GPU of this node ({models}); a grant lives on one "
            f"GPU, so ask for at most {largest} TPCs")
    identity = _identity(name)
    free = {a.index: a.tpcs for a in agents}
    deadline = time.monotonic() + request.acquire_timeout_s
    next_progress = time.monotonic() + PROGRESS_EVERY_S
    delay_s = 0.02
    while True:
        # Best fit: the GPU with the least room that still fits goes first.
        for agent in sorted(agents, key=lambda a: (free[a.index] < request.tpcs, free[a.index])):
            reply = _stub(agent.target()).Acquire(
                pb.AcquireRequest(tpcs=request.tpcs, priority=_PRIORITY_PB[request.priority],
                                  slo_ms=request.slo_ms or 0.0, client=identity), timeout=30)
            free[agent.index] = reply.free_tpcs
            if reply.granted:
                g = reply.grant
                return Grant(g.grant_id, g.gpu_uuid, g.gpu_index, g.gpu_model, g.simulated, tuple(g.tpc_ids),
                             g.slot, g.shm_path, agent.target())
        now = time.monotonic()
        room = ", ".join(f"GPU {i}: {f} free" for i, f in sorted(free.items()))
        if now >= deadline:
            raise LithosPlacementTimeout(
                f"no GPU of this node had {request.tpcs} free TPCs within {request.acquire_timeout_s:g} s ({room}); "
                f"the node may have enough TPCs in total, but a grant must fit on one GPU. Raise the wait with "
                f"LITHOS_ACQUIRE_TIMEOUT_S or ask for fewer TPCs")
        if now >= next_progress:
            logger.warning("lithos: waiting for %d TPCs on one GPU (%s); %.0f s left",
                           request.tpcs, room, deadline - now)
            next_progress = now + PROGRESS_EVERY_S
        time.sleep(min(delay_s, max(0.0, deadline - now)))
        delay_s = min(delay_s * 2, 0.5)


def release(grant: Grant) -> bool:
    try:
        return _stub(grant.agent_target).Release(pb.ReleaseRequest(grant_id=grant.grant_id), timeout=10).released
    except grpc.RpcError as exc:  # the agent reaps grants of dead processes anyway
        logger.warning("lithos: could not release grant %s: %s", grant.grant_id, exc.code())
        return False


# -- this process's grant -----------------------------------------------------------------------
_current: Grant | None = None


def grant_env(grant: Grant) -> dict[str, str]:
    """What a granted process sees: only its GPU, and where the shim finds its allowance."""
    env = {
        "CUDA_VISIBLE_DEVICES": grant.gpu_uuid,
        "LITHOS_GRANT_ID": grant.grant_id,
        "LITHOS_GPU_UUID": grant.gpu_uuid,
        "LITHOS_GPU_MODEL": grant.gpu_model,
        "LITHOS_TPC_IDS": ",".join(map(str, grant.tpc_ids)),
        "LITHOS_SIMULATED": "1" if grant.simulated else "0",
    }
    if grant.shm_path:   # the shim's allowance table and slot, and the shim itself
        from . import native
        env.update(native.client_env(grant.shm_path, grant.slot))
    return env


def cuda_already_initialised() -> bool:
    import sys
    torch = sys.modules.get("torch")
    return bool(torch is not None and torch.cuda.is_initialized())


def pin_current_process(grant: Grant, release_at_exit: bool) -> None:
    global _current
    if cuda_already_initialised():
        release(grant)
        raise LithosRequestError(
            "CUDA is already initialised in this worker process, so it cannot be pinned to its lithos GPU; "
            "do not touch CUDA in a process before it receives a lithos_tpc grant")
    os.environ.update(grant_env(grant))
    _current = grant
    if release_at_exit:
        atexit.register(release, grant)


def unpin_current_process() -> None:
    global _current
    if _current is not None:
        release(_current)
        _current = None


def current_grant() -> Grant | None:
    """This process's lithos grant, or None."""
    return _current
