"""Pack models onto GPUs by their daily TPC demand so that no GPU is over its usable TPCs in any slot.

Usable TPCs per GPU = the GPU's TPCs * (1 - headroom_fraction). A model whose peak exceeds
max_replica_share * usable is split into equal replicas (replicas = ceil(peak / (share * usable))),
each carrying demand / replicas; the replicas are what gets placed. Every plan reports, next to its GPU count:
- fluid_lower_bound: max over slots of summed demand / usable TPCs (also over memory and item count);
- large_item_lower_bound: most items that need more than half a GPU in one same slot;
- conflict_clique_lower_bound: a set of replicas no two of which fit one GPU together (found
  greedily among the largest CLIQUE_MAX_ITEMS replicas), which need that many GPUs;
- lower_bound_gpus: the largest of these, the fluid one rounded up; no plan can use fewer GPUs;
- peak_packing_gpus: GPUs when every replica reserves its peak all day (best-fit decreasing), which
  is what Ray's fractional `num_gpus` gives at best; peak_fluid_bound = sum of peaks / usable.
Instances with at most `exact_max_items` replicas are solved exactly with HiGHS when the heuristic
does not already meet the lower bound; larger ones use greedy packing plus local search.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from ..scheduler.gpu_models import GpuModel, lookup_model
from .exact import solve_exact
from .packing import Packing, balanced_pack, greedy_pack, improve_packing
from .profiles import ProfileError, ProfileSet

DEFAULT_GPU = "H100"
DEFAULT_HEADROOM_FRACTION = 0.10
DEFAULT_TIME_LIMIT_S = 5.0
DEFAULT_EXACT_MAX_ITEMS = 40
DEFAULT_MAX_REPLICA_SHARE = 1.0
CLIQUE_MAX_ITEMS = 1500      # the conflict clique is searched among this many largest replicas
CLIQUE_TRIALS = 16
FIT_TOLERANCE = 1e-9


@dataclass(frozen=True)
class PackingProblem:
    """Replicas to place and their demand normalised to one GPU (capacity 1.0 per column)."""
    gpu: GpuModel
    headroom_fraction: float
    usable_tpcs: float
    item_names: list[str]
    item_models: list[str]
    item_replica_index: np.ndarray
    item_replicas: np.ndarray
    demand_tpcs: np.ndarray          # [items, slots]
    normalized_demand: np.ndarray    # [items, slots + memory? + count]
    slots_per_day: int
    max_replica_share: float


@dataclass
class Placement:
    item: str               # model name, or "model#r" for replica r of a split model
    model: str
    replica_index: int
    replicas: int
    gpu_index: int
    peak_tpcs: float        # this replica's highest slot demand
    reserved_tpcs: int      # Ray-level reservation; the reservations on one GPU add up to its TPCs
    slo_ms: float


@dataclass
class Plan:
    gpu_model: str
    gpu_tpcs: int
    headroom_fraction: float
    usable_tpcs: float
    slots_per_day: int
    placements: list[Placement]
    gpus_used: int
    lower_bound_gpus: int
    fluid_lower_bound: float
    large_item_lower_bound: int
    peak_packing_gpus: int
    peak_fluid_bound: float
    method: str             # "heuristic", "heuristic (meets lower bound)", "exact (HiGHS ...)"
    proved_optimal: bool
    planning_time_s: float
    max_replica_share: float = DEFAULT_MAX_REPLICA_SHARE
    conflict_clique_lower_bound: int = 0
    moved_items: list[str] = field(default_factory=list)   # filled by re-planning

    @property
    def gap_to_lower_bound(self) -> float:
        return self.gpus_used / max(self.lower_bound_gpus, 1)

    @property
    def saving_vs_peak_packing(self) -> float:
        return 1.0 - self.gpus_used / max(self.peak_packing_gpus, 1)

    def gpu_of(self) -> dict[str, int]:
        return {p.item: p.gpu_index for p in self.placements}

    def to_dict(self) -> dict:
        data = asdict(self)
        data["gap_to_lower_bound"] = round(self.gap_to_lower_bound, 4)
        data["saving_vs_peak_packing"] = round(self.saving_vs_peak_packing, 4)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "Plan":
        try:
            fields = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
            fields["placements"] = [Placement(**p) for p in data["placements"]]
            return cls(**fields)
        except (KeyError, TypeError) as error:
            raise ProfileError(f"not a plan written by `lithos-ray place --json`: {error}") from None


def build_problem(profile_set: ProfileSet, gpu_name: str = DEFAULT_GPU,
                  headroom_fraction: float = DEFAULT_HEADROOM_FRACTION,
                  max_replica_share: float = DEFAULT_MAX_REPLICA_SHARE) -> PackingProblem:
    try:
        gpu = lookup_model(gpu_name)
    except ValueError as error:
        raise ProfileError(str(error)) from None
    if not 0.0 <= headroom_fraction < 1.0:
        raise ProfileError(f"headroom_fraction must be in [0, 1) (share of a GPU's TPCs kept free); "
                           f"got {headroom_fraction}")
    if not 0.0 < max_replica_share <= 1.0:
        raise ProfileError(f"max_replica_share must be in (0, 1] (largest share of a GPU's usable TPCs "
                           f"one replica may need at its peak); got {max_replica_share}")
    usable_tpcs = gpu.tpcs * (1.0 - headroom_fraction)
    demand = profile_set.demand_matrix_tpcs()
    specs = list(profile_set.models.values())
    names = profile_set.model_names
    memory_gib = np.array([s.memory_gib for s in specs])
    too_big = [(n, m) for n, m in zip(names, memory_gib) if m > gpu.memory_gib]
    if too_big:
        name, memory = too_big[0]
        raise ProfileError(f"model {name!r} needs {memory:g} GiB per replica; a {gpu.name} has "
                           f"{gpu.memory_gib} GiB")
    replica_peak_tpcs = usable_tpcs * max_replica_share
    replicas = np.maximum(1, np.ceil(demand.max(axis=1) / replica_peak_tpcs - FIT_TOLERANCE)).astype(int)
    model_of_item = np.repeat(np.arange(len(names)), replicas)
    replica_index = np.concatenate([np.arange(r) for r in replicas]) if len(names) else np.zeros(0, int)
    item_replicas = replicas[model_of_item]
    item_demand = demand[model_of_item] / item_replicas[:, None]
    columns = [item_demand / usable_tpcs]
    if memory_gib.any():
        columns.append((memory_gib[model_of_item] / gpu.memory_gib)[:, None])
    columns.append(np.full((model_of_item.size, 1), 1.0 / gpu.tpcs))  # reservations need >= 1 TPC
    item_names = [names[m] if replicas[m] == 1 else f"{names[m]}#{r}"
                  for m, r in zip(model_of_item, replica_index)]
    return PackingProblem(gpu, headroom_fraction, usable_tpcs, item_names,
                          [names[m] for m in model_of_item], replica_index, item_replicas,
                          item_demand, np.hstack(columns), profile_set.slots_per_day, max_replica_share)


@dataclass(frozen=True)
class LowerBounds:
    fluid: float            # max over columns of summed normalised demand
    large_items: int
    conflict_clique: int
    gpus: int               # the best of them in whole GPUs


def conflict_clique_size(demand: np.ndarray, seed: int = 0) -> int:
    """Size of a set of items no two of which fit one GPU together (greedy, randomised restarts)."""
    peaks = demand.max(axis=1)
    candidates = np.nonzero(peaks > 0.25)[0]
    candidates = candidates[np.argsort(-peaks[candidates], kind="stable")][:CLIQUE_MAX_ITEMS]
    if candidates.size == 0:
        return 0
    rows = demand[candidates]
    conflicts = np.array([(rows[i] + rows).max(axis=1) > 1.0 + FIT_TOLERANCE for i in range(len(rows))])
    np.fill_diagonal(conflicts, False)
    degree = conflicts.sum(axis=1).astype(float)
    rng = np.random.default_rng(seed)
    best = 1
    for trial in range(CLIQUE_TRIALS):
        order = np.argsort(-(degree + (rng.random(degree.size) * 5.0 if trial else 0.0)), kind="stable")
        alive = np.ones(degree.size, dtype=bool)
        size = 0
        for item in order:
            if alive[item]:
                size += 1
                alive &= conflicts[item]
        best = max(best, size)
    return best


def lower_bounds(problem: PackingProblem) -> LowerBounds:
    demand = problem.normalized_demand
    if demand.shape[0] == 0:
        return LowerBounds(0.0, 0, 0, 0)
    fluid = float(demand.sum(axis=0).max())
    large_items = int((demand > 0.5 + FIT_TOLERANCE).sum(axis=0).max())
    clique = conflict_clique_size(demand)
    return LowerBounds(fluid, large_items, clique, max(large_items, clique, math.ceil(fluid - 1e-6)))


def peak_packing(problem: PackingProblem) -> Packing:
    """Every replica reserves its peak all day; best-fit decreasing on (peak, memory, count)."""
    slots = problem.slots_per_day
    demand = problem.normalized_demand
    reserved = np.hstack([demand[:, :slots].max(axis=1, keepdims=True), demand[:, slots:]])
    order = np.argsort(-reserved.max(axis=1), kind="stable")
    return greedy_pack(reserved, order)


def split_gpu_tpcs(peaks_tpcs: np.ndarray, gpu_tpcs: int) -> np.ndarray:
    """Split a GPU's TPCs over its replicas in proportion to the given weights (their peaks, or one
    slot's demand), largest remainder, at least 1 each; equal shares when all weights are 0."""
    count = peaks_tpcs.size
    weights = peaks_tpcs if peaks_tpcs.sum() > 0 else np.ones(count)
    exact = weights / weights.sum() * gpu_tpcs
    reserved = np.maximum(np.floor(exact).astype(int), 1)
    while reserved.sum() > gpu_tpcs:                       # the >= 1 floor overshot
        reserved[np.argmax(reserved)] -= 1
    for index in np.argsort(-(exact - np.floor(exact)), kind="stable")[: gpu_tpcs - reserved.sum()]:
        reserved[index] += 1
    return reserved


def make_plan(problem: PackingProblem, profile_set: ProfileSet, gpu_of_item: np.ndarray, method: str,
              proved_optimal: bool, started_s: float, bounds: LowerBounds | None = None) -> Plan:
    bounds = bounds or lower_bounds(problem)
    baseline = peak_packing(problem)
    peaks = problem.demand_tpcs.max(axis=1) if problem.demand_tpcs.size else np.zeros(0)
    reserved = np.zeros(len(problem.item_names), dtype=int)
    for gpu in np.unique(gpu_of_item):
        on_gpu = np.nonzero(gpu_of_item == gpu)[0]
        reserved[on_gpu] = split_gpu_tpcs(peaks[on_gpu], problem.gpu.tpcs)
    placements = [
        Placement(item=problem.item_names[i], model=problem.item_models[i],
                  replica_index=int(problem.item_replica_index[i]), replicas=int(problem.item_replicas[i]),
                  gpu_index=int(gpu_of_item[i]), peak_tpcs=round(float(peaks[i]), 4),
                  reserved_tpcs=int(reserved[i]), slo_ms=profile_set.models[problem.item_models[i]].slo_ms)
        for i in range(len(problem.item_names))
    ]
    gpus_used = int(np.unique(gpu_of_item).size)
    return Plan(gpu_model=problem.gpu.name, gpu_tpcs=problem.gpu.tpcs,
                headroom_fraction=problem.headroom_fraction, usable_tpcs=problem.usable_tpcs,
                slots_per_day=problem.slots_per_day, placements=placements, gpus_used=gpus_used,
                lower_bound_gpus=bounds.gpus, fluid_lower_bound=round(bounds.fluid, 4),
                large_item_lower_bound=bounds.large_items, peak_packing_gpus=baseline.gpus_used,
                peak_fluid_bound=round(float(peaks.sum() / problem.usable_tpcs), 4), method=method,
                proved_optimal=proved_optimal or gpus_used == bounds.gpus,
                planning_time_s=round(time.perf_counter() - started_s, 4),
                max_replica_share=problem.max_replica_share, conflict_clique_lower_bound=bounds.conflict_clique)


def heuristic_packing(problem: PackingProblem, deadline_s: float, lower_bound: int, seed: int = 0) -> Packing:
    """Best of greedy best-fit and balanced packing at GPU counts from the lower bound up, then local
    search until the deadline. The first greedy and balanced passes always run."""
    demand = problem.normalized_demand
    by_peak = np.argsort(-demand.max(axis=1), kind="stable")
    best = greedy_pack(demand, by_peak)
    tried: set[int] = set()
    gpus = lower_bound
    while best.gpus_used > lower_bound and gpus < best.gpus_used and gpus not in tried:
        tried.add(gpus)
        candidate = balanced_pack(demand, by_peak, gpus)
        if candidate.gpus_used < best.gpus_used:
            best = candidate
        if time.perf_counter() >= deadline_s:
            break
        # the next count halves the distance to the best found so far
        gpus = gpus + max(1, (best.gpus_used - gpus) // 2)
    return improve_packing(best, deadline_s, seed=seed, lower_bound_gpus=lower_bound)


def plan_placement(profile_set: ProfileSet, gpu_name: str = DEFAULT_GPU,
                   headroom_fraction: float = DEFAULT_HEADROOM_FRACTION,
                   time_limit_s: float = DEFAULT_TIME_LIMIT_S,
                   exact_max_items: int = DEFAULT_EXACT_MAX_ITEMS,
                   max_replica_share: float = DEFAULT_MAX_REPLICA_SHARE, seed: int = 0) -> Plan:
    """Plan within about `time_limit_s` seconds (the first greedy and balanced passes always run)."""
    if time_limit_s <= 0:
        raise ProfileError(f"time_limit_s must be > 0; got {time_limit_s}")
    started_s = time.perf_counter()
    problem = build_problem(profile_set, gpu_name, headroom_fraction, max_replica_share)
    bounds = lower_bounds(problem)
    lower_bound = bounds.gpus
    use_exact = len(problem.item_names) <= exact_max_items
    heuristic_deadline = started_s + (min(0.5, time_limit_s / 4) if use_exact else time_limit_s)
    packing = heuristic_packing(problem, heuristic_deadline, lower_bound, seed)
    gpu_of_item = packing.compact_assignment()
    method = "heuristic"
    proved_optimal = packing.gpus_used <= lower_bound
    if proved_optimal:
        method = "heuristic (meets lower bound)"
    if use_exact and len(problem.item_names) > 0:
        remaining_s = time_limit_s - (time.perf_counter() - started_s)
        result = solve_exact(problem.normalized_demand, problem.slots_per_day, packing.gpus_used,
                             remaining_s, start_gpu_of_item=gpu_of_item)
        if result.gpu_of_item is not None:
            gpu_of_item = _renumber(result.gpu_of_item)
            proved_optimal = result.proved_optimal
            method = f"exact (HiGHS: {result.status})"
    return make_plan(problem, profile_set, gpu_of_item, method, proved_optimal, started_s, bounds)


def _renumber(gpu_of_item: np.ndarray) -> np.ndarray:
    order: dict[int, int] = {}
    return np.array([order.setdefault(int(g), len(order)) for g in gpu_of_item], dtype=np.int64)


def gpu_demand_tpcs(plan: Plan, profile_set: ProfileSet) -> tuple[list[int], np.ndarray]:
    """(GPU indices in the plan, [gpus, slots] summed profile demand of the replicas on each)."""
    demand = profile_set.demand_matrix_tpcs()
    row_of_model = {name: row for row, name in enumerate(profile_set.model_names)}
    gpu_indices = sorted({p.gpu_index for p in plan.placements})
    row_of_gpu = {gpu: row for row, gpu in enumerate(gpu_indices)}
    loads = np.zeros((len(gpu_indices), profile_set.slots_per_day))
    for p in plan.placements:
        loads[row_of_gpu[p.gpu_index]] += demand[row_of_model[p.model]] / p.replicas
    return gpu_indices, loads
