"""lithos on a real GPU through Ray, end to end: `lithos-ray start` (MPS, agents, shim in every worker),
plain `resources={"lithos_tpc": N}` actors confined to their TPCs, `lithos-ray run`, `lithos-ray stop`.
"""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="needs ray installed")
pytestmark = pytest.mark.gpu
TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
CLI = [sys.executable, "-m", "lithos_ray.cli"]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def lithos_node(tmp_path_factory):
    env = dict(os.environ, LITHOS_RUN_DIR=str(tmp_path_factory.mktemp("run")), RAY_AUTH_MODE="disabled",
               PYTHONPATH=os.pathsep.join(filter(None, [TESTS_DIR, os.environ.get("PYTHONPATH")])))
    out = subprocess.run(CLI + ["start", "--head", "--port", str(_free_port()), "--ray-arg=--include-dashboard=false"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    print(out.stdout)
    state = json.loads((Path(env["LITHOS_RUN_DIR"]) / "node.json").read_text())
    os.environ.update(RAY_AUTH_MODE="disabled")
    ray.init(address=state["gcs_address"], namespace="lithos")
    yield env, state
    ray.shutdown()
    out = subprocess.run(CLI + ["stop"], env=env, capture_output=True, text=True, timeout=120)
    print(out.stdout, out.stderr)


class SpinActor:
    def __init__(self):
        import lithos_ray
        from gpu_spin import Spinner
        self.grant = lithos_ray.current_grant()
        self.spinner = Spinner()

    def describe(self):
        import torch
        return {"cvd": os.environ.get("CUDA_VISIBLE_DEVICES"), "shm": os.environ.get("LITHOS_SHM"),
                "preload": os.environ.get("LD_PRELOAD", ""), "tpcs": self.grant.tpcs, "gpu": self.grant.gpu_uuid,
                "device_count": torch.cuda.device_count()}

    def ms(self, blocks, seconds=1.0):
        return self.spinner.ms_per_launch(blocks, seconds)

    def views(self):
        from lithos_ray import native
        records, _ = native.LaunchRing(native.ring_path(os.environ["LITHOS_SHM"], int(os.environ["LITHOS_SLOT"]))).read()
        return sorted({(native.VIEW_NAMES[int(r["view"])], int(r["tpcs"])) for r in records})


def test_actors_are_confined_to_their_grants(lithos_node):
    actor = ray.remote(num_cpus=0)(SpinActor)
    a = actor.options(resources={"lithos_tpc": 22}).remote()
    b = actor.options(resources={"lithos_tpc": 22}).remote()
    da, db = ray.get([a.describe.remote(), b.describe.remote()])
    for d in (da, db):
        assert d["cvd"] == d["gpu"] and d["device_count"] == 1 and d["shm"] and "liblithos" in d["preload"]
    wave = 16 * 2 * 22                                   # one wave on the actor's 44 SMs
    solo = ray.get(a.ms.remote(wave))
    whole_gpu_sized = ray.get(a.ms.remote(16 * 132))     # 3 waves if confined to 44 of 132 SMs
    together = ray.get([a.ms.remote(wave, 2.0), b.ms.remote(wave, 2.0)])
    print(f"solo one-wave {solo:.3f} ms, whole-GPU-sized {whole_gpu_sized:.3f} ms, together {together}")
    assert 2.6 < whole_gpu_sized / solo < 3.4
    assert all(t < 1.15 * solo for t in together)
    assert ("tpc", 22) in ray.get(a.views.remote())
    from lithos_ray.status import cluster_status      # the agent reports the same launches
    reports = [c.launches for n in cluster_status().nodes for g in n.gpus for c in g.clients]
    assert reports and all(r is not None and r.tpc > 0 and r.unconfined <= 0.05 * r.window for r in reports), reports


def test_lithos_ray_run_confines_an_unmodified_program(lithos_node):
    env, _ = lithos_node
    program = ("from gpu_spin import Spinner; s = Spinner(); w = s.ms_per_launch(16 * 24); "
               "f = s.ms_per_launch(16 * 132); print('RATIO', f / w)")
    out = subprocess.run(CLI + ["run", "--tpc", "12", "--", sys.executable, "-c", program], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    ratio = float(next(l for l in out.stdout.splitlines() if l.startswith("RATIO")).split()[1])
    print("lithos-ray run: whole-GPU-sized / one-wave =", ratio)
    assert 4.5 < ratio < 6.5                              # 132 / 24 SMs = 5.5 waves
