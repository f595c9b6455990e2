"""One side of the reclaim probe (reclaim_probe.py): an unmodified CUDA client, lithos or not.

usage: reclaim_worker.py borrower START_AT_EPOCH_S STOP_AT_EPOCH_S FILL_US GRID
       reclaim_worker.py owner    START_AT_EPOCH_S WAKES CTAS GAP_MIN_MS GAP_MAX_MS SEED
borrower: launches `fill` kernels (GRID CTAs of one SM each, FILL_US long) from START_AT to STOP_AT,
    synchronizing every SYNC_EVERY launches, like a best-effort job.
owner: from START_AT, WAKES times: sleeps a random gap (idle), then launches `wake`, CTAS CTAs of one SM
    each (CTAS = the SMs of its quota). Each CTA writes %globaltimer and %smid when it starts and waits
    until every CTA has started, so the last start is when the owner held its whole quota.
Prints one JSON line. Times from %globaltimer (ns, one clock for every SM and process); the host launch
time is mapped onto it by the smallest (GPU stamp - host time before launch) of CALIBRATIONS stamp
kernels, so launch_to_*_us keep the launch latency above that floor.
"""
import json
import random
import sys
import time

import numpy as np
from cuda.bindings import driver as cu

sys.path.insert(0, __file__.rsplit("/benchmarks/", 1)[0])
from lithos_ray.native import compile_cubin, cuda_check as check  # noqa: E402

ONE_CTA_PER_SM_SHARED_BYTES = 150 * 1024   # more than half an H100 SM's 228 KiB: no second such CTA fits
THREADS = 128
SYNC_EVERY = 8
CALIBRATIONS = 64
GIVE_UP_NS = 200_000_000                   # a wake whose CTAs cannot all start in 200 ms reports a time-out

SOURCE = rb"""
__device__ __forceinline__ unsigned long long now_ns() {
  unsigned long long t; asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t)); return t; }
extern "C" __global__ void fill(unsigned long long ns) {
  extern __shared__ char keep[];
  unsigned long long t0 = now_ns(); while (now_ns() - t0 < ns) {}
  if (threadIdx.x == 100000) keep[0] = 0; }
extern "C" __global__ void stamp(unsigned long long* out) { if (threadIdx.x == 0) *out = now_ns(); }
extern "C" __global__ void wake(unsigned long long* start_ns, unsigned* sm, unsigned* arrived, unsigned ctas,
                                unsigned long long give_up_ns) {
  extern __shared__ char keep[];
  if (threadIdx.x == 0) {
    unsigned long long t0 = now_ns(); unsigned id; asm volatile("mov.u32 %0, %%smid;" : "=r"(id));
    start_ns[blockIdx.x] = t0; sm[blockIdx.x] = id; __threadfence(); atomicAdd(arrived, 1u);
    while (*(volatile unsigned*)arrived < ctas && now_ns() - t0 < give_up_ns) {}
  }
  __syncthreads();
  if (threadIdx.x == 100000) keep[0] = 0; }
"""


def params(*values):
    """A kernelParams array for 64-bit arguments (pointers and unsigned long long) and one 32-bit."""
    holders = [np.array([v], dtype=np.uint32 if isinstance(v, np.uint32) else np.uint64) for v in values]
    return holders, np.array([h.ctypes.data for h in holders], dtype=np.uint64)


def main():
    role, start_at = sys.argv[1], float(sys.argv[2])
    check(cu.cuInit(0))
    device = check(cu.cuDeviceGet(0))
    check(cu.cuCtxPushCurrent(check(cu.cuDevicePrimaryCtxRetain(device))))
    module = check(cu.cuModuleLoadData(compile_cubin(SOURCE, b"reclaim.cu")))
    fill, stamp, wake = (check(cu.cuModuleGetFunction(module, name)) for name in (b"fill", b"stamp", b"wake"))
    for function in (fill, wake):
        check(cu.cuFuncSetAttribute(function, cu.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                                    ONE_CTA_PER_SM_SHARED_BYTES))
    stream = check(cu.cuStreamCreate(cu.CUstream_flags.CU_STREAM_NON_BLOCKING))

    def launch(function, grid, kernel_params, shared=ONE_CTA_PER_SM_SHARED_BYTES):
        check(cu.cuLaunchKernel(function, grid, 1, 1, THREADS, 1, 1, shared, stream, kernel_params.ctypes.data, 0))

    if role == "borrower":
        stop_at, fill_us, grid = float(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])
        fill_holders, fill_params = params(int(fill_us * 1000))   # the holders keep the argument memory alive
        for _ in range(SYNC_EVERY):   # warm: the predictor learns the kernel before the owner wakes
            launch(fill, grid, fill_params)
        check(cu.cuStreamSynchronize(stream))
        while time.time() < start_at:
            time.sleep(0.0005)
        launches = 0
        while time.time() < stop_at:
            for _ in range(SYNC_EVERY):
                launch(fill, grid, fill_params)
            check(cu.cuStreamSynchronize(stream))
            launches += SYNC_EVERY
        print(json.dumps({"role": role, "launches": launches}), flush=True)
        return

    wakes, ctas, gap_min_ms, gap_max_ms, seed = (int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]),
                                                 float(sys.argv[6]), int(sys.argv[7]))
    stamp_out = check(cu.cuMemAlloc(8))
    stamp_holders, stamp_params = params(int(stamp_out))
    offsets = []
    for _ in range(CALIBRATIONS):
        before = time.time_ns()
        launch(stamp, 1, stamp_params, shared=0)
        check(cu.cuStreamSynchronize(stream))
        gpu = np.zeros(1, dtype=np.uint64)
        check(cu.cuMemcpyDtoH(gpu.ctypes.data, stamp_out, 8))
        offsets.append(int(gpu[0]) - before)
    offset = min(offsets)
    slots = wakes + 1                      # slot 0: a warm-up wake before START_AT (module loading, first launch)
    start_ns, sms, arrived = (check(cu.cuMemAlloc(n)) for n in (8 * slots * ctas, 4 * slots * ctas, 4 * slots))
    for pointer, n in ((start_ns, 8 * slots * ctas), (sms, 4 * slots * ctas), (arrived, 4 * slots)):
        check(cu.cuMemsetD8(pointer, 0, n))
    holders = [params(int(start_ns) + 8 * w * ctas, int(sms) + 4 * w * ctas, int(arrived) + 4 * w, np.uint32(ctas),
                      GIVE_UP_NS) for w in range(slots)]
    launch(wake, ctas, holders[0][1])
    check(cu.cuStreamSynchronize(stream))
    rng = random.Random(seed)
    gaps_ms = [rng.uniform(gap_min_ms, gap_max_ms) for _ in range(wakes)]
    while time.time() < start_at:
        time.sleep(0.0005)
    launched_ns = []
    for w in range(wakes):
        time.sleep(gaps_ms[w] / 1000)
        launched_ns.append(time.time_ns())
        launch(wake, ctas, holders[w + 1][1])
        check(cu.cuStreamSynchronize(stream))
    starts = np.zeros(slots * ctas, dtype=np.uint64)
    sm_ids = np.zeros(slots * ctas, dtype=np.uint32)
    check(cu.cuMemcpyDtoH(starts.ctypes.data, start_ns, starts.nbytes))
    check(cu.cuMemcpyDtoH(sm_ids.ctypes.data, sms, sm_ids.nbytes))
    starts, sm_ids = starts.reshape(slots, ctas)[1:].astype(np.int64), sm_ids.reshape(slots, ctas)[1:]
    host = np.asarray(launched_ns, dtype=np.int64) + offset
    print(json.dumps({
        "role": role, "wakes": wakes, "ctas": ctas, "gaps_ms": gaps_ms,
        "spread_us": ((starts.max(1) - starts.min(1)) / 1e3).tolist(),
        "launch_to_first_us": ((starts.min(1) - host) / 1e3).tolist(),
        "launch_to_full_us": ((starts.max(1) - host) / 1e3).tolist(),
        "distinct_sms": [len(set(row.tolist())) for row in sm_ids],
        "timed_out": int(np.count_nonzero(starts.max(1) - starts.min(1) >= GIVE_UP_NS)),
        "calibration_spread_us": (np.percentile(offsets, 50) - offset) / 1e3,
    }), flush=True)


if __name__ == "__main__":
    main()
