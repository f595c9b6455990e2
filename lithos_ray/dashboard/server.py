"""The dashboard actor: polls the agents, publishes metrics, serves the lithos page (aiohttp).

`page_state` (plain data in, JSON-ready dict out) is what `/api/state` returns; the page renders it.
"""
from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

logger = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"
REPORT_STALE_S = 10.0          # a client's latency report older than this is not shown


def page_state(status, reports: dict, now_unix_s: float, error: str | None = None,
               grafana_dashboard: str | None = None) -> dict:
    """status: ClusterStatus; reports: grant_id -> latency summary dict."""
    nodes = []
    for node in status.nodes:
        gpus = []
        for gpu in node.gpus:
            owner = [None] * gpu.total_tpcs
            clients = []
            for client in gpu.clients:
                for tpc in client.tpc_ids:
                    owner[tpc] = client.grant_id
                clients.append({
                    "grant_id": client.grant_id, "name": client.name, "pid": client.pid,
                    "priority": client.priority, "slo_ms": client.slo_ms, "granted_tpcs": client.granted_tpcs,
                    "tpc_ids": client.tpc_ids, "ray_actor_id": client.ray_actor_id,
                    "granted_at_unix_s": client.granted_at_unix_s, "latency": reports.get(client.grant_id),
                    "launches": client.launches.model_dump() if client.launches is not None else None})
            sensors = {"clock_mhz": gpu.clock_mhz, "power_w": gpu.power_w, "energy_j": gpu.energy_j}
            gpus.append({
                "index": gpu.index, "uuid": gpu.uuid, "model": gpu.model, "simulated": gpu.simulated,
                "total_tpcs": gpu.total_tpcs, "granted_tpcs": gpu.granted_tpcs, "free_tpcs": gpu.free_tpcs,
                "busy_tpcs": gpu.busy_tpcs, "lent_tpcs": gpu.lent_tpcs,   # None on simulated GPUs
                "native_status": gpu.native_status,
                "telemetry": sensors if any(v is not None for v in sensors.values()) else None,
                "tpc_owner": owner, "tpc_lent_to": gpu.tpc_lent_to or [None] * gpu.total_tpcs, "clients": clients})
        nodes.append({"node_id": node.node_id, "node_ip": node.node_ip, "gpus": gpus})
    return {"schema_id": "lithos-ray/dashboard/v1", "updated_unix_s": now_unix_s, "error": error,
            "grafana_dashboard": grafana_dashboard, "nodes": nodes}


class DashboardActor:
    """Ray actor body (async: the HTTP server and the poll loop share its event loop)."""

    def __init__(self, host: str, port: int, poll_s: float):
        logging.basicConfig(level=logging.INFO, format="%(asctime)s lithos-dashboard %(message)s")
        self.host, self.port, self.poll_s = host, port, poll_s
        self.reports: dict[str, tuple[float, dict]] = {}
        self.state: dict = {"nodes": [], "error": "starting", "updated_unix_s": None}
        self.grafana_dashboard: str | None = None
        self._runner = None
        self._poller = None
        self._start_lock = None
        self._metrics = None

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> str:
        if self._start_lock is None:
            self._start_lock = asyncio.Lock()
        async with self._start_lock:
            if self._runner is None:
                await self._start_server()
                from ..metrics import ClusterMetrics
                self._metrics = ClusterMetrics()
                self.grafana_dashboard = self._provision_grafana()
                await self.refresh()
                self._poller = asyncio.get_running_loop().create_task(self._poll_loop())
        return self.url()

    async def _start_server(self) -> None:
        from aiohttp import web

        app = web.Application()
        app.router.add_get("/", self._index)
        app.router.add_get("/api/state", self._api_state)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        try:
            await web.TCPSite(runner, self.host, self.port).start()
        except OSError as exc:
            await runner.cleanup()
            raise RuntimeError(f"cannot listen on {self.host}:{self.port} ({exc.strerror}); pass another port, "
                               f"or port 0 for any free one") from None
        self.port = runner.addresses[0][1]
        self._runner = runner

    def _provision_grafana(self) -> str | None:
        import ray

        from ..grafana import provision_grafana_dashboard
        try:
            session_dir = ray._private.worker._global_node.get_session_dir_path()
            return str(provision_grafana_dashboard(session_dir))
        except Exception as exc:   # the page works without Grafana
            logger.warning("could not provision the lithos Grafana dashboard: %s", exc)
            return None

    def url(self) -> str:
        import ray

        host = self.host
        if host in ("0.0.0.0", "::", ""):
            host = ray.util.get_node_ip_address()
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}/"

    async def stop(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # -- data --------------------------------------------------------------------------------
    def report_client(self, grant_id: str, client: str, summary: dict) -> None:
        """Called by latency-critical clients (lithos_ray.metrics.ClientLatencyRecorder) every second."""
        self.reports[grant_id] = (time.monotonic(), {**summary, "client": client})

    async def refresh(self) -> dict:
        from ..status import cluster_status

        error = None
        try:
            status = await asyncio.to_thread(cluster_status)
            self._metrics.publish(status)
        except Exception as exc:   # show the last good state with the error
            logger.warning("refresh failed: %s", exc)
            self.state = {**self.state, "error": f"{type(exc).__name__}: {exc}"}
            return self.state
        if self.grafana_dashboard and not Path(self.grafana_dashboard).exists():   # Ray rewrote its folder
            self.grafana_dashboard = self._provision_grafana()
        now = time.monotonic()
        self.reports = {g: r for g, r in self.reports.items() if now - r[0] <= REPORT_STALE_S}
        reports = {g: r[1] for g, r in self.reports.items()}
        self.state = page_state(status, reports, time.time(), error, self.grafana_dashboard)
        return self.state

    async def _poll_loop(self) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            await self.refresh()

    # -- HTTP --------------------------------------------------------------------------------
    async def _index(self, request):
        from aiohttp import web
        return web.FileResponse(STATIC_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    async def _api_state(self, request):
        from aiohttp import web
        return web.json_response(self.state, headers={"Cache-Control": "no-store"})
