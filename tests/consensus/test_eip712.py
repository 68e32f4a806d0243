"""EIP-712 digests against an independent encoder (eth_account), and signature v conversion."""

from __future__ import annotations

import coincurve
import pytest
from eth_abi import encode
from eth_account import Account
from eth_account.messages import _hash_eip191_message, encode_typed_data
from eth_utils import keccak, to_checksum_address
from hypothesis import given, settings
from hypothesis import strategies as st

from consensus.eip712 import (
    Domain,
    from_eth_signature,
    result_digest,
    slash_order_digest,
    to_eth_signature,
)

FAST = settings(deadline=None, max_examples=40)

REGISTRY = "0x5FbDB2315678afecb367f032d93F642f64180aa3"
DOMAIN_FIELDS = [
    {"name": "name", "type": "string"},
    {"name": "version", "type": "string"},
    {"name": "chainId", "type": "uint256"},
    {"name": "verifyingContract", "type": "address"},
]

addresses = st.binary(min_size=20, max_size=20).map(lambda raw: to_checksum_address(raw))
words = st.binary(min_size=32, max_size=32)


def typed_digest(chain_id: int, primary: str, fields: list[dict[str, str]], message: dict) -> bytes:
    signable = encode_typed_data(
        full_message={
            "types": {"EIP712Domain": DOMAIN_FIELDS, primary: fields},
            "primaryType": primary,
            "domain": {
                "name": "ravenp2p",
                "version": "1",
                "chainId": chain_id,
                "verifyingContract": REGISTRY,
            },
            "message": message,
        }
    )
    return bytes(_hash_eip191_message(signable))


def test_domain_separator_known_answer() -> None:
    type_hash = keccak(
        b"EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)"
    )
    expected = keccak(
        encode(
            ["bytes32", "bytes32", "bytes32", "uint256", "address"],
            [type_hash, keccak(b"ravenp2p"), keccak(b"1"), 31337, REGISTRY],
        )
    )
    assert Domain(31337, REGISTRY).separator() == expected
    assert Domain(31337, REGISTRY.lower()).separator() == expected
    assert Domain(31338, REGISTRY).separator() != expected


@FAST
@given(st.integers(1, 2**64), words, st.integers(0, 2**64 - 1), words)
def test_result_digest_matches_eth_account(
    chain_id: int, job: bytes, calculation: int, digest: bytes
) -> None:
    fields = [
        {"name": "job", "type": "bytes32"},
        {"name": "calculation", "type": "uint64"},
        {"name": "digest", "type": "bytes32"},
    ]
    message = {"job": job, "calculation": calculation, "digest": digest}
    expected = typed_digest(chain_id, "Result", fields, message)
    assert result_digest(Domain(chain_id, REGISTRY), job, calculation, digest) == expected


@FAST
@given(st.integers(1, 2**64), addresses, st.integers(0, 2**256 - 1), words, st.integers(0, 10**9))
def test_slash_order_digest_matches_eth_account(
    chain_id: int, offender: str, amount: int, evidence: bytes, epoch: int
) -> None:
    fields = [
        {"name": "offender", "type": "address"},
        {"name": "amount", "type": "uint256"},
        {"name": "evidence", "type": "bytes32"},
        {"name": "epoch", "type": "uint256"},
    ]
    message = {"offender": offender, "amount": amount, "evidence": evidence, "epoch": epoch}
    expected = typed_digest(chain_id, "SlashOrder", fields, message)
    domain = Domain(chain_id, REGISTRY)
    assert slash_order_digest(domain, offender.lower(), amount, evidence, epoch) == expected


def test_signature_v_conversion_round_trips_through_ethereum_recovery() -> None:
    key = coincurve.PrivateKey(keccak(b"eip712 test key"))
    account = Account.from_key(key.secret)
    digest = result_digest(Domain(31337, REGISTRY), b"\x07" * 32, 3, b"\x09" * 32)
    raw = key.sign_recoverable(digest, hasher=None)  # r || s || recovery id (0 or 1)
    eth_signature = to_eth_signature(raw)
    assert eth_signature[64] in (27, 28)
    assert Account._recover_hash(digest, signature=eth_signature) == account.address
    assert from_eth_signature(eth_signature) == raw
    assert eth_signature == bytes(Account.unsafe_sign_hash(digest, key.secret).signature)


def test_bad_input_is_refused() -> None:
    domain = Domain(1, REGISTRY)
    with pytest.raises(ValueError, match="uint64"):
        result_digest(domain, b"\x00" * 32, 2**64, b"\x00" * 32)
    with pytest.raises(ValueError, match="job must be 32 bytes"):
        result_digest(domain, b"\x00" * 31, 0, b"\x00" * 32)
    with pytest.raises(ValueError, match="evidence must be 32 bytes"):
        slash_order_digest(domain, REGISTRY, 1, b"", 0)
    with pytest.raises(ValueError, match="checksum"):
        Domain(1, REGISTRY.replace("F", "f", 1))
    with pytest.raises(ValueError, match="65 bytes"):
        to_eth_signature(b"\x00" * 64)
    with pytest.raises(ValueError, match="recovery id must be 0 or 1"):
        to_eth_signature(b"\x00" * 64 + b"\x1b")
    with pytest.raises(ValueError, match="v must be 27 or 28"):
        from_eth_signature(b"\x00" * 64 + b"\x01")
