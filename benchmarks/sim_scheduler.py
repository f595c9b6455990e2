"""SIMULATED comparison of static partitions, full sharing (MPS-like) and lithos lending on one H100.

Every number this writes comes from the discrete-event model (scheduler/simulated.py and
scheduler/sim_lending.py), not from a GPU, and is labelled SIMULATED in the JSON and on the plot.

    /tmp/venv/bin/python benchmarks/sim_scheduler.py [--seconds 20] [--trials 3] [--out benchmarks/results]

Also a launch-ahead scenario: a training client whose CPU queues kernels far ahead, under the old
launch rule, the queue term, and the queue term with pacing (report["launch_ahead"]).

Writes <out>/sim_scheduler.json and <out>/sim_scheduler.png.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np

from lithos_ray.scheduler.calibration import bert_base_b1, matmul_train_step
from lithos_ray.scheduler.gpu_models import lookup_model
from lithos_ray.scheduler.lending import BEST_EFFORT, LATENCY_CRITICAL, LendingPolicy
from lithos_ray.scheduler.sim_lending import LendingGpu, split_kernels
from lithos_ray.scheduler.simulated import ClosedLoop, OpenLoop, SimulatedGpu

LABEL = "SIMULATED (discrete-event model of an H100, not GPU measurements)"
SLO_MULTIPLE_OF_SOLO_P99 = 1.5
BERT_KERNELS = 48           # ASSUMPTION: a BERT-base forward pass as 48 equal kernels (12 layers x 4)
MATMUL_PIECES = 8           # ASSUMPTION: each 8192^3 matmul issued as 8 row-block GEMMs (1024 x 8192 x 8192)
DEEP_MATMUL_PIECES = 16     # ASSUMPTION: launch-ahead scenario, 16 row blocks per matmul (about 100 us kernels)
LAUNCH_AHEAD = 32           # kernels the training client's CPU keeps queued beyond the running one
LAUNCH_AHEAD_SYSTEMS = {    # system: LendingGpu switches (None: static partitions)
    "static_partitions": None,
    "lithos_old_rule": {"queue_term": False, "pacing": False},
    "lithos_queue_term": {"queue_term": True, "pacing": False},
    "lithos_queue_term_paced": {"queue_term": True, "pacing": True},
    "lithos_queue_term_paced_always": {"queue_term": True, "pacing": "always"},
}
MODEL_LIMITS = [
    "From docs/SIMULATOR.md 'Limits': interference between unpartitioned clients is far too mild "
    "(measured on the H100: BERT p50 3.7 ms -> 12.5 ms next to a matmul loop; the model predicts 3.78 ms), "
    "so the full-sharing (MPS-like) baseline is flattered; do not quote simulated MPS-vs-lithos ratios.",
    "Disjoint partitions are perfectly independent: no shared memory bandwidth, L2 or power limit.",
    "Service times are deterministic; no launch jitter, no CPU-side time separate from GPU time "
    "(BERT's eager launch time is booked as GPU time b, which more TPCs do not shorten).",
    "Stream priorities are not modelled: best-effort kernels on borrowed TPCs share them equally "
    "with the owner's kernels until they end (no block-level scheduling, no preemption).",
    "Kernel shapes are assumptions: the calibrated BERT forward pass and matmul step are split into "
    "equal kernels with the same total latency at every TPC count; real kernels are unequal.",
    "Green-context constraints (cluster kernels need whole 8-SM groups), the shim's launch overhead "
    "(+2.1 us per launch measured) and green-context creation on the launch path are not modelled.",
    "Launch-ahead scenario: the CPU issues in zero time (no Python or launch cost), so a queue refills "
    "instantly and a paced CPU issues exactly when its estimate fits; the shim's union build delay "
    "and its sampled predictor (every 64th launch) are not modelled.",
]


@dataclass(frozen=True)
class Client:
    name: str
    priority: str
    quota_tpc_ids: tuple[int, ...]
    rate_per_s: float | None        # None: closed loop (training)
    work: object                    # KernelSequence
    launch_ahead: int = 0           # kernels its CPU queues beyond the running one (lithos systems)

    def workload(self):
        return ClosedLoop(self.work) if self.rate_per_s is None else OpenLoop(self.work, self.rate_per_s)


def workloads() -> dict[str, dict]:
    bert = split_kernels(bert_base_b1(), BERT_KERNELS, "bert_base_b1_like")
    train = split_kernels(matmul_train_step(), MATMUL_PIECES, "matmul_train_step_like")
    return {
        "inference_stacking": {
            "what": "two latency-critical BERT-base-like services (open-loop Poisson) + best-effort training "
                    "(a ResNet-50 service is not calibrated, so both services are BERT-like at different rates)",
            "clients": [Client("bert_a", LATENCY_CRITICAL, tuple(range(0, 8)), 100.0, bert),
                        Client("bert_b", LATENCY_CRITICAL, tuple(range(8, 16)), 60.0, bert),
                        Client("train", BEST_EFFORT, tuple(range(16, 66)), None, train)]},
        "hybrid": {
            "what": "one latency-critical BERT-base-like service + best-effort training",
            "clients": [Client("bert", LATENCY_CRITICAL, tuple(range(0, 16)), 100.0, bert),
                        Client("train", BEST_EFFORT, tuple(range(16, 66)), None, train)]},
        "hybrid_unsplit_matmuls": {
            "what": "hybrid with the training step's four 8192^3 matmuls as calibrated (1.7 ms kernels on 50 "
                    "TPCs): no kernel fits the 250 us atom budget, so lithos lends nothing (there is no atomizer)",
            "clients": [Client("bert", LATENCY_CRITICAL, tuple(range(0, 16)), 100.0, bert),
                        Client("train", BEST_EFFORT, tuple(range(16, 66)), None, matmul_train_step())]},
    }


def launch_ahead_workload() -> dict:
    bert = split_kernels(bert_base_b1(), BERT_KERNELS, "bert_base_b1_like")
    train = split_kernels(matmul_train_step(), DEEP_MATMUL_PIECES, "matmul_train_step_like_100us")
    return {
        "what": f"hybrid with the training client queueing {LAUNCH_AHEAD} kernels (about 100 us each) ahead of "
                "the running one: old launch rule (no queue term) vs queue term vs queue term + pacing (while a lender is "
                "idle, and always)",
        "clients": [Client("bert", LATENCY_CRITICAL, tuple(range(0, 16)), 100.0, bert),
                    Client("train", BEST_EFFORT, tuple(range(16, 66)), None, train, LAUNCH_AHEAD)]}


def run_system(system: str, clients: list[Client], seconds: float, seed: int, model):
    """One trial of one system; returns per-client latency arrays/throughputs and lithos extras."""
    if system.startswith("lithos"):
        gpu = LendingGpu(model, LendingPolicy(), **(LAUNCH_AHEAD_SYSTEMS.get(system) or {}))
        for c in clients:
            gpu.add_client(c.name, c.priority, c.quota_tpc_ids, c.workload(), launch_ahead=c.launch_ahead)
        result = gpu.run(seconds, seed)
        return result.clients, result
    gpu = SimulatedGpu(model)
    for c in clients:
        tpc_ids = range(model.tpcs) if system == "full_sharing_mps_like" else c.quota_tpc_ids
        gpu.add_client(c.name, tpc_ids, c.workload())
    return gpu.run(seconds, seed).clients, None


def solo(clients: list[Client], seconds: float, seeds: list[int], model) -> dict[str, dict]:
    """Each client alone on the whole GPU: its p99 (for the SLO) and throughput (for normalising)."""
    out = {}
    for c in clients:
        runs = []
        for seed in seeds:
            gpu = SimulatedGpu(model)
            gpu.add_client(c.name, range(model.tpcs), c.workload())
            runs.append(gpu.run(seconds, seed).clients[c.name])
        entry = {"throughput_per_s": float(np.median([r.throughput_per_s for r in runs]))}
        if c.rate_per_s is not None:
            entry["p99_ms"] = float(np.median([np.percentile(r.latencies_ms, 99) for r in runs]))
            entry["slo_ms"] = SLO_MULTIPLE_OF_SOLO_P99 * entry["p99_ms"]
            entry["within_slo_per_s"] = float(np.median(
                [np.count_nonzero(r.latencies_ms <= entry["slo_ms"]) / seconds for r in runs]))
        out[c.name] = entry
    return out


def spread(values: list[float]) -> dict:
    return {"median": float(np.median(values)), "min": float(np.min(values)), "max": float(np.max(values))}


def summarise(system: str, clients: list[Client], trials: list, solo_ref: dict, seconds: float) -> dict:
    per_client = {}
    goodputs = []
    for t, (results, _) in enumerate(trials):
        goodput = 0.0
        for c in clients:
            r = results[c.name]
            if c.rate_per_s is None:
                goodput += r.throughput_per_s / solo_ref[c.name]["throughput_per_s"]
            else:
                within = np.count_nonzero(r.latencies_ms <= solo_ref[c.name]["slo_ms"]) / seconds
                goodput += within / solo_ref[c.name]["within_slo_per_s"]
        goodputs.append(goodput)
    for c in clients:
        rows = [results[c.name] for results, _ in trials]
        entry = {"priority": c.priority, "quota_tpcs": len(c.quota_tpc_ids)}
        if c.rate_per_s is None:
            entry["throughput_per_s"] = spread([r.throughput_per_s for r in rows])
            entry["throughput_vs_solo"] = spread([r.throughput_per_s / solo_ref[c.name]["throughput_per_s"]
                                                  for r in rows])
        else:
            entry["rate_per_s"] = c.rate_per_s
            for q in (50, 95, 99):
                entry[f"p{q}_ms"] = spread([float(np.percentile(r.latencies_ms, q)) for r in rows])
            entry["p99_vs_solo"] = spread([float(np.percentile(r.latencies_ms, 99)) / solo_ref[c.name]["p99_ms"]
                                           for r in rows])
            entry["slo_attainment"] = spread([float(np.mean(r.latencies_ms <= solo_ref[c.name]["slo_ms"]))
                                              for r in rows])
        if system.startswith("lithos"):
            entry["tpcs_lent_mean"] = spread([r.lent_tpc_s / seconds for r in rows])
            entry["tpcs_borrowed_mean"] = spread([r.borrowed_tpc_s / seconds for r in rows])
            reclaims = np.concatenate([r.reclaim_ms for r in rows])
            entry["reclaims_contended"] = int(reclaims.size)
            entry["reclaims_uncontended"] = int(sum(r.reclaims_uncontended for r in rows))
            if reclaims.size:
                entry["reclaim_p99_ms"] = float(np.percentile(reclaims, 99))
                entry["reclaim_max_ms"] = float(reclaims.max())
            entry["quota_violations"] = int(sum(r.quota_violations for r in rows))
            if c.launch_ahead:
                entry["launch_ahead"] = c.launch_ahead
                entry["borrowed_tpc_s"] = spread([r.borrowed_tpc_s for r in rows])
                entry["launches_borrowing"] = spread([r.launches_borrowing for r in rows])
                entry["launches_paced"] = spread([r.launches_paced for r in rows])
            accuracies = [r.predictor for r in rows if r.predictor is not None]
            if accuracies:
                entry["predictor_share_off_by_more_than_50us"] = spread(
                    [a.share_off_by_more_than_threshold for a in accuracies])
                entry["predictor_error_p99_us"] = spread([a.error_p99_us for a in accuracies])
        per_client[c.name] = entry
    summary = {"clients": per_client, "goodput_normalised": spread(goodputs)}
    if system.startswith("lithos"):
        summary["quota_violations"] = int(sum(result.quota_violations for _, result in trials))
        all_reclaims = np.concatenate([result.reclaim_ms_all() for _, result in trials])
        summary["reclaim_p99_ms"] = float(np.percentile(all_reclaims, 99)) if all_reclaims.size else None
    return summary


def plot(report: dict, timeline: dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["workloads"])
    systems = report["systems"]
    colors = {"static_partitions": "#888888", "full_sharing_mps_like": "#d98c3a", "lithos": "#2a6fb0"}
    fig, axes = plt.subplots(2, len(names) + 2, figsize=(5 * (len(names) + 2), 8))
    for col, name in enumerate(names):
        results = report["workloads"][name]["results"]
        clients = report["workloads"][name]["clients"]
        lc = [c for c in clients if c["rate_per_s"] is not None]
        be = [c for c in clients if c["rate_per_s"] is None]
        ax = axes[0, col]
        width = 0.8 / len(systems)
        for s, system in enumerate(systems):
            values = [results[system]["clients"][c["name"]]["p99_ms"]["median"] for c in lc]
            ax.bar(np.arange(len(lc)) + s * width, values, width, label=system, color=colors[system])
        solo = [report["workloads"][name]["solo"][c["name"]]["p99_ms"] for c in lc]
        ax.scatter(np.arange(len(lc)) + 0.4 - width / 2, solo, color="k", marker="_", s=400, label="solo (whole GPU)",
                   zorder=3)
        ax.set_xticks(np.arange(len(lc)) + 0.4 - width / 2, [c["name"] for c in lc])
        ax.set_ylabel("latency-critical p99 (ms), SIMULATED")
        ax.set_title(f"{name}\nSIMULATED", fontsize=10)
        if col == 0:
            ax.legend(fontsize=7)
        ax = axes[1, col]
        for s, system in enumerate(systems):
            values = [results[system]["clients"][c["name"]]["throughput_vs_solo"]["median"] for c in be]
            values.append(results[system]["goodput_normalised"]["median"] / len(clients))
            ax.bar(np.arange(len(be) + 1) + s * width, values, width, color=colors[system])
        ax.set_xticks(np.arange(len(be) + 1) + 0.4 - width / 2,
                      [f"{c['name']} throughput" for c in be] + ["goodput / clients"])
        ax.set_ylabel("fraction of solo, SIMULATED")
        ax.set_ylim(0, 1.1)
    plot_launch_ahead(report["launch_ahead"], axes[0, len(names)], axes[1, len(names)])
    ax = axes[0, -1]
    t_ms = np.arange(timeline["values"].size) * timeline["bin_ms"]
    ax.plot(t_ms, timeline["values"], color=colors["lithos"], lw=0.8)
    ax.set_xlabel("simulated time (ms)")
    ax.set_ylabel("TPCs lent (bin mean)")
    ax.set_title(f"TPCs lent over time, {timeline['workload']} (lithos)\nSIMULATED", fontsize=10)
    ax = axes[1, -1]
    ax.axis("off")
    ax.text(0, 1, "SIMULATED: discrete-event model, not GPU measurements.\n"
            "Model limits (docs/SIMULATOR.md): MPS-like sharing is\nflattered (interference far too mild); "
            "partitions are\nperfectly independent; deterministic service times;\nstream priorities "
            "not modelled; kernel shapes assumed.\n\n"
            f"SLO = {SLO_MULTIPLE_OF_SOLO_P99} x solo p99 (whole GPU).\n"
            "goodput = sum over clients of within-SLO req/s (LC)\nor throughput (BE), each / its solo value.",
            va="top", fontsize=9, family="monospace")
    fig.suptitle(f"lithos TPC lending vs static partitions vs full sharing - {LABEL}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def plot_launch_ahead(section: dict, top, bottom) -> None:
    """Reclaim p99 (with violations) and training throughput / borrowed TPCs per launch-rule variant."""
    results = section["results"]
    lending = [s for s in section["systems"] if s.startswith("lithos")]
    labels = [s.replace("lithos_", "").replace("_", "\n") for s in lending]
    reclaim = [results[s]["reclaim_p99_ms"] or 0.0 for s in lending]
    bars = top.bar(range(len(lending)), reclaim, color="#2a6fb0")
    for bar, s in zip(bars, lending):
        top.text(bar.get_x() + bar.get_width() / 2, bar.get_height(), f"{reclaim[lending.index(s)]:.2f} ms\n{results[s]['quota_violations']} viol.",
                 ha="center", va="bottom", fontsize=8)
    top.axhline(section["atom_us"] / 1000, color="k", ls="--", lw=0.8, label="atom budget")
    top.set_xticks(range(len(lending)), labels, fontsize=8)
    top.set_ylabel("reclaim p99 (ms), SIMULATED")
    top.set_title(f"launch-ahead {section['launch_ahead']} kernels: reclaims\nSIMULATED", fontsize=10)
    top.legend(fontsize=7)
    systems = section["systems"]
    train = [results[s]["clients"]["train"] for s in systems]
    bars = bottom.bar(range(len(systems)), [t["throughput_vs_solo"]["median"] for t in train],
                      color=["#888888"] + ["#2a6fb0"] * (len(systems) - 1))
    for bar, t in zip(bars, train):
        borrowed = t.get("tpcs_borrowed_mean", {"median": 0.0})["median"]
        bottom.text(bar.get_x() + bar.get_width() / 2, bar.get_height(), f"{borrowed:.1f} TPCs\nborrowed",
                    ha="center", va="bottom", fontsize=7)
    bottom.set_xticks(range(len(systems)), [s.replace("lithos_", "").replace("_", "\n") for s in systems], fontsize=8)
    bottom.set_ylabel("train throughput / solo, SIMULATED")
    bottom.set_ylim(0, 1.1)


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="simulated seconds per trial (default 20)")
    parser.add_argument("--trials", type=int, default=3, help="trials (seeds 1..N) per system (default 3)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = parser.parse_args(argv)
    if not args.seconds > 0 or args.trials < 1:
        parser.error("--seconds must be > 0 and --trials >= 1")
    model = lookup_model("H100")
    seeds = list(range(1, args.trials + 1))
    systems = ["static_partitions", "full_sharing_mps_like", "lithos"]
    wall_start = time.time()
    report = {
        "benchmark": "sim_scheduler", "label": LABEL, "simulated": True,
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "git_commit": git_commit(),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
                    "python": platform.python_version(), "gpu": "none: H100 simulated (scheduler/simulated.py)"},
        "settings": {"simulated_seconds_per_trial": args.seconds, "trials": args.trials, "seeds": seeds,
                     "gpu_model": model.name, "policy": asdict(LendingPolicy()),
                     "slo": f"{SLO_MULTIPLE_OF_SOLO_P99} x the service's p99 alone on the whole GPU (same rate)",
                     "goodput": "sum over clients of (within-SLO requests/s or best-effort steps/s) / its solo value",
                     "bert_kernels_per_request": BERT_KERNELS, "matmul_pieces": MATMUL_PIECES,
                     "spread": "median, min and max over trials"},
        "model_limits": MODEL_LIMITS,
        "systems": systems,
        "workloads": {},
    }
    timeline = None
    def run_systems(names, clients):
        """(solo reference, summaries, trials) of every system on one set of clients."""
        solo_ref = solo(clients, args.seconds, seeds, model)
        trials = {system: [run_system(system, clients, args.seconds, seed, model) for seed in seeds] for system in names}
        return solo_ref, {system: summarise(system, clients, trials[system], solo_ref, args.seconds)
                          for system in names}, trials

    for name, spec in workloads().items():
        clients = spec["clients"]
        solo_ref, results, trials_of = run_systems(systems, clients)
        for system in systems:
            trials = trials_of[system]
            if system == "lithos" and name == "hybrid":
                first = trials[0][1]
                shown = int(min(2000.0, args.seconds * 1000) / first.timeline_bin_ms)
                timeline = {"workload": name, "bin_ms": first.timeline_bin_ms,
                            "values": first.lent_tpcs_timeline[:shown]}
        report["workloads"][name] = {
            "what": spec["what"],
            "clients": [{"name": c.name, "priority": c.priority, "quota_tpcs": len(c.quota_tpc_ids),
                         "rate_per_s": c.rate_per_s, "work": c.work.name} for c in clients],
            "solo": solo_ref, "results": results}
    spec = launch_ahead_workload()
    clients = spec["clients"]
    solo_ref, results, _ = run_systems(LAUNCH_AHEAD_SYSTEMS, clients)
    report["launch_ahead"] = {
        "what": spec["what"], "launch_ahead": LAUNCH_AHEAD, "atom_us": LendingPolicy().atom_us,
        "systems": list(LAUNCH_AHEAD_SYSTEMS),
        "system_switches": {name: switches for name, switches in LAUNCH_AHEAD_SYSTEMS.items()},
        "clients": [{"name": c.name, "priority": c.priority, "quota_tpcs": len(c.quota_tpc_ids),
                     "rate_per_s": c.rate_per_s, "work": c.work.name, "launch_ahead": c.launch_ahead}
                    for c in clients],
        "solo": solo_ref, "results": results}
    report["wall_s"] = round(time.time() - wall_start, 1)
    os.makedirs(args.out, exist_ok=True)
    json_path = os.path.join(args.out, "sim_scheduler.json")
    with open(json_path, "w") as f:
        json.dump(report, f, indent=1)
    plot(report, timeline, os.path.join(args.out, "sim_scheduler.png"))
    print(f"wrote {json_path} ({LABEL}) in {report['wall_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
