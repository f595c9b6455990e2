"""lithos_tpc end to end on a 2-node x 2-simulated-H100 Ray cluster (ray.cluster_utils.Cluster).

One cluster for the whole module; every actor and task uses num_cpus=0.
"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import ray
from ray.cluster_utils import Cluster
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

import lithos_ray
from lithos_ray.node import node_gpus, ray_node_options, start_agents, stop_agents, worker_env
from lithos_ray.status import cluster_status

TPCS_PER_GPU = 66


def wait_for(condition, timeout_s=30.0, what="condition"):
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    os.environ["LITHOS_RUN_DIR"] = str(tmp_path_factory.mktemp("lithos-run"))
    gpus = node_gpus("H100:2")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [os.path.dirname(__file__), os.environ.get("PYTHONPATH")]))
    os.environ.update(worker_env(gpus))
    opts = ray_node_options(gpus)
    c = Cluster(initialize_head=True, head_node_args=dict(num_cpus=1, **opts))
    second = c.add_node(num_cpus=1, **opts)
    ray.init(address=c.address, namespace="lithos")
    nodes = [c.head_node.node_id, second.node_id]
    for node_id in nodes:
        start_agents(node_id, node_gpus("H100:2", node_tag=node_id[:8]))
    yield {"address": c.address, "nodes": nodes}
    stop_agents()
    ray.shutdown()
    c.shutdown()


def on(node_id):
    return NodeAffinitySchedulingStrategy(node_id, soft=False)


class HolderBody:
    def info(self):
        grant = lithos_ray.current_grant()
        return {"pid": os.getpid(), "gpu": grant.gpu_uuid, "tpc_ids": list(grant.tpc_ids),
                "cvd": os.environ.get("CUDA_VISIBLE_DEVICES")}


Holder = ray.remote(num_cpus=0)(HolderBody)


@ray.remote(num_cpus=0)
def grant_of_task():
    grant = lithos_ray.current_grant()
    return {"pid": os.getpid(), "gpu": grant.gpu_uuid, "tpc_ids": list(grant.tpc_ids),
            "cvd": os.environ.get("CUDA_VISIBLE_DEVICES"), "simulated": os.environ.get("LITHOS_SIMULATED")}


def gpus_of(node_id):
    return {g.uuid: g for n in cluster_status().nodes if n.node_id == node_id for g in n.gpus}


def granted_on(node_id):
    return sum(g.granted_tpcs for g in gpus_of(node_id).values())


def test_agents_and_status_json(cluster):
    status = cluster_status()
    assert sorted(n.node_id for n in status.nodes) == sorted(cluster["nodes"])
    for node in status.nodes:
        assert [(g.index, g.model, g.total_tpcs, g.free_tpcs, g.simulated) for g in node.gpus] == \
            [(0, "H100", 66, 66, True), (1, "H100", 66, 66, True)]
    out = subprocess.run([sys.executable, "-m", "lithos_ray.cli", "status", "--json", "--address", cluster["address"]],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["schema_id"] == "lithos-ray/status/v1"
    assert sorted(n["node_id"] for n in data["nodes"]) == sorted(cluster["nodes"])
    assert all(g["total_tpcs"] == 66 and g["clients"] == [] for n in data["nodes"] for g in n["gpus"])


def test_task_is_pinned_to_one_gpu_and_releases_on_return(cluster):
    node = cluster["nodes"][0]
    info = ray.get(grant_of_task.options(resources={"lithos_tpc": 12}, scheduling_strategy=on(node)).remote())
    assert len(info["tpc_ids"]) == 12
    assert info["cvd"] == info["gpu"] and info["gpu"] in gpus_of(node)
    assert info["simulated"] == "1"
    assert granted_on(node) == 0   # released before the task returned


def test_grants_fill_gpus_exactly_never_oversubscribe_and_release_on_death(cluster):
    node = cluster["nodes"][0]
    sizes = [40, 30, 30, 26, 6]   # 132 = both GPUs exactly, best fit
    holders = [Holder.options(resources={"lithos_tpc": s}, scheduling_strategy=on(node)).remote() for s in sizes]
    infos = ray.get([h.info.remote() for h in holders])
    per_gpu = {}
    for size, info in zip(sizes, infos):
        assert len(info["tpc_ids"]) == size and info["cvd"] == info["gpu"]
        per_gpu.setdefault(info["gpu"], []).extend(info["tpc_ids"])
    assert len(per_gpu) == 2
    for ids in per_gpu.values():
        assert len(ids) == len(set(ids)) == TPCS_PER_GPU
    status = gpus_of(node)
    assert all(g.free_tpcs == 0 and g.granted_tpcs == 66 for g in status.values())
    assert sorted(c.pid for g in status.values() for c in g.clients) == sorted(i["pid"] for i in infos)

    ray.kill(holders[0])                           # actor death through Ray
    wait_for(lambda: granted_on(node) == 132 - 40, what="release after ray.kill")
    os.kill(infos[1]["pid"], signal.SIGKILL)       # kill -9 of the worker process
    wait_for(lambda: granted_on(node) == 132 - 70, what="release after kill -9")
    for h in holders[2:]:
        ray.kill(h)
    wait_for(lambda: granted_on(node) == 0, what="all released")


def test_fragmentation_waits_for_room_then_errors_past_timeout(cluster):
    node = cluster["nodes"][1]
    big = [Holder.options(resources={"lithos_tpc": 40}, scheduling_strategy=on(node)).remote() for _ in range(2)]
    first, second = ray.get([h.info.remote() for h in big])
    assert first["gpu"] != second["gpu"]           # 26 + 26 free: enough on the node, not on one GPU
    impatient = grant_of_task.options(resources={"lithos_tpc": 30}, scheduling_strategy=on(node),
                                      runtime_env={"env_vars": {"LITHOS_ACQUIRE_TIMEOUT_S": "1"}}).remote()
    with pytest.raises(ray.exceptions.RayTaskError, match="no GPU of this node had 30 free TPCs within 1 s"):
        ray.get(impatient)

    patient = Holder.options(resources={"lithos_tpc": 30}, scheduling_strategy=on(node)).remote()
    ready, _ = ray.wait([patient.info.remote()], timeout=1.0)
    assert not ready and granted_on(node) == 80    # still waiting, nothing oversubscribed
    ray.kill(big[0])
    info = ray.get(patient.info.remote(), timeout=60)
    assert info["gpu"] == first["gpu"] and len(info["tpc_ids"]) == 30
    for h in (big[1], patient):
        ray.kill(h)
    wait_for(lambda: granted_on(node) == 0, what="all released")


def test_work_without_a_grant_sees_no_gpu(cluster):
    @ray.remote(num_cpus=0)
    def visible():
        return os.environ.get("CUDA_VISIBLE_DEVICES")

    assert ray.get(visible.options(scheduling_strategy=on(cluster["nodes"][0])).remote()) == ""


@pytest.mark.parametrize("tpcs, needle", [(100, "does not fit on one GPU"), (1.5, "fractional")])
def test_impossible_requests_fail_with_a_clear_error(cluster, tpcs, needle):
    ref = grant_of_task.options(resources={"lithos_tpc": tpcs}, scheduling_strategy=on(cluster["nodes"][0])).remote()
    with pytest.raises(ray.exceptions.RayTaskError, match=needle):
        ray.get(ref)


def test_wrapper_carries_priority_and_slo_and_checks_the_cluster(cluster):
    node = cluster["nodes"][0]
    Service = lithos_ray.remote(HolderBody, tpc=8, priority="latency_critical", slo_ms=20, num_cpus=0,
                                scheduling_strategy=on(node))
    service = Service.remote()
    info = ray.get(service.info.remote())
    client = next(c for g in gpus_of(node).values() for c in g.clients)
    assert (client.pid, client.priority, client.slo_ms, client.granted_tpcs) == (info["pid"], "latency_critical", 20.0, 8)
    assert client.ray_actor_id
    with pytest.raises(lithos_ray.errors.LithosRequestError, match="more than any GPU of this cluster"):
        lithos_ray.remote(tpc=67, num_cpus=0)
    ray.kill(service)
    wait_for(lambda: granted_on(node) == 0, what="release")


def test_restarted_agent_keeps_live_grants(cluster):
    node = cluster["nodes"][0]
    holder = Holder.options(resources={"lithos_tpc": 10}, scheduling_strategy=on(node)).remote()
    info = ray.get(holder.info.remote())
    gpu_index = next(g.index for g in gpus_of(node).values() if g.uuid == info["gpu"])
    agent = ray.get_actor(f"lithos-gpu:{node}:{gpu_index}", namespace="lithos")
    ray.kill(agent, no_restart=False)
    restored = wait_for(lambda: _try(lambda: gpus_of(node)[info["gpu"]]), what="agent restart")
    assert [c.tpc_ids for c in restored.clients] == [info["tpc_ids"]]
    ray.kill(holder)
    wait_for(lambda: granted_on(node) == 0, what="release after restart")


def _try(fn):
    try:
        return fn()
    except Exception:
        return None


def test_a_placement_plan_lands_on_its_planned_node_and_gpu(cluster):
    from lithos_ray.placement.generators import synthetic_profile_set
    from lithos_ray.placement.planner import plan_placement
    from lithos_ray.placement_ray import assign_plan_gpus, cluster_gpus_from_status, plan_actor_options

    plan = plan_placement(synthetic_profile_set(4, seed=3, slots_per_day=24), time_limit_s=2)
    live = [g for g in cluster_gpus_from_status(cluster_status()) if g.node_id == cluster["nodes"][1]]
    assignment = assign_plan_gpus(plan, live[::-1])          # planned GPU 0 -> the second node's GPU 1
    options = plan_actor_options(plan, assignment)
    holders = {item: Holder.options(**opts).remote() for item, opts in options.items()}
    infos = dict(zip(holders, ray.get([h.info.remote() for h in holders.values()])))
    for placement in plan.placements:
        gpu = assignment[placement.gpu_index]
        expected_uuid = next(g.uuid for g in gpus_of(gpu.node_id).values() if g.index == gpu.gpu_index)
        assert infos[placement.item]["gpu"] == expected_uuid
        assert len(infos[placement.item]["tpc_ids"]) == placement.reserved_tpcs
    for h in holders.values():
        ray.kill(h)
    wait_for(lambda: granted_on(cluster["nodes"][1]) == 0, what="release")
