"""End-to-end step times: ResNet-50 training step and BERT-base inference (random weights).

usage: e2e_worker.py -> prints JSON {"resnet50_train_ms": [...], "bert_base_infer_ms": [...],
                                     "resnet50_train_side_stream_ms": [...], "bert_base_infer_side_stream_ms": [...]}
The *_side_stream runs do the same work inside `with torch.cuda.stream(torch.cuda.Stream())`: a
stream the program creates, which liblithos.so makes a green stream (no events per launch); the
plain runs use PyTorch's default stream (the legacy stream 0, which the shim must pair with events).

LITHOS_E2E_AB=1 (under liblithos.so): the default-stream steps only, 6x as many, in pairs of steps,
one with the shim's work on and one bypassed (lithos_client_set_bypass), the shim's first in even
pairs and second in odd ones; prints
{"resnet50_train_ms": {"shim": [...], "bypass": [...], "host_shim": [...], "host_bypass": [...],
"launches_per_step": N, "func_queries_per_step": N, "distinct_kernels": N[, "profile": {...}]}, "bert_base_infer_ms": {...}}:
host_* = time until the step returned, before the GPU finished; launches and driver queries of kernel
names per shim step (the ring's head; lithos_client_func_queries), kernels in the run's last records.

LITHOS_E2E_GREEN=1 (without the shim): the two steps on a stream of a green context holding every
co-scheduled 8-SM group (120 of 132 SMs on an H100), made here with cuda-python: the SMs a lithos
client granted those groups runs on, without the shim. Prints {"resnet50_train_ms": [...],
"bert_base_infer_ms": [...], "green_sms": N}.
"""
import ctypes
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from benchmarks.colocate.models import build_training  # noqa: E402

AB = os.environ.get("LITHOS_E2E_AB") == "1"
GREEN = os.environ.get("LITHOS_E2E_GREEN") == "1"
_shim = ctypes.CDLL(None) if AB else None
if AB:
    _shim.lithos_client_func_queries.restype = ctypes.c_uint64
# a LITHOS_PROFILE build of the shim (overhead.py --profile): cycles per launch-path section
PROFILE_SECTIONS = ("clock", "route", "lookup", "publish", "real_launch", "record", "bypass_real_launch")
_cycles, _passes = (ctypes.c_uint64 * len(PROFILE_SECTIONS))(), (ctypes.c_uint64 * len(PROFILE_SECTIONS))()
PROFILED = AB and _shim.lithos_client_profile(_cycles, _passes, len(PROFILE_SECTIONS)) == len(PROFILE_SECTIONS)


def profile_counters() -> np.ndarray:
    _shim.lithos_client_profile(_cycles, _passes, len(PROFILE_SECTIONS))
    return np.array([list(_cycles), list(_passes)], dtype=np.float64)


def tsc_ghz() -> float:
    """TSC ticks per ns, against perf_counter over 0.2 s (the profile's cycles are TSC ticks)."""
    _shim.lithos_client_tsc.restype = ctypes.c_uint64
    t0, c0 = time.perf_counter_ns(), _shim.lithos_client_tsc()
    time.sleep(0.2)
    return (_shim.lithos_client_tsc() - c0) / (time.perf_counter_ns() - t0)


def ring():
    from lithos_ray import native
    return native.LaunchRing(native.ring_path(os.environ[native.ENV_TABLE], int(os.environ[native.ENV_SLOT])))


def timed(fn, warmup, steps):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = {"shim": [], "bypass": [], "host_shim": [], "host_bypass": []} if AB else []
    if AB:
        profiled = {"shim": np.zeros((2, len(PROFILE_SECTIONS))), "bypass": np.zeros((2, len(PROFILE_SECTIONS)))}
        launch_ring = ring()
        head, queries = launch_ring.head(), _shim.lithos_client_func_queries()
    for i in range(6 * steps if AB else steps):
        # pair k = steps 2k and 2k+1; the shim's step goes first in even pairs, second in odd ones,
        # so an effect of the order within a pair cancels
        bypass = AB and (i % 2 == 1) != ((i // 2) % 2 == 1)
        if AB:
            _shim.lithos_client_set_bypass(int(bypass))
            before = profile_counters() if PROFILED else None
        start = time.perf_counter()
        fn()
        if AB:
            times["host_bypass" if bypass else "host_shim"].append((time.perf_counter() - start) * 1e3)
            if PROFILED:
                profiled["bypass" if bypass else "shim"] += profile_counters() - before
        torch.cuda.synchronize()
        if GREEN:   # a green context's stream: a device sync of the primary context may not wait for it
            torch.cuda.current_stream().synchronize()
        elapsed_ms = (time.perf_counter() - start) * 1e3
        if AB:
            times["bypass" if bypass else "shim"].append(elapsed_ms)
        else:
            times.append(elapsed_ms)
    if AB:
        _shim.lithos_client_set_bypass(0)
        shim_steps = len(times["shim"])
        end = launch_ring.head()
        records, _ = launch_ring.read(max(0, end - 4096), 4096)
        times.update(launches_per_step=(end - head) / shim_steps,
                     func_queries_per_step=(_shim.lithos_client_func_queries() - queries) / shim_steps,
                     distinct_kernels=len(set(records["function"].tolist())))
        if PROFILED:   # ns per pass of each section, and passes per step, by arm
            ticks_per_ns = tsc_ghz()
            times["profile"] = {arm: {name: {"ns_per_pass": float(c / p / ticks_per_ns) if p else None,
                                             "passes_per_step": float(p / shim_steps)}
                                      for name, c, p in zip(PROFILE_SECTIONS, *counters)}
                                for arm, counters in profiled.items()}
    return times


def cosched_green_stream():
    """(a torch stream of a green context of all co-scheduled 8-SM groups, its SM count)."""
    from cuda.bindings import driver as cu

    from lithos_ray.native import cosched_sm_groups, cuda_check, green_stream

    torch.zeros(1, device="cuda")   # the primary context, current on this thread
    device = cuda_check(cu.cuDeviceGet(torch.cuda.current_device()))
    groups = cosched_sm_groups(device)
    _, stream = green_stream(device, groups)
    return torch.cuda.ExternalStream(int(stream)), sum(int(g.sm.smCount) for g in groups)


def on_side_stream(make):
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        return make()


def resnet50():
    torch.manual_seed(0)
    step, _ = build_training("resnet50_train", 64, 0)
    return timed(step, 10, 40)


def bert_base():
    from transformers import BertConfig, BertModel
    torch.manual_seed(0)
    model = BertModel(BertConfig()).cuda().half().eval()
    ids = torch.randint(0, 30522, (8, 128), device="cuda")

    @torch.inference_mode()
    def step():
        model(input_ids=ids)
    return timed(step, 50, 60)   # BERT's steps settle after ~40 (H100)


if AB:
    print(json.dumps({"resnet50_train_ms": resnet50(), "bert_base_infer_ms": bert_base()}), flush=True)
elif GREEN:
    green_stream, green_sms = cosched_green_stream()
    with torch.cuda.stream(green_stream):
        print(json.dumps({"resnet50_train_ms": resnet50(), "bert_base_infer_ms": bert_base(), "green_sms": green_sms}),
              flush=True)
else:
    print(json.dumps({"resnet50_train_ms": resnet50(), "bert_base_infer_ms": bert_base(),
                      "resnet50_train_side_stream_ms": on_side_stream(resnet50),
                      "bert_base_infer_side_stream_ms": on_side_stream(bert_base)}), flush=True)
