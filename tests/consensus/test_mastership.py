"""The failover rule as peers apply it: verdicts, takeover timing, ranks that only grow."""

from __future__ import annotations

import pytest
from eth_utils import to_checksum_address
from hypothesis import given, settings
from hypothesis import strategies as st

from consensus.election import ranks_allowed_to_take_over, takeover_time
from consensus.mastership import Mastership, Verdict, rank_after

FAST = settings(deadline=None, max_examples=100)

committees = st.lists(
    st.binary(min_size=20, max_size=20).map(lambda raw: "0x" + raw.hex()),
    min_size=1, max_size=8, unique=True,
)


@FAST
@given(committees, st.integers(1, 120), st.integers(0, 10**6), st.integers(0, 10**4))
def test_takeover_timing_is_the_escrows_rule(
    ranked: list[str], timeout: int, last: int, waited: int
) -> None:
    view = Mastership(tuple(ranked), float(timeout), current_rank=0, last_heard=float(last))
    now = last + waited
    allowed = ranks_allowed_to_take_over(len(ranked), 0, last, now, timeout)
    for rank, address in enumerate(ranked):
        assert view.may_take_over(address.lower(), float(now)) == (rank in allowed)
        due = view.takeover_due(address)
        if rank == 0:
            assert due is None
        else:
            assert due == takeover_time(0, rank, last, timeout)


@FAST
@given(committees, st.lists(st.tuples(st.integers(0, 7), st.integers(0, 100)), max_size=30))
def test_ranks_only_grow_and_replaced_masters_stay_rejected(
    ranked: list[str], steps: list[tuple[int, int]]
) -> None:
    view = Mastership(tuple(ranked), 10.0)
    now = 0.0
    replaced: set[str] = set()
    for index, dt in steps:
        now += dt
        address = ranked[index % len(ranked)]
        before = view.current_rank
        reason = view.take_over(address, now)
        rank = index % len(ranked)
        if rank > before:
            assert reason == "" and view.current_rank == rank
            replaced.update(to_checksum_address(a) for a in ranked[before:rank])
        else:
            assert reason and view.current_rank == before
        for old in replaced:
            assert view.judge(old) is Verdict.REPLACED
            assert view.heard(old, now + 1) is Verdict.REPLACED
        assert view.judge(view.current) is Verdict.CURRENT
        for later in ranked[view.current_rank + 1:]:
            assert view.judge(later) is Verdict.WAITING


def test_only_the_current_master_keeps_the_job_alive() -> None:
    ranked = ("0x" + "11" * 20, "0x" + "22" * 20, "0x" + "33" * 20)
    view = Mastership(ranked, 10.0, last_heard=100.0)
    assert view.heard(ranked[1], 150.0) is Verdict.WAITING
    assert view.last_heard == 100.0  # a standby's message is no sign of the master's life
    assert view.heard("0x" + "44" * 20, 150.0) is Verdict.OUTSIDE
    assert not view.may_take_over(ranked[1], 109.9)
    assert view.may_take_over(ranked[1], 110.0)
    assert not view.may_take_over(ranked[2], 119.9) and view.may_take_over(ranked[2], 120.0)
    assert view.heard(ranked[0], 115.0) is Verdict.CURRENT and view.last_heard == 115.0
    assert not view.may_take_over(ranked[1], 120.0)
    assert view.take_over(ranked[2], 130.0) == ""
    assert view.current == to_checksum_address(ranked[2])
    assert view.judge(ranked[1]) is Verdict.REPLACED
    assert "not after the current master" in view.take_over(ranked[1], 140.0)
    assert "not one of the job's masters" in view.take_over("0x" + "55" * 20, 140.0)
    assert rank_after(ranked, ranked[0]) == [to_checksum_address(a) for a in ranked[1:]]
    assert rank_after(ranked, ranked[2]) == []


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ranked": ()}, "at least one master"),
        ({"ranked": ("0x" + "11" * 20, "0x" + "11" * 20)}, "more than once"),
        ({"timeout_s": 0.0}, "timeout must be positive"),
        ({"current_rank": 2}, "outside 2 masters"),
    ],
)
def test_bad_views_are_refused(kwargs: dict[str, object], message: str) -> None:
    args: dict[str, object] = {"ranked": ("0x" + "11" * 20, "0x" + "22" * 20), "timeout_s": 5.0}
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        Mastership(**args)  # type: ignore[arg-type]
