"""The simulated GPU: calibration fits, sharing model, closed-form path vs event loop, speed, inputs."""
import time

import numpy as np
import pytest

from lithos_ray.scheduler.calibration import (BERT_BASE_B1, CALIBRATIONS, ELEMENTWISE_MUL_1GIB, MATMUL_8192_BF16,
                                              WORKLOADS, bert_base_b1, fit_latency_model, named_workload)
from lithos_ray.scheduler.device import Device, Telemetry
from lithos_ray.scheduler.gpu_models import lookup_model
from lithos_ray.scheduler.simulated import (ClosedLoop, KernelModel, KernelSequence, OpenLoop, SimulatedDevice,
                                            SimulatedGpu, lindley_departures_ms, simulate_client)

H100 = lookup_model("H100")


# --- calibration -------------------------------------------------------------------------------

@pytest.mark.parametrize("calibration, tolerance", [
    (MATMUL_8192_BF16, 0.05),       # the 8-SM point is super-linear (19.6 vs 2 x 9.5), so not exact
    (ELEMENTWISE_MUL_1GIB, 0.02),
    (BERT_BASE_B1, 1e-9),           # two points, two parameters
])
def test_fit_reproduces_measurements_within_tolerance(calibration, tolerance):
    errors = calibration.relative_errors()
    assert np.max(np.abs(errors)) <= tolerance, (calibration.kernel.name, errors)


def test_elementwise_kernel_saturates_where_design_md_says():
    # DESIGN.md: "a memory-bound elementwise kernel saturated at about 32-64 SMs" = 16-32 TPCs.
    assert 16 <= ELEMENTWISE_MUL_1GIB.kernel.saturation_tpcs <= 32
    assert MATMUL_8192_BF16.kernel.saturation_tpcs is None


def test_matmul_model_predicts_throughput_kept_on_112_sms():
    # Not used in the fit: DESIGN.md, BE (8192^3 matmul loop) on 112 SMs kept 81% of its throughput.
    kernel = MATMUL_8192_BF16.kernel
    kept = kernel.latency_ms(66) / kernel.latency_ms(56)
    assert kept == pytest.approx(0.81, rel=0.10)


def test_fit_recovers_known_parameters():
    truth = KernelModel("truth", 40.0, 0.3, 12.0)
    points = [(sms, truth.latency_ms(sms / 2)) for sms in (4, 8, 16, 24, 32, 64, 132)]
    fitted = fit_latency_model("fitted", points, saturates=True)
    assert fitted.m_tpc_ms == pytest.approx(40.0, rel=1e-9)
    assert fitted.b_ms == pytest.approx(0.3, rel=1e-9)
    assert fitted.saturation_tpcs == 12.0


def test_named_workloads():
    assert set(WORKLOADS) == {"bert_base_b1", "matmul_train_step", "elementwise_mul_1gib"}
    assert named_workload("bert_base_b1") == bert_base_b1()
    assert bert_base_b1().latency_ms(66) == pytest.approx(3.7)
    assert named_workload("matmul_train_step").latency_ms(66) == pytest.approx(4 * MATMUL_8192_BF16.kernel.latency_ms(66))
    with pytest.raises(ValueError, match="known workloads: bert_base_b1"):
        named_workload("resnet")
    assert set(CALIBRATIONS) == {"matmul_8192_bf16", "elementwise_mul_1gib", "bert_base_b1_forward"}


def test_other_gpu_models_scale_parallel_work_only():
    a100 = lookup_model("A100")
    kernel = MATMUL_8192_BF16.kernel
    assert kernel.latency_ms(8, a100.relative_tpc_speed) == pytest.approx(
        kernel.m_tpc_ms / (8 * a100.relative_tpc_speed) + kernel.b_ms)
    step = ClosedLoop(kernel)
    on_h100 = simulate_client(H100, 8, step, duration_s=1.0)
    on_a100 = simulate_client(a100, 8, step, duration_s=1.0)
    assert on_a100.latencies_ms[0] == pytest.approx(kernel.latency_ms(8, 0.39))
    assert on_a100.completed < on_h100.completed


# --- sharing model -------------------------------------------------------------------------------

def test_disjoint_partitions_give_each_client_its_solo_latency():
    bert, train = named_workload("bert_base_b1"), named_workload("matmul_train_step")
    gpu = SimulatedGpu(H100)
    gpu.add_client("bert", range(0, 8), OpenLoop(bert, rate_per_s=50))
    gpu.add_client("train", range(8, 66), ClosedLoop(train))
    shared = gpu.run(60.0, seed=3)
    for name, tpc_ids, workload in (("bert", range(0, 8), OpenLoop(bert, rate_per_s=50)),
                                    ("train", range(8, 66), ClosedLoop(train))):
        alone_gpu = SimulatedGpu(H100)
        alone_gpu.add_client(name, tpc_ids, workload)     # same name and seed: same arrivals
        alone = alone_gpu.run(60.0, seed=3).clients[name]
        assert np.array_equal(shared.clients[name].latencies_ms, alone.latencies_ms)
        assert shared.clients[name].busy_s == alone.busy_s
    assert shared.clients["train"].latencies_ms[0] == pytest.approx(train.latency_ms(58))
    assert shared.clients["bert"].latencies_ms.min() == pytest.approx(bert.latency_ms(8))
    # and the event loop agrees when forced
    forced = gpu.run(60.0, seed=3, event_loop_only=True)
    assert forced.clients["bert"].latencies_ms == pytest.approx(shared.clients["bert"].latencies_ms, rel=1e-9)


def test_two_clients_on_same_tpcs_each_take_about_twice_as_long():
    kernel = MATMUL_8192_BF16.kernel    # compute-bound: b is 0.26 ms of 9.5 ms on 8 TPCs
    gpu = SimulatedGpu(H100)
    gpu.add_client("a", range(8), ClosedLoop(kernel))
    gpu.add_client("b", range(8), ClosedLoop(kernel))
    result = gpu.run(10.0)
    solo_ms = kernel.latency_ms(8)
    for client in result.clients.values():
        assert 1.9 <= np.median(client.latencies_ms) / solo_ms <= 2.0
        assert client.completed == pytest.approx(10_000 / kernel.latency_ms(4), abs=1)
    assert result.tpc_busy_s == pytest.approx(8 * 10.0)


def test_pure_parallel_kernel_shared_three_ways_takes_exactly_three_times_as_long():
    kernel = KernelModel("pure", 30.0, 0.0)
    gpu = SimulatedGpu(H100)
    for name in "abc":
        gpu.add_client(name, range(10), ClosedLoop(kernel))
    result = gpu.run(5.0)
    for client in result.clients.values():
        assert client.latencies_ms == pytest.approx(np.full(client.completed, 3 * kernel.latency_ms(10)))


def test_partial_overlap_shares_only_the_common_tpcs():
    kernel = KernelModel("pure", 30.0, 0.0)
    gpu = SimulatedGpu(H100)
    gpu.add_client("a", range(0, 10), ClosedLoop(kernel))
    gpu.add_client("b", range(5, 15), ClosedLoop(kernel))
    result = gpu.run(5.0)
    # each has 5 TPCs alone and half of 5 shared ones: t_eff = 7.5
    assert np.median(result.clients["a"].latencies_ms) == pytest.approx(kernel.latency_ms(7.5))
    assert result.tpc_utilization == pytest.approx(15 / 66)


def test_saturated_kernel_gains_nothing_beyond_saturation():
    kernel = ELEMENTWISE_MUL_1GIB.kernel
    assert kernel.latency_ms(66) == pytest.approx(kernel.latency_ms(kernel.saturation_tpcs))
    assert kernel.latency_ms(4) > 3 * kernel.latency_ms(66)


# --- closed form vs event loop -----------------------------------------------------------------

def test_lindley_recursion_matches_the_loop():
    rng = np.random.default_rng(0)
    arrivals = np.sort(rng.uniform(0, 100, 500))
    service = rng.exponential(0.25, 500)
    expected, last = [], 0.0
    for a, s in zip(arrivals, service):
        last = max(a, last) + s
        expected.append(last)
    assert lindley_departures_ms(arrivals, service) == pytest.approx(np.array(expected), rel=1e-12)


@pytest.mark.parametrize("seed", range(6))
def test_closed_form_equals_event_loop_on_random_clients(seed):
    rng = np.random.default_rng(seed)
    gpu = SimulatedGpu(H100)
    first_tpc = 0
    for c in range(3):
        tpcs = int(rng.integers(1, 20))
        kernels = [KernelModel(f"k{j}", float(rng.uniform(0, 50)), float(rng.uniform(0.01, 2)),
                               None if rng.random() < 0.5 else float(rng.uniform(1, 30)))
                   for j in range(int(rng.integers(1, 4)))]
        sequence = KernelSequence(f"s{c}", kernels + kernels[:1])
        workload = ClosedLoop(sequence) if c == 2 else OpenLoop(sequence, float(rng.uniform(10, 300)))
        gpu.add_client(f"c{c}", range(first_tpc, first_tpc + tpcs), workload)
        first_tpc += tpcs
    fast = gpu.run(20.0, seed=seed)
    loop = gpu.run(20.0, seed=seed, event_loop_only=True)
    for name, expected in fast.clients.items():
        got = loop.clients[name]
        assert (got.arrived, got.completed) == (expected.arrived, expected.completed)
        assert got.latencies_ms == pytest.approx(expected.latencies_ms, rel=1e-9, abs=1e-9)
        assert got.busy_s == pytest.approx(expected.busy_s, rel=1e-9)
    assert loop.tpc_busy_s == pytest.approx(fast.tpc_busy_s, rel=1e-9)


def test_open_loop_mean_latency_matches_md1_queue_formula():
    # M/D/1: mean wait = rho * S / (2 * (1 - rho)) (Pollaczek-Khinchine), independent of the code.
    request = named_workload("bert_base_b1")
    service_ms = request.latency_ms(8)
    rate_per_s = 150.0
    rho = rate_per_s * service_ms / 1000
    result = simulate_client(H100, 8, OpenLoop(request, rate_per_s), duration_s=3600, seed=7)
    expected_ms = service_ms + rho * service_ms / (2 * (1 - rho))
    assert result.latencies_ms.mean() == pytest.approx(expected_ms, rel=0.03)
    assert result.busy_s == pytest.approx(rho * 3600, rel=0.01)
    assert result.throughput_per_s == pytest.approx(rate_per_s, rel=0.01)


def test_same_seed_same_result_other_seed_other_result():
    workload = OpenLoop(named_workload("bert_base_b1"), 100)
    a = simulate_client(H100, 8, workload, 30.0, seed=1)
    b = simulate_client(H100, 8, workload, 30.0, seed=1)
    c = simulate_client(H100, 8, workload, 30.0, seed=2)
    assert np.array_equal(a.latencies_ms, b.latencies_ms)
    assert not np.array_equal(a.latencies_ms, c.latencies_ms)


# --- speed -------------------------------------------------------------------------------------

def _busy_gpu(train_tpc_ids) -> SimulatedGpu:
    gpu = SimulatedGpu(H100)
    gpu.add_client("bert", range(0, 8), OpenLoop(named_workload("bert_base_b1"), rate_per_s=200))
    gpu.add_client("elementwise", range(8, 24), OpenLoop(named_workload("elementwise_mul_1gib"), rate_per_s=300))
    gpu.add_client("train", train_tpc_ids, ClosedLoop(named_workload("matmul_train_step")))
    return gpu


@pytest.mark.parametrize("label, train_tpc_ids", [("disjoint", range(24, 66)), ("overlapping", range(0, 66))])
def test_a_simulated_hour_of_a_busy_gpu_is_fast(label, train_tpc_ids):
    gpu = _busy_gpu(train_tpc_ids)
    started = time.perf_counter()
    result = gpu.run(3600.0, seed=0)
    elapsed_s = time.perf_counter() - started
    print(f"\nsimulated hour, 3 clients, {label} TPC sets: {elapsed_s:.2f} s wall")
    assert result.clients["bert"].completed > 700_000
    assert elapsed_s < 20.0


# --- inputs ------------------------------------------------------------------------------------

def test_bad_inputs_fail_with_clear_messages():
    gpu = SimulatedGpu(H100)
    kernel = MATMUL_8192_BF16.kernel
    with pytest.raises(ValueError, match=r"out of range; this GPU has TPC ids 0..65"):
        gpu.add_client("x", [0, 66], ClosedLoop(kernel))
    with pytest.raises(ValueError, match="tpc_ids is empty"):
        gpu.add_client("x", [], ClosedLoop(kernel))
    with pytest.raises(ValueError, match="tpc_ids must be integers"):
        gpu.add_client("x", [0, 1.5], ClosedLoop(kernel))
    with pytest.raises(ValueError, match="duplicates"):
        gpu.add_client("x", [1, 1], ClosedLoop(kernel))
    with pytest.raises(ValueError, match="rate_per_s must be a finite number > 0"):
        OpenLoop(kernel, -5)
    with pytest.raises(ValueError, match="must be a KernelSequence or a KernelModel"):
        ClosedLoop("matmul")
    with pytest.raises(ValueError, match="workload must be OpenLoop or ClosedLoop"):
        gpu.add_client("x", [0], kernel)
    with pytest.raises(ValueError, match="no clients"):
        gpu.run(1.0)
    gpu.add_client("x", [0], ClosedLoop(kernel))
    with pytest.raises(ValueError, match="already added"):
        gpu.add_client("x", [1], ClosedLoop(kernel))
    for duration in (0, -1.0, float("inf")):
        with pytest.raises(ValueError, match="duration_s must be a finite number > 0"):
            gpu.run(duration)
    with pytest.raises(ValueError, match="b_ms must be"):
        KernelModel("k", 1.0, -0.1)
    with pytest.raises(ValueError, match="must be > 0"):
        KernelModel("k", 0.0, 0.0)
    with pytest.raises(ValueError, match="is empty"):
        KernelSequence("s", ())
    with pytest.raises(ValueError, match=r"tpcs must be an integer in 1..66 for H100"):
        simulate_client(H100, 67, ClosedLoop(kernel), 1.0)
    with pytest.raises(ValueError, match="at most"):
        simulate_client(H100, 8, OpenLoop(kernel, 1e6), 3600.0)


# --- the Device -----------------------------------------------------------------------------------

def test_simulated_device_holds_allowances():
    uuid = "SIM-H100-3f9a2c-1"
    device = SimulatedDevice(H100, 1, uuid)
    assert isinstance(device, Device)
    info = device.info()
    assert (info.index, info.uuid, info.model, info.sms, info.tpcs, info.simulated) == (1, uuid, "H100", 132, 66, True)
    device.set_allowance(0, range(0, 8))
    device.set_allowance(3, [8, 9, 10])
    device.set_allowance(0, [0, 1])
    assert device.allowances() == {0: (0, 1), 3: (8, 9, 10)}
    device.allowances()[0] = (5,)               # a copy
    assert device.allowances()[0] == (0, 1)
    device.clear_allowance(3)
    device.clear_allowance(3)
    assert device.allowances() == {0: (0, 1)}
    assert device.telemetry() == Telemetry(None, None, None, simulated=True)
    with pytest.raises(ValueError, match="out of range"):
        device.set_allowance(1, [66])
    with pytest.raises(ValueError, match="slot must be an integer >= 0"):
        device.set_allowance(-1, [0])
    with pytest.raises(ValueError, match="must start with 'SIM-'"):
        SimulatedDevice(H100, 0, "GPU-1234")
    device.close()
    device.close()
    assert device.allowances() == {}
