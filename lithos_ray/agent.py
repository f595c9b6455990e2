"""The per-GPU agent: owns one GPU's TPC grants, serves the gRPC control plane, reaps dead clients.

`GpuAgentCore` is plain Python (tests drive it directly); `GpuAgentActor` hosts it in a detached,
node-pinned Ray actor with num_cpus=0 and restarts; the grant table is persisted to the node's state
directory after every change, so a restarted agent keeps every live grant and drops dead ones.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from concurrent import futures
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc

from .config import Priority
from .proto import agent_pb2 as pb
from .proto import agent_pb2_grpc as pb_grpc
from .scheduler.allocator import TpcAllocator
from .scheduler.device import Device

logger = logging.getLogger(__name__)

REAP_INTERVAL_S = 0.1
MAX_CLIENTS_PER_GPU = 64   # slots of the shared-memory allowance table (LITHOS_DEFAULT_SLOTS)
_PRIORITY_TO_PB = {Priority.LATENCY_CRITICAL.value: pb.LATENCY_CRITICAL, Priority.BEST_EFFORT.value: pb.BEST_EFFORT}
_PB_TO_PRIORITY = {v: k for k, v in _PRIORITY_TO_PB.items()}


def process_start_ticks(pid: int) -> int | None:
    """Start time of a live process (field 22 of /proc/<pid>/stat), None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


@dataclass
class GrantRecord:
    grant_id: str
    tpc_ids: tuple[int, ...]
    slot: int
    priority: str
    slo_ms: float
    pid: int
    pid_start_ticks: int
    ray_task_id: str = ""
    ray_actor_id: str = ""
    ray_job_id: str = ""
    name: str = ""
    granted_at_unix_s: float = field(default_factory=time.time)

    def alive(self) -> bool:
        ticks = process_start_ticks(self.pid)
        return ticks is not None and (not self.pid_start_ticks or ticks == self.pid_start_ticks)


class GpuAgentCore:
    def __init__(self, device: Device, node_id: str, node_ip: str, state_file: Path, native_status: str = ""):
        self.device = device
        self.info = device.info()
        self.node_id, self.node_ip = node_id, node_ip
        self.state_file = Path(state_file)
        self.native_status = native_status
        self.address = ""
        self.allocator = TpcAllocator(self.info.tpcs, device.tpc_slices())
        self.grants: dict[str, GrantRecord] = {}
        self._lock = threading.Lock()
        self._restore()

    # -- state -----------------------------------------------------------------------------
    def _restore(self) -> None:
        if not self.state_file.exists():
            return
        records = [GrantRecord(**{**r, "tpc_ids": tuple(r["tpc_ids"])}) for r in json.loads(self.state_file.read_text())]
        for record in records:
            if record.alive():
                self.allocator.restore(record.grant_id, record.tpc_ids)
                self.device.set_allowance(record.slot, record.tpc_ids)
                self.grants[record.grant_id] = record
            else:
                logger.info("dropping grant %s of dead pid %d", record.grant_id, record.pid)
        self._persist()

    def _persist(self) -> None:
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps([asdict(g) for g in self.grants.values()]))
        os.replace(tmp, self.state_file)

    def _free_slot(self) -> int | None:
        used = {g.slot for g in self.grants.values()}
        slot = next(s for s in range(len(used) + 1) if s not in used)
        return slot if slot < MAX_CLIENTS_PER_GPU else None

    # -- operations ------------------------------------------------------------------------
    def acquire(self, tpcs: int, priority: str, slo_ms: float, client: dict) -> GrantRecord | None:
        if not 1 <= tpcs <= self.info.tpcs:
            raise ValueError(f"this GPU ({self.info.model}) has {self.info.tpcs} TPCs; asked for {tpcs}")
        with self._lock:
            grant_id = uuid.uuid4().hex[:16]
            slot = self._free_slot()
            tpc_ids = self.allocator.allocate(grant_id, tpcs) if slot is not None else None
            if tpc_ids is None:
                return None
            record = GrantRecord(grant_id, tpc_ids, slot, priority, slo_ms, **client)
            self.device.set_allowance(record.slot, tpc_ids)
            self.grants[grant_id] = record
            self._persist()
        logger.info("granted %d TPCs %s to pid %d (%s)", tpcs, list(tpc_ids), record.pid, record.name)
        return record

    def release(self, grant_id: str) -> bool:
        with self._lock:
            record = self.grants.pop(grant_id, None)
            if record is None:
                return False
            self.allocator.release(grant_id)
            self.device.clear_allowance(record.slot)
            self._persist()
        logger.info("released grant %s (%d TPCs) of pid %d", grant_id, len(record.tpc_ids), record.pid)
        return True

    def snapshot(self) -> list[GrantRecord]:
        with self._lock:
            return list(self.grants.values())

    def reap_dead(self) -> list[str]:
        dead = [g.grant_id for g in list(self.grants.values()) if not g.alive()]
        return [g for g in dead if self.release(g)]

    def free_tpcs(self) -> int:
        return self.allocator.free_tpcs

    def status(self) -> pb.GpuStatus:
        with self._lock:
            grants = list(self.grants.values())
            free = self.allocator.free_tpcs
        clients = []
        for g in grants:   # launch rings are read outside the lock
            summary = self.device.launch_summary(g.slot)
            clients.append(pb.ClientStatus(
                grant_id=g.grant_id,
                client=_identity_pb(g),
                priority=_PRIORITY_TO_PB.get(g.priority, pb.PRIORITY_UNSPECIFIED),
                slo_ms=g.slo_ms,
                tpc_ids=g.tpc_ids,
                granted_at_unix_s=g.granted_at_unix_s,
                **({"launches": pb.LaunchSummary(**summary)} if summary is not None else {}),
            ))
        reading = self.device.telemetry()
        sensors = {k: v for k, v in (("clock_mhz", reading.clock_mhz), ("power_w", reading.power_w),
                                     ("energy_j", reading.energy_j)) if v is not None}
        state = self.device.tpc_state()
        if state is not None:
            grant_of_slot = {g.slot: g.grant_id for g in grants}
            sensors.update(busy_tpcs=state.busy_tpcs, lent_tpcs=state.lent_tpcs,
                           tpc_lent_to=[grant_of_slot.get(state.lent_to.get(t), "") for t in range(self.info.tpcs)])
        return pb.GpuStatus(
            **sensors, node_id=self.node_id, node_ip=self.node_ip, gpu_index=self.info.index, gpu_uuid=self.info.uuid,
            gpu_model=self.info.model, simulated=self.info.simulated, sms=self.info.sms,
            total_tpcs=self.info.tpcs, granted_tpcs=self.info.tpcs - free, free_tpcs=free,
            clients=clients, agent_address=self.address, native_status=self.native_status,
        )

    def grant_pb(self, record: GrantRecord) -> pb.Grant:
        return pb.Grant(
            grant_id=record.grant_id, gpu_uuid=self.info.uuid, gpu_index=self.info.index, gpu_model=self.info.model,
            simulated=self.info.simulated, tpc_ids=record.tpc_ids, slot=record.slot,
            shm_path=getattr(self.device, "shm_path", "") or "",
        )


def lending_policy_from_env():
    """LITHOS_LENDING=0 turns lending off (static partitions); LITHOS_ATOM_US sets the atom budget;
    LITHOS_UNROLL_GRAPHS=1 has borrowers' CUDA-graph replays sent kernel by kernel (docs/CONFIG.md)."""
    from .scheduler.lending import LendingPolicy

    enabled = os.environ.get("LITHOS_LENDING", "1") != "0"
    unroll = os.environ.get("LITHOS_UNROLL_GRAPHS", "0")
    if unroll not in ("0", "1"):
        raise ValueError(f"LITHOS_UNROLL_GRAPHS must be 0 or 1, got {unroll!r}")
    return LendingPolicy(atom_us=float(os.environ.get("LITHOS_ATOM_US", "250")), lending_enabled=enabled,
                         unroll_graphs=unroll == "1")


def _identity_pb(g: GrantRecord) -> pb.ClientIdentity:
    return pb.ClientIdentity(pid=g.pid, pid_start_ticks=g.pid_start_ticks, ray_task_id=g.ray_task_id,
                             ray_actor_id=g.ray_actor_id, ray_job_id=g.ray_job_id, name=g.name)


class GpuAgentServicer(pb_grpc.GpuAgentServicer):
    def __init__(self, core: GpuAgentCore):
        self.core = core

    def Acquire(self, request, context):
        c = request.client
        if c.pid <= 0:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "client.pid is required")
        client = dict(pid=c.pid, pid_start_ticks=c.pid_start_ticks, ray_task_id=c.ray_task_id,
                      ray_actor_id=c.ray_actor_id, ray_job_id=c.ray_job_id, name=c.name)
        priority = _PB_TO_PRIORITY.get(request.priority, Priority.BEST_EFFORT.value)
        try:
            record = self.core.acquire(request.tpcs, priority, request.slo_ms, client)
        except ValueError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        if record is None:
            return pb.AcquireReply(granted=False, free_tpcs=self.core.free_tpcs())
        return pb.AcquireReply(granted=True, grant=self.core.grant_pb(record), free_tpcs=self.core.free_tpcs())

    def Release(self, request, context):
        return pb.ReleaseReply(released=self.core.release(request.grant_id))

    def Status(self, request, context):
        return self.core.status()


def serve(core: GpuAgentCore, bind_host: str = "127.0.0.1", max_workers: int = 16) -> tuple[grpc.Server, int]:
    """The control plane listens on loopback only: its clients are the node's own processes; other
    nodes read status through the agent actor (Ray's authenticated channel)."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="lithos-grpc"))
    pb_grpc.add_GpuAgentServicer_to_server(GpuAgentServicer(core), server)
    port = server.add_insecure_port(f"{bind_host}:0")
    server.start()
    return server, port


class GpuAgentActor:
    """Ray actor body (wrapped with ray.remote by lithos_ray.node.start_agents)."""

    def __init__(self, node_id: str, gpu: dict, state_dir: str):
        import ray
        from .devices import make_device

        logging.basicConfig(level=logging.INFO, format="%(asctime)s lithos-agent %(message)s")
        device, native_status = make_device(gpu, state_dir)
        node_ip = ray.util.get_node_ip_address()
        self.core = GpuAgentCore(device, node_id, node_ip, Path(state_dir) / f"gpu-{gpu['index']}.json", native_status)
        self.server, self.port = serve(self.core)
        self.core.address = f"127.0.0.1:{self.port} on {node_ip}"
        self._stop = threading.Event()
        threading.Thread(target=self._reap_loop, name="lithos-reaper", daemon=True).start()
        table, policy = getattr(device, "allowance_table", None), lending_policy_from_env()
        if table is not None and policy.lending_enabled:
            from .lending_loop import LendingController
            controller = LendingController(table, self.core.snapshot, policy)
            threading.Thread(target=controller.run_forever, args=(self._stop,), name="lithos-lending",
                             daemon=True).start()

    def _reap_loop(self) -> None:
        while not self._stop.wait(REAP_INTERVAL_S):
            try:
                self.core.reap_dead()
            except Exception:  # keep reaping; a bad record must not stop the loop
                logger.exception("reaper failed")

    def describe(self) -> dict:
        info = self.core.info
        return dict(node_id=self.core.node_id, node_ip=self.core.node_ip, port=self.port, index=info.index,
                    uuid=info.uuid, model=info.model, tpcs=info.tpcs, simulated=info.simulated)

    def status_proto(self) -> bytes:
        """GpuStatus for readers on other nodes (serialized protobuf)."""
        return self.core.status().SerializeToString()

    def shutdown(self) -> None:
        self._stop.set()
        self.server.stop(grace=1.0)
        self.core.device.close()
