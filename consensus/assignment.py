"""Which workers compute a calculation: by advertised capacity, spreading the load.

Pure and deterministic: the master passes what it knows (each candidate's
advertised share and how many of its assignments are still outstanding) and a
salt naming the calculation; the same inputs always give the same workers, so
a master that resumes another's job makes the same choices.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class Candidate:
    """A worker a master may assign to: its advertised share (1..100) and current load."""

    share: int
    outstanding: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.share <= 100:
            raise ValueError(f"share must be between 1 and 100, got {self.share}")
        if self.outstanding < 0:
            raise ValueError(f"outstanding must not be negative, got {self.outstanding}")


def _tiebreak(salt: bytes, worker: str) -> bytes:
    return hashlib.sha256(salt + b"\x00" + worker.encode()).digest()


def choose_workers(
    candidates: Mapping[str, Candidate],
    count: int,
    salt: bytes,
    exclude: Collection[str] = (),
) -> list[str]:
    """Up to `count` distinct workers, least loaded relative to their capacity first.

    Load is (outstanding + 1) / share: a node lending 10% takes twice the work
    of one lending 5% before it counts as equally busy. Ties are broken by a
    hash of (salt, worker), which spreads calculations evenly without favouring
    any peer id. Fewer than `count` are returned when fewer are eligible.
    """
    if count < 0:
        raise ValueError(f"count must not be negative, got {count}")
    eligible = [w for w in candidates if w not in exclude]
    eligible.sort(
        key=lambda w: (
            (candidates[w].outstanding + 1) / candidates[w].share,
            _tiebreak(salt, w),
        )
    )
    return eligible[:count]


def in_job_sample(job_id: str, worker: str, fraction: float) -> bool:
    """Whether `worker` is among the share `fraction` of workers that a job draws.

    Sortition by hash: master and worker decide alone and agree, with no
    message between them. A worker drawn at some fraction stays drawn at any
    larger one, so a master short of workers widens the draw without
    dropping anyone. In a network of thousands of workers this keeps a job's
    topic (its orders, heartbeats and records) to the seats it needs instead
    of every worker.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be between 0 and 1, got {fraction}")
    if fraction >= 1.0:
        return True
    digest = hashlib.sha256(f"ravenp2p job sample:{job_id}:{worker}".encode()).digest()
    return int.from_bytes(digest[:8], "big") < fraction * 2.0**64


def sample_fraction(seats: int, workers: int) -> float:
    """The share of `workers` known workers to draw so that about `seats` of them join."""
    if seats < 1:
        raise ValueError(f"seats must be at least 1, got {seats}")
    if workers < 0:
        raise ValueError(f"workers must not be negative, got {workers}")
    return 1.0 if workers <= seats else seats / workers
