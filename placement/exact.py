"""Exact packing of small instances with HiGHS (highspy): a mixed-integer program.

Variables: x[i,g] = item i on GPU g (binary), y[g] = GPU g used (binary), z[g] = GPU g's peak fill
(continuous). Rows: every item on one GPU; in every slot sum_i d[i,s] x[i,g] <= z[g] <= y[g]; memory
and item count sum_i d[i,k] x[i,g] <= y[g]; symmetry: y[g] >= y[g+1], item i only on GPUs 0..i.
Objective: sum y[g] + sum z[g] / (gpus + 1): fewest GPUs first, then, among plans with equally many
GPUs, the smallest sum of per-GPU peaks (models whose peaks do not coincide share a GPU).
"""
from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass

import numpy as np


@dataclass
class ExactResult:
    gpu_of_item: np.ndarray | None   # None when HiGHS found no solution in time
    proved_optimal: bool
    status: str


@contextlib.contextmanager
def _stdout_fd_silenced():
    """HiGHS prints a banner on fd 1 when constructed, before any option can turn it off."""
    sys.stdout.flush()
    saved_fd = os.dup(1)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 1)
        try:
            yield
        finally:
            os.dup2(saved_fd, 1)
            os.close(saved_fd)


def solve_exact(demand: np.ndarray, slot_columns: int, max_gpus: int, time_limit_s: float,
                start_gpu_of_item: np.ndarray | None = None) -> ExactResult:
    """demand: [items, dims] normalised to capacity 1; the first `slot_columns` columns are day slots
    (they define the peak), the rest (memory, item count) are plain capacity rows."""
    import highspy

    items, dims = demand.shape
    gpus = max_gpus

    def x(i: int, g: int) -> int:
        return i * gpus + g

    y0 = items * gpus
    z0 = y0 + gpus
    columns = z0 + gpus
    cost = np.zeros(columns)
    cost[y0:z0] = 1.0
    cost[z0:] = 1.0 / (gpus + 1)
    upper = np.ones(columns)
    for i in range(items):
        for g in range(i + 1, gpus):
            upper[x(i, g)] = 0.0            # symmetry: item i only on GPUs 0..i
    rows_lower, rows_upper, row_entries = [], [], []

    def add_row(entries: list[tuple[int, float]], lower: float, upper_bound: float) -> None:
        row_entries.append(entries)
        rows_lower.append(lower)
        rows_upper.append(upper_bound)

    for i in range(items):
        add_row([(x(i, g), 1.0) for g in range(gpus)], 1.0, 1.0)
    for g in range(gpus):
        for s in range(dims):
            entries = [(x(i, g), float(demand[i, s])) for i in range(items) if demand[i, s] > 0]
            if not entries:
                continue
            bound_column = z0 + g if s < slot_columns else y0 + g
            add_row(entries + [(bound_column, -1.0)], -highspy.kHighsInf, 0.0)
        add_row([(z0 + g, 1.0), (y0 + g, -1.0)], -highspy.kHighsInf, 0.0)
        for i in range(items):
            add_row([(x(i, g), 1.0), (y0 + g, -1.0)], -highspy.kHighsInf, 0.0)
        if g + 1 < gpus:
            add_row([(y0 + g, 1.0), (y0 + g + 1, -1.0)], 0.0, highspy.kHighsInf)

    lp = highspy.HighsLp()
    lp.num_col_ = columns
    lp.num_row_ = len(row_entries)
    lp.col_cost_ = cost
    lp.col_lower_ = np.zeros(columns)
    lp.col_upper_ = upper
    lp.row_lower_ = np.array(rows_lower)
    lp.row_upper_ = np.array(rows_upper)
    starts, indices, values = [0], [], []
    for entries in row_entries:
        for column, value in entries:
            indices.append(column)
            values.append(value)
        starts.append(len(indices))
    lp.a_matrix_.format_ = highspy.MatrixFormat.kRowwise
    lp.a_matrix_.start_ = np.array(starts, dtype=np.int32)
    lp.a_matrix_.index_ = np.array(indices, dtype=np.int32)
    lp.a_matrix_.value_ = np.array(values)
    lp.integrality_ = [highspy.HighsVarType.kInteger] * z0 + [highspy.HighsVarType.kContinuous] * gpus

    with _stdout_fd_silenced():
        solver = highspy.Highs()
        solver.setOptionValue("output_flag", False)
    solver.setOptionValue("time_limit", float(max(time_limit_s, 0.05)))
    solver.setOptionValue("threads", 1)
    solver.setOptionValue("random_seed", 0)
    solver.passModel(lp)
    if start_gpu_of_item is not None:
        start = np.zeros(columns)
        for i, g in enumerate(start_gpu_of_item):
            start[x(i, int(g))] = 1.0
            start[y0 + int(g)] = 1.0
        for g in range(gpus):
            on_gpu = start_gpu_of_item == g
            start[z0 + g] = demand[on_gpu, :slot_columns].sum(axis=0).max() if on_gpu.any() else 0.0
        solution = highspy.HighsSolution()
        solution.col_value = list(start)
        solution.value_valid = True
        solver.setSolution(solution)
    solver.run()
    status = solver.getModelStatus()
    status_text = solver.modelStatusToString(status)
    values = np.asarray(solver.getSolution().col_value)
    if values.size != columns or solver.getInfo().primal_solution_status == 0:
        return ExactResult(None, False, status_text)
    assignment = values[: items * gpus].reshape(items, gpus).argmax(axis=1)
    return ExactResult(assignment, status == highspy.HighsModelStatus.kOptimal, status_text)
