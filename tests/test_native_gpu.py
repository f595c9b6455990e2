"""GPU tests of liblithos.so: launches really run on the allowance. Skipped without a GPU."""
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest

from lithos_ray import native

ROOT = pathlib.Path(__file__).resolve().parents[1]
SPIN_WORKER = ROOT / "benchmarks" / "native" / "spin_worker.py"


def _gpu_reason():
    if shutil.which("nvidia-smi") is None:
        return "no nvidia-smi: no NVIDIA GPU on this machine"
    if subprocess.run(["nvidia-smi", "-L"], capture_output=True).returncode != 0:
        return "nvidia-smi finds no GPU"
    try:
        import cuda.bindings  # noqa: F401
        import pynvml  # noqa: F401
    except ImportError as exc:
        return f"GPU tests need cuda-bindings and nvidia-ml-py: {exc}"
    return None


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(_gpu_reason() is not None, reason=str(_gpu_reason()))]


@pytest.fixture(scope="module")
def table():
    assert subprocess.run(["make", "-C", str(ROOT / "native")], capture_output=True).returncode == 0
    t = native.AllowanceTable.create(native._default_gpu_uuid(), tempfile.mkdtemp(prefix="lithos-test-"))
    native.probe_layout_into(t)
    yield t
    t.close()


def spin_ms(table, slot, tpcs, blocks, seconds=1.0, extra_env=None):
    table.set_allowance(slot, tpcs)
    env = {**os.environ, **native.client_env(table.path, slot), **(extra_env or {})}
    proc = subprocess.run([sys.executable, str(SPIN_WORKER), str(blocks), str(time.time()), str(seconds), "t"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])["ms_per_launch"], proc.stderr


def test_probe_maps_every_tpc_of_a_cosched_group(table):
    group_of_tpc = table.cosched_map()
    assert group_of_tpc is not None and len(group_of_tpc) == 66
    in_groups = [g for g in group_of_tpc if g != 255]
    assert len(in_groups) == 60  # 15 groups of 8 SMs = 60 TPCs; 6 TPCs lie outside every group
    assert all(in_groups.count(g) == 4 for g in set(in_groups))
    groups = table.cosched_groups()
    assert len(groups) == 15 and all(len(tpcs) == 4 for tpcs in groups.values())


def test_half_the_tpcs_take_twice_as_long(table):
    blocks = 16 * 2 * 22  # one wave on 22 TPCs
    on_22, stderr = spin_ms(table, 0, list(range(22)), blocks)
    on_11, _ = spin_ms(table, 0, list(range(11)), blocks)
    assert 1.8 < on_11 / on_22 < 2.2, (on_22, on_11, stderr)


def test_launches_are_recorded_with_their_allowance(table):
    start = native.LaunchRing(native.ring_path(table.path, 1)).head()
    spin_ms(table, 1, list(range(8)), 16 * 16, seconds=0.3, extra_env={"LITHOS_SAMPLE_EVERY": "1"})
    records, _ = table.read_launches(1, since_index=start)
    spins = [r for r in records if r["kernel_name"] == b"spin"]
    assert len(spins) > 10
    assert all(int(r["tpcs"]) == 8 and int(r["view"]) == 0 and tuple(r["block"]) == (128, 1, 1) for r in spins)
    # Sampling is best effort (4 timing-event pairs per stream, reused once finished): most
    # launches here overlap, so expect a fair share, and one wave of 0.2 ms each.
    timed = [int(r["gpu_ns"]) / 1e6 for r in spins if int(r["gpu_ns"]) > 0]
    assert len(timed) > len(spins) // 10
    assert 0.15 < sorted(timed)[len(timed) // 2] < 0.3


@pytest.mark.parametrize("allowance", ["0-31", "groups", "all"])
def test_torch_library_kernels_run_confined_without_errors(table, allowance):
    """cuBLAS (cluster GEMMs among them), cuDNN and SDPA under three allowances: TPCs 0-31 (co-scheduled
    groups 0-3 and 16 TPCs in no whole group: two green contexts), every co-scheduled group (one green
    context for all kernels) and the whole GPU (the program's own streams)."""
    code = ("import torch\n"
            "for dt in (torch.float16, torch.bfloat16, torch.float32):\n"
            "    for n in (64, 256, 4096):\n"
            "        a = torch.randn(n, n, device='cuda', dtype=dt); ref = (a.double() @ a.double())\n"
            "        err = ((a @ a).double() - ref).norm() / ref.norm(); assert err < 2e-2, (dt, n, float(err))\n"
            "x = torch.randn(8, 64, 56, 56, device='cuda', dtype=torch.half)\n"
            "torch.nn.functional.conv2d(x, torch.randn(64, 64, 3, 3, device='cuda', dtype=torch.half))\n"
            "q = torch.randn(4, 12, 128, 64, device='cuda', dtype=torch.half)\n"
            "torch.nn.functional.scaled_dot_product_attention(q, q, q)\n"
            "torch.cuda.synchronize(); print('ok')\n")
    tpcs = {"0-31": list(range(0, 32)), "all": list(range(66)),
            "groups": sorted(t for group in table.cosched_groups().values() for t in group)}[allowance]
    table.set_allowance(2, tpcs)
    start = native.LaunchRing(native.ring_path(table.path, 2)).head()
    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ, **native.client_env(table.path, 2)},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]
    records, _ = table.read_launches(2, since_index=start)
    assert {int(r["tpcs"]) for r in records if int(r["view"]) == 0} == {len(tpcs)}  # TPC view: the allowance
    clustered = [r for r in records if int(r["cluster"].prod()) > 2]
    assert all(int(r["view"]) == 1 for r in clustered)  # co-scheduled view, never unconfined


def test_mps_start_query_stop():
    from lithos_ray import mps
    run_dir = tempfile.mkdtemp(prefix="lithos-mps-test-")
    env = mps.start_mps(run_dir)
    try:
        assert mps.mps_running(run_dir)
        assert env["CUDA_MPS_PIPE_DIRECTORY"].startswith(run_dir)
    finally:
        mps.stop_mps(run_dir)
    assert not mps.mps_running(run_dir)


# ---- lending ----

@pytest.fixture
def mps_env():
    """An MPS control daemon for the test: without MPS two processes time-slice the GPU (each at half speed)."""
    from lithos_ray import mps
    run_dir = tempfile.mkdtemp(prefix="lithos-mps-lend-")
    env = mps.start_mps(run_dir)
    yield env
    mps.stop_mps(run_dir)


def _spin_pair(table, borrower_env, lender_env=None, blocks=16 * 2 * 22, seconds=1.5):
    """Runs spin_worker.py in slot 3 (and, with lender_env, in slot 4 at the same time). Returns their JSON."""
    start_at = time.time() + 3.0  # both past CUDA start-up before timing
    procs = [subprocess.Popen([sys.executable, str(SPIN_WORKER), str(blocks), str(start_at), str(seconds), tag],
                              env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for tag, env in (("borrower", borrower_env), ("lender", lender_env)) if env is not None]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def test_a_short_kernel_borrows_an_idle_lenders_tpcs_and_runs_faster(table):
    """Slot 3 owns TPCs 0-10, slot 4 owns 11-21 and stays idle: one wave on 22 TPCs takes about half as long."""
    table.set_allowance(3, list(range(11)))
    table.set_allowance(4, list(range(11, 22)))
    table.set_lending_knobs(atom_us=1000, idle_window_us=500, unknown_kernel_busy_us=10_000)
    env = {**native.client_env(table.path, 3), "LITHOS_SAMPLE_EVERY": "1", "LITHOS_LEND_PACE": "1",
           "LITHOS_DISPATCH": "0"}  # the launch-time rule with pacing; held launches have their own tests
    try:
        table.set_lending(3, [], low_priority=False)
        (own_only,) = _spin_pair(table, env)
        start = native.LaunchRing(native.ring_path(table.path, 3)).head()
        table.set_lending(3, [4], low_priority=True)   # paced: the spin loop queues far ahead
        (lending,) = _spin_pair(table, env)
    finally:
        table.set_lending(3, [], low_priority=False)
        table.set_lending_knobs(atom_us=250, idle_window_us=500, unknown_kernel_busy_us=10_000)
    records, _ = table.read_launches(3, since_index=start)
    spins = [r for r in records if r["kernel_name"] == b"spin"]
    borrowed = [r for r in spins if native.lenders_of(r) == [4]]
    assert len(borrowed) > 0.9 * len(spins), (len(borrowed), len(spins))
    assert all(int(r["tpcs"]) == 22 and int(r["own_tpcs"]) == 11 for r in borrowed)
    assert lending["ms_per_launch"] < 0.65 * own_only["ms_per_launch"], (lending, own_only)
    predicted_ns, measured_ns = native.prediction_pairs(np.array(spins))
    assert len(predicted_ns) > 10
    assert np.median(np.abs(predicted_ns - measured_ns)) < 50_000


def test_an_active_lender_runs_at_its_solo_speed_next_to_a_borrower(table, mps_env):
    """Both spin at once: the lender's launches publish its activity, the borrower stops borrowing."""
    table.set_allowance(3, list(range(11)))
    table.set_allowance(4, list(range(11, 22)))
    table.set_lending_knobs(atom_us=1000, idle_window_us=500, unknown_kernel_busy_us=10_000)
    borrower_env = {**mps_env, **native.client_env(table.path, 3), "LITHOS_SAMPLE_EVERY": "1", "LITHOS_LEND_PACE": "1",
           "LITHOS_DISPATCH": "0"}  # the launch-time rule with pacing; held launches have their own tests
    lender_env = {**mps_env, **native.client_env(table.path, 4)}
    try:
        (lender_alone,) = _spin_pair(table, lender_env, blocks=16 * 2 * 11)
        start = native.LaunchRing(native.ring_path(table.path, 3)).head()
        lender_start = native.LaunchRing(native.ring_path(table.path, 4)).head()
        table.set_lending(3, [4], low_priority=True)
        borrower, lender = _spin_pair(table, borrower_env, lender_env, blocks=16 * 2 * 11)
    finally:
        table.set_lending(3, [], low_priority=False)
        table.set_lending_knobs(atom_us=250, idle_window_us=500, unknown_kernel_busy_us=10_000)
    assert lender["ms_per_launch"] < 1.10 * lender_alone["ms_per_launch"], (lender, lender_alone)
    word = table.activity(4)
    assert word.last_launch_ns is not None and table.activity_writer_pid(4) > 0
    records, _ = table.read_launches(3, since_index=start)
    lender_launches_ns = [int(r["host_ns"]) for r in table.read_launches(4, since_index=lender_start)[0]][1:]  # after warm-up
    while_lender_ran = [r for r in records if r["kernel_name"] == b"spin"
                        and lender_launches_ns[0] + 1_000_000 < int(r["host_ns"]) < lender_launches_ns[-1]]
    assert while_lender_ran and sum(bool(native.lenders_of(r)) for r in while_lender_ran) < 0.05 * len(while_lender_ran)


# ---- deferred joins ----

DEFERRED_JOIN_PROGRAM = r"""
import ctypes, hashlib, json, sys
import torch

torch.manual_seed(0)
torch.backends.cudnn.deterministic = True
results = {}
def keep(name, t):
    results[name] = hashlib.sha256(t.detach().contiguous().cpu().numpy().tobytes()).hexdigest()

x = torch.rand(1 << 20, device="cuda")          # PyTorch's default stream = the legacy stream 0
for i in range(3000):                            # a long run of small kernels
    x = x * 1.0001 + 0.001
    if i % 500 == 0:
        x = torch.sin(x)
first = x.cpu()                                  # synchronous copy right after the run
keep("after_run", first)
c = x.clone()
keep("clone", c)
side = torch.cuda.Stream()                       # non-default stream (a green stream under the shim)
done = torch.cuda.Event()
y = x * 3
done.record()                                    # cudaEventRecord on the default stream
with torch.cuda.stream(side):
    side.wait_event(done)
    z = y.sqrt() + 1
    back = torch.cuda.Event()
    back.record()
while not back.query():                          # cudaEventQuery (no join needed: recorded after one)
    pass
torch.cuda.current_stream().wait_event(back)
w = z * y
for _ in range(200):
    w = w * 0.999 + 0.0001
a = torch.randn(256, 256, device="cuda", requires_grad=True)
loss = ((a @ a).tanh() * w[: 256 * 256].view(256, 256)).sum()
loss.backward()                                  # kernels from the autograd engine's device thread
keep("grad", a.grad)
q = torch.randn(2, 4, 256, 64, device="cuda", dtype=torch.float16)
for _ in range(20):                              # attention kernels set their shared memory size per launch
    attention = torch.nn.functional.scaled_dot_product_attention(q, q, q)
keep("attention", attention)
torch.cuda.synchronize()                         # cudaDeviceSynchronize
keep("w", w)
host = torch.empty(w.shape, pin_memory=True)
host.copy_(w, non_blocking=True)
torch.cuda.current_stream().synchronize()
keep("async_copy", host)
lib = ctypes.CDLL(None)
counts = {}
if hasattr(lib, "lithos_client_launch_counts"):
    c = (ctypes.c_uint64 * 4)()
    lib.lithos_client_launch_counts(c, 4)
    j = (ctypes.c_uint64 * 3)()
    lib.lithos_client_join_counts(j, 3)
    lib.lithos_client_stub.restype = ctypes.c_char_p
    flushes = {}
    for i in range(4096):
        n = ctypes.c_uint64()
        name = lib.lithos_client_stub(i, None, ctypes.byref(n))
        if name is None:
            break
        if n.value:
            flushes[name.decode()] = n.value
    d = (ctypes.c_uint64 * 14)()
    lib.lithos_client_dispatch_counts(d, 14)
    b = (ctypes.c_uint64 * 1)()
    lib.lithos_client_lending_counts(b, 1)
    counts = {"direct": c[0], "paired": c[1], "unconfined": c[2], "continued": c[3], "runs": j[0], "joins_paid": j[1],
              "flushes_by_stub": flushes, "held": d[0], "sent": d[1], "dispatch_failed": d[7], "no_layout": d[8],
              "drain_at_once": d[5], "held_memsets": d[10], "held_copies": d[11], "same_attribute": d[12],
              "borrowed": b[0]}
print(json.dumps({"results": results, "counts": counts}))
"""


def _run_deferred_join_program(env):
    proc = subprocess.run([sys.executable, "-c", DEFERRED_JOIN_PROGRAM], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_deferred_joins_give_bitwise_the_results_of_the_program_without_the_shim(table):
    """Legacy-stream runs, a synchronous copy, events across a created stream, cudaEventQuery, the
    autograd thread, cudaDeviceSynchronize and an async copy: the same bytes with the shim (deferred
    joins on and off) as without it, and most default-stream launches skip the event calls."""
    table.set_allowance(5, list(range(0, 32)))
    shim_env = {**os.environ, **native.client_env(table.path, 5)}
    plain = _run_deferred_join_program(dict(os.environ))
    deferred = _run_deferred_join_program(shim_env)
    eager = _run_deferred_join_program({**shim_env, "LITHOS_DEFER_JOIN": "0"})
    assert deferred["results"] == plain["results"], deferred["counts"]
    assert eager["results"] == plain["results"]
    counts = deferred["counts"]
    assert counts["paired"] > 5000, counts
    assert counts["continued"] > 0.9 * counts["paired"], counts   # flushes_by_stub says what ended the runs
    assert eager["counts"]["continued"] == 0 and eager["counts"]["runs"] == 0


def test_held_launches_give_bitwise_the_results_of_the_program_without_the_shim(table):
    """LITHOS_DISPATCH=1 on a low-priority borrower with an idle lender: the same program's launches
    are held, sent by the dispatcher thread (many on the lender's TPCs) and give the same bytes."""
    table.set_allowance(5, list(range(0, 32)))
    table.set_allowance(6, list(range(32, table.tpcs_on_gpu)))
    table.set_lending(5, [6], low_priority=True)
    try:
        env = {**os.environ, **native.client_env(table.path, 5), "LITHOS_DISPATCH": "1", "LITHOS_SAMPLE_EVERY": "4"}
        plain = _run_deferred_join_program(dict(os.environ))
        held = _run_deferred_join_program(env)
    finally:
        table.set_lending(5, [], low_priority=False)
        table.clear(6)
    counts = held["counts"]
    assert held["results"] == plain["results"], counts
    sent_ops = counts["held"] + counts["held_memsets"] + counts["held_copies"]   # sent counts memsets and copies too
    assert counts["held"] > 3000 and counts["sent"] == sent_ops and counts["dispatch_failed"] == 0, counts
    assert counts["borrowed"] > 100, counts


CLUSTER_KERNEL_PROGRAM = r"""
import json, sys
import numpy as np
sys.path.insert(0, sys.argv[1])
from gpu_spin import _check
from cuda.bindings import driver as cu, nvrtc
_check(cu.cuInit(0))
device = _check(cu.cuDeviceGet(0))
_check(cu.cuCtxPushCurrent(_check(cu.cuDevicePrimaryCtxRetain(device))))
source = (b'extern "C" __global__ void __cluster_dims__(4, 1, 1) where_cluster(unsigned *sm_of_block){ unsigned s;'
          b' asm volatile("mov.u32 %0, %%smid;" : "=r"(s)); sm_of_block[blockIdx.x] = s; }')
program = _check(nvrtc.nvrtcCreateProgram(source, b"c.cu", 0, [], []))
_check(nvrtc.nvrtcCompileProgram(program, 1, [b"--gpu-architecture=sm_90"]))
cubin = b" " * _check(nvrtc.nvrtcGetCUBINSize(program))
_check(nvrtc.nvrtcGetCUBIN(program, cubin))
kernel = _check(cu.cuLibraryGetKernel(_check(cu.cuLibraryLoadData(cubin, None, None, 0, None, None, 0)), b"where_cluster"))
blocks = 256
buffer = _check(cu.cuMemAlloc(blocks * 4))
pointer = np.array([int(buffer)], dtype=np.uint64)
params = np.array([pointer.ctypes.data], dtype=np.uint64)
stream = _check(cu.cuStreamCreate(cu.CUstream_flags.CU_STREAM_NON_BLOCKING))
for s in (stream, cu.CUstream(0)):   # a created (green) stream and the default one (paired)
    _check(cu.cuLaunchKernel(cu.CUfunction(int(kernel)), blocks, 1, 1, 32, 1, 1, 0, s, params.ctypes.data, 0))
_check(cu.cuCtxSynchronize())
_check(cu.cuStreamSynchronize(stream))
host = np.zeros(blocks, dtype=np.uint32)
_check(cu.cuMemcpyDtoH(host.ctypes.data, buffer, blocks * 4))
print(json.dumps({"sms": sorted({int(x) for x in host})}))
"""


def test_a_compiled_in_cluster_kernel_launched_by_its_cukernel_handle_stays_inside_the_quota(table):
    """A kernel compiled with __cluster_dims__(4,1,1), launched by its CUkernel handle as the runtime
    launches library kernels, on an allowance of 2 whole co-scheduled groups plus 2 TPCs in no group:
    the shim reads its cluster shape through cuKernelGetFunction and sends it to the co-scheduled view
    (the 2 groups, 16 SMs). A ResNet-50 training step's cuDNN kernel of this kind ran on the whole GPU
    before (CUresult 912 in the TPC view, then unconfined)."""
    groups = list(table.cosched_groups().values())
    outside = [t for t, g in enumerate(table.cosched_map()) if g == 255][:2]
    tpcs = sorted([*groups[0], *groups[1], *outside])
    table.set_allowance(3, tpcs)
    start = native.LaunchRing(native.ring_path(table.path, 3)).head()
    proc = subprocess.run([sys.executable, "-c", CLUSTER_KERNEL_PROGRAM, str(ROOT / "tests")], capture_output=True,
                          text=True, timeout=120, env={**os.environ, **native.client_env(table.path, 3)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "unconfined" not in proc.stderr and "refused" not in proc.stderr, proc.stderr
    sms = json.loads(proc.stdout.strip().splitlines()[-1])["sms"]
    assert 0 < len(sms) <= 16, sms
    records, _ = table.read_launches(3, since_index=start)
    ours = [r for r in records if r["kernel_name"] == b"where_cluster"]
    assert len(ours) == 2, [r["kernel_name"] for r in records]
    assert all(native.VIEW_NAMES[int(r["view"])] == "cosched" and int(r["tpcs"]) == 8 for r in ours)
    assert all(tuple(r["cluster"]) == (4, 1, 1) for r in ours)


ATTRIBUTE_PROGRAM = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
from gpu_spin import _check
from cuda.bindings import driver as cu, nvrtc
_check(cu.cuInit(0))
device = _check(cu.cuDeviceGet(0))
_check(cu.cuCtxPushCurrent(_check(cu.cuDevicePrimaryCtxRetain(device))))
program = _check(nvrtc.nvrtcCreateProgram(b'extern "C" __global__ void k(int *x){ extern __shared__ int s[]; s[0] = 1; x[0] = s[0]; }',
                                          b"k.cu", 0, [], []))
_check(nvrtc.nvrtcCompileProgram(program, 1, [b"--gpu-architecture=sm_90"]))
cubin = b" " * _check(nvrtc.nvrtcGetCUBINSize(program))
_check(nvrtc.nvrtcGetCUBIN(program, cubin))
kernel = _check(cu.cuLibraryGetKernel(_check(cu.cuLibraryLoadData(cubin, None, None, 0, None, None, 0)), b"k"))
function = _check(cu.cuModuleGetFunction(_check(cu.cuModuleLoadData(cubin)), b"k"))
A = cu.CUfunction_attribute
seen = {}
for name, value in (("CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES", 100_000), ("CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT", 50)):
    attribute = getattr(A, name)
    _check(cu.cuKernelSetAttribute(attribute, value, kernel, device))
    _check(cu.cuFuncSetAttribute(function, attribute, value))
    seen[name] = [value, _check(cu.cuKernelGetAttribute(attribute, kernel, device)), _check(cu.cuFuncGetAttribute(attribute, function))]
print(json.dumps(seen))
"""


def test_the_kernel_attributes_the_shim_compares_read_back_as_set():
    """The shim skips a kernel attribute set whose value is already in force (held launches are not
    drained for it); that relies on get returning what set stored, for both attributes it compares."""
    proc = subprocess.run([sys.executable, "-c", ATTRIBUTE_PROGRAM, str(ROOT / "tests")], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert all(v[0] == v[1] == v[2] for v in seen.values()), seen


def test_a_held_spin_loop_borrows_without_pacing_and_runs_faster(table):
    """The spin loop that queues far ahead (test above) borrows with held launches instead of pacing."""
    table.set_allowance(3, list(range(11)))
    table.set_allowance(4, list(range(11, 22)))
    table.set_lending_knobs(atom_us=1000, idle_window_us=500, unknown_kernel_busy_us=10_000)
    env = {**native.client_env(table.path, 3), "LITHOS_SAMPLE_EVERY": "1", "LITHOS_DISPATCH": "1"}
    try:
        table.set_lending(3, [], low_priority=False)
        (own_only,) = _spin_pair(table, env)
        start = native.LaunchRing(native.ring_path(table.path, 3)).head()
        table.set_lending(3, [4], low_priority=True)
        (lending,) = _spin_pair(table, env)
    finally:
        table.set_lending(3, [], low_priority=False)
        table.set_lending_knobs(atom_us=250, idle_window_us=500, unknown_kernel_busy_us=10_000)
    records, _ = table.read_launches(3, since_index=start)
    spins = [r for r in records if r["kernel_name"] == b"spin"]
    borrowed = [r for r in spins if native.lenders_of(r) == [4]]
    assert len(borrowed) > 0.9 * len(spins), (len(borrowed), len(spins))
    assert lending["ms_per_launch"] < 0.65 * own_only["ms_per_launch"], (lending, own_only)


GRAPH_REPLAY_PROGRAM = r"""
import json, torch
torch.manual_seed(0)
x = torch.randn(2048, 2048, device='cuda')
side = torch.cuda.Stream()
with torch.cuda.stream(side):
    for _ in range(3): y = (x @ x).relu()        # warm-up on the capture stream
torch.cuda.synchronize()
graph = torch.cuda.CUDAGraph()
with torch.cuda.graph(graph, stream=side):
    y = (x @ x).relu()
expected = (x @ x).relu()
for _ in range(40):
    graph.replay()
    torch.cuda.synchronize()
print(json.dumps({"equal": bool(torch.equal(y, expected))}))
"""


def test_graph_replays_are_timed_and_predicted_on_the_gpu(table):
    """A CUDA graph captured and replayed under the shim: same result as eager, and sampled replays
    get GPU durations, so later replays carry a prediction near the measured duration."""
    table.set_allowance(6, list(range(0, 32)))
    start = native.LaunchRing(native.ring_path(table.path, 6)).head()
    env = {**os.environ, **native.client_env(table.path, 6), "LITHOS_SAMPLE_EVERY": "1"}
    proc = subprocess.run([sys.executable, "-c", GRAPH_REPLAY_PROGRAM], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["equal"]
    records, _ = table.read_launches(6, since_index=start)
    replays = [r for r in records if native.API_NAMES[int(r["api"])] == "cuGraphLaunch"]
    assert len(replays) == 40 and all(native.VIEW_NAMES[int(r["view"])] == "graph" for r in replays)
    assert {int(r["tpcs"]) for r in replays} == {32}
    timed_ns = [int(r["gpu_ns"]) for r in replays if int(r["gpu_ns"]) > 0]
    predicted_ns = [int(r["predicted_ns"]) for r in replays[10:]]
    assert len(timed_ns) >= 30, timed_ns
    assert all(predicted_ns), predicted_ns
    median_ns = sorted(timed_ns)[len(timed_ns) // 2]
    assert all(0.5 * median_ns < p < 2 * median_ns for p in predicted_ns), (median_ns, predicted_ns)
    print(f"graph replay: measured median {median_ns / 1e3:.0f} us, predictions {min(predicted_ns) / 1e3:.0f}-"
          f"{max(predicted_ns) / 1e3:.0f} us")


UNROLL_PROGRAM = r"""
import json, sys, time, torch, torchvision
from lithos_ray.native import process_graph_counts
torch.manual_seed(0)
torch.backends.cudnn.benchmark = False
model = torchvision.models.resnet18().cuda().eval().half()
layer = torch.nn.TransformerEncoderLayer(256, 4, batch_first=True).cuda().eval().half()
x = torch.randn(4, 3, 224, 224, device='cuda', dtype=torch.half)
t = torch.randn(4, 128, 256, device='cuda', dtype=torch.half)
def step():
    with torch.no_grad():
        return model(x), layer(t)
side = torch.cuda.Stream()
side.wait_stream(torch.cuda.current_stream())
with torch.cuda.stream(side):
    for _ in range(3): step()
torch.cuda.current_stream().wait_stream(side)
torch.cuda.synchronize()
graph = torch.cuda.CUDAGraph()
with torch.cuda.graph(graph):
    out = step()
graph.replay(); torch.cuda.synchronize()
first = [o.clone() for o in out]
same, times = True, []
for _ in range(30):
    begin = time.perf_counter()
    graph.replay()
    torch.cuda.synchronize()
    times.append(time.perf_counter() - begin)
    same &= all(torch.equal(a, b) for a, b in zip(out, first))
eager = step()
torch.cuda.synchronize()
close = all(torch.allclose(a.float(), b.float(), rtol=2e-2, atol=2e-2) for a, b in zip(first, eager))
print(json.dumps({"same": same, "close_to_eager": close, "replay_ms": sorted(times)[len(times) // 2] * 1e3,
                  "graphs": process_graph_counts(), "digest": [float(o.double().sum()) for o in first]}))
"""


def _run_unroll_program(table, slot, unroll):
    table.set_lending(slot, [slot + 1], low_priority=False, unroll_graphs=unroll)
    start = native.LaunchRing(native.ring_path(table.path, slot)).head()
    env = {**os.environ, **native.client_env(table.path, slot), "LITHOS_SAMPLE_EVERY": "1"}
    try:
        proc = subprocess.run([sys.executable, "-c", UNROLL_PROGRAM], env=env, capture_output=True, text=True, timeout=300)
    finally:
        table.set_lending(slot, [], low_priority=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records, _ = table.read_launches(slot, since_index=start)
    return json.loads(proc.stdout.strip().splitlines()[-1]), records, proc.stderr


def test_unrolled_graph_replays_give_the_same_results_and_their_kernels_borrow(table):
    """ResNet-18 and a transformer layer (cuDNN, cuBLAS, SDPA) under one CUDA graph, on 2 co-scheduled
    groups (8 TPCs) next to an idle lender of 6 (24 TPCs): with LITHOS_LEND_UNROLL_GRAPHS every replay goes kernel by kernel (no graph
    launch in the ring, nothing unconfined), the replays agree with each other and with eager, and
    some kernels borrow the lender's TPCs; without it the replays stay whole graph launches."""
    slot, lender = 7, 8
    groups = list(table.cosched_groups().values())   # whole co-scheduled groups: cluster kernels stay confined
    table.set_allowance(slot, sorted(t for g in groups[:2] for t in g))
    table.set_allowance(lender, sorted(t for g in groups[2:8] for t in g))
    table.set_lending_knobs(atom_us=1000, idle_window_us=500, unknown_kernel_busy_us=10_000)
    try:
        whole, whole_records, _ = _run_unroll_program(table, slot, unroll=False)
        unrolled, records, stderr = _run_unroll_program(table, slot, unroll=True)
    finally:
        table.set_lending_knobs(atom_us=250, idle_window_us=500, unknown_kernel_busy_us=10_000)
    assert whole["same"] and whole["close_to_eager"]
    assert [native.API_NAMES[int(r["api"])] for r in whole_records].count("cuGraphLaunch") >= 31
    graphs = unrolled["graphs"]
    assert graphs["copied"] >= 1 and graphs["not_copied"] == 0, (graphs, stderr[-2000:])
    assert graphs["replays_unrolled"] >= 31 and graphs["replays_whole"] == 0, graphs
    assert unrolled["same"] and unrolled["close_to_eager"], unrolled
    assert "cuGraphLaunch" not in [native.API_NAMES[int(r["api"])] for r in records]
    assert not [r for r in records if native.VIEW_NAMES[int(r["view"])] == "unconfined"]
    borrowed = [r for r in records if native.lenders_of(r) == [lender]]
    assert borrowed and all(int(r["tpcs"]) == 32 for r in borrowed)
    print(f"replay ms: whole {whole['replay_ms']:.3f}, unrolled {unrolled['replay_ms']:.3f}; "
          f"{graphs['nodes_sent'] // graphs['replays_unrolled']} nodes per replay; {len(borrowed)} of {len(records)} launches borrowed; "
          f"same digest as whole replays: {unrolled['digest'] == whole['digest']}")


def test_a_training_step_leaves_its_quota_only_for_clusters_no_co_scheduled_group_holds(table):
    """A ResNet-50 training step (bf16, cuDNN) on 3 whole co-scheduled groups plus the 6 TPCs in no
    group (the co-location benchmark's best-effort quota): cuDNN's xmma convolution kernels launch with
    4x4x1 clusters (16 CTAs, one per SM), which no 8-SM group holds, so those run on the whole GPU; the
    same kernels' smaller clusters, and every other launch, stay inside the quota."""
    sys.path.insert(0, str(ROOT))
    from benchmarks.native import leak_probe
    result = leak_probe.run_case(table, 9, leak_probe.allowances(table)["be_quota_3_groups_and_6_outside"],
                                 leak_probe.WORKLOADS[0], steps=3)
    assert result["ok"], result["stderr_tail"]
    unconfined = result["unconfined"]
    assert result["launches"] > 1000
    assert unconfined and all(int(np.prod(u["cluster"])) >= 16 for u in unconfined), unconfined
    print(f"3 training steps: {sum(u['launches'] for u in unconfined)} of {result['launches']} launches unconfined, "
          f"all with clusters of 16 CTAs or more")


MEMORY_OPS_PROGRAM = r"""
import json, time, torch
from lithos_ray.native import thread_launch_counts
a, b = torch.ones(1 << 27, device="cuda", dtype=torch.half), torch.empty(1 << 27, device="cuda", dtype=torch.half)
for _ in range(3): b.copy_(a)
torch.cuda.synchronize()
start = time.perf_counter()
for _ in range(40): b.copy_(a)
torch.cuda.synchronize()
ms = (time.perf_counter() - start) * 1e3 / 40
assert bool((b == 1).all())
print(json.dumps({"ms_per_copy": ms, **{k: v for k, v in thread_launch_counts().items() if k.startswith("memory_")}}))
"""


def test_a_clients_device_copies_run_on_its_own_tpcs(table):
    """PyTorch's device-to-device copies (cuMemcpyDtoDAsync, which the driver runs as kernels on SMs) go
    to the client's green stream: on one co-scheduled group (8 SMs) a 256 MiB copy takes several times
    as long as on the whole GPU, where LITHOS_ROUTE_MEMORY_OPS=0 sends it (0.85 against 0.18 ms in
    memory_op_probe_0d77512.json)."""
    table.set_allowance(3, sorted(table.cosched_groups()[0]))

    def run(extra):
        env = {**os.environ, **native.client_env(table.path, 3), **extra}
        proc = subprocess.run([sys.executable, "-c", MEMORY_OPS_PROGRAM], env=env, capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])

    routed, unrouted = run({}), run({"LITHOS_ROUTE_MEMORY_OPS": "0"})
    print(f"256 MiB copy: {routed['ms_per_copy']:.3f} ms on one group, {unrouted['ms_per_copy']:.3f} ms unrouted")
    assert routed["memory_green"] >= 43 and routed["memory_app"] == 0
    assert unrouted["memory_green"] == 0 and unrouted["memory_app"] >= 43
    assert routed["ms_per_copy"] > 2.5 * unrouted["ms_per_copy"], (routed, unrouted)


# ---- reclaim ----

def test_an_owner_waking_from_idle_gets_its_whole_quota_back_within_the_atom(table, mps_env):
    """A best-effort borrower fills the whole GPU with 100 us kernels, the owner's 3 idle groups included;
    the owner wakes 100 times. Its kernel (one CTA per SM of its quota) must hold every SM of the quota
    within the atom budget of its launch, beyond the launch time alone (reclaim_probe.py, on %globaltimer)."""
    sys.path.insert(0, str(ROOT / "benchmarks" / "native"))
    import reclaim_probe

    wakes = 100
    alone, lending = (reclaim_probe.run_mode(table, mode, wakes, 100.0, mps_env) for mode in ("owner_alone", "lithos_held"))
    extra_us = lending["launch_to_full_us"]["p99"] - alone["launch_to_full_us"]["p99"]
    print(f"launch -> whole quota p99: {alone['launch_to_full_us']['p99']:.0f} us alone, "
          f"{lending['launch_to_full_us']['p99']:.0f} us next to a borrower that borrowed "
          f"{lending['borrower_borrowed_share']:.0%} of its launches")
    assert lending["borrower_borrowed_share"] > 0.5, lending
    assert lending["wakes_on_distinct_sms"] == wakes and lending["timed_out"] == 0
    assert extra_us < table.lending_knobs()["atom_ns"] / 1000, (alone, lending)
