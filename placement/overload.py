"""Fluid overload check of a plan (simulated): given observed TPC demand per model and slot, the share
of (GPU, slot) pairs where the replicas on a GPU want more TPCs than the GPU has. This is a fluid
count, not a latency simulation: an overloaded GPU-slot is one where queues grow and SLOs are at risk.
"""
from __future__ import annotations

import numpy as np

from .planner import Plan, PackingProblem, peak_packing


def overloaded_gpu_slot_share(gpu_of_item: np.ndarray, item_demand_tpcs: np.ndarray,
                              gpu_tpcs: float) -> float:
    """gpu_of_item: [items]; item_demand_tpcs: [items, slots] observed; NaN rows are skipped."""
    known = ~np.isnan(item_demand_tpcs).any(axis=1)
    gpus, rows = np.unique(gpu_of_item[known], return_inverse=True)
    loads = np.zeros((gpus.size, item_demand_tpcs.shape[1]))
    np.add.at(loads, rows, item_demand_tpcs[known])
    return float((loads > gpu_tpcs + 1e-9).mean()) if loads.size else 0.0


def observed_item_demand(problem: PackingProblem, model_names: list[str],
                         model_demand_tpcs: np.ndarray) -> np.ndarray:
    """Spread observed per-model demand [models, slots] evenly over each model's replicas."""
    row_of_model = {name: row for row, name in enumerate(model_names)}
    rows = np.array([row_of_model[m] for m in problem.item_models], dtype=np.int64)
    return model_demand_tpcs[rows] / problem.item_replicas[:, None]


def compare_overload(plan: Plan, problem: PackingProblem, model_names: list[str],
                     observed_days_tpcs: list[np.ndarray]) -> dict:
    """Overloaded GPU-slot share of the plan and of peak packing over the given observed days."""
    gpu_of_item = np.array([plan.gpu_of()[name] for name in problem.item_names], dtype=np.int64)
    peak_gpu_of_item = peak_packing(problem).gpu_of_item
    plan_shares, peak_shares = [], []
    for day in observed_days_tpcs:
        item_demand = observed_item_demand(problem, model_names, day)
        plan_shares.append(overloaded_gpu_slot_share(gpu_of_item, item_demand, plan.gpu_tpcs))
        peak_shares.append(overloaded_gpu_slot_share(peak_gpu_of_item, item_demand, plan.gpu_tpcs))
    return {"days": len(observed_days_tpcs),
            "plan_overloaded_gpu_slot_share": round(float(np.mean(plan_shares)), 5),
            "peak_packing_overloaded_gpu_slot_share": round(float(np.mean(peak_shares)), 5),
            "plan_worst_day_share": round(float(np.max(plan_shares)), 5),
            "peak_packing_worst_day_share": round(float(np.max(peak_shares)), 5)}
