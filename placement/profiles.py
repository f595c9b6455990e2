"""Traffic profiles: per model, request rate over one day in fixed slots, plus what serving it costs.

A profile set has two parts:
- `models`: per model, `tpcs_per_rps` (TPCs kept busy by one request/s: from the right-sizer once it
  exists, given by the user until then), `slo_ms`, and optionally `memory_gib` and `min_tpcs`;
- `traffic`: per model, `slots_per_day` request rates in requests/s (slot 0 starts at 00:00 of one
  clock shared by the whole set; UTC unless the set says otherwise in `source`).

TPC demand of a model in a slot = max(min_tpcs, rate_rps * tpcs_per_rps). Files are JSON (both parts)
or CSV (traffic only, long form `model,slot,rate_rps`, with the models part from a JSON file).
Every user mistake raises ProfileError with what was wrong and what is allowed.
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

MINUTES_PER_DAY = 1440


class ProfileError(ValueError):
    """A profile file or profile set the planner cannot use; the message says what is allowed."""


class ModelSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tpcs_per_rps: float = Field(gt=0, allow_inf_nan=False,
                                description="TPCs kept busy by one request per second")
    slo_ms: float = Field(gt=0, allow_inf_nan=False, description="latency objective, carried into the plan")
    memory_gib: float = Field(default=0.0, ge=0, allow_inf_nan=False,
                              description="GPU memory one replica holds; 0 = not checked")
    min_tpcs: float = Field(default=0.0, ge=0, allow_inf_nan=False,
                            description="TPC demand floor in every slot (a loaded replica's minimum)")


class ProfileSet(BaseModel):
    model_config = ConfigDict(extra="forbid")

    slots_per_day: int
    models: dict[str, ModelSpec]
    traffic: dict[str, list[float]]
    source: str = ""

    @field_validator("slots_per_day")
    @classmethod
    def _slots_divide_day(cls, slots_per_day: int) -> int:
        message = slots_per_day_problem(slots_per_day)
        if message:
            raise ValueError(message)
        return slots_per_day

    @model_validator(mode="after")
    def _traffic_matches_models(self) -> "ProfileSet":
        if not self.models:
            raise ValueError("the profile set defines no models")
        unknown = sorted(set(self.traffic) - set(self.models))
        if unknown:
            raise ValueError(f"traffic for unknown model(s) {', '.join(map(repr, unknown))}; "
                             f"models defined: {_short_list(self.models)}")
        missing = sorted(set(self.models) - set(self.traffic))
        if missing:
            raise ValueError(f"model(s) {', '.join(map(repr, missing))} have no traffic profile")
        for name, rates in self.traffic.items():
            if len(rates) != self.slots_per_day:
                raise ValueError(f"model {name!r} has {len(rates)} slots; slots_per_day is "
                                 f"{self.slots_per_day}, so every profile needs exactly that many")
            for slot, rate in enumerate(rates):
                if not math.isfinite(rate) or rate < 0:
                    raise ValueError(f"model {name!r} slot {slot}: rate_rps must be a finite number "
                                     f">= 0; got {rate}")
        return self

    @property
    def model_names(self) -> list[str]:
        return list(self.models)

    def rate_matrix_rps(self) -> np.ndarray:
        """[models, slots] request rates, rows in `model_names` order."""
        return np.array([self.traffic[name] for name in self.models], dtype=float).reshape(
            len(self.models), self.slots_per_day)

    def demand_matrix_tpcs(self) -> np.ndarray:
        """[models, slots] TPC demand = max(min_tpcs, rate * tpcs_per_rps)."""
        rates = self.rate_matrix_rps()
        specs = list(self.models.values())
        per_rps = np.array([s.tpcs_per_rps for s in specs])[:, None]
        floor = np.array([s.min_tpcs for s in specs])[:, None]
        return np.maximum(rates * per_rps, floor)


def slots_per_day_problem(slots_per_day) -> str:
    """Empty when slots_per_day is usable, else the message saying what is allowed."""
    if isinstance(slots_per_day, int) and slots_per_day >= 1 and MINUTES_PER_DAY % slots_per_day == 0:
        return ""
    return f"slots_per_day must split a day into whole minutes (e.g. 24, 48, 96, 144); got {slots_per_day!r}"


def _short_list(names, limit: int = 8) -> str:
    names = list(names)
    shown = ", ".join(map(repr, names[:limit]))
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _readable(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        where = ".".join(str(part) for part in item["loc"])
        message = item["msg"].removeprefix("Value error, ")
        lines.append(f"{where}: {message}" if where else message)
    return "; ".join(lines)


def build_profile_set(data: dict) -> ProfileSet:
    """Validate plain data (the JSON layout) into a ProfileSet; raise ProfileError on any mistake."""
    if not isinstance(data, dict):
        raise ProfileError("a profile set is a JSON object with keys slots_per_day, models, traffic")
    try:
        return ProfileSet.model_validate(data)
    except ValidationError as error:
        raise ProfileError(f"invalid profile set: {_readable(error)}") from None


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ProfileError(f"profile file {str(path)!r} does not exist") from None
    except json.JSONDecodeError as error:
        raise ProfileError(f"{path}: not valid JSON ({error})") from None


def read_traffic_csv(path: Path, slots_per_day: int) -> dict[str, list[float]]:
    """Long-form CSV with header `model,slot,rate_rps`; every (model, slot) exactly once."""
    rates_by_model: dict[str, dict[int, float]] = {}
    try:
        handle = path.open(newline="")
    except FileNotFoundError:
        raise ProfileError(f"traffic file {str(path)!r} does not exist") from None
    with handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None or [f.strip() for f in reader.fieldnames] != ["model", "slot", "rate_rps"]:
            raise ProfileError(f"{path}: the header must be exactly model,slot,rate_rps; "
                               f"got {reader.fieldnames}")
        for line_number, row in enumerate(reader, start=2):
            try:
                slot = int(row["slot"])
                rate = float(row["rate_rps"])
            except (TypeError, ValueError):
                raise ProfileError(f"{path}:{line_number}: slot must be an integer and rate_rps a "
                                   f"number; got {row}") from None
            if not 0 <= slot < slots_per_day:
                raise ProfileError(f"{path}:{line_number}: slot {slot} is outside 0..{slots_per_day - 1}")
            slots = rates_by_model.setdefault(row["model"].strip(), {})
            if slot in slots:
                raise ProfileError(f"{path}:{line_number}: model {row['model']!r} slot {slot} appears twice")
            slots[slot] = rate
    traffic = {}
    for model, slots in rates_by_model.items():
        missing = sorted(set(range(slots_per_day)) - set(slots))
        if missing:
            raise ProfileError(f"{path}: model {model!r} has {len(slots)} slots; slots_per_day is "
                               f"{slots_per_day}, missing slot(s) {missing[:10]}")
        traffic[model] = [slots[s] for s in range(slots_per_day)]
    return traffic


def load_profile_set(profiles_path: str | Path, models_path: str | Path | None = None) -> ProfileSet:
    """Load a JSON profile set, or a CSV traffic file plus a JSON file with slots_per_day and models."""
    profiles_path = Path(profiles_path)
    if profiles_path.suffix.lower() == ".csv":
        if models_path is None:
            raise ProfileError("a CSV traffic file needs --models FILE (JSON with slots_per_day and models)")
        catalog = _read_json(Path(models_path))
        slots_per_day = catalog.get("slots_per_day") if isinstance(catalog, dict) else None
        if slots_per_day_problem(slots_per_day):
            raise ProfileError(f"{models_path}: {slots_per_day_problem(slots_per_day)}")
        data = {**catalog, "traffic": read_traffic_csv(profiles_path, slots_per_day)}
        data.setdefault("source", str(profiles_path))
        return build_profile_set(data)
    if profiles_path.suffix.lower() != ".json":
        raise ProfileError(f"profile files are .json or .csv; got {profiles_path.name!r}")
    data = _read_json(profiles_path)
    if models_path is not None and isinstance(data, dict):
        catalog = _read_json(Path(models_path))
        data = {**data, "models": catalog.get("models", {}) if isinstance(catalog, dict) else {}}
    return build_profile_set(data)


def save_profile_set(profile_set: ProfileSet, path: str | Path) -> None:
    Path(path).write_text(profile_set.model_dump_json(indent=1))
