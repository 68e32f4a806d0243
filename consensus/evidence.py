"""Slashing evidence: contradictions, their canonical hash, and when they justify a slash order.

A *contradiction* is a worker's signed result for one calculation next to the
result the vote accepted for it, signed by at least R other workers. Honest
results differ in their low bits and, rarely, by more (see
``consensus.agreement``), so one contradiction is never punished: a committee
slash order needs ``min_contradictions`` of them by the same worker on
distinct calculations of one job. (Two different digests signed by one worker
for one calculation are equivocation instead, which the stake registry
slashes without any committee.)

The rules here are structural; whether each signature is really its signer's
and whether the tensors really disagree is for the caller to check, since it
holds the keys' recovery code and the result bytes.

The evidence hash that goes into ``SlashOrder.evidence`` is the EIP-712
``hashStruct`` of ``Evidence(Contradiction[] contradictions)`` (type strings
below), with the contradictions sorted by (job, calculation, offender) and each
contradiction's accepted signers sorted by address, so that every committee
member computes the same 32 bytes from the same evidence in any order.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import pairwise

from consensus.abi import address_bytes, address_word, checksum_address, keccak256, uint_word

BPS = 10_000
UINT64_MAX = 2**64 - 1
UINT256_MAX = 2**256 - 1
SIGNATURE_BYTES = 65
DEFAULT_MIN_CONTRADICTIONS = 2
DEFAULT_SLASH_BPS = 1_000

ACCEPTED_TYPE = "AcceptedResult(address worker,bytes signature)"
CONTRADICTION_TYPE = (
    "Contradiction(bytes32 job,uint64 calculation,address offender,bytes32 digest,"
    "bytes signature,bytes32 acceptedDigest,AcceptedResult[] accepted)"
)
EVIDENCE_TYPE = "Evidence(Contradiction[] contradictions)"

ACCEPTED_TYPEHASH = keccak256(ACCEPTED_TYPE.encode())
# EIP-712 appends the referenced struct types, sorted by name, to the primary type.
CONTRADICTION_TYPEHASH = keccak256((CONTRADICTION_TYPE + ACCEPTED_TYPE).encode())
EVIDENCE_TYPEHASH = keccak256((EVIDENCE_TYPE + ACCEPTED_TYPE + CONTRADICTION_TYPE).encode())


class EvidenceError(ValueError):
    """Evidence that is malformed or does not justify what it is offered for; says why."""


def _bytes_of(name: str, value: object, size: int) -> bytes:
    if not isinstance(value, bytes | bytearray):
        raise EvidenceError(f"{name} must be {size} bytes, got {type(value).__name__}")
    if len(value) != size:
        raise EvidenceError(f"{name} must be {size} bytes, got {len(value)} bytes")
    return bytes(value)


def _address(name: str, value: object) -> str:
    if not isinstance(value, str):
        raise EvidenceError(f"{name} must be an address string, got {type(value).__name__}")
    try:
        return checksum_address(value)
    except ValueError as exc:
        raise EvidenceError(f"{name}: {exc}") from None


def _count(name: str, value: object, minimum: int, maximum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise EvidenceError(f"{name} must be an integer, got {type(value).__name__}")
    if not minimum <= value <= maximum:
        raise EvidenceError(f"{name} must be between {minimum} and {maximum}, got {value}")
    return value


@dataclass(frozen=True)
class Contradiction:
    """A worker's signed result for one calculation against the accepted, co-signed result.

    ``offender`` and the accepted workers are addresses (normalised to EIP-55;
    ``accepted`` is kept sorted by address), digests are the 32-byte result
    digests the workers signed in ``Result(job, calculation, digest)``, and
    signatures are 65 bytes (r, s, v). Construction checks only types and
    sizes; :meth:`check` applies the rules.
    """

    job: bytes
    calculation: int
    offender: str
    digest: bytes
    signature: bytes
    accepted_digest: bytes
    accepted: tuple[tuple[str, bytes], ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "job", _bytes_of("job", self.job, 32))
        _count("calculation", self.calculation, 0, UINT64_MAX)
        object.__setattr__(self, "offender", _address("offender", self.offender))
        object.__setattr__(self, "digest", _bytes_of("digest", self.digest, 32))
        object.__setattr__(
            self, "signature", _bytes_of("signature", self.signature, SIGNATURE_BYTES)
        )
        object.__setattr__(
            self, "accepted_digest", _bytes_of("accepted_digest", self.accepted_digest, 32)
        )
        if not isinstance(self.accepted, tuple | list):
            raise EvidenceError(
                f"accepted must be a sequence of (address, signature) pairs, "
                f"got {type(self.accepted).__name__}"
            )
        pairs = []
        for i, pair in enumerate(self.accepted):
            if not isinstance(pair, tuple | list) or len(pair) != 2:
                raise EvidenceError(f"accepted[{i}] must be an (address, signature) pair")
            pairs.append((
                _address(f"accepted[{i}] address", pair[0]),
                _bytes_of(f"accepted[{i}] signature", pair[1], SIGNATURE_BYTES),
            ))
        pairs.sort(key=lambda p: address_bytes(p[0]))
        object.__setattr__(self, "accepted", tuple(pairs))

    @property
    def key(self) -> tuple[bytes, int, str]:
        """(job, calculation, offender): what one contradiction is about."""
        return self.job, self.calculation, self.offender

    def check(self, redundancy: int) -> None:
        """Raise `EvidenceError` unless this is a contradiction of a job with this redundancy.

        The two digests must differ, the accepted signers must be distinct, the
        offender must not be one of them, and there must be at least
        ``redundancy`` of them (as many as the vote needs to accept a result).
        """
        _count("redundancy", redundancy, 1, UINT64_MAX)
        where = f"calculation {self.calculation}"
        if self.digest == self.accepted_digest:
            raise EvidenceError(
                f"{where}: the offender signed the accepted digest itself; nothing contradicts"
            )
        signers = [address for address, _ in self.accepted]
        for previous, current in pairwise(signers):
            if previous == current:
                raise EvidenceError(f"{where}: accepted signer {current} appears more than once")
        if self.offender in signers:
            raise EvidenceError(
                f"{where}: the offender {self.offender} is among the accepted signers"
            )
        if len(signers) < redundancy:
            raise EvidenceError(
                f"{where}: {len(signers)} accepted signer(s), fewer than the job's "
                f"redundancy {redundancy}"
            )

    def struct_hash(self) -> bytes:
        """The EIP-712 ``hashStruct`` of this contradiction (see the module docstring)."""
        accepted = b"".join(
            keccak256(ACCEPTED_TYPEHASH + address_word(address) + keccak256(signature))
            for address, signature in self.accepted
        )
        return keccak256(
            CONTRADICTION_TYPEHASH
            + self.job
            + uint_word(self.calculation, 64)
            + address_word(self.offender)
            + self.digest
            + keccak256(self.signature)
            + self.accepted_digest
            + keccak256(accepted)
        )


def _order_key(item: Contradiction) -> tuple[bytes, int, bytes, bytes]:
    return item.job, item.calculation, address_bytes(item.offender), item.struct_hash()


def canonical_order(contradictions: Iterable[Contradiction]) -> tuple[Contradiction, ...]:
    """The contradictions in the order the evidence hash takes them: job, calculation, offender."""
    items = list(contradictions)
    for i, item in enumerate(items):
        if not isinstance(item, Contradiction):
            raise EvidenceError(f"contradictions[{i}] must be a Contradiction, "
                                f"got {type(item).__name__}")
    return tuple(sorted(items, key=_order_key))


def evidence_hash(contradictions: Iterable[Contradiction]) -> bytes:
    """The 32-byte ``SlashOrder.evidence`` for a set of contradictions, in any order given."""
    items = canonical_order(contradictions)
    if not items:
        raise EvidenceError("evidence needs at least one contradiction")
    array = keccak256(b"".join(item.struct_hash() for item in items))
    return keccak256(EVIDENCE_TYPEHASH + array)


@dataclass(frozen=True)
class SlashPolicy:
    """When contradictions justify a committee slash order, and how much it may take.

    An order needs ``min_contradictions`` contradictions by its offender on
    distinct calculations; it may take at most ``slash_bps`` of the offender's
    slashable stake (active plus unbonding), and never more than
    ``max_amount`` when one is set.
    """

    min_contradictions: int = DEFAULT_MIN_CONTRADICTIONS
    slash_bps: int = DEFAULT_SLASH_BPS
    max_amount: int | None = None

    def __post_init__(self) -> None:
        _count("min_contradictions", self.min_contradictions, 1, 1 << 16)
        _count("slash_bps", self.slash_bps, 1, BPS)
        if self.max_amount is not None:
            _count("max_amount", self.max_amount, 1, UINT256_MAX)

    def allowed_amount(self, slashable: int) -> int:
        """The most an order may take from an offender with this much slashable stake."""
        _count("slashable stake", slashable, 0, UINT256_MAX)
        amount = slashable * self.slash_bps // BPS
        return amount if self.max_amount is None else min(amount, self.max_amount)

    def check_amount(self, amount: int, slashable: int) -> None:
        """Raise `EvidenceError` unless `amount` is a positive amount the policy allows."""
        _count("amount", amount, 0, UINT256_MAX)
        allowed = self.allowed_amount(slashable)
        if allowed == 0:
            raise EvidenceError("the offender has nothing this policy may slash "
                                f"(slashable stake {slashable})")
        if amount == 0:
            raise EvidenceError("the amount is zero")
        if amount > allowed:
            cap = "" if self.max_amount is None else f", capped at {self.max_amount}"
            raise EvidenceError(
                f"the amount {amount} exceeds the {allowed} allowed: {self.slash_bps} bps of "
                f"the offender's slashable stake {slashable}{cap}"
            )


@dataclass(frozen=True)
class SlashCase:
    """Contradictions that together justify one slash order against one offender in one job."""

    job: bytes
    offender: str
    contradictions: tuple[Contradiction, ...]
    evidence: bytes


def build_case(
    contradictions: Sequence[Contradiction], redundancy: int, policy: SlashPolicy
) -> SlashCase:
    """Check contradictions against each other and the policy; the case they make, or why not.

    Raises `EvidenceError` when a contradiction breaks a rule (`Contradiction.check`),
    when they name different jobs or offenders, when two share a calculation,
    or when there are fewer than the policy's minimum.
    """
    if not isinstance(policy, SlashPolicy):
        raise EvidenceError(f"policy must be a SlashPolicy, got {type(policy).__name__}")
    items = canonical_order(contradictions)
    if not items:
        raise EvidenceError("no contradictions given")
    first = items[0]
    seen: set[int] = set()
    for item in items:
        if item.job != first.job:
            raise EvidenceError(f"contradictions name two jobs (0x{first.job.hex()} and "
                                f"0x{item.job.hex()}); an order is about one job")
        if item.offender != first.offender:
            raise EvidenceError(f"contradictions name two offenders ({first.offender} and "
                                f"{item.offender}); an order is about one worker")
        if item.calculation in seen:
            raise EvidenceError(f"calculation {item.calculation} appears more than once")
        seen.add(item.calculation)
        item.check(redundancy)
    if len(items) < policy.min_contradictions:
        raise EvidenceError(
            f"{len(items)} contradiction(s) on distinct calculations; an order needs at least "
            f"{policy.min_contradictions}"
        )
    return SlashCase(first.job, first.offender, items, evidence_hash(items))
