"""Online kernel-latency predictor: median of recent samples, scaled conservatively to a TPC count.

No offline profiling: it learns from the durations the shim samples (gpu_ns of the launch ring).
The same algorithm will run in C inside liblithos.so on the launch path, and a test will feed both
the same sequence, so the rules below are exact and use integers only.

Exact rules
-----------
1. Key. A kernel is identified by `KernelKey(function_id, grid_blocks, block_threads)`: the CUfunction
   handle (any 64-bit id unique in the process), gridDim.x*y*z and blockDim.x*y*z. Different shapes of
   one function are different keys.
2. Samples. `observe(key, duration_ns, tpcs)` records one measured duration (integer ns >= 1) of a
   launch that ran on `tpcs` TPCs (integer >= 1). Each key keeps its last WINDOW = 8 samples in a
   ring (the 9th overwrites the oldest).
3. Estimate from one sample (d ns on t TPCs) for T TPCs:
       T >= t:  d                          (never credit a speed-up that was not observed)
       T <  t:  ceil(d * t / T) = (d * t + T - 1) // T
   Both are upper bounds when l(t) = m/t + b with m, b >= 0 (DESIGN.md): fewer TPCs slow a kernel
   by at most t/T, and more TPCs never slow it.
4. Prediction for T TPCs. Fewer than MIN_SAMPLES = 3 samples: None (unknown; the launch rule never
   borrows for it). Otherwise sort the n estimates of rule 3 ascending and return the one at index
   n // 2 (the median; the upper one of the two middle values when n is even). With n samples, up
   to (n - 1) // 2 outliers (3 of 8) on either side cannot move it outside the normal samples' range.
5. Capacity. At most `capacity` keys (default 1024). When a sample arrives for a new key while the
   table is full, the key whose latest sample is the oldest (smallest update counter; every
   `observe` call increments one counter shared by all keys) is dropped first.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Sequence

import numpy as np

WINDOW = 8
MIN_SAMPLES = 3
DEFAULT_CAPACITY = 1024
# A prediction is "off" for the accuracy report when it misses the measurement by more than this.
DEFAULT_OFF_THRESHOLD_US = 50.0


class KernelKey(NamedTuple):
    """Kernel identity and launch shape, as the shim sees them at cuLaunchKernel*."""

    function_id: int        # CUfunction handle (or any id unique per function in the process)
    grid_blocks: int        # gridDim.x * gridDim.y * gridDim.z
    block_threads: int      # blockDim.x * blockDim.y * blockDim.z


def _validate_key(key) -> KernelKey:
    if not (isinstance(key, tuple) and len(key) == 3):
        raise ValueError(f"key must be a KernelKey(function_id, grid_blocks, block_threads), got {key!r}")
    for field, value in zip(KernelKey._fields, key):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"key.{field} must be an integer >= 0, got {value!r}")
    return KernelKey(*(int(v) for v in key))


def _positive_int(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{what} must be an integer >= 1, got {value!r}")
    return int(value)


def estimate_ns(duration_ns: int, sample_tpcs: int, tpcs: int) -> int:
    """Rule 3: upper bound on the duration on `tpcs` TPCs from one sample of `duration_ns` on `sample_tpcs`."""
    if tpcs >= sample_tpcs:
        return duration_ns
    return (duration_ns * sample_tpcs + tpcs - 1) // tpcs


class _Entry:
    __slots__ = ("durations_ns", "tpcs", "count", "next", "updated")

    def __init__(self) -> None:
        self.durations_ns = [0] * WINDOW
        self.tpcs = [0] * WINDOW
        self.count = 0          # samples held, up to WINDOW
        self.next = 0           # ring index the next sample goes to
        self.updated = 0        # value of the shared update counter at the latest sample


class LatencyPredictor:
    """Per-process predictor (one per client, as in the shim). See the module docstring for the rules.

    usage:
        predictor = LatencyPredictor()
        key = KernelKey(function_id=0x7f00_1234, grid_blocks=264, block_threads=256)
        predictor.observe(key, duration_ns=180_000, tpcs=8)    # three samples or more ...
        predictor.predict_ns(key, tpcs=8)                      # -> median estimate, or None if unknown
    """

    def __init__(self, capacity: int = DEFAULT_CAPACITY):
        self.capacity = _positive_int(capacity, "capacity")
        self._entries: dict[KernelKey, _Entry] = {}
        self._updates = 0

    def __len__(self) -> int:
        return len(self._entries)

    def observe(self, key: KernelKey, duration_ns: int, tpcs: int) -> None:
        """Record that one launch of `key` took `duration_ns` on `tpcs` TPCs."""
        key = _validate_key(key)
        duration_ns = _positive_int(duration_ns, "duration_ns")
        tpcs = _positive_int(tpcs, "tpcs")
        entry = self._entries.get(key)
        if entry is None:
            if len(self._entries) >= self.capacity:
                oldest = min(self._entries, key=lambda k: self._entries[k].updated)
                del self._entries[oldest]
            entry = self._entries[key] = _Entry()
        entry.durations_ns[entry.next] = duration_ns
        entry.tpcs[entry.next] = tpcs
        entry.next = (entry.next + 1) % WINDOW
        entry.count = min(entry.count + 1, WINDOW)
        self._updates += 1
        entry.updated = self._updates

    def predict_ns(self, key: KernelKey, tpcs: int) -> int | None:
        """Predicted duration (ns) of `key` on `tpcs` TPCs, or None with fewer than MIN_SAMPLES samples."""
        entry = self._entries.get(key)
        if entry is None or entry.count < MIN_SAMPLES:
            return None
        estimates = sorted(estimate_ns(entry.durations_ns[i], entry.tpcs[i], tpcs) for i in range(entry.count))
        return estimates[entry.count // 2]

    def samples(self, key: KernelKey) -> list[tuple[int, int]]:
        """The (duration_ns, tpcs) samples held for `key`, oldest first (for tests and the C mirror check)."""
        entry = self._entries.get(key)
        if entry is None:
            return []
        start = (entry.next - entry.count) % WINDOW
        return [(entry.durations_ns[(start + i) % WINDOW], entry.tpcs[(start + i) % WINDOW])
                for i in range(entry.count)]


@dataclass(frozen=True)
class PredictorAccuracy:
    """How well predictions matched measurements (from (predicted, measured) pairs)."""

    pairs: int
    share_off_by_more_than_threshold: float   # fraction of pairs with |predicted - measured| > threshold
    threshold_us: float
    error_p50_us: float                       # percentiles of |predicted - measured|
    error_p99_us: float
    error_max_us: float
    share_under_predicted: float              # fraction with predicted < measured (the unsafe side)


def prediction_accuracy(predicted_ns: Sequence[float], measured_ns: Sequence[float],
                        threshold_us: float = DEFAULT_OFF_THRESHOLD_US) -> PredictorAccuracy:
    """Accuracy report over pairs of predictions and the durations then measured (both ns).

    The issue's figures: share of predictions off by more than 50 us, and the p99 of the error.
    """
    predicted = np.asarray(predicted_ns, dtype=float)
    measured = np.asarray(measured_ns, dtype=float)
    if predicted.ndim != 1 or predicted.shape != measured.shape:
        raise ValueError(f"predicted_ns and measured_ns must be 1-D and of equal length, got shapes "
                         f"{predicted.shape} and {measured.shape}")
    if predicted.size == 0:
        raise ValueError("no (predicted, measured) pairs given; the report needs at least one")
    if not (np.all(np.isfinite(predicted)) and np.all(np.isfinite(measured))):
        raise ValueError("predicted_ns and measured_ns must be finite numbers (drop launches predicted as None)")
    if not (isinstance(threshold_us, (int, float)) and math.isfinite(threshold_us) and threshold_us >= 0):
        raise ValueError(f"threshold_us must be a finite number >= 0, got {threshold_us!r}")
    error_us = np.abs(predicted - measured) / 1000.0
    return PredictorAccuracy(
        pairs=int(predicted.size),
        share_off_by_more_than_threshold=float(np.mean(error_us > threshold_us)),
        threshold_us=float(threshold_us),
        error_p50_us=float(np.percentile(error_us, 50)),
        error_p99_us=float(np.percentile(error_us, 99)),
        error_max_us=float(error_us.max()),
        share_under_predicted=float(np.mean(predicted < measured)),
    )
