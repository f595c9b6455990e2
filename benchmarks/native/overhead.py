"""Overhead evidence: per-launch host time of 1e5 empty kernels and end-to-end step times,
with and without liblithos.so. Two allowances: the whole GPU (all 66 TPCs: launches go on the
program's streams, only the shim's bookkeeping shows) and every co-scheduled 8-SM group (60 TPCs =
120 SMs, as Ray grants whole groups: the confined paths, green streams and deferred joins), compared
with the same program on a 120-SM green context without the shim (e2e_worker.py LITHOS_E2E_GREEN=1).

usage: python benchmarks/native/overhead.py OUT_DIR [--in-process-only | --profile]
Writes OUT_DIR/native_overhead.json and .png (--in-process-only: OUT_DIR/native_overhead_in_process.json,
the in-process A/Bs alone, launches and end-to-end steps, about two minutes; --profile:
OUT_DIR/native_overhead_profile.json, the end-to-end A/B under liblithos_profile.so, with the time
of each launch-path section per launch, in the program, about a minute).
"""
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", ".."))
from common import last_json, metadata, replot_beside, write_json  # noqa: E402
from lithos_ray import native  # noqa: E402

LAUNCHES = 100000
LAUNCH_TRIALS = 7
# Launch-timing processes run on these CPUs (when the machine has them): fewer migrations, less noise.
LAUNCH_CPUS = {2, 3}
E2E_CPUS = {2, 3, 4, 5}
E2E_TRIALS = 2
# case -> (launch_overhead mode, extra shim env): a stream the program creates (direct path); the
# default (legacy) stream 0 (paired path) with deferred joins (the default) and without them.
CASES = {"stream": ("stream", {}), "legacy": ("legacy", {}), "legacy_no_defer": ("legacy", {"LITHOS_DEFER_JOIN": "0"})}
MODES = tuple(CASES)
# In one shimmed process, cuLaunchKernel through the shim's hook and through the real driver function
# behind it, in alternating blocks of 256 (launch_overhead.cu ab-*): the shim's own cost, without the
# noise of comparing separate processes.
AB_MODES = ("ab-stream", "ab-legacy")
AB_BLOCK = 256
WORKLOADS = ("resnet50_train_ms", "bert_base_infer_ms", "resnet50_train_side_stream_ms", "bert_base_infer_side_stream_ms")


def usable(cpus: set[int]) -> bool:
    return cpus <= os.sched_getaffinity(0)


def pinned_to(cpus: set[int]):
    """A preexec_fn that runs the child on `cpus` when this machine has them."""
    return lambda: os.sched_setaffinity(0, cpus) if usable(cpus) else None


def run_e2e_worker(env: dict) -> dict:
    proc = subprocess.run([sys.executable, os.path.join(HERE, "e2e_worker.py")], env=env, capture_output=True, text=True,
                          timeout=400, preexec_fn=pinned_to(E2E_CPUS))
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    return last_json(proc.stdout)


def percentiles(ns):
    return {"median_ns": float(np.median(ns)), "p99_ns": float(np.percentile(ns, 99)), "mean_ns": float(np.mean(ns))}


def run_launches(binary, mode: str, env: dict, raw: str) -> tuple[np.ndarray, str]:
    """One launch_overhead.cu run on LAUNCH_CPUS: (host ns per launch, its stdout)."""
    proc = subprocess.run([binary, str(LAUNCHES), raw, mode], env=env, check=True, capture_output=True, text=True,
                          preexec_fn=pinned_to(LAUNCH_CPUS))
    return np.fromfile(raw, dtype=np.uint32), proc.stdout


def added_ns(shim_runs: list[np.ndarray], base_runs: list[np.ndarray]) -> dict:
    """What the shim's runs add per launch to the baseline's: all launches' median and p99, and per trial."""
    shim_all, base_all = np.concatenate(shim_runs), np.concatenate(base_runs)
    return {"median_ns": float(np.median(shim_all) - np.median(base_all)),
            "p99_ns": float(np.percentile(shim_all, 99) - np.percentile(base_all, 99)),
            "per_trial_median_ns": [float(np.median(s) - np.median(b)) for s, b in zip(shim_runs, base_runs)]}


def in_process_ab(binary, shim_envs: dict, work) -> dict:
    """Per allowance (name -> shim env) and stream kind, "<allowance> <stream kind>": the shim's added
    host time per launch from the ab-* modes (see AB_MODES)."""
    runs = {(name, mode): [] for name in shim_envs for mode in AB_MODES}
    for trial in range(LAUNCH_TRIALS):
        for (name, mode), trial_runs in runs.items():
            trial_runs.append(run_launches(binary, mode, shim_envs[name], os.path.join(work, f"{mode}{trial}.bin"))[0])
    result = {}
    for (name, mode), mode_runs in runs.items():
        blocks = [(np.arange(len(run)) // AB_BLOCK) % 2 for run in mode_runs]
        shim_arm = [run[block == 0] for run, block in zip(mode_runs, blocks)]
        real_arm = [run[block == 1] for run, block in zip(mode_runs, blocks)]
        result[f"{name} {mode[3:]}"] = {**added_ns(shim_arm, real_arm), "real_median_ns": float(np.median(np.concatenate(real_arm)))}
    return result


def build_binary(work) -> str:
    binary = os.path.join(work, "launch_overhead")
    subprocess.run(["nvcc", "-O2", "-arch=sm_90", "-o", binary, os.path.join(HERE, "launch_overhead.cu"), "-ldl"], check=True)
    return binary


def setup():
    """The launch benchmark built, and an allowance table with slot 0 = the whole GPU and slot 1 = every
    TPC of a co-scheduled group (one process at a time uses the table, so the two may overlap):
    (work dir, binary, table, shim env of slot 0, shim env of slot 1)."""
    work = tempfile.mkdtemp(prefix="lithos-overhead-")
    binary = build_binary(work)
    table = whole_gpu_table()
    table.set_allowance(1, sorted(t for tpcs in table.cosched_groups().values() for t in tpcs))
    return (work, binary, table, {**os.environ, **native.client_env(table.path, 0)},
            {**os.environ, **native.client_env(table.path, 1)})


def whole_gpu_table():
    """An allowance table of this GPU, its layout probed, slot 0 = every TPC."""
    table = native.AllowanceTable.create(native._default_gpu_uuid())
    native.probe_layout_into(table)
    table.set_allowance(0, list(range(table.tpcs_on_gpu)))
    return table


IN_PROCESS_NOTES = (
    "added_per_launch_in_process: one shimmed process per run, cuLaunchKernel of an empty kernel through the "
    "shim's hook (even blocks of 256) and through the real driver function behind it (lithos_client_real_hook, "
    "odd blocks), same stream, lending off; keys '<allowance> <stream>': groups = every co-scheduled group "
    "(60 TPCs), whole_gpu = all 66 TPCs (the program's own streams), whole_gpu_unsampled = the same with "
    "LITHOS_SAMPLE_EVERY=0; 'stream' = a stream the program created, 'legacy' = the default stream. "
    "end_to_end_in_process: one shimmed process with the whole GPU allowed (e2e_worker.py, LITHOS_E2E_AB=1), "
    "default-stream steps in pairs, one with the shim's work on and one bypassed (lithos_client_set_bypass), the "
    "shim's first in every other pair; shim_vs_bypass_percent = median over pairs of the pair's ratio (a drift "
    "over the run cancels), with its interquartile range and a bootstrap 90% interval.")


def in_process(binary, work, whole_gpu_env, groups_env) -> tuple[dict, dict, dict]:
    """The in-process A/Bs: (added ns per launch by allowance and stream, end-to-end summary, raw steps);
    an end-to-end failure is reported in the summary and the launch results are kept."""
    launches = in_process_ab(binary, {"groups": groups_env, "whole_gpu": whole_gpu_env,
                                      "whole_gpu_unsampled": {**whole_gpu_env, "LITHOS_SAMPLE_EVERY": "0"}}, work)
    try:
        e2e, steps = e2e_in_process(whole_gpu_env)
    except RuntimeError as exc:
        e2e, steps = {"error": str(exc)[-1500:]}, {}
    return launches, e2e, steps


def e2e_in_process(shim_env) -> tuple[dict, dict]:
    """Default-stream steps in one shimmed process, the shim's work on and bypassed in pairs
    (e2e_worker.py, LITHOS_E2E_AB=1): (summary per workload, raw step times)."""
    steps = run_e2e_worker({**shim_env, "LITHOS_E2E_AB": "1"})
    return {workload: {"shim_median_ms": float(np.median(arms["shim"])), "bypass_median_ms": float(np.median(arms["bypass"])),
                       **paired_percent(arms["shim"], arms["bypass"]),
                       "host_shim_median_ms": float(np.median(arms["host_shim"])),
                       "host_bypass_median_ms": float(np.median(arms["host_bypass"])),
                       "steps_per_arm": len(arms["shim"]),
                       **{key: arms[key] for key in ("launches_per_step", "func_queries_per_step", "distinct_kernels",
                                                     "profile") if key in arms}}
            for workload, arms in steps.items()}, steps


def paired_percent(shim: list[float], bypass: list[float]) -> dict:
    """The shim's added step time: the k-th shim step against the k-th bypassed one (adjacent steps of
    one pair, so a drift of the machine over the run cancels), median of the ratios over pairs, with
    their interquartile range and a bootstrap 90% interval of the median (pairs resampled, seeded)."""
    pairs = min(len(shim), len(bypass))
    ratios = np.asarray(shim[:pairs]) / np.asarray(bypass[:pairs])
    q25, q50, q75 = (100.0 * (np.percentile(ratios, q) - 1.0) for q in (25, 50, 75))
    medians = np.median(np.random.default_rng(0).choice(ratios, (2000, pairs)), axis=1)
    return {"shim_vs_bypass_percent": float(q50), "shim_vs_bypass_percent_iqr": [float(q25), float(q75)],
            "shim_vs_bypass_percent_ci90": [float(100.0 * (np.percentile(medians, q) - 1.0)) for q in (5, 95)],
            "block_pairs": int(pairs)}


def main_in_process_only(out_dir):
    """Only the in-process A/Bs, launches and end to end (about two minutes): OUT_DIR/native_overhead_in_process.json."""
    work, binary, table, whole_gpu_env, groups_env = setup()
    try:
        result, e2e, steps = in_process(binary, work, whole_gpu_env, groups_env)
    finally:
        table.close()
    payload = {**metadata(f"python benchmarks/native/overhead.py {out_dir} --in-process-only"),
               "launches_per_run": LAUNCHES, "trials": LAUNCH_TRIALS, "block": AB_BLOCK,
               "cpus": sorted(LAUNCH_CPUS) if usable(LAUNCH_CPUS) else "any",
               "added_per_launch_in_process": result, "end_to_end_in_process": e2e, "end_to_end_raw_ms": steps,
               "notes": IN_PROCESS_NOTES}
    write_json(os.path.join(out_dir, "native_overhead_in_process.json"), payload)
    print(json.dumps({"added_per_launch_in_process": result, "end_to_end_in_process": e2e}, indent=1))
    plot_in_process(payload, os.path.join(out_dir, "native_overhead_in_process.png"))


def main_profile(out_dir):
    """The end-to-end A/B under the LITHOS_PROFILE build: where a launch's added time goes inside a
    real program (OUT_DIR/native_overhead_profile.json; no plot)."""
    subprocess.run(["make", "-s", "-C", os.path.join(HERE, "..", "..", "native"), "profile"], check=True)
    profile_lib = os.path.join(HERE, "..", "..", "native", "build", "liblithos_profile.so")
    table = whole_gpu_table()
    try:
        env = {**os.environ, **native.client_env(table.path, 0)}
        env["LD_PRELOAD"] = ":".join([os.path.abspath(profile_lib)] + env["LD_PRELOAD"].split(":")[1:])
        e2e, steps = e2e_in_process(env)
    finally:
        table.close()
    payload = {**metadata(f"python benchmarks/native/overhead.py {out_dir} --profile"), "end_to_end_in_process": e2e,
               "end_to_end_raw_ms": steps,
               "notes": "as end_to_end_in_process of native_overhead_in_process.json, under liblithos_profile.so (TSC "
                        "timers per launch-path section, summed over threads; the timers themselves add ~20-40 ns per "
                        "section); profile[arm][section] = ns per pass and passes per step. Sections of the whole-GPU "
                        "path: clock (entry to the clock read), route (allowance and context), lookup (kernel "
                        "identity), publish (activity word), real_launch (the driver's cuLaunchKernel), record (ring "
                        "record); bypass_real_launch = the bypassed arm's whole hook."}
    write_json(os.path.join(out_dir, "native_overhead_profile.json"), payload)
    print(json.dumps(e2e, indent=1))


def plot_in_process(payload, path):
    """Per-trial median added ns per launch, per stream kind, against the 0.5 us target."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    result = payload["added_per_launch_in_process"]
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (kind, entry) in enumerate(result.items()):
        trials = entry["per_trial_median_ns"]
        ax.scatter([i] * len(trials), trials, color="C0", alpha=0.6, label="trial median" if i == 0 else None)
        ax.hlines(entry["median_ns"], i - 0.25, i + 0.25, color="C3", label="all launches, median" if i == 0 else None)
        ax.text(i + 0.27, entry["median_ns"], f"{entry['median_ns']:.0f} ns", va="center", fontsize=8)
    ax.axhline(500, color="gray", ls="--", label="target 500 ns")
    ax.set_xticks(range(len(result)), [k.replace(" stream", "\ncreated stream").replace(" legacy", "\ndefault stream")
                                       for k in result], fontsize=7)
    ax.set_ylim(0, max(700, max(max(e["per_trial_median_ns"]) for e in result.values()) * 1.2))
    ax.set_ylabel("shim's added host time per launch (ns)")
    ax.set_title(f"In-process A/B, {payload['trials']} x {payload['launches_per_run']} launches ({payload['gpu']}, "
                 f"{payload['git_commit']})", fontsize=9)
    ax.legend(fontsize=8)
    e2e = payload.get("end_to_end_in_process")
    if e2e:
        ax.text(0.02, 0.04, "end to end, shim vs bypassed: " + "; ".join(
            f"{name.replace('_ms', '')} {entry['shim_vs_bypass_percent']:+.1f}%" for name, entry in e2e.items()),
            transform=ax.transAxes, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


# End-to-end arms: (shim env key or None, extra env). Without the shim: the whole GPU, and the same
# program on a 120-SM green context (the SMs of every co-scheduled group).
E2E_ARMS = {"plain": (None, {}), "shim_whole_gpu": ("whole_gpu", {}), "plain_120_sms": (None, {"LITHOS_E2E_GREEN": "1"}),
            "shim_groups": ("groups", {}), "shim_groups_no_defer": ("groups", {"LITHOS_DEFER_JOIN": "0"})}
# ratio name -> (arm, baseline arm)
E2E_RATIOS = {"whole_gpu_shim_vs_plain_percent": ("shim_whole_gpu", "plain"),
              "groups_shim_vs_plain_120_sms_percent": ("shim_groups", "plain_120_sms"),
              "groups_no_defer_vs_plain_120_sms_percent": ("shim_groups_no_defer", "plain_120_sms")}


def e2e_summarize(e2e: dict) -> dict:
    """Per workload: median ms per arm (median of its runs' medians), the ratios of E2E_RATIOS (a
    side-stream workload's 120-SM baseline is the default-stream one: that baseline runs on a stream
    it created) and the plain runs' spread."""
    summary = {}
    for workload in WORKLOADS:
        per_run = {arm: [float(np.median(run[workload if workload in run else workload.replace("_side_stream", "")]))
                         for run in runs] for arm, runs in e2e.items() if runs}
        medians = {arm: float(np.median(values)) for arm, values in per_run.items()}
        summary[workload] = {"median_ms": medians, "per_run_median_ms": per_run,
                             **{name: 100.0 * (medians[arm] / medians[base] - 1.0) if arm in medians and base in medians
                                else None for name, (arm, base) in E2E_RATIOS.items()},
                             "plain_run_spread_percent": 100.0 * (max(per_run["plain"]) / min(per_run["plain"]) - 1.0)
                             if "plain" in per_run else None}
    return summary


def main(out_dir):
    work, binary, table, whole_gpu_env, groups_env = setup()
    shim_envs = {"whole_gpu": whole_gpu_env, "groups": groups_env}
    launch, launch_paths = {}, {}
    try:
        for trial in range(LAUNCH_TRIALS):  # interleaved: plain, shim, plain, shim, ... per stream kind
            for mode, (binary_mode, extra_env) in CASES.items():
                for name, env in (("plain", dict(os.environ)), ("shim", {**groups_env, **extra_env})):
                    times, stdout = run_launches(binary, binary_mode, env, os.path.join(work, f"{mode}_{name}{trial}.bin"))
                    launch.setdefault(f"{mode}_{name}", []).append(times)
                    if name == "shim":
                        launch_paths.setdefault(mode, []).append(last_json(stdout))
        in_process_launches, e2e_ab, e2e_ab_raw = in_process(binary, work, whole_gpu_env, groups_env)
        e2e, e2e_errors = {arm: [] for arm in E2E_ARMS}, {}
        for trial in range(E2E_TRIALS):  # interleaved: every arm once, then again
            for arm, (shim, extra_env) in E2E_ARMS.items():
                try:
                    e2e[arm].append(run_e2e_worker({**(shim_envs[shim] if shim else os.environ), **extra_env}))
                except RuntimeError as exc:
                    e2e_errors.setdefault(arm, str(exc)[-1500:])
        views = {}
        for slot in (0, 1):
            records, _ = table.read_launches(slot, max_records=4096)
            summary = native.summarize_launches(records, len(records), table.tpcs_on_gpu)
            views["whole_gpu" if slot == 0 else "groups"] = {v: summary[v] for v in native.VIEW_NAMES.values() if summary[v]}
    finally:
        table.close()
    stats = {name: [percentiles(a) for a in arrays] for name, arrays in launch.items()}
    added = {mode: added_ns(launch[f"{mode}_shim"], launch[f"{mode}_plain"]) for mode in MODES}
    e2e_summary = e2e_summarize(e2e)
    payload = {**metadata("python benchmarks/native/overhead.py " + out_dir),
               "launch": {"launches_per_run": LAUNCHES, "trials": LAUNCH_TRIALS, "per_run": stats,
                          "cpus": sorted(LAUNCH_CPUS) if usable(LAUNCH_CPUS) else "any",
                          "added_per_launch": added, "shim_launch_paths": launch_paths,
                          "added_per_launch_in_process": in_process_launches},
               "end_to_end_in_process": e2e_ab, "end_to_end_in_process_raw_ms": e2e_ab_raw,
               "end_to_end": e2e_summary, "end_to_end_raw_ms": e2e, "end_to_end_errors": e2e_errors,
               "shim_launch_views_sample": views,
               "notes": "launch benchmarks: allowance = every co-scheduled group (60 TPCs, 120 SMs; one green context "
                        "for plain and cluster kernels). launch modes: 'stream' = a cudaStreamNonBlocking stream the "
                        "program creates (a green stream under the shim: direct path), 'legacy' = the default stream 0 "
                        "(paired path with deferred joins: events only at the start of a run and at the join, here every "
                        "256 launches at cudaStreamSynchronize), 'legacy_no_defer' = the same with LITHOS_DEFER_JOIN=0 "
                        "(4 event calls per launch). End to end (arms interleaved, E2E_ARMS): plain = "
                        "no shim, whole GPU; shim_whole_gpu = all 66 TPCs allowed (launches on the program's streams); "
                        "plain_120_sms = no shim, the steps on a green context of every co-scheduled group "
                        "(e2e_worker.py LITHOS_E2E_GREEN=1); shim_groups = those groups allowed, on the default stream "
                        "(paired, deferred joins) and inside torch.cuda.stream(torch.cuda.Stream()) (*_side_stream: a "
                        "green stream, direct); shim_groups_no_defer = LITHOS_DEFER_JOIN=0. " + IN_PROCESS_NOTES}
    write_json(os.path.join(out_dir, "native_overhead.json"), payload)
    print(json.dumps({"added_per_launch": added, "added_per_launch_in_process": in_process_launches,
                      "end_to_end_in_process": e2e_ab, "shim_launch_paths": launch_paths,
                      "end_to_end": {k: {"median_ms": v["median_ms"],
                                         **{r: None if v[r] is None else round(v[r], 1)
                                            for r in (*E2E_RATIOS, "plain_run_spread_percent")}}
                                     for k, v in e2e_summary.items()}, "end_to_end_errors": e2e_errors}, indent=1))
    plot(launch, e2e_summary, os.path.join(out_dir, "native_overhead.png"))


def plot(launch, e2e_summary, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for mode, style in zip(MODES, ("-", "--", ":")):
        for name, color in (("plain", "C0"), ("shim", "C3")):
            data = np.sort(np.concatenate(launch[f"{mode}_{name}"])) / 1000.0
            left.plot(data, np.linspace(0, 1, len(data)), color=color, ls=style, label=f"{name}, {mode}")
    left.set_xscale("log")
    left.set_xlabel("host time per cudaLaunchKernel (us)")
    left.set_ylabel("CDF")
    left.legend(fontsize=8)
    left.set_title(f"Empty-kernel launch, {LAUNCH_TRIALS} x 1e5 launches each")
    names = list(e2e_summary)
    labels = [n.replace("_ms", "").replace("_side_stream", "\nside stream") for n in names]
    x = np.arange(len(names))
    arms = list(E2E_ARMS)
    width = 0.8 / len(arms)
    for k, arm in enumerate(arms):
        right.bar(x + (k - (len(arms) - 1) / 2) * width, [e2e_summary[n]["median_ms"].get(arm, 0.0) for n in names], width,
                  color=f"C{k}", label=arm)

    def percent(value):
        return "-" if value is None else f"{value:+.1f}%"
    for i, n in enumerate(names):
        right.text(i, max(e2e_summary[n]["median_ms"].values(), default=0.0) * 1.02,
                   f"whole GPU {percent(e2e_summary[n]['whole_gpu_shim_vs_plain_percent'])}\n"
                   f"120 SMs {percent(e2e_summary[n]['groups_shim_vs_plain_120_sms_percent'])}", ha="center", va="bottom",
                   fontsize=7)
    right.set_ylim(0, max(max(v["median_ms"].values(), default=1.0) for v in e2e_summary.values()) * 1.25)
    right.set_xticks(x, labels, fontsize=7)
    right.set_ylabel("median ms per step")
    right.legend(fontsize=8)
    right.set_title("End to end (H100)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[2] == "--in-process-only":
        main_in_process_only(sys.argv[1])
    elif len(sys.argv) == 3 and sys.argv[2] == "--profile":
        main_profile(sys.argv[1])
    elif len(sys.argv) == 3 and sys.argv[1] == "--plot-in-process":   # redraw a JSON's plot beside it
        replot_beside(sys.argv[2], plot_in_process)
    elif len(sys.argv) == 2:
        main(sys.argv[1])
    else:
        sys.exit(__doc__)
