"""A simulated day of a placement plan on simulated GPUs (SIMULATED: every number comes from the
discrete-event model in scheduler/simulated.py, not from a GPU).

For each GPU of a plan and each slot of the day, one `SimulatedGpu` runs every replica on that GPU as
an open-loop client (Poisson arrivals, one stream, first come first served) on its own disjoint TPC
range; latencies are compared with the model's SLO. Peak packing of the same replicas runs the same
way, with the same arrivals (a replica's arrivals depend only on the seed, the slot and its name).

What a replica gets (ASSUMPTIONS, stated in the result):
- Traffic: the profile's TPC demand times a log-normal day factor and slot factor
  (`generators.noisy_day`), drawn once per day from the seed; a split model's replicas share it equally.
- Requests: every request is the same calibrated kernel shape (`REQUEST_SHAPES`, default one 8192^3
  bf16 matmul fitted to H100 measurements). The profile fixes TPC demand, not request size, so the
  simulated rate is demand / (TPC-seconds of one request on the replica's peak TPCs): at its peak
  TPCs a replica is exactly as busy as the profile says.
- TPCs (`TPC_POLICIES`; lithos does not emit per-slot quotas yet, so the first two are what the
  per-GPU scheduler would have to do for the plan): `slo_quota` re-splits each GPU's TPCs every slot
  by predicted latency against the SLO (`_slo_aware_split`); `demand_quota` every slot in proportion
  to the profile's demand; `static` keeps the plan's `reserved_tpcs` (in proportion to peaks) all
  day, which is what peak packing with Ray reservations gives.
- Time compression: each slot is represented by `window_s` simulated seconds starting from empty
  queues; requests still queued at the window's end count as SLO misses.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from ..scheduler.calibration import MATMUL_8192_BF16, WORKLOADS
from ..scheduler.gpu_models import lookup_model
from ..scheduler.simulated import KernelSequence, OpenLoop, SimulatedGpu
from .generators import noisy_day
from .planner import LowerBounds, Plan, build_problem, make_plan, peak_packing, split_gpu_tpcs
from .profiles import MINUTES_PER_DAY, ProfileError, ProfileSet

SIMULATED_LABEL = "SIMULATED (scheduler/simulated.py discrete-event model, not measured on a GPU)"
REQUEST_SHAPES: dict[str, KernelSequence] = {
    "matmul_8192_bf16": KernelSequence("matmul_8192_bf16", (MATMUL_8192_BF16.kernel,)), **WORKLOADS}
DEFAULT_REQUEST = "matmul_8192_bf16"
DEFAULT_WINDOW_S = 30.0
DEFAULT_SLOT_SIGMA = 0.15       # same noise as the fluid overload check of `bench`
DEFAULT_DAY_SIGMA = 0.10
TPC_POLICIES = ("slo_quota", "demand_quota", "static")
ATTAINMENT_GOAL = 0.99
# slo_quota sizes replicas for this much more than the profile's rate (traffic above the profile)
SLO_QUOTA_LOAD_MARGIN = 1.3          # a model "meets its SLO" on the day when this share of requests does
# Quoted from docs/SIMULATOR.md "Limits"; carried into every result.
SIMULATOR_LIMITS = (
    "Disjoint partitions are perfectly independent: no shared memory bandwidth, L2 or power limit.",
    "Service times are deterministic; no launch jitter, no CPU-side time separate from GPU time.",
    "Only H100 is calibrated. Other models scale m by relative_tpc_speed, a tensor-core-peak estimate; "
    "memory-bound kernels on other GPUs are off by the memory-bandwidth ratio.",
    "SimulatedGpu has no stealing, atomization, preemption, clock or power: a client's TPC set is "
    "fixed for the run.",
    "The green-context TPC-granularity constraints (cluster kernels needing 8-SM groups) are not modelled.",
)


@dataclass
class DayOutcome:
    """Request counts of one plan under one TPC policy over the simulated day (all simulated)."""
    requests_by_model: dict[str, int]
    within_slo_by_model: dict[str, int]
    unfinished_by_model: dict[str, int]     # still queued at a window's end; counted as misses
    requests_by_slot: np.ndarray
    within_slo_by_slot: np.ndarray
    gpus_used: int
    simulated_requests_per_s: float         # wall-clock speed of the simulation

    @property
    def slo_attainment(self) -> float:
        requests = sum(self.requests_by_model.values())
        return sum(self.within_slo_by_model.values()) / requests if requests else float("nan")


def request_shape(name: str) -> KernelSequence:
    if name not in REQUEST_SHAPES:
        raise ProfileError(f"unknown request shape {name!r}; known shapes: {', '.join(REQUEST_SHAPES)}")
    return REQUEST_SHAPES[name]


def _check_plan_matches(plan: Plan, profile_set: ProfileSet) -> None:
    if plan.slots_per_day != profile_set.slots_per_day:
        raise ProfileError(f"the plan has {plan.slots_per_day} slots per day and the profile set "
                           f"{profile_set.slots_per_day}; simulate a plan with the profiles it was made from")
    unknown = sorted({p.model for p in plan.placements} - set(profile_set.models))
    if unknown:
        raise ProfileError(f"the plan places model(s) {', '.join(map(repr, unknown[:5]))} that the profile "
                           "set does not define")
    missing = sorted(set(profile_set.models) - {p.model for p in plan.placements})
    if missing:
        raise ProfileError(f"model(s) {', '.join(map(repr, missing[:5]))} of the profile set have no "
                           "placement in the plan")


def request_cost_tpc_s(plan: Plan, profile_set: ProfileSet, request: KernelSequence) -> dict[str, float]:
    """Per replica, TPC-seconds one request occupies on the replica's peak TPC demand (at least 1 TPC)."""
    speed = lookup_model(plan.gpu_model).relative_tpc_speed
    peaks = profile_set.demand_matrix_tpcs().max(axis=1)
    row_of_model = {name: row for row, name in enumerate(profile_set.model_names)}
    costs = {}
    for p in plan.placements:
        reference_tpcs = max(1.0, min(float(plan.gpu_tpcs), peaks[row_of_model[p.model]] / p.replicas))
        costs[p.item] = reference_tpcs * request.latency_ms(reference_tpcs, speed) / 1000.0
    return costs


def _slo_aware_split(rates_per_s: np.ndarray, slo_ms: np.ndarray, request: KernelSequence, speed: float,
                     gpu_tpcs: int) -> np.ndarray:
    """TPCs for one GPU's replicas in one slot: start at 1 each, then give TPCs one at a time to the
    replica whose predicted mean latency / SLO is worst (M/D/1: S + rho S / (2 (1 - rho)), infinite
    at rho >= 1, where the service time S follows from the TPCs held and the utilisation rho from
    them and the rate times SLO_QUOTA_LOAD_MARGIN)."""
    count = rates_per_s.size
    tpcs = np.ones(count, dtype=np.int64)
    service_ms_by_tpcs = np.array([request.latency_ms(t, speed) for t in range(1, gpu_tpcs + 1)])
    for _ in range(gpu_tpcs - count):
        service_ms = service_ms_by_tpcs[tpcs - 1]
        rho = rates_per_s * SLO_QUOTA_LOAD_MARGIN * service_ms / 1000.0
        with np.errstate(divide="ignore", invalid="ignore"):
            latency_ms = np.where(rho < 1.0, service_ms * (1.0 + rho / (2.0 * (1.0 - rho))), np.inf)
        # overloaded replicas first (the most loaded of them), then the worst latency / SLO
        score = np.where(np.isinf(latency_ms), 1e12 + rho, latency_ms / slo_ms)
        score[rates_per_s <= 0] = -1.0
        tpcs[int(np.argmax(score))] += 1
    return tpcs


def slot_tpcs_by_item(plan: Plan, profile_set: ProfileSet, policy: str,
                      request: str = DEFAULT_REQUEST) -> dict[str, np.ndarray]:
    """Per replica, its whole TPCs in every slot: [slots] ints; a GPU's replicas sum to its TPCs.

    static: the plan's reserved_tpcs all day; demand_quota: each slot, in proportion to the profile's
    demand; slo_quota: each slot, `_slo_aware_split` on the profile's rates (not the noise).
    """
    if policy not in TPC_POLICIES:
        raise ProfileError(f"unknown TPC policy {policy!r}; allowed: {', '.join(TPC_POLICIES)}")
    slots = profile_set.slots_per_day
    if policy == "static":
        return {p.item: np.full(slots, p.reserved_tpcs) for p in plan.placements}
    shape = request_shape(request)
    speed = lookup_model(plan.gpu_model).relative_tpc_speed
    cost_tpc_s = request_cost_tpc_s(plan, profile_set, shape)
    demand = profile_set.demand_matrix_tpcs()
    row_of_model = {name: row for row, name in enumerate(profile_set.model_names)}
    tpcs: dict[str, np.ndarray] = {}
    by_gpu: dict[int, list] = {}
    for p in plan.placements:
        by_gpu.setdefault(p.gpu_index, []).append(p)
    for items in by_gpu.values():
        planned = np.array([demand[row_of_model[p.model]] / p.replicas for p in items])   # [items, slots]
        if policy == "demand_quota":
            split = [split_gpu_tpcs(planned[:, slot], plan.gpu_tpcs) for slot in range(slots)]
        else:
            rates = planned / np.array([cost_tpc_s[p.item] for p in items])[:, None]
            slo_ms = np.array([profile_set.models[p.model].slo_ms for p in items])
            split = [_slo_aware_split(rates[:, slot], slo_ms, shape, speed, plan.gpu_tpcs) for slot in range(slots)]
        split = np.column_stack(split)
        for row, p in enumerate(items):
            tpcs[p.item] = split[row]
    return tpcs


def simulate_plan_day(plan: Plan, profile_set: ProfileSet, observed_demand_tpcs: np.ndarray,
                      policy: str = "slo_quota", request: str = DEFAULT_REQUEST,
                      window_s: float = DEFAULT_WINDOW_S, seed: int = 0) -> DayOutcome:
    """Run every GPU of `plan` through every slot for `window_s` simulated seconds.

    observed_demand_tpcs: [models, slots] in `profile_set.model_names` order (e.g. `noisy_day`).
    """
    _check_plan_matches(plan, profile_set)
    if not (isinstance(window_s, (int, float)) and 0 < window_s <= 3600):
        raise ProfileError(f"window_s (simulated seconds per slot) must be in (0, 3600]; got {window_s!r}")
    slots = profile_set.slots_per_day
    if np.shape(observed_demand_tpcs) != (len(profile_set.models), slots):
        raise ProfileError(f"observed demand must be [models, slots] = {(len(profile_set.models), slots)}; "
                           f"got {np.shape(observed_demand_tpcs)}")
    shape = request_shape(request)
    gpu_model = lookup_model(plan.gpu_model)
    tpcs_of_item = slot_tpcs_by_item(plan, profile_set, policy, request)
    cost_tpc_s = request_cost_tpc_s(plan, profile_set, shape)
    row_of_model = {name: row for row, name in enumerate(profile_set.model_names)}
    slo_ms = {name: spec.slo_ms for name, spec in profile_set.models.items()}
    by_gpu: dict[int, list] = {}
    for p in plan.placements:
        by_gpu.setdefault(p.gpu_index, []).append(p)

    requests = dict.fromkeys(profile_set.models, 0)
    within = dict.fromkeys(profile_set.models, 0)
    unfinished = dict.fromkeys(profile_set.models, 0)
    requests_by_slot = np.zeros(slots, dtype=np.int64)
    within_by_slot = np.zeros(slots, dtype=np.int64)
    started_s = time.perf_counter()
    for slot in range(slots):
        run_seed = int(seed) * MINUTES_PER_DAY + slot      # same arrivals for a replica in every plan
        for items in by_gpu.values():
            gpu = SimulatedGpu(gpu_model)
            first_tpc, clients = 0, 0
            for p in items:
                tpcs = int(tpcs_of_item[p.item][slot])
                rate_per_s = observed_demand_tpcs[row_of_model[p.model], slot] / p.replicas / cost_tpc_s[p.item]
                if rate_per_s > 0:
                    gpu.add_client(p.item, range(first_tpc, first_tpc + tpcs), OpenLoop(shape, float(rate_per_s)))
                    clients += 1
                first_tpc += tpcs
            if not clients:
                continue
            result = gpu.run(window_s, seed=run_seed)
            for p in items:
                client = result.clients.get(p.item)
                if client is None:
                    continue
                met = int(np.count_nonzero(client.latencies_ms <= slo_ms[p.model]))
                requests[p.model] += client.arrived
                within[p.model] += met
                unfinished[p.model] += client.arrived - client.completed
                requests_by_slot[slot] += client.arrived
                within_by_slot[slot] += met
    elapsed_s = max(time.perf_counter() - started_s, 1e-9)
    return DayOutcome(requests, within, unfinished, requests_by_slot, within_by_slot,
                      len(by_gpu), float(requests_by_slot.sum() / elapsed_s))


def peak_packing_plan(plan: Plan, profile_set: ProfileSet) -> Plan:
    """The same replicas packed by their peaks (every replica reserves its peak all day)."""
    problem = build_problem(profile_set, plan.gpu_model, plan.headroom_fraction, plan.max_replica_share)
    bounds = LowerBounds(plan.fluid_lower_bound, plan.large_item_lower_bound,
                         plan.conflict_clique_lower_bound, plan.lower_bound_gpus)
    return make_plan(problem, profile_set, peak_packing(problem).compact_assignment(),
                     "peak packing (best-fit decreasing on peaks)", False, time.perf_counter(), bounds)


def _attainment(within: int, requests: int) -> float | None:
    return round(within / requests, 5) if requests else None


def _variant_summary(label: str, plan_name: str, policy: str, outcome: DayOutcome,
                     profile_set: ProfileSet) -> dict:
    per_model = {name: {"slo_ms": profile_set.models[name].slo_ms, "requests": outcome.requests_by_model[name],
                        "within_slo": outcome.within_slo_by_model[name],
                        "unfinished_at_window_end": outcome.unfinished_by_model[name],
                        "slo_attainment": _attainment(outcome.within_slo_by_model[name],
                                                      outcome.requests_by_model[name])}
                 for name in profile_set.model_names}
    model_attainments = np.array([m["slo_attainment"] for m in per_model.values()
                                  if m["slo_attainment"] is not None])
    total = int(sum(outcome.requests_by_model.values()))
    return {
        "variant": label, "plan": plan_name, "tpc_policy": policy, "gpus_used": outcome.gpus_used,
        "requests": total, "within_slo": int(sum(outcome.within_slo_by_model.values())),
        "unfinished_at_window_end": int(sum(outcome.unfinished_by_model.values())),
        "slo_attainment": _attainment(int(sum(outcome.within_slo_by_model.values())), total),
        "models_meeting_goal_share": round(float((model_attainments >= ATTAINMENT_GOAL).mean()), 5)
        if model_attainments.size else None,
        "worst_model_attainment": round(float(model_attainments.min()), 5) if model_attainments.size else None,
        "p10_model_attainment": round(float(np.percentile(model_attainments, 10)), 5)
        if model_attainments.size else None,
        "per_slot_slo_attainment": [_attainment(int(w), int(r)) for w, r in
                                    zip(outcome.within_slo_by_slot, outcome.requests_by_slot)],
        "per_slot_requests": [int(r) for r in outcome.requests_by_slot],
        "simulated_requests_per_wall_s": round(outcome.simulated_requests_per_s),
        "per_model": per_model,
    }


def compare_simulated_day(profile_set: ProfileSet, plan: Plan, seed: int = 0,
                          window_s: float = DEFAULT_WINDOW_S, request: str = DEFAULT_REQUEST,
                          slot_sigma: float = DEFAULT_SLOT_SIGMA, day_sigma: float = DEFAULT_DAY_SIGMA,
                          policies: tuple[str, ...] = TPC_POLICIES) -> dict:
    """SLO attainment of `plan` and of peak packing on one noisy simulated day, per TPC policy.

    The day's noise is drawn from `seed`; both plans see the same traffic and the same arrivals.
    """
    _check_plan_matches(plan, profile_set)
    if not (0 <= slot_sigma <= 2 and 0 <= day_sigma <= 2):
        raise ProfileError(f"noise sigmas must be in [0, 2]; got slot {slot_sigma}, day {day_sigma}")
    for policy in policies:
        if policy not in TPC_POLICIES:
            raise ProfileError(f"unknown TPC policy {policy!r}; allowed: {', '.join(TPC_POLICIES)}")
    shape = request_shape(request)
    started_s = time.perf_counter()
    observed = noisy_day(profile_set, np.random.default_rng(seed), slot_sigma, day_sigma)
    baseline = peak_packing_plan(plan, profile_set)
    variants = []
    for plan_name, candidate in (("plan", plan), ("peak packing", baseline)):
        for policy in policies:
            outcome = simulate_plan_day(candidate, profile_set, observed, policy, request, window_s, seed)
            variants.append(_variant_summary(f"{plan_name}, {policy}", plan_name, policy, outcome, profile_set))
    speed = lookup_model(plan.gpu_model).relative_tpc_speed
    costs = request_cost_tpc_s(plan, profile_set, shape)
    slot_minutes = MINUTES_PER_DAY // profile_set.slots_per_day
    alone_ms = {p.model: shape.latency_ms(max(1.0, p.peak_tpcs), speed) for p in plan.placements}
    return {
        "simulated": True,
        "label": SIMULATED_LABEL,
        "profile_source": profile_set.source,
        "models": len(profile_set.models),
        "replicas": len(plan.placements),
        "slots_per_day": profile_set.slots_per_day,
        "gpu_model": plan.gpu_model,
        "gpu_tpcs": plan.gpu_tpcs,
        "headroom_fraction": plan.headroom_fraction,
        "plan_gpus": plan.gpus_used,
        "peak_packing_gpus": baseline.gpus_used,
        "lower_bound_gpus": plan.lower_bound_gpus,
        "settings": {"seed": seed, "window_s": window_s, "request_shape": request,
                     "slot_noise_sigma": slot_sigma, "day_noise_sigma": day_sigma,
                     "tpc_policies": list(policies), "attainment_goal": ATTAINMENT_GOAL},
        "time_compression": f"each {slot_minutes}-minute slot is simulated for {window_s:g} s from empty "
                            f"queues at the slot's noisy rate ({profile_set.slots_per_day} windows = "
                            f"{profile_set.slots_per_day * window_s:g} simulated seconds per GPU per variant); "
                            "requests queued at a window's end count as misses",
        "assumptions": [
            f"every request is the calibrated '{request}' shape ({', '.join(k.name for k in shape.kernels)}); "
            "the simulated rate is the noisy TPC demand / TPC-seconds of one request on the replica's peak "
            f"TPCs (from {min(costs.values()):.4g} to {max(costs.values()):.4g} TPC-s per request), so the "
            "profile's request/s are replaced by requests of that size with the same TPC demand",
            "TPC policies (lithos does not emit per-slot quotas yet; the scheduler knows the profile, not "
            "the noise): slo_quota: each slot, a GPU's TPCs go one at a time to the replica with the worst "
            f"predicted M/D/1 mean latency / SLO at {SLO_QUOTA_LOAD_MARGIN}x the profile's rate; "
            "demand_quota: each slot, in proportion to the profile's demand; static: the plan's "
            "reserved_tpcs (in proportion to peaks) all day",
            f"noise: log-normal day factor (sigma {day_sigma}) x slot factor (sigma {slot_sigma}) on every "
            "model's demand (generators.noisy_day), Poisson arrivals within a window",
            "one stream per replica (FIFO single server); TPC ranges of a GPU's replicas are disjoint",
        ],
        "models_slower_than_slo_alone_at_peak": sum(1 for name, spec in profile_set.models.items()
                                                    if alone_ms[name] > spec.slo_ms),
        "simulator_limits": list(SIMULATOR_LIMITS),
        "simulator_limits_source": "docs/SIMULATOR.md, section Limits",
        "simulation_wall_s": round(time.perf_counter() - started_s, 3),
        "variants": variants,
    }
