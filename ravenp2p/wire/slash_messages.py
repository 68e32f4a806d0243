"""Messages of a committee slash order: the request to co-sign it and each member's answer.

A committee member that holds contradictions against a worker (see
`consensus.evidence`) asks the other members of the order's epoch committee
to co-sign a `SlashOrder` with a `SlashRequest`; each member checks the
evidence itself (the results are fetched by digest from the requesting peer)
and answers with a `SlashSignature`: its EIP-712 signature of the order, or a
refusal with the reason. Peer ids identify workers, so each member derives
their addresses itself.
"""

from __future__ import annotations

from dataclasses import dataclass

from ravenp2p.wire.errors import WireError
from ravenp2p.wire.job_messages import DIGEST_PATTERN, MAX_WORKERS_PER_CALCULATION
from ravenp2p.wire.messages import PEER_ID_PATTERN
from ravenp2p.wire.schema import Message, constrained, register

MAX_CONTRADICTIONS_PER_ORDER = 64
"""Bounds the work one request asks of a member: two result blobs per contradiction."""
AMOUNT_PATTERN = r"[1-9][0-9]{0,77}"
"""A positive uint256 in decimal (amounts exceed the wire's 64-bit integers)."""
SIGNATURE_BYTES = 65


@register
@dataclass(frozen=True)
class AcceptedSigner(Message):
    """One worker credited for the accepted result, with its signature of that result."""

    TYPE = "slash.accepted_signer"

    worker: str = constrained(pattern=PEER_ID_PATTERN)
    signature: bytes = constrained(min_len=SIGNATURE_BYTES, max_len=SIGNATURE_BYTES)


@register
@dataclass(frozen=True)
class ContradictionRecord(Message):
    """The offender's signed result for calculation `calc` and the accepted, co-signed one.

    `digest` and `accepted_digest` are the result blobs' digests, which are
    also what the workers signed in `Result(job, calc, digest)`.
    """

    TYPE = "slash.contradiction"

    calc: int = constrained(min=0)
    digest: str = constrained(pattern=DIGEST_PATTERN)
    signature: bytes = constrained(min_len=SIGNATURE_BYTES, max_len=SIGNATURE_BYTES)
    accepted_digest: str = constrained(pattern=DIGEST_PATTERN)
    accepted: tuple[AcceptedSigner, ...] = constrained(
        min_len=1, max_len=MAX_WORKERS_PER_CALCULATION
    )


@register
@dataclass(frozen=True)
class SlashRequest(Message):
    """Asks a committee member to co-sign SlashOrder(offender, amount, evidence, epoch).

    The evidence is the contradictions' canonical hash, which the member
    computes itself; `job` is the job id (the manifest's digest, fetched from
    the requesting peer like the result blobs).
    """

    TYPE = "slash.request"

    job: str = constrained(pattern=DIGEST_PATTERN)
    offender: str = constrained(pattern=PEER_ID_PATTERN)
    epoch: int = constrained(min=0)
    amount: str = constrained(pattern=AMOUNT_PATTERN)
    contradictions: tuple[ContradictionRecord, ...] = constrained(
        min_len=1, max_len=MAX_CONTRADICTIONS_PER_ORDER
    )


@register
@dataclass(frozen=True)
class SlashSignature(Message):
    """A member's answer: its 65-byte signature of the order, or empty with the refusal's reason."""

    TYPE = "slash.signature"

    signature: bytes = constrained(max_len=SIGNATURE_BYTES, default=b"")
    reason: str = constrained(max_len=1024, default="")

    def __post_init__(self) -> None:
        if len(self.signature) not in (0, SIGNATURE_BYTES):
            raise WireError("body.signature",
                            f"must be empty or {SIGNATURE_BYTES} bytes, got {len(self.signature)}")
        if bool(self.signature) == bool(self.reason):
            raise WireError("body", "carries either a signature or a refusal's reason, not "
                            + ("both" if self.signature else "neither"))

    @property
    def signed(self) -> bool:
        """True when the member signed; False for a refusal."""
        return bool(self.signature)
