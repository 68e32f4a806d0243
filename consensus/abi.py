"""Keccak-256, EIP-55 addresses and the few Solidity ABI encodings the on-chain rules use.

Only static types appear in the contracts' hashed data (`bytes32`, `address`,
`uintN`), and each encodes as one 32-byte big-endian word, so `abi.encode(a,
b, ...)` is the concatenation of `word(a)`, `word(b)`, ... .
"""

from __future__ import annotations

from Crypto.Hash import keccak

_HEX_DIGITS = frozenset("0123456789abcdef")
UINT256_MAX = 2**256 - 1
ZERO_ADDRESS = "0x" + "00" * 20


def keccak256(data: bytes) -> bytes:
    """Ethereum's hash (the original Keccak-256, not NIST SHA3-256)."""
    return keccak.new(digest_bits=256, data=data).digest()


def _checksummed(lower_hex: str) -> str:
    digest = keccak256(lower_hex.encode("ascii")).hex()
    # Digits are unchanged by upper(), so only the hash nibble decides.
    return "0x" + "".join(
        c.upper() if h in "89abcdef" else c for c, h in zip(lower_hex, digest[:40], strict=True)
    )


def _hex_body(address: str) -> str:
    if not isinstance(address, str) or len(address) != 42 or address[:2] not in ("0x", "0X"):
        raise ValueError(f"not a 0x-prefixed 20-byte hex address: {address!r}")
    body = address[2:]
    if not set(body.lower()) <= _HEX_DIGITS:
        raise ValueError(f"not a 0x-prefixed 20-byte hex address: {address!r}")
    return body


def checksum_address(address: str) -> str:
    """The EIP-55 form of a `0x`-prefixed 20-byte hex address.

    All-lowercase and all-uppercase addresses carry no checksum and are
    accepted as they are; a mixed-case address must already be correctly
    checksummed, since a wrong case pattern usually means a mistyped address.
    """
    body = _hex_body(address)
    result = _checksummed(body.lower())
    if body != result[2:] and body not in (body.lower(), body.upper()):
        raise ValueError(f"address has an invalid EIP-55 checksum: {address!r}")
    return result


def address_bytes(address: str) -> bytes:
    """The 20 bytes of an address given as EIP-55 or single-case hex."""
    body = _hex_body(address)
    if body not in (body.lower(), body.upper()):
        checksum_address(address)
    return bytes.fromhex(body)


def uint_word(value: int, bits: int = 256) -> bytes:
    """`abi.encode(uintN value)`: one 32-byte big-endian word; refuses values out of range."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"uint{bits} must be an int, got {type(value).__name__}")
    if not 0 <= value < 1 << bits:
        raise ValueError(f"value {value} does not fit in uint{bits}")
    return value.to_bytes(32, "big")


def bytes32_word(value: bytes, name: str = "bytes32") -> bytes:
    """`abi.encode(bytes32 value)`: the value itself, which must be exactly 32 bytes."""
    if not isinstance(value, bytes | bytearray) or len(value) != 32:
        length = len(value) if isinstance(value, bytes | bytearray) else type(value).__name__
        raise ValueError(f"{name} must be 32 bytes, got {length}")
    return bytes(value)


def address_word(address: str) -> bytes:
    """`abi.encode(address a)`: the 20 address bytes, left-padded with zeros to 32."""
    return b"\x00" * 12 + address_bytes(address)
