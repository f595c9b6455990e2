"""Enforcement evidence: unmodified clients under MPS + liblithos.so run on exactly their allowance.

usage: python benchmarks/native/enforce.py OUT_DIR
Writes OUT_DIR/native_enforcement.json and .png.
"""
import json
import os

import numpy as np
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from common import last_json, metadata, replot_beside, write_json  # noqa: E402
from lithos_ray import mps, native  # noqa: E402

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "spin_worker.py")
SECONDS = 2.0


def run_clients(table, mps_env, clients, per_launch=False, seconds=SECONDS, during=None, extra_env=None, ring_slot=None):
    """clients: list of (slot, tpc_ids, tag); kernels sized to one wave on the allowance.

    during(start_at) runs in a thread (it changes allowances); with ring_slot, that slot's launch
    ring is read every 20 ms while the clients run (the ring holds 4096 records)."""
    start_at = time.time() + 6.0
    procs = []
    for slot, tpc_ids, tag in clients:
        table.set_allowance(slot, tpc_ids)
        env = {**os.environ, **mps_env, **native.client_env(table.path, slot), **(extra_env or {})}
        args = [sys.executable, WORKER, str(16 * 2 * len(tpc_ids)), str(start_at), str(seconds), tag]
        procs.append(subprocess.Popen(args + (["--per-launch"] if per_launch else []), env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    events, records = [], []
    thread = threading.Thread(target=lambda: events.extend(during(start_at))) if during else None
    if thread:
        thread.start()
    if ring_slot is not None:
        ring = native.LaunchRing(native.ring_path(table.path, ring_slot))
        next_index = ring.head()
        while any(proc.poll() is None for proc in procs):
            batch, next_index = ring.read(next_index, 4096)
            records.extend(batch)
            time.sleep(0.02)
        batch, next_index = ring.read(next_index, 4096)
        records.extend(batch)
    if thread:
        thread.join()
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        if proc.returncode != 0:
            raise RuntimeError(f"client failed rc={proc.returncode}: {err[-2000:]}")
        results.append(last_json(out))
        results[-1]["stderr"] = err.strip()[-300:]
    return (results, events, records) if ring_slot is not None else (results, events)


def main(out_dir: str) -> None:
    uuid = native._default_gpu_uuid()
    table = native.AllowanceTable.create(uuid)
    native.probe_layout_into(table)
    cosched_map = table.cosched_map()
    run_dir = tempfile.mkdtemp(prefix="lithos-mps-")
    mps_env = mps.start_mps(run_dir)
    scenarios = {}
    try:
        r22 = list(range(0, 22))
        scenarios["solo_22tpc"], _ = run_clients(table, mps_env, [(0, r22, "solo22")])
        scenarios["two_disjoint_22tpc"], _ = run_clients(table, mps_env, [(0, r22, "A"), (1, list(range(22, 44)), "B")])
        scenarios["two_same_22tpc"], _ = run_clients(table, mps_env, [(0, r22, "A"), (1, r22, "B")])
        scenarios["solo_11tpc"], _ = run_clients(table, mps_env, [(0, list(range(0, 11)), "solo11")])
        scenarios["six_disjoint_11tpc"], _ = run_clients(
            table, mps_env, [(i, list(range(11 * i, 11 * i + 11)), f"C{i + 1}") for i in range(6)])

        def change(start_at):
            events = []
            time.sleep(max(0.0, start_at - time.time()) + 1.0)
            table.set_allowance(0, list(range(0, 11)))
            events.append({"monotonic_ns": time.monotonic_ns(), "tpcs": 11, "generation": table.allowance(0)[0]})
            time.sleep(1.0)
            table.set_allowance(0, r22)
            events.append({"monotonic_ns": time.monotonic_ns(), "tpcs": 22, "generation": table.allowance(0)[0]})
            return events

        results, events, records = run_clients(table, mps_env, [(0, r22, "change")], per_launch=True, seconds=3.0,
                                               during=change, extra_env={"LITHOS_SAMPLE_EVERY": "1"}, ring_slot=0)
        records = [r for r in records if r["kernel_name"] == b"spin"]
        # The first launch issued after each change: its generation, TPCs and GPU time.
        after = []
        for event in events:
            later = [r for r in records if int(r["host_ns"]) > event["monotonic_ns"]]
            first = later[0] if later else None
            after.append({"change": event, "first_launch_after": None if first is None else {
                "allowance_generation": int(first["allowance_generation"]), "tpcs": int(first["tpcs"]),
                "gpu_ms": int(first["gpu_ns"]) / 1e6, "view": native.VIEW_NAMES[int(first["view"])],
                "host_ns_after_change": int(first["host_ns"]) - event["monotonic_ns"]}})
        by_generation = {}
        for r in records:
            by_generation.setdefault(int(r["allowance_generation"]), []).append(int(r["gpu_ns"]) / 1e6)
        scenarios["allowance_change"] = {"client": results[0], "events": events, "first_launch_after_change": after,
                                         "gpu_ms_median_by_generation": {g: float(np.median(v)) for g, v in by_generation.items()},
                                         "launches_by_generation": {g: len(v) for g, v in by_generation.items()},
                                         "records": [{"host_ns": int(r["host_ns"]), "gpu_ms": int(r["gpu_ns"]) / 1e6,
                                                      "tpcs": int(r["tpcs"]), "generation": int(r["allowance_generation"])}
                                                     for r in records]}
    finally:
        mps.stop_mps(run_dir)
        table.close()
    payload = {**metadata("python benchmarks/native/enforce.py " + out_dir),
               "what": "spin kernel sized to one wave (16 blocks x 128 threads per allowed SM, 400k cycles); "
                       "clients are unmodified cuda-bindings programs under MPS with liblithos.so preloaded",
               "cosched_map": cosched_map, "scenarios": scenarios}
    write_json(os.path.join(out_dir, "native_enforcement.json"), payload)
    summary = {name: [(c["tag"], round(c["ms_per_launch"], 4)) for c in v]
               for name, v in scenarios.items() if isinstance(v, list) and v and isinstance(v[0], dict)}
    print(json.dumps(summary, indent=1))
    print(json.dumps(scenarios["allowance_change"]["first_launch_after_change"], indent=1))
    print(json.dumps(scenarios["allowance_change"]["gpu_ms_median_by_generation"], indent=1))
    plot(payload, os.path.join(out_dir, "native_enforcement.png"))


def plot(payload, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    s = payload["scenarios"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    names, values, colors = [], [], []
    for key, color in (("solo_22tpc", "C0"), ("two_disjoint_22tpc", "C1"), ("two_same_22tpc", "C3"),
                       ("solo_11tpc", "C0"), ("six_disjoint_11tpc", "C2")):
        for client in s[key]:
            names.append(f"{key}\n{client['tag']}")
            values.append(client["ms_per_launch"])
            colors.append(color)
    left.bar(range(len(values)), values, color=colors)
    left.set_xticks(range(len(values)), names, rotation=90, fontsize=6)
    left.set_ylabel("ms per one-wave launch")
    left.set_title("Clients under MPS + liblithos.so (H100)")
    records = [r for r in s["allowance_change"]["records"] if r["gpu_ms"] > 0]  # sampled launches only
    if records:
        t0 = records[0]["host_ns"]
        right.plot([(r["host_ns"] - t0) / 1e9 for r in records], [r["gpu_ms"] for r in records], ".", ms=2)
        for event in s["allowance_change"]["events"]:
            right.axvline((event["monotonic_ns"] - t0) / 1e9, color="k", ls="--")
            right.text((event["monotonic_ns"] - t0) / 1e9, 0.05, f" -> {event['tpcs']} TPCs", fontsize=8)
    right.set_xlabel("s")
    right.set_ylabel("GPU ms per launch (from the launch ring)")
    right.set_title("Allowance changed live: 22 -> 11 -> 22 TPCs")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--replot"]:  # redraw the figure from a stored JSON
        replot_beside(sys.argv[2], plot)
    else:
        main(sys.argv[1])
