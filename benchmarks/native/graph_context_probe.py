"""Can an instantiated CUDA graph's kernels move to another green context without a new capture?

usage: python benchmarks/native/graph_context_probe.py OUT_DIR      (a GPU, no MPS, no shim)
Why: a service's CUDA-graph replays keep the TPCs they were captured on, so they can never borrow
(docs/SCHEDULER.md, "CUDA-graph tails are queueing on the quota"). A kernel node's parameters
(CUDA_KERNEL_NODE_PARAMS_v2) have a `ctx` field, which the CUDA documentation says is ignored when
`func` is set and used with `kern` (a CUkernel of a library) when `func` is NULL. This probe checks
both forms: does setting `ctx` to another green context move an executable graph's kernels there,
and what does one node update cost?
How: per form (a module's CUfunction; a library's CUkernel launched as a function), a graph of 8
launches of a spin kernel that records each block's %smid, captured on a green context of 2
co-scheduled 8-SM groups (16 SMs); replayed; every kernel node of the executable graph re-pointed
(cuGraphExecKernelNodeSetParams; for the library form with func NULL and kern set) at a green context
of 8 groups (64 SMs) and replayed on the same stream and on the large context's stream; re-pointed
back; and the graph's own nodes re-pointed and instantiated again. Writes
OUT_DIR/graph_context_probe.json: per form and step, median ms per replay, the SMs the last replay
ran on, microseconds per node update, the node's func/kern as captured; a step that fails records
its error and the others still run.
"""
import json
import os
import statistics
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", ".."))
from common import metadata, write_json  # noqa: E402

BLOCKS = 1024          # 4 waves of 16 blocks per SM on 16 SMs, 1 wave on 64
CYCLES = 200_000       # about 0.1 ms per wave
KERNELS = 8
REPLAYS = 20
SOURCE = (b'extern "C" __global__ void spin(unsigned* sm_of_block, long long cycles){ unsigned s;'
          b' asm volatile("mov.u32 %0, %%smid;" : "=r"(s)); long long t0 = clock64();'
          b' while (clock64() - t0 < cycles) {} if (threadIdx.x == 0) sm_of_block[blockIdx.x] = s; }')


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__.split("\n\n")[1].splitlines()[0])
    out_dir = sys.argv[1]
    from cuda.bindings import driver as cu
    from lithos_ray.native import compile_cubin, cosched_sm_groups, cuda_check as check, green_stream

    check(cu.cuInit(0))
    device = check(cu.cuDeviceGet(0))
    check(cu.cuCtxPushCurrent(check(cu.cuDevicePrimaryCtxRetain(device))))
    cubin = compile_cubin(SOURCE, b"spin.cu")
    module_function = check(cu.cuModuleGetFunction(check(cu.cuModuleLoadData(cubin)), b"spin"))
    library_kernel = check(cu.cuLibraryGetKernel(check(cu.cuLibraryLoadData(cubin, [], [], 0, [], [], 0)), b"spin"))
    buffer = check(cu.cuMemAlloc(BLOCKS * 4))
    pointer = np.array([int(buffer)], dtype=np.uint64)
    cycles = np.array([CYCLES], dtype=np.int64)
    params = np.array([pointer.ctypes.data, cycles.ctypes.data], dtype=np.uint64)
    groups = cosched_sm_groups(device)
    small_green, small_stream = green_stream(device, groups[:2])
    large_green, large_stream = green_stream(device, groups[:8])

    def sms_seen(stream) -> list[int]:
        host = np.zeros(BLOCKS, dtype=np.uint32)
        check(cu.cuStreamSynchronize(stream))   # the current context is the primary, not the green one
        check(cu.cuMemcpyDtoH(host.ctypes.data, buffer, BLOCKS * 4))
        return sorted({int(s) for s in host})

    def replay(graph_exec, stream) -> dict:
        check(cu.cuGraphLaunch(graph_exec, stream))
        check(cu.cuStreamSynchronize(stream))
        times = []
        for _ in range(REPLAYS):
            start = time.perf_counter()
            check(cu.cuGraphLaunch(graph_exec, stream))
            check(cu.cuStreamSynchronize(stream))
            times.append((time.perf_counter() - start) * 1e3)
        check(cu.cuMemsetD32(buffer, 0xFFFFFFFF, BLOCKS))
        check(cu.cuGraphLaunch(graph_exec, stream))
        sms = sms_seen(stream)
        return {"replay_ms_median": statistics.median(times), "sms_seen": len(sms), "sm_ids": sms}

    forms = {}

    def step(steps, name, action):
        try:
            steps[name] = action()
        except Exception as exc:  # a probe: record what failed and go on
            steps[name] = {"error": repr(exc)}
        print(name, json.dumps({k: v for k, v in steps[name].items() if k != "sm_ids"}), flush=True)

    def direct(function, stream) -> dict:
        check(cu.cuMemsetD32(buffer, 0xFFFFFFFF, BLOCKS))
        start = time.perf_counter()
        for _ in range(KERNELS):
            check(cu.cuLaunchKernel(function, BLOCKS, 1, 1, 128, 1, 1, 0, stream, params.ctypes.data, 0))
        sms = sms_seen(stream)
        return {"ms": (time.perf_counter() - start) * 1e3, "sms_seen": len(sms), "sm_ids": sms}

    for form, function in (("module_function", module_function), ("library_kernel", cu.CUfunction(int(library_kernel)))):
        steps = forms[form] = {}
        print(f"--- {form}", flush=True)
        step(steps, "launches_on_small_context", lambda: direct(function, small_stream))
        step(steps, "launches_on_large_context", lambda: direct(function, large_stream))
        try:
            check(cu.cuStreamBeginCapture(small_stream, cu.CUstreamCaptureMode.CU_STREAM_CAPTURE_MODE_THREAD_LOCAL))
            for _ in range(KERNELS):
                check(cu.cuLaunchKernel(function, BLOCKS, 1, 1, 128, 1, 1, 0, small_stream, params.ctypes.data, 0))
            graph = check(cu.cuStreamEndCapture(small_stream))
            graph_exec = check(cu.cuGraphInstantiate(graph, 0))
            _, count = check(cu.cuGraphGetNodes(graph, 0))
            nodes, count = check(cu.cuGraphGetNodes(graph, count))
            kernel_nodes = [n for n in nodes[:count]
                            if check(cu.cuGraphNodeGetType(n)) == cu.CUgraphNodeType.CU_GRAPH_NODE_TYPE_KERNEL]
            captured = check(cu.cuGraphKernelNodeGetParams(kernel_nodes[0]))
            steps["captured_node"] = {"kernel_nodes": len(kernel_nodes), "func": hex(int(captured.func)),
                                      "kern": hex(int(captured.kern)), "ctx": hex(int(captured.ctx))}
        except Exception as exc:
            steps["capture"] = {"error": repr(exc)}
            continue

        def repoint(green, executable=True) -> dict:
            target = check(cu.cuCtxFromGreenCtx(green))
            start = time.perf_counter_ns()
            for node in kernel_nodes:
                node_params = check(cu.cuGraphKernelNodeGetParams(node))
                if form == "library_kernel":   # ctx is used only with kern and func NULL
                    node_params.func = cu.CUfunction(0)
                    node_params.kern = library_kernel
                node_params.ctx = target
                if executable:
                    check(cu.cuGraphExecKernelNodeSetParams(graph_exec, node, node_params))
                else:
                    check(cu.cuGraphKernelNodeSetParams(node, node_params))
            return {"us_per_node": (time.perf_counter_ns() - start) / 1000 / max(1, len(kernel_nodes))}

        def reinstantiate() -> dict:
            result = repoint(large_green, executable=False)
            start = time.perf_counter_ns()
            again = check(cu.cuGraphInstantiate(graph, 0))
            result["instantiate_us"] = (time.perf_counter_ns() - start) / 1000
            result.update(replay(again, small_stream))
            return result

        step(steps, "captured_on_small", lambda: replay(graph_exec, small_stream))
        step(steps, "repoint_exec_to_large", lambda: repoint(large_green))
        step(steps, "repointed_large_replayed_on_small_stream", lambda: replay(graph_exec, small_stream))
        step(steps, "repointed_large_replayed_on_large_stream", lambda: replay(graph_exec, large_stream))
        step(steps, "repoint_exec_back_to_small", lambda: repoint(small_green))
        step(steps, "repointed_back_replayed_on_small_stream", lambda: replay(graph_exec, small_stream))
        step(steps, "graph_repointed_to_large_and_instantiated_again", reinstantiate)

    verdict = {}
    for form, steps in forms.items():
        small = steps.get("captured_on_small", {})
        for how, name in (("exec_update", "repointed_large_replayed_on_small_stream"),
                          ("new_instance", "graph_repointed_to_large_and_instantiated_again")):
            moved = steps.get(name, {})
            if "replay_ms_median" in small and "replay_ms_median" in moved:
                verdict.setdefault(form, {})[how] = {
                    "refused": "error" in steps.get("repoint_exec_to_large", {}) if how == "exec_update" else False,
                    "kernels_moved": moved["sms_seen"] > small["sms_seen"],
                    "speedup": small["replay_ms_median"] / moved["replay_ms_median"]}
    payload = {**metadata(f"python benchmarks/native/graph_context_probe.py {out_dir}"),
               "what": __doc__.split("\n\n")[0], "blocks": BLOCKS, "cycles": CYCLES, "kernels": KERNELS,
               "replays": REPLAYS, "small_sms": 16, "large_sms": 64, "forms": forms,
               "verdict": verdict}
    write_json(os.path.join(out_dir, "graph_context_probe.json"), payload)
    print(json.dumps({"verdict": verdict}))


if __name__ == "__main__":
    main()
