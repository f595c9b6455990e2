"""The `lithos-ray` CLI as a user runs it: start/status/stop on this machine, and its error messages."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import free_port

CLI = [sys.executable, "-m", "lithos_ray.cli"]


def run_cli(*args, env, timeout=180):
    return subprocess.run(CLI + list(args), capture_output=True, text=True, env=env, timeout=timeout)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    e = dict(os.environ, LITHOS_RUN_DIR=str(tmp_path_factory.mktemp("run")), RAY_USAGE_STATS_ENABLED="0",
             LITHOS_DASHBOARD_PORT="0")
    e.pop("RAY_ADDRESS", None)
    return e


def test_bad_input_is_refused_at_the_boundary(env):
    out = run_cli("start", "--head", "--simulate", "H100:x", env=env)
    assert out.returncode == 2 and "expected MODEL:COUNT" in out.stderr and "Traceback" not in out.stderr
    out = run_cli("start", "--head", "--simulate", "B300:1", env=env)
    assert out.returncode == 2 and "unknown GPU model 'B300'" in out.stderr
    out = run_cli("stop", env=env)
    assert out.returncode == 2 and "lithos is not running on this node" in out.stderr


@pytest.mark.skipif(bool(os.environ.get("LITHOS_TEST_HAS_GPU")), reason="this machine has a GPU")
def test_start_without_gpu_names_simulate(env):
    from conftest import HAS_GPU
    if HAS_GPU:
        pytest.skip("this machine has a GPU")
    out = run_cli("start", "--head", env=env)
    assert out.returncode == 2 and "--simulate H100:2" in out.stderr


def test_start_status_use_stop(env):
    port = free_port()
    out = run_cli("start", "--head", "--simulate", "H100:2", "--port", str(port),
                  "--ray-arg=--include-dashboard=false", "--ray-arg=--num-cpus=1", env=env)
    assert out.returncode == 0, out.stderr
    assert "lithos_tpc=132" in out.stdout and "SIMULATED" in out.stdout
    state = json.loads((Path(env["LITHOS_RUN_DIR"]) / "node.json").read_text())
    try:
        again = run_cli("start", "--head", "--simulate", "H100:1", env=env)
        assert again.returncode == 2 and "already runs" in again.stderr

        # Unchanged user code: a plain Ray driver with a plain resource request.
        driver = textwrap.dedent("""
            import os, ray, lithos_ray
            ray.init(address="auto")
            @ray.remote(resources={"lithos_tpc": 12}, num_cpus=0)
            class Model:
                def where(self):
                    g = lithos_ray.current_grant()
                    return os.environ["CUDA_VISIBLE_DEVICES"], g.tpcs
            m = Model.remote()
            print("GRANT", *ray.get(m.where.remote()))
            import subprocess, sys
            print(subprocess.run([sys.executable, "-m", "lithos_ray.cli", "status", "--json"],
                                 capture_output=True, text=True).stdout)
        """)
        out = subprocess.run([sys.executable, "-c", driver], capture_output=True, text=True, env=env, timeout=180)
        assert out.returncode == 0, out.stderr
        grant_line = next(l for l in out.stdout.splitlines() if l.startswith("GRANT"))
        assert grant_line.split()[1].startswith("SIM-H100-") and grant_line.split()[2] == "12"
        status = json.loads(out.stdout[out.stdout.index("{"):])
        clients = [c for n in status["nodes"] for g in n["gpus"] for c in g["clients"]]
        assert [(c["name"], c["granted_tpcs"]) for c in clients] == [("Model", 12)]

        # An unmodified program under `lithos-ray run`: pinned, and its grant ends with it.
        prog = "import os; print('RUN', os.environ['CUDA_VISIBLE_DEVICES'], os.environ['LITHOS_TPC_IDS'])"
        out = run_cli("run", "--tpc", "8", "--priority", "latency_critical", "--", sys.executable, "-c", prog, env=env)
        assert out.returncode == 0, out.stderr
        run_line = next(l for l in out.stdout.splitlines() if l.startswith("RUN"))
        assert run_line.split()[1].startswith("SIM-H100-") and len(run_line.split()[2].split(",")) == 8
        out = run_cli("run", "--tpc", "0", "--", "true", env=env)
        assert out.returncode == 2 and "greater than or equal to 1" in out.stderr

        table = run_cli("status", env=env)
        assert table.returncode == 0 and "GPU 1 H100" in table.stdout and "[SIMULATED]" in table.stdout
        assert "lithos page: http://127.0.0.1:" in table.stdout
    finally:
        out = run_cli("stop", env=env)
    assert out.returncode == 0, out.stderr
    assert "2 agent(s)" in out.stdout
    from lithos_ray.node import _pids_of_session
    assert _pids_of_session(state["ray_session_dir"]) == []
    out = run_cli("status", env=env)
    assert out.returncode == 2 and "not running" in out.stderr
