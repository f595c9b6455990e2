"""Profile sets to plan with: a seeded synthetic diurnal generator and one derived from ServeGen.

Synthetic (`synthetic_profile_set`): every model serves users in one region (UTC offset drawn from
Americas / Europe / Asia-Pacific weights), with a daytime bump and an evening bump in local time,
a night trough 2x-10x below the peak, and a log-normal size (peak TPCs, median about 5). A share of
models (default 8%) are batch workloads: flat, or running in a nightly window. `noisy_day` draws one
observed day from a profile: a per-model day factor and per-slot noise, both log-normal.

ServeGen (`servegen_profile_set`): real per-client request rates of Alibaba Bailian's model-serving
service (ServeGen, github.com/alibaba/ServeGen, Apache License 2.0; Xiang et al. 2025), 10-minute
windows over 7 days for the language models and 1 day for deepseek-r1 and mm-image. Each client with
traffic stands in for one model. The profile of a slot is the highest rate the client showed in that
slot over the planning days; `servegen_held_out_day` gives the next day for checking the plan. The
trace's rates may be scaled upstream, and it carries no GPU cost, so TPCs per request/s per category
(SERVEGEN_TPCS_PER_RPS) are our assumption, not data.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .profiles import ProfileError, ProfileSet, build_profile_set

# Region UTC offsets (hours) and the share of models serving each.
REGIONS_UTC_OFFSET_H = {"americas": -6.0, "europe": 1.0, "asia_pacific": 8.0}
REGION_WEIGHTS = {"americas": 0.4, "europe": 0.3, "asia_pacific": 0.3}
SLO_CHOICES_MS = (50.0, 100.0, 200.0, 500.0, 1000.0)

SERVEGEN_WINDOW_S = 600
SERVEGEN_WINDOWS_PER_DAY = 144
# Assumed TPCs (H100 TPCs) one request/s keeps busy, per ServeGen category; not from the trace.
SERVEGEN_TPCS_PER_RPS = {"m-small": 0.5, "m-mid": 1.5, "m-large": 4.0, "deepseek-r1": 30.0, "mm-image": 8.0}
SERVEGEN_SLO_MS = {"m-small": 200.0, "m-mid": 500.0, "m-large": 1000.0, "deepseek-r1": 5000.0,
                   "mm-image": 1000.0}


def _circular_bump(hours: np.ndarray, center_h: float, width_h: float) -> np.ndarray:
    distance = (hours - center_h + 12.0) % 24.0 - 12.0
    return np.exp(-0.5 * (distance / width_h) ** 2)


def synthetic_profile_set(model_count: int, seed: int = 0, slots_per_day: int = 96,
                          batch_share: float = 0.08, median_peak_tpcs: float = 5.0) -> ProfileSet:
    """A seeded set of diurnal profiles; the same arguments always give the same set."""
    if model_count < 1:
        raise ProfileError(f"model_count must be >= 1; got {model_count}")
    if not 0.0 <= batch_share <= 1.0:
        raise ProfileError(f"batch_share must be in [0, 1]; got {batch_share}")
    rng = np.random.default_rng(seed)
    hours_utc = (np.arange(slots_per_day) + 0.5) * 24.0 / slots_per_day
    regions = list(REGION_WEIGHTS)
    region_choice = rng.choice(len(regions), size=model_count, p=list(REGION_WEIGHTS.values()))
    models, traffic = {}, {}
    for index in range(model_count):
        peak_tpcs = float(np.clip(rng.lognormal(np.log(median_peak_tpcs), 1.0), 0.2, 250.0))
        if rng.random() < batch_share:
            kind = "batch"
            if rng.random() < 0.5:
                shape = np.ones(slots_per_day)
            else:   # nightly window in UTC
                shape = 0.05 + _circular_bump(hours_utc, rng.uniform(0, 6), rng.uniform(1.5, 3.0))
        else:
            kind = regions[region_choice[index]]
            hours_local = hours_utc + REGIONS_UTC_OFFSET_H[kind] + rng.normal(0, 1.0)
            trough = 1.0 / rng.uniform(2.0, 10.0)
            day = _circular_bump(hours_local, rng.uniform(10, 15), rng.uniform(2, 4))
            evening = _circular_bump(hours_local, rng.uniform(19, 22), rng.uniform(1.5, 3))
            shape = day * rng.uniform(0.3, 1.0) + evening * rng.uniform(0.3, 1.0)
            shape = trough + (1 - trough) * shape / shape.max()
        shape = shape / shape.max()
        tpcs_per_rps = float(rng.lognormal(np.log(0.5), 0.7))
        name = f"{kind}-{index:05d}"
        models[name] = {"tpcs_per_rps": round(tpcs_per_rps, 6),
                        "slo_ms": float(rng.choice(SLO_CHOICES_MS))}
        traffic[name] = [round(float(v), 6) for v in peak_tpcs * shape / tpcs_per_rps]
    return build_profile_set({"slots_per_day": slots_per_day, "models": models, "traffic": traffic,
                              "source": f"synthetic diurnal (seed {seed}, {model_count} models)"})


def noisy_day(profile_set: ProfileSet, rng: np.random.Generator, slot_sigma: float = 0.15,
              day_sigma: float = 0.10) -> np.ndarray:
    """[models, slots] TPC demand of one observed day: the profile times log-normal day and slot noise
    (each with median 1)."""
    demand = profile_set.demand_matrix_tpcs()
    day_factor = rng.lognormal(0.0, day_sigma, size=(demand.shape[0], 1))
    slot_factor = rng.lognormal(0.0, slot_sigma, size=demand.shape)
    return demand * day_factor * slot_factor


def _read_servegen_clients(trace_root: Path) -> list[tuple[str, str, np.ndarray]]:
    """(category model, client name, [days, windows] rates) for every client file under trace_root."""
    files = sorted(trace_root.glob("*/*/chunk-*-trace.csv"))
    if not files:
        raise ProfileError(f"no ServeGen trace files (<category>/<model>/chunk-N-trace.csv) under "
                           f"{str(trace_root)!r}")
    clients = []
    for path in files:
        rows = np.loadtxt(path, delimiter=",", usecols=(0, 1), ndmin=2)
        window = (rows[:, 0] // SERVEGEN_WINDOW_S).astype(int)
        rates = np.zeros(int(np.ceil((window.max() + 1) / SERVEGEN_WINDOWS_PER_DAY)) * SERVEGEN_WINDOWS_PER_DAY)
        rates[window] = rows[:, 1]
        chunk = path.name.removesuffix("-trace.csv")
        clients.append((path.parent.name, f"{path.parent.name}/{chunk}",
                        rates.reshape(-1, SERVEGEN_WINDOWS_PER_DAY)))
    return clients


def _to_slots(day_rates: np.ndarray, slots_per_day: int) -> np.ndarray:
    if SERVEGEN_WINDOWS_PER_DAY % slots_per_day != 0:
        raise ProfileError(f"ServeGen has 144 ten-minute windows a day; slots_per_day must divide 144 "
                           f"(e.g. 24, 48, 72, 144); got {slots_per_day}")
    return day_rates.reshape(*day_rates.shape[:-1], slots_per_day, -1).mean(axis=-1)


def servegen_profile_set(trace_root: str | Path, slots_per_day: int = 48, planning_days: int = 6,
                         min_mean_rps: float = 0.01) -> ProfileSet:
    """Profiles from the first `planning_days` days of every client (per slot, the highest rate seen);
    clients with a lower mean rate than `min_mean_rps` are left out."""
    if planning_days < 1:
        raise ProfileError(f"planning_days must be >= 1; got {planning_days}")
    models, traffic = {}, {}
    for category, client, rates in _read_servegen_clients(Path(trace_root)):
        days = _to_slots(rates[:planning_days], slots_per_day)
        if days.mean() < min_mean_rps:
            continue
        models[client] = {"tpcs_per_rps": SERVEGEN_TPCS_PER_RPS.get(category, 1.0),
                          "slo_ms": SERVEGEN_SLO_MS.get(category, 1000.0)}
        traffic[client] = [round(float(v), 6) for v in days.max(axis=0)]
    source = (f"ServeGen (Alibaba Bailian production traces, github.com/alibaba/ServeGen, Apache-2.0): "
              f"per-slot max over the first {planning_days} day(s); TPCs per request/s assumed per category")
    return build_profile_set({"slots_per_day": slots_per_day, "models": models, "traffic": traffic,
                              "source": source})


def servegen_held_out_day(trace_root: str | Path, profile_set: ProfileSet, day_index: int) -> np.ndarray:
    """[models, slots] TPC demand of day `day_index` for the models of `profile_set` that have that day
    in the trace; NaN rows for clients whose trace is shorter."""
    rows = {name: row for row, name in enumerate(profile_set.model_names)}
    demand = np.full((len(rows), profile_set.slots_per_day), np.nan)
    for _, client, rates in _read_servegen_clients(Path(trace_root)):
        if client in rows and day_index < rates.shape[0]:
            spec = profile_set.models[client]
            day = _to_slots(rates[day_index], profile_set.slots_per_day)
            demand[rows[client]] = np.maximum(day * spec.tpcs_per_rps, spec.min_tpcs)
    return demand
