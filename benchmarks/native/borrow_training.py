"""A best-effort training job on a few TPCs next to an idle lender: how much of the lender's TPCs it uses.

usage: python benchmarks/native/borrow_training.py OUT_DIR [--trials N] [--steps N] [--modes M,M...]
ResNet-50 training steps (batch 32, bf16 autocast, random weights) in a client of OWN TPCs, up to five
ways, each in its own process, in rounds (one of each per trial, so drift hits all alike):
  own_only        its own TPCs, no lend list
  own_held        its own TPCs, held launches, a lender that adds no TPCs: what the dispatcher thread
                  alone changes
  lending         an idle slot lends it every other TPC; launches decide at once (LITHOS_DISPATCH=0)
  held            the same with held launches (LITHOS_DISPATCH=1: the dispatcher thread sends each)
  whole_gpu       every TPC as its own allowance (not confined, so never held)
At batch 32 the step is partly host-bound, so whole_gpu is no upper bound for held launches: compare
held with own_held for what borrowing adds. Writes OUT_DIR/native_borrow_training.json and .png: median
ms per step of each (spread = min..max over trials), the share of the own_only -> whole_gpu gain each
lending mode captured, held's speed-up over own_held, and the shim's counts over each mode's timed
steps in the last trial (where launches went, what drained held launches). Without held launches the
counts are those of the program's thread only: PyTorch runs backward on its own thread, which they
miss; with held launches the dispatcher thread sends, and counts, every launch. Comparable across
modes: the share of the last 4096 launches (every thread's, from the slot's launch ring) that ran on
borrowed TPCs, per mode in the last trial.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", ".."))
from common import last_json, metadata, write_json  # noqa: E402
from lithos_ray import native  # noqa: E402

OWN_TPCS = 22
RING_WINDOW = 4096   # the last launches of a mode's run, every thread's, from its launch ring
MODES = ("own_only", "own_held", "lending", "held", "whole_gpu")
HELD_MODES = ("own_held", "held")

STEP_PROGRAM = r"""
import json, sys, time, torch
sys.path.insert(0, sys.argv[2])
from benchmarks.colocate.models import build_training
from lithos_ray.native import thread_shim_counts
steps = int(sys.argv[1])
stream = torch.cuda.Stream()
torch.manual_seed(0)
with torch.cuda.stream(stream):
    step, _ = build_training("resnet50_train", 32, 0)
    for _ in range(8):
        step()
    stream.synchronize()
    before = thread_shim_counts()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        stream.synchronize()
        times.append(time.perf_counter() - t)
print(json.dumps({"ms_per_step": 1e3 * sorted(times)[len(times) // 2], "before": before, "after": thread_shim_counts()}))
"""


def run_mode(table, mode, steps):
    own = list(range(table.tpcs_on_gpu)) if mode == "whole_gpu" else list(range(OWN_TPCS))
    table.set_allowance(0, own)
    if mode in ("lending", "held"):
        table.set_allowance(1, list(range(OWN_TPCS, table.tpcs_on_gpu)))
    elif mode in HELD_MODES:
        table.set_allowance(1, list(range(OWN_TPCS)))   # inside the borrower's own TPCs: lends nothing
    if mode in ("lending", *HELD_MODES):
        table.set_lending(0, [1], low_priority=True)
    env = {**os.environ, **native.client_env(table.path, 0), "LITHOS_DISPATCH": "1" if mode in HELD_MODES else "0",
           "LITHOS_SAMPLE_EVERY": "8"}
    try:
        proc = subprocess.run([sys.executable, "-c", STEP_PROGRAM, str(steps), os.path.join(HERE, "..", "..")], env=env, capture_output=True, text=True,
                              timeout=240)
    finally:
        table.set_lending(0, [], low_priority=False)
        table.clear(1)
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} failed:\n{proc.stderr[-3000:]}")
    result = last_json(proc.stdout)
    ring = native.LaunchRing(native.ring_path(table.path, 0))
    records, _ = ring.read(max(0, ring.head() - RING_WINDOW), RING_WINDOW)
    result["ring_launches"] = len(records)
    result["ring_borrowed_share"] = float(np.mean(records["lender_slots_used"] != 0)) if len(records) else None
    return result


def counts_delta(result):
    """The shim's counts over the timed steps (after minus before; zeros left out)."""
    before, after = result.get("before") or {}, result.get("after") or {}
    return {group: {k: v - (before.get(group) or {}).get(k, 0) for k, v in (after.get(group) or {}).items()
                    if v - (before.get(group) or {}).get(k, 0)}
            for group in after}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--modes", default=",".join(MODES), help="comma list of " + ", ".join(MODES) + " (default all)")
    args = parser.parse_args()
    modes = [m for m in MODES if m in args.modes.split(",")]
    unknown = set(args.modes.split(",")) - set(MODES)
    if unknown or not {"own_only", "whole_gpu"} <= set(modes):
        parser.error(f"--modes {args.modes!r}: choose from {', '.join(MODES)}; own_only and whole_gpu are required "
                     "(the gain is measured between them)")
    if args.trials < 1 or args.steps < 1:
        parser.error("--trials and --steps must be at least 1")
    table = native.AllowanceTable.create(native._default_gpu_uuid())
    native.probe_layout_into(table)
    per_mode = {m: [] for m in modes}
    last, ring_share = {}, {}
    try:
        for trial in range(args.trials):
            for mode in modes:
                result = run_mode(table, mode, args.steps)
                per_mode[mode].append(result["ms_per_step"])
                last[mode] = counts_delta(result)
                ring_share[mode] = {"launches": result["ring_launches"], "borrowed_share": result["ring_borrowed_share"]}
                print(f"trial {trial} {mode}: {result['ms_per_step']:.2f} ms/step", flush=True)
        tpcs_on_gpu = table.tpcs_on_gpu
    finally:
        table.close()
    median = {m: statistics.median(v) for m, v in per_mode.items()}
    gain = median["own_only"] - median["whole_gpu"]
    captured = {m: (median["own_only"] - median[m]) / gain if gain > 0 else None
                for m in ("lending", "held") if m in median}
    payload = {**metadata(f"python benchmarks/native/borrow_training.py {args.out_dir} --trials {args.trials} "
                          f"--steps {args.steps} --modes {','.join(modes)}"),
               "workload": "ResNet-50 training step, batch 32, bf16 autocast, channels_last, SGD momentum",
               "own_tpcs": OWN_TPCS, "lender_tpcs": tpcs_on_gpu - OWN_TPCS, "trials": args.trials, "steps": args.steps,
               "ms_per_step_median": median,
               "ms_per_step_spread": {m: [min(v), max(v)] for m, v in per_mode.items()},
               "ms_per_step_trials": per_mode,
               "gain_captured": captured,
               "held_speedup_over_own_held": (median["own_held"] / median["held"]
                                              if {"own_held", "held"} <= set(median) else None),
               "shim_counts_last_trial": last,
               "ring_borrowed_last_trial": ring_share}
    write_json(os.path.join(args.out_dir, "native_borrow_training.json"), payload)
    print(json.dumps({"median": median, "gain_captured": payload["gain_captured"]}, indent=1))
    plot(payload, os.path.join(args.out_dir, "native_borrow_training.png"))


def plot(payload, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    median, spread = payload["ms_per_step_median"], payload["ms_per_step_spread"]
    modes = [m for m in MODES if m in median]
    colors = {"own_only": "C7", "own_held": "C7", "lending": "C0", "held": "C2", "whole_gpu": "C1"}
    fig, ax = plt.subplots(figsize=(1.3 * len(modes) + 1.3, 3.2))
    ax.bar(range(len(modes)), [median[m] for m in modes], color=[colors[m] for m in modes],
           yerr=[[median[m] - spread[m][0] for m in modes], [spread[m][1] - median[m] for m in modes]], capsize=4)
    labels = {"own_only": f"own {payload['own_tpcs']} TPCs", "own_held": f"own {payload['own_tpcs']} TPCs\n(held launches)",
              "lending": "+ idle lender\n(decide at launch)", "held": "+ idle lender\n(held launches)",
              "whole_gpu": "whole GPU"}
    ax.set_xticks(range(len(modes)), [labels[m] for m in modes], fontsize=8)
    ax.set_ylabel("ms per training step (median)")
    ax.set_title(f"ResNet-50 training next to an idle lender ({payload['gpu']}, {payload['git_commit']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
