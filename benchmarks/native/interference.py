"""Why a latency-critical BERT slows next to a best-effort matmul job on disjoint TPCs (the Serve
example on the H100: 5 ms solo, ~60 ms with the training task running). Under MPS, one process at a
time each: a BERT-base request loop (fp16, batch 1, seq 128, synchronised per request) on 16 TPCs,
next to a bf16 matmul loop on 28 other TPCs, in several configurations.

usage: python benchmarks/native/interference.py OUT_DIR      (GPU machine)
       python benchmarks/native/interference.py --plot JSON  (redraws JSON's plot beside it)
Writes OUT_DIR/native_interference.json and .png.
"""
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", ".."))
from common import metadata, replot_beside, write_json  # noqa: E402
from lithos_ray import mps, native  # noqa: E402

REQUESTS = 150

LC_CODE = r"""
import json, sys, time, torch
from lithos_ray.native import thread_launch_counts, thread_lending_counts
stream_kind = sys.argv[1]
layer = torch.nn.TransformerEncoderLayer(768, 12, 3072, batch_first=True)
model = torch.nn.TransformerEncoder(layer, 12).cuda().half().eval()
x = torch.randn(1, 128, 768, device="cuda", dtype=torch.half)
stream = torch.cuda.Stream() if stream_kind == "created" else torch.cuda.current_stream()
ms = []
with torch.no_grad(), torch.cuda.stream(stream):
    for i in range(20 + int(sys.argv[2])):
        t = time.perf_counter()
        model(x)
        stream.synchronize()
        if i >= 20:
            ms.append((time.perf_counter() - t) * 1000)
ms.sort()
print(json.dumps({"p50_ms": ms[len(ms) // 2], "p90_ms": ms[int(len(ms) * 0.9)],
                  "launch_paths": thread_launch_counts(), "lending": thread_lending_counts()}))
"""

BE_CODE = r"""
import json, signal, sys, time, torch
from lithos_ray.native import thread_launch_counts, thread_lending_counts
n = int(sys.argv[1])
a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
for _ in range(3): a @ a
torch.cuda.synchronize()
steps, start = 0, time.monotonic()
def report(*_):
    print(json.dumps({"matmuls_per_s": steps / (time.monotonic() - start), "launch_paths": thread_launch_counts(),
                      "lending": thread_lending_counts()}), flush=True)
    sys.exit(0)
signal.signal(signal.SIGTERM, report)
print("ready", flush=True)
while True:
    for _ in range(4): a @ a
    torch.cuda.synchronize()
    steps += 4
"""

# name -> (LC stream, BE matmul size or None, shim on, LC processes at once: 2 = a second BERT on
#          16 more TPCs, as in the Serve example, who borrows: "" nobody, "all", "lc" or "be")
# Borrowers get lend lists as the agent's lending loop sets them: each LC may borrow from the other LC
# and the BE job; the BE job, low priority, from both LCs. (A busy Python thread in the LC process, run
# at 61b50f4, costs 124-132 ms per request whatever else runs: native_interference_61b50f4.json.)
CASES = {
    "lc_solo_legacy": ("legacy", None, True, 1, ""),
    "lc_legacy_be8192": ("legacy", 8192, True, 1, ""),
    "two_lc_legacy": ("legacy", None, True, 2, ""),
    "two_lc_legacy_be8192": ("legacy", 8192, True, 2, ""),
    "two_lc_legacy_be8192_lending": ("legacy", 8192, True, 2, "all"),
    "two_lc_legacy_be8192_lending_lc": ("legacy", 8192, True, 2, "lc"),
    "two_lc_legacy_be8192_lending_be": ("legacy", 8192, True, 2, "be"),
    "no_shim_lc_legacy_be8192": ("legacy", 8192, False, 1, ""),
    "lc_created_be8192": ("created", 8192, True, 1, ""),
}


def main(out_dir):
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
        for name, (stream_kind, be_size, shim, lc_count, borrowers) in CASES.items():
            lc_borrow, be_borrow = borrowers in ("all", "lc"), borrowers in ("all", "be")
            table.set_lending(0, [1, 2] if lc_borrow else [], low_priority=False)
            table.set_lending(2, [0, 1] if lc_borrow else [], low_priority=False)
            table.set_lending(1, [0, 2] if be_borrow else [], low_priority=True)
            base = {**os.environ, **mps_env}

            def env_for(slot):
                return {**base, **native.client_env(table.path, slot)} if shim else base
            lc_env, lc2_env = env_for(0), env_for(2)
            be_env = env_for(1)
            be = None
            if be_size:
                be = subprocess.Popen([sys.executable, "-c", BE_CODE, str(be_size)], env=be_env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True)
                assert be.stdout.readline().strip() == "ready", be.stderr.read()
            start = time.monotonic()
            lc_args = [sys.executable, "-c", LC_CODE, stream_kind, str(REQUESTS)]
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
                results[name] = {**json.loads(lc.stdout.strip().splitlines()[-1]), "seconds": time.monotonic() - start,
                                 "lithos_notices": sorted({l for l in lc.stderr.splitlines() if l.startswith("lithos:")})}
                if second_out:
                    results[name]["second_lc"] = json.loads(second_out.strip().splitlines()[-1])
                if be_out and be_out.strip().splitlines()[-1].startswith("{"):
                    results[name]["be"] = json.loads(be_out.strip().splitlines()[-1])
            print(name, results[name], flush=True)
    finally:
        table.close()
        mps.stop_mps(run_dir)
    payload = {**metadata("python benchmarks/native/interference.py " + out_dir),
               "lc": f"BERT-base fp16 batch 1 seq 128 (nn.TransformerEncoder), {REQUESTS} requests, TPCs {lc_tpcs} "
                     f"(a second one, in two_lc cases: slot 2, co-scheduled groups 11-14)",
               "be": f"bf16 square matmuls, 4 per synchronize, TPCs {be_tpcs}", "mps": True, "results": results}
    write_json(os.path.join(out_dir, "native_interference.json"), payload)
    plot(payload, os.path.join(out_dir, "native_interference.png"))


def plot(payload: dict, path: str) -> None:
    """BERT p50 per configuration, as a multiple of its solo p50 under the shim."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    results = {k: v for k, v in payload["results"].items() if "p50_ms" in v}
    solo = results["lc_solo_legacy"]["p50_ms"]
    names = list(results)
    fig, ax = plt.subplots(figsize=(9, 4))
    ax.barh(names, [results[n]["p50_ms"] / solo for n in names], color=["tab:red" if "lending" in n else
                                                                          "tab:gray" if n.startswith("no_shim") else
                                                                          "tab:blue" for n in names])
    for i, n in enumerate(names):
        ax.text(results[n]["p50_ms"] / solo, i, f" {results[n]['p50_ms']:.1f} ms", va="center", fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel(f"BERT request p50 / solo p50 ({solo:.2f} ms), log scale")
    ax.set_title(f"LC BERT next to a bf16 matmul job, MPS ({payload['gpu']}, {payload['git_commit']})", fontsize=9)
    ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--plot":
        replot_beside(sys.argv[2], plot)
    elif len(sys.argv) == 2:
        main(sys.argv[1])
    else:
        sys.exit(__doc__)
