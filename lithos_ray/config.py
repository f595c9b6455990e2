"""Validated user-facing settings (pydantic). Every knob here is documented in docs/CONFIG.md."""
from __future__ import annotations

import math
import os
import re
from enum import Enum

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import LithosRequestError
from .scheduler.gpu_models import GpuModel, lookup_model

RESOURCE_NAME = "lithos_tpc"
NAMESPACE = "lithos"
LABEL_GPU_MODEL = "lithos.io/gpu-model"
LABEL_SIMULATED = "lithos.io/simulated"

# Environment variables read by lithos in Ray worker processes (set them through runtime_env).
ENV_PRIORITY = "LITHOS_PRIORITY"
ENV_SLO_MS = "LITHOS_SLO_MS"
ENV_GPU_INDEX = "LITHOS_GPU_INDEX"
ENV_ACQUIRE_TIMEOUT_S = "LITHOS_ACQUIRE_TIMEOUT_S"
DEFAULT_ACQUIRE_TIMEOUT_S = 120.0


class Priority(str, Enum):
    LATENCY_CRITICAL = "latency_critical"
    BEST_EFFORT = "best_effort"


class ClientRequest(BaseModel):
    """What a lithos client asks its node's agents for."""

    model_config = ConfigDict(frozen=True)
    tpcs: int = Field(ge=1, description="TPCs on one GPU (1 TPC = 2 SMs)")
    priority: Priority = Priority.BEST_EFFORT
    slo_ms: float | None = Field(default=None, gt=0, description="latency objective of one request")
    gpu_index: int | None = Field(default=None, ge=0, description="only this GPU of the node")
    acquire_timeout_s: float = Field(default=DEFAULT_ACQUIRE_TIMEOUT_S, gt=0)

    @field_validator("priority", mode="before")
    @classmethod
    def _priority(cls, value):
        allowed = [p.value for p in Priority]
        if isinstance(value, str) and value.lower() not in allowed:
            raise ValueError(f"priority must be one of {allowed}, got {value!r}")
        return value.lower() if isinstance(value, str) else value


def whole_tpcs(value: float, what: str = RESOURCE_NAME) -> int:
    """Ray allows fractional custom resources; a TPC grant must be a whole number of TPCs."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise LithosRequestError(f"{what} must be a whole number of TPCs, got {value!r}")
    if value <= 0:
        raise LithosRequestError(f"{what} must be at least 1 TPC, got {value:g}")
    if abs(value - round(value)) > 1e-9:
        raise LithosRequestError(
            f"{what}={value:g} is fractional; lithos grants whole TPCs (1 TPC = 2 SMs), e.g. {max(1, round(value))}"
        )
    return int(round(value))


def make_request(**fields) -> ClientRequest:
    """Build a ClientRequest, turning pydantic's errors into one readable LithosRequestError."""
    try:
        return ClientRequest(**fields)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'request'}: {e['msg']}" for e in exc.errors())
        raise LithosRequestError(f"invalid lithos request: {problems}") from None


def request_from_env(tpcs: float, environ=os.environ) -> ClientRequest:
    """The request of a Ray worker: TPCs from Ray's assigned resources, the rest from LITHOS_* env vars.
    Without LITHOS_PRIORITY a worker with LITHOS_SLO_MS is latency-critical (e.g. a placed Serve
    replica), else best-effort."""
    fields: dict = {"tpcs": whole_tpcs(tpcs)}
    if environ.get(ENV_PRIORITY) or environ.get(ENV_SLO_MS):
        fields["priority"] = environ.get(ENV_PRIORITY) or Priority.LATENCY_CRITICAL.value
    for env, key, cast in ((ENV_SLO_MS, "slo_ms", float), (ENV_GPU_INDEX, "gpu_index", int),
                           (ENV_ACQUIRE_TIMEOUT_S, "acquire_timeout_s", float)):
        if environ.get(env):
            try:
                fields[key] = cast(environ[env])
            except ValueError:
                raise LithosRequestError(f"{env}={environ[env]!r} is not a valid {cast.__name__}") from None
    return make_request(**fields)


_SIMULATE_RE = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9\-]*)\s*:\s*(\d+)\s*$")


def parse_simulate_spec(spec: str) -> list[GpuModel]:
    """'H100:2' -> two simulated H100s. Several models: 'H100:1,A100:2'."""
    models: list[GpuModel] = []
    for part in spec.split(","):
        match = _SIMULATE_RE.match(part)
        if not match:
            raise LithosRequestError(
                f"--simulate {spec!r} does not parse; expected MODEL:COUNT[,MODEL:COUNT], e.g. H100:2"
            )
        try:
            model = lookup_model(match.group(1))
        except ValueError as exc:
            raise LithosRequestError(str(exc)) from None
        count = int(match.group(2))
        if not 1 <= count <= 16:
            raise LithosRequestError(f"--simulate count must be 1..16 GPUs, got {count} in {part!r}")
        models += [model] * count
    return models
