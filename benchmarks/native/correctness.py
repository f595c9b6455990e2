"""Correctness evidence: the same deterministic workloads with and without liblithos.so.

usage: python benchmarks/native/correctness.py OUT_DIR [TPCS] [--dispatch]
The shimmed run gets TPCs TPCS (default 0-31) and the probed co-scheduled map (no MPS needed).
Writes OUT_DIR/native_correctness.json and .png.
--dispatch: the shimmed run is a low-priority borrower with LITHOS_DISPATCH=1 and every other TPC
lent to it by an idle slot, so its launches are held, sent by the dispatcher thread and borrow;
writes native_correctness_dispatch.json and .png.
"""
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", ".."))
from common import last_json, metadata, write_json  # noqa: E402
from lithos_ray import native  # noqa: E402


def flatten(prefix, value, out):
    if isinstance(value, dict):
        for k, v in value.items():
            flatten(f"{prefix}.{k}" if prefix else k, v, out)
    else:
        out[prefix] = value
    return out


def run(env):
    proc = subprocess.run([sys.executable, os.path.join(HERE, "correctness_worker.py")], env=env, capture_output=True,
                          text=True, timeout=500)
    if proc.returncode != 0:
        return {"results": {}, "errors": {"process": proc.stderr[-1500:]}}, proc.stderr
    return last_json(proc.stdout), proc.stderr


def main(out_dir, *rest):
    dispatch = "--dispatch" in rest
    positional = [a for a in rest if a != "--dispatch"]
    tpcs_text = positional[0] if positional else "0-31"
    table = native.AllowanceTable.create(native._default_gpu_uuid())
    native.probe_layout_into(table)
    own = native.parse_tpcs(tpcs_text)
    table.set_allowance(0, own)
    extra_env = {}
    if dispatch:
        table.set_allowance(1, [t for t in range(table.tpcs_on_gpu) if t not in set(own)])
        table.set_lending(0, [1], low_priority=True)
        extra_env = {"LITHOS_DISPATCH": "1"}
    cosched_groups = table.cosched_groups()
    try:
        plain, plain_err = run(dict(os.environ))
        env = {**os.environ, **native.client_env(table.path, 0), **extra_env}
        shimmed, shim_err = run(env)
        records, _ = table.read_launches(0, max_records=4096)
    finally:
        table.close()
    a, b = flatten("", plain["results"], {}), flatten("", shimmed["results"], {})
    comparison = {k: {"plain": a.get(k), "shim": b.get(k), "identical": a.get(k) == b.get(k)} for k in sorted(set(a) | set(b))}
    views = {}
    for r in records:
        views[native.VIEW_NAMES[int(r["view"])]] = views.get(native.VIEW_NAMES[int(r["view"])], 0) + 1
    name = "native_correctness_dispatch" if dispatch else "native_correctness"
    payload = {**metadata(f"python benchmarks/native/correctness.py {out_dir} {tpcs_text}" + (" --dispatch" if dispatch else "")),
               "allowance_tpcs": tpcs_text, "cosched_groups": cosched_groups, "dispatch": dispatch,
               "shim_counts": shimmed.get("shim_counts"),
               "all_identical": all(v["identical"] for v in comparison.values()) and not plain["errors"] and not shimmed["errors"],
               "errors_plain": plain["errors"], "errors_shim": shimmed["errors"], "comparison": comparison,
               "launch_views_last_4096_records": views,
               "shim_stderr_tail": shim_err[-800:]}
    write_json(os.path.join(out_dir, name + ".json"), payload)
    print(json.dumps({k: v["identical"] for k, v in comparison.items()}, indent=0))
    print("errors plain:", plain["errors"], "\nerrors shim:", shimmed["errors"], "\nviews:", views)
    print("shim counts:", shimmed.get("shim_counts"))
    plot(comparison, os.path.join(out_dir, name + ".png"))


def plot(comparison, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(comparison)
    fig, ax = plt.subplots(figsize=(7, 0.25 * len(names) + 1))
    ax.barh(range(len(names)), [1] * len(names), color=["C2" if comparison[n]["identical"] else "C3" for n in names])
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.set_xticks([])
    ax.set_title("with vs without liblithos.so: green = bitwise identical, red = differs/failed")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main(*sys.argv[1:])
