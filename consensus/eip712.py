"""EIP-712 digests of the messages the stake registry verifies: results and slash orders.

A signature over one of these digests is bound to one chain and one registry
deployment (the domain), so it cannot be replayed elsewhere. Signing itself
is the caller's business (the node key); this module only says what is signed.
"""

from __future__ import annotations

from dataclasses import dataclass

from consensus.abi import address_word, bytes32_word, checksum_address, keccak256, uint_word

DOMAIN_TYPE = "EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)"
RESULT_TYPE = "Result(bytes32 job,uint64 calculation,bytes32 digest)"
SLASH_ORDER_TYPE = "SlashOrder(address offender,uint256 amount,bytes32 evidence,uint256 epoch)"

DOMAIN_TYPEHASH = keccak256(DOMAIN_TYPE.encode())
RESULT_TYPEHASH = keccak256(RESULT_TYPE.encode())
SLASH_ORDER_TYPEHASH = keccak256(SLASH_ORDER_TYPE.encode())


@dataclass(frozen=True)
class Domain:
    """The registry's signing domain: one chain id and one registry address."""

    chain_id: int
    verifying_contract: str
    name: str = "ravenp2p"
    version: str = "1"

    def __post_init__(self) -> None:
        uint_word(self.chain_id)
        object.__setattr__(self, "verifying_contract", checksum_address(self.verifying_contract))

    def separator(self) -> bytes:
        """The domain separator (`_domainSeparatorV4()` of the registry)."""
        return keccak256(
            DOMAIN_TYPEHASH
            + keccak256(self.name.encode())
            + keccak256(self.version.encode())
            + uint_word(self.chain_id)
            + address_word(self.verifying_contract)
        )


def typed_data_digest(domain: Domain, struct_hash: bytes) -> bytes:
    """`keccak256("\\x19\\x01" || domainSeparator || structHash)`: what is actually signed."""
    return keccak256(b"\x19\x01" + domain.separator() + bytes32_word(struct_hash, "struct hash"))


def result_digest(domain: Domain, job: bytes, calculation: int, digest: bytes) -> bytes:
    """The digest a worker signs for its result of one calculation of a job."""
    struct_hash = keccak256(
        RESULT_TYPEHASH
        + bytes32_word(job, "job")
        + uint_word(calculation, 64)
        + bytes32_word(digest, "digest")
    )
    return typed_data_digest(domain, struct_hash)


def slash_order_digest(
    domain: Domain, offender: str, amount: int, evidence: bytes, epoch: int
) -> bytes:
    """The digest committee members sign to slash `offender` by `amount`."""
    struct_hash = keccak256(
        SLASH_ORDER_TYPEHASH
        + address_word(offender)
        + uint_word(amount)
        + bytes32_word(evidence, "evidence")
        + uint_word(epoch)
    )
    return typed_data_digest(domain, struct_hash)


SECP256K1_HALF_ORDER = 0x7FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF5D576E7357A4501DDFE92F46681B20A0


def _check_signature(signature: bytes) -> None:
    if not isinstance(signature, bytes | bytearray) or len(signature) != 65:
        length = len(signature) if isinstance(signature, bytes | bytearray) else "not bytes"
        raise ValueError(f"a signature must be 65 bytes (r || s || v), got {length}")


def to_eth_signature(signature: bytes) -> bytes:
    """`r || s || v` with the recovery id `v` in {0, 1} turned into Ethereum's {27, 28}."""
    _check_signature(signature)
    if signature[64] not in (0, 1):
        raise ValueError(f"recovery id must be 0 or 1, got {signature[64]}")
    return bytes(signature[:64]) + bytes([signature[64] + 27])


def from_eth_signature(signature: bytes) -> bytes:
    """The inverse of `to_eth_signature`: `v` in {27, 28} back to a recovery id in {0, 1}.

    Like OpenZeppelin's `ECDSA`, it refuses an `s` in the upper half of the
    curve order: that twin of a valid signature would pass here and fail
    on-chain, which would make off-chain evidence worthless.
    """
    _check_signature(signature)
    if signature[64] not in (27, 28):
        raise ValueError(f"signature v must be 27 or 28, got {signature[64]}")
    if int.from_bytes(signature[32:64], "big") > SECP256K1_HALF_ORDER:
        raise ValueError("signature s is in the upper half of the curve order (malleable form)")
    return bytes(signature[:64]) + bytes([signature[64] - 27])
