"""The `Device` interface the per-GPU agent talks to: one GPU, its TPC allowances and its telemetry.

Two implementations: the real GPU (in lithos_ray/: NVML plus the shared-memory allowance table the
native interposer reads on every launch) and the simulated GPU (`scheduler/simulated.py`).

An allowance is the set of TPC ids (0 .. tpcs-1; on the real GPU, id i is the i-th 2-SM group of
cuDevSmResourceSplitByCount with flag 1) on which the client in one slot may launch kernels. Allowances of
different slots may overlap; whether they do is the scheduler's decision, not the device's.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class DeviceInfo:
    """What one GPU is. `tpcs` is what the `lithos_tpc` Ray resource counts on it."""

    index: int          # device index on its node (NVML index)
    uuid: str           # NVML UUID, or "SIM-<model>-<node short id>-<index>" for a simulated GPU
    model: str          # short model name from gpu_models.GPU_MODELS, e.g. "H100"
    sms: int
    tpcs: int
    simulated: bool


@dataclass(frozen=True)
class Telemetry:
    """One reading. A field is None when the device cannot report it (no NVML, no model)."""

    clock_mhz: float | None     # graphics (SM) clock
    power_w: float | None       # instantaneous board power
    energy_j: float | None      # energy counter since an arbitrary origin; differences are meaningful
    simulated: bool             # True: values come from a model, not from a sensor


class Device(ABC):
    """One GPU as the per-GPU agent sees it. Implementations hold no policy."""

    @abstractmethod
    def info(self) -> DeviceInfo:
        """Return the identity and size of this GPU."""

    @abstractmethod
    def set_allowance(self, slot: int, tpc_ids: Sequence[int]) -> None:
        """Allow the client in `slot` to run on exactly `tpc_ids` from its next kernel launch on.

        Replaces the slot's previous allowance. Raises ValueError for a negative slot, an empty
        set, a duplicated id or an id outside 0 .. tpcs-1.
        """

    @abstractmethod
    def clear_allowance(self, slot: int) -> None:
        """Remove the allowance of `slot` (its client leaves). Clearing an empty slot is a no-op."""

    @abstractmethod
    def allowances(self) -> dict[int, tuple[int, ...]]:
        """Return a copy of the current allowances: slot -> TPC ids."""

    @abstractmethod
    def telemetry(self) -> Telemetry:
        """Return the current clock, power and energy; fields the device cannot report are None."""

    def tpc_slices(self) -> list[tuple[int, ...]]:
        """Groups of TPC ids that should be granted together (whole GPC slices). Default: 4 consecutive
        ids; the real H100 overrides it with its co-scheduled 8-SM groups."""
        from .allocator import contiguous_slices
        return contiguous_slices(self.info().tpcs)

    def tpc_state(self):
        """scheduler.lending.TpcState now (busy and lent TPCs, and to whom each lent TPC is offered);
        None where the device cannot tell (simulated GPUs: the simulator does not run behind grants)."""
        return None

    def launch_summary(self, slot: int) -> dict[str, int] | None:
        """The slot's client's latest launches by view and how many borrowed (lithos_ray.native.
        summarize_launches); None where launches are not recorded (simulated GPUs, no interposer)."""
        return None

    @abstractmethod
    def close(self) -> None:
        """Release what the device holds (NVML handle, shared memory). Safe to call twice."""
