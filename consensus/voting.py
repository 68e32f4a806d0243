"""Proof of calculation by redundancy voting.

Every calculation (a gradient over one data shard at given weights) is given to
``redundancy`` distinct workers. Each worker signs the digest of its result; the
caller checks signatures and hands :class:`SignedResult` values to a
:class:`CalculationVote`, which decides whether a result is accepted and whom to
credit. Whether two digests agree is injected as a pure function (the master
compares the tensors it holds for them, see ``consensus.agreement``); equal
digests always agree without asking it.

Acceptance rule: counted results are grouped in arrival order into clusters; a
result joins the first cluster all of whose members it agrees with, otherwise it
starts a new one. The vote is accepted as soon as one cluster holds at least
``redundancy`` results and is a strict majority of all counted results; its
first ``redundancy`` members are credited. The vote fails when ``max_results``
results are counted and none is accepted.

A :class:`WorkerLedger` tallies decided votes per worker for one job: credits,
tolerated mismatches and exclusions. Evidence is plain data; punishing is left
to whoever reads the ledger.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from enum import Enum, StrEnum

AgreeFn = Callable[[str, str], bool]


def _require_count(name: str, value: object, minimum: int) -> int:
    """Return ``value`` if it is an int of at least ``minimum``; raise otherwise."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value}")
    return value


@dataclass(frozen=True)
class SignedResult:
    """A result whose signature the caller has verified.

    ``worker`` is the signer's peer id and ``digest`` the digest of its
    canonical result bytes; both must be non-empty strings.
    """

    worker: str
    digest: str

    def __post_init__(self) -> None:
        for name in ("worker", "digest"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ValueError(f"SignedResult.{name} must be a non-empty string, got {value!r}")


class VoteState(Enum):
    """Where a calculation's vote stands."""

    PENDING = "pending"
    ACCEPTED = "accepted"
    FAILED = "failed"


class AddOutcome(Enum):
    """What :meth:`CalculationVote.add` did with a result."""

    COUNTED = "counted"
    """Counted towards the decision."""
    DUPLICATE = "duplicate"
    """The worker already signed this digest here; ignored."""
    EQUIVOCATION = "equivocation"
    """The worker already signed another digest here; not counted, evidence made."""
    LATE_AGREEING = "late_agreeing"
    """Arrived after acceptance and agrees: recorded, not credited."""
    LATE_CONTRADICTING = "late_contradicting"
    """Arrived after acceptance and disagrees: a mismatch, with evidence."""
    AFTER_FAILURE = "after_failure"
    """Arrived after the vote failed; changes nothing but the signer is remembered."""


class EvidenceKind(StrEnum):
    """Kinds of evidence a vote produces; the values are the wire names."""

    EQUIVOCATION = "equivocation"
    CONTRADICTION = "contradiction"


@dataclass(frozen=True)
class Evidence:
    """Signed misbehaviour seen in one calculation's vote.

    For an equivocation ``digests`` is (the first digest the worker signed, the
    other one it signed); for a contradiction it is (the worker's digest, the
    accepted digest).
    """

    kind: EvidenceKind
    worker: str
    digests: tuple[str, ...]


class CalculationVote:
    """The vote on one calculation: feed it signed results, read its decision.

    ``agree`` must be pure and symmetric; it is asked at most once per pair of
    distinct digests. A worker's first signed digest is the one that counts:
    a later different digest is equivocation (reported whatever the state) and
    never counted, though the first one stays counted (the ledger excludes the
    worker).
    """

    def __init__(self, redundancy: int, max_results: int, agree: AgreeFn) -> None:
        self._redundancy = _require_count("redundancy", redundancy, 1)
        self._max_results = _require_count("max_results", max_results, 1)
        if max_results < redundancy:
            raise ValueError(
                f"max_results must be at least redundancy ({redundancy}), got {max_results}"
            )
        if not callable(agree):
            raise TypeError(f"agree must be callable, got {type(agree).__name__}")
        self._agree = agree
        self._cache: dict[tuple[str, str], bool] = {}
        self._signed: dict[str, list[str]] = {}
        self._counted: list[SignedResult] = []
        self._clusters: list[list[SignedResult]] = []
        self._state = VoteState.PENDING
        self._accepted: list[SignedResult] = []
        self._mismatches: list[SignedResult] = []
        self._late: list[SignedResult] = []
        self._evidence: list[Evidence] = []

    @property
    def redundancy(self) -> int:
        """How many agreeing results are accepted and credited."""
        return self._redundancy

    @property
    def max_results(self) -> int:
        """How many results may be counted before the vote fails."""
        return self._max_results

    @property
    def state(self) -> VoteState:
        """PENDING until accepted or failed; never changes after that."""
        return self._state

    @property
    def decided(self) -> bool:
        """Whether the vote is ACCEPTED or FAILED."""
        return self._state is not VoteState.PENDING

    @property
    def counted(self) -> tuple[SignedResult, ...]:
        """Results that took part in the decision, in arrival order."""
        return tuple(self._counted)

    @property
    def accepted(self) -> tuple[SignedResult, ...]:
        """Credited results in arrival order: exactly ``redundancy`` once ACCEPTED."""
        return tuple(self._accepted)

    @property
    def accepted_digest(self) -> str | None:
        """The first credited result's digest, or None while not ACCEPTED."""
        return self._accepted[0].digest if self._accepted else None

    @property
    def mismatches(self) -> tuple[SignedResult, ...]:
        """Results that disagree with the accepted digest.

        The counted ones come first (arrival order), then late contradicting
        ones as they arrive. Each has matching contradiction evidence; by
        itself a mismatch is tolerated, not punished.
        """
        return tuple(self._mismatches)

    @property
    def late(self) -> tuple[SignedResult, ...]:
        """Results that agree with the accepted digest but were not credited.

        These are counted results beyond the credited ones, then results that
        arrived after acceptance.
        """
        return tuple(self._late)

    @property
    def evidence(self) -> tuple[Evidence, ...]:
        """Equivocation and contradiction evidence, in the order it was made."""
        return tuple(self._evidence)

    def _agrees(self, x: str, y: str) -> bool:
        if x == y:
            return True
        key = (x, y) if x < y else (y, x)
        verdict = self._cache.get(key)
        if verdict is None:
            verdict = bool(self._agree(key[0], key[1]))
            self._cache[key] = verdict
        return verdict

    def add(self, result: SignedResult) -> AddOutcome:
        """Take one signed result into the vote and say what became of it."""
        if not isinstance(result, SignedResult):
            raise TypeError(f"result must be a SignedResult, got {type(result).__name__}")
        signed = self._signed.get(result.worker)
        if signed is not None:
            if result.digest in signed:
                return AddOutcome.DUPLICATE
            signed.append(result.digest)
            self._evidence.append(
                Evidence(EvidenceKind.EQUIVOCATION, result.worker, (signed[0], result.digest))
            )
            return AddOutcome.EQUIVOCATION
        if self._state is VoteState.FAILED:
            # Remembered only so that a later different digest is still caught.
            self._signed[result.worker] = [result.digest]
            return AddOutcome.AFTER_FAILURE
        if self._state is VoteState.ACCEPTED:
            return self._add_late(result)
        return self._add_pending(result)

    def _add_late(self, result: SignedResult) -> AddOutcome:
        accepted_digest = self._accepted[0].digest
        agrees = self._agrees(result.digest, accepted_digest)
        self._signed[result.worker] = [result.digest]
        if agrees:
            self._late.append(result)
            return AddOutcome.LATE_AGREEING
        self._mismatches.append(result)
        self._evidence.append(
            Evidence(EvidenceKind.CONTRADICTION, result.worker, (result.digest, accepted_digest))
        )
        return AddOutcome.LATE_CONTRADICTING

    def _add_pending(self, result: SignedResult) -> AddOutcome:
        # Every call to ``agree`` happens before any state changes, so a failing
        # agreement function leaves the vote as it was.
        index = next(
            (
                i
                for i, cluster in enumerate(self._clusters)
                if all(self._agrees(result.digest, member.digest) for member in cluster)
            ),
            len(self._clusters),
        )
        cluster = [*self._clusters[index], result] if index < len(self._clusters) else [result]
        counted = [*self._counted, result]
        accepting = len(cluster) >= self._redundancy and 2 * len(cluster) > len(counted)
        late: list[SignedResult] = []
        mismatches: list[SignedResult] = []
        credited = cluster[: self._redundancy]
        if accepting:
            credited_workers = {member.worker for member in credited}
            accepted_digest = credited[0].digest
            for other in counted:
                if other.worker in credited_workers:
                    continue
                # Cluster members agreed with the first member when they joined (cached).
                if self._agrees(other.digest, accepted_digest):
                    late.append(other)
                else:
                    mismatches.append(other)

        self._signed[result.worker] = [result.digest]
        self._counted = counted
        if index < len(self._clusters):
            self._clusters[index] = cluster
        else:
            self._clusters.append(cluster)
        if accepting:
            self._state = VoteState.ACCEPTED
            self._accepted = credited
            self._late = late
            self._mismatches = mismatches
            self._evidence.extend(
                Evidence(EvidenceKind.CONTRADICTION, m.worker, (m.digest, credited[0].digest))
                for m in mismatches
            )
        elif len(counted) >= self._max_results:
            self._state = VoteState.FAILED
        return AddOutcome.COUNTED

    def more_needed(self, outstanding: int) -> int:
        """How many extra workers to assign now.

        ``outstanding`` is the number of assigned workers whose results have
        not arrived. The answer assumes every future result joins the largest
        cluster: it is the fewest further results that could then decide the
        vote, less those outstanding. It is 0 once decided and never lets
        counted plus outstanding exceed ``max_results``.
        """
        _require_count("outstanding", outstanding, 0)
        if self.decided:
            return 0
        n = len(self._counted)
        best = max((len(cluster) for cluster in self._clusters), default=0)
        # Smallest k >= 0 with best + k >= redundancy and 2 * (best + k) > n + k.
        needed = max(0, self._redundancy - best, n - 2 * best + 1)
        room = self._max_results - n - outstanding
        return max(0, min(needed - outstanding, room))


@dataclass
class WorkerRecord:
    """One worker's tally within a job.

    ``accepted`` counts calculations it was credited in, ``mismatches`` its
    results that disagreed with an accepted one, ``late`` its agreeing results
    that were not credited, and ``evidence`` the evidence naming it.
    """

    accepted: int = 0
    mismatches: int = 0
    late: int = 0
    evidence: list[Evidence] = field(default_factory=list)


@dataclass
class _Progress:
    """How much of one vote a ledger has already tallied."""

    vote: CalculationVote
    credited: bool = False
    mismatches: int = 0
    late: int = 0
    evidence: int = 0


class WorkerLedger:
    """Per-job tally: credits, tolerated mismatches, and who is excluded.

    A worker is excluded once its mismatches exceed ``mismatch_tolerance``, or
    at once when it equivocates. Credits are reported as counted; whether an
    excluded worker is still paid is for settlement to decide.
    """

    def __init__(self, mismatch_tolerance: int = 1) -> None:
        self._tolerance = _require_count("mismatch_tolerance", mismatch_tolerance, 0)
        self._records: dict[str, WorkerRecord] = {}
        self._evidence: list[Evidence] = []
        self._progress: dict[int, _Progress] = {}

    @property
    def mismatch_tolerance(self) -> int:
        """How many mismatches a worker may have before it is excluded."""
        return self._tolerance

    def _record_of(self, worker: str) -> WorkerRecord:
        return self._records.setdefault(worker, WorkerRecord())

    def record(self, vote: CalculationVote) -> None:
        """Tally whatever in ``vote`` this ledger has not tallied yet.

        Idempotent per vote object: call it after every ``add`` (or at least
        when the vote is decided and after each later result), and nothing is
        counted twice. Equivocation is tallied even while the vote is pending.
        """
        if not isinstance(vote, CalculationVote):
            raise TypeError(f"vote must be a CalculationVote, got {type(vote).__name__}")
        # The progress entry keeps the vote alive, so its id cannot be reused.
        progress = self._progress.setdefault(id(vote), _Progress(vote))
        evidence = vote.evidence
        for item in evidence[progress.evidence :]:
            self._evidence.append(item)
            self._record_of(item.worker).evidence.append(item)
        progress.evidence = len(evidence)
        if vote.state is VoteState.ACCEPTED and not progress.credited:
            for result in vote.accepted:
                self._record_of(result.worker).accepted += 1
            progress.credited = True
        mismatches = vote.mismatches
        for result in mismatches[progress.mismatches :]:
            self._record_of(result.worker).mismatches += 1
        progress.mismatches = len(mismatches)
        late = vote.late
        for result in late[progress.late :]:
            self._record_of(result.worker).late += 1
        progress.late = len(late)

    def excluded(self, worker: str) -> bool:
        """Whether ``worker`` should get no more calculations in this job."""
        record = self._records.get(worker)
        if record is None:
            return False
        if record.mismatches > self._tolerance:
            return True
        return any(item.kind is EvidenceKind.EQUIVOCATION for item in record.evidence)

    def records(self) -> dict[str, WorkerRecord]:
        """A copy of every worker's record, keyed by worker."""
        return {
            worker: replace(record, evidence=list(record.evidence))
            for worker, record in self._records.items()
        }

    def evidence(self) -> list[Evidence]:
        """All evidence tallied, in order."""
        return list(self._evidence)

    def credits(self) -> dict[str, int]:
        """Accepted calculations per worker, for workers credited at least once."""
        return {
            worker: record.accepted for worker, record in self._records.items() if record.accepted
        }
