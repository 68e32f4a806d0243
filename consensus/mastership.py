"""Who runs a job right now, as one peer sees it: the failover rule.

A paid job's masters are its epoch's committee in rank order
(`consensus.election.rank_masters`). Rank 0 runs the job; the master at rank
`r` may take it over from the current rank `c < r` once the current master has
been silent for `(r - c) * timeout` seconds: the next in line gets the first
chance and later ones step in only when it is silent too. It is the rule the
job escrow applies to `takeOver`, so the peers' view and the contract's agree.

Peers act only on messages of the current master. A master ranked before the
current one has been replaced: its messages are rejected, whatever they say.
Ranks only ever grow, so a replaced master can never come back.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass

from consensus.abi import checksum_address


class Verdict(enum.Enum):
    """How a peer treats a message from one of a job's would-be masters."""

    CURRENT = "current"
    """From the job's current master: act on it."""
    REPLACED = "replaced"
    """From a master ranked before the current one: it was replaced; reject."""
    WAITING = "waiting"
    """From a later-ranked member that has not taken over: not (yet) the master."""
    OUTSIDE = "outside"
    """From a peer that is none of the job's masters."""


@dataclass
class Mastership:
    """The job's ranked masters, the current rank and when the current master was last heard.

    Times are in seconds on the observer's clock; `timeout_s` is the escrow's
    master timeout (infinite for observers that never take a job over).
    """

    ranked: tuple[str, ...]
    timeout_s: float = math.inf
    current_rank: int = 0
    last_heard: float = 0.0

    def __post_init__(self) -> None:
        if not self.ranked:
            raise ValueError("a job needs at least one master")
        canonical = tuple(checksum_address(a) for a in self.ranked)
        if len(set(canonical)) != len(canonical):
            raise ValueError("ranked masters: an address appears more than once")
        self.ranked = canonical
        if not self.timeout_s > 0:
            raise ValueError(f"master timeout must be positive, got {self.timeout_s}")
        if not 0 <= self.current_rank < len(self.ranked):
            raise ValueError(
                f"current rank {self.current_rank} is outside {len(self.ranked)} masters"
            )

    @property
    def current(self) -> str:
        """The address of the job's current master."""
        return self.ranked[self.current_rank]

    def rank_of(self, address: str) -> int | None:
        """`address`'s rank among the job's masters, or None when it is not one."""
        try:
            return self.ranked.index(checksum_address(address))
        except ValueError:
            return None

    def judge(self, address: str) -> Verdict:
        """How to treat a message whose signer has `address`."""
        rank = self.rank_of(address)
        if rank is None:
            return Verdict.OUTSIDE
        if rank == self.current_rank:
            return Verdict.CURRENT
        return Verdict.REPLACED if rank < self.current_rank else Verdict.WAITING

    def heard(self, address: str, now: float) -> Verdict:
        """Judge a message and, when it is the current master's, count it as a sign of life."""
        verdict = self.judge(address)
        if verdict is Verdict.CURRENT:
            self.last_heard = max(self.last_heard, now)
        return verdict

    def takeover_due(self, address: str) -> float | None:
        """When `address` may take over, or None when it never may (not after the current rank)."""
        rank = self.rank_of(address)
        if rank is None or rank <= self.current_rank:
            return None
        return self.last_heard + (rank - self.current_rank) * self.timeout_s

    def may_take_over(self, address: str, now: float) -> bool:
        """Whether the master at `address` may take the job over at `now`."""
        due = self.takeover_due(address)
        return due is not None and now >= due

    def take_over(self, address: str, now: float) -> str:
        """Record that `address` took the job over; "" when accepted, else why not.

        Timing is not checked here: an observer's clock and links differ from
        the new master's, and the escrow, which is the arbiter, checked it.
        """
        rank = self.rank_of(address)
        if rank is None:
            return f"{checksum_address(address)} is not one of the job's masters"
        if rank <= self.current_rank:
            return (f"{self.ranked[rank]} is ranked {rank}, not after the current master "
                    f"(rank {self.current_rank})")
        self.current_rank = rank
        self.last_heard = max(self.last_heard, now)
        return ""


def rank_after(ranked: Sequence[str], address: str) -> list[str]:
    """The masters ranked after `address`, in order: who replicas go to and who may take over."""
    canonical = [checksum_address(a) for a in ranked]
    me = checksum_address(address)
    if me not in canonical:
        raise ValueError(f"{me} is not one of the job's masters")
    return canonical[canonical.index(me) + 1:]
