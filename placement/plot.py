"""Picture of a plan: per GPU, the demand of its replicas stacked over the day (matplotlib, Agg)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .planner import Plan
from .profiles import ProfileSet

DEFAULT_MAX_GPUS_SHOWN = 12


def _save(figure, path: str | Path) -> Path:
    import matplotlib.pyplot as plt

    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def plot_plan(plan: Plan, profile_set: ProfileSet, path: str | Path,
              max_gpus_shown: int = DEFAULT_MAX_GPUS_SHOWN) -> Path:
    """Write a PNG: one panel per GPU (`max_gpus_shown` evenly spaced ones if there are more),
    each replica's demand stacked, lines at usable and total TPCs. Returns the path written."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    demand = profile_set.demand_matrix_tpcs()
    row_of_model = {name: row for row, name in enumerate(profile_set.model_names)}
    items_by_gpu: dict[int, list] = {}
    for p in plan.placements:
        items_by_gpu.setdefault(p.gpu_index, []).append(p)
    gpu_peak = {gpu: sum(demand[row_of_model[p.model]] / p.replicas for p in items).max()
                for gpu, items in items_by_gpu.items()}
    all_gpus = sorted(items_by_gpu)
    picks = np.unique(np.linspace(0, len(all_gpus) - 1, num=min(max_gpus_shown, len(all_gpus))).round())
    shown = [all_gpus[int(i)] for i in picks]
    columns = min(4, max(len(shown), 1))
    rows = max(1, math.ceil(len(shown) / columns))
    figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 2.8 * rows), squeeze=False,
                                sharey=True)
    hours = np.arange(profile_set.slots_per_day + 1) * 24.0 / profile_set.slots_per_day
    for axis, gpu in zip(axes.flat, shown):
        items = sorted(items_by_gpu[gpu], key=lambda p: p.item)
        stacks = [np.append(demand[row_of_model[p.model]] / p.replicas,
                            demand[row_of_model[p.model]][-1] / p.replicas) for p in items]
        labels = [p.item for p in items] if len(items) <= 6 else []
        axis.stackplot(hours, *stacks, step="post", labels=labels, linewidth=0)
        axis.axhline(plan.usable_tpcs, color="black", linestyle="--", linewidth=0.8)
        axis.axhline(plan.gpu_tpcs, color="red", linewidth=0.8)
        axis.set_title(f"GPU {gpu}: {len(items)} replicas, peak {gpu_peak[gpu]:.0f} TPCs", fontsize=9)
        axis.set_xlim(0, 24)
        axis.set_xticks(range(0, 25, 6))
        if labels:
            axis.legend(fontsize=6, loc="upper left")
    for axis in list(axes.flat)[len(shown):]:
        axis.set_visible(False)
    for axis in axes[:, 0]:
        axis.set_ylabel("TPC demand")
    for axis in axes[-1, :]:
        axis.set_xlabel("hour of day (profile clock)")
    shown_text = f"{len(shown)} of {plan.gpus_used} GPUs (evenly spaced)" if plan.gpus_used > len(shown) \
        else f"{plan.gpus_used} GPUs"
    figure.suptitle(f"{len(plan.placements)} replicas on {shown_text}, {plan.gpu_model} "
                    f"{plan.gpu_tpcs} TPCs (red), usable {plan.usable_tpcs:.1f} (dashed); lower bound "
                    f"{plan.lower_bound_gpus}, peak packing {plan.peak_packing_gpus} GPUs", fontsize=9)
    return _save(figure, path)


def plot_simulated_day(result: dict, path: str | Path) -> Path:
    """Write a PNG of a `simulated_day.compare_simulated_day` result: SLO attainment per slot of the day
    and the spread of per-model attainment, every variant; titled SIMULATED."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (day_axis, model_axis) = plt.subplots(1, 2, figsize=(13, 4.8))
    slots = result["slots_per_day"]
    hours = (np.arange(slots) + 0.5) * 24.0 / slots
    colors = {}
    for variant in result["variants"]:
        color = colors.setdefault(variant["tpc_policy"], f"C{len(colors)}")
        style = "-" if variant["plan"] == "plan" else "--"
        label = f"{variant['variant']} ({variant['gpus_used']} GPUs): {100 * variant['slo_attainment']:.1f}%"
        per_slot = np.array([np.nan if a is None else a for a in variant["per_slot_slo_attainment"]])
        day_axis.plot(hours, per_slot, style, color=color, linewidth=1.2, label=label)
        per_model = np.sort([m["slo_attainment"] for m in variant["per_model"].values()
                             if m["slo_attainment"] is not None])
        model_axis.plot(per_model, np.arange(1, per_model.size + 1) / per_model.size, style, color=color,
                        linewidth=1.2, drawstyle="steps-post")
    day_axis.set_xlim(0, 24)
    day_axis.set_xticks(range(0, 25, 3))
    day_axis.set_xlabel("hour of day (profile clock)")
    day_axis.set_ylabel("requests within SLO (share)")
    day_axis.set_title("SLO attainment per slot (solid: plan, dashed: peak packing)", fontsize=9)
    day_axis.legend(fontsize=7, loc="lower left")
    model_axis.set_xlabel("a model's SLO attainment over the day")
    model_axis.set_ylabel("share of models at or below")
    model_axis.set_title("per-model SLO attainment (CDF)", fontsize=9)
    model_axis.axvline(result["settings"]["attainment_goal"], color="gray", linestyle=":", linewidth=0.8)
    settings = result["settings"]
    figure.suptitle(f"SIMULATED day (discrete-event model, not measured): {result['models']} models, "
                    f"{result['gpu_model']}, headroom {result['headroom_fraction']:g}, request "
                    f"'{settings['request_shape']}', {settings['window_s']:g} s per slot, noise sigma slot "
                    f"{settings['slot_noise_sigma']:g} / day {settings['day_noise_sigma']:g}, seed "
                    f"{settings['seed']}", fontsize=9)
    return _save(figure, path)
