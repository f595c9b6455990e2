"""`lithos-ray status`: every node's GPUs, grants and clients, as a table or JSON.

The JSON schema is `ClusterStatus.model_json_schema()` (docs/STATUS_SCHEMA.json is generated from it).
"""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel

from .proto import agent_pb2 as pb

SCHEMA_ID = "lithos-ray/status/v1"
_PRIORITY_NAMES = {pb.LATENCY_CRITICAL: "latency_critical", pb.BEST_EFFORT: "best_effort"}


class LaunchReport(BaseModel):
    """A client's latest launches (real GPUs with the interposer): see agent.proto LaunchSummary."""
    launches: int
    window: int
    tpc: int
    cosched: int
    unconfined: int
    graph: int
    borrowing: int
    mean_tpcs: float


class ClientReport(BaseModel):
    grant_id: str
    pid: int
    name: str
    ray_job_id: str
    ray_task_id: str
    ray_actor_id: str
    priority: Literal["latency_critical", "best_effort"]
    slo_ms: float | None
    granted_tpcs: int
    tpc_ids: list[int]
    granted_at_unix_s: float
    launches: LaunchReport | None = None


class GpuReport(BaseModel):
    index: int
    uuid: str
    model: str
    simulated: bool
    sms: int
    total_tpcs: int
    granted_tpcs: int
    free_tpcs: int
    agent_address: str
    native_status: str
    clock_mhz: float | None = None     # NVML readings of real GPUs; None on simulated ones
    power_w: float | None = None
    energy_j: float | None = None
    busy_tpcs: int | None = None        # TPCs of clients launching now; None on simulated GPUs
    lent_tpcs: int | None = None        # TPCs of idle clients a busy client may borrow now
    tpc_lent_to: list[str | None] | None = None   # per TPC: grant id it is offered to; None on simulated GPUs
    clients: list[ClientReport]


class NodeReport(BaseModel):
    node_id: str
    node_ip: str
    gpus: list[GpuReport]


class ClusterStatus(BaseModel):
    schema_id: Literal["lithos-ray/status/v1"] = SCHEMA_ID
    dashboard_url: str | None = None      # the live lithos page, when the head node runs it
    nodes: list[NodeReport]


def gpu_report(s: pb.GpuStatus) -> GpuReport:
    clients = [
        ClientReport(
            grant_id=c.grant_id, pid=c.client.pid, name=c.client.name, ray_job_id=c.client.ray_job_id,
            ray_task_id=c.client.ray_task_id, ray_actor_id=c.client.ray_actor_id,
            priority=_PRIORITY_NAMES.get(c.priority, "best_effort"), slo_ms=c.slo_ms or None,
            granted_tpcs=len(c.tpc_ids), tpc_ids=list(c.tpc_ids), granted_at_unix_s=c.granted_at_unix_s,
            launches=_launch_report(c))
        for c in s.clients
    ]
    return GpuReport(index=s.gpu_index, uuid=s.gpu_uuid, model=s.gpu_model, simulated=s.simulated, sms=s.sms,
                     total_tpcs=s.total_tpcs, granted_tpcs=s.granted_tpcs, free_tpcs=s.free_tpcs,
                     agent_address=s.agent_address, native_status=s.native_status,
                     **{f: getattr(s, f) for f in ("clock_mhz", "power_w", "energy_j", "busy_tpcs", "lent_tpcs")
                        if s.HasField(f)},
                     tpc_lent_to=[g or None for g in s.tpc_lent_to] if s.HasField("busy_tpcs") else None,
                     clients=sorted(clients, key=lambda c: c.tpc_ids[:1]))


def _launch_report(c: pb.ClientStatus) -> LaunchReport | None:
    if not c.HasField("launches"):
        return None
    return LaunchReport(**{f: getattr(c.launches, f) for f in LaunchReport.model_fields})


def cluster_status(with_dashboard_url: bool = False) -> ClusterStatus:
    """Ask every agent of the cluster. Needs ray.init() to the cluster. with_dashboard_url: also ask
    the lithos page for its URL (for people; the page itself polls this every second)."""
    import ray

    from .client import agent_status, list_agents

    local = ray.get_runtime_context().get_node_id()
    nodes: dict[str, NodeReport] = {}
    for agent in list_agents():
        node = nodes.setdefault(agent.node_id, NodeReport(node_id=agent.node_id, node_ip=agent.node_ip, gpus=[]))
        node.gpus.append(gpu_report(agent_status(agent, local)))
    if not with_dashboard_url:
        return ClusterStatus(nodes=list(nodes.values()))
    from .dashboard import dashboard_url
    return ClusterStatus(nodes=list(nodes.values()), dashboard_url=dashboard_url())


def format_table(status: ClusterStatus) -> str:
    lines = []
    for node in status.nodes:
        lines.append(f"node {node.node_id[:12]} ({node.node_ip})")
        for g in node.gpus:
            tag = "SIMULATED" if g.simulated else "real"
            state = f"  busy {g.busy_tpcs:>3}  lent {g.lent_tpcs:>3}" if g.busy_tpcs is not None else ""
            lines.append(f"  GPU {g.index} {g.model:<9} [{tag}] TPCs total {g.total_tpcs:>3}  granted "
                         f"{g.granted_tpcs:>3}  free {g.free_tpcs:>3}{state}   {g.uuid}")
            lines.append(f"    enforcement: {g.native_status}")
            if not g.clients:
                lines.append("    (no clients)")
            for c in g.clients:
                who = c.ray_actor_id[:12] and f"actor {c.ray_actor_id[:12]}" or f"task {c.ray_task_id[:12]}"
                slo = f" slo {c.slo_ms:g} ms" if c.slo_ms else ""
                lines.append(f"    pid {c.pid:<7} {c.name[:24]:<24} {who:<19} {c.priority:<16} "
                             f"{c.granted_tpcs:>3} TPCs {_ranges(c.tpc_ids)}{slo}")
                if c.launches is not None:
                    lines.append("      " + _launch_line(c.launches))
    if status.dashboard_url:
        lines.append(f"lithos page: {status.dashboard_url}")
    return "\n".join(lines) if lines else "no lithos agents are registered in this Ray cluster"


def _launch_line(r: LaunchReport) -> str:
    """E.g. 'launches 120034; latest 4096: tpc 97%, unconfined 3%, borrowing 12%'."""
    if not r.window:
        return f"launches {r.launches}"
    shares = [f"{name} {count / r.window:.0%}" for name, count in
              (("tpc", r.tpc), ("cosched", r.cosched), ("unconfined", r.unconfined), ("graph", r.graph),
               ("borrowing", r.borrowing)) if count]
    return f"launches {r.launches}; latest {r.window}: " + ", ".join(shares) + f"; {r.mean_tpcs:.1f} TPCs per launch"


def _ranges(ids: list[int]) -> str:
    out, start = [], None
    for i, t in enumerate(ids):
        if start is None:
            start = t
        if i + 1 == len(ids) or ids[i + 1] != t + 1:
            out.append(f"{start}" if start == t else f"{start}-{t}")
            start = None
    return "[" + ",".join(out) + "]"
