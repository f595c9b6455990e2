"""Start, stop and query the CUDA MPS control daemon of one lithos node.

Every MPS path lives under a directory the caller passes (run_dir/pipe, run_dir/log), so several
daemons (tests, nodes sharing a host) never collide. Called by the per-GPU agent on GPU nodes.
Checked with driver 580.159.04 on an H100 (running as root).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import time

CONTROL_BINARY = "nvidia-cuda-mps-control"
START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0


def _mps_env(run_dir: str) -> dict[str, str]:
    return {
        "CUDA_MPS_PIPE_DIRECTORY": os.path.join(os.path.abspath(run_dir), "pipe"),
        "CUDA_MPS_LOG_DIRECTORY": os.path.join(os.path.abspath(run_dir), "log"),
    }


def _control(run_dir: str, command: str, timeout_s: float = 5.0) -> subprocess.CompletedProcess:
    binary = shutil.which(CONTROL_BINARY)
    if binary is None:
        raise RuntimeError(f"{CONTROL_BINARY} is not on PATH: MPS needs the NVIDIA driver's MPS binaries")
    return subprocess.run([binary], input=command + "\n", env={**os.environ, **_mps_env(run_dir)},
                          capture_output=True, text=True, timeout=timeout_s)


def mps_running(run_dir: str) -> bool:
    """True when a control daemon answers on run_dir's pipe directory."""
    if shutil.which(CONTROL_BINARY) is None or not os.path.exists(os.path.join(_mps_env(run_dir)["CUDA_MPS_PIPE_DIRECTORY"], "control")):
        return False
    try:
        return _control(run_dir, "get_server_list").returncode == 0
    except subprocess.TimeoutExpired:
        return False


def start_mps(run_dir: str) -> dict[str, str]:
    """Start the control daemon (if not already running); returns the env clients need."""
    env = _mps_env(run_dir)
    if mps_running(run_dir):
        return env
    binary = shutil.which(CONTROL_BINARY)
    if binary is None:
        raise RuntimeError(f"{CONTROL_BINARY} is not on PATH: MPS needs the NVIDIA driver's MPS binaries")
    for path in env.values():
        os.makedirs(path, exist_ok=True)
    proc = subprocess.run([binary, "-d"], env={**os.environ, **env}, capture_output=True, text=True, timeout=START_TIMEOUT_S)
    if proc.returncode != 0:
        raise RuntimeError(f"{CONTROL_BINARY} -d failed (rc {proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}")
    deadline = time.monotonic() + START_TIMEOUT_S
    while not mps_running(run_dir):
        if time.monotonic() > deadline:
            raise RuntimeError(f"MPS control daemon did not answer within {START_TIMEOUT_S} s; see {env['CUDA_MPS_LOG_DIRECTORY']}")
        time.sleep(0.05)
    return env


def stop_mps(run_dir: str) -> None:
    """Ask the daemon to quit and wait until it no longer answers (no-op when none runs)."""
    if not mps_running(run_dir):
        return
    _control(run_dir, "quit")
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while mps_running(run_dir):
        if time.monotonic() > deadline:
            raise RuntimeError(f"MPS control daemon in {run_dir} did not quit within {STOP_TIMEOUT_S} s")
        time.sleep(0.05)
