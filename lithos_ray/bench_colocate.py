"""`lithos-ray bench colocate`: latency-critical services next to best-effort training on one GPU,
under time-slicing, MPS, MPS with a thread percentage, static partitions and lithos.

Hooks for lithos_ray/cli.py: `configure_parser(parser)` adds the options, `run(args)` runs (returns
an exit code; bad input raises LithosRequestError). Also `python -m benchmarks.colocate`.
The harness lives in the source tree's benchmarks/colocate/ (it needs a checkout, and torch,
torchvision and transformers on the GPU machine); this module is the boundary that checks input.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

from .errors import LithosRequestError

SOURCE_ROOT = pathlib.Path(__file__).resolve().parent.parent
DEFAULT_OUT_DIR = SOURCE_ROOT / "benchmarks" / "results"


def _harness(name: str):
    """benchmarks.colocate.<name> from the source tree this package was installed from."""
    if not (SOURCE_ROOT / "benchmarks" / "colocate" / f"{name}.py").is_file():
        raise LithosRequestError(f"the co-location harness is not here ({SOURCE_ROOT}/benchmarks/colocate/): "
                                 "run from a lithos-ray source checkout (pip install -e .)")
    if str(SOURCE_ROOT) not in sys.path:
        sys.path.insert(0, str(SOURCE_ROOT))
    return importlib.import_module(f"benchmarks.colocate.{name}")


def configure_parser(parser: argparse.ArgumentParser) -> None:
    plan = _harness("plan")
    parser.description = __doc__.split("\n\n")[0]
    parser.add_argument("--mixes", default=",".join(plan.MIXES),
                        help="comma list of " + "; ".join(f"{m.name} ({m.description})" for m in plan.MIXES.values()))
    parser.add_argument("--systems", default=",".join(plan.DEFAULT_SYSTEMS),
                        help=f"comma list (solo is required; default all but {', '.join(plan.ABLATIONS)}): " + "; ".join(f"{k}: {v}" for k, v in plan.SYSTEM_HELP.items()))
    parser.add_argument("--variants", default=",".join(plan.VARIANTS),
                        help="how services run: eager PyTorch and/or a CUDA graph replay (default both)")
    parser.add_argument("--trials", type=int, default=3, help="repeats of every phase (1..20; default 3)")
    parser.add_argument("--budget-s", type=float, default=480.0,
                        help="wall-clock budget in seconds for the whole run (60..3600; default 480 = 8 min); "
                             "phase length is derived from it")
    parser.add_argument("--phase-s", type=float, default=None,
                        help=f"measured seconds per phase ({plan.MIN_PHASE_S:g}..{plan.MAX_PHASE_S:g}); default: fill the budget")
    parser.add_argument("--warmup-s", type=float, default=0.5, help="seconds of each phase discarded first (default 0.5)")
    parser.add_argument("--first-warmup-s", type=float, default=2.0,
                        help="the same for a worker group's first phase of each system, mix and variant, where first "
                             "uses of green contexts and lazy module loads are likely (0..30; default 2.0)")
    parser.add_argument("--load", type=float, default=0.3,
                        help="offered load of each service as a fraction of its solo capacity (1 / solo p50 service "
                             "time), in (0, 1); default 0.3")
    parser.add_argument("--resnet-batch", type=int, default=8, help="ResNet-50 service batch, 1..8 (default 8)")
    parser.add_argument("--mps-be-percent", type=int, default=None,
                        help="CUDA_MPS_ACTIVE_THREAD_PERCENTAGE of the best-effort job in mps_pct (1..100; "
                             "default: its static quota's share of the GPU's TPCs)")
    parser.add_argument("--lc-groups", action="append", default=[], metavar="MIX=N[,N...]",
                        help="the services' quotas in co-scheduled 4-TPC groups for static/lithos, one count per "
                             "service, e.g. hybrid=14 or inference=7,7 (repeatable; the best-effort job gets the rest; "
                             "defaults: " + ", ".join(f"{m.name}={','.join(map(str, m.lc_quota_groups))}"
                                                      for m in plan.MIXES.values()) + ")")
    parser.add_argument("--atom-us", type=float, default=250.0, help="lithos atom budget in microseconds (default 250)")
    parser.add_argument("--sample-every", type=int, default=8,
                        help="shim workers time one launch in N at random (LITHOS_SAMPLE_EVERY; default 8: the "
                             "predictor needs 3 samples per kernel shape before a kernel may borrow)")
    parser.add_argument("--lend-pace", choices=("off", "idle", "always"), default="off",
                        help="when best-effort borrowers pace their queue (LITHOS_LEND_PACE): off (default, as the "
                             "shim: a borrower whose queue is too deep keeps its own TPCs), while a lender is idle, or "
                             "always (so the queue is shallow before a lender goes idle)")
    parser.add_argument("--dispatch", choices=("off", "on", "all"), default="on",
                        help="hold the best-effort job's launches for the shim's dispatcher thread, which sends each "
                             "when the queue ahead of it is shallow, so it may borrow (LITHOS_DISPATCH; default on, "
                             "as the shim; off: lithos decides at launch time; all: the services' launches too, e.g. "
                             "with lithos_unroll, so that an unrolled replay's kernels are not all queued at once)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the Poisson arrival schedules (default 0)")
    parser.add_argument("--out-dir", default=str(DEFAULT_OUT_DIR), help=f"where results go (default {DEFAULT_OUT_DIR})")
    parser.add_argument("--tag", default=None, help="file names colocate_<tag>.json/.png (default: the mixes)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and its time estimate; run nothing")
    parser.add_argument("--matrix", metavar="RESULT.json", default=None,
                        help="print a stored result's cells side by side (service p99 / solo and best-effort share "
                             "of solo per system) and exit; runs nothing, needs no GPU")


def _checked(args):
    """(plan, tag) or LithosRequestError naming what was wrong and what is allowed."""
    plan_module = _harness("plan")
    try:
        plan = plan_module.build_plan(mixes=args.mixes, systems=args.systems, variants=args.variants, trials=args.trials,
                                      budget_s=args.budget_s, phase_s=args.phase_s, warmup_s=args.warmup_s,
                                      first_warmup_s=args.first_warmup_s,
                                      load=args.load, resnet_batch=args.resnet_batch, lc_groups=args.lc_groups)
    except ValueError as exc:
        raise LithosRequestError(str(exc)) from None
    if args.mps_be_percent is not None and not (isinstance(args.mps_be_percent, int) and 1 <= args.mps_be_percent <= 100):
        raise LithosRequestError(f"--mps-be-percent must be an integer percentage in 1..100, got {args.mps_be_percent!r}")
    if isinstance(args.atom_us, bool) or not isinstance(args.atom_us, (int, float)) or not 0 < args.atom_us <= 100_000:
        raise LithosRequestError(f"--atom-us must be microseconds in (0, 100000], got {args.atom_us!r}")
    if not 1 <= args.sample_every <= 1_000_000:
        raise LithosRequestError(f"--sample-every must be an integer in 1..1000000, got {args.sample_every!r}")
    if not isinstance(args.seed, int) or args.seed < 0:
        raise LithosRequestError(f"--seed must be a non-negative integer, got {args.seed!r}")
    if "static_held" in plan.systems and args.dispatch == "off":
        raise LithosRequestError("--systems static_held holds the best-effort job's launches: it needs --dispatch on")
    tag = args.tag if args.tag is not None else "_".join(plan.mixes)
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", tag):
        raise LithosRequestError(f"--tag {tag!r}: use 1-64 letters, digits, '_', '.' or '-'")
    return plan, tag


def _check_machine(plan) -> None:
    """What the run needs on this machine, each missing piece named with its fix."""
    missing = []
    if shutil.which("nvidia-smi") is None:
        missing.append("an NVIDIA GPU and driver (nvidia-smi not found)")
    for module in ("torch", "torchvision", "transformers"):
        if importlib.util.find_spec(module) is None:
            missing.append(f"the Python package {module} (workers build models with it)")
    shim_systems = _harness("plan").SHIM_SYSTEMS
    mps_systems = [s for s in plan.systems if s in ("mps", "mps_pct", *shim_systems)]
    if mps_systems and shutil.which("nvidia-cuda-mps-control") is None:
        missing.append("nvidia-cuda-mps-control (MPS) on PATH, for " + ", ".join(mps_systems))
    if any(s in plan.systems for s in shim_systems):
        from . import native
        if native.library_path() is None:
            missing.append(f"liblithos.so for static/lithos ({native.build_status()})")
    if missing:
        raise LithosRequestError("cannot run the co-location benchmark here; missing: " + "; ".join(missing)
                                 + ". Use --dry-run to see the plan without a GPU")


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=SOURCE_ROOT, capture_output=True, text=True,
                              timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run(args) -> int:
    """Run the benchmark described by parsed args; returns a process exit code."""
    if getattr(args, "matrix", None):
        return _print_matrix(args.matrix)
    plan, tag = _checked(args)
    plan_module = _harness("plan")
    print(plan_module.describe(plan), flush=True)
    if args.dry_run:
        return 0
    _check_machine(plan)
    driver, report = _harness("driver"), _harness("report")
    common = _harness_common()
    os.environ.setdefault("LITHOS_COMMIT", _git_commit())
    command = getattr(args, "command_line", None) or " ".join(sys.argv)
    out_dir = os.path.abspath(args.out_dir)
    os.makedirs(out_dir, exist_ok=True)
    state = driver.Run(plan, args)
    json_path = os.path.join(out_dir, f"colocate_{tag}.json")

    def save(final: bool):
        analysis = report.analyse(plan, state.phase_results)
        payload = {**common.metadata(command),
                   "what": "co-location benchmark: latency-critical services (open-loop Poisson arrivals) next to "
                           "best-effort training on one GPU, per sharing system",
                   "complete": final,
                   "plan": {"mixes": list(plan.mixes), "systems": list(plan.systems), "variants": list(plan.variants),
                            "trials": plan.trials, "budget_s": plan.budget_s, "phase_s": plan.phase_s,
                            "warmup_s": plan.warmup_s, "first_warmup_s": plan.first_warmup_s, "load": plan.load, "estimate": plan.estimate,
                            "workloads": {n: vars(w) for n, w in plan.workloads.items()},
                            "mix_definitions": {m: {"services": list(plan_module.MIXES[m].services),
                                                    "best_effort": plan_module.MIXES[m].best_effort,
                                                    "lc_quota_groups": list(plan.lc_quota_groups[m])}
                                                for m in plan.mixes},
                            "atom_us": args.atom_us, "seed": args.seed, "dispatch": args.dispatch,
                            "lend_pace": args.lend_pace, "sample_every": args.sample_every},
                   "elapsed_s": round(state.timeline[-1]["t_s"], 1) if state.timeline else 0.0,
                   "calibration": state.calibration, "mix_setup": state.mix_setup, "workers": state.workers_info,
                   **analysis, "errors": state.errors, "timeline": state.timeline, "phases_raw": state.phase_results}
        common.write_json(json_path, payload)
        with open(os.path.join(out_dir, f"colocate_{tag}_logs.txt"), "w") as handle:
            handle.write(state.worker_logs())
        return payload, analysis

    finished = False
    try:
        driver.execute(state, after_group=lambda _: save(False))
        finished = True
    finally:
        payload, analysis = save(finished)  # "complete": false when the run broke off
        try:
            report.plot(analysis, json_path.replace(".json", ".png"),
                        f"{payload['gpu']} driver {payload['driver']} commit {payload['git_commit'][:10]} {payload['date']}")
            print(f"wrote {json_path.replace('.json', '.png')}", flush=True)
        except Exception as exc:  # the JSON is the result; a plotting failure must not hide it
            print(f"plot failed: {exc!r}", file=sys.stderr)
        print(report.table(analysis), flush=True)
        if state.errors:
            print("errors:\n  " + "\n  ".join(e[:400] for e in state.errors), flush=True)
    return 0 if not state.errors else 1


def _print_matrix(path: str) -> int:
    try:
        with open(path) as handle:
            mixes = json.load(handle)["mixes"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise LithosRequestError(f"--matrix {path}: not a co-location result JSON ({exc!r})") from None
    print(_harness("report").matrix(mixes))
    return 0


def _harness_common():
    _harness("plan")  # puts the source root on sys.path
    return importlib.import_module("benchmarks.native.common")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.colocate")
    configure_parser(parser)
    args = parser.parse_args(argv)
    args.command_line = "python -m benchmarks.colocate " + " ".join(sys.argv[1:] if argv is None else argv)
    try:
        return run(args)
    except LithosRequestError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
