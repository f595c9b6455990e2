"""lithos_ray.serve on a one-node Ray with one simulated H100: replicas are latency-critical lithos
clients, their timing feeds metrics and Serve's autoscaler, and the SLO policy scales on it.

One Ray cluster (and one Serve instance) for the whole module; every actor uses num_cpus=0.
"""
import logging
import os
import threading
import time
import urllib.request

import pytest
import ray
from ray import serve
from ray.serve.config import AutoscalingConfig, AutoscalingContext
from conftest import free_port
from test_cluster import wait_for

import lithos_ray.serve as lithos_serve
from lithos_ray.errors import LithosRequestError
from lithos_ray.node import node_gpus, ray_node_options, start_agents, stop_agents, worker_env
from lithos_ray.status import cluster_status

NO_CPU = {"num_cpus": 0}


def start_simulated_ray(simulate: str, run_dir) -> int:
    """One-node Ray with lithos agents on simulated GPUs, metrics exported every 0.5 s; returns the
    Prometheus port. Tests' actor classes reach the workers through PYTHONPATH."""
    os.environ["LITHOS_RUN_DIR"] = str(run_dir)
    gpus = node_gpus(simulate)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [os.path.dirname(__file__), os.environ.get("PYTHONPATH")]))
    os.environ.update(worker_env(gpus))
    metrics_port = free_port()
    ray.init(address="local", num_cpus=1, namespace="lithos", include_dashboard=False, logging_level=logging.ERROR,
             _metrics_export_port=metrics_port, _system_config={"metrics_report_interval_ms": 500},
             **ray_node_options(gpus))
    start_agents(ray.get_runtime_context().get_node_id(), gpus)
    return metrics_port


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    os.environ["RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S"] = "0.5"
    metrics_port = start_simulated_ray("H100:1", tmp_path_factory.mktemp("lithos-run"))
    serve.start(proxy_location="Disabled")
    yield {"metrics_port": metrics_port}
    serve.shutdown()
    stop_agents()
    ray.shutdown()


def clients():
    return [c for n in cluster_status().nodes for g in n.gpus for c in g.clients]


class EchoBody:
    """Answers after `ms` milliseconds of work (time.sleep stands in for the model)."""

    def __init__(self):
        import lithos_ray
        self.grant = lithos_ray.current_grant()
        self.init_thread = threading.current_thread().name

    def __call__(self, ms: float) -> dict:
        time.sleep(ms / 1000)
        return {"pid": os.getpid(), "tpcs": self.grant.tpcs, "slo": os.environ.get("LITHOS_SLO_MS"),
                "thread": threading.current_thread().name, "init_thread": self.init_thread}

    async def ping(self) -> str:
        return "pong"


# -- pure policy ----------------------------------------------------------------------------------
@pytest.mark.parametrize("args, expected, why", [
    ((2, [0.5], [0.9, 0.9], 2, 2), 3, "SLO attainment 0.500 < 0.99"),          # missing SLO: add one
    ((4, [1.0], [0.1, 0.1], 0, 2), 1, "SLO attainment 1.000 ok"),              # idle, SLO met: shrink by use
    ((2, [1.0], [0.6, 0.6], 1, 2), 2, "slice use 0.60 -> 2"),                  # on target: hold
    ((2, [], [], 9, 2), 5, "queue 9 -> 5"),                                    # no timing yet: queue length rules
    ((3, [0.2], [1.0], 0, 2, 0.99, 0.6, 3), 3, "capped at the plan's 3"),      # the plan caps scale-up
])
def test_desired_replicas(args, expected, why):
    replicas, reason = lithos_serve.desired_replicas(*args)
    assert replicas == expected and why in reason, reason


def test_policy_reads_replica_stats_from_serve_context():
    config = AutoscalingConfig(min_replicas=1, max_replicas=5, target_ongoing_requests=2)
    policy = lithos_serve.SloAutoscalingPolicy(target_slo_attainment=0.95, target_slice_busy_fraction=0.5)
    ctx = AutoscalingContext(
        deployment_id=None, deployment_name="m", app_name="a", current_num_replicas=2, target_num_replicas=2,
        running_replicas=["r1", "r2"], total_num_requests=1.0, total_queued_requests=0.0,
        aggregated_metrics={"lithos_slo_attainment": {"r1": 0.99, "r2": 0.97, "gone": 0.0},
                            "lithos_slice_busy_fraction": {"r1": 0.9, "r2": 0.8}},
        raw_metrics={}, capacity_adjusted_min_replicas=1, capacity_adjusted_max_replicas=5, policy_state={},
        last_scale_up_time=None, last_scale_down_time=None, current_time=time.time(), config=config)
    replicas, state = policy(ctx)
    assert replicas == 4 and "slice use 0.85 -> 4" in state["lithos_decision"]   # 2 * 0.85 / 0.5 = 3.4


def test_slo_autoscaling_config_and_plan_limit():
    plan = {"placements": [{"model": "chat", "gpu_index": 0}, {"model": "chat", "gpu_index": 1},
                           {"model": "embed", "gpu_index": 0}]}
    config = lithos_serve.slo_autoscaling(plan=plan, plan_model="chat", upscale_delay_s=0)
    assert config["max_replicas"] == 2 and config["upscale_delay_s"] == 0
    assert config["policy"] == {"policy_function": "lithos_ray.serve:SloAutoscalingPolicy",
                                "policy_kwargs": {"target_slo_attainment": 0.99, "target_slice_busy_fraction": 0.6,
                                                  "plan": plan, "plan_model": "chat"}}
    AutoscalingConfig(**config)   # Serve accepts it (and imports the policy)
    with pytest.raises(LithosRequestError, match="reserves TPCs for only 2 replica"):
        lithos_serve.slo_autoscaling(max_replicas=3, plan=plan, plan_model="chat")
    with pytest.raises(LithosRequestError, match=r"no replica of model 'ghost'; models in the plan: \['chat', 'embed'\]"):
        lithos_serve.slo_autoscaling(plan=plan, plan_model="ghost")
    with pytest.raises(LithosRequestError, match="give max_replicas"):
        lithos_serve.slo_autoscaling()
    with pytest.raises(LithosRequestError, match="target_slo_attainment must be in"):
        lithos_serve.slo_autoscaling(max_replicas=2, target_slo_attainment=1.5)


# -- on the cluster -------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, needle", [
    (dict(tpc=4, slo_ms=None), "give slo_ms"),
    (dict(tpc=4, slo_ms=-1), "slo_ms"),
    (dict(tpc=67, slo_ms=10), "more than any GPU of this cluster"),
    (dict(tpc=4, slo_ms=10, ray_actor_options={"scheduling_strategy": "SPREAD"}), "Serve does not accept"),
    (dict(tpc=4, slo_ms=10, model_thread="yes"), "model_thread must be True or False"),
])
def test_bad_deployment_options_fail_at_the_boundary(cluster, kwargs, needle):
    with pytest.raises(LithosRequestError, match=needle):
        lithos_serve.deployment(EchoBody, **kwargs)


def test_replica_is_a_latency_critical_client_and_its_latency_feeds_back(cluster):
    app = lithos_serve.deployment(EchoBody, tpc=12, slo_ms=50, name="echo", ray_actor_options=NO_CPU).bind()
    handle = serve.run(app, name="echo", route_prefix=None)
    replies = [handle.remote(1).result() for _ in range(5)]
    assert {(r["tpcs"], r["slo"]) for r in replies} == {(12, "50.0")}
    assert handle.ping.remote().result() == "pong"
    (client,) = clients()
    assert (client.pid, client.priority, client.slo_ms, client.granted_tpcs) == \
        (replies[0]["pid"], "latency_critical", 50.0, 12)

    stats = handle.record_autoscaling_stats.remote().result()
    assert stats["lithos_requests_in_window"] == 6 and stats["lithos_slo_attainment"] == 1.0
    for _ in range(2):
        handle.remote(80).result()       # over the 50 ms SLO
    stats = handle.record_autoscaling_stats.remote().result()
    assert stats["lithos_requests_in_window"] == 8 and stats["lithos_slo_attainment"] == pytest.approx(6 / 8)
    assert 0 < stats["lithos_slice_busy_fraction"] <= 1

    def exported():
        text = urllib.request.urlopen(f"http://127.0.0.1:{cluster['metrics_port']}/metrics").read().decode()
        return [line for line in text.splitlines() if line.startswith("ray_lithos_client_")]
    def exported_after_the_slow_requests():
        lines = exported()
        attainment = [l for l in lines if l.startswith("ray_lithos_client_slo_attainment{") and 'SloMs="50"' in l]
        count = [l for l in lines if l.startswith("ray_lithos_client_latency_ms_count{")]
        return attainment and attainment[0].endswith(" 0.75") and count and count[0].endswith(" 8.0")
    wait_for(exported_after_the_slow_requests, what="the attainment and latency count in Prometheus")

    # __init__ and every request ran on the one model thread; requests sent together run one at a time
    assert {(r["thread"], r["init_thread"]) for r in replies} == {(replies[0]["init_thread"],) * 2}
    assert replies[0]["thread"].startswith("lithos-model")
    start = time.monotonic()
    together = [handle.remote(100) for _ in range(3)]
    assert {r.result()["thread"] for r in together} == {replies[0]["thread"]}
    assert time.monotonic() - start >= 0.3
    serve.delete("echo")
    wait_for(lambda: not clients(), what="the replica's grant to be released")


def test_slo_policy_scales_up_when_the_slo_is_missed(cluster):
    autoscaling = lithos_serve.slo_autoscaling(min_replicas=1, max_replicas=2, target_slo_attainment=0.9,
                                               upscale_delay_s=0, downscale_delay_s=600, metrics_interval_s=0.5,
                                               look_back_period_s=2)
    app = lithos_serve.deployment(EchoBody, tpc=20, slo_ms=5, name="slow", ray_actor_options=NO_CPU,
                                  autoscaling_config=autoscaling).bind()
    handle = serve.run(app, name="slow", route_prefix=None)
    assert len(clients()) == 1

    def two_replicas():
        handle.remote(20).result()       # every request misses its 5 ms SLO
        return len(clients()) == 2
    wait_for(two_replicas, timeout_s=90, what="a second replica")
    assert sorted(c.granted_tpcs for c in clients()) == [20, 20]
    assert all(c.priority == "latency_critical" and c.slo_ms == 5.0 for c in clients())
    serve.delete("slow")
    wait_for(lambda: not clients(), what="both grants to be released")
