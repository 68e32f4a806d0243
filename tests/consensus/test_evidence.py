"""Slashing evidence: the canonical hash against an independent EIP-712 encoder, rules, policy."""

from __future__ import annotations

import dataclasses

import pytest
from eth_account._utils.encode_typed_data.encoding_and_hashing import hash_struct
from eth_utils import to_checksum_address
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from consensus.evidence import (
    BPS,
    Contradiction,
    EvidenceError,
    SlashPolicy,
    build_case,
    canonical_order,
    evidence_hash,
)

FAST = settings(deadline=None, max_examples=60)

TYPES = {
    "Evidence": [{"name": "contradictions", "type": "Contradiction[]"}],
    "Contradiction": [
        {"name": "job", "type": "bytes32"},
        {"name": "calculation", "type": "uint64"},
        {"name": "offender", "type": "address"},
        {"name": "digest", "type": "bytes32"},
        {"name": "signature", "type": "bytes"},
        {"name": "acceptedDigest", "type": "bytes32"},
        {"name": "accepted", "type": "AcceptedResult[]"},
    ],
    "AcceptedResult": [
        {"name": "worker", "type": "address"},
        {"name": "signature", "type": "bytes"},
    ],
}

addresses = st.binary(min_size=20, max_size=20).map(to_checksum_address)
words = st.binary(min_size=32, max_size=32)
signatures = st.binary(min_size=65, max_size=65)
calculations = st.integers(min_value=0, max_value=2**64 - 1)


@st.composite
def contradictions(
    draw: st.DrawFn,
    job: bytes | None = None,
    offender: str | None = None,
    min_accepted: int = 1,
) -> Contradiction:
    accepted = draw(st.lists(st.tuples(addresses, signatures), min_size=min_accepted,
                             max_size=5, unique_by=lambda p: p[0].lower()))
    return Contradiction(
        job=job if job is not None else draw(words),
        calculation=draw(calculations),
        offender=offender if offender is not None else draw(addresses),
        digest=draw(words),
        signature=draw(signatures),
        accepted_digest=draw(words),
        accepted=tuple(accepted),
    )


def independent_hash(items: list[Contradiction]) -> bytes:
    """The evidence hash by eth_account's EIP-712 encoder, the canonical order made here."""
    ordered = sorted(items, key=lambda c: (c.job, c.calculation, bytes.fromhex(c.offender[2:]),
                                           _struct(c)))
    data = {"contradictions": [_message(c) for c in ordered]}
    return bytes(hash_struct("Evidence", TYPES, data))


def _message(c: Contradiction) -> dict[str, object]:
    accepted = sorted(c.accepted, key=lambda p: bytes.fromhex(p[0][2:]))
    return {
        "job": c.job, "calculation": c.calculation, "offender": c.offender,
        "digest": c.digest, "signature": c.signature, "acceptedDigest": c.accepted_digest,
        "accepted": [{"worker": a, "signature": s} for a, s in accepted],
    }


def _struct(c: Contradiction) -> bytes:
    return bytes(hash_struct("Contradiction", TYPES, _message(c)))


@FAST
@given(st.lists(contradictions(), min_size=1, max_size=4))
def test_evidence_hash_is_the_eip712_hash_struct_of_the_sorted_contradictions(items) -> None:
    assert evidence_hash(items) == independent_hash(items)
    assert all(c.struct_hash() == _struct(c) for c in items)


@FAST
@given(st.lists(contradictions(), min_size=1, max_size=4), st.randoms(use_true_random=False))
def test_evidence_hash_ignores_the_order_of_contradictions_and_signers(items, rnd) -> None:
    shuffled = []
    for item in items:
        pairs = list(item.accepted)
        rnd.shuffle(pairs)
        # Addresses in another spelling (lower case) name the same signers.
        pairs = [(a.lower(), s) for a, s in pairs]
        shuffled.append(dataclasses.replace(item, accepted=tuple(pairs),
                                            offender=item.offender.lower()))
    rnd.shuffle(shuffled)
    assert evidence_hash(shuffled) == evidence_hash(items)
    assert canonical_order(shuffled) == canonical_order(items)


FIELDS = ("job", "calculation", "offender", "digest", "signature", "accepted_digest",
          "accepted")


@FAST
@given(contradictions(), st.sampled_from(FIELDS), st.data())
def test_every_field_changes_the_evidence_hash(item, name, data) -> None:
    strategy = {
        "job": words, "calculation": calculations, "offender": addresses, "digest": words,
        "signature": signatures, "accepted_digest": words,
        "accepted": st.lists(st.tuples(addresses, signatures), min_size=1, max_size=3,
                             unique_by=lambda p: p[0].lower()).map(tuple),
    }[name]
    other = dataclasses.replace(item, **{name: data.draw(strategy)})
    assume(getattr(other, name) != getattr(item, name))
    assert evidence_hash([other]) != evidence_hash([item])


def valid(redundancy: int = 2, calc: int = 0, job: bytes = b"\x01" * 32,
          offender: str = "0x" + "0a" * 20) -> Contradiction:
    accepted = tuple((f"0x{i + 1:040x}", bytes([i]) * 65) for i in range(redundancy))
    return Contradiction(job, calc, offender, b"\x02" * 32, b"\x03" * 65, b"\x04" * 32, accepted)


def test_a_contradiction_with_r_distinct_signers_other_than_the_offender_passes() -> None:
    valid(3).check(3)
    valid(4).check(3)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c: dataclasses.replace(c, digest=c.accepted_digest), "signed the accepted digest"),
        (lambda c: dataclasses.replace(c, accepted=(*c.accepted, c.accepted[0])),
         "appears more than once"),
        (lambda c: dataclasses.replace(c, accepted=(*c.accepted, (c.offender, b"\x09" * 65))),
         "is among the accepted signers"),
        (lambda c: dataclasses.replace(c, accepted=c.accepted[:1]),
         "fewer than the job's redundancy 2"),
    ],
    ids=["same digest", "repeated signer", "offender co-signed", "too few signers"],
)
def test_contradiction_rules_name_the_broken_one(change, message) -> None:
    with pytest.raises(EvidenceError, match=message):
        change(valid(2)).check(2)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("job", b"\x01" * 31, "job must be 32 bytes, got 31"),
        ("calculation", -1, "calculation must be between 0"),
        ("calculation", 2**64, "calculation must be between 0"),
        ("offender", "0x1234", "offender: not a 0x-prefixed"),
        ("signature", b"\x00" * 64, "signature must be 65 bytes, got 64"),
        ("accepted_digest", "00" * 32, "accepted_digest must be 32 bytes, got str"),
        ("accepted", ((b"\x00" * 20, b"\x00" * 65),), "accepted\\[0\\] address must be"),
        ("accepted", (("0x" + "11" * 20,),), "accepted\\[0\\] must be an"),
    ],
)
def test_malformed_contradictions_are_refused_naming_the_field(field, value, message) -> None:
    with pytest.raises(EvidenceError, match=message):
        dataclasses.replace(valid(), **{field: value})


def test_a_case_needs_the_minimum_of_contradictions_on_distinct_calculations() -> None:
    policy = SlashPolicy(min_contradictions=2)
    case = build_case([valid(calc=5), valid(calc=3)], 2, policy)
    assert [c.calculation for c in case.contradictions] == [3, 5]
    assert case.evidence == evidence_hash([valid(calc=3), valid(calc=5)])
    assert case.offender == valid().offender and case.job == valid().job
    with pytest.raises(EvidenceError, match=r"1 contradiction.*at least 2"):
        build_case([valid(calc=5)], 2, policy)
    with pytest.raises(EvidenceError, match="calculation 5 appears more than once"):
        build_case([valid(calc=5), dataclasses.replace(valid(calc=5), digest=b"\x07" * 32)],
                   2, policy)
    with pytest.raises(EvidenceError, match="two jobs"):
        build_case([valid(calc=1), valid(calc=2, job=b"\x09" * 32)], 2, policy)
    with pytest.raises(EvidenceError, match="two offenders"):
        build_case([valid(calc=1), valid(calc=2, offender="0x" + "0b" * 20)], 2, policy)
    with pytest.raises(EvidenceError, match="fewer than the job's redundancy 3"):
        build_case([valid(calc=1), valid(calc=2)], 3, policy)
    with pytest.raises(EvidenceError, match="no contradictions"):
        build_case([], 2, policy)


@FAST
@given(
    st.lists(st.integers(min_value=0, max_value=50), min_size=1, max_size=8),
    st.integers(min_value=1, max_value=5),
)
def test_a_case_is_made_exactly_when_distinct_calculations_reach_the_minimum(calcs, minimum):
    items = [valid(calc=c) for c in calcs]
    policy = SlashPolicy(min_contradictions=minimum)
    distinct = len(set(calcs)) == len(calcs)
    if distinct and len(calcs) >= minimum:
        assert len(build_case(items, 2, policy).contradictions) == len(calcs)
    else:
        with pytest.raises(EvidenceError):
            build_case(items, 2, policy)


@FAST
@given(
    st.integers(min_value=0, max_value=10**30),
    st.integers(min_value=1, max_value=BPS),
    st.none() | st.integers(min_value=1, max_value=10**30),
)
def test_the_policy_allows_its_share_of_the_stake_capped(slashable, bps, cap) -> None:
    policy = SlashPolicy(slash_bps=bps, max_amount=cap)
    allowed = policy.allowed_amount(slashable)
    share = slashable * bps // BPS
    assert allowed == (share if cap is None else min(share, cap))
    assert 0 <= allowed <= slashable
    if allowed == 0:
        with pytest.raises(EvidenceError, match="nothing this policy may slash"):
            policy.check_amount(1, slashable)
        return
    policy.check_amount(allowed, slashable)
    policy.check_amount(1, slashable)
    with pytest.raises(EvidenceError, match=f"exceeds the {allowed} allowed"):
        policy.check_amount(allowed + 1, slashable)
    with pytest.raises(EvidenceError, match="amount is zero"):
        policy.check_amount(0, slashable)


def test_the_default_policy_takes_a_tenth_and_needs_two_contradictions() -> None:
    policy = SlashPolicy()
    assert (policy.min_contradictions, policy.slash_bps, policy.max_amount) == (2, 1000, None)
    assert policy.allowed_amount(120 * 10**18) == 12 * 10**18


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"min_contradictions": 0}, "min_contradictions must be between 1"),
        ({"slash_bps": 0}, "slash_bps must be between 1 and 10000"),
        ({"slash_bps": BPS + 1}, "slash_bps must be between 1 and 10000"),
        ({"max_amount": 0}, "max_amount must be between 1"),
        ({"slash_bps": 10.5}, "slash_bps must be an integer"),
    ],
)
def test_bad_policies_are_refused(kwargs, message) -> None:
    with pytest.raises(EvidenceError, match=message):
        SlashPolicy(**kwargs)


def test_evidence_of_nothing_is_refused() -> None:
    with pytest.raises(EvidenceError, match="at least one contradiction"):
        evidence_hash([])
    with pytest.raises(EvidenceError, match=r"contradictions\[0\] must be a Contradiction"):
        evidence_hash(["not one"])  # type: ignore[list-item]
