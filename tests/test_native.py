"""CPU-side tests of native/liblithos.so and lithos_ray/native.py (no GPU, no CUDA driver needed)."""
import ctypes
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from lithos_ray import native

ROOT = pathlib.Path(__file__).resolve().parents[1]
LAUNCH_ENTRY_POINTS = {"cuLaunchKernel", "cuLaunchKernelEx", "cuLaunchCooperativeKernel", "cuGraphLaunch"}
STREAM_ENTRY_POINTS = {"cuStreamCreate", "cuStreamCreateWithPriority", "cuStreamDestroy_v2"}
FAKE_GPU_UUID = "GPU-00010203-0405-0607-0809-0a0b0c0d0e0f"  # what native/fake_libcuda.c reports


@pytest.fixture(scope="module")
def built_library():
    proc = subprocess.run(["make", "-C", str(ROOT / "native")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert native.library_path() is not None, native.build_status()
    return native.library_path()


@pytest.fixture
def table(built_library, tmp_path):
    t = native.AllowanceTable.create("GPU-test-0000", str(tmp_path), max_slots=8)
    yield t
    if os.path.exists(t.path):
        t.close()


def run_client(code: str, env: dict, timeout=60) -> subprocess.CompletedProcess:
    """A Python process with the shim preloaded; `lib` is the process's global symbol scope."""
    prelude = "import ctypes, sys\nlib = ctypes.CDLL(None)\nlib.lithos_client_allowance.restype = ctypes.c_int64\n"
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_build_status_reports_the_built_library(built_library):
    assert native.build_status() == f"built: {built_library}"


def test_every_launch_path_is_hooked_and_exported(built_library):
    names = native.hook_names()
    expected = ({"cuGetProcAddress", "cuGetProcAddress_v2"} | LAUNCH_ENTRY_POINTS | {n + "_ptsz" for n in LAUNCH_ENTRY_POINTS}
                | STREAM_ENTRY_POINTS)
    assert expected <= set(names)
    assert len(names) == len(set(names))
    exported = subprocess.run(["nm", "-D", "--defined-only", str(built_library)], capture_output=True, text=True).stdout
    exported_names = {line.split()[-1] for line in exported.splitlines()}
    assert set(names) | {"dlsym"} <= exported_names


def test_dlsym_hands_out_the_hooks(built_library, tmp_path):
    """A symbol looked up through dlsym in a preloaded process resolves to the shim's hook."""
    code = """
    import ctypes, os
    libdl = ctypes.CDLL(None)
    libdl.dlsym.restype = ctypes.c_void_p
    libdl.dlsym.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    shim = ctypes.CDLL(os.environ["SHIM"])
    for name in ("cuLaunchKernel", "cuLaunchKernelEx_ptsz", "cuGetProcAddress_v2"):
        print(name, libdl.dlsym(None, name.encode()) == ctypes.cast(getattr(shim, name), ctypes.c_void_p).value)
    """
    env = {**os.environ, "LD_PRELOAD": str(built_library), "SHIM": str(built_library)}
    proc = run_client(code, env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["cuLaunchKernel", "True", "cuLaunchKernelEx_ptsz", "True", "cuGetProcAddress_v2", "True"]


def test_layout_comes_from_the_library(built_library):
    dtypes = native.layout()
    assert set(dtypes) == {"lithos_table_header", "lithos_slot", "lithos_ring_header", "lithos_launch_record",
                           "lithos_activity"}
    header_text = (ROOT / "native" / "lithos_shm.h").read_text()
    for struct, dtype in dtypes.items():
        for field in dtype.names:
            assert f"X({struct}, {field}," in header_text
        assert dtype.itemsize % 64 == 0


def test_allowance_round_trips_from_python_to_the_client(table, built_library):
    table.set_allowance(3, native.parse_tpcs("12-23,60-65"))
    code = """
    mask = (ctypes.c_uint64 * 2)()
    generation = lib.lithos_client_allowance(mask)
    print(generation, mask[0], mask[1])
    """
    env = {**os.environ, **native.client_env(table.path, 3)}
    proc = run_client(code, env)
    assert proc.returncode == 0, proc.stderr
    generation, low, high = map(int, proc.stdout.split())
    assert generation == table.allowance(3)[0] and generation % 2 == 0 and generation > 0
    expected = sum(1 << t for t in list(range(12, 24)) + list(range(60, 64)))
    assert (low, high) == (expected, 0b11)
    assert proc.stderr == ""


def test_generation_moves_on_every_change_and_clear(table):
    g0, ids0 = table.allowance(1)
    assert ids0 is None
    table.set_allowance(1, [0, 1, 2])
    g1, ids1 = table.allowance(1)
    table.clear(1)
    g2, ids2 = table.allowance(1)
    assert ids1 == [0, 1, 2] and ids2 is None
    assert g0 < g1 < g2 and g1 % 2 == 0 and g2 % 2 == 0


def test_bad_input_fails_at_the_boundary(table):
    with pytest.raises(ValueError, match="0..65"):
        table.set_allowance(0, [66])
    with pytest.raises(ValueError, match="slots 0..7"):
        table.set_allowance(8, [1])
    with pytest.raises(ValueError, match="at least one TPC"):
        table.set_allowance(0, [])
    with pytest.raises(ValueError, match="first id"):
        native.parse_tpcs("5-2")
    with pytest.raises(ValueError, match="0..65"):
        native.parse_tpcs("0-66")


def test_launch_ring_round_trips_between_c_and_python(table, built_library, tmp_path):
    """Records written with the C ring protocol (as the shim does) read back through Python."""
    dtypes = native.layout()
    record_dtype, ring_dtype = dtypes["lithos_launch_record"], dtypes["lithos_ring_header"]
    lib = native._lib()
    capacity = 4
    buffer = np.zeros(lib.lithos_ring_bytes(capacity), dtype=np.uint8)
    header = buffer[: ring_dtype.itemsize].view(ring_dtype)
    header["header_bytes"], header["record_bytes"], header["capacity"] = ring_dtype.itemsize, record_dtype.itemsize, capacity
    records = buffer[ring_dtype.itemsize:].view(record_dtype)
    for index in range(6):  # 6 writes into 4 slots: the first two are overwritten
        r = records[index % capacity]
        r["seq"] = 0
        r["grid"] = (index, 1, 1)
        r["kernel_name"] = f"kernel{index}".encode()
        r["seq"] = index + 1
        header["head"] = index + 1
    next_index = ctypes.c_uint64(0)
    out = np.zeros(8, dtype=record_dtype)
    copied = lib.lithos_ring_copy(buffer.ctypes.data, ctypes.byref(next_index), out.ctypes.data, 8)
    assert copied == 4 and next_index.value == 6
    assert [r["kernel_name"].decode() for r in out[:copied]] == ["kernel2", "kernel3", "kernel4", "kernel5"]
    records[1]["seq"] = 0  # index 5 is being rewritten: the reader stops before it
    next_index = ctypes.c_uint64(4)
    assert lib.lithos_ring_copy(buffer.ctypes.data, ctypes.byref(next_index), out.ctypes.data, 8) == 1
    assert next_index.value == 5


def test_pass_through_without_agent_prints_one_notice(built_library):
    code = """
    first, second = lib.cuInit(0), lib.cuInit(0)
    mask = (ctypes.c_uint64 * 2)()
    print(first == second, lib.lithos_client_allowance(mask))
    """
    env = {k: v for k, v in os.environ.items() if k not in (native.ENV_TABLE, native.ENV_SLOT)}
    proc = run_client(code, {**env, "LD_PRELOAD": str(built_library)})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "True -1\n"
    notices = [line for line in proc.stderr.splitlines() if line.startswith("lithos:")]
    assert len(notices) == 1 and "passing CUDA launches through unchanged" in notices[0]


def test_missing_table_passes_through_with_one_notice(built_library, tmp_path):
    env = {**os.environ, "LD_PRELOAD": str(built_library), native.ENV_TABLE: str(tmp_path / "absent"), native.ENV_SLOT: "0"}
    proc = run_client("lib.cuInit(0); lib.cuInit(0); print(lib.lithos_client_allowance((ctypes.c_uint64 * 2)()))", env)
    assert proc.stdout == "-1\n"
    assert proc.stderr.count("lithos:") == 1 and "not usable" in proc.stderr


def test_client_maps_the_table_read_only_and_cannot_write_it(table, built_library):
    table.set_allowance(0, [0, 1])
    code = """
    lib.cuInit(0)
    path = __import__("os").environ["LITHOS_SHM"]
    line = [l for l in open("/proc/self/maps") if l.rstrip().endswith(path)][0]
    print(line.split()[1], flush=True)
    start = int(line.split("-")[0], 16)
    ctypes.memset(start + 256, 0xff, 8)   # try to overwrite slot 0's generation
    print("wrote", flush=True)
    """
    proc = run_client(code, {**os.environ, **native.client_env(table.path, 0)})
    assert proc.stdout.split()[0] == "r--s"
    assert "wrote" not in proc.stdout and proc.returncode == -signal.SIGSEGV
    assert table.allowance(0)[1] == [0, 1]
    assert oct(os.stat(table.path).st_mode & 0o777) == "0o644"


def test_client_env_preloads_the_shim(table, built_library):
    env = native.client_env(table.path, 5)
    assert env["LD_PRELOAD"].split(":")[0] == str(built_library)
    assert env[native.ENV_TABLE] == table.path and env[native.ENV_SLOT] == "5"


def test_close_unlinks_table_and_rings(table):
    ring = pathlib.Path(native.ring_path(table.path, 2))
    ring.write_bytes(b"x")
    table.close()
    assert not os.path.exists(table.path) and not ring.exists()


def test_cli_set_changes_a_live_allowance(table):
    proc = subprocess.run([sys.executable, "-m", "lithos_ray.native", "set", "--table", table.path, "--slot", "2",
                           "--tpcs", "12-23"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert table.allowance(2)[1] == list(range(12, 24))


def test_cli_run_injects_the_shim(built_library, tmp_path):
    code = "import os; print(os.environ['LITHOS_SLOT'], os.environ['LD_PRELOAD'].split(':')[0])"
    proc = subprocess.run([sys.executable, "-m", "lithos_ray.native", "run", "--tpcs", "0-11", "--slot", "4",
                           "--gpu-uuid", "GPU-cli-test", "--directory", str(tmp_path), "--", sys.executable, "-c", code],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["4", str(built_library)]
    assert not (tmp_path / "lithos-GPU-cli-test").exists()  # the runner cleans up its table


def test_mps_helpers_without_a_daemon(tmp_path):
    from lithos_ray import mps
    assert mps.mps_running(str(tmp_path)) is False
    mps.stop_mps(str(tmp_path))  # nothing running: a no-op


# ---- the launch path, against native/fake_libcuda.c (a recording stand-in for libcuda.so.1 that
# ---- runs no kernels): which driver calls each kind of launch makes.

FAKE_PRELUDE = """
import ctypes, sys
lib = ctypes.CDLL(None)
cuda = ctypes.CDLL("libcuda.so.1")
cuda.fake_log.restype = ctypes.c_char_p
def log():
    lines = cuda.fake_log().decode().splitlines()
    cuda.fake_log_clear()
    return [l for l in lines if not l.startswith("cuGreenCtxCreate")]
def create(flags, priority=None):
    s = ctypes.c_void_p()
    r = (lib.cuStreamCreate(ctypes.byref(s), flags) if priority is None
         else lib.cuStreamCreateWithPriority(ctypes.byref(s), flags, priority))
    assert r == 0, r
    return s.value
def launch(stream, grid=1):
    assert lib.cuLaunchKernel(ctypes.c_void_p(0x77), grid, 1, 1, 32, 1, 1, 0, ctypes.c_void_p(stream), None, None) == 0
def paths():   # every launch-path count, memory ops included
    from lithos_ray.native import thread_launch_counts
    return thread_launch_counts()
def counts():   # the kernel launch paths
    return {k: v for k, v in paths().items() if k in ("direct", "paired", "unconfined")}
def show(*values):
    print(*values, flush=True)
def wait_for_parent():
    show("ready")
    sys.stdin.readline()
"""


@pytest.fixture(scope="module")
def fake_driver():
    proc = subprocess.run(["make", "-s", "-C", str(ROOT / "native"), "fake-driver"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return str(ROOT / "native" / "build" / "fake")


def native_cuda_include() -> str:
    proc = subprocess.run(["make", "-s", "-C", str(ROOT / "native"), "print-cuda-include"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip(), proc.stderr
    return proc.stdout.strip()


@pytest.fixture
def fake_table(built_library, tmp_path):
    t = native.AllowanceTable.create(FAKE_GPU_UUID, str(tmp_path), max_slots=4)
    t.set_allowance(0, list(range(8)))
    yield t
    if os.path.exists(t.path):
        t.close()


def fake_env(fake_driver, table=None, slot=0, **extra):
    """Env of a client on the fake driver; no launch is timed unless LITHOS_SAMPLE_EVERY is given
    (timing is random, and these tests check exact driver call sequences)."""
    extra = {"LITHOS_SAMPLE_EVERY": "0", **extra}
    env = {k: v for k, v in os.environ.items() if k not in (native.ENV_TABLE, native.ENV_SLOT)}
    env.update(native.client_env(table.path, slot) if table else {"LD_PRELOAD": str(native.library_path())})
    return {**env, "LD_LIBRARY_PATH": fake_driver, **extra}


def run_fake(code: str, env: dict, timeout=60) -> list[list[str]]:
    """Runs code with the fake driver; each show(...) gives one line of words."""
    proc = subprocess.run([sys.executable, "-c", FAKE_PRELUDE + textwrap.dedent(code)], env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr
    return [line.split() for line in proc.stdout.splitlines()], proc.stderr


def test_without_an_allowance_stream_calls_and_launches_pass_through_unchanged(fake_driver):
    lines, stderr = run_fake("""
    s, b, p = create(1), create(0), create(1, -1)
    launch(s); launch(None)
    lib.cuStreamDestroy_v2(ctypes.c_void_p(s))
    show(hex(s), hex(b), hex(p))
    for line in log(): show(line)
    show(counts())
    """, fake_env(fake_driver))
    s, b, p = lines[0]
    assert [" ".join(words) for words in lines[1:-1]] == [
        f"cuStreamCreate {s} flags=1", f"cuStreamCreate {b} flags=0", f"cuStreamCreateWithPriority {p} flags=1 priority=-1",
        f"cuLaunchKernel {s}", "cuLaunchKernel 0", f"cuStreamDestroy {s}"]
    assert stderr.count("lithos:") == 1 and "passing CUDA launches through unchanged" in stderr


def test_streams_created_under_an_allowance_are_green_and_launch_without_events(fake_driver, fake_table):
    lines, _ = run_fake("""
    s, p = create(1), create(1, -1)
    show(hex(s), hex(p))
    for line in log(): show(line)
    launch(s); launch(s); launch(p)
    for line in log(): show(line)
    show(counts()["direct"], counts()["paired"])
    """, fake_env(fake_driver, fake_table))
    s, p = lines[0]
    created = [" ".join(w[:2]) for w in lines[1:] if w[0] == "cuGreenCtxStreamCreate"]
    assert created == [f"cuGreenCtxStreamCreate {s}", f"cuGreenCtxStreamCreate {p}"]
    assert [" ".join(w) for w in lines if w[0] == "cuGreenCtxStreamCreate"][1].endswith("priority=-1")
    assert not any(w[0] == "cuStreamCreate" or w[0] == "cuStreamCreateWithPriority" for w in lines)
    after_create = [w for w in lines[1:-1] if w[0] in ("cuLaunchKernel", "cuEventRecord", "cuStreamWaitEvent")]
    # one self-test record at the first creation, then three launches and not one event call
    assert after_create[0][:2] == ["cuEventRecord", s]
    assert after_create[1:] == [["cuLaunchKernel", s], ["cuLaunchKernel", s], ["cuLaunchKernel", p]]
    assert lines[-1] == ["3", "0"]


def run_start(app: str, green: str) -> list[list[str]]:
    """The first launch of a deferred run: the green stream waits for the app stream."""
    return [["cuEventRecord", app, "same-context"], ["cuStreamWaitEvent", green], ["cuLaunchKernel", green]]


def join(app: str, green: str) -> list[list[str]]:
    """A join paid: the app stream waits for the green stream."""
    return [["cuEventRecord", green, "same-context"], ["cuStreamWaitEvent", app]]


def paired_calls(app: str, green: str) -> list[list[str]]:
    """An eager paired launch (LITHOS_DEFER_JOIN=0, or a capturing stream): 4 event calls."""
    return run_start(app, green) + join(app, green)


def test_with_deferral_off_blocking_and_default_streams_pair_every_launch(fake_driver, fake_table):
    """LITHOS_DEFER_JOIN=0: the 4 event calls on every paired launch (the behaviour before deferred joins)."""
    lines, _ = run_fake("""
    b = create(0)
    show(hex(b))
    log()
    launch(b)
    for line in log(): show(line)
    show("--")
    launch(None); launch(None)
    for line in log(): show(line)
    show(counts()["direct"], counts()["paired"])
    """, fake_env(fake_driver, fake_table, LITHOS_DEFER_JOIN="0"))
    b = lines[0][0]
    split = lines.index(["--"])
    first, second = lines[1:split], lines[split + 1:-1]
    green_b = [w for w in first if w[0] == "cuGreenCtxStreamCreate"][0][1]
    assert [w for w in first if w[0] != "cuGreenCtxStreamCreate"] == paired_calls(b, green_b)
    green_default = [w for w in second if w[0] == "cuGreenCtxStreamCreate"][0][1]
    assert [w for w in second if w[0] != "cuGreenCtxStreamCreate"] == paired_calls("0", green_default) * 2
    assert lines[-1] == ["0", "3"]


def test_an_owned_stream_is_ordered_with_events_only_while_the_allowance_differs(fake_driver, fake_table):
    code = """
    s = create(1)
    show(hex(s))
    log()
    wait_for_parent()          # the parent changes the allowance
    launch(s); launch(s)
    for line in log(): show(line)
    show("--")
    wait_for_parent()          # the parent restores the allowance
    launch(s)
    for line in log(): show(line)
    show(counts()["direct"], counts()["paired"])
    """
    proc = subprocess.Popen([sys.executable, "-c", FAKE_PRELUDE + textwrap.dedent(code)],
                            env=fake_env(fake_driver, fake_table), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    s = proc.stdout.readline().split()[0]
    assert proc.stdout.readline().strip() == "ready"
    fake_table.set_allowance(0, list(range(8, 16)))
    proc.stdin.write("go\n")
    proc.stdin.flush()
    first = []
    while (line := proc.stdout.readline().strip()) != "ready":
        first.append(line.split())
    fake_table.set_allowance(0, list(range(8)))
    out, err = proc.communicate("go\n", timeout=60)
    assert proc.returncode == 0, err
    rest = [line.split() for line in out.splitlines()]
    split = first.index(["--"])
    changed = [w for w in first[:split] if w[0] != "cuGreenCtxStreamCreate"]
    green = [w for w in first[:split] if w[0] == "cuGreenCtxStreamCreate"][0][1]
    # both events live in the context of the stream they are recorded on ("same-context"); the second
    # launch continues the run (no events), the direct launch pays the owed join first
    assert changed == run_start(s, green) + [["cuLaunchKernel", green]]
    assert rest[:-1] == join(s, green) + [["cuLaunchKernel", s]]
    assert rest[-1] == ["1", "2"]


def test_a_driver_that_refuses_app_events_on_green_streams_keeps_streams_ordinary(fake_driver, fake_table):
    lines, stderr = run_fake("""
    s = create(1)
    show(hex(s))
    log()
    launch(s)
    for line in log(): show(line)
    """, fake_env(fake_driver, fake_table, FAKE_STRICT_EVENTS="1"))
    s = lines[0][0]
    green = [w for w in lines[1:] if w[0] == "cuGreenCtxStreamCreate"][0][1]
    assert [w for w in lines[1:] if w[0] != "cuGreenCtxStreamCreate"] == run_start(s, green)   # join owed
    assert "refuses application events on green streams" in stderr


def test_green_streams_can_be_switched_off(fake_driver, fake_table):
    lines, _ = run_fake("""
    s = create(1)
    for line in log(): show(line)
    """, fake_env(fake_driver, fake_table, LITHOS_GREEN_STREAMS="0"))
    assert [w[0] for w in lines] == ["cuStreamCreate"]


def test_destroying_streams_retires_their_green_streams(fake_driver, fake_table):
    lines, _ = run_fake("""
    s, b = create(1), create(0)
    launch(s); launch(b)
    show(hex(s), hex(b))
    log()
    lib.cuStreamDestroy_v2(ctypes.c_void_p(s)); lib.cuStreamDestroy_v2(ctypes.c_void_p(b))
    for line in log(): show(line)
    launch(None)
    show(counts()["direct"], counts()["paired"])
    """, fake_env(fake_driver, fake_table))
    s, b = lines[0]
    destroyed = [w[1] for w in lines[1:-1] if w[0] == "cuStreamDestroy"]
    assert destroyed.count(s) == 1 and destroyed.count(b) == 1 and len(destroyed) == 3  # + b's shim green stream
    assert lines[-1] == ["1", "2"]


def test_a_kernel_refused_by_green_contexts_runs_unconfined_in_stream_order(fake_driver, fake_table):
    """The fake refuses grid x = 912 in green contexts (as the H100 refused a cuDNN kernel in the TPC view).
    This table has no co-scheduled group map, so the co-scheduled view the kernel moves to does not
    exist: it runs unconfined."""
    lines, stderr = run_fake("""
    s = create(1)
    show(hex(s))
    log()
    launch(s, 912)
    for line in log(): show(line)
    show("--")
    launch(s, 912); launch(None, 912)
    for line in log(): show(line)
    """, fake_env(fake_driver, fake_table))
    s = lines[0][0]
    split = lines.index(["--"])
    first, later = lines[1:split], lines[split + 1:]
    assert first[0] == ["cuLaunchKernel", s, "refused"]
    helper = [w for w in first if w[0] == "cuStreamCreateWithPriority"][0][1]  # an ordinary stream
    assert [w for w in first[1:] if w[0] != "cuStreamCreateWithPriority"] == run_start(s, helper)
    # later launches of that kernel go straight to the unconfined place, without a refused attempt: the
    # second continues the run on the helper stream, the launch on stream 0 pays its join first
    assert later == [["cuLaunchKernel", helper]] + join(s, helper) + [["cuLaunchKernel", "0"]]
    assert stderr.count("the TPC view refused its cluster shape (CUresult 912)") == 1


def test_a_cluster_shape_the_tpc_view_refuses_runs_in_the_cosched_view_inside_the_quota(fake_driver, lend_table):
    """TPCs 0-9 hold the co-scheduled groups 0 and 1 (TPCs 0-7): a kernel the TPC view refuses
    (the fake's grid x = 913) is launched again in the co-scheduled view and stays there, inside the
    quota; one the co-scheduled view refuses too (912) runs unconfined, as before."""
    lend_table.set_lending(0, [], low_priority=False)
    lend_table.set_cosched_map([t // 4 for t in range(60)] + [255] * 6)
    lend_table.set_allowance(0, list(range(10)))
    lines, stderr = run_fake(LEND_PRELUDE + textwrap.dedent("""
    s = create(1)
    launch_fn(0x77, s, 913); launch_fn(0x77, s, 913)
    launch_fn(0x99, s, 912)
    show_log()
    """), fake_env(fake_driver, lend_table))
    places = launch_places(lines)
    refused = [w[1] for w in lines if w[0] == "cuLaunchKernel" and w[-1] == "refused"]
    # 913: the TPC view (10 groups of 2 SMs) once, then the co-scheduled one (2 groups of 8 SMs);
    # 912: refused in both, then unconfined (an ordinary stream)
    assert [groups for groups, _ in places] == [10, 2, 2, 10, 2, 0]
    assert refused == [places[0][1], places[3][1], places[4][1]]
    records, _ = lend_table.read_launches(0)
    assert [native.VIEW_NAMES[int(r["view"])] for r in records] == ["cosched", "cosched", "unconfined"]
    assert [int(r["tpcs"]) for r in records[:2]] == [8, 8]
    assert stderr.count("the TPC view refused its cluster shape (CUresult 912)") == 1   # once per process
    assert stderr.count("failed in its green context (CUresult 912): its launches with clusters this large or larger "
                        "run unconfined from now on") == 1
    assert "(grid 912x1x1, cluster 1x1x1, co-scheduled view of 8 TPCs) failed" in stderr


CLUSTER_PRELUDE = """
class Attr(ctypes.Structure):
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", ctypes.c_uint * 16)]
class Config(ctypes.Structure):
    _fields_ = [("grid", ctypes.c_uint * 3), ("block", ctypes.c_uint * 3), ("shared", ctypes.c_uint),
                ("stream", ctypes.c_void_p), ("attrs", ctypes.POINTER(Attr)), ("num", ctypes.c_uint)]
def launch_cluster(function, stream, x, y):   # cuLaunchKernelEx with a cluster-dimension attribute (id 4)
    attr = Attr(id=4, value=(ctypes.c_uint * 16)(x, y, 1))
    config = Config((ctypes.c_uint * 3)(64, 1, 1), (ctypes.c_uint * 3)(32, 1, 1), 0, stream, ctypes.pointer(attr), 1)
    assert lib.cuLaunchKernelEx(ctypes.byref(config), ctypes.c_void_p(function), None, None) == 0
"""


def test_a_cluster_too_large_for_every_view_leaves_the_quota_only_at_that_size(fake_driver, lend_table):
    """cuDNN's xmma kernels launch one function with 4x4, 2x2 and 2x1 clusters; 16 CTAs fit no 8-SM
    co-scheduled group (the fake refuses them in every green context). The 4x4 launches run
    unconfined; the same kernel's smaller clusters stay in their views inside the quota."""
    lend_table.set_lending(0, [], low_priority=False)
    lend_table.set_cosched_map([t // 4 for t in range(60)] + [255] * 6)
    lend_table.set_allowance(0, list(range(10)))
    lines, stderr = run_fake(LEND_PRELUDE + CLUSTER_PRELUDE + textwrap.dedent("""
    s = create(1)
    launch_cluster(0x77, s, 4, 4); launch_cluster(0x77, s, 2, 2); launch_cluster(0x77, s, 2, 1); launch_cluster(0x77, s, 4, 4)
    """), fake_env(fake_driver, lend_table))
    records, _ = lend_table.read_launches(0)
    assert [(tuple(int(c) for c in r["cluster"]), native.VIEW_NAMES[int(r["view"])]) for r in records] == [
        ((4, 4, 1), "unconfined"), ((2, 2, 1), "cosched"), ((2, 1, 1), "tpc"), ((4, 4, 1), "unconfined")]
    assert "(grid 64x1x1, cluster 4x4x1, co-scheduled view of 8 TPCs) failed" in stderr


def test_a_library_kernel_launched_by_its_cukernel_handle_is_asked_through_its_function(fake_driver, lend_table):
    """The runtime launches library kernels by CUkernel handle (the fake's 0xc2), which cuFuncGetName
    and cuFuncGetAttribute refuse: the shim asks the kernel's CUfunction (0xc1, a required 2x2x1
    cluster) instead, so the launch goes straight to the co-scheduled view under its own name."""
    lend_table.set_lending(0, [], low_priority=False)
    lend_table.set_cosched_map([t // 4 for t in range(60)] + [255] * 6)
    lend_table.set_allowance(0, list(range(10)))
    run_fake(LEND_PRELUDE + "launch_fn(0xc2, create(1))", fake_env(fake_driver, lend_table))
    (record,), _ = lend_table.read_launches(0)
    assert native.VIEW_NAMES[int(record["view"])] == "cosched" and tuple(record["cluster"]) == (2, 2, 1)
    assert record["kernel_name"] == b"fake_cluster_kernel"




# ---- deferred joins: a run of paired launches on one stream joins back only when something needs it

DEFER_PRELUDE = """
import os, threading
libdl = ctypes.CDLL(None)
libdl.dlsym.restype = ctypes.c_void_p
libdl.dlsym.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
lib.lithos_client_stub.restype = ctypes.c_char_p
lib.lithos_client_stub.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_uint64)]
def proc(name):
    fn, status = ctypes.c_void_p(), ctypes.c_int()
    assert lib.cuGetProcAddress_v2(name.encode(), ctypes.byref(fn), 13000, ctypes.c_uint64(0), ctypes.byref(status)) == 0
    return fn.value
def by_dlsym(name):
    return libdl.dlsym(cuda._handle, name.encode())
def call(address, *argtypes):
    return ctypes.CFUNCTYPE(ctypes.c_int, *argtypes)(address)
def memcpy_dtoh(address):
    buf = ctypes.create_string_buffer(8)
    assert call(address, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_size_t)(buf, 0xd0, 8) == 0
def memset_d8(address):
    assert call(address, ctypes.c_uint64, ctypes.c_ubyte, ctypes.c_size_t)(0xd0, 7, 8) == 0
def get_current(address):
    ctx = ctypes.c_void_p()
    assert call(address, ctypes.c_void_p)(ctypes.byref(ctx)) == 0
def owner(address):
    for line in open("/proc/self/maps"):
        words = line.split()
        low, high = (int(x, 16) for x in words[0].split("-"))
        if low <= address < high:
            return os.path.basename(words[-1])
def stubs():
    out, i = {}, 0
    while True:
        stub, flushes = ctypes.c_void_p(), ctypes.c_uint64()
        name = lib.lithos_client_stub(i, ctypes.byref(stub), ctypes.byref(flushes))
        if name is None:
            return out
        out.setdefault(name.decode(), (stub.value, flushes.value))
        i += 1
def joins():
    c = (ctypes.c_uint64 * 3)()
    lib.lithos_client_join_counts(c, 3)
    return {"runs": c[0], "paid": c[1], "legacy_for_other": c[2]}
def continued():
    return paths()["continued"]
def section():
    for line in log():
        if not line.startswith("cuGreenCtxStreamCreate"): show(line)
    show("--")
def launch_ptsz(stream=None):
    assert lib.cuLaunchKernel_ptsz(ctypes.c_void_p(0x77), 1, 1, 1, 32, 1, 1, 0, ctypes.c_void_p(stream), None, None) == 0
"""


def run_sections(code: str, env: dict) -> list:
    """run_fake with DEFER_PRELUDE; the output split at each section() into lists of log lines."""
    lines, _ = run_fake(DEFER_PRELUDE + textwrap.dedent(code), env)
    sections, current = [], []
    for words in lines:
        if words == ["--"]:
            sections.append(current)
            current = []
        else:
            current.append(words)
    return sections + [current]


def green_stream_of(fake_driver, fake_table) -> str:
    """The green stream the shim creates for the default stream (the first the fake hands out after a created stream's)."""
    lines, _ = run_fake("launch(None)\nfor line in log(): show(line)", fake_env(fake_driver, fake_table))
    return [w for w in lines if w[0] == "cuGreenCtxStreamCreate"][0][1]


def test_default_stream_launches_defer_their_join_until_a_driver_call_needs_it(fake_driver, fake_table):
    """(a) one app_done record + wait before a run, no join until a non-whitelisted call, then exactly one;
    (b) whitelisted calls do not flush; through cuGetProcAddress and through dlsym."""
    out = run_sections("""
    current, memcpy = proc("cuCtxGetCurrent"), proc("cuMemcpyDtoH")
    memset, current_by_dlsym = by_dlsym("cuMemsetD8_v2"), by_dlsym("cuCtxGetCurrent")
    show(owner(current), owner(memcpy), owner(memset), owner(current_by_dlsym))
    log()
    section()
    for _ in range(5): launch(None)
    section()
    for _ in range(3): get_current(current); get_current(current_by_dlsym)
    section()
    memcpy_dtoh(memcpy)
    section()
    memcpy_dtoh(memcpy)
    section()
    launch(None); launch(None)
    memset_d8(memset)
    section()
    found = stubs()
    show(found["cuMemcpyDtoH"][0] == memcpy, found["cuMemcpyDtoH"][1], found["cuMemsetD8_v2"][0] == memset,
         found["cuMemsetD8_v2"][1], "cuCtxGetCurrent" in found)
    show(counts()["paired"], continued(), joins()["runs"], joins()["paid"])
    """, fake_env(fake_driver, fake_table))
    owners, run, whitelisted, first_copy, second_copy, second_run, checks = out
    assert owners == [["libcuda.so.1", "liblithos.so", "liblithos.so", "libcuda.so.1"]]
    green = green_stream_of(fake_driver, fake_table)
    assert run == run_start("0", green) + [["cuLaunchKernel", green]] * 4
    assert whitelisted == []
    assert first_copy == join("0", green) + [["cuMemcpyDtoH", "0xd0", "8"]]
    assert second_copy == [["cuMemcpyDtoH", "0xd0", "8"]]
    assert second_run == run_start("0", green) + [["cuLaunchKernel", green]] + join("0", green) + [["cuMemsetD8", "0xd0", "7", "8"]]
    assert checks == [["True", "1", "True", "1", "False"], ["7", "5", "2", "2"]]


def test_memsets_and_device_copies_run_on_the_clients_green_stream_in_stream_order(fake_driver, fake_table):
    """The driver runs memsets and device-to-device copies as kernels on SMs (memory_op_probe.py), so they
    go where the client's kernels go: into the deferred run on the green stream, joined back like them;
    counted apart from kernel launches."""
    green = green_stream_of(fake_driver, fake_table)
    out = run_sections("""
    log()
    launch(None)
    assert lib.cuMemsetD8Async(ctypes.c_uint64(0xd0), 7, 16, None) == 0
    assert lib.cuMemcpyDtoDAsync_v2(ctypes.c_uint64(0xd0), ctypes.c_uint64(0xe0), 64, None) == 0
    assert lib.cuMemsetD32Async_ptsz(ctypes.c_uint64(0xd0), 3, 4, None) == 0
    memcpy_dtoh(proc("cuMemcpyDtoH"))
    section()
    show(*paths().values())
    show(joins()["runs"])
    """, fake_env(fake_driver, fake_table))
    run, paths = out[0], out[1][:1]
    assert out[1][1] == ["2"]   # the legacy stream's run and the per-thread stream's: memory ops continue runs
    ptsz_green = [w for w in run if w[0] == "cuMemsetD32Async_ptsz"][0][1]
    assert ptsz_green not in ("0", "0x2", green)   # the per-thread default stream's own green stream
    assert run == (run_start("0", green) + [["cuMemsetD8Async", green, "7", "16"], ["cuMemcpyDtoDAsync", green, "64"]] +
                   join("0", green) + run_start("0x2", ptsz_green)[:2] + [["cuMemsetD32Async_ptsz", ptsz_green, "3", "4"]] +
                   join("0x2", ptsz_green) + [["cuMemcpyDtoH", "0xd0", "8"]])
    assert paths == [["0", "1", "0", "0", "3", "0"]]   # 1 kernel paired; 3 memory ops on green streams


def test_with_memory_op_routing_off_memsets_go_to_the_app_stream_after_the_join(fake_driver, fake_table):
    """LITHOS_ROUTE_MEMORY_OPS=0: a memset goes to the program's stream as without the shim, after the owed join."""
    green = green_stream_of(fake_driver, fake_table)
    run, memory_app = run_sections("""
    log()
    launch(None)
    assert lib.cuMemsetD8Async(ctypes.c_uint64(0xd0), 7, 16, None) == 0
    section()
    show(paths()["memory_app"])
    """, fake_env(fake_driver, fake_table, LITHOS_ROUTE_MEMORY_OPS="0"))
    assert run == run_start("0", green) + join("0", green) + [["cuMemsetD8Async", "0", "7", "16"]]
    assert memory_app == [["1"]]   # counted as not on a green stream


def test_a_memset_a_green_stream_refuses_runs_once_on_the_app_stream_in_order(fake_driver, fake_table):
    """The fake refuses 912-byte memsets on green streams: the refused one is sent again on the program's
    stream after the green stream's work (joined back first), with one notice."""
    green = green_stream_of(fake_driver, fake_table)
    lines, stderr = run_fake(DEFER_PRELUDE + textwrap.dedent("""
    log()
    launch(None)
    assert lib.cuMemsetD8Async(ctypes.c_uint64(0xd0), 7, 912, None) == 0
    assert lib.cuMemsetD8Async(ctypes.c_uint64(0xd0), 7, 912, None) == 0
    section()
    """), fake_env(fake_driver, fake_table))
    run = [w for w in lines if w != ["--"]]
    refused_then_app = join("0", green) + [["cuMemsetD8Async", "0", "7", "912"]]
    second_run = run_start("0", green)[:2] + [["cuMemsetD8Async", green, "7", "912", "refused"]]
    assert run == (run_start("0", green) + [["cuMemsetD8Async", green, "7", "912", "refused"]] + refused_then_app +
                   second_run + refused_then_app)
    assert stderr.count("memset failed on a green stream") == 1


DIRECT_LINKED = r"""
#include <cuda.h>
#include <stdio.h>
const char *fake_log(void);
void fake_log_clear(void);
int main(void) {
    char buf[8];
    CUcontext ctx;
    if (cuInit(0) != CUDA_SUCCESS) return 1;
    fake_log_clear();
    for (int i = 0; i < 3; i++)
        if (cuLaunchKernel((CUfunction)0x77, 1, 1, 1, 32, 1, 1, 0, NULL, NULL, NULL) != CUDA_SUCCESS) return 2;
    if (cuCtxGetCurrent(&ctx) != CUDA_SUCCESS) return 3;      /* whitelisted: not exported, straight to libcuda */
    printf("%s--\n", fake_log());
    fake_log_clear();
    if (cuMemcpyDtoH(buf, 0xd0, 8) != CUDA_SUCCESS) return 4; /* cuMemcpyDtoH_v2: the shim's exported stub */
    if (cuCtxSynchronize() != CUDA_SUCCESS) return 5;
    printf("%s", fake_log());
    return 0;
}
"""


def test_a_program_linked_with_lcuda_pays_the_join_through_exported_stubs(fake_driver, fake_table, tmp_path):
    """(a) direct-linked calls: cuMemcpyDtoH_v2 resolves to the shim's exported stub under LD_PRELOAD."""
    source = tmp_path / "direct.c"
    source.write_text(DIRECT_LINKED)
    binary = tmp_path / "direct"
    proc = subprocess.run(["gcc", "-O1", "-I", native_cuda_include(), "-o", str(binary), str(source), "-L", fake_driver,
                           "-l:libcuda.so.1"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    proc = subprocess.run([str(binary)], env=fake_env(fake_driver, fake_table), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = [line.split() for line in proc.stdout.splitlines() if not line.startswith(("cuGreenCtx"))]
    split = lines.index(["--"])
    green = lines[1][1]
    assert lines[:split] == run_start("0", green) + [["cuLaunchKernel", green]] * 2
    assert lines[split + 1:] == join("0", green) + [["cuMemcpyDtoH", "0xd0", "8"], ["cuCtxSynchronize"]]


def test_a_launch_on_another_stream_pays_the_owed_join_first(fake_driver, fake_table):
    """(c) direct launches on created streams and paired launches of another pair end the run."""
    out = run_sections("""
    s, b = create(1), create(0)
    show(s, b)
    log()
    section()
    launch(None); launch(None)
    launch(s)
    section()
    launch(None)
    launch(b); launch(b)
    section()
    lib.cuStreamDestroy_v2(ctypes.c_void_p(s))
    section()
    show(counts()["direct"], counts()["paired"], continued())
    """, fake_env(fake_driver, fake_table))
    (s, b), = [[hex(int(x)) for x in out[0][0]]]
    to_owned, to_blocking, destroyed, counted = out[1], out[2], out[3], out[4]
    green = to_owned[1][1]
    assert to_owned == run_start("0", green) + [["cuLaunchKernel", green]] + join("0", green) + [["cuLaunchKernel", s]]
    green_b = to_blocking[-1][1]
    assert to_blocking == (run_start("0", green) + join("0", green) + run_start(b, green_b) +
                           [["cuLaunchKernel", green_b]])
    assert destroyed == join(b, green_b) + [["cuStreamDestroy", s]]
    assert counted == [["1", "5", "2"]]


def test_a_launch_from_another_thread_pays_the_owed_join_first(fake_driver, fake_table):
    out = run_sections("""
    launch(None); launch(None)
    section()
    worker = threading.Thread(target=lambda: (launch(None), launch(None)))
    worker.start(); worker.join()
    section()
    """, fake_env(fake_driver, fake_table))
    green = out[0][1][1]
    assert out[0] == run_start("0", green) + [["cuLaunchKernel", green]]
    # the other thread's launches share the pair (same stream, context, route) but start their own run
    assert out[1] == join("0", green) + run_start("0", green) + [["cuLaunchKernel", green]]


def test_per_thread_default_stream_joins_are_paid_by_their_own_thread(fake_driver, fake_table):
    """Another thread cannot name this thread's per-thread stream: it makes the legacy stream (0x1) wait
    instead, and the owner still pays its own join (to 0x2, CU_STREAM_PER_THREAD) at its next call."""
    out = run_sections("""
    sync = proc("cuCtxSynchronize")
    memcpy = proc("cuMemcpyDtoH")
    log()
    launch_ptsz(); launch_ptsz()
    section()
    worker = threading.Thread(target=lambda: (call(sync)(), call(sync)(), show(joins())))
    worker.start(); worker.join()
    section()
    memcpy_dtoh(memcpy)
    section()
    show(joins())
    """, fake_env(fake_driver, fake_table))
    run, other_thread, owner_call, counted = out
    green = run[1][1]
    assert run == [["cuEventRecord", "0x2", "same-context"], ["cuStreamWaitEvent", green],
                   ["cuLaunchKernel_ptsz", green], ["cuLaunchKernel_ptsz", green]]
    # (the worker's counts are shown before the section's log); once per run: the second call makes no join
    assert " ".join(other_thread[0]) == "{'runs': 0, 'paid': 0, 'legacy_for_other': 1}"
    assert other_thread[1:] == join("0x1", green) + [["cuCtxSynchronize"], ["cuCtxSynchronize"]]
    assert owner_call == join("0x2", green) + [["cuMemcpyDtoH", "0xd0", "8"]]
    assert " ".join(counted[0]) == "{'runs': 1, 'paid': 1, 'legacy_for_other': 0}"


def test_with_deferral_off_driver_entry_points_are_the_drivers_own(fake_driver, fake_table):
    """LITHOS_DEFER_JOIN=0: cuGetProcAddress and dlsym hand out no stubs, and nothing is ever owed."""
    out = run_sections("""
    memcpy, memset = proc("cuMemcpyDtoH"), by_dlsym("cuMemsetD8_v2")
    show(owner(memcpy), owner(memset), len(stubs()) > 300)   # only the exported stubs are listed
    log()
    launch(None); launch(None)
    memcpy_dtoh(memcpy)
    section()
    show(continued(), joins()["runs"])
    """, fake_env(fake_driver, fake_table, LITHOS_DEFER_JOIN="0"))
    assert out[0][0] == ["libcuda.so.1", "libcuda.so.1", "True"]
    green = out[0][2][1]
    assert out[0][1:] == paired_calls("0", green) * 2 + [["cuMemcpyDtoH", "0xd0", "8"]]
    assert out[1] == [["0", "0"]]


def test_a_capturing_stream_is_paired_eagerly(fake_driver, fake_table):
    """While the app stream captures a graph, every launch gets both dependencies (4 event calls)."""
    out = run_sections("""
    launch(None); launch(None)
    section()
    """, fake_env(fake_driver, fake_table, FAKE_CAPTURING="1"))
    green = out[0][1][1]
    assert out[0] == paired_calls("0", green) * 2


def test_the_library_exports_stubs_for_direct_linked_driver_calls(built_library):
    """(e) nm -D: the generated stubs, and neither whitelisted names nor duplicates of the C hooks."""
    exported = subprocess.run(["nm", "-D", "--defined-only", str(built_library)], capture_output=True, text=True).stdout
    names = [line.split()[-1] for line in exported.splitlines()]
    driver = {n for n in names if n.startswith("cu") and n[2:3].isupper()}
    assert {"cuMemcpyDtoH_v2", "cuMemcpyDtoH_v2_ptds", "cuMemsetD8_v2", "cuCtxSynchronize", "cuStreamSynchronize",
            "cuEventRecord", "cuEventRecord_ptsz", "cuStreamWaitEvent", "cuMemcpyAsync", "cuMemAllocAsync",
            "cuLaunchHostFunc", "cuStreamBeginCapture_v2"} <= driver
    assert not {"cuCtxGetCurrent", "cuMemGetInfo_v2", "cuEventQuery", "cuDeviceGetAttribute", "cuFuncGetAttribute",
                "cuOccupancyMaxActiveBlocksPerMultiprocessor", "cuStreamIsCapturing", "cuMemAlloc_v2"} & driver
    assert len(names) == len(set(names)) and len(driver) > 300
    assert set(native.hook_names()) <= driver | {"cuGetProcAddress"}
    generated = (ROOT / "native" / "build" / "lithos_exports.S").read_text()
    assert "Generated by native/gen_stubs.py" in generated
    tracked = subprocess.run(["git", "ls-files", "native"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    assert "native/build/lithos_exports.S" not in tracked


def test_stack_and_float_arguments_survive_the_stub_slow_path(fake_driver, fake_table):
    """(f) 9 integer and 9 double arguments (3 + 1 on the stack) through a stub, with a join owed and without."""
    out = run_sections("""
    many = proc("cuFakeManyArgs")
    args = []
    for k in range(1, 10):
        args += [k * 0x1000000001, k + 0.25]
    fn = call(many, *[ctypes.c_uint64, ctypes.c_double] * 9)
    show(owner(many))
    log()
    section()
    launch(None); launch(None)
    show(fn(*args))
    section()
    show(fn(*args))
    section()
    args[0] += 1
    show(fn(*args))
    section()
    """, fake_env(fake_driver, fake_table))
    owner_line, slow, fast, wrong = out[0], out[1], out[2], out[3]
    assert owner_line == [["liblithos.so"]]
    green = slow[2][1]   # (the result is shown before the section's log)
    assert slow == [["0"]] + run_start("0", green) + [["cuLaunchKernel", green]] + join("0", green) + [["cuFakeManyArgs", "ok"]]
    assert fast == [["0"], ["cuFakeManyArgs", "ok"]]
    assert wrong == [["1"], ["cuFakeManyArgs", "bad"]]   # the check itself works

# ---- lending: the launch-path rule of scheduler/lending.py in the shim ------------------------------

from lithos_ray.scheduler.lending import ActivityWord, LendingPolicy, after_launch, lender_is_idle  # noqa: E402
from lithos_ray.scheduler.predictor import KernelKey, LatencyPredictor  # noqa: E402


def test_lending_knob_defaults_equal_the_policy_defaults(table):
    policy = LendingPolicy()
    assert table.lending_knobs() == {"atom_ns": policy.atom_ns, "idle_window_ns": policy.idle_window_ns,
                                     "unknown_kernel_busy_ns": policy.unknown_kernel_busy_ns}
    table.set_lending_knobs(atom_us=100, idle_window_us=0.5, unknown_kernel_busy_us=2000)
    assert table.lending_knobs() == {"atom_ns": 100_000, "idle_window_ns": 500, "unknown_kernel_busy_ns": 2_000_000}
    with pytest.raises(ValueError, match="atom_us"):
        table.set_lending_knobs(atom_us=0, idle_window_us=500, unknown_kernel_busy_us=10_000)
    with pytest.raises(ValueError, match="1 ns"):
        table.set_lending_knobs(atom_us=250, idle_window_us=0.0001, unknown_kernel_busy_us=10_000)


def test_set_lending_round_trips_and_bad_lend_lists_fail_at_the_boundary(table):
    assert table.lending(2) == ([], False)
    table.set_lending(2, [0, 5, 7], low_priority=True)
    assert table.lending(2) == ([0, 5, 7], True)
    generation = table.allowance(2)[0]
    table.set_lending(2, [], low_priority=False)
    assert table.lending(2) == ([], False)
    assert table.allowance(2)[0] == generation  # lend lists do not move the allowance generation
    with pytest.raises(ValueError, match="0..7"):
        table.set_lending(2, [8], low_priority=False)
    with pytest.raises(ValueError, match="borrower's slot 2"):
        table.set_lending(2, [2], low_priority=False)
    with pytest.raises(ValueError, match="distinct"):
        table.set_lending(2, [1, 1], low_priority=False)
    with pytest.raises(ValueError, match="True or False"):
        table.set_lending(2, [1], low_priority=1)
    table.set_lending(2, [1], low_priority=True, unroll_graphs=True)
    assert table.lending(2) == ([1], True) and table.unrolls_graphs(2)
    table.set_lending(2, [1], low_priority=True)
    assert not table.unrolls_graphs(2)
    with pytest.raises(ValueError, match="unroll_graphs must be True or False"):
        table.set_lending(2, [1], low_priority=False, unroll_graphs=None)
    with pytest.raises(ValueError, match="slots 0..7"):
        table.set_lending(9, [1], low_priority=False)
    reader = native.AllowanceTable.open(table.path, writable=False)
    with pytest.raises(PermissionError):
        reader.set_lending(2, [1], low_priority=False)
    assert reader.activity(3) == ActivityWord(None, 0)
    reader.close(unlink=False)


def test_c_launch_rule_equals_the_python_rule(built_library):
    """lender_is_idle and after_launch of scheduler/lending.py against their C mirror, on random words."""
    lib = native._lib()
    rng = np.random.default_rng(4)
    word = np.zeros(1, dtype=native.layout()["lithos_activity"])
    for _ in range(3000):
        last = int(rng.choice([0, int(rng.integers(1, 10**7))]))
        busy = int(rng.integers(0, 2 * 10**7))
        now = int(rng.integers(1, 2 * 10**7))       # now < last happens too: a lender that launched just after
        window = int(rng.integers(1, 10**6))
        python_word = ActivityWord(last or None, busy)
        assert bool(lib.lithos_lender_is_idle(last, busy, now, window)) == lender_is_idle(python_word, now, window)
        predicted = int(rng.choice([0, int(rng.integers(1, 10**6))]))
        unknown = int(rng.integers(1, 10**7))
        word["last_launch_ns"], word["busy_until_ns"] = last, busy
        lib.lithos_activity_after_launch(word.ctypes.data, now, predicted, unknown)
        expected = after_launch(python_word, now, predicted or None, unknown)
        # C keeps last_launch_ns monotonic across threads; for one writer that is now whenever now >= last
        if now >= last:
            assert (int(word["last_launch_ns"][0]), int(word["busy_until_ns"][0])) == (expected.last_launch_ns,
                                                                                        expected.busy_until_ns)
    # busy_until saturates instead of wrapping past 2^64 (a huge knob or prediction)
    for predicted, unknown in ((0, 2**63), (2**63, 1)):
        word["last_launch_ns"], word["busy_until_ns"] = 0, 2**63
        lib.lithos_activity_after_launch(word.ctypes.data, 2**63 + 5, predicted, unknown)
        assert int(word["busy_until_ns"][0]) == 2**64 - 1


def test_c_predictor_runs_the_golden_sequence(built_library, monkeypatch):
    """tests/test_scheduler.py's golden sequence, its steps and its assertions, on the shim's C predictor."""
    import test_scheduler
    monkeypatch.setattr(test_scheduler, "LatencyPredictor", native.NativeLatencyPredictor)
    test_scheduler.test_predictor_golden_sequence()


def test_c_predictor_equals_the_python_predictor_on_random_sequences(built_library):
    rng = np.random.default_rng(11)
    for capacity in (1, 3, 16):
        python_predictor, c_predictor = LatencyPredictor(capacity=capacity), native.NativeLatencyPredictor(capacity)
        keys = [KernelKey(int(rng.integers(0, 2**63)), int(rng.integers(1, 2**40)), int(rng.integers(1, 1024)))
                for _ in range(2 * capacity + 2)]
        for _ in range(4000):
            key = keys[int(rng.integers(len(keys)))]
            if rng.random() < 0.6:
                duration_ns = int(rng.choice([int(rng.integers(1, 10**6)), int(rng.integers(1, 2**50))]))
                tpcs = int(rng.integers(1, 129))
                python_predictor.observe(key, duration_ns, tpcs)
                c_predictor.observe(key, duration_ns, tpcs)
            else:
                tpcs = int(rng.integers(1, 129))
                assert c_predictor.predict_ns(key, tpcs) == python_predictor.predict_ns(key, tpcs)
            assert len(c_predictor) == len(python_predictor)
        for key in keys:
            assert c_predictor.samples(key) == python_predictor.samples(key)


LEND_PRELUDE = """
lib.lithos_client_wait_union_builds.argtypes = [ctypes.c_int]
def lending():
    c = (ctypes.c_uint64 * 11)()
    lib.lithos_client_lending_counts(c, 11)
    return {"borrowed": c[0], "pending": c[1], "too_deep": c[2], "paced": c[3], "paced_us": c[10]}
def show_outcomes():   # every lending outcome, as native.LENDING_OUTCOME_NAMES names them
    c = (ctypes.c_uint64 * 11)(); lib.lithos_client_lending_counts(c, 11); show(*c)
def full_log():
    lines = cuda.fake_log().decode().splitlines()
    cuda.fake_log_clear()
    return lines
def launch_fn(function, stream, grid=64):   # 64 blocks: more than the 16 SMs of 8 TPCs, so borrowing can help
    assert lib.cuLaunchKernel(ctypes.c_void_p(function), grid, 1, 1, 32, 1, 1, 0, ctypes.c_void_p(stream), None, None) == 0
def launch(stream, grid=64):
    launch_fn(0x77, stream, grid)
def warm_then_borrow(stream, function=0x77):
    # every launch is sampled (LITHOS_SAMPLE_EVERY=1); the fake reports FAKE_KERNEL_US per kernel.
    # Launch k sees the samples of launches 1..k-2, so launch 5 is the first with a prediction (3 samples).
    for _ in range(5):
        launch_fn(function, stream)
    pending = lending()["pending"]
    assert lib.lithos_client_wait_union_builds(20000) == 0
    launch_fn(function, stream)
    return pending
def show_log():
    for line in full_log(): show(line)
"""


@pytest.fixture
def lend_table(built_library, tmp_path):
    """Slot 0 owns TPCs 0-7, slot 1 owns 8-15; slot 0 may borrow slot 1's."""
    t = native.AllowanceTable.create(FAKE_GPU_UUID, str(tmp_path), max_slots=4)
    t.set_allowance(0, list(range(8)))
    t.set_allowance(1, list(range(8, 16)))
    t.set_lending(0, [1], low_priority=False)
    yield t
    if os.path.exists(t.path):
        t.close()


def outcomes(words: list[str]) -> dict[str, int]:
    """A show_outcomes() line, by name."""
    return dict(zip(native.LENDING_OUTCOME_NAMES, map(int, words)))


def run_lending_client(code: str, env: dict) -> list[list[str]]:
    lines, _ = run_fake(LEND_PRELUDE + textwrap.dedent(code), env)
    return lines


def launch_places(lines) -> list[tuple[int, str]]:
    """For each cuLaunchKernel in a fake log: (TPC groups of its green context, or 0 for an ordinary stream; stream)."""
    groups_of_green = {w[1]: int(w[2].split("=")[1]) for w in lines if w and w[0] == "cuGreenCtxCreate"}
    green_of_stream = {w[1]: w[2].split("=")[1] for w in lines if w and w[0] == "cuGreenCtxStreamCreate"}
    return [(groups_of_green.get(green_of_stream.get(w[1]), 0), w[1]) for w in lines if w and w[0] == "cuLaunchKernel"]


def lend_env(fake_driver, table, slot=0, **extra):
    return fake_env(fake_driver, table, slot, **{"LITHOS_SAMPLE_EVERY": "1", **extra})


def test_lending_off_launches_stay_on_the_own_tpcs_and_the_activity_word_is_published(fake_driver, lend_table):
    lend_table.set_lending(0, [], low_priority=False)
    before = time.monotonic_ns()
    lines = run_lending_client("""
    s = create(1)
    show("pending", warm_then_borrow(s), lending()["borrowed"])
    show_log()
    show("pid", __import__("os").getpid())
    """, lend_env(fake_driver, lend_table))
    assert lines[0] == ["pending", "0", "0"]
    places = launch_places(lines)
    assert len(places) == 6 and all(groups == 8 for groups, _ in places)
    assert not any(w[0] == "cuGreenCtxCreate" and w[2] != "groups=8" for w in lines)
    records, _ = lend_table.read_launches(0)
    assert [int(r["tpcs"]) for r in records] == [8] * 6
    assert all(int(r["lender_slots_used"]) == 0 and int(r["predicted_own_ns"]) == 0 for r in records)
    # the own activity word is published at every launch even without a lend list (this client is a lender)
    word = lend_table.activity(0)
    assert before < word.last_launch_ns == int(records[-1]["host_ns"]) < word.busy_until_ns
    assert lend_table.activity_writer_pid(0) == int(lines[-1][1])
    assert lend_table.activity(1) == ActivityWord(None, 0)


def test_a_borrower_whose_lender_is_idle_launches_on_the_union(fake_driver, lend_table):
    lines = run_lending_client("""
    s = create(1)
    show("pending", warm_then_borrow(s))
    show("counts", lending()["borrowed"], lending()["pending"])
    show_log()
    """, lend_env(fake_driver, lend_table))
    assert lines[0] == ["pending", "1"]          # launch 5: union queued to the builder, own TPCs used
    assert lines[1] == ["counts", "1", "1"]
    places = launch_places(lines)
    assert [groups for groups, _ in places] == [8] * 5 + [16]
    # the borrowed launch is ordered with the application's (own green) stream by events
    own_stream, borrowed_stream = places[0][1], places[-1][1]
    assert own_stream != borrowed_stream and {stream for _, stream in places[:5]} == {own_stream}
    after_union = lines[max(i for i, w in enumerate(lines) if w[0] == "cuGreenCtxStreamCreate") + 1:]
    timing = ["cuEventRecord", borrowed_stream, "same-context"]   # sampled: a timing event each side
    # a deferred run: the join back to the own stream is owed (nothing else happened before exit)
    assert after_union == [["cuEventRecord", own_stream, "same-context"], ["cuStreamWaitEvent", borrowed_stream], timing,
                           ["cuLaunchKernel", borrowed_stream], timing]
    records, _ = lend_table.read_launches(0)
    last = records[-1]
    assert (int(last["tpcs"]), int(last["own_tpcs"]), native.lenders_of(last)) == (16, 8, [1])
    assert int(last["predicted_own_ns"]) == 1000 and int(last["predicted_ns"]) == 1000
    assert [native.lenders_of(r) for r in records[:-1]] == [[]] * 5
    assert [int(r["predicted_own_ns"]) for r in records[:5]] == [0, 0, 0, 0, 1000]


BORROW_THEN_WAIT = """
s = create(1)
warm_then_borrow(s)
show("borrowed", lending()["borrowed"])
wait_for_parent()
"""


def start_waiting_client(code: str, env: dict) -> tuple[subprocess.Popen, list[list[str]]]:
    """A lending-prelude client run up to its first wait_for_parent(): (the process, the lines it showed)."""
    proc = subprocess.Popen([sys.executable, "-c", FAKE_PRELUDE + LEND_PRELUDE + code], env=env, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    while (line := proc.stdout.readline()) and line.strip() != "ready":
        lines.append(line.split())
    return proc, lines


def finish_client(proc: subprocess.Popen) -> str:
    """Says "go" to a waiting client; returns the rest of what it showed."""
    out, err = proc.communicate("go\n", timeout=60)
    assert proc.returncode == 0, err
    return out


def start_lending_client(code: str, env: dict) -> subprocess.Popen:
    """A lending client that borrows once, says so, and waits for the parent's "go" before `code`."""
    proc, lines = start_waiting_client(BORROW_THEN_WAIT + textwrap.dedent(code), env)
    assert lines == [["borrowed", "1"]]
    return proc


def test_a_memset_on_a_busy_stream_neither_blocks_borrowing_nor_marks_its_client_busy(fake_driver, lend_table, tmp_path):
    """Memory ops are not predicted: they add nothing to the queue estimate (a kernel after a memset on a
    stream that is not drained still borrows) and move no activity word (it keeps the last kernel's)."""
    busy = tmp_path / "busy"
    lines = run_lending_client(f"""
    import os, time
    s = create(1)
    warm_then_borrow(s)
    time.sleep(0.05)
    open({str(busy)!r}, "w").close()       # from now on the stream never looks drained
    before = dict(lending())
    def memory_ops():
        assert lib.cuMemsetD8Async(ctypes.c_uint64(0xd0), 7, 16, ctypes.c_void_p(s)) == 0
        assert lib.cuMemcpyDtoDAsync_v2(ctypes.c_uint64(0xd0), ctypes.c_uint64(0xe0), 64, ctypes.c_void_p(s)) == 0
    memory_ops()
    launch(s)
    show("borrowed", lending()["borrowed"] - before["borrowed"], "too_deep", lending()["too_deep"] - before["too_deep"])
    memory_ops()
    os.remove({str(busy)!r})
    """, lend_env(fake_driver, lend_table, FAKE_STREAM_BUSY_FILE=str(busy)))
    assert lines == [["borrowed", "1", "too_deep", "0"]]
    records, _ = lend_table.read_launches(0)
    assert lend_table.activity(0).last_launch_ns == int(records[-1]["host_ns"])   # the last kernel's, not a memset's


def test_an_active_lender_keeps_its_tpcs_and_lends_them_again_once_idle(fake_driver, lend_table):
    lend_table.set_lending_knobs(atom_us=250, idle_window_us=60e6, unknown_kernel_busy_us=1)
    proc = start_lending_client("""
    launch(s)                  # after the parent ran the lender (slot 1) once
    show("borrowed", lending()["borrowed"])
    wait_for_parent()          # the parent shortens the idle window: the lender is idle again
    launch(s)
    show("borrowed", lending()["borrowed"])
    """, lend_env(fake_driver, lend_table))
    lender, _ = run_fake("launch(None)\nshow(__import__('os').getpid())", lend_env(fake_driver, lend_table, slot=1))
    word = lend_table.activity(1)
    assert word.last_launch_ns > 0 and word.busy_until_ns == word.last_launch_ns + 1000
    assert lend_table.activity_writer_pid(1) == int(lender[0][0])
    proc.stdin.write("go\n")
    proc.stdin.flush()
    assert proc.stdout.readline().split() == ["borrowed", "1"]   # the lender launched within the idle window
    assert proc.stdout.readline().strip() == "ready"
    lend_table.set_lending_knobs(atom_us=250, idle_window_us=1, unknown_kernel_busy_us=1)
    assert finish_client(proc).split() == ["borrowed", "2"]
    records, _ = lend_table.read_launches(0)
    assert [int(r["tpcs"]) for r in records[-3:]] == [16, 8, 16]
    assert [native.lenders_of(r) for r in records[-3:]] == [[1], [], [1]]


QUEUED_DEEP = """
s = create(1)
warm_then_borrow(s)      # launches 1-4 unknown: the queue estimate ends 180 ms after the latest; the stream never drains
counts = lending()
show("counts", counts["borrowed"], counts["too_deep"] > 0, counts["paced"])
show("slept_us", counts["paced_us"])
"""


def test_a_borrower_queued_deeper_than_the_atom_keeps_to_its_own_tpcs(fake_driver, lend_table):
    """A kernel queued behind others would run on lent TPCs long after its launch: no borrowing."""
    lend_table.set_lending_knobs(atom_us=100_000, idle_window_us=500, unknown_kernel_busy_us=180_000)
    lines = run_lending_client(QUEUED_DEEP + "show_log()", lend_env(fake_driver, lend_table, FAKE_STREAM_BUSY="1"))
    assert lines[0] == ["counts", "0", "True", "0"]
    assert ["cuStreamQuery", launch_places(lines[1:])[0][1], "busy"] in lines   # asked the stream once
    assert [groups for groups, _ in launch_places(lines)] == [8] * 6


def test_a_paced_low_priority_borrower_waits_for_its_queue_then_borrows(fake_driver, lend_table):
    lend_table.set_lending_knobs(atom_us=100_000, idle_window_us=500, unknown_kernel_busy_us=180_000)
    lend_table.set_lending(0, [1], low_priority=True)
    start = time.monotonic()
    lines = run_lending_client(QUEUED_DEEP + "show_log()",
                               lend_env(fake_driver, lend_table, FAKE_STREAM_BUSY="1", LITHOS_LEND_PACE="1"))
    assert lines[0] == ["counts", "1", "False", "1"]   # launch 5 slept ~80 ms, then found the union pending
    assert time.monotonic() - start > 0.07
    assert 70_000 < int(lines[1][1]) < (time.monotonic() - start) * 1e6   # the sleep, in microseconds
    assert [groups for groups, _ in launch_places(lines)] == [8] * 5 + [16]


@pytest.mark.parametrize("pace", ["0", None])
def test_pacing_is_off_unless_asked_for(fake_driver, lend_table, pace):
    lend_table.set_lending_knobs(atom_us=100_000, idle_window_us=500, unknown_kernel_busy_us=180_000)
    lend_table.set_lending(0, [1], low_priority=True)
    env = {key: value for key, value in lend_env(fake_driver, lend_table, FAKE_STREAM_BUSY="1").items()
           if key != "LITHOS_LEND_PACE"}
    if pace is not None:
        env["LITHOS_LEND_PACE"] = pace
    lines = run_lending_client(QUEUED_DEEP, env)
    assert lines[0] == ["counts", "0", "True", "0"]


def test_graph_replays_are_timed_and_predicted_so_an_owner_replaying_graphs_lends(fake_driver, lend_table):
    """Sampled cuGraphLaunch replays get an event pair on the app stream and feed the predictor keyed by
    the graph exec: from the fifth replay on, the owner's activity word says when it will be idle."""
    lend_table.set_lending_knobs(atom_us=250, idle_window_us=500, unknown_kernel_busy_us=1)
    lines = run_lending_client("""
    s = create(1)
    full_log()                 # (the stream's creation)
    for _ in range(5):
        assert lib.cuGraphLaunch(ctypes.c_void_p(0x9a), ctypes.c_void_p(s)) == 0
    show_log()
    """, lend_env(fake_driver, lend_table, slot=1, FAKE_KERNEL_US="300"))
    graph_calls = [w for w in lines if w[0] in ("cuGraphLaunch", "cuEventRecord")]
    stream = graph_calls[0][1]
    assert graph_calls == [["cuEventRecord", stream, "same-context"], ["cuGraphLaunch", stream],
                           ["cuEventRecord", stream, "same-context"]] * 5   # every replay sampled here
    records, _ = lend_table.read_launches(1)
    assert [native.API_NAMES[int(r["api"])] for r in records] == ["cuGraphLaunch"] * 5
    assert [native.VIEW_NAMES[int(r["view"])] for r in records] == ["graph"] * 5
    assert [int(r["tpcs"]) for r in records] == [8] * 5      # the allowance in force
    assert [int(r["function"]) for r in records] == [0x9a] * 5
    assert [int(r["predicted_ns"]) for r in records] == [0, 0, 0, 0, 300_000]   # replay k sees 1..k-2
    assert all(int(r["gpu_ns"]) == 300_000 for r in records[:4])
    word = lend_table.activity(1)
    assert word.busy_until_ns == word.last_launch_ns + 300_000


def test_an_owner_replaying_a_graph_publishes_its_longest_sample_not_the_median(fake_driver, lend_table):
    """A replay's time varies with what runs beside it: lenders must not look idle while it runs."""
    lend_table.set_lending_knobs(atom_us=250, idle_window_us=500, unknown_kernel_busy_us=1)
    run_lending_client("""
    import os
    s = create(1)
    for us in (100, 300, 200, 400, 250):   # replay k's harvest reads replay k-1's time (the fake's FAKE_KERNEL_US)
        os.environ["FAKE_KERNEL_US"] = str(us)
        assert lib.cuGraphLaunch(ctypes.c_void_p(0x9a), ctypes.c_void_p(s)) == 0
    """, lend_env(fake_driver, lend_table, slot=1))
    records, _ = lend_table.read_launches(1)
    assert int(records[-1]["predicted_ns"]) == 300_000                  # the median of 300, 200, 400
    word = lend_table.activity(1)
    assert word.busy_until_ns == word.last_launch_ns + 400_000          # the longest


def test_a_grid_that_fits_the_own_sms_borrows_only_to_stay_in_a_borrowing_run(fake_driver, lend_table):
    """Slot 0 owns 8 TPCs = 16 SMs: a known short kernel of 16 blocks already runs in one wave there
    and stays on them (fits_own_sms); the same kernel with 64 blocks borrows the idle lender's; right
    after that, while the borrowing run's join is still owed, the 16-block kernel borrows too (the
    stream stays in the union's green context); after a sync paid the join it stays home again."""
    lines = run_lending_client("""
    s = create(1)
    for _ in range(6): launch(s, grid=16)
    show_outcomes()
    warm_then_borrow(s)
    show_outcomes()
    launch(s, grid=16)
    show_outcomes()
    lib.cuStreamSynchronize(ctypes.c_void_p(s))
    launch(s, grid=16)
    show_outcomes()
    """, lend_env(fake_driver, lend_table))
    assert outcomes(lines[0])["fits_own_sms"] == 2 and outcomes(lines[0])["unknown"] == 4   # launch 5 is the first predicted
    assert outcomes(lines[1])["borrowed"] == 1 and outcomes(lines[1])["fits_own_sms"] == 2
    assert outcomes(lines[2])["borrowed"] == 2 and outcomes(lines[2])["fits_own_sms"] == 2
    assert outcomes(lines[3])["borrowed"] == 2 and outcomes(lines[3])["fits_own_sms"] == 3
    records, _ = lend_table.read_launches(0)
    assert [int(r["tpcs"]) for r in records[:6]] == [8] * 6 and [int(r["tpcs"]) for r in records[-3:]] == [16, 16, 8]


def test_a_small_grid_in_a_borrowing_run_never_paces(fake_driver, lend_table):
    """A low-priority borrower whose queue is deeper than the atom paces for a kernel that gains from
    lent TPCs, but a grid within its own SMs in a borrowing run does not sleep to stay there."""
    lend_table.set_lending(0, [1], low_priority=True)
    lend_table.set_lending_knobs(atom_us=1_000, idle_window_us=500, unknown_kernel_busy_us=1)
    lines = run_lending_client("""
    s = create(1)
    for _ in range(6): launch(s, grid=16)
    warm_then_borrow(s)                       # paces (900 us kernels queue deeper than the atom), then borrows
    before = lending()["paced"], lending()["borrowed"]
    for _ in range(20): launch(s, grid=16)    # in the borrowing run, queued ever deeper
    show("paced", lending()["paced"] - before[0], "borrowed", lending()["borrowed"] - before[1])
    """, lend_env(fake_driver, lend_table, FAKE_STREAM_BUSY="1", FAKE_KERNEL_US="900"))
    assert lines[0][:2] == ["paced", "0"], lines


def test_an_unknown_kernel_never_borrows(fake_driver, lend_table):
    lines = run_lending_client("""
    s = create(1)
    for _ in range(20): launch(s)
    show("counts", lending()["borrowed"], lending()["pending"])
    show_outcomes()
    show_log()
    """, lend_env(fake_driver, lend_table, LITHOS_SAMPLE_EVERY="0"))   # nothing timed: no prediction ever
    assert lines[0] == ["counts", "0", "0"]
    assert outcomes(lines[1]) == {
        "borrowed": 0, "union_pending": 0, "queue_too_deep": 0, "paced": 0, "unknown": 20, "too_long": 0, "no_idle_lender": 0,
        "capturing": 0, "fits_own_sms": 0, "no_gain": 0, "paced_us": 0}
    lines = lines[1:]
    assert {groups for groups, _ in launch_places(lines)} == {8}
    records, _ = lend_table.read_launches(0)
    assert len(records) == 20 and not any(int(r["predicted_own_ns"]) or int(r["lender_slots_used"]) for r in records)
    # unknown kernels credit unknown_kernel_busy_ns to the own activity word
    word = lend_table.activity(0)
    assert word.busy_until_ns >= word.last_launch_ns + LendingPolicy().unknown_kernel_busy_ns


def test_a_kernel_predicted_beyond_the_atom_never_borrows(fake_driver, lend_table):
    code = """
    s = create(1)
    show("pending", warm_then_borrow(s), lending()["borrowed"])
    for _ in range(5): launch(s)
    show("borrowed", lending()["borrowed"])
    """
    lines = run_lending_client(code, lend_env(fake_driver, lend_table, FAKE_KERNEL_US="300"))
    assert lines == [["pending", "0", "0"], ["borrowed", "0"]]
    records, _ = lend_table.read_launches(0)
    assert {int(r["predicted_own_ns"]) for r in records[4:]} == {300_000}   # > atom 250 us
    assert all(int(r["tpcs"]) == 8 for r in records)
    # the same kernel with an atom of exactly its prediction borrows (the rule is <= atom)
    lend_table.set_lending_knobs(atom_us=300, idle_window_us=500, unknown_kernel_busy_us=10_000)
    lines = run_lending_client(code, lend_env(fake_driver, lend_table, FAKE_KERNEL_US="300"))
    # Launches 6-10 borrow. The fake's kernels take 300 us on 16 TPCs too, and one sample on 16 TPCs
    # predicts ceil(300000 * 16 / 8) = 600 us on the own 8 (no speed-up is ever credited); once those
    # samples are the median (4 of 8), launch 11 stays on the own TPCs.
    assert lines == [["pending", "1", "1"], ["borrowed", "5"]]
    records, _ = lend_table.read_launches(0, since_index=len(records))
    assert [int(r["tpcs"]) for r in records] == [8] * 5 + [16] * 5 + [8]
    assert int(records[-1]["predicted_own_ns"]) == 600_000


def test_low_priority_borrowers_launch_on_least_priority_green_streams(fake_driver, lend_table):
    code = """
    p = create(1, -2)                 # an application stream of high priority
    warm_then_borrow(p)
    show_log()
    """
    for low_priority, expected in ((True, "priority=0"), (False, "priority=-2")):
        lend_table.set_lending(0, [1], low_priority=low_priority)
        lines = run_lending_client(code, lend_env(fake_driver, lend_table))
        union_green = [w[1] for w in lines if w[0] == "cuGreenCtxCreate" and w[2] == "groups=16"]
        union_streams = [w for w in lines if w[0] == "cuGreenCtxStreamCreate" and w[2] == f"green={union_green[0]}"]
        assert [w[3] for w in union_streams] == [expected]
        assert launch_places(lines)[-1] == (16, union_streams[0][1])
        records, _ = lend_table.read_launches(0, since_index=native.LaunchRing(native.ring_path(lend_table.path, 0)).head() - 1)
        assert int(records[-1]["low_priority"]) == int(low_priority)


def test_cluster_kernels_borrow_whole_cosched_groups_only(fake_driver, lend_table):
    """Clusters > 2 go to the co-scheduled view of the union: the 8-SM groups wholly inside own + lent TPCs."""
    lend_table.set_cosched_map([t // 4 for t in range(60)] + [255] * 6)   # groups 0,1 own; 2,3 lent
    lines = run_lending_client("""
    s = create(1)
    warm_then_borrow(s, function=0xc1)
    show_log()
    """, lend_env(fake_driver, lend_table))
    records, _ = lend_table.read_launches(0)
    assert [int(r["view"]) for r in records] == [1] * 6                   # co-scheduled view
    assert [int(r["tpcs"]) for r in records] == [8] * 5 + [16]
    assert native.lenders_of(records[-1]) == [1]
    assert launch_places(lines)[-1][0] == 4                                # the union's 4 co-scheduled groups


def test_whole_cosched_groups_give_one_green_context_for_cluster_and_plain_kernels(fake_driver, lend_table):
    """An allowance of whole co-scheduled groups (as Ray grants) covers the same SMs in both views, so
    one green context of those groups serves every kernel: on the default stream, plain and cluster
    kernels in turn stay one deferred run (no events between them); on a created stream all go direct."""
    lend_table.set_lending(0, [], low_priority=False)
    for cosched_map, expected_greens in (([t // 4 for t in range(60)] + [255] * 6, ["groups=2"]),   # 0-7 = groups 0, 1
                                         ([255] * 66, ["groups=8"])):                               # no group: TPC view only
        lend_table.set_cosched_map(cosched_map)
        lines = run_lending_client("""
        s = create(1)
        for stream in (None, s):
            for function in (0x77, 0xc1, 0x77, 0xc1):
                launch_fn(function, stream)
        c = (ctypes.c_uint64 * 4)(); lib.lithos_client_launch_counts(c, 4); show("counts", *c)
        show_log()
        """, lend_env(fake_driver, lend_table, LITHOS_SAMPLE_EVERY="0"))
        assert [w[2] for w in lines if w[0] == "cuGreenCtxCreate"] == expected_greens
        direct, paired, unconfined, continued = map(int, lines[0][1:])
        if expected_greens == ["groups=2"]:
            assert (direct, paired, unconfined, continued) == (4, 4, 0, 3)
            assert len({stream for _, stream in launch_places(lines)}) == 2   # one green stream each
        else:                                              # cluster kernels have no view: unconfined
            assert (direct, paired, unconfined) == (2, 4, 2)   # on the created stream via a helper pair


def test_a_run_that_moves_to_another_green_stream_of_the_same_app_stream_hands_its_join_over(fake_driver, lend_table):
    """TPCs 0-9 with groups 0, 1 (0-7) whole: plain kernels on the TPC view, cluster kernels on the
    co-scheduled one (two green streams). Alternating on the default stream, each switch makes the
    new green stream wait for the old one's last kernel (2 event calls) instead of joining back to the
    app stream and starting a new run (4); the one join owed is paid at the next driver call."""
    lend_table.set_lending(0, [], low_priority=False)
    lend_table.set_cosched_map([t // 4 for t in range(60)] + [255] * 6)
    lend_table.set_allowance(0, list(range(10)))
    lines = run_lending_client("""
    full_log()
    for function in (0x77, 0xc1, 0x77, 0xc1):
        launch_fn(function, None)
    lib.cuStreamSynchronize(None)
    c = (ctypes.c_uint64 * 4)(); lib.lithos_client_join_counts(c, 4); show("joins", *c)
    show_log()
    """, fake_env(fake_driver, lend_table))
    joins, calls = lines[0], [w for w in lines[1:] if w[0] in ("cuEventRecord", "cuStreamWaitEvent", "cuLaunchKernel",
                                                                  "cuStreamSynchronize")]
    places = launch_places(lines)
    tpc_green, cosched_green = places[0][1], places[1][1]
    assert [groups for groups, _ in places] == [10, 2, 10, 2] and tpc_green != cosched_green
    assert joins == ["joins", "1", "1", "0", "3"]   # runs started, joins paid, legacy joins, handoffs
    handoff = lambda old, new: [["cuEventRecord", old, "same-context"], ["cuStreamWaitEvent", new], ["cuLaunchKernel", new]]
    assert calls == (run_start("0", tpc_green) + handoff(tpc_green, cosched_green) + handoff(cosched_green, tpc_green)
                     + handoff(tpc_green, cosched_green) + join("0", cosched_green) + [["cuStreamSynchronize", "0"]])


def test_a_whole_gpu_allowance_launches_on_the_program_streams_as_without_the_shim(fake_driver, lend_table):
    """Every TPC allowed: nothing to confine and nobody to lend to or borrow from, so no green context,
    no helper stream, no events (not even sampled timing), no prediction; launches are recorded in
    their view on all 66 TPCs and move the activity word as an unknown kernel does."""
    lend_table.set_cosched_map([t // 4 for t in range(60)] + [255] * 6)
    lend_table.set_lending(0, [], low_priority=False)
    lend_table.clear(1)
    lend_table.set_allowance(0, list(range(66)))
    for sample_every in ("0", "1"):
        lines = run_lending_client("""
        s = create(1)
        for stream in (None, s):
            for function in (0x77, 0xc1):
                launch_fn(function, stream)
        c = (ctypes.c_uint64 * 4)(); lib.lithos_client_launch_counts(c, 4); show("counts", *c)
        show("stream", hex(s))
        show_log()
        """, lend_env(fake_driver, lend_table, LITHOS_SAMPLE_EVERY=sample_every))
        counts, (_, stream), log_lines = lines[0], lines[1], lines[2:]
        assert counts == ["counts", "4", "0", "0", "0"]
        assert not [w for w in log_lines if w[0].startswith("cuGreenCtx")]
        assert [w[1] for w in log_lines if w[0] == "cuLaunchKernel"] == ["0", "0", stream, stream], log_lines
        records = lend_table.read_launches(0)[0][-4:]
        assert [native.VIEW_NAMES[int(r["view"])] for r in records] == ["tpc", "cosched"] * 2
        assert [int(r["tpcs"]) for r in records] == [66] * 4
        assert [int(r["predicted_ns"]) for r in records] == [0] * 4
        assert not [w for w in log_lines if w[0].startswith("cuEvent")], log_lines
        word, unknown_ns = lend_table.activity(0), lend_table.lending_knobs()["unknown_kernel_busy_ns"]
        assert word == ActivityWord(int(records[-1]["host_ns"]), int(records[-1]["host_ns"]) + unknown_ns)


def test_a_program_repeating_a_fixed_launch_pattern_gets_every_kernel_timed(fake_driver, lend_table):
    """Two kernels in turn, one launch in 64 timed: a fixed period would only ever time one of them
    (every 64th launch is always the same kernel); random timing, and one in 4 of kernels not
    predicted yet, teach the predictor both."""
    lend_table.set_lending(0, [], low_priority=False)
    run_lending_client("""
    s = create(1)
    for _ in range(200):
        launch_fn(0x77, s); launch_fn(0x99, s)
    """, fake_env(fake_driver, lend_table, LITHOS_SAMPLE_EVERY="64", FAKE_KERNEL_US="5"))
    records = lend_table.read_launches(0)[0][-2:]
    assert sorted(int(r["function"]) for r in records) == [0x77, 0x99]
    assert all(abs(int(r["predicted_ns"]) - 5_000) <= 1 for r in records), records["predicted_ns"]   # 5 us (float ms)


def test_leaving_a_whole_gpu_allowance_counts_unknown_work_as_queued(fake_driver, lend_table):
    """Whole-GPU launches are not counted in the queue estimates, so when the allowance shrinks this
    thread's estimates say lend_unknown_kernel_busy_ns of work is queued: a short known kernel with an
    idle lender then finds its queue too deep (the stream says busy) instead of borrowing."""
    lend_table.set_lending(0, [], low_priority=False)
    lend_table.set_lending_knobs(atom_us=250, idle_window_us=500, unknown_kernel_busy_us=10_000)
    proc, _ = start_waiting_client(textwrap.dedent("""
    for _ in range(5): launch_fn(0x77, None)      # on 0-7, sampled: known from the fourth on (1 us)
    __import__("time").sleep(0.03)                # the unknown launches' 10 ms credits are over
    wait_for_parent()          # the parent allows every TPC
    launch_fn(0x77, None)
    wait_for_parent()          # the parent allows 0-7 again and lends slot 1's idle 8-15
    launch_fn(0x77, None)
    show_outcomes()
    """), lend_env(fake_driver, lend_table, FAKE_STREAM_BUSY="1"))
    lend_table.set_allowance(0, list(range(66)))
    proc.stdin.write("go\n"); proc.stdin.flush()
    assert proc.stdout.readline().strip() == "ready"
    lend_table.set_allowance(0, list(range(8)))
    lend_table.set_lending(0, [1], low_priority=False)
    counts = outcomes(finish_client(proc).split())
    whole, confined = lend_table.read_launches(0)[0][-2:]
    assert (int(whole["tpcs"]), int(confined["tpcs"]), int(confined["predicted_ns"])) == (66, 8, 1_000)
    assert counts["queue_too_deep"] == 1 and counts["union_pending"] == counts["borrowed"] == 0, counts

def test_after_the_whole_gpu_is_allowed_a_green_stream_of_an_earlier_allowance_is_left_for_an_ordinary_one(
        fake_driver, lend_table):
    """A stream created while 8 TPCs were allowed is a green stream of those 8; once every TPC is
    allowed its launches go to a helper stream of the ordinary context (ordered by events), never onto
    that green stream, while the default stream takes its launches itself."""
    lend_table.set_lending(0, [], low_priority=False)
    code = """
    s = create(1)
    show(hex(s))
    wait_for_parent()          # the parent allows every TPC
    full_log()
    launch_fn(0x77, s); launch_fn(0xc1, s); launch_fn(0x77, None)
    show_log()
    """
    proc, [[s]] = start_waiting_client(textwrap.dedent(code), lend_env(fake_driver, lend_table, LITHOS_SAMPLE_EVERY="0"))
    lend_table.clear(1)
    lend_table.set_allowance(0, list(range(66)))
    out = finish_client(proc)
    launches = [w[1] for w in (line.split() for line in out.splitlines()) if w[0] == "cuLaunchKernel"]
    assert len(launches) == 3 and launches[0] == launches[1] != s and launches[2] == "0"
    records = lend_table.read_launches(0)[0][-3:]
    assert [native.VIEW_NAMES[int(r["view"])] for r in records] == ["unconfined", "unconfined", "tpc"]


def test_a_lending_union_of_every_tpc_is_a_green_route_even_after_a_whole_gpu_allowance(fake_driver, lend_table):
    """Once allowed every TPC, then 0-7 with lender slot 1 on 8-65 idle: the union of all 66 TPCs is
    built as green contexts (not the whole-GPU route of before), and the launch borrows."""
    lend_table.set_allowance(1, list(range(8, 66)))
    code = """
    s = create(1)
    launch_fn(0x77, None)
    wait_for_parent()          # the parent allows 0-7 and lends 8-65
    s = create(1)
    warm_then_borrow(s)
    show_outcomes()
    """
    lend_table.set_allowance(0, list(range(66)))
    proc, _ = start_waiting_client(textwrap.dedent(code), lend_env(fake_driver, lend_table))
    lend_table.set_allowance(0, list(range(8)))
    assert outcomes(finish_client(proc).split())["borrowed"] == 1
    assert int(lend_table.read_launches(0)[0][-1]["tpcs"]) == 66


def test_clients_write_only_their_own_activity_word(fake_driver, lend_table):
    code = """
    import os
    launch(None)
    path = os.environ["LITHOS_SHM"] + ".activity"
    maps = {l.split()[1]: l.split() for l in open("/proc/self/maps") if l.rstrip().endswith(path)}
    for m in sorted(maps.values(), key=lambda m: m[1]):
        show(m[1], m[2], int(m[0].split("-")[1], 16) - int(m[0].split("-")[0], 16))
    mapping, offset = os.environ["WRITE_AT"].split(":")
    ctypes.memset(int(maps[mapping][0].split("-")[0], 16) + int(offset) + 24, 0xff, 1)   # past writer_pid: harmless
    show("wrote")
    """
    # the whole file read-only, and only this slot's page (offset 1 * 4096) read-write: writing there works
    lines, _ = run_fake(code, lend_env(fake_driver, lend_table, slot=1, WRITE_AT="rw-s:0"))
    assert lines == [["r--s", "00000000", str(4 * 4096)], ["rw-s", "00001000", "4096"], ["wrote"]]
    # other slots' words (slots 0 and 2, through the read-only map) cannot be written
    for write_at in ("r--s:0", "r--s:8192"):
        proc = subprocess.run([sys.executable, "-c", FAKE_PRELUDE + textwrap.dedent(code)], capture_output=True,
                              text=True, env=lend_env(fake_driver, lend_table, slot=1, WRITE_AT=write_at))
        assert proc.returncode == -signal.SIGSEGV and "wrote" not in proc.stdout, write_at
    assert lend_table.activity(0) == ActivityWord(None, 0)
    assert lend_table.lending(1) == ([], False) and lend_table.lending(0) == ([1], False)


def test_a_cluster_kernel_without_a_cosched_group_leaves_a_green_stream_for_an_ordinary_one(fake_driver, lend_table):
    """An allowance holding no whole co-scheduled group has no view for clusters > 2: such a kernel
    runs unconfined, and on a created (green) stream that means a helper stream of the ordinary
    context, ordered by events, never the green stream (on an H100 it fails there and poisons it)."""
    lend_table.set_cosched_map([255] * 66)                  # no group anywhere
    lines = run_lending_client("""
    s = create(1)
    full_log()
    launch_fn(0xc1, s)
    launch_fn(0x77, s)
    show(hex(s))
    show_log()
    """, lend_env(fake_driver, lend_table, LITHOS_SAMPLE_EVERY="0"))
    green = lines[0][0]
    launches = [w for w in lines[1:] if w[0] == "cuLaunchKernel"]
    assert launches[0][1] != green and launches[1] == ["cuLaunchKernel", green]
    records, _ = lend_table.read_launches(0)
    assert [native.VIEW_NAMES[int(r["view"])] for r in records] == ["unconfined", "tpc"]


def test_the_real_driver_function_behind_a_hook_is_available_for_benchmarks(fake_driver, fake_table):
    """lithos_client_real_hook gives the driver's own cuLaunchKernel: a launch through it reaches the
    driver and passes none of the shim's work (no launch counted, nothing recorded)."""
    lines, _ = run_fake("""
    lib.lithos_client_real_hook.restype = ctypes.c_void_p
    real = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, *[ctypes.c_uint] * 7, ctypes.c_void_p, ctypes.c_void_p,
                            ctypes.c_void_p)(lib.lithos_client_real_hook(b"cuLaunchKernel"))
    log()
    assert real(0x77, 1, 1, 1, 32, 1, 1, 0, None, None, None) == 0
    show(*log())
    show(counts(), lib.lithos_client_real_hook(b"cuNoSuchHook"))
    """, fake_env(fake_driver, fake_table))
    assert lines[0] == ["cuLaunchKernel", "0"]
    assert lines[1] == ["{'direct':", "0,", "'paired':", "0,", "'unconfined':", "0}", "None"]
    records, _ = fake_table.read_launches(0)
    assert len(records) == 0


def test_bypass_for_benchmarks_pays_owed_joins_and_then_passes_launches_through(fake_driver, fake_table):
    lines, _ = run_fake("""
    launch(None)               # a deferred run on the default stream: its join is owed
    log()
    lib.lithos_client_set_bypass(1)
    show(*[w.split()[0] for w in log()])
    launch(None); launch(None)
    show(*log())
    show(counts())
    lib.lithos_client_set_bypass(0)
    launch(None)
    show(counts())
    """, fake_env(fake_driver, fake_table))
    assert lines[0] == ["cuEventRecord", "cuStreamWaitEvent"]                 # the join, paid on switching
    assert lines[1] == ["cuLaunchKernel", "0", "cuLaunchKernel", "0"]         # as the program made them
    assert lines[2] == ["{'direct':", "0,", "'paired':", "1,", "'unconfined':", "0}"]
    assert lines[3] == ["{'direct':", "0,", "'paired':", "2,", "'unconfined':", "0}"]


def test_a_capturing_stream_never_borrows_so_no_graph_keeps_lent_tpcs(fake_driver, lend_table):
    lines = run_lending_client("""
    for _ in range(6):
        launch_fn(0x77, None)      # the default stream, which captures (FAKE_CAPTURING)
    show_outcomes()
    """, lend_env(fake_driver, lend_table, FAKE_CAPTURING="1"))
    counts = outcomes(lines[0])
    assert counts["borrowed"] == 0 and counts["paced"] == 0 and counts["capturing"] >= 1, counts
    records, _ = lend_table.read_launches(0)
    assert not any(native.lenders_of(r) for r in records)


def test_a_kernel_launched_behind_a_graph_replay_counts_the_replay_in_its_queue(fake_driver, lend_table):
    """The replay runs first, so a kernel queued behind it ends later than its own prediction says."""
    lend_table.set_lending_knobs(atom_us=250, idle_window_us=500, unknown_kernel_busy_us=1)
    proc = start_lending_client("""
    assert lib.cuGraphLaunch(ctypes.c_void_p(0x9a), ctypes.c_void_p(s)) == 0   # never timed: unknown (now 70 ms)
    launch_fn(0x77, s)
    show("after", lending()["borrowed"], lending()["too_deep"])
    """, lend_env(fake_driver, lend_table, FAKE_STREAM_BUSY="1"))
    lend_table.set_lending_knobs(atom_us=250, idle_window_us=500, unknown_kernel_busy_us=70_000)
    assert finish_client(proc).split() == ["after", "1", "1"]


@pytest.mark.parametrize("pace, paced", [("1", 0), ("always", 1)])
def test_pace_always_keeps_the_queue_shallow_while_every_lender_is_busy(fake_driver, lend_table, pace, paced):
    """LITHOS_LEND_PACE=always: a low-priority borrower paces even while its lenders are busy, so its
    queue is already shallow when one goes idle; the default paces only while one is idle."""
    lend_table.set_lending_knobs(atom_us=1000, idle_window_us=60e6, unknown_kernel_busy_us=5000)
    lend_table.set_lending(0, [1], low_priority=True)
    run_fake("launch(None)", lend_env(fake_driver, lend_table, slot=1))     # the lender: active for a minute
    lines = run_lending_client("""
    s = create(1)
    for _ in range(6):
        launch_fn(0x77, s)       # launches 1-4 unknown: 20 ms in the queue estimate; the stream never drains
    show_outcomes()
    """, lend_env(fake_driver, lend_table, FAKE_STREAM_BUSY="1", LITHOS_LEND_PACE=pace))
    counts = outcomes(lines[0])
    assert counts["borrowed"] == 0 and counts["paced"] == paced and counts["no_idle_lender"] >= 1, counts


def test_launch_summary_counts_a_clients_latest_launches_by_view(fake_driver, lend_table):
    ring = native.LaunchRing(native.ring_path(lend_table.path, 0))
    assert ring.summary() is None                                   # no client yet
    run_lending_client("""
    s = create(1)
    warm_then_borrow(s)            # 6 launches on the TPC view, the last one borrowing
    assert lib.cuGraphLaunch(ctypes.c_void_p(0x9a), ctypes.c_void_p(s)) == 0
    """, lend_env(fake_driver, lend_table))
    assert ring.summary() == {"launches": 7, "window": 7, "tpc": 6, "cosched": 0, "unconfined": 0, "graph": 1,
                              "borrowing": 1, "mean_tpcs": (5 * 8 + 16 + 8) / 7}   # own 8, one borrowed launch on 16
    assert ring.summary(window=2)["window"] == 2


def test_a_released_slot_starts_its_next_client_on_a_fresh_launch_ring(built_library):
    """The real-GPU Device removes a slot's ring when its grant ends, so launch summaries are per client
    (it builds here too: no GPU means no probe and no NVML, both only warned about)."""
    from lithos_ray.devices import NvidiaDevice
    device = NvidiaDevice(0, "GPU-00000000-test-ring-per-client", "H100", 132)
    try:
        device.set_allowance(1, [0, 1, 2, 3])
        state = device.tpc_state()                          # nobody has launched: nothing busy, nothing offered
        assert (state.busy_tpcs, state.lent_tpcs, state.lent_to) == (0, 0, {})
        ring = native.ring_path(device.shm_path, 1)
        open(ring, "wb").close()                       # a ring the client is still creating: not read yet
        assert device.launch_summary(1) is None
        device.clear_allowance(1)
        assert not os.path.exists(ring) and device.launch_summary(1) is None
    finally:
        device.close()


# ---- held launches (LITHOS_DISPATCH): a best-effort borrower's kernels wait in the process and are
# ---- sent by the dispatcher thread when the queue ahead of them is shallow

DISPATCH_PRELUDE = """
import os, time
def dispatch():
    c = (ctypes.c_uint64 * 8)()
    lib.lithos_client_dispatch_counts(c, 8)
    return dict(zip(["held", "sent", "gated", "gate_us", "drain_paced", "drain_at_once", "full", "failed"], c))
a, b = ctypes.c_uint64(), ctypes.c_uint32()
args = (ctypes.c_void_p * 2)(ctypes.addressof(a), ctypes.addressof(b))
def launch_args(stream, i, grid=64):   # kernel 0x88 (uint64_t a, uint32_t b); the values change right after
    a.value, b.value = i, 2 * i
    assert lib.cuLaunchKernel(ctypes.c_void_p(0x88), grid, 1, 1, 32, 1, 1, 0, ctypes.c_void_p(stream), args, None) == 0
    a.value, b.value = 999, 999
def wait_for(condition, timeout=30):
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, dispatch()
        time.sleep(0.001)
def launch_lines():
    return [l for l in full_log() if l.startswith(("cuLaunchKernel", "cuStreamSynchronize", "cuMemsetD8", "cuGraphLaunch",
                                                   "cuMemcpyDtoDAsync", "cuKernelSetAttribute"))]
def all_dispatch_counts():
    c = (ctypes.c_uint64 * 14)()
    lib.lithos_client_dispatch_counts(c, 14)
    return list(c)
"""


def run_dispatch_client(code: str, env: dict) -> list[list[str]]:
    lines, _ = run_fake(DEFER_PRELUDE + LEND_PRELUDE + DISPATCH_PRELUDE + textwrap.dedent(code), env)
    return lines


def dispatch_env(fake_driver, table, **extra):
    return lend_env(fake_driver, table, **{"LITHOS_DISPATCH": "1", **extra})


def busy_borrower(table, tmp_path):
    """Slot 0 borrows from slot 1 (low priority); unknown kernels look 180 ms long. Returns the file whose
    existence keeps the fake's streams busy (FAKE_STREAM_BUSY_FILE), created."""
    busy = tmp_path / "busy"
    busy.write_text("")
    table.set_lending(0, [1], low_priority=True)
    table.set_lending_knobs(atom_us=250, idle_window_us=500, unknown_kernel_busy_us=180_000)
    return busy


def test_held_launches_are_sent_in_order_with_their_arguments_copied_and_borrow(fake_driver, lend_table):
    lend_table.set_lending(0, [1], low_priority=True)
    lines = run_dispatch_client("""
    s = create(1)
    sync = proc("cuStreamSynchronize")
    full_log()
    for i in range(10): launch_args(s, i)
    assert call(sync, ctypes.c_void_p)(s) == 0     # waits until every held launch was sent, then syncs
    assert lib.lithos_client_wait_union_builds(20000) == 0
    for i in range(10, 20): launch_args(s, i)
    assert call(sync, ctypes.c_void_p)(s) == 0
    for line in launch_lines(): show(line)
    show("counts", *dispatch().values())
    show("borrowed", lending()["borrowed"])
    """, dispatch_env(fake_driver, lend_table))
    launches = [w for w in lines if w[0] == "cuLaunchKernel"]
    assert [w[2] for w in launches] == [f"args={i},{2 * i}" for i in range(20)]
    assert [w[0] for w in lines[:22]] == (["cuLaunchKernel"] * 10 + ["cuStreamSynchronize"]) * 2
    counts = dict(zip(["held", "sent", "gated", "gate_us", "drain_paced", "drain_at_once", "full", "failed"],
                      map(int, lines[22][1:])))
    assert (counts["held"], counts["sent"], counts["failed"], counts["drain_at_once"]) == (20, 20, 0, 0)
    assert counts["drain_paced"] <= 2   # a sync drains at the dispatcher's pace (if it has not sent all yet)
    assert int(lines[23][1]) > 0   # the dispatcher's launches borrowed the idle lender's TPCs (counted for the process)
    records, _ = lend_table.read_launches(0)
    assert len(records) == 20 and any(native.lenders_of(r) == [1] for r in records)


def test_a_held_launch_the_tpc_view_refuses_is_sent_again_in_the_cosched_view_with_its_arguments(fake_driver, lend_table):
    """The dispatcher thread sends a held launch whose cluster shape the TPC view refuses (the fake's grid
    x = 913): it is launched again, arguments intact, in the co-scheduled view, and so are the later
    launches of that kernel, in order; none runs on the whole GPU."""
    lend_table.set_cosched_map([t // 4 for t in range(60)] + [255] * 6)
    lend_table.set_allowance(0, list(range(10)))
    lend_table.set_lending(0, [1], low_priority=True)
    lines = run_dispatch_client("""
    s = create(1)
    full_log()
    for i in range(10): launch_args(s, i, grid=913)
    assert call(proc("cuStreamSynchronize"), ctypes.c_void_p)(s) == 0
    for line in launch_lines(): show(line)
    show("counts", dispatch()["held"], dispatch()["sent"])
    """, dispatch_env(fake_driver, lend_table))
    launches = [w[2] for w in lines if w[0] == "cuLaunchKernel"]
    assert launches == ["args=0,0"] + [f"args={i},{2 * i}" for i in range(10)]   # the first one twice
    assert lines[-1] == ["counts", "10", "10"]
    records, _ = lend_table.read_launches(0)
    assert [native.VIEW_NAMES[int(r["view"])] for r in records] == ["cosched"] * 10


def test_a_lender_inside_the_own_tpcs_holds_launches_without_borrowing(fake_driver, lend_table):
    """What the co-location benchmark's static_held relies on: the lend list names a slot whose TPCs are
    the borrower's own, so launches are held and sent in order but never borrow."""
    lend_table.set_allowance(1, list(range(8)))
    lend_table.set_lending(0, [1], low_priority=True)
    lines = run_dispatch_client("""
    s = create(1)
    for i in range(20): launch_args(s, i)
    assert call(proc("cuStreamSynchronize"), ctypes.c_void_p)(s) == 0
    show("counts", dispatch()["held"], dispatch()["sent"], lending()["borrowed"])
    """, dispatch_env(fake_driver, lend_table))
    assert lines == [["counts", "20", "20", "0"]]
    records, _ = lend_table.read_launches(0)
    assert len(records) == 20 and not any(native.lenders_of(r) for r in records)
    assert all(int(r["tpcs"]) == 8 for r in records)


def test_a_held_launch_waits_at_the_depth_gate_until_its_stream_drains(fake_driver, lend_table, tmp_path):
    busy = busy_borrower(lend_table, tmp_path)
    lines = run_dispatch_client(f"""
    s = create(1)
    for i in range(3): launch_args(s, i)      # unknown kernels: the first makes the queue look 180 ms deep
    wait_for(lambda: dispatch()["gated"] >= 1)
    show("while busy", dispatch()["sent"])
    os.remove({str(busy)!r})                  # the stream drains
    wait_for(lambda: dispatch()["sent"] == 3)
    show("after", dispatch()["sent"], dispatch()["gate_us"] > 0)
    """, dispatch_env(fake_driver, lend_table, FAKE_STREAM_BUSY_FILE=str(busy)))
    assert lines == [["while", "busy", "1"], ["after", "3", "True"]]


def test_a_call_that_does_not_wait_for_the_gpu_sends_held_launches_at_once(fake_driver, lend_table):
    lend_table.set_lending(0, [1], low_priority=True)
    lend_table.set_lending_knobs(atom_us=250, idle_window_us=500, unknown_kernel_busy_us=180_000)
    lines = run_dispatch_client("""
    s = create(1)
    memset = proc("cuMemsetD8")
    full_log()
    for i in range(3): launch_args(s, i)
    wait_for(lambda: dispatch()["gated"] >= 1)
    memset_d8(memset)                          # not a wait: the dispatcher sends the rest at once
    lib.cuGraphLaunch(ctypes.c_void_p(0x99), ctypes.c_void_p(s))
    for line in launch_lines(): show(line)
    show("counts", dispatch()["sent"], dispatch()["drain_at_once"])
    """, dispatch_env(fake_driver, lend_table, FAKE_STREAM_BUSY="1"))
    assert [w[0] for w in lines[:5]] == ["cuLaunchKernel"] * 3 + ["cuMemsetD8", "cuGraphLaunch"]
    assert [w[2] for w in lines[:3]] == ["args=0,0", "args=1,2", "args=2,4"]
    assert lines[5] == ["counts", "3", "1"]


@pytest.mark.parametrize("dispatch, low_priority, held", [(None, True, True), ("", True, True), ("0", True, False),
                                                          ("1", False, False),
                                                          ("1", True, True), ("all", False, True)])
def test_launches_are_held_only_when_asked_for_and_only_for_borrowers(fake_driver, lend_table, dispatch, low_priority, held):
    lend_table.set_lending(0, [1], low_priority=low_priority)
    env = lend_env(fake_driver, lend_table, **({"LITHOS_DISPATCH": dispatch} if dispatch is not None else {}))
    lines = run_dispatch_client("""
    s = create(1)
    for i in range(3): launch_args(s, i)
    launch(s)                                  # kernel 0x77 has no parameters: never held
    assert call(proc("cuStreamSynchronize"), ctypes.c_void_p)(s) == 0
    c = (ctypes.c_uint64 * 9)()
    lib.lithos_client_dispatch_counts(c, 9)
    show(c[0], c[1], c[8])
    """, env)
    assert lines == ([["3", "3", "1"]] if held else [["0", "0", "0"]])


def test_a_lender_without_a_lend_list_never_holds(fake_driver, lend_table):
    lines = run_dispatch_client("""
    s = create(1)
    launch_args(s, 1)
    show(dispatch()["held"])
    """, dispatch_env(fake_driver, lend_table, LITHOS_DISPATCH="all") | {"LITHOS_SLOT": "1"})
    assert lines == [["0"]]


def test_a_memset_behind_held_launches_is_held_in_stream_order(fake_driver, lend_table, tmp_path):
    busy = busy_borrower(lend_table, tmp_path)
    lines = run_dispatch_client(f"""
    s = create(1)
    full_log()
    launch_args(s, 0); launch_args(s, 1)       # the second waits at the depth gate (the stream is busy)
    assert lib.cuMemsetD8Async(ctypes.c_uint64(0xd0), 7, 16, ctypes.c_void_p(s)) == 0
    launch_args(s, 2)
    c = all_dispatch_counts()
    show("held", c[0], "memsets", c[10], "at_once", c[5])
    os.remove({str(busy)!r})
    assert call(proc("cuStreamSynchronize"), ctypes.c_void_p)(s) == 0
    for line in launch_lines(): show(line)
    """, dispatch_env(fake_driver, lend_table, FAKE_STREAM_BUSY_FILE=str(busy)))
    assert lines[0] == ["held", "3", "memsets", "1", "at_once", "0"]
    ops = [(w[0], w[2] if w[0] == "cuLaunchKernel" else "") for w in lines[1:]]
    assert ops == [("cuLaunchKernel", "args=0,0"), ("cuLaunchKernel", "args=1,2"), ("cuMemsetD8Async", ""),
                   ("cuLaunchKernel", "args=2,4"), ("cuStreamSynchronize", "")]
    assert lines[3][1] == lines[2][1]   # the held memset went where the kernel before it did (the created green stream)


def test_a_memset_with_nothing_held_goes_straight_to_the_driver(fake_driver, lend_table):
    lines = run_dispatch_client("""
    s = create(1)
    full_log()
    assert lib.cuMemsetD8Async(ctypes.c_uint64(0xd0), 7, 16, ctypes.c_void_p(s)) == 0
    show(all_dispatch_counts()[10])
    for line in launch_lines(): show(line)
    """, dispatch_env(fake_driver, lend_table))
    assert lines[0] == ["0"] and lines[1][0] == "cuMemsetD8Async"


def test_a_copy_and_an_unchanged_kernel_attribute_keep_held_launches_held(fake_driver, lend_table, tmp_path):
    """A device-to-device copy behind held launches is held in stream order; setting a kernel attribute
    to the value in force changes nothing, so it sends nothing; changing one first sends every held launch
    (they were launched under the old value)."""
    busy = busy_borrower(lend_table, tmp_path)
    lines = run_dispatch_client(f"""
    s = create(1)
    full_log()
    launch_args(s, 0); launch_args(s, 1)       # the second waits at the depth gate (the stream is busy)
    assert lib.cuMemcpyDtoDAsync_v2(ctypes.c_uint64(0xd0), ctypes.c_uint64(0xe0), 64, ctypes.c_void_p(s)) == 0
    max_dynamic_shared = 8                     # CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
    assert lib.cuKernelSetAttribute(max_dynamic_shared, 0, ctypes.c_void_p(0x5), 0) == 0   # already 0
    assert lib.cuFuncSetAttribute(ctypes.c_void_p(0x88), max_dynamic_shared, 0) == 0       # the same
    launch_args(s, 2)
    c = all_dispatch_counts()
    show("held", c[0], "copies", c[11], "same", c[12], "by_hook", c[9], "at_once", c[5])
    assert lib.cuKernelSetAttribute(max_dynamic_shared, 4096, ctypes.c_void_p(0x5), 0) == 0  # a change
    c = all_dispatch_counts()
    show("sent", c[1], "by_hook", c[9])
    os.remove({str(busy)!r})
    assert call(proc("cuStreamSynchronize"), ctypes.c_void_p)(s) == 0
    for line in launch_lines(): show(line)
    """, dispatch_env(fake_driver, lend_table, FAKE_STREAM_BUSY_FILE=str(busy)))
    assert lines[0] == ["held", "3", "copies", "1", "same", "2", "by_hook", "0", "at_once", "0"]
    assert lines[1] == ["sent", "4", "by_hook", "1"]
    ops = [(w[0], w[2] if w[0] == "cuLaunchKernel" else "") for w in lines[2:]]
    assert ops == [("cuLaunchKernel", "args=0,0"), ("cuLaunchKernel", "args=1,2"), ("cuMemcpyDtoDAsync", ""),
                   ("cuLaunchKernel", "args=2,4"), ("cuKernelSetAttribute", ""), ("cuStreamSynchronize", "")]


def test_a_held_launch_that_could_borrow_waits_until_its_queue_lets_it(fake_driver, lend_table, tmp_path):
    """With a lender idle, the gate holds a kernel predicted within the atom until the queue ahead plus
    the kernel fit the atom (the lending rule), however deep LITHOS_DISPATCH_DEPTH_US allows: every
    launch borrows and none finds its queue too deep."""
    busy = tmp_path / "busy"
    lend_table.set_lending(0, [1], low_priority=True)
    lend_table.set_lending_knobs(atom_us=250, idle_window_us=500, unknown_kernel_busy_us=100)
    lines = run_dispatch_client(f"""
    s = create(1)
    for i in range(6): launch_args(s, i)       # predictions (200 us on the own TPCs) and the union
    assert call(proc("cuStreamSynchronize"), ctypes.c_void_p)(s) == 0
    assert lib.lithos_client_wait_union_builds(20000) == 0
    before = lending()
    open({str(busy)!r}, "w").close()           # from now on the stream never looks drained
    for i in range(6): launch_args(s, i)
    assert call(proc("cuStreamSynchronize"), ctypes.c_void_p)(s) == 0
    after = lending()
    show("borrowed", after["borrowed"] - before["borrowed"], "too_deep", after["too_deep"] - before["too_deep"])
    show("gated_to_borrow", all_dispatch_counts()[13] > 0)
    """, dispatch_env(fake_driver, lend_table, FAKE_KERNEL_US="120", LITHOS_DISPATCH_DEPTH_US="100000",
                      FAKE_STREAM_BUSY_FILE=str(busy)))
    assert lines == [["borrowed", "6", "too_deep", "0"], ["gated_to_borrow", "True"]]


@pytest.mark.parametrize("setting, message", [
    *[({"LITHOS_DISPATCH_DEPTH_US": d}, f"LITHOS_DISPATCH_DEPTH_US={d} is not a number of microseconds")
      for d in ("-5", "abc", "1e9")],
    *[({"LITHOS_DISPATCH": v}, f"LITHOS_DISPATCH={v} is not 0, 1 or all: 1 is used") for v in ("off", "yes", "2")],
])
def test_a_bad_dispatch_setting_is_named_and_its_default_used(fake_driver, lend_table, setting, message):
    lend_table.set_lending(0, [1], low_priority=True)
    lines, stderr = run_fake(DEFER_PRELUDE + LEND_PRELUDE + DISPATCH_PRELUDE + textwrap.dedent("""
    s = create(1)
    launch_args(s, 1)
    assert call(proc("cuStreamSynchronize"), ctypes.c_void_p)(s) == 0
    show(dispatch()["held"], dispatch()["sent"])
    """), dispatch_env(fake_driver, lend_table, **setting))
    assert lines == [["1", "1"]]
    assert message in stderr


def test_a_copy_from_host_memory_is_not_held(fake_driver, lend_table, tmp_path):
    """Unified addressing lets cuMemcpyDtoDAsync reach host memory, where the driver may finish the copy
    before returning: such a copy sends the held launches first and goes to the driver itself."""
    busy = busy_borrower(lend_table, tmp_path)
    lines = run_dispatch_client(f"""
    s = create(1)
    full_log()
    launch_args(s, 0); launch_args(s, 1)
    assert lib.cuMemcpyDtoDAsync_v2(ctypes.c_uint64(0x4057), ctypes.c_uint64(0xe0), 64, ctypes.c_void_p(s)) == 0
    c = all_dispatch_counts()
    show("copies", c[11], "sent", c[1])
    os.remove({str(busy)!r})
    """, dispatch_env(fake_driver, lend_table, FAKE_STREAM_BUSY_FILE=str(busy)))
    assert lines == [["copies", "0", "sent", "2"]]


# ---- unrolled graph replays (LITHOS_LEND_UNROLL_GRAPHS): the fake's graph 0x6000 (native/fake_libcuda.c)

GRAPH_PRELUDE = """
def graph_counts():
    c = (ctypes.c_uint64 * 6)()
    lib.lithos_client_graph_counts(c, 6)
    return dict(zip(("copied", "not_copied", "replays_unrolled", "nodes_sent", "replays_whole", "changed"), c))
def instantiate(graph):
    exec_ = ctypes.c_void_p()
    assert lib.cuGraphInstantiateWithFlags(ctypes.byref(exec_), ctypes.c_void_p(graph), ctypes.c_ulonglong(0)) == 0
    return exec_.value
def replay(exec_, stream):
    assert lib.cuGraphLaunch(ctypes.c_void_p(exec_), ctypes.c_void_p(stream)) == 0
"""


def run_graph_client(code: str, env: dict):
    return run_fake(LEND_PRELUDE + GRAPH_PRELUDE + textwrap.dedent(code), env)


def test_an_unrolled_replay_sends_every_node_through_the_launch_path_in_dependency_order(fake_driver, lend_table):
    """Graph 0x6000: kernel 0x88 (args 7, 9) -> 32-bit memset -> empty -> kernel 0xc2 (a CUkernel
    handle), and kernel 0x88 -> kernel 0x77 with a 2x1x1 cluster attribute; its nodes are listed out
    of order. Unrolled, each kernel is a launch of its own (recorded in the ring, not as a graph), with
    its copied arguments and cluster shape, and no node runs before the nodes it depends on."""
    lend_table.set_lending(0, [1], low_priority=False, unroll_graphs=True)
    lines, stderr = run_graph_client("""
    exec_ = instantiate(0x6000)
    s = create(1)
    full_log()
    replay(exec_, s)
    show_log()
    show("counts", *graph_counts().values())
    """, fake_env(fake_driver, lend_table))
    sent = [w for w in lines if w and w[0] in ("cuLaunchKernel", "cuLaunchKernelEx", "cuMemsetD32Async", "cuGraphLaunch")]
    kinds = [w[0] + (" " + w[2] if len(w) > 2 else "") for w in sent]
    assert "cuGraphLaunch" not in [w[0] for w in sent]
    first = kinds.index("cuLaunchKernel args=7,9")
    memset = kinds.index("cuMemsetD32Async 3")
    cluster = kinds.index("cuLaunchKernelEx cluster=2,1,1")
    assert sorted(kinds) == sorted(["cuLaunchKernel args=7,9", "cuMemsetD32Async 3", "cuLaunchKernelEx cluster=2,1,1",
                                    "cuLaunchKernel"])
    last = [i for i, k in enumerate(kinds) if k == "cuLaunchKernel"][0]   # kernel 0xc2, after the memset
    assert first < memset < last and first < cluster
    assert sent[memset][3] == "16"
    assert lines[-1] == ["counts", "1", "0", "1", "4", "0", "0"]
    records, _ = lend_table.read_launches(0)
    assert "cuGraphLaunch" not in [native.API_NAMES[int(r["api"])] for r in records]
    assert sorted(r["kernel_name"] for r in records) == [b"fake_cluster_kernel", b"fake_kernel", b"fake_kernel"]
    assert "unrolled graph replay failed" not in stderr


def test_replays_stay_whole_without_the_flag_for_graphs_not_copied_and_after_a_change(fake_driver, lend_table):
    """Unrolling off (the default lend flags): one cuGraphLaunch. On: graph 0x6100 holds a host node,
    so it is not copied (named once on stderr) and replays whole; graph 0x6000 unrolls until
    cuGraphExecKernelNodeSetParams changes it, then replays whole; a destroyed one is forgotten."""
    lend_table.set_lending(0, [1], low_priority=False)
    lines, _ = run_graph_client("""
    s = create(1)
    replay(instantiate(0x6000), s)
    show("launches", *[l.split()[0] for l in full_log() if l.startswith(("cuGraphLaunch", "cuLaunchKernel"))])
    show("counts", *graph_counts().values())
    """, fake_env(fake_driver, lend_table))
    assert lines == [["launches", "cuGraphLaunch"], ["counts", "1", "0", "0", "0", "0", "0"]]

    lend_table.set_lending(0, [1], low_priority=False, unroll_graphs=True)
    lines, stderr = run_graph_client("""
    s = create(1)
    host = instantiate(0x6100)
    kernels = instantiate(0x6000)
    def launches():
        return [l.split()[0] for l in full_log() if l.startswith(("cuGraphLaunch", "cuLaunchKernel"))]
    full_log()
    replay(host, s); show("host", *launches())
    replay(kernels, s); show("kernels", *launches())
    assert lib.cuGraphExecKernelNodeSetParams_v2(ctypes.c_void_p(kernels), ctypes.c_void_p(0x6010), None) == 0
    replay(kernels, s); show("changed", *launches())
    kernels = instantiate(0x6000)
    assert lib.cuGraphExecDestroy(ctypes.c_void_p(kernels)) == 0
    replay(kernels, s); show("destroyed", *launches())
    show("counts", *graph_counts().values())
    """, fake_env(fake_driver, lend_table))
    assert lines[0] == ["host", "cuGraphLaunch"]
    assert lines[1][0] == "kernels" and "cuGraphLaunch" not in lines[1] and len(lines[1]) == 4
    assert lines[2] == ["changed", "cuGraphLaunch"]
    assert lines[3] == ["destroyed", "cuGraphLaunch"]
    # copied: 0x6000 twice; not copied: 0x6100; whole while on: host, changed, destroyed
    assert lines[4] == ["counts", "2", "1", "1", "4", "3", "1"]
    assert stderr.count("a CUDA graph holds a node that is no kernel, memset or empty node") == 1


def test_a_replay_on_a_capturing_stream_is_never_unrolled(fake_driver, lend_table):
    lend_table.set_lending(0, [1], low_priority=False, unroll_graphs=True)
    lines, _ = run_graph_client("""
    exec_ = instantiate(0x6000)
    full_log()
    replay(exec_, None)
    show("launches", *[l.split()[0] for l in full_log() if l.startswith(("cuGraphLaunch", "cuLaunchKernel"))])
    """, fake_env(fake_driver, lend_table, FAKE_CAPTURING="1"))
    assert lines == [["launches", "cuGraphLaunch"]]


def test_no_graph_is_copied_with_copying_off(fake_driver, lend_table):
    lend_table.set_lending(0, [1], low_priority=False, unroll_graphs=True)
    lines, _ = run_graph_client("""
    replay(instantiate(0x6000), create(1))
    show("counts", *graph_counts().values())
    """, fake_env(fake_driver, lend_table, LITHOS_COPY_GRAPHS="0"))
    assert lines == [["counts", "0", "0", "0", "0", "0", "0"]]
