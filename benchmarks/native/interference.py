"""Why a latency-critical BERT slows next to a best-effort matmul job on disjoint TPCs (the Serve
example on the H100: 5 ms solo, ~60 ms with the training task running). Under MPS, one process at a
time each: a BERT-base request loop (fp16, batch 1, seq 128, synchronised per request) on 16 TPCs,
next to a bf16 matmul loop on 28 other TPCs, in several configurations. The *_graph cases replay the
request as a CUDA graph, and set the matmul job against a memory-bound one (a 1 GiB copy loop) and
the co-location benchmark's ResNet-50 training step, on the same 28 TPCs: which kind of neighbour
slows a graph service on TPCs of its own (compute, memory bandwidth, or both)?

usage: python benchmarks/native/interference.py OUT_DIR [CASE,CASE...]   (GPU machine; default every case)
       python benchmarks/native/interference.py --plot JSON  (redraws JSON's plot beside it)
Writes OUT_DIR/native_interference.json and .png (native_interference_some.* when cases are named).
"""
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", ".."))
from common import last_json, metadata, replot_beside, write_json  # noqa: E402
from lithos_ray import mps, native  # noqa: E402

REQUESTS = 150

LC_CODE = r"""
import json, sys, threading, time, torch
from lithos_ray.native import thread_shim_counts
stream_kind, requests, new_thread, gap_s = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1", float(sys.argv[4]) / 1000
graph_mode = len(sys.argv) > 5 and sys.argv[5] == "graph"
layer = torch.nn.TransformerEncoderLayer(768, 12, 3072, batch_first=True)
model = torch.nn.TransformerEncoder(layer, 12).cuda().half().eval()
x = torch.randn(1, 128, 768, device="cuda", dtype=torch.half)
stream = torch.cuda.Stream() if stream_kind == "created" or graph_mode else torch.cuda.current_stream()
forward = lambda: model(x)
if graph_mode:   # the request as one CUDA graph replay, as the co-location benchmark's graph variant
    with torch.no_grad(), torch.cuda.stream(stream):
        for _ in range(3): model(x)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph, stream=stream):
        model(x)
    forward = graph.replay
ms, enqueue_ms, counts = [], [], {}
def request(i):   # one forward; enqueue = until the forward returns (the launches), the rest waits for the GPU
    with torch.no_grad(), torch.cuda.stream(stream):
        t = time.perf_counter()
        forward()
        queued = time.perf_counter()
        stream.synchronize()
        if i >= 20:
            ms.append((time.perf_counter() - t) * 1000)
            enqueue_ms.append((queued - t) * 1000)
    counts.update(thread_shim_counts())
for i in range(20 + requests):
    if new_thread:   # a fresh thread per request, as a server's worker pool may give
        worker = threading.Thread(target=request, args=(i,))
        worker.start()
        worker.join()
    else:
        request(i)
    time.sleep(gap_s)
ms.sort()
enqueue_ms.sort()
print(json.dumps({"p50_ms": ms[len(ms) // 2], "p90_ms": ms[int(len(ms) * 0.9)], "p99_ms": ms[int(len(ms) * 0.99)],
                  "enqueue_p50_ms": enqueue_ms[len(ms) // 2], **counts}))
"""

BE_CODE = r"""
import json, signal, sys, time, torch
from lithos_ray.native import thread_shim_counts
kind = sys.argv[1]   # an int n: n x n bf16 matmuls; "membw": a 1 GiB copy; "membw_kernel": the same bytes by a kernel;
                     # "resnet50_train": the benchmark's training step
if kind in ("membw", "membw_kernel"):
    a, b = torch.empty(1 << 29, device="cuda", dtype=torch.half), torch.empty(1 << 29, device="cuda", dtype=torch.half)
    work = (lambda: b.copy_(a)) if kind == "membw" else (lambda: torch.neg(a, out=b))
elif kind == "resnet50_train":
    sys.path.insert(0, sys.argv[2])
    from benchmarks.colocate.models import build_training
    work, _ = build_training("resnet50_train", 64, 0)
else:
    a = torch.randn(int(kind), int(kind), device="cuda", dtype=torch.bfloat16)
    work = lambda: a @ a
for _ in range(3): work()
torch.cuda.synchronize()
steps, start = 0, time.monotonic()
def report(*_):
    print(json.dumps({"steps_per_s": steps / (time.monotonic() - start),
                      **thread_shim_counts()}), flush=True)
    sys.exit(0)
signal.signal(signal.SIGTERM, report)
print("ready", flush=True)
while True:
    for _ in range(4): work()
    torch.cuda.synchronize()
    steps += 4
"""

def case(stream="legacy", be_size=8192, shim=True, lc_count=1, borrowers="", new_thread=False, gap_ms=0, lc_mode="eager",
         be_env=None):
    """stream: the LC's ("legacy" = default stream, "created"); be_size: the BE job, an n x n bf16 matmul,
    "membw" (a 1 GiB copy loop: cuMemcpyDtoDAsync), "membw_kernel" (the same bytes moved by an elementwise
    kernel) or "resnet50_train" (the co-location benchmark's, batch 64) (None: no BE
    job); lc_count 2: a second BERT on 16 more TPCs, as in the Serve example; borrowers: "" nobody,
    "all", "lc" or "be", with lend lists as the agent's lending loop sets them (each LC may borrow from
    the other LC and the BE job; the BE job, low priority, from both LCs); new_thread: each request
    in a fresh thread; gap_ms: idle time after each request; lc_mode "graph": the request is one CUDA
    graph replay (on a created stream); be_env: more environment for the BE job (e.g. a shim knob)."""
    return dict(stream=stream, be_size=be_size, shim=shim, lc_count=lc_count, borrowers=borrowers,
                new_thread=new_thread, gap_ms=gap_ms, lc_mode=lc_mode, be_env=be_env or {})


# (A busy Python thread in the LC process, run at 61b50f4, costs 124-132 ms per request whatever
# else runs: native_interference_61b50f4.json.)
CASES = {
    "lc_solo_legacy": case(be_size=None),
    "lc_legacy_be8192": case(),
    "two_lc_legacy": case(be_size=None, lc_count=2),
    "two_lc_legacy_be8192": case(lc_count=2),
    "two_lc_legacy_be8192_lending": case(lc_count=2, borrowers="all"),
    "two_lc_legacy_be8192_lending_lc": case(lc_count=2, borrowers="lc"),
    "two_lc_legacy_be8192_lending_be": case(lc_count=2, borrowers="be"),
    "no_shim_lc_legacy_be8192": case(shim=False),
    "lc_created_be8192": case(stream="created"),
    "lc_legacy_be8192_thread_per_request": case(new_thread=True),
    "no_shim_lc_legacy_be8192_thread_per_request": case(shim=False, new_thread=True),
    "lc_legacy_be8192_gap25ms": case(gap_ms=25),
    "lc_legacy_be8192_thread_per_request_gap25ms": case(new_thread=True, gap_ms=25),
    "lc_solo_graph": case(be_size=None, lc_mode="graph"),
    "lc_graph_be8192": case(lc_mode="graph"),
    "lc_graph_be_membw": case(be_size="membw", lc_mode="graph"),
    "lc_graph_be_membw_copies_unrouted": case(be_size="membw", lc_mode="graph", be_env={"LITHOS_ROUTE_MEMORY_OPS": "0"}),
    "lc_graph_be_membw_kernel": case(be_size="membw_kernel", lc_mode="graph"),
    "lc_graph_be_resnet50_train": case(be_size="resnet50_train", lc_mode="graph"),
}


def main(out_dir, only=None):
    run_dir = tempfile.mkdtemp(prefix="lithos-mps-interference-")
    mps_env = mps.start_mps(run_dir)
    table = native.AllowanceTable.create(native._default_gpu_uuid(), tempfile.mkdtemp(prefix="lithos-interference-"))
    native.probe_layout_into(table)
    groups = [sorted(tpcs) for _, tpcs in sorted(table.cosched_groups().items())]
    lc_tpcs, be_tpcs = sum(groups[:4], []), sum(groups[4:11], [])   # whole groups, as Ray grants (16 and 28)
    table.set_allowance(0, lc_tpcs)
    table.set_allowance(1, be_tpcs)
    table.set_allowance(2, sum(groups[11:15], []))                  # the second LC, when a case has one
    results = {}
    try:
        for name, c in CASES.items():
            if only and name not in only:
                continue
            stream_kind, be_size, shim, lc_count = c["stream"], c["be_size"], c["shim"], c["lc_count"]
            lc_borrow, be_borrow = c["borrowers"] in ("all", "lc"), c["borrowers"] in ("all", "be")
            table.set_lending(0, [1, 2] if lc_borrow else [], low_priority=False)
            table.set_lending(2, [0, 1] if lc_borrow else [], low_priority=False)
            table.set_lending(1, [0, 2] if be_borrow else [], low_priority=True)
            base = {**os.environ, **mps_env}

            def env_for(slot):
                return {**base, **native.client_env(table.path, slot)} if shim else base
            lc_env, lc2_env = env_for(0), env_for(2)
            be_env = {**env_for(1), **c["be_env"]}
            be = None
            if be_size:
                be = subprocess.Popen([sys.executable, "-c", BE_CODE, str(be_size), os.path.join(HERE, "..", "..")],
                                      env=be_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                assert be.stdout.readline().strip() == "ready", be.stderr.read()
            start = time.monotonic()
            lc_args = [sys.executable, "-c", LC_CODE, stream_kind, str(REQUESTS), str(int(c["new_thread"])), str(c["gap_ms"]),
                       c["lc_mode"]]
            second = (subprocess.Popen(lc_args, env=lc2_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                      if lc_count == 2 else None)
            lc = subprocess.run(lc_args, env=lc_env, capture_output=True, text=True, timeout=240)
            second_out = second.communicate(timeout=240)[0] if second else None
            be_out = None
            if be:
                be.terminate()
                be_out = be.communicate(timeout=60)[0]
            if lc.returncode != 0:
                results[name] = {"error": lc.stderr[-1500:]}
            else:
                results[name] = {**last_json(lc.stdout), "seconds": time.monotonic() - start,
                                 "lithos_notices": sorted({l for l in lc.stderr.splitlines() if l.startswith("lithos:")})}
                if second_out:
                    results[name]["second_lc"] = last_json(second_out)
                if be_out and be_out.strip().splitlines()[-1].startswith("{"):
                    results[name]["be"] = last_json(be_out)
            print(name, results[name], flush=True)
    finally:
        table.close()
        mps.stop_mps(run_dir)
    stem = "native_interference_some" if only else "native_interference"
    payload = {**metadata(" ".join(["python benchmarks/native/interference.py", out_dir] + ([",".join(only)] if only else []))),
               "lc": f"BERT-base fp16 batch 1 seq 128 (nn.TransformerEncoder), {REQUESTS} requests, TPCs {lc_tpcs} "
                     f"(a second one, in two_lc cases: slot 2, co-scheduled groups 11-14)",
               "be": f"bf16 square matmuls (or a 1 GiB copy, or a ResNet-50 training step where a case says so), 4 per "
                     f"synchronize, TPCs {be_tpcs}", "mps": True, "results": results}
    write_json(os.path.join(out_dir, stem + ".json"), payload)
    plot(payload, os.path.join(out_dir, stem + ".png"))


def plot(payload: dict, path: str) -> None:
    """BERT p50 per configuration, as a multiple of its solo p50 under the shim."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    results = {k: v for k, v in payload["results"].items() if "p50_ms" in v}
    reference = "lc_solo_legacy" if "lc_solo_legacy" in results else next(iter(results))
    solo = results[reference]["p50_ms"]
    names = list(results)
    fig, ax = plt.subplots(figsize=(9, 4))
    ax.barh(names, [results[n]["p50_ms"] / solo for n in names], color=["tab:red" if "lending" in n else
                                                                          "tab:gray" if n.startswith("no_shim") else
                                                                          "tab:blue" for n in names])
    for i, n in enumerate(names):
        ax.text(results[n]["p50_ms"] / solo, i, f" {results[n]['p50_ms']:.1f} ms", va="center", fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel(f"BERT request p50 / {reference} p50 ({solo:.2f} ms), log scale")
    ax.set_title(f"LC BERT next to a bf16 matmul job, MPS ({payload['gpu']}, {payload['git_commit']})", fontsize=9)
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--plot":
        replot_beside(sys.argv[2], plot)
    elif len(sys.argv) in (2, 3) and not sys.argv[1].startswith("-"):
        unknown = set(sys.argv[2].split(",")) - set(CASES) if len(sys.argv) == 3 else set()
        if unknown:
            sys.exit(f"unknown cases {sorted(unknown)}; cases: {', '.join(CASES)}")
        main(sys.argv[1], sys.argv[2].split(",") if len(sys.argv) == 3 else None)
    else:
        sys.exit(__doc__)
