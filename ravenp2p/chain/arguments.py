"""Contract call arguments checked before anything is signed or sent, and the EIP-712
signatures a node gives as an account (results, slash orders).

Shared by every `Chain`: `Web3Chain` and the simulator's `ModelChain` refuse the
same malformed argument with the same `ValueError`, and sign the same digests.
"""

from __future__ import annotations

from consensus.abi import UINT256_MAX
from consensus.eip712 import Domain, result_digest, slash_order_digest, to_eth_signature
from ravenp2p.identity import NodeIdentity

UINT64_MAX = 2**64 - 1


def uint_arg(name: str, value: int, maximum: int = UINT256_MAX) -> int:
    """An ABI unsigned integer argument; ValueError naming it when out of range."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {type(value).__name__}")
    if not 0 <= value <= maximum:
        raise ValueError(f"{name} must be between 0 and {maximum}, got {value}")
    return value


def bytes32_arg(name: str, value: bytes) -> bytes:
    """A `bytes32` argument."""
    if not isinstance(value, bytes | bytearray) or len(value) != 32:
        got = len(value) if isinstance(value, bytes | bytearray) else type(value).__name__
        raise ValueError(f"{name} must be 32 bytes, got {got}")
    return bytes(value)


def signature_arg(name: str, value: bytes) -> bytes:
    """A 65-byte signature argument (r || s || v)."""
    if not isinstance(value, bytes | bytearray) or len(value) != 65:
        got = len(value) if isinstance(value, bytes | bytearray) else type(value).__name__
        raise ValueError(f"{name} must be a 65-byte signature, got {got}")
    return bytes(value)


def sign_result(
    identity: NodeIdentity, domain: Domain, job_id: bytes, calculation: int, digest: bytes
) -> bytes:
    """`identity`'s EIP-712 `Result` signature (65 bytes, v 27/28) in the registry's domain.

    Two of these over different digests for one calculation are the evidence
    `slash_equivocation` takes.
    """
    message = result_digest(
        domain,
        bytes32_arg("job_id", job_id),
        uint_arg("calculation", calculation, UINT64_MAX),
        bytes32_arg("digest", digest),
    )
    return to_eth_signature(identity.sign_digest(message))


def sign_slash_order(
    identity: NodeIdentity, domain: Domain, offender: str, amount: int, evidence: bytes,
    epoch: int,
) -> bytes:
    """`identity`'s EIP-712 `SlashOrder` signature (65 bytes, v 27/28) as committee member;
    `offender` must be a checksummed address."""
    message = slash_order_digest(
        domain, offender, uint_arg("amount", amount), bytes32_arg("evidence", evidence),
        uint_arg("epoch", epoch),
    )
    return to_eth_signature(identity.sign_digest(message))
