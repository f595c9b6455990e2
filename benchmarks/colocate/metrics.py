"""The numbers of the co-location benchmark, as pure functions over plain arrays (numpy only).

Definitions (benchmarks/colocate/README.md repeats them):
- latency of a request = completion time - its scheduled (Poisson) arrival time, queueing included
  (open loop: a slow request delays the next ones instead of hiding them). Requests still queued
  PHASE_DRAIN_S after the window are 'unserved'; they count as SLO misses and enter percentiles
  with the time they had waited when the phase was cut (a lower bound).
- SLO of a service (per variant) = SLO_MULTIPLE x its solo p99 (median of the solo trials' p99).
- SLO attainment = share of the window's requests completed within the SLO.
- best-effort throughput = training steps per second done inside the window (partial steps at the
  window's edges counted by their overlap).
- goodput (normalised) = sum over services of (requests within SLO per second / the same in solo)
  + best-effort throughput / solo throughput. Solo-alone equals the number of workloads of the mix.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

PERCENTILES = (50, 95, 99)


def arrival_schedule_s(rate_per_s: float, seconds: float, seed: int) -> np.ndarray:
    """Poisson arrival offsets (s, sorted, in [0, seconds)) of an open-loop client, reproducible by seed."""
    if isinstance(rate_per_s, bool) or not isinstance(rate_per_s, (int, float)) or not math.isfinite(rate_per_s) \
            or rate_per_s <= 0:
        raise ValueError(f"rate_per_s must be a positive finite number of requests per second, got {rate_per_s!r}")
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"seconds must be a positive finite duration, got {seconds!r}")
    from lithos_ray.scheduler import simulated  # the simulator's Poisson process: one definition in the project
    rng = np.random.default_rng(seed)
    return simulated.poisson_arrivals_ms(float(rate_per_s), 1000.0 * seconds, rng) / 1000.0


def latency_percentiles_ms(latency_ms: Sequence[float]) -> dict:
    """{"p50_ms", "p95_ms", "p99_ms", "n"}; None values for an empty array."""
    values = np.asarray(latency_ms, dtype=float)
    if values.size and not np.all(np.isfinite(values)):
        raise ValueError("latencies must be finite numbers of milliseconds")
    out = {f"p{q}_ms": (float(np.percentile(values, q)) if values.size else None) for q in PERCENTILES}
    out["n"] = int(values.size)
    return out


def slo_ms_from_solo(solo_p99_ms_per_trial: Sequence[float], multiple: float) -> float:
    """The fixed SLO of a service: multiple x the median over solo trials of the solo p99."""
    values = [v for v in solo_p99_ms_per_trial if v is not None]
    if not values:
        raise ValueError("no solo p99 to derive the SLO from")
    if not multiple > 0:
        raise ValueError(f"the SLO multiple must be positive, got {multiple!r}")
    return float(multiple * np.median(values))


def slo_attainment(latency_ms: Sequence[float], slo_ms: float, unserved: int = 0) -> float | None:
    """Share of requests (served + unserved) completed within slo_ms; None without requests."""
    values = np.asarray(latency_ms, dtype=float)
    total = values.size + int(unserved)
    if total == 0:
        return None
    return float(np.count_nonzero(values <= slo_ms) / total)


def good_requests_per_s(latency_ms: Sequence[float], slo_ms: float, window_s: float) -> float:
    """Requests completed within the SLO per second of the window."""
    if not window_s > 0:
        raise ValueError(f"window_s must be positive, got {window_s!r}")
    return float(np.count_nonzero(np.asarray(latency_ms, dtype=float) <= slo_ms) / window_s)


def steps_in_window(step_start_s: Sequence[float], step_end_s: Sequence[float], window_start_s: float,
                    window_end_s: float) -> float:
    """Training steps done inside [window_start_s, window_end_s]: each step counts by the share of its
    duration that lies inside the window (so edges are not rounded to whole steps)."""
    starts, ends = np.asarray(step_start_s, dtype=float), np.asarray(step_end_s, dtype=float)
    if starts.shape != ends.shape:
        raise ValueError("step_start_s and step_end_s must have the same length")
    if not window_end_s > window_start_s:
        raise ValueError("the window must end after it starts")
    if np.any(ends < starts):
        raise ValueError("a step cannot end before it starts")
    lengths = np.maximum(ends - starts, 1e-12)
    overlap = np.clip(np.minimum(ends, window_end_s) - np.maximum(starts, window_start_s), 0.0, None)
    return float(np.sum(overlap / lengths))


def normalised_goodput(good_rps: dict[str, float], solo_good_rps: dict[str, float], be_steps_per_s: float | None,
                       solo_be_steps_per_s: float | None) -> float:
    """sum_services good_rps / solo good_rps + BE throughput / solo BE throughput."""
    total = 0.0
    for name, value in good_rps.items():
        reference = solo_good_rps.get(name)
        if not reference:
            raise ValueError(f"no solo goodput for service {name!r} to normalise by")
        total += value / reference
    if be_steps_per_s is not None:
        if not solo_be_steps_per_s:
            raise ValueError("no solo best-effort throughput to normalise by")
        total += be_steps_per_s / solo_be_steps_per_s
    return float(total)


def median_and_spread(values: Sequence[float | None]) -> dict:
    """{"median", "min", "max", "trials"} over trials (None entries ignored)."""
    kept = [float(v) for v in values if v is not None]
    if not kept:
        return {"median": None, "min": None, "max": None, "trials": 0}
    return {"median": float(np.median(kept)), "min": min(kept), "max": max(kept), "trials": len(kept)}


def borrowed_tpcs_per_launch(launch_tpcs: Sequence[int], quota_tpcs: int) -> np.ndarray:
    """TPCs each launch used beyond its client's quota (0 when it ran on its own quota or fewer)."""
    return np.clip(np.asarray(launch_tpcs, dtype=np.int64) - int(quota_tpcs), 0, None)


def reclaim_times_us(owner_launch_ns: Sequence[int], borrow_launch_ns: Sequence[int], borrow_duration_ns: Sequence[int],
                     idle_window_ns: int) -> np.ndarray:
    """Estimated reclaim time (us) at each owner wake-up: from the owner's first launch after an idle gap
    (no launch for idle_window_ns) to the predicted end of the last borrowed kernel launched before it
    (launch time + duration); 0 when no borrowed kernel was still running. A lower bound: a borrowed
    kernel may start later than its launch when its stream is busy."""
    owner = np.sort(np.asarray(owner_launch_ns, dtype=np.int64))
    starts = np.asarray(borrow_launch_ns, dtype=np.int64)
    ends = starts + np.asarray(borrow_duration_ns, dtype=np.int64)
    if starts.shape != ends.shape:
        raise ValueError("borrow_launch_ns and borrow_duration_ns must have the same length")
    if owner.size == 0:
        return np.zeros(0)
    gaps = np.diff(owner)
    wakes = owner[1:][gaps >= idle_window_ns]
    order = np.argsort(starts)
    starts, ends = starts[order], ends[order]
    latest_end = np.maximum.accumulate(ends) if ends.size else ends
    out = []
    for wake in wakes:
        i = np.searchsorted(starts, wake, side="left") - 1
        out.append(max(0, int(latest_end[i]) - int(wake)) / 1000.0 if i >= 0 else 0.0)
    return np.asarray(out, dtype=float)
