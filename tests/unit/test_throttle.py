"""The contributor's throttle: 2 calculations/s per percent, enforced by a token bucket."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from ravenp2p.clock import SystemClock, TrioClock
from ravenp2p.roles.throttle import TokenBucket, calculation_rate


def test_the_whitepaper_rates() -> None:
    assert calculation_rate(5) == 10.0
    assert calculation_rate(10) == 20.0
    assert calculation_rate(0) == 0.0
    with pytest.raises(ValueError, match="share"):
        calculation_rate(101)


async def test_the_bucket_holds_the_rate_over_time(autojump_clock: trio.testing.MockClock) -> None:
    clock = TrioClock()
    bucket = TokenBucket(rate=10.0, burst=2.0, clock=clock)
    start = trio.current_time()
    for _ in range(52):
        await bucket.acquire()
    elapsed = trio.current_time() - start
    # Two tokens were saved up; the other fifty arrive at ten per second.
    assert elapsed == pytest.approx(5.0, abs=0.05)


async def test_a_burst_is_bounded(autojump_clock: trio.testing.MockClock) -> None:
    clock = TrioClock()
    bucket = TokenBucket(rate=1.0, burst=3.0, clock=clock)
    await trio.sleep(100)  # a long idle period saves up at most `burst` tokens
    assert [bucket.try_acquire() for _ in range(4)] == [True, True, True, False]


def test_invalid_buckets_are_refused() -> None:
    with pytest.raises(ValueError):
        TokenBucket(rate=0, burst=1, clock=SystemClock())
