"""The per-GPU agent's core without Ray: grants, slots, persistence across restarts, reaping dead clients."""
import os
import subprocess
import sys

from lithos_ray.agent import MAX_CLIENTS_PER_GPU, GpuAgentCore, process_start_ticks
from lithos_ray.scheduler.gpu_models import lookup_model
from lithos_ray.scheduler.simulated import SimulatedDevice


def core_at(tmp_path):
    device = SimulatedDevice(lookup_model("H100"), 0, "SIM-H100-test-0")
    return GpuAgentCore(device, "node", "127.0.0.1", tmp_path / "gpu-0.json")


def me(**extra):
    return dict(pid=os.getpid(), pid_start_ticks=process_start_ticks(os.getpid()), **extra)


def test_grants_set_allowances_and_release_clears_them(tmp_path):
    core = core_at(tmp_path)
    a = core.acquire(12, "latency_critical", 50.0, me(name="a"))
    b = core.acquire(8, "best_effort", 0.0, me(name="b"))
    assert core.device.allowances() == {a.slot: a.tpc_ids, b.slot: b.tpc_ids}
    assert core.acquire(47, "best_effort", 0.0, me()) is None     # 46 left: refused, not oversubscribed
    assert core.release(a.grant_id) and not core.release(a.grant_id)
    assert core.device.allowances() == {b.slot: b.tpc_ids} and core.free_tpcs() == 58


def test_a_restarted_agent_keeps_live_grants_and_drops_dead_ones(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        core = core_at(tmp_path)
        live = core.acquire(10, "best_effort", 0.0, me())
        doomed = core.acquire(20, "best_effort", 0.0, dict(pid=child.pid, pid_start_ticks=process_start_ticks(child.pid)))
        child.kill()
        child.wait()
        restarted = core_at(tmp_path)
        assert list(restarted.grants) == [live.grant_id]
        assert restarted.device.allowances() == {live.slot: live.tpc_ids}
        assert doomed.grant_id not in restarted.grants and restarted.free_tpcs() == 56
    finally:
        child.kill()


def test_reaper_releases_grants_of_dead_processes(tmp_path):
    core = core_at(tmp_path)
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    grant = core.acquire(4, "best_effort", 0.0, dict(pid=child.pid, pid_start_ticks=12345))
    assert core.reap_dead() == [grant.grant_id] and core.free_tpcs() == 66


def test_slots_are_a_capacity_too(tmp_path):
    core = core_at(tmp_path)
    grants = [core.acquire(1, "best_effort", 0.0, me()) for _ in range(MAX_CLIENTS_PER_GPU)]
    assert all(grants) and len({g.slot for g in grants}) == MAX_CLIENTS_PER_GPU
    assert core.acquire(1, "best_effort", 0.0, me()) is None


class RecordingDevice(SimulatedDevice):
    """A device whose clients' launches are recorded (as the real GPU's launch rings are)."""

    def tpc_state(self):
        from lithos_ray.scheduler.lending import TpcState
        slots = sorted(self.allowances())
        return TpcState(12, 8, {t: slots[0] for t in range(60, 66)} if slots else {})

    def launch_summary(self, slot):
        return {"launches": 5000 + slot, "window": 4096, "tpc": 3900, "cosched": 0, "unconfined": 100, "graph": 96,
                "borrowing": 410, "mean_tpcs": 13.5}


def test_status_carries_each_clients_launch_summary_into_the_report_and_table(tmp_path):
    from lithos_ray.status import ClusterStatus, NodeReport, format_table, gpu_report

    plain = core_at(tmp_path)
    plain.acquire(4, "best_effort", 0.0, me(name="plain"))
    assert gpu_report(plain.status()).clients[0].launches is None        # simulated GPUs record no launches

    core = GpuAgentCore(RecordingDevice(lookup_model("H100"), 0, "SIM-H100-test-1"), "node", "127.0.0.1",
                        tmp_path / "gpu-1.json")
    grant = core.acquire(12, "latency_critical", 20.0, me(name="svc"))
    report = gpu_report(core.status())
    assert (report.busy_tpcs, report.lent_tpcs) == (12, 8)
    assert report.tpc_lent_to == [None] * 60 + [grant.grant_id] * 6
    assert gpu_report(plain.status()).busy_tpcs is None
    launches = report.clients[0].launches
    assert launches is not None and launches.launches == 5000 + grant.slot and launches.borrowing == 410
    table = format_table(ClusterStatus(nodes=[NodeReport(node_id="node", node_ip="127.0.0.1", gpus=[report])]))
    assert (f"launches {5000 + grant.slot}; latest 4096: tpc 95%, unconfined 2%, graph 2%, borrowing 10%; "
            f"13.5 TPCs per launch") in table
    assert "free  54  busy  12  lent   8" in table
