"""Inventory of this node's GPUs: NVML for the list, cuda-bindings for SM counts.

A missing driver or library means "no GPU" (an empty list), never an exception: the caller decides
what to tell the user.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from .scheduler.gpu_models import GpuModel, lookup_model

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class NodeGpu:
    index: int          # NVML index on this node
    uuid: str           # "GPU-..." (real) or "SIM-..." (simulated); CUDA_VISIBLE_DEVICES takes it
    model: str          # short model name from scheduler/gpu_models.py, or the NVML name if unknown
    sms: int
    simulated: bool

    @property
    def tpcs(self) -> int:
        return self.sms // 2


def _cuda_sm_counts() -> dict[str, int]:
    """CUDA device UUID ("GPU-...") -> multiprocessor count."""
    from cuda.bindings import driver as cu

    def check(result):
        err, *rest = result
        if int(err) != 0:
            raise RuntimeError(f"CUDA driver error {err}")
        return rest[0] if len(rest) == 1 else rest

    check(cu.cuInit(0))
    counts = {}
    for ordinal in range(check(cu.cuDeviceGetCount())):
        dev = check(cu.cuDeviceGet(ordinal))
        raw = bytes(check(cu.cuDeviceGetUuid(dev)).bytes)
        h = raw.hex()
        uuid = f"GPU-{h[0:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"
        attr = cu.CUdevice_attribute.CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT
        counts[uuid] = int(check(cu.cuDeviceGetAttribute(attr, dev)))
    return counts


def detect_gpus() -> list[NodeGpu]:
    try:
        import pynvml
        pynvml.nvmlInit()
    except Exception as exc:  # no driver, no library, no device
        logger.debug("NVML unavailable: %s", exc)
        return []
    try:
        try:
            sm_counts = _cuda_sm_counts()
        except Exception as exc:
            logger.warning("could not read SM counts through CUDA (%s); using the model table", exc)
            sm_counts = {}
        gpus = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            name = pynvml.nvmlDeviceGetName(handle)
            name = name.decode() if isinstance(name, bytes) else name
            uuid = pynvml.nvmlDeviceGetUUID(handle)
            uuid = uuid.decode() if isinstance(uuid, bytes) else uuid
            try:
                model: GpuModel | None = lookup_model(name)
            except ValueError:
                model = None
            sms = sm_counts.get(uuid) or (model.sms if model else 0)
            if not sms:
                logger.warning("skipping GPU %d (%s): unknown SM count", index, name)
                continue
            gpus.append(NodeGpu(index, uuid, model.name if model else name, sms, simulated=False))
        return gpus
    finally:
        pynvml.nvmlShutdown()


def simulated_gpus(models: list[GpuModel], node_tag: str) -> list[NodeGpu]:
    return [NodeGpu(i, f"SIM-{m.name}-{node_tag}-{i}", m.name, m.sms, simulated=True) for i, m in enumerate(models)]
