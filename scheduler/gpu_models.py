"""GPU models lithos knows: SM and TPC counts, and how fast one TPC is relative to an H100 TPC.

TPC = Texture Processing Cluster = 2 SMs on every NVIDIA GPU since Volta. `tpcs` is what the
`lithos_tpc` Ray resource counts. `relative_tpc_speed` scales the H100-calibrated latency model of
the simulated GPU to other models; it is the ratio of dense bf16/fp16 tensor peak per TPC from the
vendor datasheets (an estimate, not a measurement), used only by the simulator.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GpuModel:
    name: str            # short name used in --simulate and labels, e.g. "H100"
    sms: int
    memory_gib: int
    relative_tpc_speed: float
    aliases: tuple[str, ...] = ()

    @property
    def tpcs(self) -> int:
        return self.sms // 2


GPU_MODELS: dict[str, GpuModel] = {
    m.name: m
    for m in (
        # H100 SXM5: 132 SMs (measured on the H100 80GB HBM3 we test on), 989 TFLOP/s bf16 dense.
        GpuModel("H100", 132, 80, 1.0, ("H100 80GB HBM3", "H100 SXM", "NVIDIA H100 80GB HBM3")),
        GpuModel("H100-PCIE", 114, 80, 0.87, ("H100 PCIe", "NVIDIA H100 PCIe")),
        GpuModel("H200", 132, 141, 1.0, ("NVIDIA H200",)),
        # A100 SXM4: 108 SMs, 312 TFLOP/s bf16 dense -> (312/54)/(989/66) per TPC.
        GpuModel("A100", 108, 80, 0.39, ("A100-SXM4-80GB", "A100-SXM4-40GB", "NVIDIA A100-SXM4-80GB")),
        GpuModel("L4", 58, 24, 0.28, ("NVIDIA L4",)),
    )
}


def lookup_model(name: str) -> GpuModel:
    """Find a model by short name or NVML product name; raise ValueError naming what is allowed."""
    wanted = name.strip().upper()
    for model in GPU_MODELS.values():
        if wanted == model.name.upper() or wanted in (a.upper() for a in model.aliases):
            return model
    for model in GPU_MODELS.values():   # NVML names like "NVIDIA H100 80GB HBM3" not listed above
        if model.name.upper() in wanted.replace("NVIDIA ", "").split()[0:1]:
            return model
    raise ValueError(f"unknown GPU model {name!r}; known models: {', '.join(GPU_MODELS)}")
