"""TPC lending: who may borrow whose idle TPCs (control loop) and what a launch may use (launch path).

Two halves, both pure code:

- `plan_lending(clients, policy)`: what the agent's Python control loop runs every
  `policy.control_period_ms` (never on the launch path). In: the clients of one GPU (slot, priority,
  quota TPC ids, recently active or not from launch-ring activity). Out: for each slot, the lender
  slots whose TPCs it may borrow when those lenders are idle at launch time, and whether its work on
  borrowed TPCs runs at the low stream priority.
- `lenders_at_launch(...)` and `after_launch(...)`: the rule the shim applies at every kernel launch
  from shared memory (owner activity words written by the owners' shims). The simulator
  (`sim_lending.py`) calls these same functions; the C shim must implement them identically.

Rules of the plan:
1. Quotas are guaranteed. A client always launches on its whole quota; lending only ever adds
   lenders' TPCs to a borrower's launch, it never removes the borrower's own.
2. Latency-critical borrowers come first: while a latency-critical client X is active and wants
   more TPCs, no best-effort client may borrow from any lender X may borrow from.
3. No starvation: when every latency-critical client is idle (or wants no more), best-effort
   clients may borrow every other client's idle TPCs.
4. Best-effort work on borrowed TPCs is flagged to run at the lower stream priority
   (`LendDecision.low_priority_on_borrowed`).

The launch-path rule (client B launches kernel k at time now):
    own TPCs, plus the TPCs of every lender L in B's lend list that is idle right now
      (idle: now - L.last_launch_ns >= idle_window_ns  and  now >= L.busy_until_ns),
    but not when k's grid has no more blocks than B's own TPCs have SMs (it runs in one wave there)
      unless B's deferred run on that stream is in the union (staying spares a move between green
      contexts; it then never paces),
    and only if the predictor says k ENDS within the atom budget on B's own quota, counting the
      work B queued ahead of it on the same stream (queue_ahead_ns + predict_ns(k, own quota size)
      <= atom_ns, the prediction not None); otherwise own TPCs only. A launch call returns long
      before a kernel queued behind others runs, so without the queue term a borrower queueing far
      ahead would hold lent TPCs long after their owner woke. (The shim estimates queue_ahead_ns per
      thread and stream from its own predictions, asks the stream once when the estimate says no,
      and makes a low-priority borrower with idle lenders sleep until the estimate fits, one atom
      at a time, at most 40 atoms per launch.)
Then B's own activity word is updated: last_launch_ns = now;
    busy_until_ns = max(busy_until_ns, now) + predicted ns of k on the TPCs it launched on, or,
    when k is unknown, max(busy_until_ns, now + unknown_kernel_busy_ns): an unknown kernel may run
    until then, but unknown kernels do not add up (each one adding the credit made an eager model's
    busy_until run minutes ahead of the clock on the H100, so its TPCs were never lent).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

LATENCY_CRITICAL = "latency_critical"
BEST_EFFORT = "best_effort"
PRIORITIES = (LATENCY_CRITICAL, BEST_EFFORT)

DEFAULT_ATOM_US = 250.0
DEFAULT_IDLE_WINDOW_US = 500.0
DEFAULT_UNKNOWN_KERNEL_BUSY_US = 10_000.0
DEFAULT_ACTIVE_WINDOW_MS = 2.0
DEFAULT_CONTROL_PERIOD_MS = 1.0
# The shim's lender mask is one 64-bit word: bit s = slot s (LITHOS_DEFAULT_SLOTS in native/lithos_shm.h).
MAX_SLOTS = 64


def _check_number(value, what: str, low: float, allowed: str, high: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not math.isfinite(value) or not low < value <= high:
        raise ValueError(f"{what} must be {allowed}, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class LendingPolicy:
    """Every knob of lending, with its default. Invalid values raise ValueError naming what is allowed."""

    atom_us: float = DEFAULT_ATOM_US                            # a borrowed kernel must be predicted to end within this
    idle_window_us: float = DEFAULT_IDLE_WINDOW_US              # a lender with a launch this recent is not idle
    unknown_kernel_busy_us: float = DEFAULT_UNKNOWN_KERNEL_BUSY_US  # busy-until credit of a kernel with no prediction
    active_window_ms: float = DEFAULT_ACTIVE_WINDOW_MS          # control loop: launched this recently = active
    control_period_ms: float = DEFAULT_CONTROL_PERIOD_MS        # how often the control loop re-plans
    lending_enabled: bool = True                                # False: static partitions (no lend lists)
    unroll_graphs: bool = False                                 # borrowers' CUDA-graph replays go kernel by kernel

    def __post_init__(self) -> None:
        _check_number(self.atom_us, "atom_us", 0.0, "a finite number of microseconds in (0, 100000]", 100_000.0)
        _check_number(self.idle_window_us, "idle_window_us", 0.0, "a finite number of microseconds > 0")
        _check_number(self.unknown_kernel_busy_us, "unknown_kernel_busy_us", 0.0, "a finite number of microseconds > 0")
        _check_number(self.active_window_ms, "active_window_ms", 0.0, "a finite number of milliseconds > 0")
        _check_number(self.control_period_ms, "control_period_ms", 0.0, "a finite number of milliseconds > 0")
        for name in ("lending_enabled", "unroll_graphs"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")

    @property
    def atom_ns(self) -> int:
        return round(self.atom_us * 1000)

    @property
    def idle_window_ns(self) -> int:
        return round(self.idle_window_us * 1000)

    @property
    def unknown_kernel_busy_ns(self) -> int:
        return round(self.unknown_kernel_busy_us * 1000)

    def is_active(self, word: "ActivityWord", now_ns: int) -> bool:
        """The control loop's view of a client: it launched within active_window_ms."""
        return word.last_launch_ns is not None and now_ns - word.last_launch_ns < round(self.active_window_ms * 1e6)


def check_priority(priority) -> str:
    if priority not in PRIORITIES:
        raise ValueError(f"priority must be one of {', '.join(repr(p) for p in PRIORITIES)}, got {priority!r}")
    return priority


def check_slot(slot) -> int:
    if isinstance(slot, bool) or not isinstance(slot, (int, np.integer)) or not 0 <= slot < MAX_SLOTS:
        raise ValueError(f"slot must be an integer in 0..{MAX_SLOTS - 1}, got {slot!r}")
    return int(slot)


@dataclass(frozen=True)
class ClientState:
    """One client of a GPU as the control loop sees it."""

    slot: int
    priority: str                   # "latency_critical" or "best_effort"
    quota_tpc_ids: tuple[int, ...]  # its grant; never taken away
    active: bool                    # launched within policy.active_window_ms (from its launch ring)
    wants_more_tpcs: bool = True    # when active: would use TPCs beyond its quota

    def __post_init__(self) -> None:
        check_slot(self.slot)
        check_priority(self.priority)
        ids = tuple(self.quota_tpc_ids) if hasattr(self.quota_tpc_ids, "__iter__") else None
        if not ids or any(isinstance(t, bool) or not isinstance(t, (int, np.integer)) or t < 0 for t in ids) \
                or len(set(ids)) != len(ids):
            raise ValueError(f"slot {self.slot}: quota_tpc_ids must be a non-empty sequence of distinct TPC ids "
                             f">= 0, got {self.quota_tpc_ids!r}")
        object.__setattr__(self, "quota_tpc_ids", tuple(int(t) for t in ids))
        for field in ("active", "wants_more_tpcs"):
            if not isinstance(getattr(self, field), bool):
                raise ValueError(f"slot {self.slot}: {field} must be True or False, got {getattr(self, field)!r}")


@dataclass(frozen=True)
class LendDecision:
    """What one slot may borrow; the shim applies it at launch with `lenders_at_launch`."""

    slot: int
    lender_slots: tuple[int, ...]       # whose TPCs it may add when they are idle at launch time
    low_priority_on_borrowed: bool      # run launches that use borrowed TPCs at the lower stream priority
    unroll_graphs: bool = False         # send its graph replays kernel by kernel, so that each may borrow

    @property
    def lender_mask(self) -> int:
        """The lend list as the shim's 64-bit word: bit s set <=> slot s may be borrowed from."""
        mask = 0
        for slot in self.lender_slots:
            mask |= 1 << slot
        return mask


def plan_lending(clients: Sequence[ClientState], policy: LendingPolicy = LendingPolicy()) -> dict[int, LendDecision]:
    """Lend lists of one GPU's clients (rules in the module docstring). Slots and quotas must be disjoint."""
    if not isinstance(policy, LendingPolicy):
        raise ValueError(f"policy must be a LendingPolicy, got {type(policy).__name__}")
    clients = list(clients)
    for client in clients:
        if not isinstance(client, ClientState):
            raise ValueError(f"clients must be ClientState objects, got {type(client).__name__}")
    slots = [c.slot for c in clients]
    if len(set(slots)) != len(slots):
        raise ValueError(f"two clients share a slot: {sorted(slots)}")
    owner_of_tpc: dict[int, int] = {}
    for client in clients:
        for tpc in client.quota_tpc_ids:
            if tpc in owner_of_tpc:
                raise ValueError(f"TPC {tpc} is in the quotas of slots {owner_of_tpc[tpc]} and {client.slot}; "
                                 "quotas must be disjoint")
            owner_of_tpc[tpc] = client.slot

    if not policy.lending_enabled:
        return {c.slot: LendDecision(c.slot, (), False) for c in clients}
    # Rule 2: lenders wanted by an active latency-critical client are out of reach of best-effort ones.
    wanted_by_lc: set[int] = set()
    for client in clients:
        if client.priority == LATENCY_CRITICAL and client.active and client.wants_more_tpcs:
            wanted_by_lc |= {other.slot for other in clients if other.slot != client.slot}
    plan = {}
    for borrower in sorted(clients, key=lambda c: c.slot):
        best_effort = borrower.priority == BEST_EFFORT
        lenders = tuple(sorted(lender.slot for lender in clients if lender.slot != borrower.slot
                               and not (best_effort and lender.slot in wanted_by_lc)))
        plan[borrower.slot] = LendDecision(borrower.slot, lenders, low_priority_on_borrowed=best_effort,
                                           unroll_graphs=policy.unroll_graphs and bool(lenders))
    return plan


# --- the launch path (mirrored in C by the shim) ------------------------------------------------

@dataclass(frozen=True)
class ActivityWord:
    """What a client's shim publishes about itself at every launch (C: two int64 per slot;
    last_launch_ns = 0 stands for None there, since CLOCK_MONOTONIC is never 0 after boot)."""

    last_launch_ns: int | None = None   # None: never launched
    busy_until_ns: int = 0              # its kernels are predicted to run until then


def lender_is_idle(word: ActivityWord, now_ns: int, idle_window_ns: int) -> bool:
    """A lender is idle when its last launch is at least idle_window_ns old and its predicted busy time has passed."""
    recent = word.last_launch_ns is not None and now_ns - word.last_launch_ns < idle_window_ns
    return not recent and now_ns >= word.busy_until_ns


@dataclass(frozen=True)
class TpcState:
    """One GPU's TPCs now. busy: TPCs of clients that are not idle (lender_is_idle); lent: TPCs of idle
    clients that a busy client may add to its launches now (the launch-path rule's offer, whether or
    not it borrows); lent_to: TPC id -> the busy borrower slot it is offered to (the first in slot order)."""
    busy_tpcs: int
    lent_tpcs: int
    lent_to: dict[int, int]


def tpc_state(allowances: Mapping[int, Sequence[int]], words: Mapping[int, ActivityWord],
              lend_lists: Mapping[int, Sequence[int]], now_ns: int, idle_window_ns: int) -> TpcState:
    """TpcState of one GPU from its clients' allowances, activity words and lend lists."""
    busy = sorted(slot for slot in allowances if slot in words and not lender_is_idle(words[slot], now_ns, idle_window_ns))
    lent_to: dict[int, int] = {}
    for borrower in busy:
        for lender in lend_lists.get(borrower, ()):
            if lender in allowances and lender not in busy:
                for tpc in allowances[lender]:
                    lent_to.setdefault(tpc, borrower)
    return TpcState(sum(len(allowances[s]) for s in busy), len(lent_to), lent_to)


SMS_PER_TPC = 2


def lenders_at_launch(lender_slots: Sequence[int], words: Mapping[int, ActivityWord], now_ns: int,
                      predicted_own_ns: int | None, atom_ns: int, idle_window_ns: int,
                      queue_ahead_ns: int = 0, grid_blocks: int | None = None, own_tpcs: int = 0,
                      continuing: bool = False) -> tuple[int, ...]:
    """The lenders whose TPCs this launch adds to the borrower's own quota (possibly none).

    predicted_own_ns: the predictor's duration of this kernel on the borrower's own quota (None: unknown).
    queue_ahead_ns: predicted time until the work queued before this kernel on its stream ends.
    grid_blocks, own_tpcs: a grid of no more blocks than the own quota has SMs already runs in one wave
    there, so it borrows nothing (None: not known; the simulator passes 2 x a kernel's saturation TPCs),
    unless continuing: the borrower's deferred run on this stream is in the union (its previous launch
    there borrowed, and no driver call paid the join since), and staying spares the stream a move
    between green contexts (two event calls and a cross-context wait on the GPU). Such a launch never
    paces: it borrows only if the queue term holds as things are.
    """
    if predicted_own_ns is None or queue_ahead_ns + predicted_own_ns > atom_ns:
        return ()
    if fits_own_sms(grid_blocks, own_tpcs) and not continuing:
        return ()
    return tuple(slot for slot in lender_slots if lender_is_idle(words[slot], now_ns, idle_window_ns))


def fits_own_sms(grid_blocks, own_tpcs: int):
    """Whether a grid of grid_blocks (None: not known; a numpy array: per launch) has no more blocks than
    own_tpcs TPCs have SMs: it already runs in one wave there, so more TPCs cannot make it faster."""
    return grid_blocks is not None and grid_blocks <= SMS_PER_TPC * own_tpcs


def after_launch(word: ActivityWord, now_ns: int, predicted_ns: int | None, unknown_kernel_busy_ns: int) -> ActivityWord:
    """The launching client's new activity word: known kernels on one stream queue behind each other;
    an unknown one keeps the client busy for unknown_kernel_busy_ns from now (credits do not add up)."""
    if predicted_ns is None:
        return ActivityWord(now_ns, max(word.busy_until_ns, now_ns + unknown_kernel_busy_ns))
    return ActivityWord(now_ns, max(word.busy_until_ns, now_ns) + predicted_ns)
