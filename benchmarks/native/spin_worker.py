"""An unmodified CUDA client: launches a full-occupancy spin kernel on an ordinary stream.

Knows nothing about lithos; under the shim its launches run on its allowance.
usage: spin_worker.py BLOCKS START_AT_EPOCH_S SECONDS TAG [--per-launch]
prints one JSON line: ms per launch (one wave when BLOCKS = 16 x allowed SMs).
"""
import json
import sys
import time

import numpy as np
from cuda.bindings import driver as cu, nvrtc


def check(result):
    err, rest = (result[0], result[1:]) if isinstance(result, tuple) else (result, ())
    if int(err) != 0:
        raise RuntimeError(f"{err}")
    return rest[0] if len(rest) == 1 else rest


blocks, start_at, seconds, tag = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
per_launch = "--per-launch" in sys.argv
check(cu.cuInit(0))
device = check(cu.cuDeviceGet(0))
check(cu.cuCtxPushCurrent(check(cu.cuDevicePrimaryCtxRetain(device))))
stream = check(cu.cuStreamCreate(cu.CUstream_flags.CU_STREAM_NON_BLOCKING))
source = b'extern "C" __global__ void spin(long long cycles){ long long t0 = clock64(); while (clock64() - t0 < cycles) {} }'
program = check(nvrtc.nvrtcCreateProgram(source, b"spin.cu", 0, [], []))
check(nvrtc.nvrtcCompileProgram(program, 1, [b"--gpu-architecture=sm_90"]))
cubin = b" " * check(nvrtc.nvrtcGetCUBINSize(program))
check(nvrtc.nvrtcGetCUBIN(program, cubin))
function = check(cu.cuModuleGetFunction(check(cu.cuModuleLoadData(cubin)), b"spin"))
cycles = np.array([400000], dtype=np.int64)
params = np.array([cycles.ctypes.data], dtype=np.uint64)


def launch():
    check(cu.cuLaunchKernel(function, blocks, 1, 1, 128, 1, 1, 0, stream, params.ctypes.data, 0))


launch()
check(cu.cuStreamSynchronize(stream))
while time.time() < start_at:
    time.sleep(0.001)
samples = []
t0 = time.time()
launches = 0
while time.time() - t0 < seconds:
    if per_launch:
        t = time.perf_counter()
        launch()
        check(cu.cuStreamSynchronize(stream))
        samples.append((time.monotonic_ns(), (time.perf_counter() - t) * 1e3))
        launches += 1
    else:
        for _ in range(20):
            launch()
        check(cu.cuStreamSynchronize(stream))
        launches += 20
elapsed_ms = (time.time() - t0) * 1e3
per_launch_ms = [ms for _, ms in samples]
print(json.dumps({"tag": tag, "blocks": blocks, "launches": launches, "ms_per_launch": elapsed_ms / launches,
                  "host_ms_per_synced_launch_median": float(np.median(per_launch_ms)) if samples else None}), flush=True)
