"""Kernel latency models of the simulated GPU, fitted in code to latencies measured on an H100.

Every number below is either a measurement (with its source) or an assumption (labelled ASSUMPTION).
Measurements are in SMs; models are in TPCs (1 TPC = 2 SMs; the full H100 SXM has 132 SMs = 66 TPCs).
Fits minimise squared relative error: l(t) = m / min(t, s) + b, with m, b by linear least squares
and, for kernels that saturate, s chosen among whole TPC counts by the same criterion.
The models are for H100-speed TPCs; the simulator divides m by `GpuModel.relative_tpc_speed` on other
GPUs (ASSUMPTION: see gpu_models.py; b and s are not rescaled).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .simulated import KernelModel, KernelSequence

H100_FULL_SMS = 132


@dataclass(frozen=True)
class Calibration:
    """One kernel's measured latencies and the model fitted to them."""

    kernel: KernelModel
    points_sms_ms: tuple[tuple[int, float], ...]    # (SMs given to the kernel, measured latency ms)
    source: str

    def relative_errors(self) -> np.ndarray:
        """(model - measured) / measured at each measured point."""
        sms, measured_ms = np.array(self.points_sms_ms, dtype=float).T
        model_ms = np.array([self.kernel.latency_ms(n / 2) for n in sms])
        return (model_ms - measured_ms) / measured_ms


def fit_latency_model(name: str, points_sms_ms, saturates: bool = False) -> KernelModel:
    """Fit l(t) = m / min(t, s) + b to (SMs, ms) points, minimising squared relative error."""
    sms, measured_ms = np.array(points_sms_ms, dtype=float).T
    tpcs = sms / 2
    candidates = np.arange(np.ceil(tpcs.min()), tpcs.max() + 1) if saturates else [np.inf]
    best = None
    for saturation in candidates:
        useful_tpcs = np.minimum(tpcs, saturation)
        # relative error: divide each row of [1/t, 1] and the target by the measured latency
        design = np.column_stack([1 / useful_tpcs, np.ones_like(tpcs)]) / measured_ms[:, None]
        (m, b), *_ = np.linalg.lstsq(design, np.ones_like(tpcs), rcond=None)
        error = float(np.sum((design @ [m, b] - 1) ** 2))
        if best is None or error < best[0] - 1e-15:
            best = (error, m, b, saturation)
    _, m, b, saturation = best
    return KernelModel(name, float(max(m, 0.0)), float(max(b, 0.0)),
                       None if np.isinf(saturation) else float(saturation))


def _calibrate(name: str, points_sms_ms, source: str, saturates: bool = False) -> Calibration:
    return Calibration(fit_latency_model(name, points_sms_ms, saturates), tuple(points_sms_ms), source)


MATMUL_8192_BF16 = _calibrate(
    "matmul_8192_bf16",
    ((8, 19.6), (16, 9.5), (32, 4.8), (64, 2.46), (96, 1.74), (128, 1.48), (H100_FULL_SMS, 1.39)),
    "DESIGN.md 'Facts measured on an H100': torch 8192^3 bf16 matmul on green-context streams of "
    "8..128 SMs and on the whole GPU (132 SMs); H100 80GB HBM3, driver 580.159.04, torch 2.11.",
)

ELEMENTWISE_MUL_1GIB = _calibrate(
    "elementwise_mul_1gib",
    ((8, 2.689), (16, 1.401), (24, 0.973), (32, 0.768), (48, 0.722), (64, 0.715), (96, 0.720),
        (128, 0.722), (H100_FULL_SMS, 0.718)),
    "DESIGN.md says a memory-bound elementwise kernel 'saturated at about 32-64 SMs'; the points are "
    "measured by re-running that probe (right-sizing section of shared/probes/gpu_probe.py: "
    "x.mul_(1.0001) on 2^28 fp32 = 1 GiB read + 1 GiB written, torch.cuda.green_contexts) with 24 and "
    "48 SMs added, median of 5 repeats of 20 launches, on an H100 80GB HBM3, driver 580.159.04, torch "
    "2.11.0+cu130, 2026-11-23; docs/SIMULATOR.md has the script.",
    saturates=True,
)

BERT_BASE_B1 = _calibrate(
    "bert_base_b1_forward",
    ((16, 4.3), (H100_FULL_SMS, 3.7)),
    "DESIGN.md co-location facts: 12-layer BERT-base fp16 (torch TransformerEncoder, 768/12/3072, "
    "sequence 128), batch 1, eager PyTorch: p50 3.7 ms alone on the whole GPU; 4.3 ms on a 16-SM green "
    "partition while an 8192^3 matmul loop ran on the other 112 SMs (ASSUMPTION: taken as its latency "
    "alone on 8 TPCs, i.e. no memory-bandwidth interference). Eager latency is largely Python launch "
    "time, which this model books as GPU time (b); one whole forward pass is one kernel here.",
)

CALIBRATIONS: dict[str, Calibration] = {c.kernel.name: c for c in (MATMUL_8192_BF16, ELEMENTWISE_MUL_1GIB, BERT_BASE_B1)}



def bert_base_b1() -> KernelSequence:
    """One inference request: one BERT-base batch-1 forward pass (3.7 ms on a whole H100)."""
    return KernelSequence("bert_base_b1", (BERT_BASE_B1.kernel,))


def matmul_train_step() -> KernelSequence:
    """One step of the best-effort loop of the co-location probe (shared/probes/colo.py): four 8192^3
    bf16 matmuls, then a synchronize."""
    return KernelSequence("matmul_train_step", (MATMUL_8192_BF16.kernel,) * 4)


def elementwise_mul_1gib() -> KernelSequence:
    """One memory-bound pass over 1 GiB (the elementwise kernel alone)."""
    return KernelSequence("elementwise_mul_1gib", (ELEMENTWISE_MUL_1GIB.kernel,))


WORKLOADS: dict[str, KernelSequence] = {w.name: w for w in (bert_base_b1(), matmul_train_step(), elementwise_mul_1gib())}


def named_workload(name: str) -> KernelSequence:
    """A workload from WORKLOADS by name; raise ValueError naming the known ones."""
    if name not in WORKLOADS:
        raise ValueError(f"unknown workload {name!r}; known workloads: {', '.join(WORKLOADS)}")
    return WORKLOADS[name]
