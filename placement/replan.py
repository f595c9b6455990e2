"""Re-planning when profiles change, moving at most `max_moves` already placed replicas.

A replica keeps its GPU index from the previous plan unless it must move. Steps:
1. replicas of the previous plan that still exist stay where they were; gone ones are dropped;
2. on every GPU that is now over its usable TPCs in some slot, replicas are taken off (those that
   relieve the over-full slots most, so that few move) until it fits: these are moves;
3. new replicas (models added, or a model split into more replicas) and the moved ones are placed by
   best fit, into free indices of the previous plan first, then new GPUs; placing a new replica is
   not a move;
4. with moves left, the emptiest GPUs are emptied into the others when all their replicas fit there
   and their count fits the remaining budget.
A replica is identified by its item name (model, or model#r), so a model whose replica count changes
gets new replicas. If step 2 alone needs more than `max_moves`, ProfileError says how many it needs.
"""
from __future__ import annotations

import time

import numpy as np

from .packing import FIT_TOLERANCE, Packing
from .planner import Plan, build_problem, make_plan
from .profiles import ProfileError, ProfileSet


def _relieving_item(packing: Packing, gpu: int, movable: set[int]) -> int:
    hot_columns = packing.loads[gpu] > 1.0 + FIT_TOLERANCE
    items = np.fromiter(packing.items_of_gpu[gpu], dtype=np.int64)
    relief = np.minimum(packing.demand[items][:, hot_columns], packing.loads[gpu][hot_columns] - 1.0).sum(axis=1)
    score = relief - 1e-3 * packing.volume[items]         # fewest moves: biggest relief first
    score[[i not in movable for i in items]] -= 1e6        # prefer new replicas (not a move) first
    return int(items[np.argmax(score)])


def replan(previous: Plan, profile_set: ProfileSet, max_moves: int) -> Plan:
    """A plan for `profile_set` on the previous plan's GPU model and headroom, moving <= max_moves."""
    if max_moves < 0:
        raise ProfileError(f"max_moves must be >= 0; got {max_moves}")
    started_s = time.perf_counter()
    problem = build_problem(profile_set, previous.gpu_model, previous.headroom_fraction,
                            previous.max_replica_share)
    previous_gpu = previous.gpu_of()
    packing = Packing(problem.normalized_demand)
    previous_gpu_count = max(previous_gpu.values(), default=-1) + 1
    for _ in range(previous_gpu_count):
        packing._new_gpu()
    kept = {i for i, name in enumerate(problem.item_names) if name in previous_gpu}
    for item in kept:
        packing.place(item, previous_gpu[problem.item_names[item]])
    to_place = [i for i in range(len(problem.item_names)) if i not in kept]
    moved: set[int] = set()
    for gpu in range(previous_gpu_count):
        while packing.loads[gpu].max() > 1.0 + FIT_TOLERANCE:
            item = _relieving_item(packing, gpu, kept)
            packing.remove(item)
            moved.add(item)
            to_place.append(item)
    if len(moved) > max_moves:
        raise ProfileError(f"the new profiles overload GPUs of the previous plan; fixing that moves "
                           f"{len(moved)} replicas but max_moves is {max_moves}")
    for gpu in range(previous_gpu_count):
        packing.close_if_empty(gpu)
    for item in sorted(to_place, key=lambda i: -packing.demand[i].max()):
        packing.insert(item)
    budget = max_moves - len(moved)
    for source in sorted(packing.open_gpus, key=lambda g: packing.loads[g].sum()):
        items = sorted(packing.items_of_gpu[source], key=lambda i: -packing.volume[i])
        moves_needed = sum(1 for i in items if i in kept and i not in moved)
        if not items or moves_needed > budget:
            continue
        others = np.array([g for g in packing.open_gpus if g != source], dtype=np.int64)
        targets = []
        for item in items:
            target = packing.best_gpu_for(item, others)
            if target < 0:
                break
            packing.remove(item)
            packing.place(item, target)
            targets.append(item)
        if len(targets) < len(items):
            for item in targets:
                packing.remove(item)
                packing.place(item, source)
            continue
        packing.close_if_empty(source)
        budget -= moves_needed
        moved.update(i for i in items if i in kept)
    moved_items = sorted(problem.item_names[i] for i in moved
                         if packing.gpu_of_item[i] != previous_gpu[problem.item_names[i]])
    plan = make_plan(problem, profile_set, packing.gpu_of_item.copy(), "re-plan (bounded moves)",
                     False, started_s)
    plan.moved_items = moved_items
    return plan
