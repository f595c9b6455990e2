"""Clock, power and energy of real GPUs, read with NVML on the GPU's own node.

The agents' gRPC Status carries no telemetry yet, so the dashboard runs one tiny reader actor per
node with real GPUs (num_cpus=0, pinned to the node, owned by the dashboard actor). Simulated GPUs
have no sensor: they get no reading, and the page and the metrics show none.
"""
from __future__ import annotations

from ..scheduler.device import Telemetry


def read_nvml_telemetry(uuids: list[str]) -> dict[str, Telemetry]:
    """uuid -> reading for the GPUs of this machine; a field NVML cannot give is None."""
    import pynvml

    pynvml.nvmlInit()
    readings = {}
    for uuid in uuids:
        handle = pynvml.nvmlDeviceGetHandleByUUID(uuid)
        values = []
        for read in (lambda: float(pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM)),
                     lambda: pynvml.nvmlDeviceGetPowerUsage(handle) / 1000.0,
                     lambda: pynvml.nvmlDeviceGetTotalEnergyConsumption(handle) / 1000.0):
            try:
                values.append(read())
            except pynvml.NVMLError:
                values.append(None)
        readings[uuid] = Telemetry(*values, simulated=False)
    return readings


class TelemetryReader:
    """Ray actor body: NVML readings of this node's GPUs."""

    def read(self, uuids: list[str]) -> dict[str, Telemetry]:
        return read_nvml_telemetry(uuids)


def reader_for_node(readers: dict, node_id: str):
    """The reader actor of `node_id` (created on first use and kept in `readers`)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if node_id not in readers:
        readers[node_id] = ray.remote(TelemetryReader).options(
            num_cpus=0, scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False)).remote()
    return readers[node_id]
