"""CPU-side tests of native/liblithos.so and lithos_ray/native.py (no GPU, no CUDA driver needed)."""
import ctypes
import os
import pathlib
import signal
import subprocess
import sys
import textwrap

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
    assert set(dtypes) == {"lithos_table_header", "lithos_slot", "lithos_ring_header", "lithos_launch_record"}
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
def counts():
    c = (ctypes.c_uint64 * 3)()
    lib.lithos_client_launch_counts(c, 3)
    return {"direct": c[0], "paired": c[1], "unconfined": c[2]}
def show(*values):
    print(*values, flush=True)
def wait_for_parent():
    show("ready")
    sys.stdin.readline()
"""


@pytest.fixture(scope="module")
def fake_driver(tmp_path_factory):
    directory = tmp_path_factory.mktemp("fake_cuda")
    proc = subprocess.run(["gcc", "-O1", "-std=gnu11", "-fPIC", "-shared", "-fvisibility=hidden", "-I",
                           native_cuda_include(), "-o", str(directory / "libcuda.so.1"),
                           str(ROOT / "native" / "fake_libcuda.c")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    return str(directory)


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


def fake_env(fake_driver, table=None, **extra):
    env = {k: v for k, v in os.environ.items() if k not in (native.ENV_TABLE, native.ENV_SLOT)}
    env.update(native.client_env(table.path, 0) if table else {"LD_PRELOAD": str(native.library_path())})
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


def paired_calls(app: str, green: str) -> list[list[str]]:
    return [["cuEventRecord", app, "same-context"], ["cuStreamWaitEvent", green], ["cuLaunchKernel", green],
            ["cuEventRecord", green, "same-context"], ["cuStreamWaitEvent", app]]


def test_blocking_streams_and_the_default_stream_keep_event_ordering(fake_driver, fake_table):
    lines, _ = run_fake("""
    b = create(0)
    show(hex(b))
    log()
    launch(b)
    for line in log(): show(line)
    show("--")
    launch(None)
    for line in log(): show(line)
    show(counts()["direct"], counts()["paired"])
    """, fake_env(fake_driver, fake_table))
    b = lines[0][0]
    split = lines.index(["--"])
    first, second = lines[1:split], lines[split + 1:-1]
    green_b = [w for w in first if w[0] == "cuGreenCtxStreamCreate"][0][1]
    assert [w for w in first if w[0] != "cuGreenCtxStreamCreate"] == paired_calls(b, green_b)
    green_default = [w for w in second if w[0] == "cuGreenCtxStreamCreate"][0][1]
    assert [w for w in second if w[0] != "cuGreenCtxStreamCreate"] == paired_calls("0", green_default)
    assert lines[-1] == ["0", "2"]


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
    # both events live in the context of the stream they are recorded on ("same-context")
    assert changed == paired_calls(s, green) * 2
    assert rest[:-1] == [["cuLaunchKernel", s]]
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
    assert [w for w in lines[1:] if w[0] != "cuGreenCtxStreamCreate"] == paired_calls(s, green)
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
    """The fake refuses grid x = 912 in green contexts (as the H100 refused a cuDNN kernel in the TPC view)."""
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
    assert [w for w in first[1:] if w[0] != "cuStreamCreateWithPriority"] == paired_calls(s, helper)
    # later launches of that kernel go straight to the unconfined place, without a refused attempt
    assert later == paired_calls(s, helper) + [["cuLaunchKernel", "0"]]
    assert stderr.count("runs unconfined from now on") == 1
