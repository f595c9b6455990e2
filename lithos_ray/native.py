"""Python side of native/liblithos.so: the per-GPU allowance table and the clients' launch rings.

The shared-memory layout is defined once, in native/lithos_shm.h. This module never copies it:
struct sizes and field offsets come from the compiled library (``lithos_layout_entry``), and
allowances are written through the library's seqlock writer. Only numpy, ctypes and mmap are
used here, so GPU-side code can import it without ray or pydantic.

Lending (scheduler/lending.py's launch-path rule, applied by the shim at every launch): the agent
writes each slot's lend list with ``AllowanceTable.set_lending`` and the table-wide knobs with
``set_lending_knobs``; every client's shim publishes its activity word (``activity``), and launch
records carry the TPCs used, the lenders borrowed from and the predictor's duration
(``prediction_pairs`` for the accuracy report).

Standalone use (no Ray, no agent)::

    python -m lithos_ray.native run --tpcs 0-11 -- python my_script.py
    python -m lithos_ray.native set --table /dev/shm/lithos-GPU-... --slot 0 --tpcs 12-23
"""
from __future__ import annotations

import argparse
import ctypes
import mmap
import os
import pathlib
import subprocess
import sys
import tempfile

import numpy as np

ENV_TABLE = "LITHOS_SHM"
ENV_SLOT = "LITHOS_SLOT"
LIBRARY_NAME = "liblithos.so"
H100_TPCS = 66

_PACKAGE_DIR = pathlib.Path(__file__).resolve().parent
_SOURCE_TREE_LIBRARY = _PACKAGE_DIR.parent / "native" / "build" / LIBRARY_NAME
_INSTALLED_LIBRARY = _PACKAGE_DIR / "_lib" / LIBRARY_NAME

VIEW_NAMES = {0: "tpc", 1: "cosched", 2: "unconfined", 3: "graph"}
UNCONFINED_VIEW = 2
LEND_SLOTS = 64              # LITHOS_LEND_SLOTS: the lend list is one 64-bit mask
LEND_LOW_PRIORITY = 1        # LITHOS_LEND_LOW_PRIORITY in lithos_slot.lending_flags
LEND_UNROLL_GRAPHS = 2       # LITHOS_LEND_UNROLL_GRAPHS: graph replays go kernel by kernel (each may borrow)
API_NAMES = {0: "cuLaunchKernel", 1: "cuLaunchKernelEx", 2: "cuLaunchCooperativeKernel", 3: "cuGraphLaunch"}


def library_path() -> pathlib.Path | None:
    """The built liblithos.so: the newer of the installed copy and a source tree's native/build
    (in an editable install `make -C native` updates only the latter)."""
    built = [candidate for candidate in (_INSTALLED_LIBRARY, _SOURCE_TREE_LIBRARY) if candidate.is_file()]
    return max(built, key=lambda candidate: candidate.stat().st_mtime) if built else None


def build_status() -> str:
    """Human-readable: "built: <path>" or "not built: <reason>"."""
    path = library_path()
    if path is not None:
        return f"built: {path}"
    error_file = _PACKAGE_DIR / "_lib" / "BUILD_ERROR.txt"
    if error_file.is_file():
        return f"not built: the build failed, see {error_file}"
    return f"not built: neither {_INSTALLED_LIBRARY} nor {_SOURCE_TREE_LIBRARY} exists (run `make -C native`)"


_library: ctypes.CDLL | None = None


def _lib() -> ctypes.CDLL:
    """Load liblithos.so privately (RTLD_LOCAL: its dlsym/cu* exports do not interpose here)."""
    global _library
    if _library is None:
        path = library_path()
        if path is None:
            raise RuntimeError(f"liblithos.so is needed for the shared-memory layout; {build_status()}")
        lib = ctypes.CDLL(str(path), mode=os.RTLD_LOCAL)
        lib.lithos_layout_entry.argtypes = [ctypes.c_int] + [ctypes.POINTER(ctypes.c_char_p)] * 2 + [
            ctypes.POINTER(ctypes.c_uint32)] * 3 + [ctypes.POINTER(ctypes.c_char_p)]
        lib.lithos_layout_version.restype = ctypes.c_uint32
        lib.lithos_table_bytes.restype = ctypes.c_size_t
        lib.lithos_table_bytes.argtypes = [ctypes.c_uint32]
        lib.lithos_table_init.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_uint32, ctypes.c_uint32]
        lib.lithos_table_set_allowance.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.POINTER(ctypes.c_uint64)]
        lib.lithos_table_clear.argtypes = [ctypes.c_void_p, ctypes.c_uint32]
        lib.lithos_table_set_cosched_map.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint8), ctypes.c_uint32]
        lib.lithos_table_read_allowance.restype = ctypes.c_uint64
        lib.lithos_table_read_allowance.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.POINTER(ctypes.c_uint64),
                                                    ctypes.POINTER(ctypes.c_uint32)]
        lib.lithos_ring_bytes.restype = ctypes.c_size_t
        lib.lithos_ring_bytes.argtypes = [ctypes.c_uint32]
        lib.lithos_ring_copy.restype = ctypes.c_uint32
        lib.lithos_ring_copy.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint64), ctypes.c_void_p, ctypes.c_uint32]
        lib.lithos_hook_name.restype = ctypes.c_char_p
        lib.lithos_hook_name.argtypes = [ctypes.c_int]
        lib.lithos_table_set_lending.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_uint64, ctypes.c_uint32]
        lib.lithos_table_set_lending_knobs.argtypes = [ctypes.c_void_p] + [ctypes.c_uint64] * 3
        lib.lithos_activity_bytes.restype = ctypes.c_size_t
        lib.lithos_activity_bytes.argtypes = [ctypes.c_uint32]
        lib.lithos_lender_is_idle.argtypes = [ctypes.c_uint64] * 4
        lib.lithos_activity_after_launch.argtypes = [ctypes.c_void_p] + [ctypes.c_uint64] * 3
        lib.lithos_predictor_create.restype = ctypes.c_void_p
        lib.lithos_predictor_create.argtypes = [ctypes.c_uint32]
        lib.lithos_predictor_destroy.argtypes = [ctypes.c_void_p]
        lib.lithos_predictor_observe.argtypes = [ctypes.c_void_p] + [ctypes.c_uint64] * 4 + [ctypes.c_uint32]
        lib.lithos_predictor_predict_ns.restype = ctypes.c_uint64
        lib.lithos_predictor_predict_ns.argtypes = [ctypes.c_void_p] + [ctypes.c_uint64] * 3 + [ctypes.c_uint32]
        lib.lithos_predictor_samples.restype = ctypes.c_uint32
        lib.lithos_predictor_samples.argtypes = [ctypes.c_void_p] + [ctypes.c_uint64] * 3 + [
            ctypes.POINTER(ctypes.c_uint64), ctypes.POINTER(ctypes.c_uint32), ctypes.c_uint32]
        lib.lithos_predictor_size.restype = ctypes.c_uint32
        lib.lithos_predictor_size.argtypes = [ctypes.c_void_p]
        _library = lib
    return _library


def hook_names() -> list[str]:
    """Every driver entry point the shim hooks, from the library's one hook list."""
    lib, names = _lib(), []
    while (name := lib.lithos_hook_name(len(names))) is not None:
        names.append(name.decode())
    return names


def layout() -> dict[str, np.dtype]:
    """numpy dtypes of the shared structs, built from the compiled library's layout table."""
    lib = _lib()
    fields: dict[str, dict] = {}
    sizes: dict[str, int] = {}
    index = 0
    struct_name, field_name, numpy_type = ctypes.c_char_p(), ctypes.c_char_p(), ctypes.c_char_p()
    offset, size_bytes, count = ctypes.c_uint32(), ctypes.c_uint32(), ctypes.c_uint32()
    while lib.lithos_layout_entry(index, ctypes.byref(struct_name), ctypes.byref(field_name), ctypes.byref(offset),
                                  ctypes.byref(size_bytes), ctypes.byref(count), ctypes.byref(numpy_type)) == 0:
        index += 1
        struct, field = struct_name.value.decode(), field_name.value.decode()
        if not field:
            sizes[struct] = size_bytes.value
            continue
        spec = fields.setdefault(struct, {"names": [], "formats": [], "offsets": []})
        kind = numpy_type.value.decode()
        if kind == "S1":  # char[n] -> one bytes field
            fmt = f"S{count.value}"
        else:
            fmt = (kind, (count.value,)) if count.value > 1 else kind
        spec["names"].append(field)
        spec["formats"].append(fmt)
        spec["offsets"].append(offset.value)
    return {struct: np.dtype({**spec, "itemsize": sizes[struct]}) for struct, spec in fields.items()}


def parse_tpcs(text: str, tpcs_on_gpu: int = H100_TPCS) -> list[int]:
    """'0-11,20,30-31' -> [0..11, 20, 30, 31]; raises ValueError naming what is allowed."""
    tpc_ids: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            low, _, high = part.partition("-")
            first, last = int(low), int(high) if high else int(low)
        except ValueError:
            raise ValueError(f"bad TPC range {part!r}: use ids like 0-11,20 (TPC ids are 0..{tpcs_on_gpu - 1})") from None
        if first > last:
            raise ValueError(f"bad TPC range {part!r}: the first id must not exceed the last")
        tpc_ids.extend(range(first, last + 1))
    _check_tpc_ids(tpc_ids, tpcs_on_gpu)
    return sorted(set(tpc_ids))


def _check_tpc_ids(tpc_ids: list[int], tpcs_on_gpu: int) -> None:
    if not tpc_ids:
        raise ValueError(f"an allowance needs at least one TPC (ids 0..{tpcs_on_gpu - 1}); use clear() for none")
    bad = [t for t in tpc_ids if not isinstance(t, (int, np.integer)) or not 0 <= t < tpcs_on_gpu]
    if bad:
        raise ValueError(f"TPC ids {bad[:5]} are out of range: this GPU has TPC ids 0..{tpcs_on_gpu - 1}")


def _mask_words(tpc_ids: list[int]) -> (ctypes.c_uint64 * 2):
    words = [0, 0]
    for t in tpc_ids:
        words[int(t) // 64] |= 1 << (int(t) % 64)
    return (ctypes.c_uint64 * 2)(*words)


def _mask_to_ids(words) -> list[int]:
    return [64 * w + b for w in range(len(words)) for b in range(64) if (int(words[w]) >> b) & 1]


def ring_path(table_path: str, slot: int) -> str:
    """Where the client of `slot` writes its launch ring (the shim creates it)."""
    return f"{table_path}.ring{slot}"


def activity_path(table_path: str) -> str:
    """The activity pages of a table's clients (the agent creates it with the table)."""
    return f"{table_path}.activity"


class AllowanceTable:
    """The per-GPU allowance table, owned and written by the agent; clients map it read-only."""

    def __init__(self, path: str, fd: int, mapped: mmap.mmap, owner: bool):
        self.path = path
        self._fd = fd
        self._map = mapped
        self._owner = owner
        self._address = ctypes.addressof(ctypes.c_char.from_buffer(mapped)) if owner else None
        header = np.frombuffer(mapped, dtype=layout()["lithos_table_header"], count=1)[0]
        if header["magic"] != b"LITHOST" or int(header["layout_version"]) != _lib().lithos_layout_version():
            raise ValueError(f"{path} is not a lithos allowance table of layout version {_lib().lithos_layout_version()}")
        self.max_slots = int(header["max_slots"])
        self.tpcs_on_gpu = int(header["tpcs_on_gpu"])
        self.gpu_uuid = header["gpu_uuid"].decode()
        self._header_bytes = int(header["header_bytes"])
        self._slot_bytes = int(header["slot_bytes"])
        self._activity_stride = int(header["activity_stride"])
        activity_fd = os.open(activity_path(path), os.O_RDWR if owner else os.O_RDONLY)
        try:
            access = mmap.PROT_READ | (mmap.PROT_WRITE if owner else 0)
            self._activity_map = mmap.mmap(activity_fd, _lib().lithos_activity_bytes(self.max_slots), mmap.MAP_SHARED, access)
        finally:
            os.close(activity_fd)

    @classmethod
    def create(cls, gpu_uuid: str, directory: str = "/dev/shm", max_slots: int = 64,
               tpcs_on_gpu: int = H100_TPCS) -> "AllowanceTable":
        """Create /<directory>/lithos-<gpu_uuid> (mode 0644: only the agent's user can write it)."""
        if not gpu_uuid or "/" in gpu_uuid or len(gpu_uuid) >= 64:
            raise ValueError(f"bad GPU uuid {gpu_uuid!r}: expected a name like GPU-8f3c... without '/' (under 64 chars)")
        if not 1 <= max_slots <= 4096:
            raise ValueError(f"max_slots={max_slots}: allowed 1..4096")
        if not 1 <= tpcs_on_gpu <= 128:
            raise ValueError(f"tpcs_on_gpu={tpcs_on_gpu}: allowed 1..128 (an H100 SXM has 66)")
        lib = _lib()
        path = os.path.join(directory, f"lithos-{gpu_uuid}")
        size = lib.lithos_table_bytes(max_slots)
        # The activity pages first: a client that finds the table finds them too. All zero = never launched.
        activity_fd = os.open(activity_path(path), os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        os.fchmod(activity_fd, 0o644)
        os.ftruncate(activity_fd, lib.lithos_activity_bytes(max_slots))
        os.close(activity_fd)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        os.fchmod(fd, 0o644)
        os.ftruncate(fd, size)
        mapped = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        address = ctypes.addressof(ctypes.c_char.from_buffer(mapped))
        if lib.lithos_table_init(address, size, gpu_uuid.encode(), max_slots, tpcs_on_gpu) != 0:
            raise RuntimeError(f"lithos_table_init refused {path} ({size} bytes, {max_slots} slots)")
        return cls(path, fd, mapped, owner=True)

    @classmethod
    def open(cls, path: str, writable: bool = True) -> "AllowanceTable":
        """Open an existing table (writable: the agent's user, e.g. the `set` command)."""
        fd = os.open(path, os.O_RDWR if writable else os.O_RDONLY)
        size = os.fstat(fd).st_size
        access = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        return cls(path, fd, mmap.mmap(fd, size, mmap.MAP_SHARED, access), owner=writable)

    def _writable(self) -> int:
        if self._address is None:
            raise PermissionError(f"{self.path} is open read-only; only the agent writes allowances")
        return self._address

    def _check_slot(self, slot: int) -> None:
        if not isinstance(slot, (int, np.integer)) or not 0 <= slot < self.max_slots:
            raise ValueError(f"slot {slot!r} is out of range: this table has slots 0..{self.max_slots - 1}")

    def set_allowance(self, slot: int, tpc_ids: list[int]) -> None:
        """Give `slot` exactly these TPCs; its next launch runs on them."""
        self._check_slot(slot)
        _check_tpc_ids(list(tpc_ids), self.tpcs_on_gpu)
        _lib().lithos_table_set_allowance(self._writable(), slot, _mask_words(tpc_ids))

    def clear(self, slot: int) -> None:
        """Remove the allowance: the client's launches pass through to the whole GPU."""
        self._check_slot(slot)
        _lib().lithos_table_clear(self._writable(), slot)

    def remove_ring(self, slot: int) -> None:
        """Remove the slot's launch ring (its client has gone: the slot's next client makes a fresh one)."""
        self._check_slot(slot)
        try:
            os.unlink(ring_path(self.path, slot))
        except FileNotFoundError:
            pass

    def allowance(self, slot: int) -> tuple[int, list[int] | None]:
        """(generation, TPC ids or None when cleared), read with the seqlock."""
        self._check_slot(slot)
        words, flags = (ctypes.c_uint64 * 2)(), ctypes.c_uint32()
        base = self._address if self._address is not None else np.frombuffer(self._map, np.uint8).ctypes.data
        generation = _lib().lithos_table_read_allowance(base, slot, words, ctypes.byref(flags))
        return int(generation), (_mask_to_ids(words) if flags.value & 1 else None)

    def set_cosched_map(self, cosched_group_of_tpc: list[int]) -> None:
        """Store, per TPC id, the co-scheduled 8-SM group holding it (255 = none)."""
        values = (ctypes.c_uint8 * len(cosched_group_of_tpc))(*cosched_group_of_tpc)
        if _lib().lithos_table_set_cosched_map(self._writable(), values, len(cosched_group_of_tpc)) != 0:
            raise ValueError(f"a map of {len(cosched_group_of_tpc)} TPCs is too long (at most 128)")

    def cosched_map(self) -> list[int] | None:
        header = np.frombuffer(self._map, dtype=layout()["lithos_table_header"], count=1)[0]
        if not int(header["cosched_probed"]):
            return None
        return [int(x) for x in header["cosched_group_of_tpc"][: self.tpcs_on_gpu]]

    def cosched_groups(self) -> dict[int, list[int]]:
        """{co-scheduled group: its TPC ids}. Allowances made of whole groups keep cluster kernels
        (clusters > 2, e.g. cuBLAS nvjet GEMMs) confined; other TPCs serve only cluster-free kernels."""
        groups: dict[int, list[int]] = {}
        for tpc, group in enumerate(self.cosched_map() or []):
            if group != 255:
                groups.setdefault(group, []).append(tpc)
        return groups

    def read_launches(self, slot: int, since_index: int = 0, max_records: int = 4096) -> tuple[np.ndarray, int]:
        """Launch records of `slot` from `since_index` on: (structured array, next index)."""
        self._check_slot(slot)
        return LaunchRing(ring_path(self.path, slot)).read(since_index, max_records)

    # --- lending: written by the agent, applied by the clients' shims at every launch ---------------

    def set_lending(self, slot: int, lender_slots: list[int], low_priority: bool, unroll_graphs: bool = False) -> None:
        """Let `slot` add the TPCs of `lender_slots` to a launch whenever they are idle (the rule of
        scheduler/lending.py); with low_priority, its launches that borrow run at the least stream
        priority; with unroll_graphs, its CUDA-graph replays are sent kernel by kernel (native/README.md,
        "Unrolled graph replays"), so that each kernel may borrow. An empty list switches lending off for
        `slot`. Takes effect at its next launch."""
        self._check_slot(slot)
        lend_slots = min(self.max_slots, LEND_SLOTS)
        lenders = list(lender_slots)
        bad = [s for s in lenders if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or not 0 <= s < lend_slots]
        if bad:
            raise ValueError(f"lender slots {bad[:5]} are out of range: allowed 0..{lend_slots - 1} "
                             f"(the lend list is one 64-bit mask)")
        if slot in lenders or len(set(lenders)) != len(lenders):
            raise ValueError(f"lender slots {lenders} must be distinct and must not include the borrower's slot {slot}")
        for name, value in (("low_priority", low_priority), ("unroll_graphs", unroll_graphs)):
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be True or False, got {value!r}")
        mask = 0
        for lender in lenders:
            mask |= 1 << int(lender)
        flags = (LEND_LOW_PRIORITY if low_priority else 0) | (LEND_UNROLL_GRAPHS if unroll_graphs else 0)
        _lib().lithos_table_set_lending(self._writable(), slot, mask, flags)

    def _slot_record(self, slot: int):
        self._check_slot(slot)
        return np.frombuffer(self._map, dtype=layout()["lithos_slot"], count=1,
                             offset=self._header_bytes + slot * self._slot_bytes)[0]

    def lending(self, slot: int) -> tuple[list[int], bool]:
        """(lender slots, low_priority) of `slot`, as its shim reads them."""
        record = self._slot_record(slot)
        mask = int(record["lender_mask"])
        return [s for s in range(LEND_SLOTS) if (mask >> s) & 1], bool(int(record["lending_flags"]) & LEND_LOW_PRIORITY)

    def unrolls_graphs(self, slot: int) -> bool:
        """Whether `slot`'s shim sends its CUDA-graph replays kernel by kernel (set_lending's unroll_graphs)."""
        return bool(int(self._slot_record(slot)["lending_flags"]) & LEND_UNROLL_GRAPHS)

    def set_lending_knobs(self, atom_us: float, idle_window_us: float, unknown_kernel_busy_us: float) -> None:
        """The table-wide knobs of the launch-path rule (validated as LendingPolicy's; defaults 250 / 500 / 10000 us)."""
        from .scheduler.lending import LendingPolicy  # pure Python: validation and rounding to ns in one place

        policy = LendingPolicy(atom_us=atom_us, idle_window_us=idle_window_us, unknown_kernel_busy_us=unknown_kernel_busy_us)
        knobs_ns = (policy.atom_ns, policy.idle_window_ns, policy.unknown_kernel_busy_ns)
        if min(knobs_ns) < 1:
            raise ValueError(f"lending knobs must be at least 0.001 us (1 ns), got {atom_us}, {idle_window_us}, "
                             f"{unknown_kernel_busy_us} us")
        _lib().lithos_table_set_lending_knobs(self._writable(), *knobs_ns)

    def lending_knobs(self) -> dict[str, int]:
        """{"atom_ns", "idle_window_ns", "unknown_kernel_busy_ns"} as the shims read them."""
        header = np.frombuffer(self._map, dtype=layout()["lithos_table_header"], count=1)[0]
        return {"atom_ns": int(header["lend_atom_ns"]), "idle_window_ns": int(header["lend_idle_window_ns"]),
                "unknown_kernel_busy_ns": int(header["lend_unknown_kernel_busy_ns"])}

    def _activity_record(self, slot: int):
        self._check_slot(slot)
        return np.frombuffer(self._activity_map, dtype=layout()["lithos_activity"], count=1,
                             offset=slot * self._activity_stride)[0]

    def activity(self, slot: int):
        """The activity word `slot`'s shim publishes (scheduler.lending.ActivityWord; CLOCK_MONOTONIC ns,
        the clock of time.monotonic_ns())."""
        from .scheduler.lending import ActivityWord

        record = self._activity_record(slot)
        last_launch_ns = int(record["last_launch_ns"])
        return ActivityWord(last_launch_ns or None, int(record["busy_until_ns"]))

    def activity_writer_pid(self, slot: int) -> int:
        """Process id of the last shim that mapped `slot`'s activity word writable (0: none yet). A client
        that cannot publish its activity must not be anyone's lender."""
        return int(self._activity_record(slot)["writer_pid"])

    def prediction_pairs(self, slot: int, since_index: int = 0, max_records: int = 4096) -> tuple[np.ndarray, np.ndarray, int]:
        """(predicted_ns, measured_ns, next index) of `slot`'s launches that were both predicted and
        timed (see prediction_pairs()). Timing lands after the launch, so read a little behind the head."""
        records, next_index = self.read_launches(slot, since_index, max_records)
        predicted_ns, measured_ns = prediction_pairs(records)
        return predicted_ns, measured_ns, next_index

    def close(self, unlink: bool = True) -> None:
        """Unmap; with unlink, also remove the table and every client's ring file."""
        self._address = None
        for mapped in (self._map, self._activity_map):
            try:
                mapped.close()
            except BufferError:  # a numpy view is still alive; the mapping goes with the process
                pass
        os.close(self._fd)
        if unlink and self._owner:
            for slot in range(self.max_slots):
                self.remove_ring(slot)
            try:
                os.unlink(activity_path(self.path))
            except FileNotFoundError:
                pass
            os.unlink(self.path)


LAUNCH_SUMMARY_WINDOW = 4096   # the latest launches a summary looks at


def summarize_launches(records: np.ndarray, launches: int, tpcs_on_gpu: int = H100_TPCS) -> dict:
    """What a client's latest launch records show: `launches` (all recorded since its ring was made),
    `window` (records looked at), launches per view (tpc, cosched, unconfined, graph), `borrowing`
    (launches that used lent TPCs) and `mean_tpcs` (TPCs per launch, an unconfined one counting the
    whole GPU; 0 without records)."""
    views = np.bincount(records["view"].astype(np.int64), minlength=len(VIEW_NAMES))
    used = np.where(records["view"] == UNCONFINED_VIEW, tpcs_on_gpu, records["tpcs"])
    return {"launches": int(launches), "window": int(len(records)),
            **{VIEW_NAMES[v]: int(views[v]) for v in sorted(VIEW_NAMES)},
            "borrowing": int(np.count_nonzero(records["lender_slots_used"])),
            "mean_tpcs": float(used.mean()) if len(used) else 0.0}


class LaunchRing:
    """Read-only view of one client's launch ring."""

    def __init__(self, path: str):
        self.path = path

    def ready(self) -> bool:
        """Whether the client has made the ring (its shim creates it, then sizes it)."""
        try:
            return os.path.getsize(self.path) >= layout()["lithos_ring_header"].itemsize
        except OSError:
            return False

    def head(self) -> int:
        """Index the next launch record will get (0 when the client has not made the ring yet)."""
        if not self.ready():
            return 0
        header_dtype = layout()["lithos_ring_header"]
        with open(self.path, "rb") as handle:
            header = handle.read(header_dtype.itemsize)
        return int(np.frombuffer(header, dtype=header_dtype)[0]["head"]) if len(header) == header_dtype.itemsize else 0

    def summary(self, window: int = LAUNCH_SUMMARY_WINDOW, tpcs_on_gpu: int = H100_TPCS) -> dict | None:
        """summarize_launches of the latest `window` records; None when the client has made no ring yet."""
        if not self.ready():
            return None
        head = self.head()
        records, _ = self.read(max(0, head - window), window)
        return summarize_launches(records, head, tpcs_on_gpu)

    def read(self, since_index: int = 0, max_records: int = 4096) -> tuple[np.ndarray, int]:
        record_dtype = layout()["lithos_launch_record"]
        if not self.ready():
            return np.zeros(0, dtype=record_dtype), since_index
        with open(self.path, "rb") as handle:
            mapped = mmap.mmap(handle.fileno(), 0, mmap.MAP_SHARED, mmap.PROT_READ)
        try:
            source = np.frombuffer(mapped, np.uint8)
            out = np.zeros(max_records, dtype=record_dtype)
            next_index = ctypes.c_uint64(since_index)
            copied = _lib().lithos_ring_copy(source.ctypes.data, ctypes.byref(next_index), out.ctypes.data, max_records)
            del source
            return out[:copied].copy(), int(next_index.value)
        finally:
            mapped.close()


def prediction_pairs(records: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(predicted_ns, measured_ns) of the launch records that carry both a prediction (on the TPCs
    the launch used) and a sampled GPU duration; feed them to
    lithos_ray.scheduler.predictor.prediction_accuracy."""
    both = (records["predicted_ns"] > 0) & (records["gpu_ns"] > 0)
    return records["predicted_ns"][both].astype(np.int64), records["gpu_ns"][both].astype(np.int64)


def lenders_of(record) -> list[int]:
    """The slots whose TPCs one launch record borrowed (empty: it ran on its own TPCs)."""
    mask = int(record["lender_slots_used"])
    return [s for s in range(LEND_SLOTS) if (mask >> s) & 1]


class NativeLatencyPredictor:
    """The shim's C predictor (native/lithos_predictor.c) behind the interface of
    lithos_ray.scheduler.predictor.LatencyPredictor, to check that both give the same answers."""

    def __init__(self, capacity: int = 1024):
        if isinstance(capacity, bool) or not isinstance(capacity, (int, np.integer)) or not 1 <= capacity <= 1 << 24:
            raise ValueError(f"capacity must be an integer in 1..{1 << 24}, got {capacity!r}")
        self._lib = _lib()
        self._handle = self._lib.lithos_predictor_create(int(capacity))
        if not self._handle:
            raise MemoryError(f"cannot allocate a predictor of {capacity} keys")

    def __del__(self):
        if getattr(self, "_handle", None):
            self._lib.lithos_predictor_destroy(self._handle)
            self._handle = None

    def __len__(self) -> int:
        return int(self._lib.lithos_predictor_size(self._handle))

    def observe(self, key, duration_ns: int, tpcs: int) -> None:
        if self._lib.lithos_predictor_observe(self._handle, *map(int, key), int(duration_ns), int(tpcs)) != 0:
            raise ValueError(f"duration_ns and tpcs must be integers >= 1, got {duration_ns!r}, {tpcs!r}")

    def predict_ns(self, key, tpcs: int) -> int | None:
        predicted = int(self._lib.lithos_predictor_predict_ns(self._handle, *map(int, key), int(tpcs)))
        return predicted or None

    def samples(self, key) -> list[tuple[int, int]]:
        durations, tpcs = (ctypes.c_uint64 * 8)(), (ctypes.c_uint32 * 8)()
        count = self._lib.lithos_predictor_samples(self._handle, *map(int, key), durations, tpcs, 8)
        return [(int(durations[i]), int(tpcs[i])) for i in range(count)]


LAUNCH_PATH_NAMES = ("direct", "paired", "unconfined", "continued",
                     "memory_green", "memory_app")   # lithos_client_launch_counts, in order
LENDING_OUTCOME_NAMES = ("borrowed", "union_pending", "queue_too_deep", "paced", "unknown", "too_long",
                         "no_idle_lender", "capturing", "fits_own_sms", "no_gain",
                         "paced_us")   # lithos_client_lending_counts, in order (paced_us: microseconds slept pacing)


def _thread_counts(function: str, names: tuple[str, ...]) -> dict[str, int] | None:
    """One of the shim's per-thread counters, by name; None without the shim in this process."""
    try:
        counts_fn = getattr(ctypes.CDLL(None), function)
    except AttributeError:
        return None
    counts = (ctypes.c_uint64 * len(names))()
    filled = counts_fn(counts, len(names))
    return {name: int(counts[i]) for i, name in enumerate(names[:filled])}


def thread_launch_counts() -> dict[str, int] | None:
    """This thread's launches by path as the shim loaded in this process counts them; None without
    the shim (a process it was not preloaded into)."""
    return _thread_counts("lithos_client_launch_counts", LAUNCH_PATH_NAMES)


def thread_lending_counts() -> dict[str, int] | None:
    """This thread's lending outcomes (launches that may borrow) as the shim counts them; None without it."""
    return _thread_counts("lithos_client_lending_counts", LENDING_OUTCOME_NAMES)


DISPATCH_COUNT_NAMES = ("held", "sent", "gated", "gate_us", "drain_paced", "drain_at_once", "fifo_full",
                        "failed", "no_layout", "drain_by_hook", "held_memsets", "held_copies",
                        "same_attribute", "gated_to_borrow")   # lithos_client_dispatch_counts, in order (LITHOS_DISPATCH; process-wide)


def process_dispatch_counts() -> dict[str, int] | None:
    """This process's held launches (LITHOS_DISPATCH): held, sent by the dispatcher thread, held at its
    depth gate, microseconds the gate waited, drains that kept its pace / sent at once, waits for FIFO
    room, failures at dispatch, launches not held for want of a parameter layout, drains at once made by
    hooks (launches not held, changed kernel attributes; the others: process_stub_flushes), memsets and
    device-to-device copies held behind held launches, kernel attribute sets that changed nothing (so
    drained nothing), launches the gate held until their queue let them borrow; None without the shim."""
    return _thread_counts("lithos_client_dispatch_counts", DISPATCH_COUNT_NAMES)


GRAPH_COUNT_NAMES = ("copied", "not_copied", "replays_unrolled", "nodes_sent", "replays_whole",
                     "changed")   # lithos_client_graph_counts, in order (process-wide)


def process_graph_counts() -> dict[str, int] | None:
    """This process's CUDA graphs as the shim saw them: graphs copied at instantiation (their replays can
    be unrolled), graphs it could not copy, replays unrolled and the nodes they sent, replays sent whole
    while unrolling was on (a graph not copied), copies dropped because the executable graph was changed;
    None without the shim."""
    return _thread_counts("lithos_client_graph_counts", GRAPH_COUNT_NAMES)


def process_stub_flushes() -> dict[str, int] | None:
    """Driver entry points (by the name they were asked for) whose calls paid owed joins or waited for
    held launches, with how many did; None without the shim."""
    try:
        lib = ctypes.CDLL(None)
        stub_fn = lib.lithos_client_stub
    except AttributeError:
        return None
    stub_fn.restype = ctypes.c_char_p
    stub_fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint64)]
    out, index = {}, 0
    while (name := stub_fn(index, None, ctypes.byref(flushes := ctypes.c_uint64()))) is not None:
        if flushes.value:
            out[name.decode()] = out.get(name.decode(), 0) + int(flushes.value)
        index += 1
    return out


def thread_shim_counts() -> dict[str, dict[str, int] | None]:
    """This thread's {"launch_paths": ..., "lending": ..., "dispatch": ..., "graphs": ...} (each None without the shim).
    Launch paths and lending include the dispatcher thread's (launches it sent for this process)."""
    return {"launch_paths": thread_launch_counts(), "lending": thread_lending_counts(),
            "dispatch": process_dispatch_counts(), "stub_flushes": process_stub_flushes(),
            "graphs": process_graph_counts()}


def preload_with_shim(existing: str = "") -> str:
    """LD_PRELOAD value with the shim first and `existing` entries after it (no duplicate)."""
    path = library_path()
    if path is None:
        raise RuntimeError(f"cannot confine a client: {build_status()}")
    return ":".join([str(path)] + [p for p in existing.replace(" ", ":").split(":") if p and p != str(path)])


def client_env(table_path: str, slot: int) -> dict[str, str]:
    """Environment for a client process: LD_PRELOAD of the shim plus LITHOS_SHM and LITHOS_SLOT."""
    if not isinstance(slot, (int, np.integer)) or slot < 0:
        raise ValueError(f"slot {slot!r} must be a non-negative integer")
    return {"LD_PRELOAD": preload_with_shim(os.environ.get("LD_PRELOAD", "")), ENV_TABLE: str(table_path),
            ENV_SLOT: str(int(slot))}


def cuda_check(result):
    """A cuda-bindings call's result without its error code; raises on an error."""
    err, rest = (result[0], result[1:]) if isinstance(result, tuple) else (result, ())
    if int(err) != 0:
        raise RuntimeError(f"CUDA call failed: {err}")
    return rest[0] if len(rest) == 1 else rest


def compile_cubin(source: bytes, name: bytes = b"kernel.cu", arch: bytes | None = None) -> bytes:
    """CUDA C++ source compiled by NVRTC into a cubin for `arch` (by default the current context's
    device, e.g. b"sm_90" on an H100); a compile error raises with NVRTC's log."""
    from cuda.bindings import driver as cu, nvrtc  # lazy: GPU machines only

    if arch is None:
        device = cuda_check(cu.cuCtxGetDevice())
        attr = cu.CUdevice_attribute
        major = cuda_check(cu.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, device))
        minor = cuda_check(cu.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, device))
        arch = f"sm_{major}{minor}".encode()

    program = cuda_check(nvrtc.nvrtcCreateProgram(source, name, 0, [], []))
    result, = nvrtc.nvrtcCompileProgram(program, 1, [b"--gpu-architecture=" + arch])
    if int(result) != 0:
        log = b" " * cuda_check(nvrtc.nvrtcGetProgramLogSize(program))
        cuda_check(nvrtc.nvrtcGetProgramLog(program, log))
        raise RuntimeError(f"NVRTC cannot compile {name.decode()}: {log.decode(errors='replace').strip()}")
    cubin = b" " * cuda_check(nvrtc.nvrtcGetCUBINSize(program))
    cuda_check(nvrtc.nvrtcGetCUBIN(program, cubin))
    return cubin


def green_stream(device, resources: list):
    """(green context, a non-blocking stream of it) holding the SM `resources` (cuda-bindings objects)."""
    from cuda.bindings import driver as cu  # lazy: GPU machines only

    desc = cuda_check(cu.cuDevResourceGenerateDesc(list(resources), len(resources)))
    green = cuda_check(cu.cuGreenCtxCreate(desc, device, cu.CUgreenCtxCreate_flags.CU_GREEN_CTX_DEFAULT_STREAM))
    return green, cuda_check(cu.cuGreenCtxStreamCreate(green, cu.CUstream_flags.CU_STREAM_NON_BLOCKING, 0))


def cosched_sm_groups(device, min_sms: int = 8) -> list:
    """The device's co-scheduled groups of at least `min_sms` SMs (CUdevResource each); with 8, as the shim
    splits them."""
    from cuda.bindings import driver as cu  # lazy: GPU machines only
    all_sms = cuda_check(cu.cuDeviceGetDevResource(device, cu.CUdevResourceType.CU_DEV_RESOURCE_TYPE_SM))
    groups, count, _ = cuda_check(cu.cuDevSmResourceSplitByCount(32, all_sms, 0, min_sms))
    return list(groups[:count])


def probe_cosched_map(device_index: int = 0) -> list[int]:
    """Which co-scheduled 8-SM group holds each TPC group, found from %smid (needs a GPU, no MPS).

    Runs kernels reading %smid in one green context per TPC group and per co-scheduled group.
    Under MPS %smid is virtual, so run this in a process that is not an MPS client
    (the `probe-layout` command does).
    """
    from cuda.bindings import driver as cu  # lazy: GPU machines only

    check = cuda_check
    check(cu.cuInit(0))
    device = check(cu.cuDeviceGet(device_index))
    context = check(cu.cuDevicePrimaryCtxRetain(device))
    check(cu.cuCtxPushCurrent(context))
    source = b'extern "C" __global__ void smid(unsigned* out){ unsigned s; asm volatile("mov.u32 %0, %%smid;" : "=r"(s));' \
             b' long long t = clock64(); while (clock64() - t < 20000) {} if (threadIdx.x == 0) out[blockIdx.x] = s; }'
    function = check(cu.cuModuleGetFunction(check(cu.cuModuleLoadData(compile_cubin(source, b"smid.cu"))), b"smid"))
    blocks = 512
    buffer = check(cu.cuMemAlloc(blocks * 4))
    pointer = np.array([int(buffer)], dtype=np.uint64)
    params = np.array([pointer.ctypes.data], dtype=np.uint64)

    def sms_of(group) -> set[int]:
        green, stream = green_stream(device, [group])
        check(cu.cuLaunchKernel(function, blocks, 1, 1, 32, 1, 1, 0, stream, params.ctypes.data, 0))
        check(cu.cuStreamSynchronize(stream))
        host = np.zeros(blocks, dtype=np.uint32)
        check(cu.cuMemcpyDtoH(host.ctypes.data, buffer, blocks * 4))
        check(cu.cuStreamDestroy(stream))
        check(cu.cuGreenCtxDestroy(green))
        return set(int(x) for x in host)

    sm_type = cu.CUdevResourceType.CU_DEV_RESOURCE_TYPE_SM
    tpc_groups, tpc_count, _ = check(cu.cuDevSmResourceSplitByCount(
        H100_TPCS, check(cu.cuDeviceGetDevResource(device, sm_type)), 1, 2))
    cosched_sms = [sms_of(group) for group in cosched_sm_groups(device)]
    group_of_tpc = []
    for group in tpc_groups[:tpc_count]:
        sms = sms_of(group)
        owners = [c for c, members in enumerate(cosched_sms) if sms <= members]
        group_of_tpc.append(owners[0] if owners else 255)
    return group_of_tpc


def _default_gpu_uuid() -> str:
    """UUID of the first visible GPU through NVML (what the shim compares against)."""
    import pynvml  # lazy: GPU machines only

    pynvml.nvmlInit()
    try:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
        if visible.startswith("GPU-"):
            return visible
        handle = pynvml.nvmlDeviceGetHandleByIndex(int(visible) if visible.isdigit() else 0)
        uuid = pynvml.nvmlDeviceGetUUID(handle)
        return uuid.decode() if isinstance(uuid, bytes) else uuid
    finally:
        pynvml.nvmlShutdown()


def probe_layout_into(table: AllowanceTable) -> None:
    """Fill the table's co-scheduled map from a child process that is not an MPS client and sees
    exactly the table's GPU."""
    env = dict(os.environ, CUDA_MPS_PIPE_DIRECTORY=tempfile.mkdtemp(prefix="lithos-nomps-"),
               CUDA_VISIBLE_DEVICES=table.gpu_uuid)
    env.pop("LD_PRELOAD", None)
    out = subprocess.run([sys.executable, "-c", "from lithos_ray.native import probe_cosched_map; "
                          "print(','.join(map(str, probe_cosched_map())))"],
                         env=env, capture_output=True, text=True, check=True)
    table.set_cosched_map([int(x) for x in out.stdout.strip().split(",")])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lithos_ray.native", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="create a table, set an allowance, run CMD under the shim")
    run.add_argument("--tpcs", required=True, help="TPC ids, e.g. 0-11 or 0-3,8-11 (0..65 on an H100)")
    run.add_argument("--slot", type=int, default=0)
    run.add_argument("--gpu-uuid", default=None, help="default: the first visible GPU (NVML)")
    run.add_argument("--directory", default="/dev/shm")
    run.add_argument("--table", default=None, help="use this existing table instead of creating one")
    run.add_argument("--probe-layout", action="store_true", help="map co-scheduled groups first (needs a GPU, no MPS)")
    run.add_argument("cmd", nargs=argparse.REMAINDER)
    setter = commands.add_parser("set", help="change a slot's allowance in an existing table")
    setter.add_argument("--table", required=True)
    setter.add_argument("--slot", type=int, required=True)
    setter.add_argument("--tpcs", required=True)
    probe = commands.add_parser("probe-layout", help="fill a table's co-scheduled group map (needs a GPU)")
    probe.add_argument("--table", required=True)
    launches = commands.add_parser("launches", help="print a slot's launch records")
    launches.add_argument("--table", required=True)
    launches.add_argument("--slot", type=int, required=True)
    commands.add_parser("status", help="print whether liblithos.so is built")
    args = parser.parse_args(argv)

    if args.command == "status":
        print(build_status())
        return 0
    if args.command == "set":
        table = AllowanceTable.open(args.table)
        table.set_allowance(args.slot, parse_tpcs(args.tpcs, table.tpcs_on_gpu))
        print(f"slot {args.slot}: generation {table.allowance(args.slot)[0]}, TPCs {args.tpcs}")
        table.close(unlink=False)
        return 0
    if args.command == "probe-layout":
        table = AllowanceTable.open(args.table)
        probe_layout_into(table)
        print(f"co-scheduled group of each TPC: {table.cosched_map()}")
        table.close(unlink=False)
        return 0
    if args.command == "launches":
        records, next_index = LaunchRing(ring_path(args.table, args.slot)).read()
        for r in records:
            print(f"{r['kernel_name'].decode()[:40]:40s} grid={tuple(r['grid'])} block={tuple(r['block'])} "
                  f"cluster={tuple(r['cluster'])} view={VIEW_NAMES.get(int(r['view']))} tpcs={int(r['tpcs'])} "
                  f"own_tpcs={int(r['own_tpcs'])} lenders={lenders_of(r)} predicted_ns={int(r['predicted_ns'])} "
                  f"gpu_ns={int(r['gpu_ns'])}")
        print(f"{len(records)} records, next index {next_index}")
        return 0
    cmd = args.cmd[1:] if args.cmd and args.cmd[0] == "--" else args.cmd
    if not cmd:
        parser.error("run needs a command after --")
    created = args.table is None
    table = AllowanceTable.create(args.gpu_uuid or _default_gpu_uuid(), args.directory) if created \
        else AllowanceTable.open(args.table)
    try:
        if args.probe_layout:
            probe_layout_into(table)
        table.set_allowance(args.slot, parse_tpcs(args.tpcs, table.tpcs_on_gpu))
        print(f"lithos: {table.path} slot {args.slot} TPCs {args.tpcs}", file=sys.stderr, flush=True)
        return subprocess.call(cmd, env={**os.environ, **client_env(table.path, args.slot)})
    finally:
        table.close(unlink=created)


if __name__ == "__main__":
    sys.exit(main())
