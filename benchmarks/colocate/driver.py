"""Runs a co-location plan on one GPU: starts worker groups, runs phases, reads the shim's launch rings.

The driver itself never touches CUDA (no torch import): workers are separate processes, so MPS,
time-slicing and the shim act on them exactly as on independent jobs.
"""
from __future__ import annotations

import dataclasses
import json
import os
import selectors
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

from lithos_ray.scheduler import allocator, lending

from . import metrics
from .plan import (BEST_EFFORT, CALIBRATE_S, ESTIMATE_GROUP_START_S, LATENCY_CRITICAL, LENDING_SYSTEMS, MIXES,
                   NOMINAL_H100_SLICES, PHASE_DRAIN_S, PHASE_LEAD_S, Group, Phase, Plan, assign_quotas,
                   mps_be_percent)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
READY_TIMEOUT_S = 240.0
REPLY_MARGIN_S = 60.0
RING_POLL_S = 0.02
ACTIVITY_POLL_S = 0.001
LEND_PACE_ENV = {"idle": "1", "always": "always", "off": "0"}   # --lend-pace -> LITHOS_LEND_PACE
DISPATCH_ENV = {"off": "0", "on": "1", "all": "all"}   # --dispatch -> LITHOS_DISPATCH
OVERRUN_FACTOR = 1.15   # phases still due after budget_s x this are skipped (the device call must end)


class WorkerError(RuntimeError):
    pass


class Worker:
    """One workload process speaking the JSON-lines protocol of worker.py."""

    def __init__(self, workload, variants: tuple[str, ...], env: dict, log_dir: str, tag: str):
        self.workload = workload
        self.log_path = os.path.join(log_dir, f"worker_{tag}_{workload.name}.log")
        self._log = open(self.log_path, "w")
        args = [sys.executable, "-m", "benchmarks.colocate.worker", "--workload", workload.name,
                "--role", workload.role, "--batch", str(workload.batch), "--seq-len", str(workload.seq_len),
                "--variants", ",".join(variants)]
        self.proc = subprocess.Popen(args, cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._log, text=True, bufsize=1)
        self.info: dict = {}
        self.error: str | None = None

    def receive(self, timeout_s: float) -> dict:
        selector = selectors.DefaultSelector()
        selector.register(self.proc.stdout, selectors.EVENT_READ)
        try:
            if not selector.select(timeout_s):
                raise WorkerError(f"{self.workload.name}: no reply within {timeout_s:.0f} s (log {self.log_path})")
        finally:
            selector.close()
        line = self.proc.stdout.readline()
        if not line:
            raise WorkerError(f"{self.workload.name} exited (rc {self.proc.poll()}): {self.log_tail()}")
        reply = json.loads(line)
        if "error" in reply:
            raise WorkerError(f"{self.workload.name}: {reply['error']}")
        return reply

    def send(self, cmd: dict) -> None:
        try:
            self.proc.stdin.write(json.dumps(cmd) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError) as exc:
            raise WorkerError(f"{self.workload.name} is gone ({exc}): {self.log_tail()}") from None

    def wait_ready(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        try:
            self.info = self.receive(timeout_s)
        except WorkerError as exc:
            self.error = str(exc)
            return
        if not self.info.get("ready"):
            self.error = f"{self.workload.name} failed to start: {self.info.get('error')}"

    def log_tail(self, chars: int = 1500) -> str:
        self._log.flush()
        try:
            with open(self.log_path) as handle:
                return handle.read()[-chars:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.send({"cmd": "exit"})
                self.proc.wait(timeout=20)
            except (WorkerError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self._log.close()


class RingCollector:
    """Reads the launch rings of the shim's slots every RING_POLL_S while a phase runs."""

    def __init__(self, table_path: str, slots: list[int]):
        from lithos_ray import native
        self.rings = {slot: native.LaunchRing(native.ring_path(table_path, slot)) for slot in slots}
        self.records: dict[int, list[np.ndarray]] = {slot: [] for slot in slots}
        self._next = {slot: ring.head() for slot, ring in self.rings.items()}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _read_all(self) -> None:
        for slot, ring in self.rings.items():
            batch, self._next[slot] = ring.read(self._next[slot], 4096)
            if len(batch):
                self.records[slot].append(batch)

    def _loop(self) -> None:
        while not self._stop.wait(RING_POLL_S):
            self._read_all()

    def finish(self) -> dict[int, np.ndarray]:
        self._stop.set()
        self._thread.join()
        self._read_all()
        return {slot: (np.concatenate(parts) if parts else None) for slot, parts in self.records.items()}


class ActivitySampler:
    """Reads the shim slots' activity words every ACTIVITY_POLL_S while a phase runs and counts, per
    slot, how often a borrower would have found it idle (the launch-path rule), busy because it
    launched within the idle window, or busy only because its predicted work had not ended."""

    def __init__(self, table, slots: list[int], idle_window_us: float):
        self._table, self._slots = table, slots
        self._window_ns = int(idle_window_us * 1000)
        self.counts = {slot: {"samples": 0, "idle": 0, "recent_launch": 0, "predicted_busy": 0} for slot in slots}
        self._ahead_ns: dict[int, list[int]] = {slot: [] for slot in slots}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(ACTIVITY_POLL_S):
            for slot in self._slots:
                word, now_ns = self._table.activity(slot), time.monotonic_ns()
                counts = self.counts[slot]
                counts["samples"] += 1
                if lending.lender_is_idle(word, now_ns, self._window_ns):
                    counts["idle"] += 1
                elif word.last_launch_ns is not None and now_ns - word.last_launch_ns < self._window_ns:
                    counts["recent_launch"] += 1
                else:
                    counts["predicted_busy"] += 1
                    self._ahead_ns[slot].append(word.busy_until_ns - now_ns)

    def finish(self) -> dict[int, dict]:
        """Per slot: samples, and the shares idle / recent launch / predicted busy; for the last, the
        median and p99 of how far ahead busy_until was (ms)."""
        self._stop.set()
        self._thread.join()
        out = {}
        for slot, counts in self.counts.items():
            n = max(1, counts["samples"])
            ahead = np.asarray(self._ahead_ns[slot], dtype=float) / 1e6
            out[slot] = {"samples": counts["samples"],
                         **{f"{k}_share": counts[k] / n for k in ("idle", "recent_launch", "predicted_busy")},
                         "predicted_busy_ahead_ms_p50": float(np.median(ahead)) if ahead.size else None,
                         "predicted_busy_ahead_ms_p99": float(np.percentile(ahead, 99)) if ahead.size else None}
        return out


def lending_priority(role: str) -> str:
    """scheduler.lending's priority of a workload role."""
    return lending.LATENCY_CRITICAL if role == LATENCY_CRITICAL else lending.BEST_EFFORT


class PhaseControlLoop:
    """The agent's lending control loop (lithos_ray.lending_loop.LendingController) run by the driver
    while a lithos_loop phase runs: every control period it re-plans the lend lists
    from the activity words, so a best-effort job may not borrow what an active latency-critical
    service may. Counts, per slot, the share of steps whose lend list was cut below the full one
    (a lender not publishing activity yet also counts as cut), and failed steps."""

    def __init__(self, table, slots_roles_quotas: list[tuple[int, str, tuple[int, ...]]], atom_us: float):
        from types import SimpleNamespace
        from lithos_ray.lending_loop import LendingController
        grants = [SimpleNamespace(slot=slot, priority=lending_priority(role), tpc_ids=quota)
                  for slot, role, quota in slots_roles_quotas]
        self.policy = lending.LendingPolicy(atom_us=atom_us)
        self.controller = LendingController(table, lambda: grants, self.policy)
        self._full = {slot: len(slots_roles_quotas) - 1 for slot, _, _ in slots_roles_quotas}
        self.steps, self.cut, self.errors = 0, {slot: 0 for slot in self._full}, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.policy.control_period_ms / 1000.0):
            try:
                planned = self.controller.step()
            except Exception as exc:  # as the agent's loop: one bad reading must not freeze the lists unseen
                self.errors.append(repr(exc))
                continue
            for slot, (lenders, _, _) in planned.items():
                self.cut[slot] += len(lenders) < self._full[slot]
            self.steps += 1

    def finish(self) -> dict:
        self._stop.set()
        self._thread.join()
        return {"steps": self.steps, "errors": len(self.errors), "first_errors": self.errors[:3],
                "period_ms": self.policy.control_period_ms,
                "active_window_ms": self.policy.active_window_ms,
                "lend_list_cut_share": {slot: n / self.steps if self.steps else None for slot, n in self.cut.items()}}


def apply_lending(table, slots_roles_quotas: list[tuple[int, str, tuple[int, ...]]], enabled: bool, atom_us: float,
                  unroll_graphs: bool = False) -> dict:
    """Set every slot's lend list from scheduler.lending.plan_lending (all clients idle at plan time, so each
    may borrow from every other; best-effort borrowers at low priority); empty lists when not enabled. With
    unroll_graphs, borrowers' CUDA-graph replays go kernel by kernel."""
    clients = [lending.ClientState(slot, lending_priority(role), quota, active=False)
               for slot, role, quota in slots_roles_quotas]
    policy = lending.LendingPolicy(atom_us=atom_us, lending_enabled=enabled, unroll_graphs=unroll_graphs)
    decisions = lending.plan_lending(clients, policy)
    for slot, decision in decisions.items():
        table.set_lending(slot, list(decision.lender_slots), decision.low_priority_on_borrowed,
                          unroll_graphs=decision.unroll_graphs)
    table.set_lending_knobs(policy.atom_us, policy.idle_window_us, policy.unknown_kernel_busy_us)
    return {"enabled": enabled, "unroll_graphs": unroll_graphs,
            "lend_lists": {s: list(d.lender_slots) for s, d in decisions.items()},
            "low_priority": {s: d.low_priority_on_borrowed for s, d in decisions.items()},
            "knobs": {"atom_us": policy.atom_us, "idle_window_us": policy.idle_window_us,
                      "unknown_kernel_busy_us": policy.unknown_kernel_busy_us}}


def hold_without_borrowing(table, slots_roles_quotas: list[tuple[int, str, tuple[int, ...]]]) -> dict:
    """static_held: each best-effort slot gets a low-priority lend list naming one spare slot that holds
    the borrower's own TPCs, so its launches are held (LITHOS_DISPATCH) but no lender adds a TPC."""
    spare = max(slot for slot, _, _ in slots_roles_quotas) + 1
    held = {}
    for slot, role, quota in slots_roles_quotas:
        if role == BEST_EFFORT:
            table.set_allowance(spare, list(quota))
            table.set_lending(slot, [spare], True)
            held[slot] = spare
            spare += 1
    return {"held_without_lenders": held}


def predictor_accuracy(recs: np.ndarray) -> dict | None:
    """The shim's predictions against the sampled GPU times of the same launches (the issue's figures:
    share off by more than 50 us, error p99); None when no launch was both predicted and timed."""
    from lithos_ray.native import prediction_pairs
    from lithos_ray.scheduler.predictor import prediction_accuracy
    predicted, measured = prediction_pairs(recs)
    if not len(predicted):
        return None
    return dataclasses.asdict(prediction_accuracy(predicted, measured))


def borrowed_work(recs: np.ndarray, borrowing: np.ndarray, duration_ns: np.ndarray, own_tpcs: int) -> dict:
    """What the borrowing launches were: their share of the slot's GPU time, their median grid, and the
    share whose grid has no more blocks than the slot's own SMs (one block per SM already: more TPCs
    cannot make it faster)."""
    if not borrowing.any():
        return {"borrowed_gpu_time_share": 0.0, "borrowed_grid_blocks_p50": None, "borrowed_grid_within_own_sms_share": None}
    blocks = recs["grid"].astype(np.int64).prod(axis=1)[borrowing]
    total_ns = float(duration_ns.sum())
    return {"borrowed_gpu_time_share": float(duration_ns[borrowing].sum() / total_ns) if total_ns else None,
            "borrowed_grid_blocks_p50": float(np.median(blocks)),
            "borrowed_grid_within_own_sms_share": float(np.mean(lending.fits_own_sms(blocks, own_tpcs)))}


def unconfined_work(recs: np.ndarray, duration_ns: np.ndarray) -> dict:
    """Launches that ran on the whole GPU (a kernel a green context refused, or no fitting view): a quota
    leak onto the other clients' TPCs. Their count, share of the slot's GPU time and kernels (name, grid
    and cluster shape)."""
    from lithos_ray.native import UNCONFINED_VIEW
    if "view" not in recs.dtype.names:
        return {}
    unconfined = recs["view"] == UNCONFINED_VIEW
    total_ns = float(duration_ns.sum())
    names = sorted({f"{bytes(r['kernel_name']).decode(errors='replace') or '?'} grid {'x'.join(map(str, r['grid']))} "
                    f"cluster {'x'.join(map(str, r['cluster']))}" for r in recs[unconfined]}) \
        if {"kernel_name", "grid", "cluster"} <= set(recs.dtype.names) else []
    return {"unconfined_launches": int(unconfined.sum()),
            "unconfined_gpu_time_share": float(duration_ns[unconfined].sum() / total_ns) if total_ns else None,
            "unconfined_kernels": names[:8]}


def lending_stats(records: dict[int, np.ndarray | None], quotas: dict[int, tuple[int, ...]],
                  owner_slots: list[int], idle_window_us: float) -> dict:
    """TPCs lent per slot from its launch records (launch TPCs beyond its quota) and estimated reclaim times."""
    out: dict = {"per_slot": {}, "extra_record_fields": []}
    durations: dict[int, np.ndarray] = {}
    borrow_ns, borrow_dur = [], []
    known = {"seq", "function", "host_ns", "gpu_ns", "allowance_generation", "grid", "block", "cluster",
             "shared_bytes", "tpcs", "view", "api", "kernel_name"}
    for slot, recs in records.items():
        if recs is None or not len(recs):
            out["per_slot"][slot] = {"launches": 0}
            continue
        out["extra_record_fields"] = sorted(set(out["extra_record_fields"]) | (set(recs.dtype.names) - known))
        borrowed = metrics.borrowed_tpcs_per_launch(recs["tpcs"], len(quotas[slot]))
        sampled = recs["gpu_ns"] > 0
        median_by_function: dict[int, float] = {}
        for function in np.unique(recs["function"][sampled]):
            median_by_function[int(function)] = float(np.median(recs["gpu_ns"][sampled & (recs["function"] == function)]))
        fallback_ns = float(np.median(recs["gpu_ns"][sampled])) if sampled.any() else 0.0
        dur = np.array([g if g > 0 else median_by_function.get(int(f), fallback_ns)
                        for g, f in zip(recs["gpu_ns"], recs["function"])], dtype=float)
        durations[slot] = dur
        lending_launches = borrowed > 0
        out["per_slot"][slot] = {
            "launches": int(len(recs)), "sampled_launches": int(sampled.sum()),
            "borrowing_launches": int(lending_launches.sum()),
            "borrowing_share": float(lending_launches.mean()),
            "borrowed_tpcs_mean": float(borrowed[lending_launches].mean()) if lending_launches.any() else 0.0,
            "borrowed_tpcs_max": int(borrowed.max()),
            "borrowed_tpc_seconds_estimate": float(np.sum(borrowed * dur) / 1e9),
            **borrowed_work(recs, lending_launches, dur, len(quotas[slot])),
            **unconfined_work(recs, dur),
            "predictor": predictor_accuracy(recs),
        }
        if slot not in owner_slots:
            borrow_ns.append(recs["host_ns"][lending_launches].astype(np.int64))
            borrow_dur.append(dur[lending_launches].astype(np.int64))
    reclaim = {}
    all_borrow_ns = np.concatenate(borrow_ns) if borrow_ns else np.zeros(0, np.int64)
    all_borrow_dur = np.concatenate(borrow_dur) if borrow_dur else np.zeros(0, np.int64)
    for slot in owner_slots:
        recs = records.get(slot)
        if recs is None or not len(recs):
            continue
        times = metrics.reclaim_times_us(recs["host_ns"].astype(np.int64), all_borrow_ns, all_borrow_dur,
                                         int(idle_window_us * 1000))
        reclaim[slot] = {"wakeups": int(times.size), "with_borrowed_kernel_running": int(np.count_nonzero(times > 0)),
                         "p50_us": float(np.percentile(times, 50)) if times.size else None,
                         "p99_us": float(np.percentile(times, 99)) if times.size else None}
    out["reclaim_estimate"] = reclaim
    out["notes"] = ("TPCs lent = launch TPCs beyond the launching slot's quota (lithos_launch_record.tpcs); durations of "
                    "unsampled launches = median sampled GPU time of the same function. Reclaim = owner's first launch "
                    "after an idle gap -> estimated end of the last borrowed kernel launched before it (lower bound).")
    return out


def idle_capacity_used(lending: dict, quotas: dict[int, tuple[int, ...]], records: dict[int, np.ndarray | None]) -> dict:
    """How much of what idle owners offered was borrowed: every slot's borrowed TPC-seconds against the
    TPC-seconds its lenders were idle (activity idle share x quota TPCs x the span of the phase's launch
    records). Both are estimates; the share is what the report prints."""
    stamps = [recs["host_ns"] for recs in records.values() if recs is not None and len(recs)]
    span_s = (max(int(s.max()) for s in stamps) - min(int(s.min()) for s in stamps)) / 1e9 if stamps else 0.0
    offered = sum(lending["activity"].get(slot, {}).get("idle_share", 0.0) * len(quota) * span_s
                  for slot, quota in quotas.items())
    used = sum(stats.get("borrowed_tpc_seconds_estimate", 0.0) for stats in lending["per_slot"].values())
    return {"span_s": span_s, "idle_tpc_seconds": offered, "borrowed_tpc_seconds": used,
            "share_borrowed": used / offered if offered > 0 else None}


class Run:
    """State of one run: plan, rates, raw phase results, errors, timeline."""

    def __init__(self, plan: Plan, args):
        self.plan, self.args = plan, args
        self.log_dir = tempfile.mkdtemp(prefix="lithos-colocate-logs-")
        self.rates: dict[str, dict[str, float]] = {}
        self.calibration: dict[str, dict] = {}
        self.phase_results: list[dict] = []
        self.errors: list[str] = []
        self.timeline: list[dict] = []
        self.mix_setup: dict[str, dict] = {}
        self.workers_info: dict[str, dict] = {}
        self.started = time.monotonic()
        self.deadline = self.started + plan.budget_s * OVERRUN_FACTOR
        self.table = None
        self.mps_dir: str | None = None
        self.mps_env: dict = {}

    def mark(self, what: str) -> None:
        self.timeline.append({"t_s": round(time.monotonic() - self.started, 2), "what": what})
        print(f"[{time.monotonic() - self.started:7.1f} s] {what}", flush=True)

    # --- environments -------------------------------------------------------------------------
    def base_env(self) -> dict:
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        env.pop("LD_PRELOAD", None)
        for name in ("CUDA_MPS_ACTIVE_THREAD_PERCENTAGE", "LITHOS_SHM", "LITHOS_SLOT"):
            env.pop(name, None)
        return env

    def plain_env(self) -> dict:
        return dict(self.base_env(), CUDA_MPS_PIPE_DIRECTORY=tempfile.mkdtemp(prefix="lithos-colocate-nomps-"))

    def ensure_mps(self) -> None:
        if self.mps_dir is None:
            from lithos_ray import mps
            self.mps_dir = tempfile.mkdtemp(prefix="lithos-colocate-mps-")
            self.mps_env = mps.start_mps(self.mps_dir)
            self.mark("MPS control daemon started")

    def ensure_table(self):
        if self.table is None:
            from lithos_ray import native
            self.table = native.AllowanceTable.create(native._default_gpu_uuid())
            native.probe_layout_into(self.table)
            self.mark(f"allowance table {self.table.path}; co-scheduled groups probed "
                      f"({len(self.table.cosched_groups())} groups)")
        return self.table

    # --- groups ------------------------------------------------------------------------------------
    def start_workers(self, names, env_of, tag: str) -> dict[str, Worker]:
        workers = {}
        for name in names:
            workload = self.plan.workloads[name]
            variants = self.plan.variants if workload.role == LATENCY_CRITICAL else ("eager",)
            workers[name] = Worker(workload, variants, env_of(name), self.log_dir, tag)
        ready_timeout_s = min(READY_TIMEOUT_S, max(60.0, self.deadline - time.monotonic()))
        for name, worker in workers.items():
            worker.wait_ready(ready_timeout_s)
            self.workers_info[f"{tag}:{name}"] = {k: v for k, v in worker.info.items() if k != "traceback"}
            if worker.error:
                self.errors.append(f"group {tag}: {worker.error}")
                self.mark(f"worker {name} failed: {worker.error[:300]}")
        self.mark(f"group {tag}: workers ready: " + ", ".join(
            f"{n} ({w.info.get('build_s', '?')} s)" for n, w in workers.items() if not w.error))
        return workers

    def shim_setup(self, mix_name: str) -> dict:
        table = self.ensure_table()
        mix = MIXES[mix_name]
        slices = allocator.slices_from_cosched_groups(table.cosched_groups(), table.tpcs_on_gpu)
        quota_list = assign_quotas(slices, self.plan.lc_quota_groups[mix_name])
        names = (*mix.services, mix.best_effort)
        setup = {"slots": {name: slot for slot, name in enumerate(names)},
                 "quota_tpcs": {name: list(q) for name, q in zip(names, quota_list)},
                 "total_tpcs": table.tpcs_on_gpu}
        for slot, quota in enumerate(quota_list):
            table.set_allowance(slot, list(quota))
        self.mix_setup.setdefault(mix_name, {}).update(setup)
        return setup

    def be_percent(self, mix_name: str) -> int:
        if self.args.mps_be_percent is not None:
            return int(self.args.mps_be_percent)
        setup = self.mix_setup.get(mix_name, {})
        if "quota_tpcs" in setup:
            return mps_be_percent(len(setup["quota_tpcs"][MIXES[mix_name].best_effort]), setup["total_tpcs"])
        # nominal H100 layout (no shim group ran): 15 co-scheduled groups of 4 TPCs + 6 loose TPCs
        quotas = assign_quotas(NOMINAL_H100_SLICES, self.plan.lc_quota_groups[mix_name])
        return mps_be_percent(len(quotas[-1]), sum(map(len, NOMINAL_H100_SLICES)))

    def shim_roles(self, shim: dict) -> list[tuple[int, str, tuple[int, ...]]]:
        """(slot, role, quota TPCs) of every worker of a shim group."""
        return [(slot, self.plan.workloads[n].role, tuple(shim["quota_tpcs"][n])) for n, slot in shim["slots"].items()]

    # --- phases ------------------------------------------------------------------------------------
    def seed_of(self, phase: Phase, name: str) -> int:
        names = list(self.plan.workloads)
        return int(self.args.seed) * 100_000 + phase.trial * 100 + names.index(name)

    def run_phase(self, phase: Phase, workers: dict[str, Worker], shim: dict | None = None) -> dict:
        result = {"system": phase.system, "mix": phase.mix, "variant": phase.variant, "trial": phase.trial,
                  "active": list(phase.active), "label": phase.label, "workloads": {}}
        if time.monotonic() > self.deadline:
            result["status"] = f"skipped: past the time budget ({self.plan.budget_s:g} s x {OVERRUN_FACTOR})"
            return result
        running = {}
        warmup_s = self.plan.first_warmup_s if phase.first else self.plan.warmup_s
        start_at = time.time() + PHASE_LEAD_S
        for name in phase.active:
            worker, workload = workers.get(name), self.plan.workloads[name]
            if worker is None or worker.error:
                result["workloads"][name] = {"status": f"worker unavailable: {worker.error if worker else 'not started'}"}
                continue
            if workload.role == LATENCY_CRITICAL:
                if phase.variant not in worker.info.get("variants", []):
                    reason = worker.info.get("variant_errors", {}).get(phase.variant, "variant not built")
                    result["workloads"][name] = {"status": f"variant unavailable: {reason}"}
                    continue
                cmd = {"cmd": "serve", "variant": phase.variant, "rate_per_s": self.rates[name][phase.variant],
                       "seed": self.seed_of(phase, name)}
            else:
                cmd = {"cmd": "train"}
            cmd.update(start_at=start_at, warmup_s=warmup_s, window_s=self.plan.phase_s, drain_s=PHASE_DRAIN_S)
            try:
                worker.send(cmd)
                running[name] = worker
            except WorkerError as exc:
                worker.error = str(exc)
                result["workloads"][name] = {"status": f"failed: {exc}"}
        collector = RingCollector(self.table.path, list(shim["slots"].values())) if shim and running else None
        control = None
        if collector and phase.system == "lithos_loop":
            control = PhaseControlLoop(self.table, self.shim_roles(shim), self.args.atom_us)
        idle_window_us = self.table.lending_knobs()["idle_window_ns"] / 1000 if collector else None   # apply_lending's
        sampler = ActivitySampler(self.table, list(shim["slots"].values()), idle_window_us) if collector else None
        timeout_s = PHASE_LEAD_S + warmup_s + self.plan.phase_s + PHASE_DRAIN_S + REPLY_MARGIN_S
        try:
            for name, worker in running.items():
                try:
                    reply = worker.receive(timeout_s)
                    result["workloads"][name] = {"status": "ok", **reply}
                except WorkerError as exc:
                    worker.error = str(exc)
                    result["workloads"][name] = {"status": f"failed: {exc}"}
                    self.errors.append(f"{phase.label}: {exc}")
        finally:   # the loop writes lend lists: it stops with the phase, whatever happened
            control_summary = control.finish() if control is not None else None
        if collector is not None:
            records = collector.finish()
            slots = shim["slots"]
            quotas = {slot: tuple(shim["quota_tpcs"][name]) for name, slot in slots.items()}
            owners = [slot for name, slot in slots.items() if self.plan.workloads[name].role == LATENCY_CRITICAL]
            result["lending"] = lending_stats(records, quotas, owners, idle_window_us)
            result["lending"]["slot_names"] = {slot: name for name, slot in slots.items()}
            result["lending"]["activity"] = sampler.finish()
            result["lending"]["idle_capacity"] = idle_capacity_used(result["lending"], quotas, records)
            if control_summary is not None:
                result["lending"]["control_loop"] = control_summary
        result["status"] = "ok" if all(w.get("status") == "ok" for w in result["workloads"].values()) else "partial"
        return result

    def calibrate(self, phase: Phase, workers: dict[str, Worker]) -> None:
        name = phase.active[0]
        worker = workers.get(name)
        if worker is None or worker.error or phase.variant not in worker.info.get("variants", []):
            self.errors.append(f"calibration of {name}/{phase.variant} impossible: "
                               f"{worker.error if worker else 'no worker'} {worker.info.get('variant_errors', '') if worker else ''}")
            return
        worker.send({"cmd": "calibrate", "variant": phase.variant, "seconds": CALIBRATE_S})
        service_ms = np.asarray(worker.receive(CALIBRATE_S + REPLY_MARGIN_S)["service_ms"])
        median_ms = float(np.median(service_ms))
        rate = self.plan.load * 1000.0 / median_ms
        self.rates.setdefault(name, {})[phase.variant] = rate
        self.calibration.setdefault(name, {})[phase.variant] = {
            "service_ms_p50": median_ms, "service_ms_p99": float(np.percentile(service_ms, 99)),
            "closed_loop_requests": int(service_ms.size), "rate_per_s": rate}
        self.mark(f"calibrated {name}/{phase.variant}: service p50 {median_ms:.3f} ms -> {rate:.1f} requests/s")

    def run_group(self, group: Group, kept: dict[str, Worker]) -> dict[str, Worker]:
        """Run one group's phases; returns the workers to keep for the next group (mps -> mps_pct)."""
        shim = None
        if group.environment == "plain":
            env = self.plain_env()
            workers = self.start_workers(group.workers, lambda name: env, "plain")
        elif group.environment == "shim":
            from lithos_ray import native
            self.ensure_mps()
            try:
                shim = self.shim_setup(group.mix)
            except (ValueError, RuntimeError, OSError, subprocess.SubprocessError) as exc:
                self.errors.append(f"shim setup for {group.mix} failed: {exc}")
                self.mark(f"shim setup for {group.mix} failed: {exc}")
                for phase in group.phases:
                    self.phase_results.append({**_phase_keys(phase), "status": f"failed: shim setup: {exc}"})
                return {}
            table_path = self.table.path
            workers = self.start_workers(
                group.workers, lambda name: {**self.base_env(), **self.mps_env,
                                             **native.client_env(table_path, shim["slots"][name]),
                                             "LITHOS_SAMPLE_EVERY": str(self.args.sample_every),
                                             "LITHOS_LEND_PACE": LEND_PACE_ENV[self.args.lend_pace],
                                             "LITHOS_DISPATCH": DISPATCH_ENV[self.args.dispatch]},
                f"shim-{group.mix}")
        else:
            self.ensure_mps()
            if group.environment == "mps":
                workers = self.start_workers(group.workers, lambda name: {**self.base_env(), **self.mps_env}, "mps")
            else:
                restart = [n for n in group.workers if n not in kept or n in group.restart_only]
                for name in restart:
                    if name in kept:
                        kept.pop(name).stop()
                pct_env = {}
                for mix_name in self.plan.mixes:
                    pct = self.be_percent(mix_name)
                    pct_env[MIXES[mix_name].best_effort] = pct
                    self.mix_setup.setdefault(mix_name, {})["mps_be_percent"] = pct

                def env_of(name):
                    env = {**self.base_env(), **self.mps_env}
                    if self.plan.workloads[name].role == BEST_EFFORT:
                        env["CUDA_MPS_ACTIVE_THREAD_PERCENTAGE"] = str(pct_env[name])
                    return env
                workers = {**kept, **self.start_workers(restart, env_of, "mps_pct")}
        try:
            self.run_phases(group, workers, shim)
        except BaseException:
            for worker in workers.values():
                worker.stop()
            raise
        keep = group.environment == "mps" and "mps_pct" in self.plan.systems
        if not keep:
            for worker in workers.values():
                worker.stop()
            return {}
        return workers

    def run_phases(self, group: Group, workers: dict[str, Worker], shim: dict | None) -> None:
        for phase in group.phases:
            if phase.system == "calibrate":
                try:
                    self.calibrate(phase, workers)
                except WorkerError as exc:
                    self.errors.append(f"calibration {phase.label}: {exc}")
                continue
            if any(self.plan.workloads[n].role == LATENCY_CRITICAL and n not in self.rates for n in phase.active):
                self.phase_results.append({**_phase_keys(phase), "status": "failed: a service has no calibrated rate"})
                continue
            if shim is not None:
                roles = self.shim_roles(shim)
                self.mix_setup[group.mix]["lending_" + phase.system] = apply_lending(
                    self.table, roles, phase.system in LENDING_SYSTEMS, self.args.atom_us,
                    unroll_graphs=phase.system == "lithos_unroll")
                if phase.system == "static_held":
                    self.mix_setup[group.mix]["lending_static_held"].update(hold_without_borrowing(self.table, roles))
            result = self.run_phase(phase, workers, shim)
            self.phase_results.append(result)
            self.mark(f"{phase.label}: {result['status']} " + _phase_summary(result))

    def close(self) -> None:
        if self.mps_dir is not None:
            from lithos_ray import mps
            try:
                mps.stop_mps(self.mps_dir)
                self.mark("MPS control daemon stopped")
            except RuntimeError as exc:
                self.errors.append(f"stopping MPS: {exc}")
        if self.table is not None:
            self.table.close()

    def worker_logs(self, chars: int = 4000) -> str:
        parts = []
        for name in sorted(os.listdir(self.log_dir)):
            with open(os.path.join(self.log_dir, name)) as handle:
                text = handle.read()
            parts.append(f"===== {name} ({len(text)} chars, last {chars})\n{text[-chars:]}")
        return "\n".join(parts)


def _phase_keys(phase: Phase) -> dict:
    return {"system": phase.system, "mix": phase.mix, "variant": phase.variant, "trial": phase.trial,
            "active": list(phase.active), "label": phase.label, "workloads": {}}


def _phase_summary(result: dict) -> str:
    parts = []
    for name, w in result.get("workloads", {}).items():
        if w.get("status") != "ok":
            parts.append(f"{name}: {w.get('status', '')[:120]}")
        elif "latency_ms" in w:
            p = metrics.latency_percentiles_ms(w["latency_ms"])
            if p["n"]:
                parts.append(f"{name} p50 {p['p50_ms']:.2f} p99 {p['p99_ms']:.2f} ms n={p['n']} unserved={w['unserved']}")
        else:
            steps = metrics.steps_in_window(w["step_start_s"], w["step_end_s"], 0.0, w["window_s"])
            parts.append(f"{name} {steps / w['window_s']:.2f} steps/s")
    return "; ".join(parts)


def execute(run: Run, after_group=None) -> None:
    """Run every group of the plan in order (after_group(run) is called after each, e.g. to save partial
    results); a group that cannot start before the deadline is skipped. Always stops MPS, workers, table."""
    kept: dict[str, Worker] = {}
    try:
        for group in run.plan.groups:
            if time.monotonic() + ESTIMATE_GROUP_START_S > run.deadline:
                for phase in group.phases:
                    run.phase_results.append({**_phase_keys(phase), "status": "skipped: past the time budget"})
                run.mark(f"group {group.environment}{':' + group.mix if group.mix else ''}: skipped (time budget)")
                continue
            run.mark(f"group {group.environment}{':' + group.mix if group.mix else ''}: starting")
            kept = run.run_group(group, kept)
            if after_group is not None:
                after_group(run)
    finally:
        for worker in kept.values():
            worker.stop()
        run.close()
