"""Ray adapter of placement: plan -> actor options / Serve ray_actor_options, pure data (no Ray cluster)."""
import pytest

from lithos_ray.errors import LithosRequestError
from lithos_ray.placement.planner import Placement, Plan
from lithos_ray.placement_ray import (SERVE_ALLOWED_ACTOR_OPTIONS, assign_plan_gpus, parse_cluster_gpus,
                                      plan_actor_options, serve_deployment_options)


def _plan(placements: list[tuple[str, str, int, int, int, int]]) -> Plan:
    """placements: (item, model, replica_index, replicas, gpu_index, reserved_tpcs)."""
    return Plan(gpu_model="H100", gpu_tpcs=66, headroom_fraction=0.1, usable_tpcs=59.4, slots_per_day=24,
                placements=[Placement(item, model, r, n, gpu, 10.0, reserved, 200.0)
                            for item, model, r, n, gpu, reserved in placements],
                gpus_used=len({p[4] for p in placements}), lower_bound_gpus=1, fluid_lower_bound=1.0,
                large_item_lower_bound=0, peak_packing_gpus=3, peak_fluid_bound=2.0, method="heuristic",
                proved_optimal=False, planning_time_s=0.0)


CLUSTER = [
    {"node_ip": "10.0.0.2", "gpu_index": 1, "model": "NVIDIA H100 80GB HBM3", "tpcs": 66},
    {"node_ip": "10.0.0.2", "gpu_index": 0, "model": "H100", "tpcs": 66},
    {"node_ip": "10.0.0.3", "gpu_index": 0, "model": "A100", "tpcs": 54},
    {"node_ip": "10.0.0.1", "gpu_index": 0, "model": "H100", "tpcs": 66},
]


def test_plan_becomes_actor_options_with_node_gpu_and_tpcs():
    plan = _plan([("chat", "chat", 0, 1, 0, 40), ("big#0", "big", 0, 2, 0, 26), ("big#1", "big", 1, 2, 1, 66)])
    assignment = assign_plan_gpus(plan, parse_cluster_gpus(CLUSTER))
    assert {g: (gpu.node_ip, gpu.gpu_index) for g, gpu in assignment.items()} == {
        0: ("10.0.0.1", 0), 1: ("10.0.0.2", 0)}        # H100s only, in (node_ip, gpu_index) order
    base = {"big": {"num_cpus": 2, "resources": {"disk": 1}, "runtime_env": {"env_vars": {"HF_HOME": "/x"}}}}
    options = plan_actor_options(plan, assignment, base)
    assert options["chat"]["resources"] == {"lithos_tpc": 40, "node:10.0.0.1": 0.001}
    assert options["chat"]["runtime_env"]["env_vars"] == {"LITHOS_GPU_INDEX": "0", "LITHOS_SLO_MS": "200"}
    assert options["big#1"]["resources"] == {"disk": 1, "lithos_tpc": 66, "node:10.0.0.2": 0.001}
    assert options["big#1"]["runtime_env"]["env_vars"]["HF_HOME"] == "/x"
    assert options["big#1"]["num_cpus"] == 2
    assert base["big"]["resources"] == {"disk": 1}       # caller's dict untouched
    ray_option_utils = pytest.importorskip("ray._common.ray_option_utils")
    for item_options in options.values():                  # Ray's own checks of .options(...)
        ray_option_utils.validate_actor_options(item_options, in_options=True)


def test_serve_options_use_only_allowed_keys_and_names_without_hash():
    plan = _plan([("chat", "chat", 0, 1, 0, 40), ("big#0", "big", 0, 2, 0, 26), ("big#1", "big", 1, 2, 1, 66)])
    assignment = assign_plan_gpus(plan, parse_cluster_gpus(CLUSTER))
    deployments = serve_deployment_options(plan, assignment, {"chat": {"num_cpus": 1}})
    assert sorted(deployments) == ["big-replica-0", "big-replica-1", "chat"]
    for name, kwargs in deployments.items():
        assert "#" not in name and kwargs["num_replicas"] == 1
        assert set(kwargs["ray_actor_options"]) <= SERVE_ALLOWED_ACTOR_OPTIONS
    with pytest.raises(LithosRequestError, match=r"\['scheduling_strategy'\], which Serve does not accept"):
        serve_deployment_options(plan, assignment, {"chat": {"scheduling_strategy": "SPREAD"}})


def test_previous_assignment_keeps_gpus_stable():
    plan = _plan([("a", "a", 0, 1, 0, 30), ("b", "b", 0, 1, 1, 30)])
    gpus = parse_cluster_gpus(CLUSTER)
    assignment = assign_plan_gpus(plan, gpus, previous_assignment={1: ("10.0.0.1", 0)})
    assert (assignment[1].node_ip, assignment[1].gpu_index) == ("10.0.0.1", 0)
    assert (assignment[0].node_ip, assignment[0].gpu_index) == ("10.0.0.2", 0)


def test_bad_cluster_data_and_too_few_gpus_fail_clearly():
    with pytest.raises(LithosRequestError, match="lacks \\['tpcs'\\]"):
        parse_cluster_gpus([{"node_ip": "10.0.0.1", "gpu_index": 0, "model": "H100"}])
    with pytest.raises(LithosRequestError, match="unknown GPU model 'V99'"):
        parse_cluster_gpus([{"node_ip": "10.0.0.1", "gpu_index": 0, "model": "V99", "tpcs": 66}])
    with pytest.raises(LithosRequestError, match="listed twice"):
        parse_cluster_gpus([CLUSTER[1], dict(CLUSTER[1])])
    plan = _plan([(f"m{i}", f"m{i}", 0, 1, i, 66) for i in range(4)])
    with pytest.raises(LithosRequestError, match="the plan needs 4 H100 GPUs with 66 TPCs; the cluster has 3"):
        assign_plan_gpus(plan, parse_cluster_gpus(CLUSTER))
    with pytest.raises(LithosRequestError, match="already ask for lithos_tpc"):
        small = _plan([("a", "a", 0, 1, 0, 30)])
        plan_actor_options(small, assign_plan_gpus(small, parse_cluster_gpus(CLUSTER)),
                           {"a": {"resources": {"lithos_tpc": 5}}})
