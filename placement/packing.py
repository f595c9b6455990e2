"""Vector bin packing over normalised demand: every item is a row of demands (one per day slot, plus
memory and an item count), every GPU holds 1.0 in each column. Pure numpy, no policy about models.

- `greedy_pack`: items in the given order, each into the open GPU where it fits with the smallest
  squared residual afterwards (fills valleys: an item whose peak falls where a GPU is empty scores
  best), a new GPU when none fits.
- `balanced_pack`: spread items over a fixed number of GPUs so each carries a similar mix of the day,
  then move what overflows; tried for GPU counts from the lower bound up.
- `improve_packing`: local search until a deadline: take the emptiest GPU apart, put its items where
  they overflow least, then move items out of over-full GPUs (least total overflow, short tabu)
  until everything fits again; repeat while that succeeds.
"""
from __future__ import annotations

import time

import numpy as np

FIT_TOLERANCE = 1e-9


class Packing:
    """Mutable packing state: loads per GPU, the GPU of every item, the items of every GPU."""

    def __init__(self, demand: np.ndarray):
        self.demand = np.ascontiguousarray(demand, dtype=float)     # [items, dims], capacity 1.0
        items, dims = self.demand.shape
        self.volume = self.demand.sum(axis=1)
        self.loads = np.zeros((max(items, 1), dims))
        self.gpu_of_item = np.full(items, -1, dtype=np.int64)
        self.items_of_gpu: list[set[int]] = []
        self.open_gpus: list[int] = []

    @property
    def gpus_used(self) -> int:
        return len(self.open_gpus)

    def copy(self) -> "Packing":
        other = Packing.__new__(Packing)
        other.demand, other.volume = self.demand, self.volume
        other.loads = self.loads.copy()
        other.gpu_of_item = self.gpu_of_item.copy()
        other.items_of_gpu = [set(items) for items in self.items_of_gpu]
        other.open_gpus = list(self.open_gpus)
        return other

    def _new_gpu(self) -> int:
        for gpu in range(len(self.items_of_gpu)):       # reuse an emptied row first
            if not self.items_of_gpu[gpu] and gpu not in self.open_gpus:
                self.open_gpus.append(gpu)
                return gpu
        gpu = len(self.items_of_gpu)
        if gpu >= self.loads.shape[0]:
            self.loads = np.vstack([self.loads, np.zeros_like(self.loads)])
        self.items_of_gpu.append(set())
        self.open_gpus.append(gpu)
        return gpu

    def place(self, item: int, gpu: int) -> None:
        self.loads[gpu] += self.demand[item]
        self.gpu_of_item[item] = gpu
        self.items_of_gpu[gpu].add(item)

    def remove(self, item: int) -> int:
        gpu = int(self.gpu_of_item[item])
        self.loads[gpu] -= self.demand[item]
        self.gpu_of_item[item] = -1
        self.items_of_gpu[gpu].discard(item)
        return gpu

    def close_if_empty(self, gpu: int) -> None:
        if not self.items_of_gpu[gpu] and gpu in self.open_gpus:
            self.open_gpus.remove(gpu)
            self.loads[gpu] = 0.0

    def best_gpu_for(self, item: int, candidates: np.ndarray) -> int:
        """The candidate GPU where `item` fits with the smallest squared residual; -1 if none."""
        if candidates.size == 0:
            return -1
        residual_after = 1.0 - self.loads[candidates] - self.demand[item]
        fits = residual_after.min(axis=1) >= -FIT_TOLERANCE
        if not fits.any():
            return -1
        fitting = residual_after[fits]
        scores = np.einsum("ij,ij->i", fitting, fitting)
        return int(candidates[fits][np.argmin(scores)])

    def insert(self, item: int) -> int:
        gpu = self.best_gpu_for(item, np.array(self.open_gpus, dtype=np.int64))
        if gpu < 0:
            gpu = self._new_gpu()
        self.place(item, gpu)
        return gpu

    def compact_assignment(self) -> np.ndarray:
        """GPU index per item, renumbered 0..gpus_used-1 by first appearance in item order."""
        renumber: dict[int, int] = {}
        result = np.empty_like(self.gpu_of_item)
        for item, gpu in enumerate(self.gpu_of_item):
            result[item] = renumber.setdefault(int(gpu), len(renumber))
        return result


def greedy_pack(demand: np.ndarray, order: np.ndarray) -> Packing:
    packing = Packing(demand)
    for item in order:
        packing.insert(int(item))
    return packing


def balanced_pack(demand: np.ndarray, order: np.ndarray, gpus: int) -> Packing:
    """Spread items over exactly `gpus` GPUs, each item where the GPU's highest column stays lowest
    (so every GPU carries a similar mix of the day); then take items off GPUs that are over (those
    that relieve the over-full columns most per unit of volume) and best-fit them, opening GPUs as
    needed. Works well when there are many items per GPU and `gpus` is near the fluid bound."""
    packing = Packing(demand)
    for _ in range(max(gpus, 1)):
        packing._new_gpu()
    loads = packing.loads
    count = max(gpus, 1)
    for item in order:
        peak_after = (loads[:count] + packing.demand[item]).max(axis=1)
        packing.place(int(item), int(np.argmin(peak_after)))
    evicted: list[int] = []
    for gpu in range(count):
        while loads[gpu].max() > 1.0 + FIT_TOLERANCE:
            hot_columns = loads[gpu] > 1.0 + FIT_TOLERANCE
            items = np.fromiter(packing.items_of_gpu[gpu], dtype=np.int64)
            relief = np.minimum(packing.demand[items][:, hot_columns], loads[gpu][hot_columns] - 1.0).sum(axis=1)
            item = int(items[np.argmax(relief / np.maximum(packing.volume[items], 1e-12))])
            packing.remove(item)
            evicted.append(item)
    for item in sorted(evicted, key=lambda i: -packing.demand[i].max()):
        packing.insert(item)
    for gpu in list(packing.open_gpus):
        packing.close_if_empty(gpu)
    return packing


def _overflow(loads: np.ndarray) -> np.ndarray:
    """Per GPU row: demand above capacity, summed over columns."""
    return np.maximum(loads - 1.0, 0.0).sum(axis=-1)


def _repair(packing: Packing, deadline_s: float, rng: np.random.Generator) -> bool:
    """Move items out of over-full GPUs until none is over (True) or the deadline passes (False).
    Each step takes one item that contributes to an overfull column of a random over-full GPU and
    moves it where the total overflow drops most; an item just moved waits a few steps (tabu)."""
    gpus = np.array(packing.open_gpus, dtype=np.int64)
    loads = packing.loads
    overflow = _overflow(loads[gpus])
    tabu_until = np.zeros(packing.demand.shape[0], dtype=np.int64)
    step = 0
    while True:
        over = np.nonzero(overflow > FIT_TOLERANCE)[0]
        if over.size == 0:
            return True
        if time.perf_counter() >= deadline_s:
            return False
        step += 1
        source_row = int(rng.choice(over))
        source = int(gpus[source_row])
        hot_columns = loads[source] > 1.0 + FIT_TOLERANCE
        items = np.array([i for i in packing.items_of_gpu[source] if tabu_until[i] <= step], dtype=np.int64)
        if items.size == 0:
            continue
        helps = packing.demand[items][:, hot_columns].sum(axis=1) > 0
        items = items[helps] if helps.any() else items
        if items.size > 4:
            items = rng.choice(items, size=4, replace=False)
        best = (np.inf, -1, -1)
        source_after = _overflow(loads[source][None, :] - packing.demand[items])    # [candidates]
        for candidate, after in zip(items, source_after):
            added = _overflow(loads[gpus] + packing.demand[candidate]) - overflow
            added[source_row] = np.inf
            target_row = int(np.argmin(added))
            delta = added[target_row] + after - overflow[source_row]
            if delta < best[0]:
                best = (delta, int(candidate), target_row)
        delta, item, target_row = best
        if item < 0 or (delta > FIT_TOLERANCE and rng.random() < 0.7):
            continue
        target = int(gpus[target_row])
        packing.remove(item)
        packing.place(item, target)
        overflow[source_row] = _overflow(loads[source])
        overflow[target_row] = _overflow(loads[target])
        tabu_until[item] = step + 5


def improve_packing(packing: Packing, deadline_s: float, seed: int = 0,
                    lower_bound_gpus: int = 0) -> Packing:
    """Local search until time.perf_counter() passes deadline_s or the lower bound is reached: take
    the emptiest GPU apart, put its items where they overflow least, repair; keep the result when the
    repair succeeds, else return the last packing that fit."""
    rng = np.random.default_rng(seed)
    best = packing
    while best.gpus_used > max(lower_bound_gpus, 1) and time.perf_counter() < deadline_s:
        trial = best.copy()
        emptiest = min(trial.open_gpus, key=lambda g: trial.loads[g].sum())
        freed = sorted(trial.items_of_gpu[emptiest], key=lambda i: -trial.volume[i])
        for item in freed:
            trial.remove(item)
        trial.close_if_empty(emptiest)
        gpus = np.array(trial.open_gpus, dtype=np.int64)
        for item in freed:
            added = _overflow(trial.loads[gpus] + trial.demand[item]) - _overflow(trial.loads[gpus])
            trial.place(item, int(gpus[np.argmin(added)]))
        if not _repair(trial, deadline_s, rng):
            break
        best = trial
    return best
