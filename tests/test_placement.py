"""Placement policy: profile validation, planner bounds and feasibility, exact solver, re-planning,
generators, overload check, plot and CLI. Pure code, no Ray, no GPU."""
import json
import math

import numpy as np
import pytest

from lithos_ray.placement.cli import main as placement_main
from lithos_ray.placement.generators import (noisy_day, servegen_held_out_day, servegen_profile_set,
                                             synthetic_profile_set)
from lithos_ray.placement.overload import compare_overload, overloaded_gpu_slot_share
from lithos_ray.placement.planner import Plan, build_problem, gpu_demand_tpcs, plan_placement
from lithos_ray.placement.profiles import ProfileError, build_profile_set, load_profile_set
from lithos_ray.placement.replan import replan
from lithos_ray.placement.simulated_day import compare_simulated_day, simulate_plan_day

H100_TPCS = 66


def _profile_data(traffic: dict[str, list[float]], tpcs_per_rps: float = 1.0, **extra) -> dict:
    slots = len(next(iter(traffic.values())))
    return {"slots_per_day": slots, "models": {name: {"tpcs_per_rps": tpcs_per_rps, "slo_ms": 100.0, **extra}
                                               for name in traffic},
            "traffic": traffic}


def _day_peak_profile(peak_tpcs: float, peak_slot: int, slots: int = 24, trough: float = 0.1) -> list[float]:
    hours = np.arange(slots)
    distance = np.minimum(np.abs(hours - peak_slot), slots - np.abs(hours - peak_slot))
    return list(peak_tpcs * np.maximum(trough, 1.0 - distance / 6.0))


def _assert_feasible(plan: Plan, profile_set) -> None:
    _, loads = gpu_demand_tpcs(plan, profile_set)
    assert loads.max() <= plan.usable_tpcs + 1e-6
    reserved = {}
    for p in plan.placements:
        reserved[p.gpu_index] = reserved.get(p.gpu_index, 0) + p.reserved_tpcs
        assert p.reserved_tpcs >= 1
    assert all(total <= plan.gpu_tpcs for total in reserved.values())


# --- profile validation -------------------------------------------------------------------------

def test_wrong_slot_count_names_model_and_expected_count():
    data = _profile_data({"a": [1.0] * 24, "b": [1.0] * 23})
    with pytest.raises(ProfileError, match=r"'b' has 23 slots; slots_per_day is 24"):
        build_profile_set(data)


def test_slots_per_day_must_divide_the_day():
    with pytest.raises(ProfileError, match="slots_per_day must split a day into whole minutes"):
        build_profile_set(_profile_data({"a": [1.0] * 23}))


def test_negative_rate_is_rejected_with_slot():
    with pytest.raises(ProfileError, match=r"'a' slot 3: rate_rps must be a finite number >= 0"):
        build_profile_set(_profile_data({"a": [1.0, 1, 1, -2.0] + [1.0] * 20}))


def test_traffic_for_unknown_model_is_rejected():
    data = _profile_data({"a": [1.0] * 24})
    data["traffic"]["ghost"] = [1.0] * 24
    with pytest.raises(ProfileError, match=r"unknown model\(s\) 'ghost'; models defined: 'a'"):
        build_profile_set(data)


def test_model_without_traffic_and_bad_fields_are_rejected():
    data = _profile_data({"a": [1.0] * 24})
    data["models"]["b"] = {"tpcs_per_rps": 1.0, "slo_ms": 10.0}
    with pytest.raises(ProfileError, match="'b' have no traffic profile"):
        build_profile_set(data)
    data = _profile_data({"a": [1.0] * 24}, tpcs_per_rps=-1.0)
    with pytest.raises(ProfileError, match="models.a.tpcs_per_rps"):
        build_profile_set(data)
    data = _profile_data({"a": [1.0] * 24})
    data["models"]["a"]["tpc_per_rps"] = 1.0
    with pytest.raises(ProfileError, match="Extra inputs are not permitted"):
        build_profile_set(data)


def test_unknown_gpu_and_bad_headroom_fail_at_the_boundary():
    profile_set = build_profile_set(_profile_data({"a": [1.0] * 24}))
    with pytest.raises(ProfileError, match="unknown GPU model 'V99'; known models: H100"):
        plan_placement(profile_set, gpu_name="V99")
    with pytest.raises(ProfileError, match=r"headroom_fraction must be in \[0, 1\)"):
        plan_placement(profile_set, headroom_fraction=1.0)
    with pytest.raises(ProfileError, match="needs 200 GiB per replica; a H100 has 80 GiB"):
        plan_placement(build_profile_set(_profile_data({"a": [1.0] * 24}, memory_gib=200.0)))


def test_json_and_csv_files_load_the_same_profile_set(tmp_path):
    traffic = {"chat": [float(s) for s in range(24)], "batch": [3.0] * 24}
    data = _profile_data(traffic)
    (tmp_path / "set.json").write_text(json.dumps(data))
    catalog = {"slots_per_day": 24, "models": data["models"]}
    (tmp_path / "models.json").write_text(json.dumps(catalog))
    rows = ["model,slot,rate_rps"] + [f"{m},{s},{r}" for m, rates in traffic.items() for s, r in enumerate(rates)]
    (tmp_path / "traffic.csv").write_text("\n".join(rows) + "\n")
    from_json = load_profile_set(tmp_path / "set.json")
    from_csv = load_profile_set(tmp_path / "traffic.csv", tmp_path / "models.json")
    assert np.array_equal(from_json.rate_matrix_rps(), from_csv.rate_matrix_rps())
    (tmp_path / "short.csv").write_text("\n".join(rows[:-1]) + "\n")
    with pytest.raises(ProfileError, match=r"'batch' has 23 slots; slots_per_day is 24, missing slot\(s\) \[23\]"):
        load_profile_set(tmp_path / "short.csv", tmp_path / "models.json")
    with pytest.raises(ProfileError, match="needs --models"):
        load_profile_set(tmp_path / "traffic.csv")
    with pytest.raises(ProfileError, match="does not exist"):
        load_profile_set(tmp_path / "missing.json")


# --- planner ------------------------------------------------------------------------------------

def test_complementary_peaks_share_a_gpu_and_beat_peak_packing():
    # Four models of 40 TPCs at peak: morning pair and evening pair. Any morning+evening pair fits.
    traffic = {"m1": _day_peak_profile(40, 8), "m2": _day_peak_profile(40, 9),
               "e1": _day_peak_profile(40, 20), "e2": _day_peak_profile(40, 21)}
    profile_set = build_profile_set(_profile_data(traffic))
    plan = plan_placement(profile_set, headroom_fraction=0.1, time_limit_s=5)
    _assert_feasible(plan, profile_set)
    assert plan.gpus_used == 2 and plan.lower_bound_gpus == 2 and plan.proved_optimal
    assert plan.peak_packing_gpus == 4
    gpu = plan.gpu_of()
    assert gpu["m1"] != gpu["m2"] and gpu["e1"] != gpu["e2"]


def test_small_instance_pairs_morning_with_evening_models():
    # Morning models peak at 30 TPCs at 08h, evening ones at 20h, 6 TPCs at their trough: two of a
    # kind never fit one GPU (usable 59.4), so 3 GPUs each holding one of each is optimal.
    traffic = {f"m{i}": _day_peak_profile(30, 8, trough=0.2) for i in range(3)}
    traffic.update({f"e{i}": _day_peak_profile(30, 20, trough=0.2) for i in range(3)})
    profile_set = build_profile_set(_profile_data(traffic))
    plan = plan_placement(profile_set, time_limit_s=5, exact_max_items=40)
    _assert_feasible(plan, profile_set)
    assert plan.gpus_used == plan.lower_bound_gpus == 3 and plan.large_item_lower_bound == 3
    for gpu in {p.gpu_index for p in plan.placements}:
        assert sorted(p.model[0] for p in plan.placements if p.gpu_index == gpu) == ["e", "m"]


def test_exact_solver_proves_optimum_above_the_lower_bound():
    # Five flat models of 0.35 of a GPU: the fluid bound says 2, but three never fit one GPU.
    profile_set = build_profile_set(_profile_data({f"f{i}": [0.35 * 59.4] * 24 for i in range(5)}))
    plan = plan_placement(profile_set, time_limit_s=10, exact_max_items=40)
    assert plan.lower_bound_gpus == 2 and plan.large_item_lower_bound == 0
    assert plan.gpus_used == 3 and plan.proved_optimal and plan.method == "exact (HiGHS: Optimal)"


def test_lower_bounds_fluid_and_large_items():
    plan = plan_placement(build_profile_set(_profile_data({n: [36.0] * 24 for n in "abc"})), time_limit_s=2)
    assert plan.lower_bound_gpus == 3 and plan.large_item_lower_bound == 3 and plan.gpus_used == 3
    plan = plan_placement(build_profile_set(_profile_data({n: [25.0] * 24 for n in "abc"})), time_limit_s=2)
    assert plan.gpus_used == 2 and plan.fluid_lower_bound == pytest.approx(75 / 59.4, abs=1e-3)


def test_conflict_clique_bound_counts_replicas_that_never_fit_together():
    # Each model needs 0.6 of a GPU in its own slot and 0.45 elsewhere: no two fit together, yet no
    # slot has two above half a GPU and the fluid bound is 2; the conflict clique says 3.
    usable = 59.4
    traffic = {}
    for index, name in enumerate("abc"):
        rates = [0.45 * usable] * 24
        rates[index] = 0.6 * usable
        traffic[name] = rates
    plan = plan_placement(build_profile_set(_profile_data(traffic)), time_limit_s=2)
    assert plan.large_item_lower_bound == 1 and math.ceil(plan.fluid_lower_bound) == 2
    assert plan.conflict_clique_lower_bound == 3 and plan.lower_bound_gpus == 3
    assert plan.gpus_used == 3 and plan.proved_optimal


def test_model_above_one_gpu_is_split_into_replicas():
    profile_set = build_profile_set(_profile_data({"big": [130.0] * 24, "small": [5.0] * 24}))
    plan = plan_placement(profile_set, time_limit_s=2)
    _assert_feasible(plan, profile_set)
    big = [p for p in plan.placements if p.model == "big"]
    assert len(big) == 3 and {p.item for p in big} == {"big#0", "big#1", "big#2"}
    assert all(p.peak_tpcs == pytest.approx(130 / 3) for p in big)
    finer = plan_placement(profile_set, time_limit_s=2, max_replica_share=0.25)
    assert len([p for p in finer.placements if p.model == "big"]) == 9


def test_memory_and_replica_count_limit_colocation():
    profile_set = build_profile_set(_profile_data({f"m{i}": [1.0] * 24 for i in range(5)}, memory_gib=30.0))
    plan = plan_placement(profile_set, time_limit_s=2)
    assert plan.gpus_used == 3            # 80 GiB holds two 30 GiB models
    tiny = build_profile_set(_profile_data({f"t{i}": [0.01] * 24 for i in range(70)}))
    assert plan_placement(tiny, time_limit_s=2).gpus_used == 2    # at most 66 replicas (1 TPC each)


@pytest.mark.parametrize("model_count", [60, 600])
def test_synthetic_sets_plan_feasible_near_the_bound(model_count):
    profile_set = synthetic_profile_set(model_count, seed=3, slots_per_day=48)
    plan = plan_placement(profile_set, time_limit_s=1.0)
    _assert_feasible(plan, profile_set)
    assert plan.lower_bound_gpus <= plan.gpus_used <= plan.lower_bound_gpus * 1.10 + 1
    assert plan.gpus_used < plan.peak_packing_gpus
    assert plan.planning_time_s < 3.0
    assert sorted(p.item for p in plan.placements) == sorted(build_problem(profile_set).item_names)


def test_plan_round_trips_through_json():
    profile_set = synthetic_profile_set(30, seed=1, slots_per_day=24)
    plan = plan_placement(profile_set, time_limit_s=1)
    again = Plan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert again.gpu_of() == plan.gpu_of() and again.lower_bound_gpus == plan.lower_bound_gpus
    with pytest.raises(ProfileError, match="not a plan"):
        Plan.from_dict({"gpu_model": "H100"})


# --- re-planning --------------------------------------------------------------------------------

def test_replan_unchanged_profiles_moves_nothing():
    profile_set = synthetic_profile_set(200, seed=2, slots_per_day=24)
    plan = plan_placement(profile_set, time_limit_s=1)
    again = replan(plan, profile_set, max_moves=0)
    assert again.gpu_of() == plan.gpu_of() and again.moved_items == []


def test_replan_respects_the_move_bound_and_fixes_overloads():
    profile_set = synthetic_profile_set(300, seed=4, slots_per_day=24)
    plan = plan_placement(profile_set, time_limit_s=1)
    data = profile_set.model_dump()
    grown = sorted(data["traffic"])[:20]
    for name in grown:
        data["traffic"][name] = [rate * 1.5 for rate in data["traffic"][name]]
    data["models"]["newcomer"] = {"tpcs_per_rps": 1.0, "slo_ms": 50.0}
    data["traffic"]["newcomer"] = [4.0] * 24
    changed = build_profile_set(data)
    with pytest.raises(ProfileError, match=r"moves \d+ replicas but max_moves is 0"):
        replan(plan, changed, max_moves=0)
    new_plan = replan(plan, changed, max_moves=60)
    _assert_feasible(new_plan, changed)
    assert 0 < len(new_plan.moved_items) <= 60
    previous = plan.gpu_of()
    moved = {item for item, gpu in new_plan.gpu_of().items() if item in previous and previous[item] != gpu}
    assert moved == set(new_plan.moved_items)
    assert "newcomer" in new_plan.gpu_of()


# --- generators, overload, plot -----------------------------------------------------------------

def test_synthetic_generator_is_seeded_and_diurnal():
    first = synthetic_profile_set(50, seed=7)
    assert first.model_dump() == synthetic_profile_set(50, seed=7).model_dump()
    assert first.model_dump() != synthetic_profile_set(50, seed=8).model_dump()
    demand = first.demand_matrix_tpcs()
    diurnal = [name for name in first.model_names if not name.startswith("batch")]
    swing = demand.max(axis=1) / np.maximum(demand.min(axis=1), 1e-9)
    assert np.median(swing[[first.model_names.index(n) for n in diurnal]]) > 2
    with pytest.raises(ProfileError, match="model_count must be >= 1"):
        synthetic_profile_set(0)


def test_servegen_trace_becomes_profiles_and_a_held_out_day(tmp_path):
    client = tmp_path / "language" / "m-small"
    client.mkdir(parents=True)
    windows = np.arange(144 * 7)
    rates = 1.0 + (windows % 144 >= 72) * 2.0          # afternoon/evening three times the morning
    (client / "chunk-0-trace.csv").write_text(
        "\n".join(f"{w * 600},{r},1.0,Gamma,1,1" for w, r in zip(windows, rates)) + "\n")
    (client / "chunk-1-trace.csv").write_text("\n".join(f"{w * 600},0,0,,0,0" for w in windows) + "\n")
    profile_set = servegen_profile_set(tmp_path, slots_per_day=24, planning_days=6)
    assert profile_set.model_names == ["m-small/chunk-0"]        # the idle client is left out
    assert profile_set.traffic["m-small/chunk-0"][:12] == [1.0] * 12
    assert profile_set.traffic["m-small/chunk-0"][12:] == [3.0] * 12
    held_out = servegen_held_out_day(tmp_path, profile_set, day_index=6)
    assert held_out.shape == (1, 24) and held_out[0, 0] == pytest.approx(0.5)   # 1 rps * 0.5 TPC/rps
    assert "ServeGen" in profile_set.source and "Apache-2.0" in profile_set.source
    with pytest.raises(ProfileError, match="no ServeGen trace files"):
        servegen_profile_set(tmp_path / "language")


def test_overload_share_counts_gpu_slots_above_capacity():
    gpu_of_item = np.array([0, 0, 1])
    demand = np.array([[40.0, 10.0], [30.0, 10.0], [70.0, 1.0]])
    assert overloaded_gpu_slot_share(gpu_of_item, demand, 66) == pytest.approx(2 / 4)
    profile_set = synthetic_profile_set(80, seed=5, slots_per_day=24)
    plan = plan_placement(profile_set, time_limit_s=0.5)
    quiet = compare_overload(plan, build_problem(profile_set), profile_set.model_names,
                             [profile_set.demand_matrix_tpcs()])
    assert quiet["plan_overloaded_gpu_slot_share"] == 0.0      # the profile itself never overloads
    noisy = compare_overload(plan, build_problem(profile_set), profile_set.model_names,
                             [noisy_day(profile_set, np.random.default_rng(0), 0.5, 0.3) for _ in range(3)])
    assert noisy["plan_overloaded_gpu_slot_share"] > 0.0


def test_cli_place_prints_plan_writes_picture_and_json(tmp_path, capsys):
    profile_path = tmp_path / "set.json"
    profile_path.write_text(synthetic_profile_set(40, seed=1, slots_per_day=24).model_dump_json())
    picture, plan_path = tmp_path / "plan.png", tmp_path / "plan.json"
    code = placement_main(["place", "--profiles", str(profile_path), "--plot", str(picture),
                           "--output", str(plan_path), "--time-limit", "1"])
    out = capsys.readouterr().out
    assert code == 0 and "lower bound:" in out and "peak packing:" in out
    assert picture.stat().st_size > 10_000
    code = placement_main(["place", "--profiles", str(profile_path), "--json", "--no-plot",
                           "--previous-plan", str(plan_path), "--max-moves", "0"])
    printed = json.loads(capsys.readouterr().out)
    assert code == 0 and printed["moved_items"] == [] and printed["gpus_used"] >= printed["lower_bound_gpus"]
    code = placement_main(["place", "--profiles", str(profile_path), "--gpu", "V99", "--no-plot"])
    assert code == 2 and "unknown GPU model 'V99'" in capsys.readouterr().err


def test_cli_bench_writes_json_and_png(tmp_path, capsys):
    code = placement_main(["bench", "--models", "30", "--exact-models", "6", "--noise-days", "2",
                           "--time-limit", "0.5", "--output-dir", str(tmp_path), "--name", "t",
                           "--simulated-day-models", "20", "--simulated-day-window", "2", "--slots", "24"])
    assert code == 0
    result = json.loads((tmp_path / "t.json").read_text())
    day = result["simulated_day"]
    assert day["label"].startswith("SIMULATED") and len(day["variants"]) == 6
    assert (tmp_path / "t_simulated_day.json").exists() and (tmp_path / "t_simulated_day.png").exists()
    assert [row["set"] for row in result["plans"]] == ["synthetic 6 (exact)", "synthetic 30"]
    assert result["machine"]["cpu_count"] >= 1 and result["overload_simulated"][0]["days"] == 2
    assert (tmp_path / "t.png").exists() and (tmp_path / "t_synthetic_30_plan.png").exists()


def test_recorded_prometheus_rates_fold_into_a_profile(tmp_path, capsys):
    from lithos_ray.placement.recording import samples_from_prometheus_matrix, traffic_from_samples
    start_s = 1_700_006_400                      # a UTC midnight
    series = []
    for name, busy_hour in (("chat", 9), ("embed", 21)):
        values = [[start_s + step * 300, str(10.0 if (step * 300 // 3600) % 24 == busy_hour else 1.0)]
                  for step in range(2 * 288)]    # two days, 5-minute steps
        series.append({"metric": {"deployment": name, "application": "app"}, "values": values})
    response = {"status": "success", "data": {"resultType": "matrix", "result": series}}
    traffic = traffic_from_samples(samples_from_prometheus_matrix(response), slots_per_day=24)
    assert traffic["chat"][9] == 10.0 and traffic["chat"][10] == 1.0 and traffic["embed"][21] == 10.0
    shifted = traffic_from_samples(samples_from_prometheus_matrix(response), 24, utc_offset_h=2.0)
    assert shifted["chat"][11] == 10.0
    with pytest.raises(ProfileError, match=r"no samples in slot\(s\) \[12, 13"):
        traffic_from_samples({"x": [(start_s + h * 3600, 1.0) for h in range(12)]}, 24)
    with pytest.raises(ProfileError, match="has no 'deployment' label"):
        samples_from_prometheus_matrix({"data": {"resultType": "matrix", "result": [{"metric": {}, "values": []}]}})
    (tmp_path / "rates.json").write_text(json.dumps(response))
    (tmp_path / "models.json").write_text(json.dumps({"slots_per_day": 24, "models": {
        "chat": {"tpcs_per_rps": 2.0, "slo_ms": 100}, "embed": {"tpcs_per_rps": 1.0, "slo_ms": 500}}}))
    code = placement_main(["generate", "--prometheus", str(tmp_path / "rates.json"), "--models",
                           str(tmp_path / "models.json"), "--output", str(tmp_path / "set.json")])
    assert code == 0 and "wrote 2 models x 24 slots" in capsys.readouterr().out
    assert load_profile_set(tmp_path / "set.json").traffic["embed"][21] == 10.0


def _variants_without_timing(result: dict) -> list[dict]:
    return [{k: v for k, v in variant.items() if k != "simulated_requests_per_wall_s"}
            for variant in result["variants"]]


def test_simulated_day_attainment_is_a_share_and_reproducible():
    profile_set = synthetic_profile_set(30, seed=2, slots_per_day=24)
    plan = plan_placement(profile_set, time_limit_s=0.5, exact_max_items=0)
    first = compare_simulated_day(profile_set, plan, seed=3, window_s=4)
    assert first["simulated"] is True and first["label"].startswith("SIMULATED")
    assert any("no stealing" in limit for limit in first["simulator_limits"])
    assert [v["variant"] for v in first["variants"]] == [
        "plan, slo_quota", "plan, demand_quota", "plan, static",
        "peak packing, slo_quota", "peak packing, demand_quota", "peak packing, static"]
    for variant in first["variants"]:
        assert variant["requests"] > 1000 and 0.0 <= variant["slo_attainment"] <= 1.0
        assert variant["gpus_used"] == (plan.gpus_used if variant["plan"] == "plan" else plan.peak_packing_gpus)
        for model in variant["per_model"].values():
            assert model["slo_attainment"] is None or 0.0 <= model["slo_attainment"] <= 1.0
            assert model["within_slo"] + model["unfinished_at_window_end"] <= model["requests"]
    # both plans see the same traffic (same noise, same arrivals per replica)
    assert len({v["requests"] for v in first["variants"]}) == 1
    again = compare_simulated_day(profile_set, plan, seed=3, window_s=4)
    assert _variants_without_timing(again) == _variants_without_timing(first)
    other = compare_simulated_day(profile_set, plan, seed=4, window_s=4, policies=("static",))
    assert other["variants"][0]["requests"] != first["variants"][2]["requests"]


def test_simulated_day_overloaded_gpu_misses_slos():
    traffic = {f"m{i}": _day_peak_profile(30.0, peak_slot=12) for i in range(4)}
    profile_set = build_profile_set(_profile_data(traffic))     # SLO 100 ms each
    problem = build_problem(profile_set)
    from lithos_ray.placement.planner import make_plan
    crowded = make_plan(problem, profile_set, np.array([0, 0, 0, 0]), "by hand", False, 0.0)
    spread = make_plan(problem, profile_set, np.array([0, 0, 1, 1]), "by hand", False, 0.0)
    observed = profile_set.demand_matrix_tpcs()                 # no noise: the profile itself
    for policy in ("slo_quota", "demand_quota", "static"):
        over = simulate_plan_day(crowded, profile_set, observed, policy, window_s=3, seed=1)
        fits = simulate_plan_day(spread, profile_set, observed, policy, window_s=3, seed=1)
        assert sum(over.requests_by_model.values()) == sum(fits.requests_by_model.values())
        assert fits.slo_attainment > 0.95, policy
        assert over.slo_attainment < fits.slo_attainment - 0.2, policy
        peak_slot = int(np.argmax(over.requests_by_slot))
        assert over.within_slo_by_slot[peak_slot] < 0.5 * over.requests_by_slot[peak_slot]


def test_simulated_day_rejects_bad_input():
    profile_set = synthetic_profile_set(6, seed=1, slots_per_day=24)
    plan = plan_placement(profile_set, time_limit_s=0.2, exact_max_items=0)
    with pytest.raises(ProfileError, match="unknown TPC policy 'fair'; allowed: slo_quota, demand_quota, static"):
        compare_simulated_day(profile_set, plan, policies=("fair",))
    with pytest.raises(ProfileError, match="unknown request shape 'gpt'; known shapes: matmul_8192_bf16"):
        compare_simulated_day(profile_set, plan, request="gpt")
    with pytest.raises(ProfileError, match=r"window_s \(simulated seconds per slot\) must be in \(0, 3600\]"):
        simulate_plan_day(plan, profile_set, profile_set.demand_matrix_tpcs(), window_s=0)
    other = synthetic_profile_set(6, seed=1, slots_per_day=48)
    with pytest.raises(ProfileError, match="the plan has 24 slots per day and the profile set 48"):
        compare_simulated_day(other, plan)


def test_cli_simulate_day_writes_labelled_json_and_png(tmp_path, capsys):
    code = placement_main(["simulate-day", "--synthetic", "12", "--slots", "24", "--window", "2",
                           "--time-limit", "0.3", "--output-dir", str(tmp_path), "--name", "day"])
    out = capsys.readouterr().out
    assert code == 0 and "SIMULATED day: 12 models" in out and "peak packing, static" in out
    record = json.loads((tmp_path / "day.json").read_text())
    assert record["simulated"] is True and record["command"] and "git_commit" in record and record["machine"]["cpu_count"]
    assert record["simulator_limits_source"] == "docs/SIMULATOR.md, section Limits"
    assert (tmp_path / "day.png").stat().st_size > 10_000
    code = placement_main(["simulate-day", "--synthetic", "12", "--slots", "24", "--policies", "slo_quota,x",
                           "--output-dir", str(tmp_path)])
    assert code == 2 and "unknown TPC policy 'x'" in capsys.readouterr().err
