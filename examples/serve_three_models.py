"""Three models on one GPU, each a Ray Serve deployment with its own TPC slice and SLO, next to a
best-effort Ray task on the rest of the GPU (lithos_ray.serve).

    python examples/serve_three_models.py [--seconds 10] [--simulate H100:1] [--cuda-graphs]

Without an NVIDIA GPU it runs on a SIMULATED H100: grants, Serve routing, queueing and timing are
real, but each request takes the time the simulator's calibrated kernel model predicts for the
replica's TPC slice (scheduler/calibration.py), and the training task's steps come from the
simulator; those numbers are labelled [simulated]. On a GPU the replicas run torch models built from
configs with random weights, and the training task runs bf16 matmuls.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import time
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ModelSpec:
    name: str
    workload: str        # calibrated simulator workload of the same model (scheduler/calibration.py)
    tpcs: int            # multiples of 4: real-GPU grants are whole GPC slices
    slo_ms: float
    rate_per_s: float


MODELS = [
    ModelSpec("bert-en", "bert_base_b1", tpcs=16, slo_ms=10.0, rate_per_s=40.0),
    ModelSpec("bert-de", "bert_base_b1", tpcs=12, slo_ms=15.0, rate_per_s=20.0),
    ModelSpec("normalize", "elementwise_mul_1gib", tpcs=8, slo_ms=5.0, rate_per_s=40.0),
]
TRAINING_TPCS = 28
# Requests wait inside the replica (timed, so queueing counts against the SLO), not in Serve's router.
MAX_ONGOING_REQUESTS = 32


class ModelServer:
    """One model. Simulated GPU: answer after the predicted latency on this slice. Real GPU: run it.

    Each request returns its service time (the model's own run, without waiting for the model) and
    the replica's solo service time (median of 20 runs at start, before any load), so the report can
    tell a slow slice from a queue."""

    def __init__(self, workload: str, cuda_graph: bool = False):
        import lithos_ray

        self.grant = lithos_ray.current_grant()
        if self.grant.simulated:
            from lithos_ray.scheduler.calibration import named_workload
            from lithos_ray.scheduler.gpu_models import lookup_model
            speed = lookup_model(self.grant.gpu_model).relative_tpc_speed
            self.simulated_ms = named_workload(workload).latency_ms(self.grant.tpcs, speed)
            self.run_once = lambda: time.sleep(self.simulated_ms / 1000)
            self.mode = "simulated"
        else:
            self.run_once, self.mode = _build_torch_model(workload, cuda_graph)
            for _ in range(10):
                self.run_once()
        self.solo_ms = float(np.median([self._timed_run() for _ in range(20)]))
        self.environment = {"mode": self.mode, "mps": bool(os.environ.get("CUDA_MPS_PIPE_DIRECTORY")),
                            "shim": "liblithos" in os.environ.get("LD_PRELOAD", "")}

    def _timed_run(self) -> float:
        return self._timed_run_with_cpu()[0]

    def _timed_run_with_cpu(self) -> tuple[float, float]:
        """(wall ms, this thread's CPU ms) of one run: CPU far below wall means the thread waited
        (a lock, the GIL, a blocking sync); close to wall means it computed or spun."""
        start, cpu_start = time.perf_counter(), time.thread_time()
        self.run_once()
        return (time.perf_counter() - start) * 1000, (time.thread_time() - cpu_start) * 1000

    def __call__(self, request=None) -> dict:
        from lithos_ray.native import thread_shim_counts
        service_ms, cpu_ms = self._timed_run_with_cpu()   # on the replica's model thread, one request at a time
        return {"service_ms": service_ms, "cpu_ms": cpu_ms, "solo_ms": self.solo_ms, **self.environment,
                **thread_shim_counts()}


def _build_torch_model(workload: str, cuda_graph: bool = False):
    """Random-weight torch versions of the calibrated workloads; returns (a function doing one request,
    how it runs). cuda_graph: the BERT forward is captured once on a side stream and replayed (one
    launch per request); if capture fails, it runs eager and says so."""
    import torch

    torch.manual_seed(0)
    if workload == "bert_base_b1":       # 12-layer BERT-base encoder, fp16, batch 1, sequence 128
        layer = torch.nn.TransformerEncoderLayer(768, 12, 3072, batch_first=True)
        model = torch.nn.TransformerEncoder(layer, 12).cuda().half().eval()
        x = torch.randn(1, 128, 768, device="cuda", dtype=torch.half)

        def run_once():
            with torch.no_grad():
                model(x)
            torch.cuda.synchronize()
        if not cuda_graph:
            return run_once, "eager"
        stream = torch.cuda.Stream()
        try:
            with torch.no_grad(), torch.cuda.stream(stream):
                for _ in range(3):
                    model(x)
                stream.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, stream=stream):
                    model(x)
        except Exception as exc:  # the model still serves, eager
            torch.cuda.synchronize()
            return run_once, f"eager (CUDA graph capture failed: {type(exc).__name__})"

        def replay_once():
            with torch.cuda.stream(stream):
                graph.replay()
            stream.synchronize()
        return replay_once, "CUDA graph"
    if workload == "elementwise_mul_1gib":   # memory-bound: one pass over 1 GiB of fp32
        x = torch.ones(2 ** 28, device="cuda")

        def run_once():
            x.mul_(1.0001)
            torch.cuda.synchronize()
        return run_once, "eager"
    raise ValueError(f"no torch model for workload {workload!r}")


def train(seconds: float) -> dict:
    """The best-effort Ray task: training steps on its own TPC slice."""
    from lithos_ray.demo import TrainingJob
    return TrainingJob().train(seconds)


async def drive(handle, rate_per_s: float, seconds: float, seed: int) -> tuple[list[float], list[dict]]:
    """Open-loop Poisson requests; returns end-to-end latencies (ms) seen by the caller and the replies."""
    rng = np.random.default_rng(seed)
    latencies_ms: list[float] = []
    replies: list[dict] = []

    async def one(arrival_s: float) -> None:
        replies.append(await handle.remote())
        latencies_ms.append((time.monotonic() - arrival_s) * 1000)

    tasks, arrival_s = [], time.monotonic()
    end_s = arrival_s + seconds
    while True:
        arrival_s += rng.exponential(1.0 / rate_per_s)
        if arrival_s >= end_s:
            break
        await asyncio.sleep(max(0.0, arrival_s - time.monotonic()))
        tasks.append(asyncio.create_task(one(arrival_s)))
    await asyncio.gather(*tasks)
    return latencies_ms, replies


async def drive_all(handles: dict, seconds: float, rate_scale: float) -> dict[str, tuple[list[float], list[dict]]]:
    results = await asyncio.gather(*(drive(handles[m.name], m.rate_per_s * rate_scale, seconds, seed)
                                     for seed, m in enumerate(MODELS)))
    return {m.name: r for m, r in zip(MODELS, results)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="how long to send requests (default 10)")
    parser.add_argument("--simulate", default=None, help="simulated GPUs, e.g. H100:1 (default: the real GPU, "
                        "or a simulated H100 when this machine has none)")
    parser.add_argument("--rate-scale", type=float, default=1.0, help="multiply every model's request rate "
                        "(default 1: 100 requests/s in all, which a 2-core machine's Serve routing still keeps up with)")
    parser.add_argument("--cuda-graphs", action="store_true", help="real GPU: the BERT replicas replay a CUDA graph "
                        "of their forward (one launch per request) instead of running it eagerly")
    args = parser.parse_args()
    if not (args.seconds > 0 and args.rate_scale > 0):
        parser.error("--seconds and --rate-scale must be > 0")

    import ray
    from ray import serve

    import lithos_ray.serve as lithos_serve
    from lithos_ray.config import NAMESPACE
    from lithos_ray.dashboard import start_dashboard
    from lithos_ray.gpus import detect_gpus
    from lithos_ray.node import MPS_DIR, node_gpus, ray_node_options, start_agents, start_node_mps, stop_agents, worker_env
    from lithos_ray.status import cluster_status, format_table

    simulate = args.simulate
    if simulate is None and not detect_gpus():
        simulate = "H100:1"
        print("No NVIDIA GPU here: running on a SIMULATED H100; service times are [simulated].")
    gpus = node_gpus(simulate)[:1]
    label = " [simulated]" if gpus[0].simulated else ""
    os.environ.update({**worker_env(gpus), **start_node_mps(gpus)})
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    logging.getLogger("ray.serve").setLevel(logging.ERROR)
    ray.init(address="local", num_cpus=2, namespace=NAMESPACE, include_dashboard=False, logging_level=logging.ERROR,
             log_to_driver=False, **ray_node_options(gpus))
    try:
        start_agents(ray.get_runtime_context().get_node_id(), gpus)
        print(f"lithos page: {start_dashboard(port=0)}")
        serve.start(proxy_location="Disabled")
        handles = {}
        for m in MODELS:
            app = lithos_serve.deployment(ModelServer, tpc=m.tpcs, slo_ms=m.slo_ms, name=m.name, num_replicas=1,
                                          max_ongoing_requests=MAX_ONGOING_REQUESTS, latency_window_s=min(3600.0, args.seconds + 60), ray_actor_options={"num_cpus": 0}).bind(m.workload, args.cuda_graphs)
            handles[m.name] = serve.run(app, name=m.name, route_prefix=None)
        training = ray.remote(train).options(resources={"lithos_tpc": TRAINING_TPCS}, num_cpus=0).remote(args.seconds)
        print(format_table(cluster_status()))

        print(f"\nSending requests for {args.seconds:g} s while training runs ...")
        driven = asyncio.run(drive_all(handles, args.seconds, args.rate_scale))
        steps = ray.get(training)
        print(f"\n{'model':<10} {'TPCs':>4} {'SLO':>6} {'rate':>6} {'served':>6}   "
              f"{'caller p50/p99 ms':>18}   {'replica p50/p99 ms':>18}   {'replica within SLO':>18}")
        for m in MODELS:
            replica = handles[m.name].lithos_latency_summary.remote().result()
            caller = np.asarray(driven[m.name][0])
            caller_p = [np.percentile(caller, q) if caller.size else None for q in (50, 99)]
            attainment = replica["slo_attainment"]
            print(f"{m.name:<10} {m.tpcs:>4} {m.slo_ms:>4g}ms {m.rate_per_s * args.rate_scale:>4g}/s {caller.size:>6}   "
                  f"{_ms(caller_p[0]):>8}/{_ms(caller_p[1]):<9}   {_ms(replica['p50_ms']):>8}/{_ms(replica['p99_ms']):<9}   "
                  f"{'-' if attainment is None else f'{100 * attainment:.1f}%':>18}{label}")
        print(f"training  {TRAINING_TPCS:>4} best-effort: {steps['steps']} steps, {steps['steps_per_s']:.1f} steps/s{label}")
        if steps.get("launch_paths") is not None:
            print(f"training launches by path: {steps['launch_paths']} (unconfined: on the whole GPU)")
        print("Caller latency adds Serve's routing in this process; replica latency is a request's time in the "
              "replica, waiting for the model included (what the SLO policy and the metrics see).")
        print("\nService time: the model's run alone; slice busy = rate x mean service time; CPU: the serving "
              "thread's CPU time in the run (far below it: the thread waited on a lock or the GIL; close to it: it computed, or CUDA spin-waited for the GPU).")
        print(f"{'model':<10} {'solo service ms':>15} {'service p50/p99 ms under load':>30} {'CPU p50 ms':>10} "
              f"{'slice busy':>10}   replica env")
        for m in MODELS:
            replies = driven[m.name][1]
            if not replies:
                print(f"{m.name:<10} {'-':>15}")
                continue
            service = np.asarray([r["service_ms"] for r in replies])
            busy = m.rate_per_s * args.rate_scale * float(service.mean()) / 1000
            env = f"{replies[0]['mode']}, " + ", ".join(f"{k}={'yes' if v else 'no'}" for k, v in replies[0].items()
                                                        if k in ("mps", "shim"))
            env += f", launches by path (a thread's): {replies[-1]['launch_paths']}"
            if replies[-1].get("lending"):
                env += f", lending outcomes: { {k: v for k, v in replies[-1]['lending'].items() if v} }"
            cpu = np.asarray([r["cpu_ms"] for r in replies])
            print(f"{m.name:<10} {replies[0]['solo_ms']:>15.2f} {np.percentile(service, 50):>14.2f}/{np.percentile(service, 99):<15.2f}"
                  f"{np.percentile(cpu, 50):>10.2f} {busy:>10.0%}{' (overloaded)' if busy > 1 else ''}   {env}{label}")
    finally:
        serve.shutdown()
        stop_agents()
        ray.shutdown()
        if not gpus[0].simulated:
            from lithos_ray.mps import stop_mps
            stop_mps(str(MPS_DIR))
    return 0


def _ms(value) -> str:
    """A latency for the table; '-' when nothing was measured (no request finished in the window)."""
    return "-" if value is None else f"{value:.2f}"


if __name__ == "__main__":
    raise SystemExit(main())
