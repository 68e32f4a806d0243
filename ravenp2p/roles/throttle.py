"""The contributor's throttle: a share of the device becomes a calculation rate.

The whitepaper's rule: calculations per second scale with the share an
operator lends (5% -> 10/s, 10% -> 20/s), i.e. 2 calculations per second per
percent. A token bucket enforces it over time while allowing a short burst.
"""

from __future__ import annotations

from ravenp2p.clock import Clock

CALCULATIONS_PER_SECOND_PER_PERCENT = 2.0


def calculation_rate(share: int) -> float:
    """Calculations per second a node lending `share` percent may perform."""
    if not 0 <= share <= 100:
        raise ValueError(f"share must be between 0 and 100, got {share}")
    return share * CALCULATIONS_PER_SECOND_PER_PERCENT


class TokenBucket:
    """`rate` tokens per second, at most `burst` saved up; `acquire` waits for one."""

    def __init__(self, rate: float, burst: float, clock: Clock) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("a token bucket needs rate > 0 and burst >= 1")
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._tokens = burst
        self._updated = clock.now()

    def _refill(self) -> None:
        now = self._clock.now()
        self._tokens = min(self.burst, self._tokens + (now - self._updated) * self.rate)
        self._updated = now

    def try_acquire(self) -> bool:
        """Take a token if one is available now."""
        self._refill()
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        return False

    async def acquire(self) -> float:
        """Take a token, sleeping until one is available; returns the seconds waited."""
        waited = 0.0
        while not self.try_acquire():
            delay = (1 - self._tokens) / self.rate
            await self._clock.sleep(delay)
            waited += delay
        return waited
