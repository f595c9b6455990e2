"""Picture of a plan: per GPU, the demand of its replicas stacked over the day (matplotlib, Agg)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .planner import Plan
from .profiles import ProfileSet

DEFAULT_MAX_GPUS_SHOWN = 12


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
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
