"""lithos metrics through `ray.util.metrics`; Ray exports them to Prometheus with its `ray_` prefix.

Two publishers:
- `ClusterMetrics` (in the dashboard actor, once a second from `cluster_status()`): per-GPU TPCs
  total/granted/busy/lent, per-client granted TPCs, clock/power/energy where a sensor exists;
- `ClientLatencyRecorder` (in each latency-critical client, e.g. a Serve replica): a latency
  histogram, SLO attainment and slice use over a sliding window, also pushed to the dashboard.

Names (as Prometheus sees them):
    ray_lithos_gpu_tpcs_total / _granted / _busy / _lent   {NodeId, GpuIndex, GpuUuid, GpuModel, Simulated}
    ray_lithos_client_used_tpcs (real GPUs)                {GpuUuid, GrantId, Client, Priority}
    ray_lithos_gpu_clock_mhz, ray_lithos_gpu_power_w, ray_lithos_gpu_energy_j        (real GPUs only)
    ray_lithos_client_granted_tpcs                         {GpuUuid, GrantId, Client, Priority}
    ray_lithos_client_latency_ms (histogram), ray_lithos_client_slo_attainment,
    ray_lithos_client_slice_busy_fraction                  {Client, GrantId, GpuUuid, SloMs}
"""
from __future__ import annotations

import bisect
import logging
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass

logger = logging.getLogger(__name__)

PREFIX = "lithos_"
# Request latencies (ms): fine below 10 ms (LithOS's inference SLOs), coarse up to 10 s.
LATENCY_BUCKETS_MS = [0.5, 1, 2, 3, 4, 5, 6, 8, 10, 12, 15, 20, 25, 30, 40, 50, 75, 100, 150, 200, 300, 500,
                      750, 1000, 2000, 5000, 10000]
DEFAULT_WINDOW_S = 60.0
MAX_WINDOW_REQUESTS = 200_000
PUBLISH_INTERVAL_S = 1.0
DASHBOARD_LOOKUP_S = 10.0
GPU_TAG_KEYS = ("NodeId", "GpuIndex", "GpuUuid", "GpuModel", "Simulated")
CLIENT_TAG_KEYS = ("GpuUuid", "GrantId", "Client", "Priority")
LATENCY_TAG_KEYS = ("Client", "GrantId", "GpuUuid", "SloMs")


def _gauge(name: str, description: str, tag_keys: tuple[str, ...]):
    from ray.util.metrics import Gauge
    return Gauge(PREFIX + name, description=description, tag_keys=tag_keys)


# -- cluster-level (dashboard actor) -------------------------------------------------------------
class ClusterMetrics:
    """Publishes one `ClusterStatus` as gauges."""

    def __init__(self):
        self.tpcs_total = _gauge("gpu_tpcs_total", "TPCs of the GPU (1 TPC = 2 SMs).", GPU_TAG_KEYS)
        self.tpcs_granted = _gauge("gpu_tpcs_granted", "TPCs of the GPU held by lithos grants.", GPU_TAG_KEYS)
        self.tpcs_busy = _gauge(
            "gpu_tpcs_busy", "TPCs of clients launching now (their activity words: launched within the idle "
            "window or predicted busy); real GPUs only.", GPU_TAG_KEYS)
        self.tpcs_lent = _gauge(
            "gpu_tpcs_lent", "TPCs of idle clients that a busy client may add to its launches now (its lend "
            "list); real GPUs only.", GPU_TAG_KEYS)
        self.clock_mhz = _gauge("gpu_clock_mhz", "SM clock from NVML (real GPUs only).", GPU_TAG_KEYS)
        self.power_w = _gauge("gpu_power_w", "Board power from NVML (real GPUs only).", GPU_TAG_KEYS)
        self.energy_j = _gauge("gpu_energy_j", "NVML energy counter since an arbitrary origin (real GPUs "
                               "only); use its rate.", GPU_TAG_KEYS)
        self.client_tpcs = _gauge("client_granted_tpcs", "TPCs granted to one client (0 after it left).",
                                  CLIENT_TAG_KEYS)
        self.client_used_tpcs = _gauge("client_used_tpcs", "TPCs per launch of one client's latest launches "
                                       "(borrowed TPCs included; an unconfined launch counts the whole GPU); real "
                                       "GPUs only.", CLIENT_TAG_KEYS)
        self._client_tags_seen: dict[str, dict] = {}

    def publish(self, status) -> None:
        """status: lithos_ray.status.ClusterStatus (sensor fields that are None are skipped)."""
        live_clients: dict[str, dict] = {}
        for node in status.nodes:
            for gpu in node.gpus:
                tags = {"NodeId": node.node_id, "GpuIndex": str(gpu.index), "GpuUuid": gpu.uuid,
                        "GpuModel": gpu.model, "Simulated": str(gpu.simulated).lower()}
                self.tpcs_total.set(gpu.total_tpcs, tags=tags)
                self.tpcs_granted.set(gpu.granted_tpcs, tags=tags)
                if gpu.busy_tpcs is not None:
                    self.tpcs_busy.set(gpu.busy_tpcs, tags=tags)
                if gpu.lent_tpcs is not None:
                    self.tpcs_lent.set(gpu.lent_tpcs, tags=tags)
                for gauge, value in ((self.clock_mhz, gpu.clock_mhz), (self.power_w, gpu.power_w),
                                     (self.energy_j, gpu.energy_j)):
                    if value is not None:
                        gauge.set(value, tags=tags)
                for client in gpu.clients:
                    client_tags = {"GpuUuid": gpu.uuid, "GrantId": client.grant_id, "Client": client.name,
                                   "Priority": client.priority}
                    self.client_tpcs.set(client.granted_tpcs, tags=client_tags)
                    if client.launches is not None and client.launches.window:
                        self.client_used_tpcs.set(client.launches.mean_tpcs, tags=client_tags)
                    live_clients[client.grant_id] = client_tags
        for grant_id, tags in self._client_tags_seen.items():
            if grant_id not in live_clients:
                self.client_tpcs.set(0, tags=tags)
                self.client_used_tpcs.set(0, tags=tags)
        self._client_tags_seen = live_clients


# -- client-level (latency-critical clients) -----------------------------------------------------
@dataclass(frozen=True)
class LatencySummary:
    """What one latency-critical client saw over the last `window_s` (measured by the client)."""

    requests: int
    window_s: float
    slo_ms: float
    p50_ms: float | None
    p99_ms: float | None
    slo_attainment: float | None      # fraction of requests within slo_ms; None without requests
    slice_busy_fraction: float        # fraction of the window with at least one request in flight

    def to_dict(self) -> dict:
        return asdict(self)


class LatencyWindow:
    """Latencies of the requests that ended in the last `window_s` seconds. Plain Python, no Ray."""

    def __init__(self, slo_ms: float, window_s: float = DEFAULT_WINDOW_S, now_s: float | None = None):
        if not slo_ms > 0:
            raise ValueError(f"slo_ms must be > 0, got {slo_ms!r}")
        if not window_s > 0:
            raise ValueError(f"window_s must be > 0, got {window_s!r}")
        self.slo_ms, self.window_s = float(slo_ms), float(window_s)
        self.started_at_s = time.monotonic() if now_s is None else now_s
        self._requests: deque[tuple[float, float]] = deque(maxlen=MAX_WINDOW_REQUESTS)   # (start_s, end_s)
        self._lock = threading.Lock()

    def add(self, start_s: float, end_s: float) -> None:
        with self._lock:
            self._requests.append((start_s, end_s))

    def summary(self, now_s: float | None = None) -> LatencySummary:
        now_s = time.monotonic() if now_s is None else now_s
        since_s = now_s - self.window_s
        with self._lock:
            while self._requests and self._requests[0][1] < since_s:
                self._requests.popleft()
            requests = sorted(self._requests)
        latencies_ms = sorted((end - start) * 1000.0 for start, end in requests)
        busy_s, covered_until = 0.0, max(since_s, self.started_at_s)
        for start, end in requests:             # union of in-flight intervals inside the window
            start = max(start, covered_until)
            if end > start:
                busy_s += end - start
                covered_until = end
        observed_s = min(self.window_s, now_s - self.started_at_s)
        n = len(latencies_ms)
        return LatencySummary(
            requests=n, window_s=self.window_s, slo_ms=self.slo_ms,
            p50_ms=_percentile(latencies_ms, 50), p99_ms=_percentile(latencies_ms, 99),
            slo_attainment=(bisect.bisect_right(latencies_ms, self.slo_ms) / n) if n else None,
            slice_busy_fraction=min(1.0, busy_s / observed_s) if observed_s > 0 else 0.0)


def _percentile(sorted_values: list[float], q: float) -> float | None:
    """Nearest-rank percentile of an ascending list."""
    if not sorted_values:
        return None
    rank = max(1, -(-len(sorted_values) * q // 100))
    return sorted_values[int(rank) - 1]


class ClientLatencyRecorder:
    """Per latency-critical client: `observe(start_s, end_s)` per request (time.monotonic() seconds).

    The request path only appends to the window and observes the histogram; a daemon thread sets
    the attainment gauges and pushes the summary to the lithos dashboard (when one runs) every
    PUBLISH_INTERVAL_S.
    """

    def __init__(self, client: str, slo_ms: float, grant_id: str = "", gpu_uuid: str = "",
                 window_s: float = DEFAULT_WINDOW_S):
        from ray.util.metrics import Histogram

        self.client, self.grant_id = client, grant_id
        self.window = LatencyWindow(slo_ms, window_s)
        self.tags = {"Client": client, "GrantId": grant_id, "GpuUuid": gpu_uuid, "SloMs": f"{slo_ms:g}"}
        self.latency_ms = Histogram(PREFIX + "client_latency_ms", description="Request latency of a "
                                    "latency-critical lithos client, timed by the client.",
                                    boundaries=LATENCY_BUCKETS_MS, tag_keys=LATENCY_TAG_KEYS)
        self.attainment = _gauge("client_slo_attainment", "Fraction of the client's requests of the last "
                                 "window that finished within its SLO.", LATENCY_TAG_KEYS)
        self.busy_fraction = _gauge("client_slice_busy_fraction", "Fraction of the last window in which "
                                    "the client had a request in flight on its TPC slice.", LATENCY_TAG_KEYS)
        self._stop = threading.Event()
        self._dashboard = None
        self._next_lookup_s = 0.0
        threading.Thread(target=self._publish_loop, name="lithos-latency", daemon=True).start()

    def observe(self, start_s: float, end_s: float) -> None:
        self.window.add(start_s, end_s)
        self.latency_ms.observe((end_s - start_s) * 1000.0, tags=self.tags)

    def summary(self) -> LatencySummary:
        return self.window.summary()

    def close(self) -> None:
        self._stop.set()

    def _publish_loop(self) -> None:
        while not self._stop.wait(PUBLISH_INTERVAL_S):
            try:
                self.publish()
            except Exception:  # metrics must never take the client down
                logger.exception("lithos: publishing latency metrics failed")

    def publish(self) -> LatencySummary:
        summary = self.summary()
        if summary.slo_attainment is not None:
            self.attainment.set(summary.slo_attainment, tags=self.tags)
        self.busy_fraction.set(summary.slice_busy_fraction, tags=self.tags)
        dashboard = self._dashboard_handle()
        if dashboard is not None:
            dashboard.report_client.remote(self.grant_id, self.client, summary.to_dict())
        return summary

    def _dashboard_handle(self):
        """The dashboard actor, looked up again every DASHBOARD_LOOKUP_S (it may stop or restart)."""
        if time.monotonic() >= self._next_lookup_s:
            import ray

            from .config import NAMESPACE
            from .dashboard import DASHBOARD_NAME
            self._next_lookup_s = time.monotonic() + DASHBOARD_LOOKUP_S
            try:
                self._dashboard = ray.get_actor(DASHBOARD_NAME, namespace=NAMESPACE)
            except ValueError:
                self._dashboard = None
        return self._dashboard
