"""Bring lithos up and down on a node: GPU inventory, the Ray node with `lithos_tpc`, one agent per GPU.

`lithos-ray start` uses `start_node`/`stop_node`; the demo and the tests use `worker_env`,
`ray_node_options` and `start_agents` around an embedded Ray (ray.init or ray.cluster_utils.Cluster).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

from .config import LABEL_GPU_MODEL, LABEL_SIMULATED, NAMESPACE, RESOURCE_NAME, parse_simulate_spec
from .errors import LithosError, LithosNotRunning, LithosRequestError
from .gpus import NodeGpu, detect_gpus, simulated_gpus

logger = logging.getLogger(__name__)

BOOTSTRAP_DIR = Path(__file__).resolve().parent / "_bootstrap"
RUN_ROOT = Path(os.environ.get("LITHOS_RUN_DIR", Path(tempfile.gettempdir()) / "lithos-ray"))
NODE_STATE_FILE = RUN_ROOT / "node.json"
AGENT_READY_TIMEOUT_S = 120


def node_gpus(simulate: str | None, node_tag: str = "local") -> list[NodeGpu]:
    """Real GPUs, or the simulated ones `simulate` names; refuses a GPU-less node without --simulate."""
    if simulate:
        return simulated_gpus(parse_simulate_spec(simulate), node_tag)
    gpus = detect_gpus()
    if not gpus:
        raise LithosRequestError(
            "no NVIDIA GPU found on this node (NVML reports none). To try lithos without a GPU, use "
            "simulated GPUs: lithos-ray start --head --simulate H100:2")
    return gpus


def worker_env(gpus: list[NodeGpu], base: dict | None = None) -> dict[str, str]:
    """Environment for the raylet, inherited by its workers: the lithos worker hook (and the shim)."""
    env = dict(os.environ if base is None else base)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(BOOTSTRAP_DIR), env.get("PYTHONPATH", "")) if p)
    env["LITHOS_RAY_WORKER_HOOK"] = "1"
    # Ray >= 2.49 shows every GPU to tasks that asked for none; on a lithos node only granted clients
    # may see one, so restore Ray's older behaviour (CUDA_VISIBLE_DEVICES="" for them).
    env["RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO"] = "1"
    if any(not g.simulated for g in gpus):
        from . import native
        if native.library_path():
            env["LD_PRELOAD"] = native.preload_with_shim(env.get("LD_PRELOAD", ""))
    return env


def ray_node_options(gpus: list[NodeGpu]) -> dict:
    """Resources and labels of a lithos node. Ray gets num_gpus=0: lithos owns the GPUs."""
    models = sorted({g.model for g in gpus})
    return {
        "resources": {RESOURCE_NAME: sum(g.tpcs for g in gpus)},
        "num_gpus": 0,
        "labels": {LABEL_GPU_MODEL: "_".join(models), LABEL_SIMULATED: str(all(g.simulated for g in gpus)).lower()},
    }


MPS_DIR = RUN_ROOT / "mps"


def start_node_mps(gpus: list[NodeGpu]) -> dict[str, str]:
    """One MPS control daemon per node serves all its GPUs; clients find it through the returned env.
    Simulated nodes need none."""
    if all(g.simulated for g in gpus):
        return {}
    from .mps import start_mps
    try:
        return start_mps(str(MPS_DIR))
    except RuntimeError as exc:
        raise LithosError(f"lithos needs CUDA MPS on GPU nodes (TPC partitions across processes): {exc}") from None


def state_dir(node_id: str) -> Path:
    return RUN_ROOT / node_id[:16]


def start_agents(node_id: str, gpus: list[NodeGpu]) -> list[dict]:
    """One detached, node-pinned, restartable agent actor per GPU; returns their descriptions."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from .agent import GpuAgentActor
    from .client import agent_name

    directory = state_dir(node_id)
    directory.mkdir(parents=True, exist_ok=True)
    actor_class = ray.remote(GpuAgentActor)
    handles = [
        actor_class.options(
            name=agent_name(node_id, gpu.index), namespace=NAMESPACE, lifetime="detached", get_if_exists=True,
            num_cpus=0, max_restarts=-1, max_concurrency=4,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
        ).remote(node_id, asdict(gpu), str(directory))
        for gpu in gpus
    ]
    return ray.get([h.describe.remote() for h in handles], timeout=AGENT_READY_TIMEOUT_S)


def stop_agents(node_id: str | None = None) -> int:
    """Kill the agents of one node (or all); returns how many."""
    import ray

    from .client import AGENT_NAME_PREFIX

    killed = 0
    for actor in ray.util.list_named_actors(all_namespaces=True):
        name = actor["name"]
        if actor.get("namespace") != NAMESPACE or not name.startswith(AGENT_NAME_PREFIX + ":"):
            continue
        if node_id is not None and name.split(":")[1] != node_id:
            continue
        handle = ray.get_actor(name, namespace=NAMESPACE)
        try:
            ray.get(handle.shutdown.remote(), timeout=10)
        except Exception:  # a dead or hung agent is killed anyway
            pass
        ray.kill(handle, no_restart=True)
        killed += 1
    return killed


def reachable_gcs(address: str | None) -> str | None:
    """host:port of the Ray GCS if something listens there; `ray.init` would wait minutes on a stale one."""
    import socket

    from ray._private.utils import read_ray_address

    if not address and NODE_STATE_FILE.exists():   # the cluster `lithos-ray start` joined on this node
        address = json.loads(NODE_STATE_FILE.read_text()).get("gcs_address")
    address = address or os.environ.get("RAY_ADDRESS") or read_ray_address()
    if not address or address == "auto" or ":" not in address:
        return None
    host, port = address.replace("ray://", "").rsplit(":", 1)
    try:
        with socket.create_connection((host, int(port)), timeout=2):
            return address
    except (OSError, ValueError):
        return None


def _ray_cli() -> str:
    candidate = Path(sys.executable).with_name("ray")
    return str(candidate) if candidate.exists() else (shutil.which("ray") or "ray")


def start_node(head: bool, address: str | None, simulate: str | None, port: int | None = None,
               extra_ray_args: list[str] | None = None, acquire_timeout_s: float | None = None) -> dict:
    """`lithos-ray start`: Ray node with lithos_tpc + labels, then the agents. Writes the node state file."""
    if NODE_STATE_FILE.exists():
        raise LithosError(f"lithos already runs on this node (state in {NODE_STATE_FILE}); `lithos-ray stop` first")
    if head == bool(address):
        raise LithosRequestError("give exactly one of --head (start a cluster) or --address HOST:PORT (join one)")
    gpus = node_gpus(simulate, node_tag=os.uname().nodename[:12])
    options = ray_node_options(gpus)
    mps_env = start_node_mps(gpus)
    env = {**worker_env(gpus), **mps_env}
    if acquire_timeout_s is not None:
        env["LITHOS_ACQUIRE_TIMEOUT_S"] = str(acquire_timeout_s)
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    cmd = [_ray_cli(), "start", f"--resources={json.dumps(options['resources'])}", "--num-gpus=0",
           "--labels=" + ",".join(f"{k}={v}" for k, v in options["labels"].items())]
    cmd += ["--head"] + ([f"--port={port}"] if port else []) if head else [f"--address={address}"]
    cmd += extra_ray_args or []
    logger.info("starting Ray: %s", " ".join(cmd))
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise LithosError(f"`ray start` failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    import ray
    ray.init(address="auto" if head else address, namespace=NAMESPACE, logging_level=logging.WARNING,
             log_to_driver=False)
    node_id = ray.get_runtime_context().get_node_id()
    session_dir = ray._private.worker._global_node.get_session_dir_path()
    agents = start_agents(node_id, gpus)
    dashboard = ""
    if head:
        from .dashboard import start_dashboard
        try:
            dashboard = start_dashboard()
        except Exception as exc:   # the page is optional; grants work without it
            logger.warning("lithos page not started: %s", exc)
    state = {"dashboard_url": dashboard, "node_id": node_id, "gcs_address": ray.get_runtime_context().gcs_address, "ray_session_dir": session_dir, "head": head, "mps_env": mps_env,
             "gpus": [asdict(g) for g in gpus], "agents": agents}
    RUN_ROOT.mkdir(parents=True, exist_ok=True)
    NODE_STATE_FILE.write_text(json.dumps(state, indent=2))
    return state


def stop_node() -> dict:
    """`lithos-ray stop`: the agents start created, then the Ray node it started. Nothing else."""
    if not NODE_STATE_FILE.exists():
        raise LithosNotRunning(f"lithos is not running on this node (no {NODE_STATE_FILE})")
    state = json.loads(NODE_STATE_FILE.read_text())
    killed = 0
    try:
        import ray
        gcs = reachable_gcs(None)
        if gcs is None:
            raise LithosNotRunning("no Ray GCS answers on this node")
        ray.init(address=gcs, namespace=NAMESPACE, logging_level=logging.WARNING, log_to_driver=False)
        killed = stop_agents(state["node_id"])
        if state.get("dashboard_url"):
            from .dashboard import stop_dashboard
            stop_dashboard()
        ray.shutdown()
    except Exception as exc:  # Ray already gone: nothing of ours is left in it
        logger.warning("could not reach Ray to stop the agents (%s)", exc)
    stopped = _stop_ray_session(state["ray_session_dir"])
    if state.get("mps_env"):
        from .mps import stop_mps
        stop_mps(str(MPS_DIR))
    shutil.rmtree(state_dir(state["node_id"]), ignore_errors=True)
    NODE_STATE_FILE.unlink(missing_ok=True)
    return {"agents_stopped": killed, "ray_processes_stopped": stopped}


def _pids_of_session(session_dir: str) -> list[int]:
    """Ray's own processes of one session name its session dir on their command line; their workers
    are their children and die with them."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            try:
                if session_dir.encode() in (proc / "cmdline").read_bytes():
                    pids.append(int(proc.name))
            except OSError:
                continue
    return pids


def _stop_ray_session(session_dir: str, grace_s: float = 10.0) -> int:
    """Stop the Ray node `lithos-ray start` started (not `ray stop`, which stops every Ray here)."""
    import signal
    import time

    pids = _pids_of_session(session_dir)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in pids):
        time.sleep(0.1)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return len(pids)
