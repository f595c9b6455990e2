"""Do device-to-device copies and memsets run on SMs, and does a green context confine them?

usage: python benchmarks/native/memory_op_probe.py OUT_DIR      (a GPU, cuda-bindings; no MPS, no shim)
Why: until 6301dff the shim sent kernels to its client's green stream but memsets and device-to-device copies
(cuMemsetD*Async, cuMemcpyDtoDAsync) to the app's own stream, as the driver would. Next to a copy
loop on other TPCs a CUDA-graph BERT ran 29x slower (native_interference_graph_eda366f_h200.json),
against 1.12x next to a matmul loop. If the driver copies with SM kernels, those run on the whole GPU.
How: a spin kernel holding every SM of a context (two CTAs of 1024 threads and 100 KiB of dynamic shared
memory per SM: no thread slot left for another CTA) runs SPIN_MS; while it runs, a 256 MiB copy or memset is issued on another stream, and the host polls
when each finishes. An operation that ends long before the spin did not need the spin's SMs. Cases:
the spin on the whole GPU (primary context), the operation on another stream of it: SMs or copy
engines?; the spin on one co-scheduled 8-SM group's green context, the operation on a second stream
of that green context (confined: it waits) and on the primary context (not confined: it does not).
Also each operation alone, on the whole GPU and on the 8-SM group, for its bandwidth.
Writes OUT_DIR/memory_op_probe.json. (memory_op_probe_0d77512.json came from a spin of one 128-thread CTA
per SM, which left thread slots free: the operations ran beside it, so its waited_for_the_spin says
nothing; its alone timings do. This version ran at 083c31c, memory_op_probe_083c31c.json: the operations
on the spin's green context waited for it, those on the primary context did not.)
"""
import json
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", ".."))
from common import metadata, write_json  # noqa: E402

SHARED_BYTES = 100 * 1024
SPIN_THREADS = 1024          # two such CTAs per SM take all 2048 thread slots of an H100 SM
SPIN_MS = 30.0
BYTES = 256 << 20


def main() -> None:
    out_dir = sys.argv[1] if len(sys.argv) > 1 else "."
    from cuda.bindings import driver as cu
    from lithos_ray.native import compile_cubin, cosched_sm_groups, cuda_check as check, green_stream
    check(cu.cuInit(0))
    device = check(cu.cuDeviceGet(0))
    check(cu.cuCtxPushCurrent(check(cu.cuDevicePrimaryCtxRetain(device))))
    attr = cu.CUdevice_attribute
    sm_count = check(cu.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, device))
    clock_khz = check(cu.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_CLOCK_RATE, device))
    source = (b'extern "C" __global__ void spin(long long cycles){ extern __shared__ char s[];'
              b' long long t = clock64(); while (clock64() - t < cycles) {} if (threadIdx.x == 1024) s[0] = 0; }')
    spin = check(cu.cuModuleGetFunction(check(cu.cuModuleLoadData(compile_cubin(source, b"spin.cu"))), b"spin"))
    check(cu.cuFuncSetAttribute(spin, cu.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                                SHARED_BYTES))
    cycles = np.array([int(SPIN_MS * clock_khz)], dtype=np.int64)
    spin_params = np.array([cycles.ctypes.data], dtype=np.uint64)
    src, dst = check(cu.cuMemAlloc(BYTES)), check(cu.cuMemAlloc(BYTES))
    check(cu.cuMemsetD8(src, 1, BYTES))
    operations = {
        "copy_dtod": lambda s: cu.cuMemcpyDtoDAsync(dst, src, BYTES, s),
        "memset_d32": lambda s: cu.cuMemsetD32Async(dst, 7, BYTES // 4, s),
        "memset_d8": lambda s: cu.cuMemsetD8Async(dst, 7, BYTES, s),
    }
    primary = check(cu.cuStreamCreate(cu.CUstream_flags.CU_STREAM_NON_BLOCKING))
    primary_2 = check(cu.cuStreamCreate(cu.CUstream_flags.CU_STREAM_NON_BLOCKING))
    group = cosched_sm_groups(device)[0]
    green, green_a = green_stream(device, [group])
    green_b = check(cu.cuGreenCtxStreamCreate(green, cu.CUstream_flags.CU_STREAM_NON_BLOCKING, 0))

    def finish_ms(event, t0) -> float:
        while int(cu.cuEventQuery(event)[0]) != 0:
            pass
        return (time.perf_counter() - t0) * 1e3

    def alone_ms(op, stream) -> float:
        check(op(stream))              # warm
        check(cu.cuStreamSynchronize(stream))
        t0 = time.perf_counter()
        for _ in range(5):
            check(op(stream))
        check(cu.cuStreamSynchronize(stream))
        return (time.perf_counter() - t0) * 1e3 / 5

    def behind_spin(op, spin_stream, spin_sms, op_stream) -> dict:
        done_spin, done_op = check(cu.cuEventCreate(0)), check(cu.cuEventCreate(0))
        t0 = time.perf_counter()
        check(cu.cuLaunchKernel(spin, 2 * spin_sms, 1, 1, SPIN_THREADS, 1, 1, SHARED_BYTES, spin_stream,
                                spin_params.ctypes.data, 0))
        check(cu.cuEventRecord(done_spin, spin_stream))
        time.sleep(0.003)              # the spin holds its SMs by now
        check(op(op_stream))
        check(cu.cuEventRecord(done_op, op_stream))
        op_ms = finish_ms(done_op, t0)
        spin_ms = finish_ms(done_spin, t0)
        check(cu.cuStreamSynchronize(op_stream))
        return {"op_done_ms": round(op_ms, 3), "spin_done_ms": round(spin_ms, 3),
                "waited_for_the_spin": op_ms >= spin_ms - 1.0}

    results = {}
    for name, op in operations.items():
        results[name] = {
            "alone_whole_gpu_ms": round(alone_ms(op, primary), 3),
            "alone_8sm_green_ms": round(alone_ms(op, green_a), 3),
            "spin_whole_gpu_op_whole_gpu": behind_spin(op, primary, sm_count, primary_2),
            "spin_8sm_green_op_same_green": behind_spin(op, green_a, 8, green_b),
            "spin_8sm_green_op_whole_gpu": behind_spin(op, green_a, 8, primary),
        }
        print(name, json.dumps(results[name]), flush=True)
    result = {**metadata("python benchmarks/native/memory_op_probe.py OUT_DIR"), "bytes": BYTES,
              "spin_ms": SPIN_MS, "sm_count": sm_count, "operations": results}
    write_json(os.path.join(out_dir, "memory_op_probe.json"), result)


if __name__ == "__main__":
    main()
