"""Traffic profiles from recorded request rates, e.g. a Ray Serve deployment's metrics in Prometheus.

Ray Serve counts requests per replica in `ray_serve_deployment_request_counter_total` (labels
deployment, replica, application, route). The per-deployment rate over a week comes from Prometheus'
range query, saved as JSON:

    curl -G http://PROMETHEUS:9090/api/v1/query_range \
      --data-urlencode 'query=sum by (deployment) (rate(ray_serve_deployment_request_counter_total[5m]))' \
      --data-urlencode start=2026-11-16T00:00:00Z --data-urlencode end=2026-11-23T00:00:00Z \
      --data-urlencode step=300 > rates.json

`samples_from_prometheus_matrix` reads that answer; `traffic_from_samples` folds the samples onto one
day: the mean rate of each slot on each day, then the highest (or mean) of the days.
"""
from __future__ import annotations

import math

import numpy as np

from .profiles import MINUTES_PER_DAY, ProfileError, slots_per_day_problem

SECONDS_PER_DAY = MINUTES_PER_DAY * 60
STATISTICS = ("max", "mean")


def samples_from_prometheus_matrix(response: dict, model_label: str = "deployment") -> dict[str, list[tuple[float, float]]]:
    """Model name (the `model_label` label) -> [(unix_time_s, rate_rps)]; series with the same name
    are added up sample by sample."""
    data = response.get("data") if isinstance(response, dict) else None
    if not isinstance(data, dict) or data.get("resultType") != "matrix" or not isinstance(data.get("result"), list):
        raise ProfileError("expected a Prometheus query_range answer: {\"data\": {\"resultType\": \"matrix\", "
                           "\"result\": [...]}}")
    summed: dict[str, dict[float, float]] = {}
    for series in data["result"]:
        name = (series.get("metric") or {}).get(model_label)
        if not name:
            raise ProfileError(f"a series has no {model_label!r} label; query with "
                               f"`sum by ({model_label}) (...)` or pass the label that names the model")
        for point in series.get("values") or []:
            try:
                time_s, rate = float(point[0]), float(point[1])
            except (TypeError, ValueError, IndexError):
                raise ProfileError(f"series {name!r}: a sample is not [unix_time, \"rate\"]: {point!r}") from None
            if math.isfinite(rate):          # Prometheus writes NaN for gaps
                per_time = summed.setdefault(name, {})
                per_time[time_s] = per_time.get(time_s, 0.0) + rate
    return {name: sorted(per_time.items()) for name, per_time in summed.items()}


def traffic_from_samples(samples: dict[str, list[tuple[float, float]]], slots_per_day: int,
                         utc_offset_h: float = 0.0, statistic: str = "max") -> dict[str, list[float]]:
    """Fold (unix_time_s, rate_rps) samples onto `slots_per_day` slots of the clock `utc_offset_h`
    hours from UTC. Every slot of the day needs at least one sample for every model."""
    if slots_per_day_problem(slots_per_day):
        raise ProfileError(slots_per_day_problem(slots_per_day))
    if statistic not in STATISTICS:
        raise ProfileError(f"statistic must be one of {STATISTICS}; got {statistic!r}")
    slot_s = SECONDS_PER_DAY / slots_per_day
    traffic = {}
    for name, points in samples.items():
        if not points:
            raise ProfileError(f"model {name!r} has no samples")
        times_s = np.array([p[0] for p in points], dtype=float) + utc_offset_h * 3600.0
        rates = np.array([p[1] for p in points], dtype=float)
        if (rates < 0).any():
            raise ProfileError(f"model {name!r} has a negative rate ({rates.min():g} req/s)")
        day = np.floor(times_s / SECONDS_PER_DAY).astype(np.int64)
        slot = np.floor((times_s - day * SECONDS_PER_DAY) / slot_s).astype(np.int64)
        day -= day.min()
        sums = np.zeros((day.max() + 1, slots_per_day))
        counts = np.zeros_like(sums)
        np.add.at(sums, (day, slot), rates)
        np.add.at(counts, (day, slot), 1.0)
        seen = counts.sum(axis=0) > 0
        if not seen.all():
            missing = np.nonzero(~seen)[0].tolist()
            raise ProfileError(f"model {name!r} has no samples in slot(s) {missing[:10]} of {slots_per_day}; "
                               f"record at least one full day with a step shorter than a slot")
        with np.errstate(invalid="ignore"):
            day_means = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
        folded = np.nanmax(day_means, axis=0) if statistic == "max" else np.nanmean(day_means, axis=0)
        traffic[name] = [round(float(v), 6) for v in folded]
    return traffic
