"""Which of a training step's kernels leave their quota (run unconfined on the whole GPU), and why?

usage: python benchmarks/native/leak_probe.py OUT_DIR [--steps N]   (a GPU, torch, torchvision, transformers)
Why: in the co-location runs the ResNet-50 training job's shim printed "kernel sm90_xmma_dgrad/wgrad...
failed in its green context (CUresult 912): it runs unconfined", so some cuDNN kernels ran over the
services' TPCs in every backward step (a quota leak, and a likely source of the services' tails).
How: the benchmark's training steps (benchmarks/colocate/models.py) run under the shim, no MPS, on
allowances of different shapes: the benchmark's best-effort quota in the inference mix (3 whole
co-scheduled groups plus the 6 TPCs in no group), the same 3 groups alone, and TPCs 0-17 (few whole
groups). For each: the shim's notices (grid, cluster shape, view and TPC count of the refused launch)
and every unconfined launch in the ring (name, grid, block, cluster, shared memory, entry point).
Writes OUT_DIR/leak_probe.json.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..", "..")
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)
from common import metadata, write_json  # noqa: E402

STEP_PROGRAM = r"""
import sys, torch
sys.path.insert(0, sys.argv[1])
from benchmarks.colocate.models import build_training
step, _ = build_training(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
for _ in range(int(sys.argv[5])):
    step()
torch.cuda.synchronize()
print("ok")
"""
WORKLOADS = (("resnet50_train", 64, 0), ("gpt2_small_train", 8, 512))


def allowances(table) -> dict[str, list[int]]:
    groups = [sorted(g) for _, g in sorted(table.cosched_groups().items())]
    outside = [t for t, g in enumerate(table.cosched_map()) if g == 255]
    return {"be_quota_3_groups_and_6_outside": sorted(t for g in groups[12:15] for t in g) + outside,
            "3_whole_groups": sorted(t for g in groups[12:15] for t in g),
            "tpcs_0_17": list(range(18))}


def run_case(table, slot: int, tpcs: list[int], workload: tuple, steps: int) -> dict:
    from lithos_ray import native
    table.set_allowance(slot, tpcs)
    start = native.LaunchRing(native.ring_path(table.path, slot)).head()
    name, batch, seq = workload
    env = {**os.environ, **native.client_env(table.path, slot), "LITHOS_SAMPLE_EVERY": "0"}
    proc = subprocess.run([sys.executable, "-c", STEP_PROGRAM, ROOT, name, str(batch), str(seq), str(steps)], env=env,
                          capture_output=True, text=True, timeout=300)
    ring = native.LaunchRing(native.ring_path(table.path, slot))
    records, _ = ring.read(start, max(1, ring.head() - start))    # every launch of the case, not the first 4096
    unconfined = {}
    for r in records[records["view"] == native.UNCONFINED_VIEW]:
        key = (bytes(r["kernel_name"]).decode(errors="replace"), tuple(int(v) for v in r["grid"]),
               tuple(int(v) for v in r["block"]), tuple(int(v) for v in r["cluster"]), int(r["shared_bytes"]),
               native.API_NAMES[int(r["api"])])
        unconfined[key] = unconfined.get(key, 0) + 1
    return {"tpcs": len(tpcs), "ok": proc.returncode == 0 and proc.stdout.strip().endswith("ok"),
            "launches": len(records),
            "notices": [line for line in proc.stderr.splitlines() if line.startswith("lithos:")][:20],
            "unconfined": [{"kernel": k[0], "grid": k[1], "block": k[2], "cluster": k[3], "shared_bytes": k[4],
                            "api": k[5], "launches": n} for k, n in sorted(unconfined.items(), key=lambda kv: -kv[1])],
            "stderr_tail": proc.stderr[-1500:] if proc.returncode else ""}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    from lithos_ray import native
    assert subprocess.run(["make", "-s", "-C", os.path.join(ROOT, "native")]).returncode == 0
    table = native.AllowanceTable.create(native._default_gpu_uuid(), tempfile.mkdtemp(prefix="lithos-leak-"))
    try:
        native.probe_layout_into(table)
        cases = {}
        slot = 0
        for workload in WORKLOADS:
            for label, tpcs in allowances(table).items():
                result = run_case(table, slot, tpcs, workload, args.steps)
                slot += 1
                cases[f"{workload[0]}/{label}"] = result
                print(workload[0], label, json.dumps({k: result[k] for k in ("tpcs", "ok", "launches", "notices")}),
                      json.dumps(result["unconfined"][:4]), flush=True)
    finally:
        table.close()
    write_json(os.path.join(args.out_dir, "leak_probe.json"),
               {**metadata("python benchmarks/native/leak_probe.py OUT_DIR" + f" --steps {args.steps}"), "cases": cases})


if __name__ == "__main__":
    main()
