"""The co-location benchmark harness without a GPU: metrics math, arrivals, plan and budget, input checks,
the analysis of phase results; the GPU run itself is marked gpu."""
import argparse
import json
import pathlib
import shutil
import sys
import time

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.colocate import metrics, plan, report  # noqa: E402
from benchmarks.colocate.driver import (ActivitySampler, PhaseControlLoop, hold_without_borrowing,  # noqa: E402
                                       idle_capacity_used, lending_stats)
from lithos_ray import bench_colocate  # noqa: E402
from lithos_ray.errors import LithosRequestError  # noqa: E402


# --- metrics -------------------------------------------------------------------------------------

def test_percentiles_of_a_known_array():
    values = np.arange(1, 101, dtype=float)  # 1..100 ms
    p = metrics.latency_percentiles_ms(values)
    assert p["n"] == 100
    assert p["p50_ms"] == pytest.approx(50.5)
    assert p["p95_ms"] == pytest.approx(95.05)
    assert p["p99_ms"] == pytest.approx(99.01)
    assert metrics.latency_percentiles_ms([])["p99_ms"] is None
    with pytest.raises(ValueError, match="finite"):
        metrics.latency_percentiles_ms([1.0, float("nan")])


def test_slo_is_a_multiple_of_the_median_solo_p99_and_attainment_counts_unserved():
    assert metrics.slo_ms_from_solo([2.0, 3.0, 10.0], 1.5) == pytest.approx(4.5)
    latency = [1.0, 2.0, 4.0, 4.5, 9.0]
    assert metrics.slo_attainment(latency, 4.5) == pytest.approx(4 / 5)
    assert metrics.slo_attainment(latency, 4.5, unserved=3) == pytest.approx(4 / 8)
    assert metrics.slo_attainment([], 1.0) is None
    assert metrics.good_requests_per_s(latency, 4.5, window_s=2.0) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="no solo p99"):
        metrics.slo_ms_from_solo([None], 1.5)


def test_steps_in_window_counts_partial_steps_by_overlap():
    starts, ends = [-0.5, 0.5, 1.5, 2.5], [0.5, 1.5, 2.5, 3.5]  # 1 s steps
    assert metrics.steps_in_window(starts, ends, 0.0, 3.0) == pytest.approx(3.0)
    assert metrics.steps_in_window(starts, ends, 0.0, 1.0) == pytest.approx(1.0)
    assert metrics.steps_in_window(starts, ends, 10.0, 11.0) == 0.0
    with pytest.raises(ValueError, match="end after"):
        metrics.steps_in_window(starts, ends, 1.0, 1.0)


def test_goodput_is_normalised_per_workload_to_solo():
    solo = {"a": 100.0, "b": 50.0}
    assert metrics.normalised_goodput(solo, solo, 4.0, 4.0) == pytest.approx(3.0)
    assert metrics.normalised_goodput({"a": 50.0, "b": 50.0}, solo, 2.0, 4.0) == pytest.approx(0.5 + 1.0 + 0.5)
    with pytest.raises(ValueError, match="no solo goodput"):
        metrics.normalised_goodput({"c": 1.0}, solo, None, None)


def test_median_and_spread_ignores_missing_trials():
    assert metrics.median_and_spread([3.0, None, 1.0, 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0, "trials": 3}
    assert metrics.median_and_spread([None])["median"] is None


def test_reclaim_time_from_owner_wakeups_and_borrowed_kernels():
    us = 1000
    owner = [0, 100 * us, 5000 * us, 5100 * us, 9000 * us]   # wake-ups (gap >= 500 us) at 5000 and 9000 us
    borrow_start = [4900 * us, 8000 * us]
    borrow_duration = [300 * us, 200 * us]                   # ends 5200 us (running at 5000) and 8200 us (done)
    times = metrics.reclaim_times_us(owner, borrow_start, borrow_duration, idle_window_ns=500 * us)
    assert times.tolist() == pytest.approx([200.0, 0.0])
    assert metrics.borrowed_tpcs_per_launch([20, 26, 30], 26).tolist() == [0, 0, 4]


def test_lending_stats_from_launch_records():
    dtype = np.dtype([("host_ns", "<u8"), ("gpu_ns", "<u8"), ("tpcs", "<u2"), ("function", "<u8"), ("grid", "<u4", (3,)),
                      ("predicted_ns", "<u8"), ("view", "u1"), ("kernel_name", "S16"), ("cluster", "<u4", (3,))])
    us = 1000
    one = (1, 1, 1)
    owner = np.array([(0, 0, 20, 1, one, 0, 0, b"a", one), (5000 * us, 0, 20, 1, one, 0, 0, b"a", one)], dtype=dtype)
    borrower = np.array([(4900 * us, 300 * us, 46, 2, (40, 1, 1), 0, 0, b"b", one),
                         (4950 * us, 100 * us, 26, 3, (800, 1, 1), 0, 0, b"c", one),
                         (4990 * us, 400 * us, 0, 4, (8, 1, 1), 0, 2, b"cudnn_refused", (2, 1, 1))],
                        dtype=dtype)  # the last on the whole GPU
    stats = lending_stats({0: owner, 1: borrower}, {0: tuple(range(20)), 1: tuple(range(20, 46))}, [0], 500.0)
    assert stats["per_slot"][1]["borrowing_launches"] == 1
    # the borrowing launch: 40 blocks, within the borrower's own 52 SMs; 300 of 800 us of its GPU time
    assert stats["per_slot"][1]["borrowed_grid_blocks_p50"] == 40
    assert stats["per_slot"][1]["borrowed_grid_within_own_sms_share"] == 1.0
    assert stats["per_slot"][1]["borrowed_gpu_time_share"] == pytest.approx(0.375)
    assert stats["per_slot"][1]["unconfined_launches"] == 1 and stats["per_slot"][0]["unconfined_launches"] == 0
    assert stats["per_slot"][1]["unconfined_gpu_time_share"] == pytest.approx(0.5)
    assert stats["per_slot"][1]["unconfined_kernels"] == ["cudnn_refused grid 8x1x1 cluster 2x1x1"]
    assert stats["per_slot"][1]["borrowed_tpcs_max"] == 20
    assert stats["per_slot"][0]["borrowing_launches"] == 0
    assert stats["reclaim_estimate"][0]["p99_us"] == pytest.approx(200.0)
    assert stats["per_slot"][1]["predictor"] is None   # these records carry no predictions


def test_predictor_accuracy_from_launch_records():
    dtype = np.dtype([("host_ns", "<u8"), ("gpu_ns", "<u8"), ("predicted_ns", "<u8"), ("tpcs", "<u2"),
                      ("function", "<u8")])
    us = 1000
    # predicted vs measured: off by 10, 60 and 0 us; one launch not timed, one not predicted
    recs = np.array([(0, 100 * us, 110 * us, 20, 1), (1, 100 * us, 160 * us, 20, 1), (2, 50 * us, 50 * us, 20, 1),
                     (3, 0, 70 * us, 20, 1), (4, 80 * us, 0, 20, 1)], dtype=dtype)
    stats = lending_stats({0: recs}, {0: tuple(range(20))}, [], 500.0)
    accuracy = stats["per_slot"][0]["predictor"]
    assert accuracy["pairs"] == 3
    assert accuracy["share_off_by_more_than_threshold"] == pytest.approx(1 / 3)
    assert accuracy["error_max_us"] == pytest.approx(60.0)


# --- arrivals ------------------------------------------------------------------------------------

def test_poisson_schedule_is_reproducible_sorted_and_has_the_asked_rate():
    a = metrics.arrival_schedule_s(200.0, 50.0, seed=7)
    b = metrics.arrival_schedule_s(200.0, 50.0, seed=7)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, metrics.arrival_schedule_s(200.0, 50.0, seed=8))
    assert np.all(np.diff(a) >= 0) and a.min() >= 0 and a.max() < 50.0
    assert a.size == pytest.approx(10_000, rel=0.05)
    gaps = np.diff(a)
    assert gaps.mean() == pytest.approx(1 / 200.0, rel=0.05)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, abs=0.05)  # exponential gaps: CV = 1
    for bad in (0, -1.0, float("inf"), True):
        with pytest.raises(ValueError, match="rate_per_s"):
            metrics.arrival_schedule_s(bad, 1.0, seed=0)


# --- plan, budget, quotas --------------------------------------------------------------------------

def test_default_plan_covers_every_system_mix_variant_and_fits_the_budget():
    p = plan.build_plan()
    phases = [ph for ph in p.phases if ph.system != "calibrate"]
    cells = {(ph.system, ph.mix, ph.variant) for ph in phases if ph.mix}
    for system in ("timeslice", "mps", "mps_pct", "static", "lithos"):
        for mix in plan.MIXES:
            for variant in plan.VARIANTS:
                assert sum(1 for ph in phases if (ph.system, ph.mix, ph.variant) == (system, mix, variant)) == 3
                assert (system, mix, variant) in cells
    solo = {(ph.active, ph.variant) for ph in phases if ph.system == "solo"}
    assert (("bert_base",), "graph") in solo and (("gpt2_small_train",), None) in solo
    # bert_base serves in both mixes but is measured solo once per trial and variant
    assert sum(1 for ph in phases if ph.system == "solo" and ph.active == ("bert_base",)) == 3 * 2
    assert [g.environment for g in p.groups] == ["plain", "shim", "shim", "mps", "mps_pct"]
    assert p.groups[-1].restart_only == ("resnet50_train", "gpt2_small_train")
    assert p.estimate["total_s"] <= 480.0 + 1e-6
    assert p.phase_s >= plan.MIN_PHASE_S


def test_fewer_choices_give_longer_phases_and_fewer_groups():
    full = plan.build_plan()
    small = plan.build_plan(mixes="hybrid", systems="solo,mps,lithos", variants="graph", trials=2)
    assert small.phase_s > full.phase_s
    assert [g.environment for g in small.groups] == ["plain", "shim", "mps"]
    assert all(ph.system != "timeslice" for ph in small.phases)
    only = plan.build_plan(systems="solo,mps_pct", mixes="hybrid")
    assert only.groups[-1].restart_only == ()  # no mps group to keep workers from


def test_budget_planner_refuses_what_does_not_fit_and_honours_phase_s():
    with pytest.raises(ValueError, match="do not fit in --budget-s 100"):
        plan.build_plan(budget_s=100)
    with pytest.raises(ValueError, match="over --budget-s"):
        plan.build_plan(phase_s=60.0)
    p = plan.build_plan(mixes="hybrid", trials=1, phase_s=5.0)
    assert p.phase_s == 5.0 and p.estimate["total_s"] < 480


@pytest.mark.parametrize("kwargs, message", [
    ({"mixes": "inference,offline"}, "unknown 'offline'; allowed: inference, hybrid"),
    ({"systems": "mps,lithos"}, "must include solo"),
    ({"systems": ""}, "give at least one"),
    ({"variants": "compiled"}, "allowed: eager, graph"),
    ({"trials": 0}, r"--trials must be an integer in \[1, 20\]"),
    ({"trials": 2.5}, "--trials must be an integer"),
    ({"load": 1.0}, r"--load must be a fraction of solo capacity in \(0, 1\)"),
    ({"budget_s": 10}, r"--budget-s must be a number in \[60, 3600\]"),
    ({"phase_s": 0.5}, r"--phase-s must be a number in \[2, 120\]"),
    ({"resnet_batch": 16}, r"--resnet-batch must be an integer in \[1, 8\]"),
    ({"lc_groups": ["offline=3"]}, "MIX one of inference, hybrid"),
    ({"lc_groups": ["inference=7"]}, r"inference has 2 service\(s\) \(resnet50, bert_base\); give one group count each"),
    ({"lc_groups": ["hybrid=x"]}, "hybrid has 1 service"),
    ({"lc_groups": ["hybrid=0"]}, "every service needs at least one 4-TPC group"),
    ({"lc_groups": ["hybrid=15"]}, "the best-effort job needs at least one"),
])
def test_bad_choices_are_refused_with_what_is_allowed(kwargs, message):
    with pytest.raises(ValueError, match=message):
        plan.build_plan(**kwargs)


def test_static_held_is_an_ablation_outside_the_default_run_in_the_shim_groups():
    assert "static_held" not in plan.build_plan().systems
    built = plan.build_plan(mixes="hybrid", systems="solo,static,static_held,lithos", trials=1)
    shim = [g for g in built.groups if g.environment == "shim"]
    assert len(shim) == 1 and {p.system for p in shim[0].phases} == {"static", "static_held", "lithos"}


def test_lc_alone_ablations_leave_the_best_effort_job_idle_and_lend_only_under_lithos():
    assert not set(plan.LC_ALONE_SYSTEMS) & set(plan.build_plan().systems)
    built = plan.build_plan(mixes="inference", systems="solo,static_lc_alone,lithos_lc_alone", trials=1)
    (shim,) = [g for g in built.groups if g.environment == "shim"]
    assert "resnet50_train" in shim.workers   # started (same processes as static/lithos), never sent work
    assert {p.active for p in shim.phases} == {("resnet50", "bert_base")}
    assert set(plan.LENDING_SYSTEMS) == {"lithos", "lithos_loop", "lithos_lc_alone", "lithos_unroll"}


def test_each_groups_first_phase_of_a_combination_warms_up_longer():
    built = plan.build_plan(mixes="hybrid", systems="solo,static,lithos", variants="graph", trials=2,
                            warmup_s=0.5, first_warmup_s=2.5)
    (shim,) = [g for g in built.groups if g.environment == "shim"]
    assert [(p.system, p.trial, p.first) for p in shim.phases] == [
        ("static", 0, True), ("lithos", 0, True), ("static", 1, False), ("lithos", 1, False)]
    plain = [g for g in built.groups if g.environment == "plain"][0]
    assert not any(p.first for p in plain.phases if p.system == "calibrate")
    firsts = sum(p.first for p in built.phases)
    assert built.estimate["first_warmups_s"] == pytest.approx(firsts * 2.0)
    assert plan.build_plan(first_warmup_s=0.0, warmup_s=0.5).first_warmup_s == 0.5   # never shorter than --warmup-s


def test_the_phase_control_loop_keeps_best_effort_off_what_an_active_service_may_borrow(tmp_path):
    from conftest import publish_activity
    from lithos_ray import native
    table = native.AllowanceTable.create("GPU-control-loop-test", str(tmp_path))
    try:
        roles = [(0, plan.LATENCY_CRITICAL, tuple(range(24))), (1, plan.LATENCY_CRITICAL, tuple(range(24, 48))),
                 (2, plan.BEST_EFFORT, tuple(range(48, 66)))]
        publish_activity(table, 0, time.monotonic_ns() + 60 * 10**9)   # launching all along: active
        publish_activity(table, 1, 1)
        publish_activity(table, 2, 1)
        loop = PhaseControlLoop(table, roles, atom_us=250.0)
        deadline = time.monotonic() + 30
        while loop.steps < 5:
            assert time.monotonic() < deadline, "the control loop made no steps"
            time.sleep(0.001)
        out = loop.finish()
        assert out["lend_list_cut_share"] == {0: 0.0, 1: 0.0, 2: 1.0}
        assert table.lending(2) == ([0], True) and table.lending(1) == ([0, 2], False)
        assert table.lending_knobs()["atom_ns"] == 250_000
    finally:
        table.close(unlink=True)


def test_static_held_gives_the_best_effort_slot_a_lender_holding_its_own_tpcs(tmp_path):
    from lithos_ray import native
    table = native.AllowanceTable.create("GPU-static-held-test", str(tmp_path))
    try:
        roles = [(0, plan.LATENCY_CRITICAL, tuple(range(48))), (1, plan.BEST_EFFORT, tuple(range(48, 66)))]
        assert hold_without_borrowing(table, roles) == {"held_without_lenders": {1: 2}}
        assert table.lending(1) == ([2], True) and table.allowance(2)[1] == list(range(48, 66))
        assert table.lending(0) == ([], False)
    finally:
        table.close(unlink=True)


def test_lc_groups_replace_one_mix_s_quotas_and_keep_the_others():
    built = plan.build_plan(mixes="inference,hybrid", lc_groups=["hybrid=14"])
    assert built.lc_quota_groups == {"inference": (6, 6), "hybrid": (14,)}
    assert "hybrid=14" in plan.describe(built) and "inference=6,6" in plan.describe(built)
    assert plan.build_plan(lc_groups=["inference=7,7", "hybrid=2"]).lc_quota_groups == {"inference": (7, 7),
                                                                                       "hybrid": (2,)}


def test_quotas_are_whole_groups_for_services_and_the_rest_for_best_effort():
    groups = [tuple(range(4 * i, 4 * i + 4)) for i in range(15)]
    slices = groups + [(t,) for t in range(60, 66)]
    quotas = plan.assign_quotas(slices, (5, 5))
    assert [len(q) for q in quotas] == [20, 20, 26]
    assert sorted(t for q in quotas for t in q) == list(range(66))
    assert quotas[0] == tuple(range(20))
    with pytest.raises(ValueError, match="want 15 co-scheduled groups but the GPU has 15"):
        plan.assign_quotas(slices, (10, 5))
    assert plan.mps_be_percent(26, 66) == 39
    assert plan.mps_be_percent(0, 66) == 1


# --- analysis of phase results ---------------------------------------------------------------------

def _service(latency_ms, window_s=10.0, unserved=0):
    return {"status": "ok", "latency_ms": list(latency_ms), "service_ms": [1.0] * len(latency_ms),
            "unserved": unserved, "unserved_wait_ms": [500.0] * unserved, "arrivals": len(latency_ms) + unserved,
            "window_s": window_s}


def _training(steps_per_s, window_s=10.0, batch=8):
    ends = np.arange(1, int(steps_per_s * window_s) + 1) / steps_per_s
    return {"status": "ok", "step_start_s": list(ends - 1 / steps_per_s), "step_end_s": list(ends),
            "window_s": window_s, "samples_per_step": batch}


def test_analysis_derives_slo_attainment_goodput_and_targets_from_phases(tmp_path):
    p = plan.build_plan(mixes="hybrid", systems="solo,mps,static_held,static_lc_alone,lithos", variants="graph",
                        trials=1)
    solo_latency = np.linspace(1.0, 2.0, 1000)           # solo p99 = 1.99 ms -> SLO 2.985 ms
    results = [
        {"system": "solo", "mix": None, "variant": "graph", "trial": 0, "active": ["bert_base"], "status": "ok",
         "workloads": {"bert_base": _service(solo_latency)}},
        {"system": "solo", "mix": None, "variant": None, "trial": 0, "active": ["gpt2_small_train"], "status": "ok",
         "workloads": {"gpt2_small_train": _training(10.0)}},
        {"system": "mps", "mix": "hybrid", "variant": "graph", "trial": 0, "active": ["bert_base", "gpt2_small_train"],
         "status": "ok", "workloads": {"bert_base": _service(solo_latency * 20), "gpt2_small_train": _training(10.0)}},
        {"system": "static_held", "mix": "hybrid", "variant": "graph", "trial": 0,   # an ablation: never the baseline
         "active": ["bert_base", "gpt2_small_train"], "status": "ok",
         "workloads": {"bert_base": _service(solo_latency * 1.05), "gpt2_small_train": _training(9.0)}},
        {"system": "lithos", "mix": "hybrid", "variant": "graph", "trial": 0,
         "active": ["bert_base", "gpt2_small_train"], "status": "ok",
         "workloads": {"bert_base": _service(solo_latency * 1.05), "gpt2_small_train": _training(9.5)}},
        {"system": "static_lc_alone", "mix": "hybrid", "variant": "graph", "trial": 0,   # no best-effort job
         "active": ["bert_base"], "status": "ok", "workloads": {"bert_base": _service(solo_latency * 1.2)}},
    ]
    analysis = report.analyse(p, results)
    assert analysis["slo_ms"]["bert_base"]["graph"] == pytest.approx(1.5 * np.percentile(solo_latency, 99))
    mps = analysis["mixes"]["hybrid"]["mps"]["graph"]
    lithos = analysis["mixes"]["hybrid"]["lithos"]["graph"]
    assert mps["services"]["bert_base"]["slo_attainment"]["median"] == 0.0
    assert lithos["services"]["bert_base"]["slo_attainment"]["median"] == 1.0
    assert lithos["services"]["bert_base"]["p99_vs_solo"] == pytest.approx(1.05)
    assert lithos["best_effort"]["vs_solo"]["median"] == pytest.approx(0.95)
    assert lithos["goodput_normalised"]["median"] == pytest.approx(1.0 + 0.95)
    assert mps["goodput_normalised"]["median"] == pytest.approx(0.0 + 1.0)
    target = analysis["targets"]["hybrid/graph"]
    assert target["mps_p99_over_lithos_p99"]["bert_base"] == pytest.approx(20 / 1.05)
    assert target["best_baseline"] == "mps"
    assert target["goodput_vs_best_baseline"] == pytest.approx(1.95)
    assert all(target["met"].values())
    alone = analysis["mixes"]["hybrid"]["static_lc_alone"]["graph"]
    assert alone["services"]["bert_base"]["p99_vs_solo"] == pytest.approx(1.2)
    assert alone["best_effort"] == {} and alone["goodput_normalised"]["median"] is None
    text = report.table(analysis)
    assert "hybrid lithos/graph" in text and "hybrid static_held/graph" in text
    assert "hybrid static_lc_alone/graph: bert_base p99" in text and "BE -" in text
    assert report.matrix(analysis["mixes"]).splitlines() == [
        "hybrid / graph: mps | static_held | static_lc_alone | lithos",
        "  bert_base p99 / solo: 20.00x | 1.05x | 1.20x | 1.05x",
        "  best-effort / solo: 100% | 90% | - | 95%"]
    report.plot(analysis, str(tmp_path / "plot.png"), "synthetic")
    assert (tmp_path / "plot.png").stat().st_size > 0


def test_unavailable_lithos_is_reported_not_scored():
    p = plan.build_plan(mixes="hybrid", systems="solo,lithos", variants="eager", trials=1)
    reason = "lending unavailable: lithos_ray.native.AllowanceTable has no set_lending"
    results = [{"system": "lithos", "mix": "hybrid", "variant": "eager", "trial": 0,
                "active": ["bert_base", "gpt2_small_train"], "status": reason, "workloads": {}}]
    analysis = report.analyse(p, results)
    assert analysis["mixes"]["hybrid"]["lithos"]["eager"]["status"] == reason
    assert analysis["targets"]["hybrid/eager"]["status"] == reason


# --- CLI boundary ------------------------------------------------------------------------------------

def _args(*argv):
    parser = argparse.ArgumentParser()
    bench_colocate.configure_parser(parser)
    return parser.parse_args(list(argv))


def test_cli_dry_run_prints_the_plan(capsys):
    assert bench_colocate.run(_args("--dry-run", "--mixes", "hybrid", "--trials", "2")) == 0
    out = capsys.readouterr().out
    assert "mixes hybrid" in out and "group shim:hybrid" in out and "estimated" in out


def test_cli_matrix_prints_a_stored_result_and_refuses_other_files(capsys, tmp_path):
    stored = tmp_path / "r.json"
    stored.write_text(json.dumps({"mixes": {"hybrid": {"static": {"graph": {
        "services": {"bert_base": {"p99_vs_solo": 1.5}}, "best_effort": {"vs_solo": {"median": 0.6}}}}}}}))
    assert bench_colocate.run(_args("--matrix", str(stored))) == 0
    assert capsys.readouterr().out.splitlines()[1:] == ["  bert_base p99 / solo: 1.50x", "  best-effort / solo: 60%"]
    (tmp_path / "other.json").write_text("[]")
    with pytest.raises(LithosRequestError, match="not a co-location result JSON"):
        bench_colocate.run(_args("--matrix", str(tmp_path / "other.json")))


@pytest.mark.parametrize("argv, message", [
    (("--systems", "lithos"), "must include solo"),
    (("--mps-be-percent", "0"), "--mps-be-percent must be an integer percentage in 1..100"),
    (("--atom-us", "-5"), r"--atom-us must be microseconds in \(0, 100000\]"),
    (("--tag", "a/b"), "--tag 'a/b'"),
    (("--seed", "-1"), "--seed must be a non-negative integer"),
    (("--sample-every", "0"), "--sample-every must be an integer in 1..1000000"),
    (("--lc-groups", "hybrid=1,2"), "hybrid has 1 service"),
    (("--systems", "solo,static_held", "--dispatch", "off"), "static_held holds the best-effort job's launches"),
])
def test_cli_refuses_bad_input_before_touching_a_gpu(argv, message):
    with pytest.raises(LithosRequestError, match=message):
        bench_colocate.run(_args("--dry-run", *argv))


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="this machine has a GPU driver")
def test_cli_names_what_this_machine_lacks():
    with pytest.raises(LithosRequestError, match="nvidia-smi not found"):
        bench_colocate.run(_args("--mixes", "hybrid", "--trials", "1"))


@pytest.mark.gpu
def test_short_gpu_run_writes_results(tmp_path):
    pytest.importorskip("torch")
    args = _args("--mixes", "hybrid", "--systems", "solo,static", "--variants", "graph", "--trials", "1",
                 "--phase-s", "2", "--budget-s", "200", "--out-dir", str(tmp_path), "--tag", "test")
    bench_colocate.run(args)
    import json
    payload = json.loads((tmp_path / "colocate_test.json").read_text())
    assert payload["solo"]["bert_base"]["graph"]["p99_ms"]["median"] > 0
    assert payload["mixes"]["hybrid"]["static"]["graph"]["status"] == "ok"
    assert payload["plan"]["dispatch"] == "on" and payload["plan"]["mix_definitions"]["hybrid"]["lc_quota_groups"] == [12]


def test_plot_draws_the_analysis(tmp_path):
    p = plan.build_plan(mixes="hybrid", systems="solo,mps", variants="eager,graph", trials=2)
    results = []
    for trial in range(2):
        for variant in ("eager", "graph"):
            base = np.linspace(1.0, 2.0, 200) * (3 if variant == "eager" else 1)
            results.append({"system": "solo", "mix": None, "variant": variant, "trial": trial, "active": ["bert_base"],
                            "status": "ok", "workloads": {"bert_base": _service(base)}})
            results.append({"system": "mps", "mix": "hybrid", "variant": variant, "trial": trial,
                            "active": ["bert_base", "gpt2_small_train"], "status": "ok",
                            "workloads": {"bert_base": _service(base * (4 + trial)),
                                          "gpt2_small_train": _training(8.0)}})
        results.append({"system": "solo", "mix": None, "variant": None, "trial": trial, "active": ["gpt2_small_train"],
                        "status": "ok", "workloads": {"gpt2_small_train": _training(10.0)}})
    analysis = report.analyse(p, results)
    assert analysis["mixes"]["hybrid"]["mps"]["eager"]["services"]["bert_base"]["p99_ms"]["trials"] == 2
    path = tmp_path / "colocate.png"
    report.plot(analysis, str(path), "synthetic")
    assert path.stat().st_size > 10_000


def test_lending_summary_line_reports_borrowing_reclaim_and_predictor():
    from benchmarks.colocate.report import lending_summary
    trial = {"per_slot": {0: {"launches": 10, "borrowing_launches": 0},
                          1: {"launches": 30, "borrowing_launches": 12,
                              "predictor": {"share_off_by_more_than_threshold": 0.25, "error_p99_us": 80.0, "pairs": 8}}},
             "reclaim_estimate": {0: {"p99_us": 140.0}}}
    assert lending_summary([trial, trial]) == ("borrowing launches 24/80; reclaim p99 (estimate) max 140 us; "
                                               "predictor: 25.0% off by > 50 us, error p99 <= 80 us (16 pairs)")
    assert lending_summary([{"per_slot": {}, "reclaim_estimate": {}}]) == "borrowing launches 0/0; no reclaim"
    leak = {"per_slot": {2: {"launches": 5, "unconfined_launches": 2, "unconfined_gpu_time_share": 0.031,
                             "unconfined_kernels": ["k"]}}, "reclaim_estimate": {}}
    looped = {**trial, "control_loop": {"steps": 900, "lend_list_cut_share": {0: 0.0, 2: 0.4}}}
    assert lending_summary([looped, looped]).endswith("; control loop 1800 steps, a lend list cut in up to 40% of them")
    assert lending_summary([leak]).endswith("; unconfined launches (whole GPU, outside the quota) 2, <= 3.1% of a "
                                            "slot's GPU time: k")
    shares = [{**trial, "idle_capacity": {"share_borrowed": s}} for s in (0.4, 0.55)]
    assert lending_summary(shares).startswith("borrowing launches 24/80; idle TPC-seconds borrowed 40%-55%; ")


def test_idle_capacity_compares_borrowed_tpc_seconds_with_what_idle_lenders_offered():
    stamps = np.zeros(2, dtype=[("host_ns", "u8")])
    stamps["host_ns"] = [1_000_000_000, 3_000_000_000]          # a 2 s span
    lending = {"per_slot": {0: {"borrowed_tpc_seconds_estimate": 0.0}, 1: {"borrowed_tpc_seconds_estimate": 12.0}},
               "activity": {0: {"idle_share": 0.5}, 1: {"idle_share": 0.0}}}
    out = idle_capacity_used(lending, {0: tuple(range(48)), 1: tuple(range(48, 66))}, {0: stamps, 1: None})
    assert out["span_s"] == 2.0 and out["idle_tpc_seconds"] == 48.0 and out["share_borrowed"] == 0.25
    assert idle_capacity_used(lending, {0: (0,)}, {0: None})["share_borrowed"] is None


def test_shim_lending_outcomes_are_summed_per_workload_over_trials():
    from benchmarks.colocate.report import shim_lending_outcomes
    counts = {"borrowed": 3, "unknown": 1, "no_idle_lender": 0}
    paths = {"direct": 5, "memory_green": 4, "memory_app": 0}
    phases = [{"workloads": {"train": {"shim_counts": {"launch_paths": paths, "lending": counts}},
                             "bert": {"shim_counts": {"lending": {"borrowed": 0}}}, "plain": {"status": "ok"}}}] * 2
    assert shim_lending_outcomes(phases) == {"train": {"borrowed": 6, "unknown": 2, "no_idle_lender": 0,
                                                       "memory_green": 8, "memory_app": 0}}


def test_activity_sampler_tells_idle_from_recent_launches_and_predicted_work():
    """Three lenders as a borrower's launch-path rule sees them: idle; launched 0.1 ms ago; last launch
    long ago but 5 ms of predicted work left. The report line gives each one's shares."""
    import threading
    import time
    from lithos_ray.scheduler.lending import ActivityWord
    sampled = threading.Event()

    class Table:
        def activity(self, slot):
            now = time.monotonic_ns()
            if slot == 2:
                sampled.set()
            return {0: ActivityWord(None, 0), 1: ActivityWord(now - 100_000, now),
                    2: ActivityWord(now - 10_000_000, now + 5_000_000)}[slot]

    sampler = ActivitySampler(Table(), [0, 1, 2], idle_window_us=500)
    assert sampled.wait(5)
    activity = sampler.finish()
    assert activity[0]["idle_share"] == 1 and activity[0]["predicted_busy_ahead_ms_p50"] is None
    assert activity[1]["recent_launch_share"] == 1
    assert activity[2]["predicted_busy_share"] == 1 and 4.9 < activity[2]["predicted_busy_ahead_ms_p50"] <= 5
    line = report.activity_summary([{"slot_names": {0: "bert", 1: "resnet", 2: "gpt2"}, "activity": activity}])
    assert line.startswith("bert idle 100%, recent launch 0%, predicted busy 0%; resnet idle 0%, recent launch 100%")
    assert "gpt2 idle 0%, recent launch 0%, predicted busy 100% (ahead p50 " in line
