"""The simulated GPU: a `Device` without hardware, and a discrete-event engine of TPCs running kernels.

Everything here is a model; numbers it produces are "simulated" and must be labelled so.

Kernel model (LithOS right-sizer): a kernel given t TPCs takes l(t) = m / min(t, s) + b ms, where m is
its parallel work in H100-TPC-milliseconds, b its fixed part and s an optional saturation point beyond
which more TPCs do not help (memory-bound kernels). On another GPU model m is divided by
`GpuModel.relative_tpc_speed`. Fitted values for measured kernels live in `calibration.py`.

Sharing model: each client runs one kernel at a time, in order (one stream). A TPC's throughput is
divided equally among the kernels running on it (processor sharing), so a kernel whose TPCs are
each shared by n_j kernels progresses as if it had t_eff = sum_j 1/n_j TPCs: its completed fraction
grows at rate 1 / l(t_eff). Disjoint TPC sets therefore run independently.

Engine: clients whose TPC sets touch no other client's are FIFO single servers with a constant
service time, solved in closed form with numpy (Lindley recursion). Only groups of clients whose
TPC sets overlap go through the event loop.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Sequence, Union

import numpy as np

from .device import Device, DeviceInfo, Telemetry
from .gpu_models import GpuModel

# One client may not produce more requests/steps than this in one run (memory: 8 bytes each, twice).
MAX_EVENTS_PER_CLIENT = 50_000_000
# A kernel counts as finished when less than this fraction of it is left (float round-off in the loop).
_FINISHED_FRACTION = 1e-12


@dataclass(frozen=True)
class KernelModel:
    """One kernel: l(t) = m_tpc_ms / min(t, saturation_tpcs) + b_ms on t H100-speed TPCs."""

    name: str
    m_tpc_ms: float                         # parallel work, H100-TPC-milliseconds
    b_ms: float                             # fixed time that more TPCs do not shorten
    saturation_tpcs: float | None = None    # None: every extra TPC helps

    def __post_init__(self) -> None:
        if not (math.isfinite(self.m_tpc_ms) and self.m_tpc_ms >= 0):
            raise ValueError(f"kernel {self.name!r}: m_tpc_ms must be a finite number >= 0, got {self.m_tpc_ms}")
        if not (math.isfinite(self.b_ms) and self.b_ms >= 0):
            raise ValueError(f"kernel {self.name!r}: b_ms must be a finite number >= 0, got {self.b_ms}")
        if self.m_tpc_ms + self.b_ms <= 0:
            raise ValueError(f"kernel {self.name!r}: m_tpc_ms + b_ms must be > 0 (a kernel takes time)")
        if self.saturation_tpcs is not None and not (math.isfinite(self.saturation_tpcs) and self.saturation_tpcs > 0):
            raise ValueError(f"kernel {self.name!r}: saturation_tpcs must be None or > 0, got {self.saturation_tpcs}")

    def latency_ms(self, tpcs: float, relative_tpc_speed: float = 1.0) -> float:
        """Predicted latency on `tpcs` TPCs (may be fractional under sharing) of a GPU this fast per TPC."""
        if not tpcs > 0:
            raise ValueError(f"kernel {self.name!r}: tpcs must be > 0, got {tpcs}")
        useful_tpcs = tpcs if self.saturation_tpcs is None else min(tpcs, self.saturation_tpcs)
        return self.m_tpc_ms / (relative_tpc_speed * useful_tpcs) + self.b_ms


@dataclass(frozen=True)
class KernelSequence:
    """Kernels run back to back on one stream: one inference request or one training step."""

    name: str
    kernels: tuple[KernelModel, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "kernels", tuple(self.kernels))
        if not self.kernels:
            raise ValueError(f"kernel sequence {self.name!r} is empty; give at least one KernelModel")
        for kernel in self.kernels:
            if not isinstance(kernel, KernelModel):
                raise ValueError(f"kernel sequence {self.name!r}: {kernel!r} is not a KernelModel")

    def latency_ms(self, tpcs: float, relative_tpc_speed: float = 1.0) -> float:
        """Predicted latency of the whole sequence alone on `tpcs` TPCs."""
        return sum(kernel.latency_ms(tpcs, relative_tpc_speed) for kernel in self.kernels)


def _as_sequence(work: KernelSequence | KernelModel, what: str) -> KernelSequence:
    if isinstance(work, KernelModel):
        return KernelSequence(work.name, (work,))
    if isinstance(work, KernelSequence):
        return work
    raise ValueError(f"{what} must be a KernelSequence or a KernelModel, got {type(work).__name__}")


@dataclass(frozen=True)
class OpenLoop:
    """Requests arriving as a Poisson process at `rate_per_s`, served in arrival order (inference)."""

    request: KernelSequence | KernelModel
    rate_per_s: float

    def __post_init__(self) -> None:
        object.__setattr__(self, "request", _as_sequence(self.request, "OpenLoop.request"))
        if not (math.isfinite(self.rate_per_s) and self.rate_per_s > 0):
            raise ValueError(f"OpenLoop.rate_per_s must be a finite number > 0, got {self.rate_per_s}")


@dataclass(frozen=True)
class ClosedLoop:
    """Steps issued back to back from time 0, each as soon as the previous one ends (training)."""

    step: KernelSequence | KernelModel

    def __post_init__(self) -> None:
        object.__setattr__(self, "step", _as_sequence(self.step, "ClosedLoop.step"))


Workload = Union[OpenLoop, ClosedLoop]


@dataclass(frozen=True)
class ClientResult:
    """What one client got during a simulated run (all simulated)."""

    name: str
    tpcs: int                   # size of its TPC set
    latencies_ms: np.ndarray    # per completed request/step: completion - arrival (step: its duration)
    arrived: int                # requests arrived (open loop) or steps started (closed loop)
    completed: int              # requests/steps finished within the run
    throughput_per_s: float     # completed / duration
    busy_s: float               # time during which the client had a kernel running
    tpc_busy_s: float           # busy_s * tpcs: TPC-seconds its kernels occupied (shared TPCs included)


@dataclass(frozen=True)
class SimulationResult:
    """Outcome of `SimulatedGpu.run` (all simulated)."""

    gpu_model: str
    duration_s: float
    seed: int
    clients: dict[str, ClientResult]
    tpc_busy_s: float           # integral over time of the number of TPCs running at least one kernel
    tpc_utilization: float      # tpc_busy_s / (GPU TPCs * duration_s)


@dataclass(frozen=True)
class _Client:
    name: str
    tpc_ids: tuple[int, ...]
    workload: Workload

    @property
    def closed_loop(self) -> bool:
        return isinstance(self.workload, ClosedLoop)

    @property
    def sequence(self) -> KernelSequence:
        return self.workload.step if isinstance(self.workload, ClosedLoop) else self.workload.request


@dataclass
class _Outcome:
    latencies_ms: np.ndarray
    arrived: int
    busy_ms: float


def _validate_tpc_ids(tpc_ids: Sequence[int], total_tpcs: int, who: str) -> tuple[int, ...]:
    if isinstance(tpc_ids, (str, bytes)) or not hasattr(tpc_ids, "__iter__"):
        raise ValueError(f"{who}: tpc_ids must be a sequence of integers, got {tpc_ids!r}")
    ids = tuple(tpc_ids)
    if any(isinstance(i, bool) or not isinstance(i, (int, np.integer)) for i in ids):
        raise ValueError(f"{who}: tpc_ids must be integers, got {ids!r}")
    ids = tuple(int(i) for i in ids)
    if not ids:
        raise ValueError(f"{who}: tpc_ids is empty; give at least one TPC id in 0..{total_tpcs - 1}")
    bad = [i for i in ids if not 0 <= i < total_tpcs]
    if bad:
        raise ValueError(f"{who}: TPC ids {bad} out of range; this GPU has TPC ids 0..{total_tpcs - 1}")
    if len(set(ids)) != len(ids):
        raise ValueError(f"{who}: tpc_ids contains duplicates: {sorted(ids)}")
    return ids


def poisson_arrivals_ms(rate_per_s: float, duration_ms: float, rng: np.random.Generator) -> np.ndarray:
    """Arrival times (ms, sorted, all < duration_ms) of a Poisson process."""
    mean_gap_ms = 1000.0 / rate_per_s
    expected = duration_ms / mean_gap_ms
    if expected > MAX_EVENTS_PER_CLIENT:
        raise ValueError(f"{expected:.3g} requests expected for one client; at most {MAX_EVENTS_PER_CLIENT} "
                         "per run are allowed: shorten duration_s or lower rate_per_s")
    chunks = []
    last_ms = 0.0
    batch = int(expected + 10 * math.sqrt(expected) + 16)
    while last_ms < duration_ms:
        times = last_ms + np.cumsum(rng.exponential(mean_gap_ms, size=batch))
        chunks.append(times)
        last_ms = float(times[-1])
    arrivals = np.concatenate(chunks)
    return arrivals[arrivals < duration_ms]


def check_run_arguments(duration_s: float, seed: int, clients: int) -> None:
    """Validate the arguments of a simulator's run(); shared by SimulatedGpu and sim_lending.LendingGpu."""
    if not (isinstance(duration_s, (int, float)) and math.isfinite(duration_s) and duration_s > 0):
        raise ValueError(f"duration_s must be a finite number > 0, got {duration_s!r}")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    if not clients:
        raise ValueError("no clients: call add_client before run")


def check_new_client(name: str, existing_names: Sequence[str], workload: Workload) -> None:
    """Validate the name and workload of a client about to be added to a simulator."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"client name must be a non-empty string, got {name!r}")
    if name in existing_names:
        raise ValueError(f"client {name!r} already added; names must be unique")
    if not isinstance(workload, (OpenLoop, ClosedLoop)):
        raise ValueError(f"client {name!r}: workload must be OpenLoop or ClosedLoop, got {type(workload).__name__}")


def client_arrivals_ms(name: str, workload: Workload, seed: int, duration_ms: float) -> np.ndarray | None:
    """A client's request arrivals (None for a closed loop), from its own stream seeded by (seed, name)."""
    if isinstance(workload, ClosedLoop):
        return None
    rng = np.random.default_rng([int(seed), zlib.crc32(name.encode())])
    return poisson_arrivals_ms(workload.rate_per_s, duration_ms, rng)


def lindley_departures_ms(arrivals_ms: np.ndarray, service_ms: np.ndarray) -> np.ndarray:
    """Departure times of a FIFO single server: D_i = max(A_i, D_{i-1}) + S_i, vectorised.

    With C = cumsum(S), D_i = C_i + max_{j<=i}(A_j - C_{j-1}).
    """
    completion_sum = np.cumsum(service_ms)
    return completion_sum + np.maximum.accumulate(arrivals_ms - (completion_sum - service_ms))


def _busy_ms(departures_ms: np.ndarray, service_ms: np.ndarray, duration_ms: float) -> float:
    starts = departures_ms - service_ms
    return float(np.clip(np.minimum(departures_ms, duration_ms) - starts, 0.0, None).sum())


def _run_alone(client: _Client, arrivals_ms: np.ndarray | None, speed: float, duration_ms: float) -> _Outcome:
    """A client alone on its TPCs: constant service time, closed form."""
    service_ms = client.sequence.latency_ms(len(client.tpc_ids), speed)
    if arrivals_ms is None:     # closed loop: steps back to back from 0
        started = math.ceil(duration_ms / service_ms)
        if started > MAX_EVENTS_PER_CLIENT:
            raise ValueError(f"client {client.name!r}: {started} steps in this run; at most {MAX_EVENTS_PER_CLIENT} "
                             "are allowed: shorten duration_s")
        departures = service_ms * np.arange(1, started + 1)
        completed = int(np.count_nonzero(departures <= duration_ms))
        return _Outcome(np.full(completed, service_ms), started, duration_ms)
    services = np.full(arrivals_ms.size, service_ms)
    departures = lindley_departures_ms(arrivals_ms, services)
    done = departures <= duration_ms
    return _Outcome((departures - arrivals_ms)[done], int(arrivals_ms.size),
                    _busy_ms(departures, services, duration_ms))


def _merge_repeats(kernels: Sequence[KernelModel]) -> list[tuple[float, float, float]]:
    """Kernels as (m, b, saturation) with consecutive identical kernels merged into one.

    Exact under sharing: n identical kernels finish when the integral of 1/l(t_eff) reaches n, and so
    does one kernel of latency n*l(t).
    """
    merged: list[list] = []     # [m, b, saturation, the kernel repeated]
    for kernel in kernels:
        if merged and merged[-1][3] == kernel:
            merged[-1][0] += kernel.m_tpc_ms
            merged[-1][1] += kernel.b_ms
        else:
            saturation = math.inf if kernel.saturation_tpcs is None else kernel.saturation_tpcs
            merged.append([kernel.m_tpc_ms, kernel.b_ms, saturation, kernel])
    return [(m, b, s) for m, b, s, _ in merged]


def _run_shared(clients: list[_Client], arrivals: list[np.ndarray | None], speed: float,
                total_tpcs: int, duration_ms: float) -> tuple[list[_Outcome], float]:
    """Event loop for clients whose TPC sets overlap. Returns outcomes and the TPC-busy integral (TPC-ms).

    Events are kernel completions and request starts of idle clients; between events the set of
    running clients, hence every t_eff, is constant.
    """
    count = len(clients)
    membership = np.zeros((count, total_tpcs), dtype=bool)
    for c, client in enumerate(clients):
        membership[c, list(client.tpc_ids)] = True
    kernels = [[(m / speed, b, s) for m, b, s in _merge_repeats(client.sequence.kernels)] for client in clients]
    closed = [client.closed_loop for client in clients]
    arrival_lists = [a.tolist() if a is not None else [] for a in arrivals]

    # Per set of running clients (bitmask): kernel latencies per running client, and TPCs in use.
    cache: dict[int, tuple[list[list[float] | None], int]] = {}

    def latencies_for(mask: int) -> tuple[list[list[float] | None], int]:
        running = [c for c in range(count) if mask >> c & 1]
        kernels_on_tpc = membership[running].sum(axis=0)
        share = np.where(kernels_on_tpc > 0, 1.0 / np.maximum(kernels_on_tpc, 1), 0.0)
        per_client: list[list[float] | None] = [None] * count
        for c in running:
            t_eff = float(share[membership[c]].sum())
            per_client[c] = [m / min(t_eff, s) + b for m, b, s in kernels[c]]
        return per_client, int(np.count_nonzero(kernels_on_tpc))

    now = 0.0
    running = [False] * count
    kernel_index = [0] * count
    remaining = [0.0] * count           # fraction of the current kernel left
    request_arrival = [0.0] * count
    next_arrival = [0] * count          # index into arrival_lists of the next request not yet started
    latencies: list[list[float]] = [[] for _ in range(count)]
    started = [0] * count
    busy_ms = [0.0] * count
    tpc_busy_ms = 0.0
    mask = 0

    def start(c: int, arrival_ms: float) -> None:
        nonlocal mask
        running[c] = True
        kernel_index[c] = 0
        remaining[c] = 1.0
        request_arrival[c] = arrival_ms
        started[c] += 1
        mask |= 1 << c
        if started[c] > MAX_EVENTS_PER_CLIENT:
            raise ValueError(f"client {clients[c].name!r}: more than {MAX_EVENTS_PER_CLIENT} requests/steps in "
                             "this run; shorten duration_s")

    for c in range(count):
        if closed[c]:
            start(c, 0.0)

    while True:
        entry = cache.get(mask)
        if entry is None:
            entry = cache[mask] = latencies_for(mask)
        per_client, tpcs_in_use = entry
        finish_ms, finisher = math.inf, -1
        for c in range(count):
            if running[c]:
                t = now + remaining[c] * per_client[c][kernel_index[c]]
                if t < finish_ms:
                    finish_ms, finisher = t, c
        start_ms, starter = math.inf, -1
        for c in range(count):
            if not running[c] and not closed[c] and next_arrival[c] < len(arrival_lists[c]):
                t = arrival_lists[c][next_arrival[c]]
                if t < start_ms:
                    start_ms, starter = t, c
        event_ms = min(finish_ms, start_ms, duration_ms)
        step_ms = event_ms - now
        finishing = event_ms == finish_ms
        for c in range(count):
            if running[c]:
                busy_ms[c] += step_ms
                if finishing and c == finisher:
                    remaining[c] = 0.0
                else:
                    remaining[c] -= step_ms / per_client[c][kernel_index[c]]
        tpc_busy_ms += tpcs_in_use * step_ms
        now = event_ms
        if not finishing:
            if now >= duration_ms:
                break
            next_arrival[starter] += 1
            start(starter, start_ms)
            continue
        for c in range(count):
            if not running[c] or remaining[c] > _FINISHED_FRACTION:
                continue
            kernel_index[c] += 1
            if kernel_index[c] < len(kernels[c]):
                remaining[c] = 1.0
                continue
            latencies[c].append(now - request_arrival[c])
            running[c] = False
            mask &= ~(1 << c)
            if now >= duration_ms:
                continue
            if closed[c]:
                start(c, now)
            elif next_arrival[c] < len(arrival_lists[c]) and arrival_lists[c][next_arrival[c]] <= now:
                next_arrival[c] += 1
                start(c, arrival_lists[c][next_arrival[c] - 1])
        if now >= duration_ms:
            break

    outcomes = []
    for c in range(count):
        arrived = started[c] if closed[c] else len(arrival_lists[c])
        outcomes.append(_Outcome(np.array(latencies[c], dtype=float), arrived, busy_ms[c]))
    return outcomes, tpc_busy_ms


def _overlap_groups(clients: list[_Client]) -> list[list[int]]:
    """Indices of clients grouped into connected components of TPC-set overlap."""
    parent = list(range(len(clients)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    owner_of_tpc: dict[int, int] = {}
    for c, client in enumerate(clients):
        for tpc in client.tpc_ids:
            if tpc in owner_of_tpc:
                parent[root(c)] = root(owner_of_tpc[tpc])
            else:
                owner_of_tpc[tpc] = c
    groups: dict[int, list[int]] = {}
    for c in range(len(clients)):
        groups.setdefault(root(c), []).append(c)
    return list(groups.values())


class SimulatedGpu:
    """Discrete-event model of one GPU's TPCs running the kernels of several clients.

    usage:
        gpu = SimulatedGpu(lookup_model("H100"))
        gpu.add_client("bert", range(0, 8), OpenLoop(named_workload("bert_base_b1"), rate_per_s=200))
        gpu.add_client("train", range(8, 66), ClosedLoop(named_workload("matmul_train_step")))
        result = gpu.run(duration_s=3600, seed=1)
        np.percentile(result.clients["bert"].latencies_ms, 99)
    """

    def __init__(self, model: GpuModel):
        if not isinstance(model, GpuModel):
            raise ValueError(f"model must be a GpuModel (see gpu_models.lookup_model), got {type(model).__name__}")
        self.model = model
        self._clients: list[_Client] = []

    def add_client(self, name: str, tpc_ids: Sequence[int], workload: Workload) -> None:
        """Add a client running `workload` on `tpc_ids` (may overlap other clients' TPCs)."""
        check_new_client(name, [client.name for client in self._clients], workload)
        ids = _validate_tpc_ids(tpc_ids, self.model.tpcs, f"client {name!r} on {self.model.name}")
        self._clients.append(_Client(name, ids, workload))

    def run(self, duration_s: float, seed: int = 0, event_loop_only: bool = False) -> SimulationResult:
        """Simulate `duration_s` seconds from an idle GPU; same seed, same result.

        Each client's arrivals come from its own stream seeded by (seed, name), so adding a client
        does not change the others' arrivals. `event_loop_only` sends every client through the
        event loop (to cross-check the closed-form path; much slower).
        """
        check_run_arguments(duration_s, seed, len(self._clients))
        duration_ms = duration_s * 1000.0
        speed = self.model.relative_tpc_speed
        arrivals: list[np.ndarray | None] = []
        for client in self._clients:
            arrivals.append(client_arrivals_ms(client.name, client.workload, seed, duration_ms))

        outcomes: list[_Outcome | None] = [None] * len(self._clients)
        tpc_busy_ms = 0.0
        groups = [list(range(len(self._clients)))] if event_loop_only else _overlap_groups(self._clients)
        for group in groups:
            if len(group) == 1 and not event_loop_only:
                c = group[0]
                outcomes[c] = _run_alone(self._clients[c], arrivals[c], speed, duration_ms)
                tpc_busy_ms += outcomes[c].busy_ms * len(self._clients[c].tpc_ids)
                continue
            group_outcomes, group_tpc_busy_ms = _run_shared(
                [self._clients[c] for c in group], [arrivals[c] for c in group], speed, self.model.tpcs, duration_ms)
            for c, outcome in zip(group, group_outcomes):
                outcomes[c] = outcome
            tpc_busy_ms += group_tpc_busy_ms

        results = {}
        for client, outcome in zip(self._clients, outcomes):
            results[client.name] = ClientResult(
                name=client.name, tpcs=len(client.tpc_ids), latencies_ms=outcome.latencies_ms,
                arrived=outcome.arrived, completed=int(outcome.latencies_ms.size),
                throughput_per_s=outcome.latencies_ms.size / duration_s, busy_s=outcome.busy_ms / 1000.0,
                tpc_busy_s=outcome.busy_ms / 1000.0 * len(client.tpc_ids))
        return SimulationResult(self.model.name, float(duration_s), int(seed), results, tpc_busy_ms / 1000.0,
                                tpc_busy_ms / (self.model.tpcs * duration_ms))


def simulate_client(model: GpuModel, tpcs: int, workload: Workload, duration_s: float,
                    seed: int = 0) -> ClientResult:
    """One client alone on a slice of `tpcs` TPCs (TPC ids 0..tpcs-1) of a `model` GPU."""
    if not isinstance(model, GpuModel):
        raise ValueError(f"model must be a GpuModel (see gpu_models.lookup_model), got {type(model).__name__}")
    if isinstance(tpcs, bool) or not isinstance(tpcs, (int, np.integer)) or not 1 <= tpcs <= model.tpcs:
        raise ValueError(f"tpcs must be an integer in 1..{model.tpcs} for {model.name}, got {tpcs!r}")
    gpu = SimulatedGpu(model)
    gpu.add_client("client", range(int(tpcs)), workload)
    return gpu.run(duration_s, seed).clients["client"]


class SimulatedDevice(Device):
    """A GPU that exists only as a model: holds allowances, reports no sensor readings.

    Telemetry fields are None: no power model has been calibrated (DESIGN.md has one energy reading
    of a matmul loop, not enough to model power against TPC use and clock).
    """

    def __init__(self, model: GpuModel, index: int, uuid: str):
        if not isinstance(model, GpuModel):
            raise ValueError(f"model must be a GpuModel (see gpu_models.lookup_model), got {type(model).__name__}")
        if isinstance(index, bool) or not isinstance(index, int) or index < 0:
            raise ValueError(f"index must be an integer >= 0, got {index!r}")
        if not isinstance(uuid, str) or not uuid.startswith("SIM-"):
            raise ValueError(f"a simulated GPU's uuid must start with 'SIM-' (SIM-<model>-<node short id>-<index>), got {uuid!r}")
        self._info = DeviceInfo(index=index, uuid=uuid, model=model.name, sms=model.sms, tpcs=model.tpcs,
                                simulated=True)
        self._allowances: dict[int, tuple[int, ...]] = {}

    def info(self) -> DeviceInfo:
        return self._info

    def set_allowance(self, slot: int, tpc_ids: Sequence[int]) -> None:
        _validate_slot(slot)
        self._allowances[slot] = _validate_tpc_ids(tpc_ids, self._info.tpcs, f"slot {slot} on {self._info.uuid}")

    def clear_allowance(self, slot: int) -> None:
        _validate_slot(slot)
        self._allowances.pop(slot, None)

    def allowances(self) -> dict[int, tuple[int, ...]]:
        return dict(self._allowances)

    def telemetry(self) -> Telemetry:
        return Telemetry(clock_mhz=None, power_w=None, energy_j=None, simulated=True)

    def close(self) -> None:
        self._allowances.clear()


def _validate_slot(slot: int) -> None:
    if isinstance(slot, bool) or not isinstance(slot, (int, np.integer)) or slot < 0:
        raise ValueError(f"slot must be an integer >= 0, got {slot!r}")
