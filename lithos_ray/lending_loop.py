"""The agent's lending control loop (ms cadence, never on the launch path).

Every period it reads each client's activity word from shared memory, runs the pure policy
(`scheduler.lending.plan_lending`) and publishes each slot's lend list to the allowance table;
the shim applies it per launch. A client that has never published activity is nobody's lender.
"""
from __future__ import annotations

import logging
import threading
import time

from .scheduler.lending import ClientState, LendingPolicy, plan_lending

logger = logging.getLogger(__name__)


class LendingController:
    """`table`: what the shim reads (lithos_ray.native.AllowanceTable); `grants`: callable -> GrantRecords."""

    def __init__(self, table, grants, policy: LendingPolicy = LendingPolicy()):
        self.table, self.grants, self.policy = table, grants, policy
        self.published: dict[int, tuple[tuple[int, ...], bool, bool]] = {}
        table.set_lending_knobs(policy.atom_us, policy.idle_window_us, policy.unknown_kernel_busy_us)

    def step(self, now_ns: int | None = None) -> dict[int, tuple[tuple[int, ...], bool, bool]]:
        """One re-plan; returns each slot's published (lender slots, low_priority, unroll_graphs)."""
        now_ns = time.monotonic_ns() if now_ns is None else now_ns
        clients, publishing = [], set()
        for grant in self.grants():
            word = self.table.activity(grant.slot)
            if self.table.activity_writer_pid(grant.slot):
                publishing.add(grant.slot)
            clients.append(ClientState(grant.slot, grant.priority, grant.tpc_ids, self.policy.is_active(word, now_ns)))
        plan = plan_lending(clients, self.policy)
        wanted = {}
        for slot, d in plan.items():
            lenders = tuple(s for s in d.lender_slots if s in publishing)
            wanted[slot] = (lenders, d.low_priority_on_borrowed, d.unroll_graphs and bool(lenders))
        for slot, (lenders, low_priority, unroll) in wanted.items():
            if self.published.get(slot) != (lenders, low_priority, unroll):
                self.table.set_lending(slot, list(lenders), low_priority, unroll_graphs=unroll)
        for slot in set(self.published) - set(wanted):
            self.table.set_lending(slot, [], False)
        self.published = wanted
        return wanted

    def run_forever(self, stop: threading.Event) -> None:
        period_s = self.policy.control_period_ms / 1000.0
        while not stop.wait(period_s):
            try:
                self.step()
            except Exception:   # a bad reading must not stop lending decisions for good
                logger.exception("lending control step failed")
