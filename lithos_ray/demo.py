"""`lithos-ray demo`: lithos on an embedded local Ray cluster, end to end.

A latency-critical inference service and a best-effort training job, both plain
`@ray.remote(resources={"lithos_tpc": N})` actors, get TPC slices of one GPU; the demo shows their
grants, what they did, that a killed client's TPCs come back, and shuts everything down.
On a machine without an NVIDIA GPU it runs on a simulated H100 and labels every number [simulated].
"""
from __future__ import annotations

import logging
import os
import time

import numpy as np

LC_TPCS, BE_TPCS = 24, 40
LC_SLO_MS = 10.0
LC_RATE_PER_S = 150.0


def _latency_summary(latencies_ms, slo_ms: float) -> dict:
    lat = np.asarray(latencies_ms, dtype=float)
    if lat.size == 0:
        raise RuntimeError("the service completed no request")
    return {"n": int(lat.size), "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)),
            "slo_attainment": float(np.mean(lat <= slo_ms))}


class _DemoClient:
    def __init__(self):
        import lithos_ray
        self.grant = lithos_ray.current_grant()

    def describe(self) -> dict:
        return {"pid": os.getpid(), "gpu": self.grant.gpu_uuid, "tpcs": self.grant.tpcs,
                "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}


class InferenceService(_DemoClient):
    """Latency-critical: BERT-base-like requests, batch 1, open-loop Poisson arrivals."""

    def serve(self, seconds: float, rate_per_s: float) -> dict:
        if self.grant.simulated:
            from .scheduler import calibration, simulated
            from .scheduler.gpu_models import lookup_model
            result = simulated.simulate_client(lookup_model(self.grant.gpu_model), self.grant.tpcs,
                                               simulated.OpenLoop(calibration.bert_base_b1(), rate_per_s), seconds)
            return _latency_summary(result.latencies_ms, LC_SLO_MS)
        return _latency_summary(_real_inference(seconds, rate_per_s), LC_SLO_MS)


class TrainingJob(_DemoClient):
    """Best-effort: back-to-back large bf16 matmul steps."""

    def train(self, seconds: float) -> dict:
        if self.grant.simulated:
            from .scheduler import calibration, simulated
            from .scheduler.gpu_models import lookup_model
            result = simulated.simulate_client(lookup_model(self.grant.gpu_model), self.grant.tpcs,
                                               simulated.ClosedLoop(calibration.matmul_train_step()), seconds)
            return {"steps": int(result.completed), "steps_per_s": float(result.throughput_per_s)}
        from .native import thread_launch_counts
        steps = _real_training(seconds)
        return {"steps": steps, "steps_per_s": steps / seconds, "launch_paths": thread_launch_counts()}


def _real_inference(seconds: float, rate_per_s: float) -> list[float]:
    import torch
    layer = torch.nn.TransformerEncoderLayer(768, 12, 3072, batch_first=True)
    model = torch.nn.TransformerEncoder(layer, 12).cuda().half().eval()
    x = torch.randn(1, 128, 768, device="cuda", dtype=torch.half)
    rng = np.random.default_rng(0)
    latencies = []
    with torch.no_grad():
        for _ in range(10):
            model(x)
        torch.cuda.synchronize()
        end = time.monotonic() + seconds
        next_arrival = time.monotonic()
        while next_arrival < end:
            while time.monotonic() < next_arrival:
                pass
            model(x)
            torch.cuda.synchronize()
            latencies.append((time.monotonic() - next_arrival) * 1000)
            next_arrival += rng.exponential(1.0 / rate_per_s)
    return latencies


def _real_training(seconds: float) -> int:
    import torch
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    steps, end = 0, time.monotonic() + seconds
    while time.monotonic() < end:
        for _ in range(4):
            a @ a
        torch.cuda.synchronize()
        steps += 4
    return steps


def _wait_until(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(0.05)


def run_demo(simulate: str | None = None, seconds: float = 10.0) -> int:
    import ray

    from .config import NAMESPACE
    from .gpus import detect_gpus
    from .node import MPS_DIR, node_gpus, ray_node_options, start_agents, start_node_mps, stop_agents, worker_env
    from .status import cluster_status, format_table

    if simulate is None and not detect_gpus():
        simulate = "H100:1"
        print("No NVIDIA GPU on this machine: the demo runs on a SIMULATED H100. Grants, pinning and release "
              "are real; kernel timings come from the simulator and are labelled [simulated].\n")
    gpus = node_gpus(simulate)
    label = " [simulated]" if gpus[0].simulated else ""
    os.environ.update({**worker_env(gpus), **start_node_mps(gpus)})
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    opts = ray_node_options(gpus)
    print(f"Starting a local Ray cluster with lithos_tpc={opts['resources']['lithos_tpc']} "
          f"({len(gpus)} x {gpus[0].model}{label}) ...")
    ray.init(address="local", num_cpus=2, resources=opts["resources"], num_gpus=0, labels=opts["labels"], namespace=NAMESPACE,
             include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
    try:
        start_agents(ray.get_runtime_context().get_node_id(), gpus)
        lc_env = {"env_vars": {"LITHOS_PRIORITY": "latency_critical", "LITHOS_SLO_MS": str(LC_SLO_MS)}}
        service = ray.remote(resources={"lithos_tpc": LC_TPCS}, num_cpus=0, runtime_env=lc_env)(InferenceService).remote()
        job = ray.remote(resources={"lithos_tpc": BE_TPCS}, num_cpus=0)(TrainingJob).remote()
        s_info, j_info = ray.get([service.describe.remote(), job.describe.remote()])
        print(f"\nInference service (latency_critical, SLO {LC_SLO_MS:g} ms): {s_info['tpcs']} TPCs, pid {s_info['pid']}, "
              f"CUDA_VISIBLE_DEVICES={s_info['cuda_visible_devices']}")
        print(f"Training job (best_effort): {j_info['tpcs']} TPCs, pid {j_info['pid']}, "
              f"CUDA_VISIBLE_DEVICES={j_info['cuda_visible_devices']}\n")
        print(format_table(cluster_status()))

        print(f"\nRunning both for {seconds:g} s{label} ...")
        lc, be = ray.get([service.serve.remote(seconds, LC_RATE_PER_S), job.train.remote(seconds)])
        print(f"  inference: {lc['n']} requests at {LC_RATE_PER_S:g}/s, p50 {lc['p50_ms']:.2f} ms, "
              f"p99 {lc['p99_ms']:.2f} ms, {100 * lc['slo_attainment']:.1f}% within SLO{label}")
        print(f"  training : {be['steps']} matmul steps, {be['steps_per_s']:.1f} steps/s{label}")

        print("\nKilling the training job (like kill -9); its TPCs return to the GPU:")
        ray.kill(job, no_restart=True)
        total = sum(g.tpcs for g in gpus)

        def granted() -> int:
            return sum(g.granted_tpcs for n in cluster_status().nodes for g in n.gpus)

        _wait_until(lambda: granted() == LC_TPCS, 30, "the killed job's grant to be released")
        print(f"  granted TPCs now {granted()} of {total}")
        ray.kill(service, no_restart=True)
        _wait_until(lambda: granted() == 0, 30, "the service's grant to be released")
        print(f"  after the service ends too: {granted()} granted")
    finally:
        stop_agents()
        ray.shutdown()
        if not gpus[0].simulated:
            from .mps import stop_mps
            stop_mps(str(MPS_DIR))
    print("\nDone: Ray and the lithos agents are shut down.")
    return 0
