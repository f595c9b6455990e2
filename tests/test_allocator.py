import random

import pytest

from lithos_ray.scheduler.allocator import TpcAllocator, contiguous_slices, slices_from_cosched_groups


def test_whole_slices_first_and_no_overlap():
    alloc = TpcAllocator(66)
    a = alloc.allocate("a", 8)
    b = alloc.allocate("b", 4)
    assert a == tuple(range(8)) and b == (8, 9, 10, 11)
    assert alloc.free_tpcs == 54


def test_never_oversubscribes_and_refuses_what_does_not_fit():
    alloc = TpcAllocator(66)
    assert alloc.allocate("a", 40) is not None
    assert alloc.allocate("b", 27) is None
    assert alloc.allocate("c", 26) is not None
    assert alloc.free_tpcs == 0
    with pytest.raises(ValueError, match="1..66"):
        alloc.allocate("d", 67)


def test_random_churn_keeps_invariants():
    rng = random.Random(7)
    alloc = TpcAllocator(66, contiguous_slices(66))
    live = {}
    for step in range(2000):
        if live and rng.random() < 0.45:
            key = rng.choice(sorted(live))
            assert set(alloc.release(key)) == set(live.pop(key))
        else:
            want = rng.randint(1, 20)
            got = alloc.allocate(f"c{step}", want)
            if got is None:
                assert want > alloc.free_tpcs
            else:
                assert len(got) == want
                live[f"c{step}"] = got
        held = [t for ids in live.values() for t in ids]
        assert len(held) == len(set(held)) == 66 - alloc.free_tpcs


def test_restore_refuses_overlap():
    alloc = TpcAllocator(66)
    alloc.restore("a", [0, 1, 2])
    with pytest.raises(ValueError, match="taken"):
        alloc.restore("b", [2, 3])


def test_h100_like_cosched_layout_hands_out_whole_groups_first():
    # Interleaved like the probed H100: group g holds TPCs {g, g+12, g+20, g+28}-style ids; 8-11, 64, 65 in none.
    groups = {0: [0, 12, 20, 28], 1: [1, 13, 21, 29], 2: [2, 14, 22, 30]}
    slices = slices_from_cosched_groups(groups, 66)
    assert slices[:3] == [(0, 12, 20, 28), (1, 13, 21, 29), (2, 14, 22, 30)]
    assert sorted(t for s in slices for t in s) == list(range(66))
    alloc = TpcAllocator(66, slices)
    assert alloc.allocate("a", 8) == (0, 1, 12, 13, 20, 21, 28, 29)
    assert set(alloc.allocate("b", 6)) >= {2, 14, 22, 30}
