"""The main job, as the README's first command runs it (short)."""
import os
import subprocess
import sys

from conftest import HAS_GPU


def test_demo_runs_end_to_end_and_labels_simulated_numbers(tmp_path):
    args = [sys.executable, "-m", "lithos_ray.cli", "demo", "--seconds", "1"] + (["--simulate", "H100:1"] if HAS_GPU else [])
    env = dict(os.environ, LITHOS_RUN_DIR=str(tmp_path), RAY_USAGE_STATS_ENABLED="0")
    out = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    text = out.stdout
    if not HAS_GPU:
        assert "No NVIDIA GPU on this machine: the demo runs on a SIMULATED H100" in text
    assert "24 TPCs" in text and "40 TPCs" in text and "latency_critical" in text
    for line in text.splitlines():
        if line.strip().startswith(("inference:", "training :")):
            assert line.endswith("[simulated]"), line
    assert "granted TPCs now 24 of 66" in text and "after the service ends too: 0 granted" in text
    assert text.rstrip().endswith("Done: Ray and the lithos agents are shut down.")
