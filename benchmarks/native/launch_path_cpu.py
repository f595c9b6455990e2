"""The shim's own host work per launch, on the CPU (no GPU: native/fake_libcuda.c stands in for the driver).

usage: python benchmarks/native/launch_path_cpu.py [OUT_DIR] [--launches N] [--repeat R]

What it isolates: the instructions and memory traffic the shim adds to a launch (reading the
allowance, the kernel's cache entry, the predictor, the ring record, the activity word), without the
driver's own cost, which the fake driver does not have. Each case runs launch_path_cpu.c under
liblithos.so with the shim's work on and bypassed in alternating blocks of 256 launches, over 300
distinct kernels: warm (launches back to back), cold (8 MiB read between launches, as a framework's
work between two launches evicts the shim's data) and cold code (also 4 MiB of code run between
launches, a jump per cache line, evicting the shim's instructions as a framework's code does).
Allowances: every TPC (whole GPU: the program's own streams) and every co-scheduled group (green
streams; the default stream pairs). Last, unrolled graph replays (graph/unrolled/*): the fake driver's
graph of 4 kernels and a memset, replayed on a created stream by a client on every co-scheduled group
with LITHOS_LEND_UNROLL_GRAPHS and an idle lender of the other 6 TPCs, against the plain replay with
the shim bypassed: per replay, so the per-node cost is a fifth of it. And memsets (groups/memset/*):
cuMemsetD32Async on a created stream, which the shim sends to the client's green stream as it does kernels.

These are CPU figures, a regression guard for the launch path; the GPU figures are overhead.py's.
Writes OUT_DIR/launch_path_cpu.json when OUT_DIR is given; prints a table.
"""
import argparse
import os
import subprocess
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from benchmarks.native.common import last_json, metadata, write_json  # noqa: E402
from lithos_ray import native  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
FAKE_GPU_UUID = "GPU-00010203-0405-0607-0809-0a0b0c0d0e0f"  # what native/fake_libcuda.c reports
FAKE_DRIVER_DIR = os.path.join(ROOT, "native", "build", "fake")
KERNELS = 300
COLD_BYTES = 8 << 20
CODE_BYTES = 4 << 20
CACHES = ("warm", "cold", "cold_code")
COSCHED_MAP = [t // 4 for t in range(60)] + [255] * 6   # 15 co-scheduled groups of 4 TPCs, as on an H100
STREAMS = ("legacy", "stream")


def build(work: str) -> str:
    """The fake driver (make fake-driver) and the launch loop; returns the loop's path."""
    subprocess.run(["make", "-s", "-C", os.path.join(ROOT, "native"), "fake-driver"], check=True)
    include = subprocess.run(["make", "-s", "-C", os.path.join(ROOT, "native"), "print-cuda-include"],
                             capture_output=True, text=True, check=True).stdout.strip()
    binary = os.path.join(work, "launch_path_cpu")
    subprocess.run(["gcc", "-O2", "-std=gnu11", "-I", include, "-o", binary, os.path.join(HERE, "launch_path_cpu.c"), "-ldl"],
                   check=True)
    return binary


def run_case(binary: str, env: dict, stream: str, caches: str, launches: int) -> dict:
    command = [binary, str(KERNELS), str(launches), str(0 if caches == "warm" else COLD_BYTES),
               "graph" if stream == "unrolled" else stream,
               str(CODE_BYTES if caches == "cold_code" else 0)]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"launch_path_cpu {stream} {caches} failed ({proc.returncode}): {proc.stderr.strip()}")
    return last_json(proc.stdout)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", nargs="?")
    parser.add_argument("--launches", type=int, default=20000, help="timed launches per run (half through the shim)")
    parser.add_argument("--repeat", type=int, default=5, help="runs per case; the median of their medians is reported")
    args = parser.parse_args(argv)
    if args.launches < 512 or args.repeat < 1:
        parser.error("--launches must be >= 512 and --repeat >= 1")
    if native.library_path() is None:
        print(f"liblithos.so is not built: {native.build_status()}", file=sys.stderr)
        return 1
    work = tempfile.mkdtemp(prefix="lithos-launch-cpu-")
    binary = build(work)
    table = native.AllowanceTable.create(FAKE_GPU_UUID, work, max_slots=4)
    table.set_cosched_map(COSCHED_MAP)
    allowances = {"whole_gpu": list(range(len(COSCHED_MAP))),
                  "groups": sorted(t for tpcs in table.cosched_groups().values() for t in tpcs)}
    cases = {}
    unrolled_slot, lender_slot = len(allowances), len(allowances) + 1
    runs_of = [(slot, allowance, tpcs, STREAMS) for slot, (allowance, tpcs) in enumerate(allowances.items())]
    runs_of.append((1, "groups", allowances["groups"], ("memset",)))
    runs_of.append((unrolled_slot, "graph", allowances["groups"], ("unrolled",)))
    table.set_allowance(lender_slot, [t for t in range(len(COSCHED_MAP)) if t not in allowances["groups"]])
    try:
        for slot, allowance, tpcs, streams in runs_of:
            table.set_allowance(slot, tpcs)
            table.set_lending(slot, [lender_slot] if allowance == "graph" else [], low_priority=False,
                              unroll_graphs=allowance == "graph")
            env = {**{k: v for k, v in os.environ.items() if not k.startswith("LITHOS_")},
                   **native.client_env(table.path, slot), "LD_LIBRARY_PATH": FAKE_DRIVER_DIR, "FAKE_CUDA_QUIET": "1"}
            for stream in streams:
                for caches in CACHES:
                    launches = args.launches if caches == "warm" else max(512, args.launches // 4)
                    runs = [run_case(binary, env, stream, caches, launches) for _ in range(args.repeat)]
                    name = f"{allowance}/{stream}/{caches}"
                    added = [r["shim_median_ns"] - r["bypass_median_ns"] for r in runs]
                    cases[name] = {"added_median_ns": float(np.median(added)), "added_per_run_ns": added,
                                   "bypass_median_ns": float(np.median([r["bypass_median_ns"] for r in runs])),
                                   "shim_p99_ns": float(np.median([r["shim_p99_ns"] for r in runs]))}
                    per = "per replay of 5 nodes" if allowance == "graph" else "per launch"
                    print(f"{name:28s} shim adds {cases[name]['added_median_ns']:6.0f} ns {per} "
                          f"(runs {min(added)}..{max(added)}; bypassed launch {cases[name]['bypass_median_ns']:.0f} ns)",
                          flush=True)
    finally:
        table.close()
    if args.out_dir:
        write_json(os.path.join(args.out_dir, "launch_path_cpu.json"), {
            **metadata("python benchmarks/native/launch_path_cpu.py " + " ".join(argv or sys.argv[1:])),
            "what": "CPU only, fake driver: the shim's own host work per launch (not a GPU figure)",
            "cpu": cpu_name(), "kernels": KERNELS, "cold_bytes_between_launches": COLD_BYTES,
            "cold_code_bytes_between_launches": CODE_BYTES,
            "launches_per_run": {"warm": args.launches, "cold": max(512, args.launches // 4)},
            "runs_per_case": args.repeat, "cases": cases})
    return 0


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            return next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
