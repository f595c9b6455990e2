"""The agent's lending loop against a real allowance table (shared memory, no GPU needed)."""
import pytest
from conftest import publish_activity as publish

from lithos_ray import native
from lithos_ray.agent import GrantRecord
from lithos_ray.lending_loop import LendingController
from lithos_ray.scheduler.lending import LendingPolicy

pytestmark = pytest.mark.skipif(native.library_path() is None, reason=native.build_status())


def grant(slot, priority, tpcs):
    return GrantRecord(f"g{slot}", tuple(tpcs), slot, priority, 0.0, pid=1, pid_start_ticks=0)


@pytest.fixture
def table(tmp_path):
    t = native.AllowanceTable.create("GPU-lending-loop-test", str(tmp_path))
    yield t
    t.close(unlink=True)


def test_lend_lists_follow_activity_and_priority(table):
    grants = [grant(0, "latency_critical", range(0, 16)), grant(1, "best_effort", range(16, 40)),
              grant(2, "best_effort", range(40, 66))]
    controller = LendingController(table, lambda: grants, LendingPolicy(atom_us=300))
    assert table.lending_knobs()["atom_ns"] == 300_000
    now = 10_000_000_000
    controller.step(now)
    assert [table.lending(s)[0] for s in range(3)] == [[], [], []]   # nobody published activity yet

    for slot in range(3):
        publish(table, slot, now - 50_000_000)      # all idle for 50 ms: everyone may borrow from everyone
    controller.step(now)
    assert [table.lending(s) for s in range(3)] == [([1, 2], False), ([0, 2], True), ([0, 1], True)]

    publish(table, 0, now - 100_000)                # LC active: what it may borrow is out of BE's reach;
    controller.step(now)                            # its own TPCs stay lendable (used only when idle at launch)
    assert [table.lending(s) for s in range(3)] == [([1, 2], False), ([0], True), ([0], True)]


def test_released_clients_lose_their_lend_lists(table):
    grants = [grant(0, "best_effort", range(0, 8)), grant(1, "best_effort", range(8, 16))]
    controller = LendingController(table, lambda: grants, LendingPolicy())
    for slot in (0, 1):
        publish(table, slot, 1)
    controller.step(10_000_000_000)
    assert table.lending(0) == ([1], True)
    grants.pop(0)
    controller.step(10_000_000_000)
    assert table.lending(0) == ([], False) and table.lending(1) == ([], True)


def test_lending_off_is_static_partitions(table):
    grants = [grant(0, "best_effort", range(0, 8)), grant(1, "best_effort", range(8, 16))]
    for slot in (0, 1):
        publish(table, slot, 1)
    LendingController(table, lambda: grants, LendingPolicy(lending_enabled=False)).step(10_000_000_000)
    assert table.lending(0) == ([], False) and table.lending(1) == ([], False)


def test_unrolling_graphs_is_published_for_borrowers_with_lenders_only(table):
    """LendingPolicy(unroll_graphs=True): a client whose lend list is not empty gets the shim's
    LITHOS_LEND_UNROLL_GRAPHS flag; one with nothing to borrow from (nobody else published) does not."""
    grants = [grant(0, "latency_critical", range(0, 8)), grant(1, "best_effort", range(8, 16))]
    controller = LendingController(table, lambda: grants, LendingPolicy(unroll_graphs=True))
    publish(table, 0, 1)
    assert controller.step(10_000_000_000) == {0: ((), False, False), 1: ((0,), True, True)}
    assert [table.unrolls_graphs(s) for s in (0, 1)] == [False, True]
    publish(table, 1, 1)
    controller.step(10_000_000_000)
    assert [table.unrolls_graphs(s) for s in (0, 1)] == [True, True]
    assert table.lending(0) == ([1], False)
    with pytest.raises(ValueError, match="unroll_graphs must be True or False"):
        LendingPolicy(unroll_graphs="yes")
