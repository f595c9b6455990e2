"""What the co-location benchmark's CUDA graphs are made of: could the shim unroll their replays?

usage: python benchmarks/native/graph_nodes_probe.py OUT_DIR      (a GPU, torch, torchvision, transformers)
Why: a graph replay is longer than the atom and keeps its capture-time TPCs, so a service under
CUDA graphs never borrows. Unrolling (docs/SCHEDULER.md, "Next: letting a CUDA-graph service
borrow") would send each kernel of a replay through the launch path instead. Whether that works
depends on what the graphs hold: node types, dependencies, kernels' launch attributes (clusters,
cooperative), whether their parameter layouts can be read, and how many kernels a replay has.
How: the services of benchmarks/colocate (ResNet-50 batch 8 and BERT-base batch 1 x 128, fp16) are
captured with torch.cuda.CUDAGraph(keep_graph=True) and their cudaGraph_t walked with the driver
API; the replay is also timed (median of 50). No shim, no MPS.
Writes OUT_DIR/graph_nodes_probe.json: per service, node counts by type, edges (and whether the
graph is a chain), kernels with a cluster attribute, cooperative or with no readable parameter
layout, grid sizes, the replay's median ms.
"""
import collections
import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", ".."))
from common import metadata, write_json  # noqa: E402

SERVICES = (("resnet50", 8, 0), ("bert_base", 1, 128))
REPLAYS = 50
WARMUP_ITERS = 20


def walk(graph_handle: int) -> dict:
    """Node types, edges and kernel facts of one cudaGraph_t (as an int handle)."""
    from cuda.bindings import driver as cu
    from lithos_ray.native import cuda_check as check
    graph = cu.CUgraph(graph_handle)
    _, count = check(cu.cuGraphGetNodes(graph, 0))
    nodes, count = check(cu.cuGraphGetNodes(graph, count))
    nodes = nodes[:count]
    dependencies = {}
    try:   # a lossy query (edges with data, e.g. programmatic dependent launches) raises: recorded
        n_edges = int(check(cu.cuGraphGetEdges(graph, 0))[-1])
        found = check(cu.cuGraphGetEdges(graph, n_edges)) if n_edges else ([], [])
        into = collections.Counter(int(t) for t in found[1][:n_edges])
        out_of = collections.Counter(int(f) for f in found[0][:n_edges])
        dependencies = {"edges": n_edges, "most_dependencies": max(into.values(), default=0),
                        "chain": max(into.values(), default=0) <= 1 and max(out_of.values(), default=0) <= 1}
    except RuntimeError as exc:
        dependencies = {"edges_error": str(exc)}
    types = collections.Counter()
    kernels = {"count": 0, "with_cluster_attribute": 0, "cooperative": 0, "func_unset": 0, "grid_blocks": [],
               "param_layout_unread": 0}   # no parameters, or a layout cuFuncGetParamInfo cannot give (the shim's rule)
    for node in nodes:
        kind = check(cu.cuGraphNodeGetType(node))
        types[kind.name] += 1
        if kind != cu.CUgraphNodeType.CU_GRAPH_NODE_TYPE_KERNEL:
            continue
        kernels["count"] += 1
        params = check(cu.cuGraphKernelNodeGetParams(node))
        kernels["grid_blocks"].append(int(params.gridDimX) * int(params.gridDimY) * int(params.gridDimZ))
        if int(params.func):
            err, _, _ = cu.cuFuncGetParamInfo(params.func, 0)
            kernels["param_layout_unread"] += int(err) != 0
        else:
            kernels["func_unset"] += 1
        for attribute, key in ((cu.CUkernelNodeAttrID.CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION, "with_cluster_attribute"),
                               (cu.CUkernelNodeAttrID.CU_LAUNCH_ATTRIBUTE_COOPERATIVE, "cooperative")):
            err, value = cu.cuGraphKernelNodeGetAttribute(node, attribute)
            if int(err) != 0:
                continue
            if key == "cooperative":
                kernels[key] += int(value.cooperative) != 0
            else:
                dims = value.clusterDim
                kernels[key] += int(dims.x) * int(dims.y) * int(dims.z) > 1
    blocks = sorted(kernels.pop("grid_blocks"))
    kernels["grid_blocks_p50"] = blocks[len(blocks) // 2] if blocks else None
    kernels["grid_blocks_max"] = blocks[-1] if blocks else None
    return {"nodes": count, **dependencies, "types": dict(types), "kernels": kernels}


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__.split("\n\n")[1].splitlines()[0])
    out_dir = sys.argv[1]
    import torch
    from benchmarks.colocate.models import build_service
    results = {}
    for name, batch, seq_len in SERVICES:
        entry = results[name] = {}
        try:
            stream = torch.cuda.Stream()
            with torch.inference_mode(), torch.cuda.stream(stream):
                forward, entry["description"] = build_service(name, batch, seq_len)
                for _ in range(WARMUP_ITERS):
                    forward()
                stream.synchronize()
                graph = torch.cuda.CUDAGraph(keep_graph=True)
                with torch.cuda.graph(graph, stream=stream):
                    forward()
                entry.update(walk(int(graph.raw_cuda_graph())))
                graph.instantiate()
                times = []
                for _ in range(REPLAYS):
                    start = time.perf_counter()
                    graph.replay()
                    stream.synchronize()
                    times.append((time.perf_counter() - start) * 1e3)
                entry["replay_ms_median"] = statistics.median(times)
        except Exception as exc:  # a probe: record what failed, go on with the next service
            entry["error"] = repr(exc)
        print(name, json.dumps(entry), flush=True)
    payload = {**metadata(f"python benchmarks/native/graph_nodes_probe.py {out_dir}"),
               "what": __doc__.split("\n\n")[0], "services": results}
    write_json(os.path.join(out_dir, "graph_nodes_probe.json"), payload)


if __name__ == "__main__":
    main()
