"""The foundation on a real GPU, without Ray: inventory, the real-GPU agent, a grant that pins a process.

Marked gpu: skipped with a reason on machines without an NVIDIA GPU. Runs on the GPU machine with
plain python3 (torch, cuda-bindings, nvidia-ml-py, grpcio there; pydantic carried as a wheel).
"""
import dataclasses
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def gpu():
    from lithos_ray.gpus import detect_gpus
    gpus = detect_gpus()
    assert gpus, "NVML sees a GPU but detect_gpus found none"
    return gpus[0]


def test_inventory_matches_cuda(gpu):
    import torch
    props = torch.cuda.get_device_properties(0)
    assert gpu.sms == props.multi_processor_count and gpu.tpcs == gpu.sms // 2
    assert gpu.uuid.startswith("GPU-") and not gpu.simulated
    if "H100" in props.name:
        assert (gpu.model, gpu.tpcs) == ("H100", 66)


def test_real_agent_grants_pins_and_releases(gpu, tmp_path):
    from lithos_ray import client, native
    from lithos_ray.agent import GpuAgentCore, serve
    from lithos_ray.config import make_request
    from lithos_ray.devices import make_device

    device, native_status = make_device(dataclasses.asdict(gpu), str(tmp_path))
    core = GpuAgentCore(device, "gpu-test-node", "127.0.0.1", tmp_path / "gpu-0.json", native_status)
    server, port = serve(core)
    try:
        telemetry = device.telemetry()
        assert telemetry.power_w and telemetry.power_w > 0 and telemetry.clock_mhz > 0
        reported = core.status()
        assert reported.HasField("power_w") and reported.power_w > 0 and reported.clock_mhz > 0
        if native.library_path():   # activity words live in the allowance table
            assert reported.HasField("busy_tpcs") and reported.busy_tpcs == 0 and reported.lent_tpcs == 0   # no clients yet
        ref = client.AgentRef("gpu-test-node", "127.0.0.1", port, gpu.index, gpu.uuid, gpu.model, gpu.tpcs, False)
        grant = client.acquire(make_request(tpcs=12), [ref], name="pytest")
        assert grant.tpcs == 12 and grant.gpu_uuid == gpu.uuid
        probe = ("import torch; p = torch.cuda.get_device_properties(0); "
                 "print(torch.cuda.device_count(), 'GPU-' + str(p.uuid))")
        env = {**os.environ, **client.grant_env(grant)}
        out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        count, uuid = out.stdout.split()
        assert (int(count), uuid) == (1, gpu.uuid)
        if native.library_path():
            assert grant.shm_path and "enforcing" in native_status
            table = native.AllowanceTable.open(grant.shm_path, writable=False)
            assert table.allowance(grant.slot)[1] == list(grant.tpc_ids)
            groups = table.cosched_groups()
            assert groups, "the agent probes the co-scheduled layout when it creates the table"
            whole = [g for g in groups.values() if set(g) <= set(grant.tpc_ids)]
            assert len(whole) == 3, f"12 TPCs should be 3 whole co-scheduled groups, got {grant.tpc_ids}"
        assert client.release(grant)
        assert core.free_tpcs() == gpu.tpcs
        if native.library_path():
            assert table.allowance(grant.slot)[1] is None
    finally:
        server.stop(0)
        device.close()
