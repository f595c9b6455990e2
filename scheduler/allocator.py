"""Which TPCs of one GPU each client gets. Pure code: numbers in, decisions out.

A GPU's TPCs are grouped into slices that should be handed out whole (on an H100 the co-scheduled
8-SM groups = 4 TPCs of one GPC, so a client's TPC-granular and cluster-capable views cover the same
SMs; see DESIGN.md). A request takes whole free slices first, then the rest from the most-used
partial slices, so whole slices stay free for the next client. A GPU is never oversubscribed:
`allocate` returns None when the request does not fit.
"""
from __future__ import annotations

from collections.abc import Sequence


def contiguous_slices(total_tpcs: int, slice_tpcs: int = 4) -> list[tuple[int, ...]]:
    """Default grouping: TPC ids 0..3, 4..7, ...; the last slice may be shorter."""
    return [tuple(range(s, min(s + slice_tpcs, total_tpcs))) for s in range(0, total_tpcs, slice_tpcs)]


def slices_from_cosched_groups(groups: dict[int, Sequence[int]], total_tpcs: int) -> list[tuple[int, ...]]:
    """Co-scheduled groups first (cluster kernels stay confined only to whole groups), then every TPC
    outside a group as its own slice: those serve cluster-free kernels and fill odd-sized requests."""
    grouped = [tuple(sorted(g)) for _, g in sorted(groups.items())]
    inside = {t for g in grouped for t in g}
    return grouped + [(t,) for t in range(total_tpcs) if t not in inside]


class TpcAllocator:
    def __init__(self, total_tpcs: int, slices: Sequence[Sequence[int]] | None = None):
        if total_tpcs <= 0:
            raise ValueError(f"total_tpcs must be positive, got {total_tpcs}")
        self.total_tpcs = total_tpcs
        self.slices = [tuple(s) for s in (slices or contiguous_slices(total_tpcs))]
        covered = sorted(t for s in self.slices for t in s)
        if covered != list(range(total_tpcs)):
            raise ValueError("slices must cover every TPC id 0..total_tpcs-1 exactly once")
        self._owner: dict[int, str] = {}          # tpc id -> client key

    @property
    def free_tpcs(self) -> int:
        return self.total_tpcs - len(self._owner)

    def holdings(self) -> dict[str, tuple[int, ...]]:
        out: dict[str, list[int]] = {}
        for tpc, key in sorted(self._owner.items()):
            out.setdefault(key, []).append(tpc)
        return {k: tuple(v) for k, v in out.items()}

    def allocate(self, key: str, tpcs: int) -> tuple[int, ...] | None:
        if tpcs <= 0 or tpcs > self.total_tpcs:
            raise ValueError(f"tpcs must be 1..{self.total_tpcs}, got {tpcs}")
        if key in self.holdings():
            raise ValueError(f"{key!r} already holds TPCs on this GPU")
        if tpcs > self.free_tpcs:
            return None
        free_by_slice = [[t for t in s if t not in self._owner] for s in self.slices]
        whole = [f for f, s in zip(free_by_slice, self.slices) if len(f) == len(s)]
        partial = sorted((f for f, s in zip(free_by_slice, self.slices) if 0 < len(f) < len(s)), key=len)
        chosen: list[int] = []
        for group in whole:
            if len(chosen) + len(group) <= tpcs:
                chosen += group
        for group in partial + [g for g in whole if g[0] not in chosen]:
            for tpc in group:
                if len(chosen) == tpcs:
                    break
                if tpc not in chosen:
                    chosen.append(tpc)
        for tpc in chosen:
            self._owner[tpc] = key
        return tuple(sorted(chosen))

    def restore(self, key: str, tpc_ids: Sequence[int]) -> None:
        """Re-enter a grant known from before (agent restart); refuses overlaps."""
        clash = [t for t in tpc_ids if t in self._owner or not 0 <= t < self.total_tpcs]
        if clash:
            raise ValueError(f"cannot restore {key!r}: TPCs {clash} are taken or out of range")
        for tpc in tpc_ids:
            self._owner[tpc] = key

    def release(self, key: str) -> tuple[int, ...]:
        freed = tuple(sorted(t for t, k in self._owner.items() if k == key))
        for tpc in freed:
            del self._owner[tpc]
        return freed
