"""What a co-location run does and how long it takes: workloads, mixes, systems, phases, time budget.

Pure code (no torch, no CUDA). The driver executes the plan; the CLI validates user input here.

A run starts worker processes in *groups* (one group per process environment: no MPS, MPS, MPS with
a thread percentage for best-effort workers, MPS plus the lithos shim per mix) and runs *phases* on
them. A phase is one measurement window: the workers of one mix (or one workload alone) run
together for `phase_s` seconds after `warmup_s` seconds whose requests are discarded.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

LATENCY_CRITICAL = "lc"
BEST_EFFORT = "be"

SYSTEMS = ("solo", "timeslice", "mps", "mps_pct", "static", "static_held", "static_lc_alone", "lithos",
           "lithos_loop", "lithos_lc_alone", "lithos_unroll")
ABLATIONS = ("static_held", "static_lc_alone", "lithos_loop", "lithos_lc_alone",
             "lithos_unroll")  # only when asked for; never a baseline
DEFAULT_SYSTEMS = tuple(s for s in SYSTEMS if s not in ABLATIONS)
SHIM_SYSTEMS = ("static", "static_held", "static_lc_alone", "lithos", "lithos_loop", "lithos_lc_alone",
                "lithos_unroll")  # a group per mix
LENDING_SYSTEMS = ("lithos", "lithos_loop", "lithos_lc_alone", "lithos_unroll")
LC_ALONE_SYSTEMS = ("static_lc_alone", "lithos_lc_alone")   # the best-effort job is started but stays idle
SYSTEM_HELP = {
    "solo": "each workload alone on the whole GPU (no MPS): the reference for SLOs and normalisation",
    "timeslice": "the mix's processes together without MPS (the driver time-slices them)",
    "mps": "the mix's processes as MPS clients, no limits",
    "mps_pct": "MPS with CUDA_MPS_ACTIVE_THREAD_PERCENTAGE on the best-effort process",
    "static": "MPS + lithos shim, each process on its quota of TPCs (green contexts), lending off",
    "static_held": "static, but the best-effort job's launches held as under lithos (a lender that adds no TPCs): "
                   "what held launches change without borrowing (an ablation, not a baseline; not in the default)",
    "static_lc_alone": "static with the best-effort job idle: the services on their quotas alone (an ablation: "
                       "what the quota size costs them, apart from the best-effort job's interference)",
    "lithos": "MPS + lithos shim, same quotas, lending on (idle TPCs lent on the launch path)",
    "lithos_loop": "lithos with the agent's lending control loop re-planning lend lists every 1 ms from the "
                   "activity words, so the best-effort job does not borrow what an active latency-critical service "
                   "may (lithos keeps the lists planned once per phase with every client idle)",
    "lithos_lc_alone": "lithos with the best-effort job idle: what borrowing its idle TPCs gives back to the services "
                       "(an ablation)",
    "lithos_unroll": "lithos with every borrower's CUDA-graph replays sent kernel by kernel (LITHOS_LEND_UNROLL_GRAPHS), "
                     "so that a graph service's kernels may borrow within the atom (an ablation: it made graph tails "
                     "worse at 88a6537, docs/SCHEDULER.md)",
}
VARIANTS = ("eager", "graph")

# SLO of a service = SLO_MULTIPLE x its solo p99 (median over solo trials), per execution variant.
SLO_MULTIPLE = 1.5

# Estimated costs on an H100 (estimates, not measurements; used only to fit phases into the budget).
ESTIMATE_PROBE_LAYOUT_S = 5.0      # co-scheduled group map, one non-MPS child process
ESTIMATE_GROUP_START_S = 25.0      # start one group of workers in parallel: import torch/transformers,
                                   # build models, warm up, capture graphs
ESTIMATE_MPS_START_STOP_S = 4.0
ESTIMATE_CALIBRATE_OVERHEAD_S = 0.5
CALIBRATE_S = 1.0                  # closed-loop service-time measurement per service and variant
PHASE_LEAD_S = 0.3                 # the driver sends the phase this far ahead of its start
PHASE_DRAIN_S = 0.3                # requests still queued this long after the window are 'unserved'
ESTIMATE_PHASE_GATHER_S = 0.3      # replies, ring reads, bookkeeping

MIN_PHASE_S = 2.0
MAX_PHASE_S = 120.0
MIN_BUDGET_S = 60.0
MAX_BUDGET_S = 3600.0


@dataclass(frozen=True)
class Workload:
    name: str          # resnet50, bert_base, resnet50_train, gpt2_small_train
    role: str          # "lc" (open-loop service) or "be" (closed-loop training)
    batch: int
    seq_len: int = 0   # tokens per sample for text models

    @property
    def key(self) -> str:
        """Identity of the process configuration (solo results are shared by mixes with equal keys)."""
        return f"{self.name}_b{self.batch}" + (f"_s{self.seq_len}" if self.seq_len else "")


@dataclass(frozen=True)
class Mix:
    name: str
    description: str
    services: tuple[str, ...]          # latency-critical workload names
    best_effort: str                   # best-effort workload name
    lc_quota_groups: tuple[int, ...]   # co-scheduled 4-TPC groups per service (static/lithos); BE gets the rest


MIXES = {
    "inference": Mix("inference", "inference stacking: ResNet-50 and BERT-base services + ResNet-50 training",
                     ("resnet50", "bert_base"), "resnet50_train", (6, 6)),
    "hybrid": Mix("hybrid", "hybrid: one BERT-base service + GPT-2 small training", ("bert_base",),
                  "gpt2_small_train", (12,)),
}


def workloads(resnet_batch: int = 8) -> dict[str, Workload]:
    return {
        "resnet50": Workload("resnet50", LATENCY_CRITICAL, resnet_batch),
        "bert_base": Workload("bert_base", LATENCY_CRITICAL, 1, 128),
        "resnet50_train": Workload("resnet50_train", BEST_EFFORT, 64),
        "gpt2_small_train": Workload("gpt2_small_train", BEST_EFFORT, 8, 512),
    }


@dataclass(frozen=True)
class Phase:
    system: str                 # one of SYSTEMS, or "calibrate"
    mix: str | None             # None for solo and calibration phases
    variant: str | None         # eager/graph for services; None for a best-effort solo phase
    trial: int
    active: tuple[str, ...]     # workload names running in this phase
    first: bool = False         # the group's first run of this system, mix, variant and workloads: longer warm-up

    @property
    def label(self) -> str:
        where = self.mix or "+".join(self.active)
        return f"{self.system}:{where}:{self.variant or 'train'}:t{self.trial}"


@dataclass(frozen=True)
class Group:
    environment: str            # "plain", "mps", "mps_pct", "shim"
    mix: str | None             # the mix of a shim group (quotas differ per mix)
    workers: tuple[str, ...]    # workload names started for this group
    restart_only: tuple[str, ...] = ()   # mps_pct: only these are restarted; the others keep running
    phases: tuple[Phase, ...] = ()


@dataclass
class Plan:
    mixes: tuple[str, ...]
    systems: tuple[str, ...]
    variants: tuple[str, ...]
    trials: int
    budget_s: float
    warmup_s: float
    load: float
    phase_s: float
    workloads: dict[str, Workload]
    lc_quota_groups: dict[str, tuple[int, ...]] = field(default_factory=dict)  # per mix, after --lc-groups
    first_warmup_s: float = 0.5   # warm-up of a phase marked first (new green contexts, lazy module loads)
    groups: list[Group] = field(default_factory=list)
    estimate: dict = field(default_factory=dict)

    @property
    def phases(self) -> list[Phase]:
        return [p for g in self.groups for p in g.phases]


def _split_choices(text, allowed, what: str) -> tuple[str, ...]:
    if isinstance(text, str):
        items = [t.strip() for t in text.split(",") if t.strip()]
    else:
        items = list(text)
    if not items:
        raise ValueError(f"{what}: give at least one of {', '.join(allowed)}")
    bad = [t for t in items if t not in allowed]
    if bad:
        raise ValueError(f"{what}: unknown {', '.join(map(repr, bad))}; allowed: {', '.join(allowed)}")
    return tuple(t for t in allowed if t in items)  # canonical order, no duplicates


def _check_range(value, what: str, low: float, high: float, integer: bool = False) -> float:
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type or not math.isfinite(value) or not low <= value <= high:
        kind = "an integer" if integer else "a number"
        raise ValueError(f"{what} must be {kind} in [{low:g}, {high:g}], got {value!r}")
    return value


def build_plan(mixes="inference,hybrid", systems=",".join(DEFAULT_SYSTEMS), variants="eager,graph", trials: int = 3,
               budget_s: float = 480.0, phase_s: float | None = None, warmup_s: float = 0.5, load: float = 0.3,
               resnet_batch: int = 8, lc_groups=(), first_warmup_s: float = 2.0) -> Plan:
    """Validate the choices and lay out groups and phases; raise ValueError saying what is allowed."""
    mix_names = _split_choices(mixes, tuple(MIXES), "--mixes")
    system_names = _split_choices(systems, SYSTEMS, "--systems")
    if "solo" not in system_names:
        raise ValueError("--systems must include solo: SLOs (a multiple of the solo p99) and the goodput "
                         "normalisation come from the solo runs")
    variant_names = _split_choices(variants, VARIANTS, "--variants")
    _check_range(trials, "--trials", 1, 20, integer=True)
    _check_range(budget_s, "--budget-s", MIN_BUDGET_S, MAX_BUDGET_S)
    _check_range(warmup_s, "--warmup-s", 0.0, 10.0)
    _check_range(first_warmup_s, "--first-warmup-s", 0.0, 30.0)
    if isinstance(load, bool) or not isinstance(load, (int, float)) or not 0.0 < load < 1.0:
        raise ValueError(f"--load must be a fraction of solo capacity in (0, 1), e.g. 0.3; got {load!r}")
    _check_range(resnet_batch, "--resnet-batch", 1, 8, integer=True)
    if phase_s is not None:
        _check_range(phase_s, "--phase-s", MIN_PHASE_S, MAX_PHASE_S)

    table = workloads(resnet_batch)
    plan = Plan(mix_names, system_names, variant_names, trials, float(budget_s), float(warmup_s), float(load),
                0.0, table, parse_lc_groups(lc_groups), max(float(first_warmup_s), float(warmup_s)))
    used = sorted({w for m in mix_names for w in (*MIXES[m].services, MIXES[m].best_effort)},
                  key=list(table).index)
    services = [w for w in used if table[w].role == LATENCY_CRITICAL]
    best_efforts = [w for w in used if table[w].role == BEST_EFFORT]

    plain = [Phase("calibrate", None, v, 0, (s,)) for s in services for v in variant_names]
    for trial in range(trials):
        plain += [Phase("solo", None, v, trial, (s,)) for s in services for v in variant_names]
        plain += [Phase("solo", None, None, trial, (b,)) for b in best_efforts]
        if "timeslice" in system_names:
            plain += [_mix_phase("timeslice", m, v, trial) for m in mix_names for v in variant_names]
    plan.groups.append(Group("plain", None, tuple(used), phases=tuple(plain)))

    shim_systems = [s for s in SHIM_SYSTEMS if s in system_names]
    for m in mix_names if shim_systems else ():
        phases = tuple(_mix_phase(s, m, v, t) for t in range(trials) for v in variant_names for s in shim_systems)
        plan.groups.append(Group("shim", m, (*MIXES[m].services, MIXES[m].best_effort), phases=phases))
    if "mps" in system_names:
        phases = tuple(_mix_phase("mps", m, v, t) for t in range(trials) for m in mix_names for v in variant_names)
        plan.groups.append(Group("mps", None, tuple(used), phases=phases))
    if "mps_pct" in system_names:
        phases = tuple(_mix_phase("mps_pct", m, v, t) for t in range(trials) for m in mix_names for v in variant_names)
        restart = tuple(best_efforts) if "mps" in system_names else ()
        plan.groups.append(Group("mps_pct", None, tuple(used), restart_only=restart, phases=phases))

    plan.groups = [_mark_first_phases(g) for g in plan.groups]
    plan.estimate = estimate_fixed_s(plan)
    phases_total = len([p for p in plan.phases if p.system != "calibrate"])
    per_phase_overhead_s = PHASE_LEAD_S + warmup_s + PHASE_DRAIN_S + ESTIMATE_PHASE_GATHER_S
    if phase_s is None:
        room_s = budget_s - plan.estimate["fixed_s"]
        phase_s = room_s / phases_total - per_phase_overhead_s
        if phase_s < MIN_PHASE_S:
            need_s = plan.estimate["fixed_s"] + phases_total * (MIN_PHASE_S + per_phase_overhead_s)
            raise ValueError(
                f"{phases_total} phases do not fit in --budget-s {budget_s:g}: with {plan.estimate['fixed_s']:.0f} s "
                f"of estimated fixed cost each phase would get {max(phase_s, 0):.1f} s (at least {MIN_PHASE_S:g} s "
                f"needed, {need_s:.0f} s budget). Give fewer --trials, --systems, --variants or --mixes, or a "
                f"larger --budget-s")
        phase_s = min(phase_s, MAX_PHASE_S)
    plan.phase_s = float(phase_s)
    plan.estimate.update({
        "phases": phases_total, "phase_s": round(plan.phase_s, 2),
        "per_phase_overhead_s": round(per_phase_overhead_s, 2),
        "phases_s": round(phases_total * (plan.phase_s + per_phase_overhead_s), 1),
    })
    plan.estimate["total_s"] = round(plan.estimate["fixed_s"] + plan.estimate["phases_s"], 1)
    if plan.estimate["total_s"] > budget_s + 1e-6:
        raise ValueError(f"--phase-s {phase_s:g} makes the run about {plan.estimate['total_s']:.0f} s, over "
                         f"--budget-s {budget_s:g}; lower --phase-s or raise --budget-s")
    return plan


def _mark_first_phases(group: Group) -> Group:
    """The first phase of each system, mix, variant and workload set in a group warms up longer: its
    processes meet that combination for the first time (likely: new green contexts, lazy module
    loading, a predictor with no samples); first trials showed tails many times the next one's."""
    seen, phases = set(), []
    for p in group.phases:
        key = (p.system, p.mix, p.variant, p.active)
        phases.append(dataclasses.replace(p, first=p.system != "calibrate" and key not in seen))
        seen.add(key)
    return dataclasses.replace(group, phases=tuple(phases))


def _mix_phase(system: str, mix: str, variant: str, trial: int) -> Phase:
    m = MIXES[mix]
    be = () if system in LC_ALONE_SYSTEMS else (m.best_effort,)
    return Phase(system, mix, variant, trial, (*m.services, *be))


def estimate_fixed_s(plan: Plan) -> dict:
    """Estimated seconds outside measurement windows, by part (H100 estimates, see the constants)."""
    starts = len(plan.groups)
    uses_mps = any(g.environment != "plain" for g in plan.groups)
    calibrations = [p for p in plan.phases if p.system == "calibrate"]
    parts = {
        "probe_layout_s": ESTIMATE_PROBE_LAYOUT_S if any(g.environment == "shim" for g in plan.groups) else 0.0,
        "worker_group_starts_s": starts * ESTIMATE_GROUP_START_S,
        "mps_start_stop_s": ESTIMATE_MPS_START_STOP_S if uses_mps else 0.0,
        "calibration_s": len(calibrations) * (CALIBRATE_S + ESTIMATE_CALIBRATE_OVERHEAD_S),
        "first_warmups_s": sum(p.first for p in plan.phases) * (plan.first_warmup_s - plan.warmup_s),
    }
    parts["fixed_s"] = round(sum(parts.values()), 1)
    parts["worker_groups"] = starts
    return parts


def describe(plan: Plan) -> str:
    """Human-readable plan with the time estimate of each part."""
    e = plan.estimate
    lines = [f"co-location plan: mixes {', '.join(plan.mixes)}; systems {', '.join(plan.systems)}; "
             f"variants {', '.join(plan.variants)}; {plan.trials} trial(s); load {plan.load:g} of solo capacity; "
             f"SLO = {SLO_MULTIPLE:g} x solo p99",
             f"estimated {e['total_s']:.0f} s of {plan.budget_s:.0f} s budget (H100 estimates): "
             f"{e['worker_groups']} worker group starts {e['worker_group_starts_s']:.0f} s, probe {e['probe_layout_s']:.0f} s, "
             f"MPS {e['mps_start_stop_s']:.0f} s, calibration {e['calibration_s']:.1f} s, first-phase warm-ups {e['first_warmups_s']:.0f} s, "
             f"{e['phases']} phases x ({e['phase_s']:.2f} s measured + {e['per_phase_overhead_s']:.2f} s warm-up/lead/drain) "
             f"= {e['phases_s']:.0f} s",
             "service quotas (static/lithos, 4-TPC groups; the best-effort job gets the rest): "
             + ", ".join(f"{m}={','.join(map(str, plan.lc_quota_groups[m]))}" for m in plan.mixes)]
    for g in plan.groups:
        per_system: dict[str, int] = {}
        for p in g.phases:
            per_system[p.system] = per_system.get(p.system, 0) + 1
        lines.append(f"  group {g.environment}{':' + g.mix if g.mix else ''}: workers {', '.join(g.workers)}"
                     + (f" (restart {', '.join(g.restart_only)})" if g.restart_only else "")
                     + "; phases " + ", ".join(f"{s} x{n}" for s, n in per_system.items()))
    return "\n".join(lines)


NOMINAL_H100_SLICES = [tuple(range(4 * i, 4 * i + 4)) for i in range(15)] + [(t,) for t in range(60, 66)]


def parse_lc_groups(items) -> dict[str, tuple[int, ...]]:
    """Every mix's service quotas in 4-TPC groups: MIXES' defaults, replaced by items "MIX=N[,N...]"
    (one N per service, in the mix's service order); ValueError saying what is allowed."""
    groups = {name: mix.lc_quota_groups for name, mix in MIXES.items()}
    for item in items or ():
        name, _, counts = str(item).partition("=")
        mix = MIXES.get(name.strip())
        if mix is None:
            raise ValueError(f"--lc-groups {item!r}: give MIX=N[,N...] with MIX one of {', '.join(MIXES)}")
        try:
            numbers = tuple(int(n) for n in counts.split(","))
        except ValueError:
            numbers = ()
        if len(numbers) != len(mix.services):
            raise ValueError(f"--lc-groups {item!r}: {name} has {len(mix.services)} service(s) "
                             f"({', '.join(mix.services)}); give one group count each, e.g. "
                             f"{name}={','.join(map(str, mix.lc_quota_groups))}")
        assign_quotas(NOMINAL_H100_SLICES, numbers)  # same checks as on the GPU: >= 1 each, BE keeps a group
        groups[mix.name] = numbers
    return groups


def assign_quotas(slices: list[tuple[int, ...]], lc_quota_groups: tuple[int, ...]) -> list[tuple[int, ...]]:
    """TPC quotas of one mix: service i gets lc_quota_groups[i] whole co-scheduled groups (4-TPC slices,
    in order); the best-effort job gets every remaining slice (groups and loose TPCs). Returns one
    sorted tuple per service, then the best-effort one."""
    groups = [s for s in slices if len(s) == 4]
    needed = sum(lc_quota_groups)
    if any(n < 1 for n in lc_quota_groups):
        raise ValueError(f"every service needs at least one 4-TPC group, got {lc_quota_groups}")
    if needed >= len(groups):
        raise ValueError(f"the services want {needed} co-scheduled groups but the GPU has {len(groups)}; "
                         "the best-effort job needs at least one")
    quotas, taken = [], 0
    for n in lc_quota_groups:
        quotas.append(tuple(sorted(t for s in groups[taken:taken + n] for t in s)))
        taken += n
    used = set(groups[:taken])
    quotas.append(tuple(sorted(t for s in slices if s not in used for t in s)))
    return quotas


def mps_be_percent(be_quota_tpcs: int, total_tpcs: int) -> int:
    """Default CUDA_MPS_ACTIVE_THREAD_PERCENTAGE for the best-effort job: its static quota's share."""
    return max(1, min(100, round(100 * be_quota_tpcs / total_tpcs)))

