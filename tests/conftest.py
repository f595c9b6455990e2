import os
import shutil

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def _has_nvidia_gpu() -> bool:
    if not shutil.which("nvidia-smi"):
        return False
    try:
        import pynvml
        pynvml.nvmlInit()
        return pynvml.nvmlDeviceGetCount() > 0
    except Exception:
        return False


HAS_GPU = _has_nvidia_gpu()


def pytest_collection_modifyitems(config, items):
    if HAS_GPU:
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU (NVML found none); run on the GPU machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# Ports Ray takes by default whatever the GCS port is (dashboard, its agent, client server, GCS):
# a free port that is one of them makes `ray start --port` refuse to start.
RAY_DEFAULT_PORTS = {6379, 8265, 10001, 52365}


def free_port() -> int:
    """A port free now on 127.0.0.1 that is not one of Ray's default ports."""
    import socket
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in RAY_DEFAULT_PORTS:
            return port


def publish_activity(table, slot: int, last_launch_ns: int, writer_pid: int = 4242) -> None:
    """What a client's shim writes into its own activity page (for tests of the lending loop)."""
    import numpy as np
    from lithos_ray import native
    record = np.frombuffer(table._activity_map, dtype=native.layout()["lithos_activity"], count=1,
                           offset=slot * table._activity_stride)
    record["last_launch_ns"] = last_launch_ns
    record["writer_pid"] = writer_pid
