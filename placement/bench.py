"""`lithos-ray bench place`: GPUs used vs the lower bound and vs peak packing, planning time, and a
fluid overload check (simulated), on seeded synthetic sets and optionally on the ServeGen-derived set.
Writes <output-dir>/<name>.json (with command, git commit, machine, date) and <name>.png.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from .generators import noisy_day, servegen_held_out_day, servegen_profile_set, synthetic_profile_set
from .overload import compare_overload
from .planner import DEFAULT_GPU, DEFAULT_HEADROOM_FRACTION, DEFAULT_TIME_LIMIT_S, build_problem, plan_placement
from .profiles import ProfileError
from .simulated_day import DEFAULT_WINDOW_S, compare_simulated_day

DEFAULT_MODEL_COUNTS = "100,1000,10000"
NOISE_SLOT_SIGMA = 0.15
NOISE_DAY_SIGMA = 0.10


def configure_bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", default=DEFAULT_MODEL_COUNTS, metavar="N,N,...",
                        help=f"synthetic set sizes (default {DEFAULT_MODEL_COUNTS})")
    parser.add_argument("--seed", type=int, default=1, help="seed of the synthetic sets and the noise (default 1)")
    parser.add_argument("--slots", type=int, default=96, help="slots per day of the synthetic sets (default 96)")
    parser.add_argument("--gpu", default=DEFAULT_GPU, help=f"GPU model (default {DEFAULT_GPU})")
    parser.add_argument("--headroom", type=float, default=DEFAULT_HEADROOM_FRACTION, metavar="FRACTION",
                        help=f"share of TPCs kept free (default {DEFAULT_HEADROOM_FRACTION})")
    parser.add_argument("--time-limit", type=float, default=DEFAULT_TIME_LIMIT_S, metavar="SECONDS",
                        help=f"planning budget per set (default {DEFAULT_TIME_LIMIT_S})")
    parser.add_argument("--exact-models", type=int, default=20, metavar="N",
                        help="also plan a synthetic set of N models exactly with HiGHS (0: skip; default 20)")
    parser.add_argument("--noise-days", type=int, default=20, metavar="N",
                        help="noisy days drawn for the overload check of synthetic sets (default 20)")
    parser.add_argument("--servegen", metavar="DIR",
                        help="ServeGen trace folder (<category>/<model>/chunk-N-trace.csv) to add the derived set")
    parser.add_argument("--servegen-replica-shares", default="1.0,0.25", metavar="F,F",
                        help="max_replica_share values to plan the ServeGen set with (default 1.0,0.25)")
    parser.add_argument("--simulated-day-models", type=int, default=200, metavar="N",
                        help="simulate one noisy day of a synthetic set of N models on simulated GPUs, plan vs "
                             "peak packing (0: skip; default 200); writes <output-dir>/<name>_simulated_day.*")
    parser.add_argument("--simulated-day-window", type=float, default=DEFAULT_WINDOW_S, metavar="SECONDS",
                        help=f"simulated seconds per slot in the simulated day (default {DEFAULT_WINDOW_S:g})")
    parser.add_argument("--output-dir", default="benchmarks/results", metavar="DIR",
                        help="where to write <name>.json and <name>.png (default benchmarks/results)")
    parser.add_argument("--name", default="place_bench", help="file name stem (default place_bench)")


def _parse_list(text: str, kind, what: str) -> list:
    try:
        return [kind(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ProfileError(f"{what} must be a comma-separated list; got {text!r}") from None


def _machine() -> dict:
    cpu_model = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu_model, "cpu_count": os.cpu_count(), "python": platform.python_version(),
            "platform": platform.platform(), "gpu": "none (planning runs on the CPU)"}


def _program_name() -> str:
    if sys.argv[0].endswith(str(Path("placement", "cli.py"))):
        return "python -m lithos_ray.placement.cli"
    return Path(sys.argv[0]).name


def _git_commit() -> str | None:
    try:
        result = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "placement"], capture_output=True,
                               text=True, timeout=10).stdout.strip()
        return result.stdout.strip() + ("+dirty(placement)" if dirty else "") if result.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def _plan_row(label: str, profile_set, args, max_replica_share: float = 1.0,
              exact_max_items: int = 0) -> tuple[dict, object]:
    plan = plan_placement(profile_set, args.gpu, args.headroom, args.time_limit,
                          exact_max_items=exact_max_items, max_replica_share=max_replica_share, seed=args.seed)
    row = {"set": label, "models": len(profile_set.models), "replicas": len(plan.placements),
           "slots_per_day": profile_set.slots_per_day, "max_replica_share": max_replica_share,
           "gpus_used": plan.gpus_used, "lower_bound_gpus": plan.lower_bound_gpus,
           "fluid_lower_bound": plan.fluid_lower_bound, "large_item_lower_bound": plan.large_item_lower_bound,
           "conflict_clique_lower_bound": plan.conflict_clique_lower_bound,
           "peak_packing_gpus": plan.peak_packing_gpus, "peak_fluid_bound": plan.peak_fluid_bound,
           "gap_to_lower_bound": round(plan.gap_to_lower_bound, 4),
           "saving_vs_peak_packing": round(plan.saving_vs_peak_packing, 4),
           "planning_time_s": plan.planning_time_s, "method": plan.method,
           "proved_optimal": plan.proved_optimal, "source": profile_set.source}
    print(f"{label:>28}: {plan.gpus_used} GPUs, lower bound {plan.lower_bound_gpus} "
          f"(x{plan.gap_to_lower_bound:.3f}), peak packing {plan.peak_packing_gpus} "
          f"({100 * plan.saving_vs_peak_packing:.1f}% fewer), {plan.planning_time_s:.2f} s, {plan.method}")
    return row, plan


def _plot_summary(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [r["set"] for r in rows]
    x = np.arange(len(rows))
    figure, (gpus_axis, time_axis) = plt.subplots(1, 2, figsize=(13, 4.5))
    width = 0.27
    for offset, key, name in ((-width, "lower_bound_gpus", "lower bound"), (0, "gpus_used", "plan"),
                              (width, "peak_packing_gpus", "peak packing")):
        values = [r[key] / r["lower_bound_gpus"] for r in rows]
        gpus_axis.bar(x + offset, values, width, label=name)
    for i, r in enumerate(rows):
        gpus_axis.text(i, r["gpus_used"] / r["lower_bound_gpus"] + 0.03, str(r["gpus_used"]),
                       ha="center", fontsize=7)
    gpus_axis.axhline(1.05, color="gray", linestyle=":", linewidth=0.8)
    gpus_axis.set_xticks(x, labels, rotation=20, ha="right", fontsize=7)
    gpus_axis.set_ylabel("GPUs / lower bound")
    gpus_axis.legend(fontsize=8)
    gpus_axis.set_title("GPUs used (plan count on the bar)", fontsize=9)
    time_axis.bar(x, [r["planning_time_s"] for r in rows])
    time_axis.set_xticks(x, labels, rotation=20, ha="right", fontsize=7)
    time_axis.set_ylabel("planning time (s)")
    time_axis.set_title("planning time, measured on a 2-core CPU machine", fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def run_benchmark(args) -> int:
    from .plot import plot_plan

    model_counts = _parse_list(args.models, int, "--models")
    replica_shares = _parse_list(args.servegen_replica_shares, float, "--servegen-replica-shares")
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    rows, overload = [], []
    if args.exact_models > 0:
        small = synthetic_profile_set(args.exact_models, seed=args.seed, slots_per_day=24)
        row, _ = _plan_row(f"synthetic {args.exact_models} (exact)", small, args,
                           exact_max_items=max(args.exact_models * 2, 1))
        rows.append(row)
    for count in model_counts:
        started_s = time.perf_counter()
        profile_set = synthetic_profile_set(count, seed=args.seed, slots_per_day=args.slots)
        generate_s = time.perf_counter() - started_s
        row, plan = _plan_row(f"synthetic {count}", profile_set, args)
        row["generate_time_s"] = round(generate_s, 3)
        rows.append(row)
        if args.noise_days > 0:
            days = [noisy_day(profile_set, rng, NOISE_SLOT_SIGMA, NOISE_DAY_SIGMA) for _ in range(args.noise_days)]
            check = compare_overload(plan, build_problem(profile_set, args.gpu, args.headroom),
                                     profile_set.model_names, days)
            overload.append({"set": row["set"], "noise": f"log-normal, slot sigma {NOISE_SLOT_SIGMA}, "
                             f"day sigma {NOISE_DAY_SIGMA}", **check})
        if count == min(model_counts):
            plot_plan(plan, profile_set, output_dir / f"{args.name}_synthetic_{count}_plan.png")
    if args.servegen:
        servegen = servegen_profile_set(args.servegen)
        held_out = servegen_held_out_day(args.servegen, servegen, day_index=6)
        for share in replica_shares:
            row, plan = _plan_row(f"ServeGen share {share:g}", servegen, args, max_replica_share=share)
            rows.append(row)
            check = compare_overload(plan, build_problem(servegen, args.gpu, args.headroom, share),
                                     servegen.model_names, [held_out])
            overload.append({"set": row["set"], "noise": "real: held-out day 7 of the trace (language "
                             "clients only; the 1-day categories are skipped)", **check})
            plot_plan(plan, servegen, output_dir / f"{args.name}_servegen_{share:g}_plan.png")
    simulated_day = None
    if args.simulated_day_models > 0:
        day_set = synthetic_profile_set(args.simulated_day_models, seed=args.seed, slots_per_day=args.slots)
        day_plan = plan_placement(day_set, args.gpu, args.headroom, args.time_limit, exact_max_items=0,
                                  seed=args.seed)
        day = compare_simulated_day(day_set, day_plan, seed=args.seed, window_s=args.simulated_day_window)
        written = write_simulated_day(day, output_dir, f"{args.name}_simulated_day")
        simulated_day = {"file": str(written), **simulated_day_summary(day)}
    for check in overload:
        print(f"{check['set']:>28}: overloaded GPU-slots (simulated, fluid) plan "
              f"{100 * check['plan_overloaded_gpu_slot_share']:.2f}% vs peak packing "
              f"{100 * check['peak_packing_overloaded_gpu_slot_share']:.2f}%")
    result = {
        "benchmark": "lithos-ray bench place",
        "command": " ".join([_program_name()] + sys.argv[1:]),
        "git_commit": _git_commit(),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": _machine(),
        "note": "planning times measured on this CPU machine; overload shares are a fluid per-slot "
                "check (simulated), not a latency simulation",
        "settings": {"gpu": args.gpu, "headroom_fraction": args.headroom, "time_limit_s": args.time_limit,
                     "seed": args.seed, "synthetic_slots_per_day": args.slots},
        "plans": rows,
        "overload_simulated": overload,
        "simulated_day": simulated_day,
    }
    json_path = output_dir / f"{args.name}.json"
    json_path.write_text(json.dumps(result, indent=1))
    _plot_summary(rows, output_dir / f"{args.name}.png")
    print(f"wrote {json_path} and {output_dir / (args.name + '.png')}")
    return 0


def simulated_day_summary(result: dict) -> dict:
    """The headline numbers of a simulated day (no per-model or per-slot lists)."""
    keys = ("variant", "gpus_used", "requests", "slo_attainment", "models_meeting_goal_share",
            "p10_model_attainment", "worst_model_attainment")
    return {"label": result["label"], "models": result["models"], "slots_per_day": result["slots_per_day"],
            "settings": result["settings"],
            "variants": [{key: variant[key] for key in keys} for variant in result["variants"]]}


def print_simulated_day(result: dict) -> None:
    print(f"SIMULATED day: {result['models']} models ({result['replicas']} replicas), {result['slots_per_day']} "
          f"slots, {result['gpu_model']}; {result['time_compression']}")
    print(f"{'variant':>28} {'GPUs':>5} {'requests':>11} {'attainment':>10} {'models>=' + str(result['settings']['attainment_goal']):>12} "
          f"{'p10 model':>9}")
    for v in result["variants"]:
        print(f"{v['variant']:>28} {v['gpus_used']:>5} {v['requests']:>11} {100 * v['slo_attainment']:>9.2f}% "
              f"{100 * v['models_meeting_goal_share']:>11.1f}% {100 * v['p10_model_attainment']:>8.1f}%")


def write_simulated_day(result: dict, output_dir: str | Path, name: str) -> Path:
    """Write <output_dir>/<name>.json (with command, git commit, machine, date) and <name>.png; print
    the table. Returns the JSON path."""
    from .plot import plot_simulated_day

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    record = {"benchmark": "placement simulated day (SIMULATED)",
              "command": " ".join([_program_name()] + sys.argv[1:]), "git_commit": _git_commit(),
              "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "machine": {**_machine(), "gpu": "none: the GPUs are simulated (scheduler/simulated.py)"},
              **result}
    json_path = output_dir / f"{name}.json"
    json_path.write_text(json.dumps(record, indent=1))
    plot_simulated_day(result, output_dir / f"{name}.png")
    print_simulated_day(result)
    print(f"wrote {json_path} and {output_dir / (name + '.png')}")
    return json_path
