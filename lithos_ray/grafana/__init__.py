"""The lithos Grafana dashboard, written where Ray writes its own so Grafana shows them together.

Ray 2.60 (dashboard/modules/metrics/metrics_head.py) writes its dashboards to
$RAY_METRICS_GRAFANA_DASHBOARD_OUTPUT_DIR when set, else to
<$RAY_METRICS_OUTPUT_ROOT or <session_dir>/metrics>/grafana/dashboards, and points Grafana's
provisioning (grafana/provisioning/dashboards/default.yml) at that folder. Ray rewrites its grafana
folder when its dashboard process starts, so the lithos dashboard actor writes the file again when
it is missing.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

DASHBOARD_JSON = Path(__file__).resolve().parent / "lithos_dashboard.json"
OUTPUT_FILE_NAME = "lithos_grafana_dashboard.json"
ENV_DASHBOARD_OUTPUT_DIR = "RAY_METRICS_GRAFANA_DASHBOARD_OUTPUT_DIR"
ENV_METRICS_OUTPUT_ROOT = "RAY_METRICS_OUTPUT_ROOT"


def grafana_dashboards_dir(session_dir: str) -> Path:
    """The folder Ray's Grafana dashboards of this session go to."""
    if os.environ.get(ENV_DASHBOARD_OUTPUT_DIR):
        return Path(os.environ[ENV_DASHBOARD_OUTPUT_DIR])
    metrics_root = os.environ.get(ENV_METRICS_OUTPUT_ROOT) or os.path.join(session_dir, "metrics")
    return Path(metrics_root) / "grafana" / "dashboards"


def provision_grafana_dashboard(session_dir: str) -> Path:
    """Copy the lithos dashboard next to Ray's for this Ray session; returns the written file."""
    if not session_dir or not Path(session_dir).is_dir():
        raise FileNotFoundError(f"Ray session directory {session_dir!r} does not exist; give the head node's "
                                f"session dir (e.g. /tmp/ray/session_latest)")
    target_dir = grafana_dashboards_dir(session_dir)
    target_dir.mkdir(parents=True, exist_ok=True)
    target = target_dir / OUTPUT_FILE_NAME
    tmp = target.with_suffix(".tmp")
    shutil.copyfile(DASHBOARD_JSON, tmp)
    os.replace(tmp, target)
    return target
