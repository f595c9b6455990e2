"""The lithos page: a detached actor on the head node serves it and publishes lithos metrics.

    start_dashboard(port=None) -> "http://127.0.0.1:8266/"   (needs ray.init() to the cluster)
    dashboard_url() -> the URL, or None when no dashboard runs
    stop_dashboard() -> True if one was stopped

The actor (`lithos-dashboard`, namespace `lithos`, num_cpus=0) polls `cluster_status()` every
LITHOS_DASHBOARD_POLL_S seconds, sets the `ray_lithos_*` gauges (lithos_ray.metrics), writes the
lithos Grafana dashboard next to Ray's, and serves the page and `/api/state` (JSON) over HTTP.
Kept light: Ray and aiohttp are imported only inside the functions.
"""
from __future__ import annotations

import os

from ..errors import LithosError, LithosNotRunning, LithosRequestError

DASHBOARD_NAME = "lithos-dashboard"
ENV_PORT = "LITHOS_DASHBOARD_PORT"
ENV_HOST = "LITHOS_DASHBOARD_HOST"
ENV_POLL_S = "LITHOS_DASHBOARD_POLL_S"
DEFAULT_PORT = 8266          # next to Ray's dashboard (8265)
DEFAULT_HOST = "127.0.0.1"   # like Ray's dashboard: reachable from the head node only unless asked
DEFAULT_POLL_S = 1.0
START_TIMEOUT_S = 60

__all__ = ["start_dashboard", "dashboard_url", "stop_dashboard", "DASHBOARD_NAME"]


def _port(port: int | None) -> int:
    if port is None:
        raw = os.environ.get(ENV_PORT, str(DEFAULT_PORT))
        try:
            port = int(raw)
        except ValueError:
            raise LithosRequestError(f"{ENV_PORT}={raw!r} is not a port number (0..65535)") from None
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise LithosRequestError(f"dashboard port must be an integer 0..65535 (0: any free port), got {port!r}")
    return port


def _poll_s() -> float:
    raw = os.environ.get(ENV_POLL_S, str(DEFAULT_POLL_S))
    try:
        poll_s = float(raw)
    except ValueError:
        poll_s = -1.0
    if not 0.05 <= poll_s <= 60:
        raise LithosRequestError(f"{ENV_POLL_S}={raw!r}: give seconds between 0.05 and 60")
    return poll_s


def _handle():
    import ray

    from ..config import NAMESPACE
    if not ray.is_initialized():
        raise LithosNotRunning("not connected to Ray: call ray.init(address=...) first")
    try:
        return ray.get_actor(DASHBOARD_NAME, namespace=NAMESPACE)
    except ValueError:
        return None


def start_dashboard(port: int | None = None, host: str | None = None) -> str:
    """Start the lithos page on the head node (or find the running one); return its URL.

    port: None = $LITHOS_DASHBOARD_PORT or 8266; 0 = any free port. host: the address to bind,
    None = $LITHOS_DASHBOARD_HOST or 127.0.0.1 (use 0.0.0.0 to reach it from other machines).
    A dashboard already running keeps its port and host.
    """
    import ray

    from ..config import NAMESPACE
    from .server import DashboardActor

    port = _port(port)
    host = host or os.environ.get(ENV_HOST, DEFAULT_HOST)
    poll_s = _poll_s()
    _handle()   # checks the Ray connection
    actor = ray.remote(DashboardActor).options(
        name=DASHBOARD_NAME, namespace=NAMESPACE, lifetime="detached", get_if_exists=True, num_cpus=0,
        resources={"node:__internal_head__": 0.001}, max_restarts=0,
    ).remote(host, port, poll_s)
    try:
        return ray.get(actor.start.remote(), timeout=START_TIMEOUT_S)
    except ray.exceptions.RayTaskError as exc:
        ray.kill(actor, no_restart=True)
        raise LithosError(f"the lithos dashboard did not start: {exc.cause}") from None


def dashboard_url() -> str | None:
    """URL of the running lithos page, or None when none runs (needs ray.init())."""
    import ray

    handle = _handle()
    if handle is None:
        return None
    try:
        return ray.get(handle.url.remote(), timeout=10)
    except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
        return None


def stop_dashboard() -> bool:
    """Stop the lithos page; False when none ran."""
    import ray

    handle = _handle()
    if handle is None:
        return False
    try:
        ray.get(handle.stop.remote(), timeout=10)
    except Exception:  # stopping anyway
        pass
    ray.kill(handle, no_restart=True)
    return True
