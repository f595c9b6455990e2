"""The simulated GPU with TPC lending: each kernel launch picks its TPCs by the launch-path rule.

Everything here is a model; numbers it produces are "simulated" and must be labelled so.

Same kernel model and sharing model as `simulated.py` (l(t) = m / min(t, s) + b; a TPC's throughput
is shared equally by the kernels on it), but a client's TPC set is decided per kernel launch:
its own quota plus the quotas of the lenders `lending.lenders_at_launch` allows at that instant,
with each client's `LatencyPredictor` fed by the simulated durations. A control loop re-plans the
lend lists (`lending.plan_lending`) every `policy.control_period_ms` from launch activity.
Quotas are disjoint, so the TPCs of a kernel are a union of whole quotas ("regions").

Measured per client: latencies, throughput, TPC-seconds borrowed and lent, reclaim times (an
owner's launch that finds borrowers' kernels on its TPCs, until the last of them ends) and quota
violations:
  - a borrower's launch takes a lender's TPCs while that lender has a kernel running (the launch
    rule's idle test was wrong), or
  - a borrower's kernel is still on an owner's TPCs more than the atom budget after the owner's
    launch that reclaimed them.
Stream priorities are recorded, not modelled: a low-priority kernel shares TPCs equally (the GPU
does not preempt running thread blocks, and the sharing model has no block scheduler).
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from .gpu_models import GpuModel
from .lending import (ActivityWord, ClientState, LendingPolicy, after_launch, check_priority, lenders_at_launch,
                      plan_lending)
from .predictor import KernelKey, LatencyPredictor, PredictorAccuracy, prediction_accuracy
from .simulated import (MAX_EVENTS_PER_CLIENT, ClosedLoop, KernelModel, KernelSequence, Workload,
                        _validate_tpc_ids, check_new_client, check_run_arguments, client_arrivals_ms)

# A kernel counts as finished when less than this fraction of it is left (float round-off).
_FINISHED_FRACTION = 1e-12
# Tolerance on "within the atom budget" for float time (ms).
_TIME_EPSILON_MS = 1e-9
DEFAULT_TIMELINE_BIN_MS = 10.0


def split_kernels(sequence: KernelSequence | KernelModel, pieces: int, name: str | None = None) -> KernelSequence:
    """Each kernel of `sequence` as `pieces` equal kernels (m/pieces, b/pieces, same saturation).

    The split sequence has exactly the calibrated latency at every TPC count when run alone. What it
    assumes (label it ASSUMPTION where used): the real work is a chain of `pieces` equal kernels,
    e.g. BERT's forward pass as its per-layer kernels, or a GEMM issued as row blocks.
    """
    if isinstance(sequence, KernelModel):
        sequence = KernelSequence(sequence.name, (sequence,))
    if not isinstance(sequence, KernelSequence):
        raise ValueError(f"sequence must be a KernelSequence or a KernelModel, got {type(sequence).__name__}")
    if isinstance(pieces, bool) or not isinstance(pieces, int) or pieces < 1:
        raise ValueError(f"pieces must be an integer >= 1, got {pieces!r}")
    kernels = []
    for kernel in sequence.kernels:
        piece = KernelModel(f"{kernel.name}/{pieces}", kernel.m_tpc_ms / pieces, kernel.b_ms / pieces,
                            kernel.saturation_tpcs)
        kernels += [piece] * pieces
    return KernelSequence(name or f"{sequence.name}/{pieces}", tuple(kernels))


@dataclass(frozen=True)
class LendingClientResult:
    """What one client got during a simulated run with lending (all simulated)."""

    name: str
    slot: int
    priority: str
    quota_tpcs: int
    latencies_ms: np.ndarray        # per completed request/step (open loop: queueing included)
    arrived: int
    completed: int
    throughput_per_s: float
    launches: int
    launches_borrowing: int         # launches that added lenders' TPCs
    borrowed_tpc_s: float           # integral of lenders' TPCs under its kernels
    lent_tpc_s: float               # integral of its TPCs under borrowers' kernels
    reclaim_ms: np.ndarray          # per contended reclaim: its launch -> last borrower kernel gone from its TPCs
    reclaims_uncontended: int       # launches after idle that found no borrower on its TPCs (reclaim time 0)
    quota_violations: int
    predictor: PredictorAccuracy | None     # its predictions (on the TPCs used) against simulated durations


@dataclass(frozen=True)
class LendingResult:
    """Outcome of `LendingGpu.run` (all simulated)."""

    gpu_model: str
    duration_s: float
    seed: int
    policy: LendingPolicy
    clients: dict[str, LendingClientResult]
    timeline_bin_ms: float
    lent_tpcs_timeline: np.ndarray  # mean number of TPCs lent (held by borrowers' kernels) in each bin

    @property
    def quota_violations(self) -> int:
        return sum(c.quota_violations for c in self.clients.values())

    def reclaim_ms_all(self) -> np.ndarray:
        """Contended reclaim times of every owner."""
        parts = [c.reclaim_ms for c in self.clients.values()]
        return np.concatenate(parts) if parts else np.zeros(0)


@dataclass(frozen=True)
class _Client:
    name: str
    slot: int
    priority: str
    quota: tuple[int, ...]
    workload: Workload


class LendingGpu:
    """One simulated GPU whose clients own disjoint quotas and lend idle TPCs by `lending.py`'s rules.

    usage:
        gpu = LendingGpu(lookup_model("H100"), LendingPolicy(atom_us=250))
        gpu.add_client("bert", "latency_critical", range(0, 8), OpenLoop(split_kernels(bert_base_b1(), 48), 100))
        gpu.add_client("train", "best_effort", range(8, 66), ClosedLoop(split_kernels(matmul_train_step(), 8)))
        result = gpu.run(duration_s=10, seed=1)
        result.clients["train"].throughput_per_s, np.percentile(result.reclaim_ms_all(), 99)
    """

    def __init__(self, model: GpuModel, policy: LendingPolicy = LendingPolicy(), sample_every: int = 1,
                 timeline_bin_ms: float = DEFAULT_TIMELINE_BIN_MS):
        if not isinstance(model, GpuModel):
            raise ValueError(f"model must be a GpuModel (see gpu_models.lookup_model), got {type(model).__name__}")
        if not isinstance(policy, LendingPolicy):
            raise ValueError(f"policy must be a LendingPolicy, got {type(policy).__name__}")
        if isinstance(sample_every, bool) or not isinstance(sample_every, int) or sample_every < 1:
            raise ValueError(f"sample_every must be an integer >= 1 (1: every launch feeds the predictor), "
                             f"got {sample_every!r}")
        if not (isinstance(timeline_bin_ms, (int, float)) and math.isfinite(timeline_bin_ms) and timeline_bin_ms > 0):
            raise ValueError(f"timeline_bin_ms must be a finite number > 0, got {timeline_bin_ms!r}")
        self.model = model
        self.policy = policy
        self.sample_every = sample_every
        self.timeline_bin_ms = float(timeline_bin_ms)
        self._clients: list[_Client] = []

    def add_client(self, name: str, priority: str, quota_tpc_ids: Sequence[int], workload: Workload) -> None:
        """Add a client with a quota disjoint from the others'; its slot is its index."""
        check_new_client(name, [client.name for client in self._clients], workload)
        check_priority(priority)
        ids = _validate_tpc_ids(quota_tpc_ids, self.model.tpcs, f"client {name!r} on {self.model.name}")
        for other in self._clients:
            shared = sorted(set(ids) & set(other.quota))
            if shared:
                raise ValueError(f"client {name!r}: TPCs {shared} are already in the quota of {other.name!r}; "
                                 "quotas must be disjoint (lending shares them, not the quotas)")
        self._clients.append(_Client(name, len(self._clients), priority, ids, workload))

    def run(self, duration_s: float, seed: int = 0) -> LendingResult:
        """Simulate `duration_s` seconds from an idle GPU with cold predictors; same seed, same result.

        Arrivals are drawn exactly as `SimulatedGpu.run` draws them (same seed and name, same
        requests), so results compare request by request with the static and shared baselines.
        """
        check_run_arguments(duration_s, seed, len(self._clients))
        return _Run(self, float(duration_s), int(seed)).result()


class _Run:
    """State of one simulation; `result()` runs the event loop."""

    def __init__(self, gpu: LendingGpu, duration_s: float, seed: int):
        self.gpu = gpu
        self.policy = gpu.policy
        self.clients = gpu._clients
        self.duration_s = duration_s
        self.duration_ms = duration_s * 1000.0
        self.seed = seed
        count = len(self.clients)
        speed = gpu.model.relative_tpc_speed
        self.quota_tpcs = [len(c.quota) for c in self.clients]
        self.closed = [isinstance(c.workload, ClosedLoop) for c in self.clients]
        self.kernels = []           # per client: list of (m, b, saturation, key)
        for client in self.clients:
            sequence = client.workload.step if isinstance(client.workload, ClosedLoop) else client.workload.request
            self.kernels.append([(k.m_tpc_ms / speed, k.b_ms, math.inf if k.saturation_tpcs is None else k.saturation_tpcs,
                                  KernelKey(zlib.crc32(k.name.encode()), 1, 1)) for k in sequence.kernels])
        self.arrivals: list[list[float]] = []
        for client in self.clients:
            arrivals = client_arrivals_ms(client.name, client.workload, seed, self.duration_ms)
            self.arrivals.append([] if arrivals is None else arrivals.tolist())
        self.predictors = [LatencyPredictor() for _ in range(count)]
        self.words = {c: ActivityWord() for c in range(count)}
        self.lenders = {c: () for c in range(count)}
        # per client: the running kernel
        self.running = [False] * count
        self.kernel_index = [0] * count
        self.remaining = [0.0] * count
        self.regions: list[tuple[int, ...]] = [()] * count      # quotas (client indices) its kernel holds
        self.launch_ms = [0.0] * count
        self.launch_tpcs = [0] * count
        self.launch_predicted_ns: list[int | None] = [None] * count
        self.pending_reclaims: list[set[int]] = [set() for _ in range(count)]   # owners waiting for this kernel
        self.request_arrival = [0.0] * count
        self.next_arrival = [0] * count
        self.started = [0] * count
        self.latencies: list[list[float]] = [[] for _ in range(count)]
        self.launches = [0] * count
        self.launches_borrowing = [0] * count
        self.borrowed_tpc_ms = [0.0] * count
        self.lent_tpc_ms = [0.0] * count
        self.reclaim_start_ms: list[float | None] = [None] * count
        self.reclaim_waiting = [0] * count
        self.reclaims: list[list[float]] = [[] for _ in range(count)]
        self.reclaims_uncontended = [0] * count
        self.violations = [0] * count
        self.predicted_pairs: list[list[tuple[int, int]]] = [[] for _ in range(count)]
        bins = max(1, math.ceil(self.duration_ms / gpu.timeline_bin_ms))
        self.lent_timeline_tpc_ms = np.zeros(bins)

    # --- the control loop ---------------------------------------------------------------------

    def control_tick(self, now_ms: float) -> None:
        active_window_ns = round(self.policy.active_window_ms * 1e6)
        now_ns = round(now_ms * 1e6)
        states = []
        for c, client in enumerate(self.clients):
            last = self.words[c].last_launch_ns
            active = last is not None and now_ns - last < active_window_ns
            states.append(ClientState(c, client.priority, client.quota, active, wants_more_tpcs=active))
        plan = plan_lending(states, self.policy)
        self.lenders = {c: plan[c].lender_slots for c in range(len(self.clients))}

    # --- launches and completions ---------------------------------------------------------------

    def launch(self, c: int, now_ms: float) -> None:
        policy = self.policy
        now_ns = round(now_ms * 1e6)
        key = self.kernels[c][self.kernel_index[c]][3]
        predictor = self.predictors[c]
        own_tpcs = self.quota_tpcs[c]
        lenders = ()
        if self.lenders[c]:
            # a simulated client launches when its previous kernel ends: nothing queued ahead
            lenders = lenders_at_launch(self.lenders[c], self.words, now_ns, predictor.predict_ns(key, own_tpcs),
                                        policy.atom_ns, policy.idle_window_ns, queue_ahead_ns=0)
        tpcs = own_tpcs + sum(self.quota_tpcs[lender] for lender in lenders)
        predicted_ns = predictor.predict_ns(key, tpcs)
        old_word = self.words[c]
        self.words[c] = after_launch(old_word, now_ns, predicted_ns, policy.unknown_kernel_busy_ns)
        for lender in lenders:
            if self.running[lender]:        # ground truth: the lender was not idle after all
                self.violations[lender] += 1
        # Reclaim: this owner's launch finds borrowers' kernels on its TPCs.
        if self.reclaim_start_ms[c] is None:
            holders = [other for other in range(len(self.clients))
                       if other != c and self.running[other] and c in self.regions[other]]
            if holders:
                self.reclaim_start_ms[c] = now_ms
                self.reclaim_waiting[c] = len(holders)
                for other in holders:
                    self.pending_reclaims[other].add(c)
            elif old_word.last_launch_ns is None or now_ns - old_word.last_launch_ns >= policy.idle_window_ns:
                self.reclaims_uncontended[c] += 1
        self.running[c] = True
        self.remaining[c] = 1.0
        self.regions[c] = (c,) + lenders
        self.launch_ms[c] = now_ms
        self.launch_tpcs[c] = tpcs
        self.launch_predicted_ns[c] = predicted_ns
        self.launches[c] += 1
        if lenders:
            self.launches_borrowing[c] += 1

    def start_request(self, c: int, arrival_ms: float, now_ms: float) -> None:
        self.started[c] += 1
        if self.started[c] > MAX_EVENTS_PER_CLIENT:
            raise ValueError(f"client {self.clients[c].name!r}: more than {MAX_EVENTS_PER_CLIENT} requests/steps "
                             "in this run; shorten duration_s")
        self.request_arrival[c] = arrival_ms
        self.kernel_index[c] = 0
        self.launch(c, now_ms)

    def complete(self, c: int, now_ms: float) -> None:
        self.running[c] = False
        duration_ns = max(1, round((now_ms - self.launch_ms[c]) * 1e6))
        key = self.kernels[c][self.kernel_index[c]][3]
        if self.launches[c] % self.gpu.sample_every == 0:
            self.predictors[c].observe(key, duration_ns, self.launch_tpcs[c])
        if self.launch_predicted_ns[c] is not None:
            self.predicted_pairs[c].append((self.launch_predicted_ns[c], duration_ns))
        for owner in self.pending_reclaims[c]:
            self.reclaim_waiting[owner] -= 1
            if self.reclaim_waiting[owner] == 0:
                reclaim_ms = now_ms - self.reclaim_start_ms[owner]
                self.reclaims[owner].append(reclaim_ms)
                if reclaim_ms > self.policy.atom_us / 1000.0 + _TIME_EPSILON_MS:
                    self.violations[owner] += 1
                self.reclaim_start_ms[owner] = None
        self.pending_reclaims[c].clear()
        self.regions[c] = ()
        if now_ms >= self.duration_ms:
            return
        self.kernel_index[c] += 1
        if self.kernel_index[c] < len(self.kernels[c]):
            self.launch(c, now_ms)
            return
        self.latencies[c].append(now_ms - self.request_arrival[c])
        if self.closed[c]:
            self.start_request(c, now_ms, now_ms)
        elif self.next_arrival[c] < len(self.arrivals[c]) and self.arrivals[c][self.next_arrival[c]] <= now_ms:
            self.next_arrival[c] += 1
            self.start_request(c, self.arrivals[c][self.next_arrival[c] - 1], now_ms)

    # --- the event loop ------------------------------------------------------------------------

    def account(self, start_ms: float, step_ms: float) -> None:
        """Integrals of borrowed and lent TPCs over one step in which nothing changes."""
        lent_regions: set[int] = set()
        for c in range(len(self.clients)):
            if self.running[c] and len(self.regions[c]) > 1:
                for lender in self.regions[c][1:]:
                    self.borrowed_tpc_ms[c] += step_ms * self.quota_tpcs[lender]
                    self.lent_tpc_ms[lender] += step_ms * self.quota_tpcs[lender]
                    lent_regions.add(lender)
        if not lent_regions or step_ms <= 0:
            return
        lent_tpcs = sum(self.quota_tpcs[r] for r in lent_regions)
        bin_ms = self.gpu.timeline_bin_ms
        end_ms = start_ms + step_ms
        position = start_ms
        while position < end_ms:
            index = min(int(position // bin_ms), self.lent_timeline_tpc_ms.size - 1)
            bin_end = min(end_ms, (index + 1) * bin_ms)
            if bin_end <= position:     # last bin, float edge
                bin_end = end_ms
            self.lent_timeline_tpc_ms[index] += lent_tpcs * (bin_end - position)
            position = bin_end

    def result(self) -> LendingResult:
        count = len(self.clients)
        period_ms = self.policy.control_period_ms
        lending = self.policy.lending_enabled
        now = 0.0
        next_tick = 0.0 if lending else math.inf
        if lending:
            self.control_tick(0.0)
            next_tick = period_ms
        for c in range(count):
            if self.closed[c]:
                self.start_request(c, 0.0, 0.0)
        while True:
            holders_per_region = [0] * count
            for c in range(count):
                if self.running[c]:
                    for r in self.regions[c]:
                        holders_per_region[r] += 1
            latency = [0.0] * count
            finish_ms, finisher = math.inf, -1
            for c in range(count):
                if not self.running[c]:
                    continue
                t_eff = sum(self.quota_tpcs[r] / holders_per_region[r] for r in self.regions[c])
                m, b, saturation, _ = self.kernels[c][self.kernel_index[c]]
                latency[c] = m / min(t_eff, saturation) + b
                t = now + self.remaining[c] * latency[c]
                if t < finish_ms:
                    finish_ms, finisher = t, c
            start_ms, starter = math.inf, -1
            for c in range(count):
                if not self.running[c] and not self.closed[c] and self.next_arrival[c] < len(self.arrivals[c]):
                    t = self.arrivals[c][self.next_arrival[c]]
                    if t < start_ms:
                        start_ms, starter = t, c
            event_ms = min(finish_ms, start_ms, next_tick, self.duration_ms)
            step_ms = event_ms - now
            for c in range(count):
                if self.running[c]:
                    if c == finisher and event_ms == finish_ms:
                        self.remaining[c] = 0.0
                    else:
                        self.remaining[c] -= step_ms / latency[c]
            self.account(now, step_ms)
            now = event_ms
            if event_ms == finish_ms:
                for c in range(count):
                    if self.running[c] and self.remaining[c] <= _FINISHED_FRACTION:
                        self.complete(c, now)
            elif event_ms == start_ms:
                self.next_arrival[starter] += 1
                self.start_request(starter, start_ms, now)
            elif event_ms == next_tick:
                self.control_tick(now)
                next_tick += period_ms
            if now >= self.duration_ms:
                break
        return self.build_result()

    def build_result(self) -> LendingResult:
        clients = {}
        for c, client in enumerate(self.clients):
            pairs = self.predicted_pairs[c]
            accuracy = prediction_accuracy([p for p, _ in pairs], [m for _, m in pairs]) if pairs else None
            arrived = self.started[c] if self.closed[c] else len(self.arrivals[c])
            latencies = np.array(self.latencies[c], dtype=float)
            clients[client.name] = LendingClientResult(
                name=client.name, slot=client.slot, priority=client.priority, quota_tpcs=len(client.quota),
                latencies_ms=latencies, arrived=arrived, completed=int(latencies.size),
                throughput_per_s=latencies.size / self.duration_s, launches=self.launches[c],
                launches_borrowing=self.launches_borrowing[c], borrowed_tpc_s=self.borrowed_tpc_ms[c] / 1000.0,
                lent_tpc_s=self.lent_tpc_ms[c] / 1000.0, reclaim_ms=np.array(self.reclaims[c], dtype=float),
                reclaims_uncontended=self.reclaims_uncontended[c], quota_violations=self.violations[c],
                predictor=accuracy)
        bin_ms = self.gpu.timeline_bin_ms
        return LendingResult(self.gpu.model.name, self.duration_s, self.seed, self.policy, clients, bin_ms,
                             self.lent_timeline_tpc_ms / bin_ms)
