"""Property and example tests for redundancy voting (consensus.voting).

Most properties use a transitive agreement relation: every result carries a hidden
class in its digest ("c<class>v<variant>"), and two digests agree exactly when their
classes are equal. Several variants per class give distinct digests that still agree,
as honest results computed on different CPUs do.
"""

from __future__ import annotations

import itertools
import random
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from consensus.agreement import tensors_agree
from consensus.voting import (
    AddOutcome,
    CalculationVote,
    Evidence,
    EvidenceKind,
    SignedResult,
    VoteState,
    WorkerLedger,
)

FAST = settings(deadline=None, max_examples=80)


def digest(cls: int, variant: int = 0) -> str:
    return f"c{cls}v{variant}"


def class_of(d: str) -> int:
    return int(d[1:].split("v")[0])


class ClassAgreement:
    """The transitive relation "same hidden class", refusing to judge equal digests."""

    def __init__(self) -> None:
        self.asked: list[tuple[str, str]] = []

    def __call__(self, x: str, y: str) -> bool:
        assert x != y, "equal digests must agree without asking the agreement function"
        self.asked.append((x, y))
        return class_of(x) == class_of(y)


def new_vote(redundancy: int, max_results: int) -> CalculationVote:
    return CalculationVote(redundancy, max_results, ClassAgreement())


def snapshot(vote: CalculationVote) -> tuple[object, ...]:
    return (
        vote.state,
        vote.counted,
        vote.accepted,
        vote.accepted_digest,
        vote.mismatches,
        vote.late,
        vote.evidence,
    )


# --- a plain model of the rule for transitive relations -------------------------------
#
# With a transitive relation every cluster is exactly one class, so the rule reduces to
# counting classes: accept the first prefix in which some class has at least R results
# and more than half of them. The model below says only that, in a different shape
# from the implementation, and the vote must match it result for result.


@dataclass
class Expected:
    outcomes: list[AddOutcome] = field(default_factory=list)
    state: VoteState = VoteState.PENDING
    counted: list[SignedResult] = field(default_factory=list)
    credited: list[SignedResult] = field(default_factory=list)
    late: list[SignedResult] = field(default_factory=list)
    mismatches: list[SignedResult] = field(default_factory=list)
    evidence: list[Evidence] = field(default_factory=list)
    counted_at_acceptance: int = 0


def model(redundancy: int, max_results: int, stream: Iterable[SignedResult]) -> Expected:
    ex = Expected()
    signed: dict[str, list[str]] = {}
    accepted_class: int | None = None
    for r in stream:
        if r.worker in signed:
            if r.digest in signed[r.worker]:
                ex.outcomes.append(AddOutcome.DUPLICATE)
            else:
                first = signed[r.worker][0]
                signed[r.worker].append(r.digest)
                ex.evidence.append(Evidence(EvidenceKind.EQUIVOCATION, r.worker, (first, r.digest)))
                ex.outcomes.append(AddOutcome.EQUIVOCATION)
            continue
        signed[r.worker] = [r.digest]
        if ex.state is VoteState.FAILED:
            ex.outcomes.append(AddOutcome.AFTER_FAILURE)
        elif accepted_class is not None:
            if class_of(r.digest) == accepted_class:
                ex.late.append(r)
                ex.outcomes.append(AddOutcome.LATE_AGREEING)
            else:
                ex.mismatches.append(r)
                ex.evidence.append(
                    Evidence(
                        EvidenceKind.CONTRADICTION, r.worker, (r.digest, ex.credited[0].digest)
                    )
                )
                ex.outcomes.append(AddOutcome.LATE_CONTRADICTING)
        else:
            ex.outcomes.append(AddOutcome.COUNTED)
            ex.counted.append(r)
            cls = class_of(r.digest)
            size = sum(class_of(c.digest) == cls for c in ex.counted)
            if size >= redundancy and 2 * size > len(ex.counted):
                accepted_class = cls
                ex.state = VoteState.ACCEPTED
                ex.counted_at_acceptance = len(ex.counted)
                members = [c for c in ex.counted if class_of(c.digest) == cls]
                ex.credited = members[:redundancy]
                ex.late = members[redundancy:]
                ex.mismatches = [c for c in ex.counted if class_of(c.digest) != cls]
                ex.evidence += [
                    Evidence(
                        EvidenceKind.CONTRADICTION, m.worker, (m.digest, ex.credited[0].digest)
                    )
                    for m in ex.mismatches
                ]
            elif len(ex.counted) == max_results:
                ex.state = VoteState.FAILED
    return ex


# --- strategies ----------------------------------------------------------------------


@st.composite
def vote_params(draw: st.DrawFn, max_r: int = 4, max_extra: int = 5) -> tuple[int, int]:
    redundancy = draw(st.integers(1, max_r))
    return redundancy, redundancy + draw(st.integers(0, max_extra))


def results(
    workers: int = 8, classes: int = 3, variants: int = 2, max_size: int = 14
) -> st.SearchStrategy[list[SignedResult]]:
    """Streams where workers may repeat (duplicates, equivocation) and classes compete."""
    one = st.builds(
        lambda w, c, v: SignedResult(f"w{w}", digest(c, v)),
        st.integers(0, workers - 1),
        st.integers(0, classes - 1),
        st.integers(0, variants - 1),
    )
    return st.lists(one, max_size=max_size)


@st.composite
def contested_results(draw: st.DrawFn) -> list[SignedResult]:
    """Streams mixing several classes in shuffled order, so majorities form late or never,
    with a few results re-sent or re-signed by workers seen before."""
    counts = draw(st.lists(st.integers(0, 5), min_size=2, max_size=4))
    classes = draw(st.permutations([c for c, k in enumerate(counts) for _ in range(k)]))
    stream = [
        SignedResult(f"w{i}", digest(c, draw(st.integers(0, 2)))) for i, c in enumerate(classes)
    ]
    for _ in range(draw(st.integers(0, 3))):
        if not stream:
            break
        worker = draw(st.sampled_from(stream)).worker
        resent = SignedResult(worker, digest(draw(st.integers(0, 3)), draw(st.integers(0, 2))))
        stream.insert(draw(st.integers(0, len(stream))), resent)
    return stream


@st.composite
def late_majority_results(draw: st.DrawFn) -> list[SignedResult]:
    """Streams where lone dissenters (one per class) delay a majority that forms only once
    the winning class has grown past R, so who is credited depends on arrival order."""
    dissenters = draw(st.integers(1, 6))
    winners = dissenters + draw(st.integers(1, 3))
    early = draw(st.integers(0, 2))
    order = [*draw(st.permutations([0] * early + list(range(1, dissenters + 1))))]
    order += [0] * (winners - early)
    return [SignedResult(f"w{i}", digest(c, i % 2)) for i, c in enumerate(order)]


def any_results() -> st.SearchStrategy[list[SignedResult]]:
    return st.one_of(results(), contested_results(), late_majority_results())


def distinct_worker_results(
    classes: int = 3, variants: int = 2, min_size: int = 0, max_size: int = 12
) -> st.SearchStrategy[list[SignedResult]]:
    """Streams in which every result comes from a different worker."""
    pairs = st.lists(
        st.tuples(st.integers(0, classes - 1), st.integers(0, variants - 1)),
        min_size=min_size,
        max_size=max_size,
    )
    return pairs.map(
        lambda ps: [SignedResult(f"w{i}", digest(c, v)) for i, (c, v) in enumerate(ps)]
    )


# --- properties ----------------------------------------------------------------------


@settings(deadline=None, max_examples=200)
@given(vote_params(), any_results())
def test_vote_matches_the_class_counting_model(
    params: tuple[int, int], stream: list[SignedResult]
) -> None:
    """Result for result, the vote does what the plain class-counting rule says."""
    redundancy, max_results = params
    vote = new_vote(redundancy, max_results)
    outcomes = [vote.add(r) for r in stream]
    ex = model(redundancy, max_results, stream)
    assert outcomes == ex.outcomes
    assert vote.state is ex.state
    assert list(vote.counted) == ex.counted
    assert list(vote.accepted) == ex.credited
    assert list(vote.late) == ex.late
    assert list(vote.mismatches) == ex.mismatches
    assert list(vote.evidence) == ex.evidence
    assert vote.accepted_digest == (ex.credited[0].digest if ex.credited else None)


@settings(deadline=None, max_examples=150)
@given(vote_params(), any_results())
def test_acceptance_needs_r_distinct_agreeing_workers_and_a_strict_majority(
    params: tuple[int, int], stream: list[SignedResult]
) -> None:
    """Nothing is accepted without R mutually agreeing results from R distinct workers that
    belong to a class holding a strict majority of the counted results at acceptance; and a
    decided vote never changes its decision or its counted results."""
    redundancy, max_results = params
    vote = new_vote(redundancy, max_results)
    before = snapshot(vote)
    for r in stream:
        vote.add(r)
        workers = [c.worker for c in vote.counted]
        assert len(workers) == len(set(workers)) <= max_results
        if before[0] is not VoteState.PENDING:
            assert snapshot(vote)[:4] == before[:4]
        elif vote.state is VoteState.ACCEPTED:
            credited = vote.accepted
            assert len(credited) == redundancy
            assert len({c.worker for c in credited}) == redundancy
            assert len({class_of(c.digest) for c in credited}) == 1
            assert set(credited) <= set(vote.counted)
            accepted_class = class_of(credited[0].digest)
            size = sum(class_of(c.digest) == accepted_class for c in vote.counted)
            assert 2 * size > len(vote.counted)
            # Every counted result is exactly one of: credited, agreeing but late, mismatch.
            parts = [*credited, *vote.late, *vote.mismatches]
            assert sorted(parts, key=lambda r: workers.index(r.worker)) == list(vote.counted)
            assert all(class_of(m.digest) != accepted_class for m in vote.mismatches)
            contradictions = {e.worker for e in vote.evidence if e.kind == "contradiction"}
            assert contradictions == {m.worker for m in vote.mismatches}
        elif vote.state is VoteState.FAILED:
            assert len(vote.counted) == max_results
            assert vote.accepted == () and vote.accepted_digest is None
        before = snapshot(vote)


@settings(deadline=None, max_examples=150)
@given(
    st.integers(1, 4),
    distinct_worker_results(classes=4, variants=2, min_size=1, max_size=10),
    st.integers(0, 2),
    st.randoms(use_true_random=False),
)
def test_arrival_order_changes_who_is_credited_not_what_is_accepted(
    redundancy: int, pool: list[SignedResult], extra: int, rnd: random.Random
) -> None:
    """Feed one finite set of N results from distinct workers, in two arrival orders, to
    votes with max_results = N + extra.

    Call a class *eligible* when it has at least R results in the set. The precise
    statement is: the outcome (state and accepted class) is the same for every arrival
    order if and only if either no class is eligible (then the vote fails when extra is 0
    and stays pending otherwise), or exactly one class H is eligible and H is a strict
    majority of the whole set (then H is accepted in every order, and orders differ only
    in which R members of H are credited). A condition on prefixes ("H is a majority of
    every long enough prefix") depends on the order itself, so it cannot promise anything
    across orders; the order-free condition is this one. Note what it excludes: a faulty
    class with R or more results can win when its results arrive first, however large
    the honest class.

    Both directions are checked: with the condition, two random orders agree; without it,
    explicit witness orders reach different outcomes. An eligible class fed first is
    accepted after its first R results; a lone eligible class that is not a majority,
    fed last, is never accepted.
    """
    n = len(pool)
    max_results = max(n + extra, redundancy)

    def outcome(order: list[SignedResult]) -> tuple[VoteState, int | None, CalculationVote]:
        vote = new_vote(redundancy, max_results)
        for r in order:
            vote.add(r)
        digest_ = vote.accepted_digest
        return vote.state, None if digest_ is None else class_of(digest_), vote

    sizes = Counter(class_of(r.digest) for r in pool)
    eligible = sorted(c for c, size in sizes.items() if size >= redundancy)
    first = rnd.sample(pool, n)
    second = rnd.sample(pool, n)
    a, b = outcome(first), outcome(second)
    if not eligible:
        expected_state = VoteState.FAILED if max_results == n else VoteState.PENDING
        assert a[:2] == b[:2] == (expected_state, None)
    elif len(eligible) == 1 and 2 * sizes[eligible[0]] > n:
        assert a[:2] == b[:2] == (VoteState.ACCEPTED, eligible[0])
        for _, _, vote in (a, b):
            assert {class_of(c.digest) for c in vote.accepted} == {eligible[0]}
    else:
        witnesses = set()
        for cls in eligible:
            ahead = [r for r in pool if class_of(r.digest) == cls]
            state, accepted, _ = outcome(ahead + [r for r in pool if r not in ahead])
            assert (state, accepted) == (VoteState.ACCEPTED, cls)
            witnesses.add((state, accepted))
        if len(eligible) == 1:
            cls = eligible[0]
            behind = [r for r in pool if class_of(r.digest) == cls]
            state, accepted, _ = outcome([r for r in pool if r not in behind] + behind)
            assert accepted is None
            witnesses.add((state, accepted))
        assert len(witnesses) >= 2


@FAST
@given(st.integers(2, 4), st.integers(0, 3), st.integers(0, 3), st.data())
def test_credited_are_the_first_r_of_the_winning_cluster(
    redundancy: int, surplus: int, early: int, data: st.DataObject
) -> None:
    """When a class grows past R before it wins a majority (d >= R lone dissenters, fewer
    than R of its members mixed among them, the rest after), it is accepted when it holds
    d + 1 results; the first R of them in arrival order are credited and the others are
    late. This is what "the R fastest agreeing results are paid" means."""
    dissenters = redundancy + surplus
    early = min(early, redundancy - 1)
    head = data.draw(st.permutations([0] * early + list(range(1, dissenters + 1))))
    order = [*head, *[0] * (dissenters + 1 - early)]
    stream = [SignedResult(f"w{i}", digest(c, i % 3)) for i, c in enumerate(order)]
    vote = new_vote(redundancy, len(stream))
    for r in stream:
        vote.add(r)
    winners = [r for r in stream if class_of(r.digest) == 0]
    assert vote.state is VoteState.ACCEPTED
    assert len(vote.counted) == len(stream)
    assert list(vote.accepted) == winners[:redundancy]
    assert list(vote.late) == winners[redundancy:]
    assert len(vote.mismatches) == dissenters


@FAST
@given(vote_params(), results(workers=4, classes=2, variants=3, max_size=16))
def test_equivocation_is_always_reported_and_never_counted(
    params: tuple[int, int], stream: list[SignedResult]
) -> None:
    """Whenever a worker signs a second, different digest, whatever the vote's state, the
    answer is EQUIVOCATION with evidence holding both digests, and the second result
    appears nowhere in the vote's counted, credited, late or mismatched results."""
    vote = new_vote(*params)
    first: dict[str, str] = {}
    for r in stream:
        outcome = vote.add(r)
        signer_first = first.setdefault(r.worker, r.digest)
        if r.digest != signer_first and outcome is not AddOutcome.DUPLICATE:
            assert outcome is AddOutcome.EQUIVOCATION
            assert Evidence(EvidenceKind.EQUIVOCATION, r.worker, (signer_first, r.digest)) in (
                vote.evidence
            )
        if outcome is AddOutcome.EQUIVOCATION:
            assert r.digest != signer_first
    for seen in (vote.counted, vote.accepted, vote.late, vote.mismatches):
        assert all(first[r.worker] == r.digest for r in seen)


@FAST
@given(vote_params(), results(workers=5, max_size=16))
def test_duplicates_and_results_after_failure_change_nothing(
    params: tuple[int, int], stream: list[SignedResult]
) -> None:
    """A duplicate never counts twice, and after FAILED a new worker's result changes nothing
    observable (a signer's second digest is still reported as equivocation, see above)."""
    vote = new_vote(*params)
    for r in [*stream, *stream]:
        before = snapshot(vote)
        outcome = vote.add(r)
        if outcome in (AddOutcome.DUPLICATE, AddOutcome.AFTER_FAILURE):
            assert snapshot(vote) == before
        if before[0] is VoteState.FAILED and outcome is not AddOutcome.EQUIVOCATION:
            assert snapshot(vote) == before
    assert len({c.worker for c in vote.counted}) == len(vote.counted)


@FAST
@given(vote_params(), results(workers=6, classes=4, variants=3))
def test_agreement_is_asked_once_per_pair_of_distinct_digests(
    params: tuple[int, int], stream: list[SignedResult]
) -> None:
    """Equal digests are never sent to the (costly) agreement function, nor is any pair twice."""
    agree = ClassAgreement()
    vote = CalculationVote(*params, agree)
    for r in stream:
        vote.add(r)
    pairs = [frozenset(p) for p in agree.asked]
    assert len(pairs) == len(set(pairs))


def run_master(
    vote: CalculationVote,
    data: st.DataObject,
    next_result: Callable[[], SignedResult],
) -> tuple[int, list[SignedResult]]:
    """Play the master: assign what more_needed asks for, receive results in an order the
    test chooses, and stop at the decision. Returns the number assigned and the results
    still outstanding at the decision."""
    outstanding: list[SignedResult] = []
    assigned = 0
    while not vote.decided:
        need = vote.more_needed(len(outstanding))
        assert need >= 0
        assert len(vote.counted) + len(outstanding) + need <= vote.max_results
        for _ in range(need):
            outstanding.append(next_result())
        assigned += need
        assert outstanding, "the master stalled: nothing outstanding and nothing requested"
        index = data.draw(st.integers(0, len(outstanding) - 1), label="arrival")
        assert vote.add(outstanding.pop(index)) is AddOutcome.COUNTED
    for busy in range(len(outstanding) + 3):
        assert vote.more_needed(busy) == 0
    return assigned, outstanding


@settings(deadline=None, max_examples=120)
@given(vote_params(max_extra=6), distinct_worker_results(classes=3, max_size=8), st.data())
def test_more_needed_reaches_acceptance_with_honest_results(
    params: tuple[int, int], prefix: list[SignedResult], data: st.DataObject
) -> None:
    """After any counted prefix, if every future result is honest (class 0), following
    more_needed never overshoots max_results, and it accepts the honest class exactly when
    the counted results allow it: with n counted of which h honest, the honest class needs
    k = max(0, R - h, n - 2h + 1) more results, and the vote is accepted iff n + k <=
    max_results, having assigned exactly k workers (none wasted); otherwise it fails with
    max_results counted."""
    redundancy, max_results = params
    vote = new_vote(redundancy, max_results)
    for r in prefix:
        if vote.decided or len(vote.counted) == max_results - 1:
            break
        vote.add(r)
    if vote.decided:
        assert all(vote.more_needed(o) == 0 for o in range(4))
        return
    n = len(vote.counted)
    h = sum(class_of(c.digest) == 0 for c in vote.counted)
    k = max(0, redundancy - h, n - 2 * h + 1)
    fresh = itertools.count()

    def honest() -> SignedResult:
        i = next(fresh)
        return SignedResult(f"honest{i}", digest(0, data.draw(st.integers(0, 3), label="variant")))

    assigned, left = run_master(vote, data, honest)
    if n + k <= max_results:
        assert vote.state is VoteState.ACCEPTED
        assert class_of(vote.accepted_digest or "") == 0
        assert assigned == k
        assert len(vote.counted) == n + k
        assert left == []
    else:
        assert vote.state is VoteState.FAILED
        assert assigned == max_results - n
        assert len(vote.counted) == max_results


@settings(deadline=None, max_examples=150)
@given(st.integers(2, 4), st.integers(0, 4), st.integers(0, 3), st.data())
def test_byzantine_minority_cannot_win(
    redundancy: int, byzantine: int, extra: int, data: st.DataObject
) -> None:
    """f byzantine workers that disagree with each other and with the honest class, mixed
    among the assigned workers and arriving whenever the test likes, never get a digest
    accepted, and the honest class is accepted, provided R >= 2 and
    max_results >= f + max(R, f + 1). For f < R this is max_results >= R + f; for f >= R
    the honest side needs f + 1 results to outvote f byzantine ones that arrive first.
    (With R = 1 any first result wins: redundancy 1 is no protection at all.)"""
    max_results = byzantine + max(redundancy, byzantine + 1) + extra
    vote = new_vote(redundancy, max_results)
    fresh = itertools.count()
    spent = 0

    def next_worker() -> SignedResult:
        nonlocal spent
        i = next(fresh)
        if spent < byzantine and data.draw(st.booleans(), label="byzantine"):
            spent += 1
            return SignedResult(f"byz{i}", digest(spent, 0))
        return SignedResult(f"honest{i}", digest(0, i % 3))

    _, left = run_master(vote, data, next_worker)
    assert vote.state is VoteState.ACCEPTED
    assert all(r.worker.startswith("honest") for r in vote.accepted)
    assert class_of(vote.accepted_digest or "") == 0
    assert all(m.worker.startswith("byz") for m in vote.mismatches)
    for r in left:
        expected = (
            AddOutcome.LATE_CONTRADICTING
            if r.worker.startswith("byz")
            else AddOutcome.LATE_AGREEING
        )
        assert vote.add(r) is expected
    byzantine_seen = {r.worker for r in [*vote.counted, *left] if r.worker.startswith("byz")}
    contradicting = {e.worker for e in vote.evidence if e.kind is EvidenceKind.CONTRADICTION}
    assert contradicting == byzantine_seen


@pytest.mark.parametrize(("redundancy", "byzantine"), [(2, 1), (3, 2), (2, 3), (3, 4)])
def test_byzantine_bound_is_tight(redundancy: int, byzantine: int) -> None:
    """One result fewer than f + max(R, f + 1) and byzantine results arriving first make
    the vote fail instead of accepting the honest class."""
    max_results = byzantine + max(redundancy, byzantine + 1) - 1
    vote = new_vote(redundancy, max_results)
    for i in range(byzantine):
        vote.add(SignedResult(f"byz{i}", digest(i + 1)))
    for i in range(max_results - byzantine):
        vote.add(SignedResult(f"honest{i}", digest(0)))
    assert vote.state is VoteState.FAILED


@FAST
@given(
    vote_params(),
    st.lists(st.tuples(st.integers(0, 5), st.integers(0, 5)), max_size=14),
    st.sets(st.tuples(st.integers(0, 5), st.integers(0, 5))),
)
def test_guarantees_hold_for_any_symmetric_relation(
    params: tuple[int, int],
    stream: list[tuple[int, int]],
    edges: set[tuple[int, int]],
) -> None:
    """Even when agreement is not transitive (A~B, B~C, A!~C), the credited results agree
    pairwise, come from distinct workers, and together with the other counted results that
    agree with the accepted digest form a strict majority of the counted results."""
    linked = {frozenset(e) for e in edges}

    def agree(x: str, y: str) -> bool:
        assert x != y
        return frozenset((int(x[1:]), int(y[1:]))) in linked

    redundancy, max_results = params
    vote = CalculationVote(redundancy, max_results, agree)
    for worker, value in stream:
        vote.add(SignedResult(f"w{worker}", f"d{value}"))
        if vote.state is VoteState.ACCEPTED:
            credited = vote.accepted
            assert len({c.worker for c in credited}) == len(credited) == redundancy
            for x, y in itertools.combinations(credited, 2):
                assert x.digest == y.digest or agree(x.digest, y.digest)
            supporters = [*credited, *[r for r in vote.late if r in vote.counted]]
            assert 2 * len(supporters) > len(vote.counted)
            accepted_digest = vote.accepted_digest or ""
            for m in vote.mismatches:
                assert m.digest != accepted_digest and not agree(m.digest, accepted_digest)


@FAST
@given(
    st.lists(
        st.tuples(vote_params(max_r=3, max_extra=3), results(workers=5, max_size=10)), max_size=6
    ),
    st.integers(0, 2),
    st.lists(st.booleans(), min_size=1),
)
def test_ledger_tallies_credits_mismatches_and_exclusions(
    votes: list[tuple[tuple[int, int], list[SignedResult]]],
    tolerance: int,
    sync_pattern: list[bool],
) -> None:
    """Credits equal the number of accepted calculations a worker was credited in; a worker
    is excluded exactly when it equivocated or its mismatches exceed the tolerance; and
    recording a vote again, at any time, never counts anything twice."""
    ledger = WorkerLedger(mismatch_tolerance=tolerance)
    credits: Counter[str] = Counter()
    mismatches: Counter[str] = Counter()
    late: Counter[str] = Counter()
    equivocators: set[str] = set()
    all_evidence: list[Evidence] = []
    step = itertools.cycle(sync_pattern)
    for (redundancy, max_results), stream in votes:
        vote = new_vote(redundancy, max_results)
        for r in stream:
            vote.add(r)
            if next(step):
                ledger.record(vote)
                ledger.record(vote)
        ledger.record(vote)
        ex = model(redundancy, max_results, stream)
        credits.update(c.worker for c in ex.credited)
        mismatches.update(m.worker for m in ex.mismatches)
        late.update(r.worker for r in ex.late)
        all_evidence += ex.evidence
        equivocators |= {e.worker for e in ex.evidence if e.kind is EvidenceKind.EQUIVOCATION}

    assert ledger.credits() == {w: n for w, n in credits.items() if n}
    records = ledger.records()
    everyone = {f"w{i}" for i in range(5)}
    for worker in everyone:
        record = records.get(worker)
        assert (record.mismatches if record else 0) == mismatches[worker]
        assert (record.late if record else 0) == late[worker]
        expected = worker in equivocators or mismatches[worker] > tolerance
        assert ledger.excluded(worker) is expected
    assert ledger.evidence() == all_evidence
    assert sorted(map(repr, ledger.evidence())) == sorted(
        repr(e) for r in records.values() for e in r.evidence
    )


# --- examples that read as documentation ---------------------------------------------

A, B, C = digest(0), digest(1), digest(2)


def test_a_a_b_a_is_accepted_on_the_fourth_result() -> None:
    """R = 3: A, A, B leaves A short of three; the fourth result, A, decides. B is a
    mismatch with contradiction evidence, but nothing more."""
    vote = new_vote(3, 5)
    for worker, d in [("w1", A), ("w2", A), ("w3", B)]:
        assert vote.add(SignedResult(worker, d)) is AddOutcome.COUNTED
        assert vote.state is VoteState.PENDING
    assert vote.more_needed(0) == 1
    assert vote.add(SignedResult("w4", A)) is AddOutcome.COUNTED
    assert vote.state is VoteState.ACCEPTED
    assert [r.worker for r in vote.accepted] == ["w1", "w2", "w4"]
    assert vote.accepted_digest == A
    assert vote.mismatches == (SignedResult("w3", B),)
    assert vote.evidence == (Evidence(EvidenceKind.CONTRADICTION, "w3", (B, A)),)
    assert vote.more_needed(0) == 0

    ledger = WorkerLedger()
    ledger.record(vote)
    assert ledger.credits() == {"w1": 1, "w2": 1, "w4": 1}
    assert not ledger.excluded("w3")


def test_a_b_c_a_a_credits_the_first_two_a() -> None:
    """R = 2: A, B, C, A has two A but not a majority; the third A wins, and the first two
    A are credited while the third is recorded as late."""
    vote = new_vote(2, 5)
    for worker, d in [("w1", A), ("w2", B), ("w3", C), ("w4", A)]:
        vote.add(SignedResult(worker, d))
    assert vote.state is VoteState.PENDING
    vote.add(SignedResult("w5", A))
    assert [r.worker for r in vote.accepted] == ["w1", "w4"]
    assert [r.worker for r in vote.late] == ["w5"]
    assert [r.worker for r in vote.mismatches] == ["w2", "w3"]


def test_the_three_fastest_agreeing_results_are_paid() -> None:
    """Agreeing results beyond the first R are recorded as late and not credited."""
    vote = new_vote(3, 5)
    outcomes = [vote.add(SignedResult(f"w{i}", digest(0, i))) for i in range(5)]
    assert outcomes[:3] == [AddOutcome.COUNTED] * 3
    assert outcomes[3:] == [AddOutcome.LATE_AGREEING] * 2
    assert [r.worker for r in vote.accepted] == ["w0", "w1", "w2"]
    assert [r.worker for r in vote.late] == ["w3", "w4"]


def test_no_majority_within_max_results_fails() -> None:
    """Three-way disagreement that never forms a majority fails at max_results."""
    vote = new_vote(2, 4)
    for worker, d in [("w1", A), ("w2", B), ("w3", C), ("w4", A)]:
        vote.add(SignedResult(worker, d))
    assert vote.state is VoteState.FAILED
    assert vote.add(SignedResult("w5", A)) is AddOutcome.AFTER_FAILURE
    assert vote.more_needed(0) == 0


def test_more_needed_escalates_on_disagreement() -> None:
    """A fresh vote asks for R workers; a split asks for enough to outvote it."""
    vote = new_vote(3, 7)
    assert vote.more_needed(0) == 3
    assert vote.more_needed(2) == 1
    vote.add(SignedResult("w1", A))
    vote.add(SignedResult("w2", B))
    vote.add(SignedResult("w3", A))
    assert vote.more_needed(0) == 1
    vote.add(SignedResult("w4", B))
    assert vote.more_needed(0) == 1  # A, B, A, B: one more A makes 3 of 5
    vote.add(SignedResult("w5", C))
    assert vote.more_needed(0) == 2  # 2 of 5 now needs 4 of 7
    assert vote.more_needed(1) == 1
    assert vote.more_needed(2) == 0


def test_more_needed_never_exceeds_max_results() -> None:
    """Requests are capped so that counted plus outstanding stays within max_results."""
    vote = new_vote(3, 4)
    vote.add(SignedResult("w1", A))
    vote.add(SignedResult("w2", B))
    assert vote.more_needed(0) == 2  # A needs two more: 3 of 4
    vote.add(SignedResult("w3", C))
    assert vote.more_needed(0) == 1  # would need 2 (3 of 5), only 1 fits
    assert vote.more_needed(1) == 0


def test_equivocation_is_evidence_and_excludes_at_once() -> None:
    """Two different digests from one signer: evidence at once, second never counted."""
    vote = new_vote(3, 5)
    vote.add(SignedResult("w1", A))
    assert vote.add(SignedResult("w1", B)) is AddOutcome.EQUIVOCATION
    assert vote.add(SignedResult("w1", A)) is AddOutcome.DUPLICATE
    assert vote.counted == (SignedResult("w1", A),)
    assert vote.evidence == (Evidence(EvidenceKind.EQUIVOCATION, "w1", (A, B)),)
    assert vote.evidence[0].kind == "equivocation"
    ledger = WorkerLedger()
    ledger.record(vote)
    assert ledger.excluded("w1")


def test_ledger_tolerates_one_mismatch_then_excludes() -> None:
    """A lone mismatch is not exclusion; a second one, over the tolerance, is."""
    ledger = WorkerLedger(mismatch_tolerance=1)
    for round_ in range(2):
        vote = new_vote(3, 4)
        for worker, d in [("w1", A), ("w2", A), ("odd", B), ("w3", A)]:
            vote.add(SignedResult(worker, d))
        ledger.record(vote)
        ledger.record(vote)
        assert ledger.excluded("odd") is (round_ == 1)
    assert ledger.records()["odd"].mismatches == 2
    assert ledger.credits() == {"w1": 2, "w2": 2, "w3": 2}
    assert not ledger.excluded("w1")
    assert not ledger.excluded("never-seen")


def test_late_contradiction_is_a_mismatch_too() -> None:
    """A result contradicting an accepted majority after the decision is evidence and a
    mismatch; with tolerance 0 it excludes the worker."""
    vote = new_vote(2, 3)
    vote.add(SignedResult("w1", A))
    vote.add(SignedResult("w2", A))
    ledger = WorkerLedger(mismatch_tolerance=0)
    ledger.record(vote)
    assert vote.add(SignedResult("w3", B)) is AddOutcome.LATE_CONTRADICTING
    ledger.record(vote)
    assert ledger.excluded("w3")
    assert ledger.evidence() == [Evidence(EvidenceKind.CONTRADICTION, "w3", (B, A))]


def test_vote_over_real_tensors() -> None:
    """How the master wires it: digests name tensors it holds; agreement compares them."""
    base = np.linspace(-1.0, 1.0, 64, dtype=np.float32)
    held = {
        "honest-a": {"w": base},
        "honest-b": {"w": (base.astype(np.float64) * (1 + 1e-7)).astype(np.float32)},
        "cheat": {"w": base * np.float32(1.01)},
    }
    vote = CalculationVote(2, 3, lambda x, y: tensors_agree(held[x], held[y]))
    vote.add(SignedResult("p1", "cheat"))
    vote.add(SignedResult("p2", "honest-a"))
    assert vote.state is VoteState.PENDING
    vote.add(SignedResult("p3", "honest-b"))
    assert vote.state is VoteState.ACCEPTED
    assert vote.accepted_digest == "honest-a"
    assert [m.worker for m in vote.mismatches] == ["p1"]


def test_a_failing_agreement_function_leaves_the_vote_unchanged() -> None:
    """An exception from the agreement function propagates and the vote is as before."""

    def broken(x: str, y: str) -> bool:
        raise RuntimeError("tensors unavailable")

    vote = CalculationVote(2, 3, broken)
    vote.add(SignedResult("w1", A))
    before = snapshot(vote)
    with pytest.raises(RuntimeError):
        vote.add(SignedResult("w2", B))
    assert snapshot(vote) == before
    assert vote.add(SignedResult("w2", A)) is AddOutcome.COUNTED


def test_bad_arguments_are_named() -> None:
    """Construction and input errors say which value was wrong and what is allowed."""
    agree = ClassAgreement()
    with pytest.raises(ValueError, match="redundancy must be at least 1"):
        CalculationVote(0, 3, agree)
    with pytest.raises(ValueError, match=r"max_results must be at least redundancy \(3\)"):
        CalculationVote(3, 2, agree)
    with pytest.raises(TypeError, match="redundancy must be an int"):
        CalculationVote(2.0, 3, agree)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"SignedResult\.worker must be a non-empty string"):
        SignedResult("", A)
    with pytest.raises(ValueError, match=r"SignedResult\.digest"):
        SignedResult("w1", "")
    with pytest.raises(ValueError, match="outstanding must be at least 0"):
        new_vote(1, 1).more_needed(-1)
    with pytest.raises(ValueError, match="mismatch_tolerance must be at least 0"):
        WorkerLedger(mismatch_tolerance=-1)
