"""From raw phase results to the benchmark's numbers, targets, JSON payload, table and plot."""
from __future__ import annotations

import numpy as np

from . import metrics
from .plan import BEST_EFFORT, LATENCY_CRITICAL, MIXES, SLO_MULTIPLE, SYSTEMS

BASELINES = ("timeslice", "mps", "mps_pct", "static")
# The targets (benchmark figures, not timed tests).
TARGET_P99_VS_SOLO = 1.10
TARGET_BE_VS_SOLO = 0.90
TARGET_P99_BELOW_MPS = {"inference": 13.0, "hybrid": 5.0}
TARGET_GOODPUT_VS_BEST_BASELINE = 1.4


def _service_trial(w: dict, slo_ms: float | None) -> dict:
    """Per-trial numbers of one service; unserved requests enter percentiles with their wait at the cut."""
    latency = np.asarray(w["latency_ms"] + w.get("unserved_wait_ms", []), dtype=float)
    out = {**metrics.latency_percentiles_ms(latency), "served": len(w["latency_ms"]), "unserved": w["unserved"],
           "arrivals": w["arrivals"], "service_ms_p50": float(np.median(w["service_ms"])) if w["service_ms"] else None}
    if slo_ms is not None:
        out["slo_attainment"] = metrics.slo_attainment(w["latency_ms"], slo_ms, w["unserved"])
        out["good_rps"] = metrics.good_requests_per_s(w["latency_ms"], slo_ms, w["window_s"])
    return out


def _be_trial(w: dict) -> dict:
    steps = metrics.steps_in_window(w["step_start_s"], w["step_end_s"], 0.0, w["window_s"])
    return {"steps_per_s": steps / w["window_s"], "samples_per_s": steps * w["samples_per_step"] / w["window_s"]}


def _ok(result: dict, name: str) -> dict | None:
    w = result.get("workloads", {}).get(name)
    return w if w and w.get("status") == "ok" else None


def _stats(trials: list[dict], key: str) -> dict:
    return metrics.median_and_spread([t.get(key) for t in trials])


def analyse(plan, phase_results: list[dict]) -> dict:
    """SLOs from solo, then per (mix, system, variant) the issue's metrics: median and spread over trials."""
    lc = [n for n, w in plan.workloads.items() if w.role == LATENCY_CRITICAL]
    solo_phases = [r for r in phase_results if r["system"] == "solo" and r.get("status") == "ok"]
    solo: dict = {}
    slo_ms: dict = {}
    for name in {n for r in solo_phases for n in r["active"]}:
        workload = plan.workloads[name]
        if workload.role == BEST_EFFORT:
            trials = [_be_trial(_ok(r, name)) for r in solo_phases if name in r["active"] and _ok(r, name)]
            solo[name] = {"steps_per_s": _stats(trials, "steps_per_s"), "samples_per_s": _stats(trials, "samples_per_s")}
            continue
        for variant in plan.variants:
            raw = [_ok(r, name) for r in solo_phases if name in r["active"] and r["variant"] == variant and _ok(r, name)]
            if not raw:
                continue
            p99s = [_service_trial(w, None)["p99_ms"] for w in raw]
            slo = metrics.slo_ms_from_solo(p99s, SLO_MULTIPLE)
            slo_ms.setdefault(name, {})[variant] = slo
            trials = [_service_trial(w, slo) for w in raw]
            solo.setdefault(name, {})[variant] = _service_summary(raw, trials, slo)

    mixes: dict = {}
    for mix_name in plan.mixes:
        mix = MIXES[mix_name]
        mixes[mix_name] = {}
        for system in [s for s in SYSTEMS if s in plan.systems and s != "solo"]:
            for variant in plan.variants:
                phases = [r for r in phase_results if r["mix"] == mix_name and r["system"] == system
                          and r["variant"] == variant]
                cell = {"status": _cell_status(phases), "services": {}, "best_effort": {}}
                goodputs = []
                per_trial_good: dict[int, dict] = {}
                for name in mix.services:
                    raw = [(r["trial"], _ok(r, name)) for r in phases if _ok(r, name)]
                    slo = slo_ms.get(name, {}).get(variant)
                    if not raw or slo is None:
                        continue
                    trials = [_service_trial(w, slo) for _, w in raw]
                    summary = _service_summary([w for _, w in raw], trials, slo)
                    solo_p99 = solo[name][variant]["p99_ms"]["median"]
                    summary["p99_vs_solo"] = summary["p99_ms"]["median"] / solo_p99 if solo_p99 else None
                    cell["services"][name] = summary
                    for (trial, _), t in zip(raw, trials):
                        per_trial_good.setdefault(trial, {})[name] = t["good_rps"]
                be = mix.best_effort
                be_raw = [(r["trial"], _ok(r, be)) for r in phases if _ok(r, be)]
                be_trials = {trial: _be_trial(w) for trial, w in be_raw}
                solo_be = solo.get(be, {}).get("steps_per_s", {}).get("median")
                if be_trials:
                    cell["best_effort"] = {"name": be, "steps_per_s": _stats(list(be_trials.values()), "steps_per_s"),
                                           "samples_per_s": _stats(list(be_trials.values()), "samples_per_s")}
                    if solo_be:
                        cell["best_effort"]["vs_solo"] = metrics.median_and_spread(
                            [t["steps_per_s"] / solo_be for t in be_trials.values()])
                solo_good = {n: solo[n][variant]["good_rps"]["median"] for n in mix.services
                             if n in solo and variant in solo[n]}
                for trial, good in per_trial_good.items():
                    if len(good) == len(mix.services) and trial in be_trials and solo_be \
                            and all(solo_good.get(n) for n in good):
                        goodputs.append(metrics.normalised_goodput(good, solo_good, be_trials[trial]["steps_per_s"], solo_be))
                cell["goodput_normalised"] = metrics.median_and_spread(goodputs)
                cell["goodput_normalised"]["solo_alone"] = len(mix.services) + 1
                lending = [r["lending"] for r in phases if "lending" in r]
                if lending:
                    cell["lending_per_trial"] = lending
                outcomes = shim_lending_outcomes(phases)
                if outcomes:
                    cell["shim_lending_outcomes"] = outcomes
                mixes[mix_name].setdefault(system, {})[variant] = cell
    return {"slo_multiple": SLO_MULTIPLE, "slo_ms": slo_ms, "solo": solo, "mixes": mixes,
            "targets": targets(plan, mixes), "services": lc}


def _service_summary(raw: list[dict], trials: list[dict], slo_ms: float) -> dict:
    pooled = np.concatenate([np.asarray(w["latency_ms"] + w.get("unserved_wait_ms", []), float) for w in raw])
    return {"slo_ms": slo_ms, "p50_ms": _stats(trials, "p50_ms"), "p95_ms": _stats(trials, "p95_ms"),
            "p99_ms": _stats(trials, "p99_ms"), "pooled": metrics.latency_percentiles_ms(pooled),
            "slo_attainment": _stats(trials, "slo_attainment"), "good_rps": _stats(trials, "good_rps"),
            "requests": int(sum(t["arrivals"] for t in trials)), "unserved": int(sum(t["unserved"] for t in trials)),
            "service_ms_p50": _stats(trials, "service_ms_p50")}


def _cell_status(phases: list[dict]) -> str:
    if not phases:
        return "not run"
    statuses = {r.get("status", "?") for r in phases}
    if statuses == {"ok"}:
        return "ok"
    return "; ".join(sorted(statuses))


def targets(plan, mixes: dict) -> dict:
    """lithos against the issue's targets, per mix and variant (None where a number is missing)."""
    out = {}
    for mix_name, systems in mixes.items():
        for variant in plan.variants:
            lithos = systems.get("lithos", {}).get(variant)
            if not lithos or lithos["status"] != "ok":
                out[f"{mix_name}/{variant}"] = {"status": (lithos or {}).get("status", "lithos not run")}
                continue
            entry: dict = {"p99_vs_solo": {}, "mps_p99_over_lithos_p99": {}}
            for name, s in lithos["services"].items():
                entry["p99_vs_solo"][name] = s["p99_vs_solo"]
                mps = systems.get("mps", {}).get(variant, {}).get("services", {}).get(name)
                if mps and s["p99_ms"]["median"]:
                    entry["mps_p99_over_lithos_p99"][name] = mps["p99_ms"]["median"] / s["p99_ms"]["median"]
            entry["be_vs_solo"] = lithos["best_effort"].get("vs_solo", {}).get("median")
            baseline_goodput = {b: systems[b][variant]["goodput_normalised"]["median"] for b in BASELINES
                                if b in systems and variant in systems[b]
                                and systems[b][variant]["goodput_normalised"]["median"] is not None}
            best = max(baseline_goodput, key=baseline_goodput.get) if baseline_goodput else None
            lithos_goodput = lithos["goodput_normalised"]["median"]
            entry["best_baseline"] = best
            entry["goodput_vs_best_baseline"] = (lithos_goodput / baseline_goodput[best]
                                                 if best and lithos_goodput is not None else None)
            below_mps = TARGET_P99_BELOW_MPS[mix_name]
            entry["met"] = {
                f"p99 <= {TARGET_P99_VS_SOLO} x solo": _all_true(v is not None and v <= TARGET_P99_VS_SOLO
                                                                 for v in entry["p99_vs_solo"].values()),
                f"BE >= {TARGET_BE_VS_SOLO:.0%} of solo": None if entry["be_vs_solo"] is None
                else entry["be_vs_solo"] >= TARGET_BE_VS_SOLO,
                f"p99 >= {below_mps:g}x lower than MPS": _all_true(v >= below_mps
                                                                   for v in entry["mps_p99_over_lithos_p99"].values()),
                f"goodput >= {TARGET_GOODPUT_VS_BEST_BASELINE}x best baseline": None
                if entry["goodput_vs_best_baseline"] is None
                else entry["goodput_vs_best_baseline"] >= TARGET_GOODPUT_VS_BEST_BASELINE,
            }
            out[f"{mix_name}/{variant}"] = entry
    return out


def matrix(mixes: dict) -> str:
    """A stored result's cells side by side: per mix and variant, one row per service with its p99 as a
    multiple of solo under each system, then the best-effort job's share of solo (medians of trials)."""
    lines = []
    for mix_name, systems in mixes.items():
        variants = sorted({v for cells in systems.values() for v in cells})
        names = list(systems)
        for variant in variants:
            lines.append(f"{mix_name} / {variant}: " + " | ".join(names))
            services = sorted({n for cells in systems.values() for n in cells.get(variant, {}).get("services", {})})
            for service in services:
                ratios = [systems[s].get(variant, {}).get("services", {}).get(service, {}).get("p99_vs_solo") for s in names]
                lines.append(f"  {service} p99 / solo: " + " | ".join("-" if r is None else f"{r:.2f}x" for r in ratios))
            shares = [systems[s].get(variant, {}).get("best_effort", {}).get("vs_solo", {}).get("median") for s in names]
            lines.append("  best-effort / solo: " + " | ".join("-" if r is None else f"{r:.0%}" for r in shares))
    return "\n".join(lines)


def _all_true(values) -> bool | None:
    values = list(values)
    return all(values) if values else None


def table(analysis: dict) -> str:
    """Plain-text summary: one line per mix, system, variant."""
    lines = [f"SLO = {analysis['slo_multiple']:g} x solo p99; medians over trials [min-max]"]
    for name, per_variant in analysis["solo"].items():
        if "steps_per_s" in per_variant:
            s = per_variant["steps_per_s"]
            lines.append(f"solo {name}: {_fmt(s)} steps/s")
            continue
        for variant, s in per_variant.items():
            lines.append(f"solo {name}/{variant}: p50 {_fmt(s['p50_ms'])} p99 {_fmt(s['p99_ms'])} ms, "
                         f"SLO {s['slo_ms']:.2f} ms, n={s['requests']}")
    for mix_name, systems in analysis["mixes"].items():
        for system, variants in systems.items():
            for variant, cell in variants.items():
                if cell["status"] != "ok" and not cell["services"]:
                    lines.append(f"{mix_name} {system}/{variant}: {cell['status'][:150]}")
                    continue
                parts = [f"{n} p99 {_fmt(s['p99_ms'])} ms ({s['p99_vs_solo']:.2f}x solo) SLO {_fmt(s['slo_attainment'], '.1%')}"
                         for n, s in cell["services"].items()]
                be = cell["best_effort"].get("vs_solo")
                parts.append(f"BE {_fmt(be, '.0%')} of solo" if be else "BE -")
                parts.append(f"goodput {_fmt(cell['goodput_normalised'])}/{cell['goodput_normalised']['solo_alone']}")
                lines.append(f"{mix_name} {system}/{variant}: " + "; ".join(parts))
                if cell.get("lending_per_trial"):
                    lines.append("    " + lending_summary(cell["lending_per_trial"]))
                    activity = activity_summary(cell["lending_per_trial"])
                    if activity:
                        lines.append("    activity words as borrowers saw them: " + activity)
                for name, outcomes in cell.get("shim_lending_outcomes", {}).items():
                    lines.append(f"    {name} launches that may borrow: " +
                                 ", ".join(f"{k} {v}" for k, v in outcomes.items() if v))
    for key, entry in analysis["targets"].items():
        lines.append(f"targets {key}: " + (", ".join(f"{k}: {v}" for k, v in entry.get("met", {}).items())
                                           or entry.get("status", "")))
    return "\n".join(lines)


def shim_lending_outcomes(phases: list[dict]) -> dict[str, dict[str, int]]:
    """Per workload, the shim's lending outcomes (lithos_client_lending_counts of its launching
    thread and the dispatcher's), with --dispatch on its held-launch counts (as dispatch_<name>), its
    CUDA graphs copied and unrolled (graphs_<name>) and its memsets and device-to-device copies on green
    streams or not (memory_green, memory_app), summed over a cell's trials; only workloads that had any."""
    totals: dict[str, dict[str, int]] = {}
    for phase in phases:
        for name, reply in phase.get("workloads", {}).items():
            counts = reply.get("shim_counts") or {}
            for group, prefix in (("lending", ""), ("dispatch", "dispatch_"), ("stub_flushes", "flushes_by_"),
                                  ("graphs", "graphs_"), ("launch_paths", "")):
                values = counts.get(group) or {}
                if group == "launch_paths":
                    values = {k: v for k, v in values.items() if k.startswith("memory_")}
                if any(values.values()):
                    for key, value in values.items():
                        totals.setdefault(name, {}).setdefault(prefix + key, 0)
                        totals[name][prefix + key] += value
    return totals


def lending_summary(per_trial: list[dict]) -> str:
    """One line over a cell's trials: launches that borrowed, worst reclaim p99 estimate, predictor accuracy."""
    borrowing, launches, reclaim_p99, off, pairs, time_share, small_grids = 0, 0, [], [], 0, [], []
    unconfined, unconfined_share, unconfined_kernels = 0, [], set()
    idle_used = [trial["idle_capacity"]["share_borrowed"] for trial in per_trial
                 if (trial.get("idle_capacity") or {}).get("share_borrowed") is not None]
    for trial in per_trial:
        for stats in trial.get("per_slot", {}).values():
            if stats.get("borrowing_launches"):
                time_share.append(stats.get("borrowed_gpu_time_share"))
                small_grids.append(stats.get("borrowed_grid_within_own_sms_share"))
            if stats.get("unconfined_launches"):
                unconfined += stats["unconfined_launches"]
                unconfined_share.append(stats.get("unconfined_gpu_time_share") or 0.0)
                unconfined_kernels.update(stats.get("unconfined_kernels", []))
            borrowing += stats.get("borrowing_launches", 0)
            launches += stats.get("launches", 0)
            accuracy = stats.get("predictor")
            if accuracy:
                off.append((accuracy["share_off_by_more_than_threshold"], accuracy["error_p99_us"]))
                pairs += accuracy["pairs"]
        reclaim_p99 += [r["p99_us"] for r in trial.get("reclaim_estimate", {}).values() if r.get("p99_us") is not None]
    text = f"borrowing launches {borrowing}/{launches}"
    if idle_used:
        text += f"; idle TPC-seconds borrowed {min(idle_used):.0%}-{max(idle_used):.0%}"
    text += f"; reclaim p99 (estimate) max {max(reclaim_p99):.0f} us" if reclaim_p99 else "; no reclaim"
    if off:
        text += (f"; predictor: {max(o for o, _ in off):.1%} off by > 50 us, error p99 <= "
                 f"{max(e for _, e in off):.0f} us ({pairs} pairs)")
    if any(v is not None for v in time_share):
        text += f"; borrowing launches' share of a slot's GPU time <= {max(v for v in time_share if v is not None):.0%}"
    if any(v is not None for v in small_grids):
        text += f", grids within the borrower's own SMs {min(v for v in small_grids if v is not None):.0%}-" \
                f"{max(v for v in small_grids if v is not None):.0%}"
    loops = [trial["control_loop"] for trial in per_trial if trial.get("control_loop")]
    if loops:
        cut = [v for loop in loops for v in loop["lend_list_cut_share"].values() if v is not None]
        text += (f"; control loop {sum(loop['steps'] for loop in loops)} steps, a lend list cut in up to "
                 f"{max(cut, default=0):.0%} of them")
        failed = sum(loop.get("errors", 0) for loop in loops)
        if failed:
            text += f" ({failed} steps failed)"
    if unconfined:
        text += (f"; unconfined launches (whole GPU, outside the quota) {unconfined}, <= {max(unconfined_share):.1%} "
                 f"of a slot's GPU time: {', '.join(sorted(unconfined_kernels)[:3])[:120]}")
    return text


def activity_summary(per_trial: list[dict]) -> str:
    """Per slot, over a cell's trials (sample-weighted): the share of the phase its activity word said
    idle, launched within the idle window, or busy only by its predicted work (and how far ahead)."""
    totals: dict[str, dict] = {}
    for trial in per_trial:
        names = trial.get("slot_names", {})
        for slot, entry in trial.get("activity", {}).items():
            name = names.get(slot, names.get(str(slot), str(slot)))
            total = totals.setdefault(name, {"samples": 0, "idle": 0.0, "recent_launch": 0.0, "predicted_busy": 0.0,
                                             "ahead_p50": []})
            total["samples"] += entry["samples"]
            for key in ("idle", "recent_launch", "predicted_busy"):
                total[key] += entry[f"{key}_share"] * entry["samples"]
            if entry.get("predicted_busy_ahead_ms_p50") is not None:
                total["ahead_p50"].append(entry["predicted_busy_ahead_ms_p50"])
    parts = []
    for name, total in totals.items():
        n = max(1, total["samples"])
        text = (f"{name} idle {total['idle'] / n:.0%}, recent launch {total['recent_launch'] / n:.0%}, "
                f"predicted busy {total['predicted_busy'] / n:.0%}")
        if total["ahead_p50"]:
            text += f" (ahead p50 {max(total['ahead_p50']):.1f} ms)"
        parts.append(text)
    return "; ".join(parts)


def _fmt(stat, spec: str = ".2f") -> str:
    if stat is None or stat.get("median") is None:
        return "-"
    if stat.get("trials", 1) > 1:
        return f"{stat['median']:{spec}} [{stat['min']:{spec}}-{stat['max']:{spec}}]"
    return f"{stat['median']:{spec}}"


def plot(analysis: dict, path: str, title: str) -> None:
    """One row per mix: p99 / solo p99 per service, SLO attainment, BE throughput / solo, goodput."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    mixes = analysis["mixes"]
    if not mixes:
        return
    fig, axes = plt.subplots(len(mixes), 4, figsize=(18, 4.2 * len(mixes)), squeeze=False)
    for row, (mix_name, systems) in enumerate(mixes.items()):
        names = list(systems)
        variants = sorted({v for s in systems.values() for v in s})
        width = 0.8 / max(1, len(variants))
        x = np.arange(len(names))
        services = sorted({n for s in systems.values() for c in s.values() for n in c["services"]})
        panels = [("p99 / solo p99 (log)", lambda c: [(n, c["services"][n]["p99_ms"], c["services"][n]["p99_vs_solo"])
                                                      for n in services if n in c["services"]]),
                  ("SLO attainment", lambda c: [(n, c["services"][n]["slo_attainment"], None)
                                                for n in services if n in c["services"]]),
                  ("best-effort throughput / solo", lambda c: [("BE", c["best_effort"].get("vs_solo"), None)]),
                  ("goodput (normalised to solo)", lambda c: [("", c["goodput_normalised"], None)])]
        for col, (label, extract) in enumerate(panels):
            ax = axes[row][col]
            for vi, variant in enumerate(variants):
                for si, name in enumerate(names):
                    cell = systems[name].get(variant)
                    if not cell:
                        continue
                    entries = extract(cell)
                    for ei, (who, stat, ratio) in enumerate(entries):
                        if not stat or stat.get("median") is None:
                            continue
                        if col == 0:  # normalise p99 and its spread to solo
                            scale = ratio / stat["median"]
                            med, low, high = ratio, stat["min"] * scale, stat["max"] * scale
                        else:
                            med, low, high = stat["median"], stat["min"], stat["max"]
                        offset = (vi - (len(variants) - 1) / 2) * width + (ei - (len(entries) - 1) / 2) * width / max(1, len(entries))
                        ax.bar(x[si] + offset, med, width / max(1, len(entries)), yerr=[[max(0.0, med - low)], [max(0.0, high - med)]],
                               color=f"C{ei}", alpha=1.0 if variant == "eager" else 0.55,
                               hatch=None if variant == "eager" else "//", edgecolor="k", linewidth=0.3,
                               label=f"{who} {variant}" if si == 0 and who else (variant if si == 0 and not who else None))
            if col == 0:
                ax.set_yscale("log")
                ax.axhline(1.0, color="k", lw=0.6)
                ax.axhline(TARGET_P99_VS_SOLO, color="g", lw=0.6, ls="--")
            if col == 1:
                ax.set_ylim(0, 1.05)
            if col == 2:
                ax.axhline(TARGET_BE_VS_SOLO, color="g", lw=0.6, ls="--")
            ax.set_xticks(x, names, fontsize=8)
            ax.set_title(f"{mix_name}: {label}", fontsize=9)
            ax.legend(fontsize=6)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
