"""Can a 16-CTA cluster run inside a green context, and on which SM groups? (the data a "wide" view needs)

usage: python benchmarks/native/wide_cluster_probe.py OUT_DIR      (a GPU, cuda-bindings; no MPS, no shim)
Why: cuDNN's Hopper convolution kernels of a ResNet-50 training step launch 4x4x1 clusters with one
CTA per SM (226 KiB of shared memory), which no 8-SM co-scheduled group holds, so they leave every
quota (leak_probe.py). Keeping them inside would need a view of larger co-scheduled groups.
How: the device's SMs are split into co-scheduled groups of at least 16 SMs (cuDevSmResourceSplitByCount,
flags 0, minCount 16), and, as the shim does, of 8. A kernel that records %smid per block is launched
with a 4x4x1 cluster (non-portable size allowed) and 200 KiB of dynamic shared memory (one CTA per SM,
as the cuDNN kernels) on green contexts of: one 8-SM group, two 8-SM groups, each 16-SM group, two
16-SM groups, and the whole device (primary context). For each: accepted or the CUresult, the SMs used.
Also: each 16-SM group's SMs, and which 8-SM groups lie inside it (from %smid in each group's context).
Writes OUT_DIR/wide_cluster_probe.json.
"""
import json
import os
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", ".."))
from common import metadata, write_json  # noqa: E402

SHARED_BYTES = 200 * 1024
CLUSTER = (4, 4, 1)
GRID = (32, 4, 1)          # 8 clusters of 16 CTAs


def main() -> None:
    out_dir = sys.argv[1] if len(sys.argv) > 1 else "."
    from cuda.bindings import driver as cu
    from lithos_ray.native import compile_cubin, cosched_sm_groups, cuda_check as check, green_stream
    check(cu.cuInit(0))
    device = check(cu.cuDeviceGet(0))
    check(cu.cuCtxPushCurrent(check(cu.cuDevicePrimaryCtxRetain(device))))
    # dynamic shared memory is reserved at launch whether used or not: 200 KiB leaves one CTA per SM
    source = (b'extern "C" __global__ void where(unsigned *sm_of_block){ unsigned s;'
              b' asm volatile("mov.u32 %0, %%smid;" : "=r"(s));'
              b' if (threadIdx.x == 0) sm_of_block[blockIdx.x + gridDim.x * blockIdx.y] = s; }')
    function = check(cu.cuModuleGetFunction(check(cu.cuModuleLoadData(compile_cubin(source, b"where.cu"))), b"where"))
    attr = cu.CUfunction_attribute
    check(cu.cuFuncSetAttribute(function, attr.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, SHARED_BYTES))
    check(cu.cuFuncSetAttribute(function, attr.CU_FUNC_ATTRIBUTE_NON_PORTABLE_CLUSTER_SIZE_ALLOWED, 1))
    blocks = GRID[0] * GRID[1]
    buffer = check(cu.cuMemAlloc(blocks * 4))
    pointer = np.array([int(buffer)], dtype=np.uint64)
    params = np.array([pointer.ctypes.data], dtype=np.uint64)

    def launch(stream, cluster=CLUSTER, shared=SHARED_BYTES) -> dict:
        config = cu.CUlaunchConfig()
        config.gridDimX, config.gridDimY, config.gridDimZ = GRID
        config.blockDimX, config.blockDimY, config.blockDimZ = 128, 1, 1
        config.sharedMemBytes = shared
        config.hStream = stream
        cluster_attr = cu.CUlaunchAttribute()
        cluster_attr.id = cu.CUlaunchAttributeID.CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION
        cluster_attr.value.clusterDim.x, cluster_attr.value.clusterDim.y, cluster_attr.value.clusterDim.z = cluster
        config.attrs = [cluster_attr]
        config.numAttrs = 1
        check(cu.cuMemsetD8(buffer, 0xff, blocks * 4))
        err, = cu.cuLaunchKernelEx(config, function, params.ctypes.data, 0)
        if int(err) != 0:
            return {"accepted": False, "error": str(err)}
        sync_err, = cu.cuStreamSynchronize(stream)
        if int(sync_err) != 0:
            return {"accepted": True, "error": f"at sync: {sync_err}"}
        host = np.zeros(blocks, dtype=np.uint32)
        check(cu.cuMemcpyDtoH(host.ctypes.data, buffer, blocks * 4))
        return {"accepted": True, "sms": sorted({int(x) for x in host})}

    def on_groups(groups, cluster=CLUSTER, shared=SHARED_BYTES) -> dict:
        try:
            green, stream = green_stream(device, list(groups))
        except RuntimeError as exc:
            return {"accepted": False, "error": f"green context: {exc}"}
        try:
            return launch(stream, cluster, shared)
        finally:
            cu.cuStreamDestroy(stream)
            cu.cuGreenCtxDestroy(green)

    wide = cosched_sm_groups(device, 16)
    narrow = cosched_sm_groups(device)
    # SMs of each group, from a plain (1x1x1, no shared memory) launch of the same kernel
    sms_of = lambda group: set(on_groups([group], (1, 1, 1), 0).get("sms", []))  # noqa: E731
    wide_sms = [sms_of(g) for g in wide]
    narrow_sms = [sms_of(g) for g in narrow]
    cases = {
        "whole_device": launch(check(cu.cuStreamCreate(cu.CUstream_flags.CU_STREAM_NON_BLOCKING))),
        "one_8sm_group": on_groups(narrow[:1]),
        "two_8sm_groups": on_groups(narrow[:2]),
        "two_8sm_groups_cluster_2x4": on_groups(narrow[:2], (2, 4, 1)),
    }
    for i, group in enumerate(wide):
        cases[f"16sm_group_{i}"] = on_groups([group])
    if len(wide) >= 2:
        cases["two_16sm_groups"] = on_groups(wide[:2])
    result = {**metadata("python benchmarks/native/wide_cluster_probe.py OUT_DIR"),
              "cluster": CLUSTER, "grid": GRID, "shared_bytes": SHARED_BYTES,
              "wide_groups": [{"sm_count": len(s), "sms": sorted(s),
                               "narrow_groups_inside": [j for j, n in enumerate(narrow_sms) if n and n <= s]}
                              for s in wide_sms],
              "narrow_groups": [sorted(s) for s in narrow_sms], "cases": cases}
    for name, case in cases.items():
        print(name, json.dumps({k: (len(v) if k == "sms" else v) for k, v in case.items()}), flush=True)
    print("16-SM groups:", [(w["sm_count"], w["narrow_groups_inside"]) for w in result["wide_groups"]], flush=True)
    write_json(os.path.join(out_dir, "wide_cluster_probe.json"), result)


if __name__ == "__main__":
    main()
