"""The real-GPU `Device` (NVML telemetry + the native shared-memory allowance table) and the factory
the agent uses to get either it or the simulated GPU."""
from __future__ import annotations

import logging
from collections.abc import Sequence

from .scheduler.allocator import slices_from_cosched_groups
from .scheduler.device import Device, DeviceInfo, Telemetry
from .scheduler.gpu_models import lookup_model

logger = logging.getLogger(__name__)


class NvidiaDevice(Device):
    """One physical GPU. Allowances go to the shared-memory table the interposer reads per launch;
    without a built interposer they are recorded but not enforced (native_status says so)."""

    def __init__(self, index: int, uuid: str, model: str, sms: int):
        from . import native

        self._info = DeviceInfo(index=index, uuid=uuid, model=model, sms=sms, tpcs=sms // 2, simulated=False)
        self._allowances: dict[int, tuple[int, ...]] = {}
        self._table = native.AllowanceTable.create(uuid, tpcs_on_gpu=sms // 2) if native.library_path() else None
        self.shm_path = self._table.path if self._table else ""
        self.allowance_table = self._table   # the agent's lending loop publishes lend lists here
        if self._table:
            try:   # which co-scheduled 8-SM group holds each TPC (where cluster kernels may run)
                native.probe_layout_into(self._table)
            except Exception as exc:
                logger.warning("co-scheduled group probe failed (%s): cluster>2 kernels will run unconfined", exc)
        self._nvml = None
        try:
            import pynvml
            pynvml.nvmlInit()
            self._nvml = pynvml.nvmlDeviceGetHandleByUUID(uuid)
        except Exception as exc:
            logger.warning("NVML telemetry unavailable for %s: %s", uuid, exc)

    def info(self) -> DeviceInfo:
        return self._info

    def set_allowance(self, slot: int, tpc_ids: Sequence[int]) -> None:
        self._allowances[slot] = tuple(tpc_ids)
        if self._table:
            self._table.set_allowance(slot, list(tpc_ids))

    def clear_allowance(self, slot: int) -> None:
        self._allowances.pop(slot, None)
        if self._table:
            self._table.clear(slot)
            self._table.remove_ring(slot)   # launch summaries are per client

    def tpc_state(self):
        if not self._table:
            return None
        import time

        from .scheduler.lending import tpc_state
        allowances = dict(self._allowances)
        words = {slot: self._table.activity(slot) for slot in allowances}
        lend_lists = {slot: self._table.lending(slot)[0] for slot in allowances}
        idle_window_ns = self._table.lending_knobs()["idle_window_ns"]
        return tpc_state(allowances, words, lend_lists, time.monotonic_ns(), idle_window_ns)

    def launch_summary(self, slot: int) -> dict[str, int] | None:
        if not self._table:
            return None
        from .native import LaunchRing, ring_path
        return LaunchRing(ring_path(self._table.path, slot)).summary(tpcs_on_gpu=self._info.tpcs)

    def allowances(self) -> dict[int, tuple[int, ...]]:
        return dict(self._allowances)

    def tpc_slices(self) -> list[tuple[int, ...]]:
        groups = self._table.cosched_groups() if self._table else {}
        if not groups:
            return super().tpc_slices()
        return slices_from_cosched_groups(groups, self._info.tpcs)

    def telemetry(self) -> Telemetry:
        if self._nvml is None:
            return Telemetry(None, None, None, simulated=False)
        import pynvml
        return Telemetry(
            clock_mhz=float(pynvml.nvmlDeviceGetClockInfo(self._nvml, pynvml.NVML_CLOCK_SM)),
            power_w=pynvml.nvmlDeviceGetPowerUsage(self._nvml) / 1000.0,
            energy_j=pynvml.nvmlDeviceGetTotalEnergyConsumption(self._nvml) / 1000.0,
            simulated=False,
        )

    def close(self) -> None:
        if self._table:
            self._table.close(unlink=True)


def make_device(gpu: dict, state_dir: str) -> tuple[Device, str]:
    """gpu: NodeGpu as a dict. Returns the device and a human line on TPC enforcement."""
    if gpu["simulated"]:
        from .scheduler.simulated import SimulatedDevice
        device = SimulatedDevice(lookup_model(gpu["model"]), gpu["index"], gpu["uuid"])
        return device, "simulated GPU: grants are exact, kernels run in the simulator"
    from . import native
    device = NvidiaDevice(gpu["index"], gpu["uuid"], gpu["model"], gpu["sms"])
    status = native.build_status()
    if device.shm_path:
        return device, f"enforcing through liblithos ({status}); allowance table {device.shm_path}"
    return device, f"NOT enforcing TPC limits: {status}"
