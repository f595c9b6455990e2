"""One workload process of the co-location benchmark (GPU machine: torch, torchvision, transformers).

usage: python -m benchmarks.colocate.worker --workload NAME --batch N [--seq-len L] [--variants eager,graph]

Models are built from their configs with random weights (nothing downloaded). All GPU work runs on
a stream this process creates (under the lithos shim that is a green stream of the allowance).
Protocol: one JSON object per line. The worker prints {"ready": ...} once built and warmed up,
then answers each command read from stdin:
  {"cmd": "calibrate", "variant": V, "seconds": S}                -> {"service_ms": [...]}
  {"cmd": "serve", "variant": V, "rate_per_s": R, "seed": K, "start_at": T (time.time()),
   "warmup_s": W, "window_s": S, "drain_s": D}                      -> latencies of the window's requests
  {"cmd": "train", "start_at": T, "warmup_s": W, "window_s": S, "drain_s": D} -> step start/end times
  {"cmd": "exit"}
Library output goes to stderr; stdout carries only the protocol.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

_protocol = os.fdopen(os.dup(1), "w", buffering=1)
os.dup2(2, 1)  # anything a library prints goes to stderr

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks.colocate.metrics import arrival_schedule_s  # noqa: E402
from benchmarks.colocate.models import build_service, build_training  # noqa: E402
from lithos_ray.native import thread_shim_counts  # noqa: E402

EAGER_WARMUP_ITERS = 20
TRAIN_WARMUP_STEPS = 3


def reply(payload: dict) -> None:
    _protocol.write(json.dumps(payload) + "\n")


def counts_since(before: dict) -> dict | None:
    """The shim's counts of this thread since `before` (thread_shim_counts()); None without the shim."""
    after = thread_shim_counts()
    if after["launch_paths"] is None:
        return None
    return {group: {k: v - before[group].get(k, 0) for k, v in values.items()} for group, values in after.items()}


def wait_until(deadline: float) -> None:
    """Sleep until 1 ms before deadline (perf_counter), then spin: sub-ms accurate arrivals."""
    remaining = deadline - time.perf_counter()
    if remaining > 0.001:
        time.sleep(remaining - 0.001)
    while time.perf_counter() < deadline:
        pass


def to_perf(start_at_wall: float) -> float:
    return time.perf_counter() + (start_at_wall - time.time())


class Service:
    def __init__(self, name: str, batch: int, seq_len: int, variants: list[str]):
        self.stream = torch.cuda.Stream()
        self.runs, self.errors = {}, {}
        with torch.inference_mode(), torch.cuda.stream(self.stream):
            forward, self.description = build_service(name, batch, seq_len)
            for _ in range(EAGER_WARMUP_ITERS):
                forward()
            self.stream.synchronize()
            if "eager" in variants:
                self.runs["eager"] = forward
            if "graph" in variants:
                try:
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, stream=self.stream):
                        forward()
                    for _ in range(EAGER_WARMUP_ITERS):
                        graph.replay()
                    self.stream.synchronize()
                    self.runs["graph"] = graph.replay
                except Exception as exc:  # reported per variant; the eager variant still runs
                    self.errors["graph"] = f"CUDA graph capture failed: {exc!r}"
                    torch.cuda.synchronize()

    def run_once(self, variant: str) -> None:
        with torch.inference_mode(), torch.cuda.stream(self.stream):
            self.runs[variant]()
        self.stream.synchronize()

    def calibrate(self, cmd: dict) -> dict:
        variant = cmd["variant"]
        service_ms = []
        end = time.perf_counter() + float(cmd["seconds"])
        while time.perf_counter() < end:
            start = time.perf_counter()
            self.run_once(variant)
            service_ms.append((time.perf_counter() - start) * 1e3)
        return {"service_ms": service_ms}

    def serve(self, cmd: dict) -> dict:
        variant, warmup_s, window_s = cmd["variant"], float(cmd["warmup_s"]), float(cmd["window_s"])
        offsets = arrival_schedule_s(float(cmd["rate_per_s"]), warmup_s + window_s, int(cmd["seed"]))
        start = to_perf(float(cmd["start_at"]))
        cutoff = start + warmup_s + window_s + float(cmd["drain_s"])
        latency_ms, service_ms, unserved_wait_ms = [], [], []
        counts_before = thread_shim_counts()
        for offset in offsets:
            arrival = start + offset
            wait_until(arrival)
            begin = time.perf_counter()
            measured = offset >= warmup_s
            if begin > cutoff:  # the queue did not drain in time: this and later requests are unserved
                if measured:
                    unserved_wait_ms.append((cutoff - arrival) * 1e3)
                continue
            self.run_once(variant)
            done = time.perf_counter()
            if measured:
                latency_ms.append((done - arrival) * 1e3)
                service_ms.append((done - begin) * 1e3)
        measured_arrivals = int(np.count_nonzero(offsets >= warmup_s))
        return {"latency_ms": [round(v, 4) for v in latency_ms], "service_ms": [round(v, 4) for v in service_ms],
                "unserved": len(unserved_wait_ms), "unserved_wait_ms": [round(v, 3) for v in unserved_wait_ms],
                "arrivals": measured_arrivals, "window_s": window_s, "shim_counts": counts_since(counts_before)}


class Training:
    def __init__(self, name: str, batch: int, seq_len: int):
        self.stream = torch.cuda.Stream()
        with torch.cuda.stream(self.stream):
            self.step, self.description = build_training(name, batch, seq_len)
            for _ in range(TRAIN_WARMUP_STEPS):
                self.step()
        self.stream.synchronize()
        self.batch = batch

    def train(self, cmd: dict) -> dict:
        start = to_perf(float(cmd["start_at"]))
        window_start = start + float(cmd["warmup_s"])
        window_end = window_start + float(cmd["window_s"])
        stop = window_end + float(cmd["drain_s"])  # keep the interference up while services drain
        wait_until(start)
        starts, ends = [], []
        counts_before = thread_shim_counts()
        with torch.cuda.stream(self.stream):
            while time.perf_counter() < stop:
                begin = time.perf_counter()
                self.step()
                self.stream.synchronize()
                starts.append(begin - window_start)
                ends.append(time.perf_counter() - window_start)
        return {"step_start_s": [round(v, 6) for v in starts], "step_end_s": [round(v, 6) for v in ends],
                "window_s": float(cmd["window_s"]), "samples_per_step": self.batch,
                "shim_counts": counts_since(counts_before)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workload", required=True)
    parser.add_argument("--role", required=True, choices=("lc", "be"))
    parser.add_argument("--batch", type=int, required=True)
    parser.add_argument("--seq-len", type=int, default=0)
    parser.add_argument("--variants", default="eager,graph")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.backends.cudnn.benchmark = False
    built = time.perf_counter()
    try:
        if args.role == "lc":
            worker = Service(args.workload, args.batch, args.seq_len, args.variants.split(","))
            info = {"variants": sorted(worker.runs), "variant_errors": worker.errors}
        else:
            worker = Training(args.workload, args.batch, args.seq_len)
            info = {}
    except Exception as exc:
        reply({"ready": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-3000:]})
        return 1
    reply({"ready": True, "pid": os.getpid(), "build_s": round(time.perf_counter() - built, 2),
           "description": worker.description, "device": torch.cuda.get_device_name(), **info})
    handlers = {"calibrate": "calibrate", "serve": "serve", "train": "train"}
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["cmd"] == "exit":
            break
        try:
            reply(getattr(worker, handlers[cmd["cmd"]])(cmd))
        except Exception as exc:
            reply({"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-3000:]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
