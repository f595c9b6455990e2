"""`lithos-ray place` and `lithos-ray bench place`: argument parsing and printing only.

lithos_ray/cli.py wires these in; until then `python -m lithos_ray.placement.cli place ...` and
`python -m lithos_ray.placement.cli bench ...` run them directly. `generate` writes profile sets;
`simulate-day` runs a plan and peak packing through a simulated day (SLO attainment, SIMULATED).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .planner import (DEFAULT_EXACT_MAX_ITEMS, DEFAULT_GPU, DEFAULT_HEADROOM_FRACTION,
                      DEFAULT_MAX_REPLICA_SHARE, DEFAULT_TIME_LIMIT_S, Plan, gpu_demand_tpcs)
from .profiles import ProfileError

DEFAULT_PLOT_PATH = "placement.png"
GPUS_LISTED_IN_TEXT = 20


def _fraction(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None


def configure_place_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--profiles", required=True, metavar="FILE",
                        help="profile set: JSON (slots_per_day, models, traffic) or CSV traffic "
                             "(model,slot,rate_rps) with --models")
    parser.add_argument("--models", metavar="FILE", help="JSON with slots_per_day and models, for CSV traffic")
    parser.add_argument("--gpu", default=DEFAULT_GPU, help=f"GPU model to plan for (default {DEFAULT_GPU})")
    parser.add_argument("--headroom", type=_fraction, default=DEFAULT_HEADROOM_FRACTION, metavar="FRACTION",
                        help=f"share of every GPU's TPCs kept free, in [0, 1) (default {DEFAULT_HEADROOM_FRACTION})")
    parser.add_argument("--max-replica-share", type=_fraction, default=DEFAULT_MAX_REPLICA_SHARE,
                        metavar="FRACTION", help="split a model into replicas so each needs at most this "
                        f"share of a GPU's usable TPCs at its peak, in (0, 1] (default {DEFAULT_MAX_REPLICA_SHARE})")
    parser.add_argument("--time-limit", type=_fraction, default=DEFAULT_TIME_LIMIT_S, metavar="SECONDS",
                        help=f"planning time budget (default {DEFAULT_TIME_LIMIT_S})")
    parser.add_argument("--exact-max-items", type=int, default=DEFAULT_EXACT_MAX_ITEMS, metavar="N",
                        help=f"solve exactly with HiGHS up to N replicas (default {DEFAULT_EXACT_MAX_ITEMS})")
    parser.add_argument("--seed", type=int, default=0, help="seed of the local search (default 0)")
    parser.add_argument("--previous-plan", metavar="PLAN_JSON",
                        help="re-plan from this plan (written with --output) moving at most --max-moves replicas")
    parser.add_argument("--max-moves", type=int, default=None, metavar="N",
                        help="with --previous-plan: most replicas that may change GPU")
    parser.add_argument("--output", metavar="PLAN_JSON", help="also write the plan as JSON to this file")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON instead of text")
    parser.add_argument("--plot", default=DEFAULT_PLOT_PATH, metavar="PATH",
                        help=f"write the per-GPU demand picture here (default {DEFAULT_PLOT_PATH})")
    parser.add_argument("--no-plot", action="store_true", help="do not write the picture")


def _print_plan_text(plan: Plan, gpu_indices: list[int], loads, out) -> None:
    print(f"plan: {len(plan.placements)} replicas on {plan.gpus_used} {plan.gpu_model} GPUs "
          f"({plan.gpu_tpcs} TPCs, usable {plan.usable_tpcs:.1f} with headroom {plan.headroom_fraction:g})",
          file=out)
    print(f"lower bound: {plan.lower_bound_gpus} GPUs (fluid {plan.fluid_lower_bound:.2f}, "
          f"large replicas {plan.large_item_lower_bound}, conflicting replicas "
          f"{plan.conflict_clique_lower_bound}); plan / lower bound = {plan.gap_to_lower_bound:.3f}",
          file=out)
    print(f"peak packing: {plan.peak_packing_gpus} GPUs (sum of peaks / usable = {plan.peak_fluid_bound:.2f}); "
          f"plan uses {100 * plan.saving_vs_peak_packing:.1f}% fewer", file=out)
    print(f"method: {plan.method}; proved optimal: {'yes' if plan.proved_optimal else 'no'}; "
          f"planning time {plan.planning_time_s:.2f} s", file=out)
    if plan.moved_items:
        print(f"moved replicas: {len(plan.moved_items)}: {', '.join(plan.moved_items[:10])}"
              + (" ..." if len(plan.moved_items) > 10 else ""), file=out)
    by_gpu: dict[int, list] = {}
    for p in plan.placements:
        by_gpu.setdefault(p.gpu_index, []).append(p)
    print(f"{'gpu':>5} {'peak_tpcs':>9} {'sum_of_peaks':>12}  replicas (reserved_tpcs)", file=out)
    for row, gpu in enumerate(gpu_indices[:GPUS_LISTED_IN_TEXT]):
        items = by_gpu[gpu]
        listed = ", ".join(f"{p.item} ({p.reserved_tpcs})" for p in items[:6])
        more = f" and {len(items) - 6} more" if len(items) > 6 else ""
        print(f"{gpu:>5} {loads[row].max():9.1f} {sum(p.peak_tpcs for p in items):12.1f}  {listed}{more}",
              file=out)
    if len(gpu_indices) > GPUS_LISTED_IN_TEXT:
        print(f"... {len(gpu_indices) - GPUS_LISTED_IN_TEXT} more GPUs (--json lists all)", file=out)


def run_place(args) -> int:
    from .planner import plan_placement
    from .profiles import load_profile_set
    from .replan import replan

    try:
        profile_set = load_profile_set(args.profiles, args.models)
        if args.previous_plan:
            if args.max_moves is None:
                raise ProfileError("--previous-plan needs --max-moves N (most replicas that may move)")
            try:
                previous = Plan.from_dict(json.loads(Path(args.previous_plan).read_text()))
            except (OSError, json.JSONDecodeError) as error:
                raise ProfileError(f"cannot read --previous-plan {args.previous_plan!r}: {error}") from None
            plan = replan(previous, profile_set, args.max_moves)
        else:
            if args.max_moves is not None:
                raise ProfileError("--max-moves only applies with --previous-plan")
            plan = plan_placement(profile_set, args.gpu, args.headroom, args.time_limit,
                                  args.exact_max_items, args.max_replica_share, args.seed)
    except ProfileError as error:
        print(f"lithos-ray place: {error}", file=sys.stderr)
        return 2
    gpu_indices, loads = gpu_demand_tpcs(plan, profile_set)
    if args.output:
        Path(args.output).write_text(json.dumps(plan.to_dict(), indent=1))
    if args.json:
        print(json.dumps(plan.to_dict(), indent=1))
    else:
        _print_plan_text(plan, gpu_indices, loads, sys.stdout)
    if not args.no_plot and args.plot:
        from .plot import plot_plan
        written = plot_plan(plan, profile_set, args.plot)
        print(f"picture: {written}", file=sys.stderr if args.json else sys.stdout)
    return 0


def configure_bench_parser(parser: argparse.ArgumentParser) -> None:
    from .bench import configure_bench_arguments
    configure_bench_arguments(parser)


def run_bench(args) -> int:
    from .bench import run_benchmark
    try:
        return run_benchmark(args)
    except ProfileError as error:
        print(f"lithos-ray bench place: {error}", file=sys.stderr)
        return 2


def configure_generate_parser(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--synthetic", type=int, metavar="N", help="N seeded synthetic diurnal models")
    source.add_argument("--servegen", metavar="DIR", help="derive from a ServeGen trace folder")
    source.add_argument("--prometheus", metavar="FILE",
                        help="recorded rates: a Prometheus query_range answer (JSON), needs --models")
    parser.add_argument("--models", metavar="FILE", help="with --prometheus: JSON with the models part")
    parser.add_argument("--utc-offset", type=float, default=0.0, metavar="HOURS",
                        help="with --prometheus: clock of slot 0 relative to UTC (default 0)")
    parser.add_argument("--statistic", default="max", choices=("max", "mean"),
                        help="with --prometheus: fold days by their max or mean per slot (default max)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic set (default 0)")
    parser.add_argument("--slots", type=int, default=None,
                        help="slots per day (default 96 synthetic, 48 ServeGen)")
    parser.add_argument("--output", required=True, metavar="FILE", help="profile set JSON to write")


def run_generate(args) -> int:
    from .generators import servegen_profile_set, synthetic_profile_set
    from .profiles import build_profile_set, save_profile_set
    from .recording import samples_from_prometheus_matrix, traffic_from_samples
    try:
        if args.synthetic is not None:
            profile_set = synthetic_profile_set(args.synthetic, seed=args.seed, slots_per_day=args.slots or 96)
        elif args.prometheus:
            if not args.models:
                raise ProfileError("--prometheus needs --models FILE (JSON with the models part)")
            try:
                recorded = json.loads(Path(args.prometheus).read_text())
                catalog = json.loads(Path(args.models).read_text())
            except (OSError, json.JSONDecodeError) as error:
                raise ProfileError(f"cannot read {error}") from None
            slots = args.slots or (catalog.get("slots_per_day") if isinstance(catalog, dict) else None) or 96
            traffic = traffic_from_samples(samples_from_prometheus_matrix(recorded), slots,
                                           args.utc_offset, args.statistic)
            profile_set = build_profile_set({"slots_per_day": slots, "models": catalog.get("models", {}),
                                             "traffic": traffic, "source": f"recorded: {args.prometheus}"})
        else:
            profile_set = servegen_profile_set(args.servegen, slots_per_day=args.slots or 48)
    except ProfileError as error:
        print(f"generate: {error}", file=sys.stderr)
        return 2
    save_profile_set(profile_set, args.output)
    print(f"wrote {len(profile_set.models)} models x {profile_set.slots_per_day} slots to {args.output}")
    return 0


def configure_simulate_day_parser(parser: argparse.ArgumentParser) -> None:
    from .simulated_day import (DEFAULT_DAY_SIGMA, DEFAULT_REQUEST, DEFAULT_SLOT_SIGMA, DEFAULT_WINDOW_S,
                                REQUEST_SHAPES, TPC_POLICIES)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--profiles", metavar="FILE", help="profile set (JSON, or CSV traffic with --models)")
    source.add_argument("--synthetic", type=int, metavar="N", help="a seeded synthetic set of N models")
    parser.add_argument("--models", metavar="FILE", help="JSON with slots_per_day and models, for CSV traffic")
    parser.add_argument("--slots", type=int, default=96, help="with --synthetic: slots per day (default 96)")
    parser.add_argument("--plan", metavar="PLAN_JSON",
                        help="plan to simulate (written by `place --output`); planned here when left out")
    parser.add_argument("--gpu", default=DEFAULT_GPU, help=f"without --plan: GPU model (default {DEFAULT_GPU})")
    parser.add_argument("--headroom", type=_fraction, default=DEFAULT_HEADROOM_FRACTION, metavar="FRACTION",
                        help=f"without --plan: share of TPCs kept free (default {DEFAULT_HEADROOM_FRACTION})")
    parser.add_argument("--max-replica-share", type=_fraction, default=DEFAULT_MAX_REPLICA_SHARE,
                        metavar="FRACTION", help=f"without --plan (default {DEFAULT_MAX_REPLICA_SHARE})")
    parser.add_argument("--time-limit", type=_fraction, default=DEFAULT_TIME_LIMIT_S, metavar="SECONDS",
                        help=f"without --plan: planning budget (default {DEFAULT_TIME_LIMIT_S})")
    parser.add_argument("--exact-max-items", type=int, default=DEFAULT_EXACT_MAX_ITEMS, metavar="N",
                        help=f"without --plan: HiGHS up to N replicas (default {DEFAULT_EXACT_MAX_ITEMS})")
    parser.add_argument("--seed", type=int, default=1,
                        help="seed of the synthetic set, the day's noise and the arrivals (default 1)")
    parser.add_argument("--window", type=_fraction, default=DEFAULT_WINDOW_S, metavar="SECONDS",
                        help=f"simulated seconds per slot (default {DEFAULT_WINDOW_S:g})")
    parser.add_argument("--request", default=DEFAULT_REQUEST, choices=sorted(REQUEST_SHAPES),
                        help=f"calibrated request shape (default {DEFAULT_REQUEST})")
    parser.add_argument("--policies", default=",".join(TPC_POLICIES), metavar="P,P",
                        help=f"TPC policies to run, of {', '.join(TPC_POLICIES)} (default all)")
    parser.add_argument("--slot-sigma", type=_fraction, default=DEFAULT_SLOT_SIGMA,
                        help=f"log-normal noise per model and slot (default {DEFAULT_SLOT_SIGMA})")
    parser.add_argument("--day-sigma", type=_fraction, default=DEFAULT_DAY_SIGMA,
                        help=f"log-normal noise per model for the day (default {DEFAULT_DAY_SIGMA})")
    parser.add_argument("--output-dir", default="benchmarks/results", metavar="DIR",
                        help="where to write <name>.json and <name>.png (default benchmarks/results)")
    parser.add_argument("--name", default="place_simulated_day", help="file name stem (default place_simulated_day)")


def run_simulate_day(args) -> int:
    from .bench import write_simulated_day
    from .generators import synthetic_profile_set
    from .planner import plan_placement
    from .profiles import load_profile_set
    from .simulated_day import compare_simulated_day

    try:
        if args.synthetic is not None:
            profile_set = synthetic_profile_set(args.synthetic, seed=args.seed, slots_per_day=args.slots)
        else:
            profile_set = load_profile_set(args.profiles, args.models)
        if args.plan:
            try:
                plan = Plan.from_dict(json.loads(Path(args.plan).read_text()))
            except (OSError, json.JSONDecodeError) as error:
                raise ProfileError(f"cannot read --plan {args.plan!r}: {error}") from None
        else:
            plan = plan_placement(profile_set, args.gpu, args.headroom, args.time_limit, args.exact_max_items,
                                  args.max_replica_share, args.seed)
        policies = tuple(part.strip() for part in args.policies.split(",") if part.strip())
        result = compare_simulated_day(profile_set, plan, seed=args.seed, window_s=args.window,
                                       request=args.request, slot_sigma=args.slot_sigma,
                                       day_sigma=args.day_sigma, policies=policies)
    except ProfileError as error:
        print(f"simulate-day: {error}", file=sys.stderr)
        return 2
    write_simulated_day(result, args.output_dir, args.name)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lithos_ray.placement.cli")
    commands = parser.add_subparsers(dest="command", required=True)
    configure_place_parser(commands.add_parser("place", help="plan model placement from traffic profiles"))
    configure_bench_parser(commands.add_parser("bench", help="placement benchmark (lithos-ray bench place)"))
    configure_generate_parser(commands.add_parser("generate", help="write a synthetic or ServeGen profile set"))
    configure_simulate_day_parser(commands.add_parser(
        "simulate-day", help="SIMULATED day of a plan and of peak packing on simulated GPUs: SLO attainment"))
    args = parser.parse_args(argv)
    run = {"place": run_place, "bench": run_bench, "generate": run_generate,
           "simulate-day": run_simulate_day}[args.command]
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
