"""Reclaim time on the GPU: from an owner's first launch after idling to its whole quota running its kernel.

usage: python benchmarks/native/reclaim_probe.py OUT_DIR [--wakes N] [--modes M,M...] [--fill-us US]
(a GPU, cuda-bindings, the shim built, MPS binaries; about 1 minute)
An owner client holds OWNER_GROUPS co-scheduled 8-SM groups and idles for 3-12 ms between wakes; a
best-effort borrower holds every other TPC and launches `fill` kernels of one CTA per SM over the whole
GPU without pause (reclaim_worker.py). At each wake the owner launches a kernel of one CTA per SM of its
quota whose CTAs each stamp %globaltimer as they start and wait for all the others: its last start is
when the owner had its whole quota back. Modes, each a fresh pair of processes under one MPS daemon:
  owner_alone       the owner alone (the floor: launch latency)
  static            the borrower confined to its own TPCs, no lending
  lithos_held       the borrower may borrow the owner's idle TPCs; held launches (LITHOS_DISPATCH=1)
  lithos_at_launch  the same, deciding at launch time (LITHOS_DISPATCH=0)
  lithos_too_long   held, fill kernels of 4 atoms: predicted too long, so they must not borrow
  mps_only          neither under the shim (plain MPS: no quota, no reclaim bound)
Per mode: p50/p90/p99/max of launch_to_full_us (host launch -> last CTA start, mapped onto %globaltimer;
the floor is owner_alone's) and spread_us (first -> last CTA start, GPU only), and the share of the
borrower's launches that borrowed (its launch ring). Writes OUT_DIR/reclaim_probe.json and .png.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", ".."))
from common import last_json, metadata, write_json  # noqa: E402
from lithos_ray import mps, native  # noqa: E402

WORKER = os.path.join(HERE, "reclaim_worker.py")
MODES = ("owner_alone", "static", "lithos_held", "lithos_at_launch", "lithos_too_long", "mps_only")
OWNER_GROUPS = 3
SMS_PER_TPC = 2
BORROWER_SLOT, OWNER_SLOT = 0, 1
GAP_MS = (3.0, 12.0)
STARTUP_S = 4.0       # both processes past CUDA start-up and compilation before the first wake
WARM_S = 0.5          # the borrower runs alone this long before the owner's first wake


def percentiles(values) -> dict:
    v = np.asarray(values, dtype=float)
    return {"p50": float(np.percentile(v, 50)), "p90": float(np.percentile(v, 90)),
            "p99": float(np.percentile(v, 99)), "max": float(v.max())}


def split_quota(table) -> tuple[list[int], list[int]]:
    """(owner TPCs: the first OWNER_GROUPS co-scheduled groups, borrower TPCs: every other TPC)."""
    groups = table.cosched_groups()
    owner = sorted(t for g in sorted(groups)[:OWNER_GROUPS] for t in groups[g])
    return owner, [t for t in range(table.tpcs_on_gpu) if t not in owner]


def run_mode(table, mode, wakes, fill_us, mps_env, seed=0):
    """One mode (MODES) with `wakes` owner wakes and borrower kernels of `fill_us` (4 atoms for
    lithos_too_long); the owner's figures and the borrower's launch counts."""
    owner_tpcs, borrower_tpcs = split_quota(table)
    if mode == "lithos_too_long":
        fill_us = 4 * table.lending_knobs()["atom_ns"] / 1000
    table.set_allowance(OWNER_SLOT, owner_tpcs)
    table.set_allowance(BORROWER_SLOT, borrower_tpcs)
    lending = mode.startswith("lithos")
    table.set_lending(BORROWER_SLOT, [OWNER_SLOT] if lending else [], low_priority=lending)
    shim = mode != "mps_only"
    base = {**os.environ, **mps_env}
    owner_env = {**base, **native.client_env(table.path, OWNER_SLOT)} if shim else base
    borrower_env = {**base, **native.client_env(table.path, BORROWER_SLOT), "LITHOS_SAMPLE_EVERY": "1",
                    "LITHOS_DISPATCH": "0" if mode == "lithos_at_launch" else "1"} if shim else base
    start_at = time.time() + STARTUP_S
    stop_at = start_at + WARM_S + wakes * GAP_MS[1] / 1000 + 2.0
    grid = table.tpcs_on_gpu * SMS_PER_TPC
    procs = {"owner": subprocess.Popen([sys.executable, WORKER, "owner", str(start_at + WARM_S), str(wakes),
                                        str(len(owner_tpcs) * SMS_PER_TPC), str(GAP_MS[0]), str(GAP_MS[1]), str(seed)],
                                       env=owner_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)}
    if mode != "owner_alone":
        procs["borrower"] = subprocess.Popen([sys.executable, WORKER, "borrower", str(start_at), str(stop_at),
                                              str(fill_us), str(grid)],
                                             env=borrower_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    results, fills = {}, {"launches": 0, "borrowed": 0}
    reader = None
    if shim and "borrower" in procs:
        reader = threading.Thread(target=count_fills, args=(table, procs["borrower"], fills), daemon=True)
        reader.start()
    try:
        for name, proc in procs.items():
            out, err = proc.communicate(timeout=STARTUP_S + (stop_at - start_at) + 60)
            if proc.returncode != 0:
                raise RuntimeError(f"{mode}: the {name} failed:\n{err[-3000:]}")
            results[name] = last_json(out)
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
        table.set_lending(BORROWER_SLOT, [], low_priority=False)
    owner = results["owner"]
    row = {"fill_us": fill_us if mode != "owner_alone" else None,
           "launch_to_full_us": percentiles(owner["launch_to_full_us"]),
           "launch_to_first_us": percentiles(owner["launch_to_first_us"]),
           "spread_us": percentiles(owner["spread_us"]),
           "wakes_on_distinct_sms": sum(n == owner["ctas"] for n in owner["distinct_sms"]),
           "timed_out": owner["timed_out"], "calibration_spread_us": owner["calibration_spread_us"],
           "raw": {k: owner[k] for k in ("launch_to_full_us", "spread_us", "gaps_ms")}}
    if "borrower" in results:
        row["borrower_launches"] = results["borrower"]["launches"]
    if reader is not None:
        reader.join()
        row["borrower_ring_fills"] = fills["launches"]
        row["borrower_borrowed_share"] = fills["borrowed"] / fills["launches"] if fills["launches"] else None
    return row


def count_fills(table, borrower, counts, poll_s=0.1):
    """Counts the borrower's fill launches and those that borrowed, reading its launch ring (4096 records,
    under a second of fills) until the borrower exits."""
    ring = native.LaunchRing(native.ring_path(table.path, BORROWER_SLOT))
    index = ring.head()
    while True:
        done = borrower.poll() is not None
        while True:
            records, index = ring.read(index, 4096)
            fills = records[records["kernel_name"] == b"fill"]
            counts["launches"] += int(len(fills))
            counts["borrowed"] += int(np.count_nonzero(fills["lender_slots_used"]))
            if len(records) < 4096:
                break
        if done:
            return
        time.sleep(poll_s)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--wakes", type=int, default=300)
    parser.add_argument("--modes", default=",".join(MODES), help="comma list of " + ", ".join(MODES))
    parser.add_argument("--fill-us", type=float, default=100.0,
                        help="the borrower's kernel length in us on the whole GPU (default 100; on its own TPCs it "
                             "takes two waves, and the predictor's estimate for the union must fit the atom: 200 us "
                             "kernels never borrowed, reclaim_probe_fc8918f_fill200.json)")
    args = parser.parse_args()
    modes = [m for m in MODES if m in args.modes.split(",")]
    unknown = set(args.modes.split(",")) - set(MODES)
    if unknown or not modes:
        parser.error(f"--modes {args.modes!r}: choose from {', '.join(MODES)}")
    if args.wakes < 10 or args.fill_us <= 0:
        parser.error("--wakes must be at least 10 and --fill-us positive")
    # A private table: the default /dev/shm path belongs to a node's lithos agent.
    table = native.AllowanceTable.create(native._default_gpu_uuid(), tempfile.mkdtemp(prefix="lithos-reclaim-"))
    rows = {}
    try:
        native.probe_layout_into(table)           # before MPS: the probe reads %smid
        owner_tpcs, borrower_tpcs = split_quota(table)
        run_dir = tempfile.mkdtemp(prefix="lithos-mps-reclaim-")
        mps_env = mps.start_mps(run_dir)
        try:
            for i, mode in enumerate(modes):
                rows[mode] = run_mode(table, mode, args.wakes, args.fill_us, mps_env, seed=i)
                r = rows[mode]
                print(f"{mode}: launch->full p50 {r['launch_to_full_us']['p50']:.1f} p99 {r['launch_to_full_us']['p99']:.1f} "
                      f"max {r['launch_to_full_us']['max']:.1f} us; spread p99 {r['spread_us']['p99']:.1f} us; "
                      f"borrowed {r.get('borrower_borrowed_share')}; distinct-SM wakes {r['wakes_on_distinct_sms']}/{args.wakes}",
                      flush=True)
        finally:
            mps.stop_mps(run_dir)
        knobs = table.lending_knobs()
    finally:
        table.close()
    payload = {**metadata(f"python benchmarks/native/reclaim_probe.py OUT_DIR --wakes {args.wakes} "
                          f"--modes {','.join(modes)} --fill-us {args.fill_us}"),
               "owner_tpcs": len(owner_tpcs), "borrower_tpcs": len(borrower_tpcs), "gap_ms": GAP_MS,
               "atom_us": knobs["atom_ns"] / 1000, "idle_window_us": knobs["idle_window_ns"] / 1000,
               "modes": rows}
    write_json(os.path.join(args.out_dir, "reclaim_probe.json"), payload)
    plot(payload, os.path.join(args.out_dir, "reclaim_probe.png"))


def plot(payload, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for mode, row in payload["modes"].items():
        values = np.sort(row["raw"]["launch_to_full_us"])
        ax.plot(values, np.arange(1, len(values) + 1) / len(values), label=mode)
    ax.axvline(payload["atom_us"], color="k", linestyle=":", label=f"atom {payload['atom_us']:.0f} us")
    ax.set_xlim(left=0)
    ax.set_xlabel("owner's launch -> whole quota running (us, %globaltimer)")
    ax.set_ylabel("share of wakes")
    ax.set_title(f"Reclaim time, {payload['owner_tpcs']}-TPC owner ({payload['gpu']}, {payload['git_commit']})", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--replot":     # --replot RESULT.json: the plot again from stored data
        from common import replot_beside
        replot_beside(sys.argv[2], plot)
    else:
        main()
