"""The simulated GPU with TPC lending: each kernel launch picks its TPCs by the launch-path rule.

Everything here is a model; numbers it produces are "simulated" and must be labelled so.

Same kernel model and sharing model as `simulated.py` (l(t) = m / min(t, s) + b; a TPC's throughput
is shared equally by the kernels on it), but a client's TPC set is decided per kernel launch:
its own quota plus the quotas of the lenders `lending.lenders_at_launch` allows at that instant,
with each client's `LatencyPredictor` fed by the simulated durations. A control loop re-plans the
lend lists (`lending.plan_lending`) every `policy.control_period_ms` from launch activity.
Quotas are disjoint, so the TPCs of a kernel are a union of whole quotas ("regions").

Launch-ahead queues: a client's CPU keeps up to `launch_ahead` kernels queued (one stream) behind
the running one, within one request/step; a request/step ends when its last kernel completes (the
real workers synchronize per request/step). The TPCs of a kernel are decided when it is ISSUED, by
`lenders_at_launch` with the shim's queue estimate (queue_ahead_ns = the client's predicted end of
its issued work - now; 0 when that says no and nothing is in flight, as the shim's stream query),
and it runs on them whenever it reaches the head of its queue. A low-priority borrower paces as the
shim does: while it has idle lenders and the estimate says no, its CPU waits, one atom at a time
(then lenders and stream are asked again), at most PACE_MAX_ATOMS atoms per kernel (then it issues
on its own TPCs). launch_ahead=0: one kernel at a time, issued when
the previous one ends (nothing queued ahead; the queue term and pacing never apply).

Measured per client: latencies, throughput, TPC-seconds borrowed and lent, reclaim times (an
owner's issue that finds borrowers' issued kernels, running or queued, on its TPCs, until the last
of them ends) and quota violations:
  - a borrower's issue takes a lender's TPCs while that lender has a kernel in flight (the launch
    rule's idle test was wrong), or
  - a borrower's kernel is still on an owner's TPCs more than the atom budget after the owner's
    issue that reclaimed them.
Stream priorities are recorded, not modelled: a low-priority kernel shares TPCs equally (the GPU
does not preempt running thread blocks, and the sharing model has no block scheduler).
"""
from __future__ import annotations

import math
import zlib
from collections import deque
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from .gpu_models import GpuModel
from .lending import (SMS_PER_TPC, ActivityWord, ClientState, LendingPolicy, after_launch, check_priority,
                      fits_own_sms, lenders_at_launch, plan_lending)
from .predictor import KernelKey, LatencyPredictor, PredictorAccuracy, prediction_accuracy
from .simulated import (_FINISHED_FRACTION, MAX_EVENTS_PER_CLIENT, ClosedLoop, KernelModel, KernelSequence, Workload,
                        _validate_tpc_ids, check_new_client, check_run_arguments, client_arrivals_ms)

# Tolerance on "within the atom budget" for float time (ms).
_TIME_EPSILON_MS = 1e-9
# A paced borrower waits at most this many atoms per kernel (PACE_MAX_ATOMS in native/lithos.c).
PACE_MAX_ATOMS = 40
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
    launch_ahead: int = 0           # kernels its CPU keeps queued beyond the running one
    launches_paced: int = 0         # issues its CPU delayed to fit the atom budget (pacing)


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
    queue_term: bool = True         # the launch rule counted the work queued ahead
    pacing: bool = True             # low-priority borrowers paced their issues

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
    launch_ahead: int


@dataclass
class _Issued:
    """A kernel issued to a client's stream: running (queue head) or queued, on the TPCs decided at issue."""

    index: int                      # in the client's request/step
    regions: tuple[int, ...]        # quotas (client indices) it runs on, its own first
    tpcs: int
    predicted_ns: int | None        # at issue, on `tpcs`
    sampled: bool                   # its duration feeds the predictor
    owners_waiting: list[int] = field(default_factory=list)     # owners whose reclaim waits for it


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
                 timeline_bin_ms: float = DEFAULT_TIMELINE_BIN_MS, queue_term: bool = True, pacing: bool | str = True):
        """queue_term=False: the old launch rule (queue_ahead_ns = 0 always, so a client that queues
        ahead borrows for kernels that run long after their issue). pacing=False: low-priority
        borrowers never wait for their queue to drain (the shim with LITHOS_DISPATCH=0 and
        LITHOS_LEND_PACE=0); True (default): they wait while a lender is idle (LITHOS_LEND_PACE=1, and,
        with a CPU that issues in no time, the shim's default held launches); "always": whenever they
        may borrow."""
        if not isinstance(model, GpuModel):
            raise ValueError(f"model must be a GpuModel (see gpu_models.lookup_model), got {type(model).__name__}")
        if not isinstance(policy, LendingPolicy):
            raise ValueError(f"policy must be a LendingPolicy, got {type(policy).__name__}")
        if isinstance(sample_every, bool) or not isinstance(sample_every, int) or sample_every < 1:
            raise ValueError(f"sample_every must be an integer >= 1 (1: every launch feeds the predictor), "
                             f"got {sample_every!r}")
        if not (isinstance(timeline_bin_ms, (int, float)) and math.isfinite(timeline_bin_ms) and timeline_bin_ms > 0):
            raise ValueError(f"timeline_bin_ms must be a finite number > 0, got {timeline_bin_ms!r}")
        if not isinstance(queue_term, bool):
            raise ValueError(f"queue_term must be True or False, got {queue_term!r}")
        if not (isinstance(pacing, bool) or pacing == "always"):
            raise ValueError(f"pacing must be True, False or 'always', got {pacing!r}")
        self.queue_term = queue_term
        self.pacing = pacing
        self.model = model
        self.policy = policy
        self.sample_every = sample_every
        self.timeline_bin_ms = float(timeline_bin_ms)
        self._clients: list[_Client] = []

    def add_client(self, name: str, priority: str, quota_tpc_ids: Sequence[int], workload: Workload,
                   launch_ahead: int = 0) -> None:
        """Add a client with a quota disjoint from the others'; its slot is its index.

        launch_ahead: how many kernels its CPU keeps queued beyond the running one (0: it issues the
        next kernel when the previous one ends)."""
        check_new_client(name, [client.name for client in self._clients], workload)
        check_priority(priority)
        if isinstance(launch_ahead, bool) or not isinstance(launch_ahead, (int, np.integer)) or launch_ahead < 0:
            raise ValueError(f"client {name!r}: launch_ahead must be an integer >= 0 (kernels queued beyond the "
                             f"running one), got {launch_ahead!r}")
        ids = _validate_tpc_ids(quota_tpc_ids, self.model.tpcs, f"client {name!r} on {self.model.name}")
        for other in self._clients:
            shared = sorted(set(ids) & set(other.quota))
            if shared:
                raise ValueError(f"client {name!r}: TPCs {shared} are already in the quota of {other.name!r}; "
                                 "quotas must be disjoint (lending shares them, not the quotas)")
        self._clients.append(_Client(name, len(self._clients), priority, ids, workload, int(launch_ahead)))

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
        self.low_priority = [False] * count
        # per client: its stream (head running, the rest queued) and its CPU
        self.queue: list[deque[_Issued]] = [deque() for _ in range(count)]
        self.remaining = [0.0] * count              # fraction of the head kernel left
        self.head_start_ms = [0.0] * count          # when the head kernel started running
        self.next_kernel = [0] * count              # next kernel of the request/step to issue
        self.in_request = [False] * count
        self.queue_end_ns = [0] * count             # the shim's estimate: predicted end of the issued work
        self.last_borrowed = [False] * count        # the client's previous issue borrowed (the shim's per stream)
        self.pace_until_ms = [math.inf] * count     # the CPU sleeps until then (pacing)
        self.pace_began_ns: list[int | None] = [None] * count
        self.stream_asked = [False] * count         # the stream was asked once for the kernel being issued
        self.request_arrival = [0.0] * count
        self.next_arrival = [0] * count
        self.started = [0] * count
        self.latencies: list[list[float]] = [[] for _ in range(count)]
        self.launches = [0] * count
        self.launches_borrowing = [0] * count
        self.launches_paced = [0] * count
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
        now_ns = round(now_ms * 1e6)
        states = []
        for c, client in enumerate(self.clients):
            active = self.policy.is_active(self.words[c], now_ns)
            states.append(ClientState(c, client.priority, client.quota, active, wants_more_tpcs=active))
        plan = plan_lending(states, self.policy)
        self.lenders = {c: plan[c].lender_slots for c in range(len(self.clients))}
        self.low_priority = [plan[c].low_priority_on_borrowed for c in range(len(self.clients))]

    # --- issues and completions ------------------------------------------------------------------

    def choose_lenders(self, c: int, now_ms: float) -> tuple[int, ...] | None:
        """The lenders of the kernel client c issues now, as the shim chooses them; None: the CPU paces."""
        if not self.lenders[c]:
            return ()
        policy = self.policy
        now_ns = round(now_ms * 1e6)
        _, _, saturation, key = self.kernels[c][self.next_kernel[c]]
        predicted_own_ns = self.predictors[c].predict_ns(key, self.quota_tpcs[c])
        # a kernel that saturates within the own TPCs stands for a grid within the own SMs
        blocks = None if saturation is None or math.isinf(saturation) else math.ceil(SMS_PER_TPC * saturation)
        # the shim's owed run is in a union while the request/step goes on (its sync pays the join)
        continuing = self.last_borrowed[c] and self.next_kernel[c] > 0
        lenders = lenders_at_launch(self.lenders[c], self.words, now_ns, predicted_own_ns, policy.atom_ns,
                                    policy.idle_window_ns, queue_ahead_ns=0, grid_blocks=blocks, own_tpcs=self.quota_tpcs[c],
                                    continuing=continuing)
        fits = fits_own_sms(blocks, self.quota_tpcs[c])   # never paces for it
        pace_always = self.gpu.pacing == "always" and self.low_priority[c] and predicted_own_ns is not None \
            and predicted_own_ns <= policy.atom_ns and not fits
        if not self.gpu.queue_term or (not lenders and not pace_always):
            return lenders
        ahead_ns = max(0, self.queue_end_ns[c] - now_ns)
        if ahead_ns + predicted_own_ns > policy.atom_ns and not self.stream_asked[c]:
            self.stream_asked[c] = True
            if not self.queue[c]:           # the stream query: it drained already
                self.queue_end_ns[c] = now_ns
                ahead_ns = 0
        nap_ns = ahead_ns + predicted_own_ns - policy.atom_ns
        if nap_ns > 0 and self.gpu.pacing and self.low_priority[c] and not fits:
            began_ns = now_ns if self.pace_began_ns[c] is None else self.pace_began_ns[c]
            left_ns = PACE_MAX_ATOMS * policy.atom_ns - (now_ns - began_ns)
            if left_ns > 0:                 # one atom at a time, then lenders and stream again
                self.pace_began_ns[c] = began_ns
                self.pace_until_ms[c] = (now_ns + min(nap_ns, policy.atom_ns, left_ns)) / 1e6
                return None
        return lenders_at_launch(lenders, self.words, now_ns, predicted_own_ns, policy.atom_ns, policy.idle_window_ns,
                                 queue_ahead_ns=ahead_ns, grid_blocks=blocks, own_tpcs=self.quota_tpcs[c],
                                 continuing=continuing)   # the queue term on the idle lenders

    def issue(self, c: int, now_ms: float, lenders: tuple[int, ...]) -> None:
        """Client c's CPU issues its next kernel on its own TPCs plus `lenders`' (after_launch as the shim)."""
        policy = self.policy
        now_ns = round(now_ms * 1e6)
        key = self.kernels[c][self.next_kernel[c]][3]
        tpcs = self.quota_tpcs[c] + sum(self.quota_tpcs[lender] for lender in lenders)
        predicted_ns = self.predictors[c].predict_ns(key, tpcs)
        self.last_borrowed[c] = bool(lenders)
        old_word = self.words[c]
        self.words[c] = after_launch(old_word, now_ns, predicted_ns, policy.unknown_kernel_busy_ns)
        self.queue_end_ns[c] = after_launch(ActivityWord(None, self.queue_end_ns[c]), now_ns, predicted_ns,
                                            policy.unknown_kernel_busy_ns).busy_until_ns
        for lender in lenders:
            if self.queue[lender]:          # ground truth: the lender was not idle after all
                self.violations[lender] += 1
        # Reclaim: this owner's issue finds borrowers' kernels (running or queued) on its TPCs.
        if self.reclaim_start_ms[c] is None:
            holders = [kernel for other in range(len(self.clients)) if other != c
                       for kernel in self.queue[other] if c in kernel.regions]
            if holders:
                self.reclaim_start_ms[c] = now_ms
                self.reclaim_waiting[c] = len(holders)
                for kernel in holders:
                    kernel.owners_waiting.append(c)
            elif old_word.last_launch_ns is None or now_ns - old_word.last_launch_ns >= policy.idle_window_ns:
                self.reclaims_uncontended[c] += 1
        self.launches[c] += 1
        if lenders:
            self.launches_borrowing[c] += 1
        if self.pace_began_ns[c] is not None:
            self.launches_paced[c] += 1
        self.pace_began_ns[c] = None
        self.stream_asked[c] = False
        if not self.queue[c]:
            self.remaining[c] = 1.0
            self.head_start_ms[c] = now_ms
        self.queue[c].append(_Issued(self.next_kernel[c], (c,) + lenders, tpcs, predicted_ns,
                                     self.launches[c] % self.gpu.sample_every == 0))
        self.next_kernel[c] += 1

    def issue_while_room(self, c: int, now_ms: float) -> None:
        """Client c's CPU issues the request's kernels while its queue has room (and it is not pacing)."""
        depth = 1 + self.clients[c].launch_ahead
        while (self.pace_until_ms[c] == math.inf and self.next_kernel[c] < len(self.kernels[c])
               and len(self.queue[c]) < depth):
            lenders = self.choose_lenders(c, now_ms)
            if lenders is None:             # pacing: wake() decides again
                return
            self.issue(c, now_ms, lenders)

    def wake(self, c: int, now_ms: float) -> None:
        """A paced CPU wakes up and decides again (asking its stream again)."""
        self.pace_until_ms[c] = math.inf
        self.stream_asked[c] = False
        self.issue_while_room(c, now_ms)

    def start_request(self, c: int, arrival_ms: float, now_ms: float) -> None:
        self.started[c] += 1
        if self.started[c] > MAX_EVENTS_PER_CLIENT:
            raise ValueError(f"client {self.clients[c].name!r}: more than {MAX_EVENTS_PER_CLIENT} requests/steps "
                             "in this run; shorten duration_s")
        self.request_arrival[c] = arrival_ms
        self.in_request[c] = True
        self.next_kernel[c] = 0
        self.issue_while_room(c, now_ms)

    def complete(self, c: int, now_ms: float) -> None:
        kernel = self.queue[c].popleft()
        duration_ns = max(1, round((now_ms - self.head_start_ms[c]) * 1e6))
        key = self.kernels[c][kernel.index][3]
        if kernel.sampled:
            self.predictors[c].observe(key, duration_ns, kernel.tpcs)
        if kernel.predicted_ns is not None:
            self.predicted_pairs[c].append((kernel.predicted_ns, duration_ns))
        for owner in kernel.owners_waiting:
            self.reclaim_waiting[owner] -= 1
            if self.reclaim_waiting[owner] == 0:
                reclaim_ms = now_ms - self.reclaim_start_ms[owner]
                self.reclaims[owner].append(reclaim_ms)
                if reclaim_ms > self.policy.atom_us / 1000.0 + _TIME_EPSILON_MS:
                    self.violations[owner] += 1
                self.reclaim_start_ms[owner] = None
        if now_ms >= self.duration_ms:
            return
        if self.queue[c]:                   # the next queued kernel starts
            self.remaining[c] = 1.0
            self.head_start_ms[c] = now_ms
        self.issue_while_room(c, now_ms)
        if self.queue[c] or self.next_kernel[c] < len(self.kernels[c]):
            return
        self.latencies[c].append(now_ms - self.request_arrival[c])
        self.in_request[c] = False
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
            if self.queue[c] and len(self.queue[c][0].regions) > 1:
                for lender in self.queue[c][0].regions[1:]:
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
                if self.queue[c]:
                    for r in self.queue[c][0].regions:
                        holders_per_region[r] += 1
            latency = [0.0] * count
            finish_ms, finisher = math.inf, -1
            for c in range(count):
                if not self.queue[c]:
                    continue
                head = self.queue[c][0]
                t_eff = sum(self.quota_tpcs[r] / holders_per_region[r] for r in head.regions)
                m, b, saturation, _ = self.kernels[c][head.index]
                latency[c] = m / min(t_eff, saturation) + b
                t = now + self.remaining[c] * latency[c]
                if t < finish_ms:
                    finish_ms, finisher = t, c
            start_ms, starter = math.inf, -1
            for c in range(count):
                if not self.in_request[c] and not self.closed[c] and self.next_arrival[c] < len(self.arrivals[c]):
                    t = self.arrivals[c][self.next_arrival[c]]
                    if t < start_ms:
                        start_ms, starter = t, c
            wake_ms = min(self.pace_until_ms)
            event_ms = min(finish_ms, start_ms, next_tick, wake_ms, self.duration_ms)
            step_ms = event_ms - now
            for c in range(count):
                if self.queue[c]:
                    if c == finisher and event_ms == finish_ms:
                        self.remaining[c] = 0.0
                    else:
                        self.remaining[c] -= step_ms / latency[c]
            self.account(now, step_ms)
            now = event_ms
            if event_ms == finish_ms:
                for c in range(count):
                    if self.queue[c] and self.remaining[c] <= _FINISHED_FRACTION:
                        self.complete(c, now)
            elif event_ms == start_ms:
                self.next_arrival[starter] += 1
                self.start_request(starter, start_ms, now)
            elif event_ms == next_tick:
                self.control_tick(now)
                next_tick += period_ms
            elif event_ms == wake_ms:
                self.wake(self.pace_until_ms.index(wake_ms), now)
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
                predictor=accuracy, launch_ahead=client.launch_ahead, launches_paced=self.launches_paced[c])
        bin_ms = self.gpu.timeline_bin_ms
        return LendingResult(self.gpu.model.name, self.duration_s, self.seed, self.policy, clients, bin_ms,
                             self.lent_timeline_tpc_ms / bin_ms, queue_term=self.gpu.queue_term,
                             pacing=self.gpu.pacing)
