"""Node identity: one secp256k1 key gives both the libp2p peer id and the Ethereum address.

A signed result is therefore attributable on the P2P side (peer id) and
verifiable on-chain (ecrecover yields the address). The key lives in the node's
data dir in a file readable only by its owner.
"""

from __future__ import annotations

import functools
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import coincurve
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.secp256k1 import Secp256k1PrivateKey, Secp256k1PublicKey
from libp2p.peer.id import ID

from consensus.abi import checksum_address, keccak256

KEY_FILE_NAME = "node.key"
SIGNATURE_LENGTH = 65  # r (32) || s (32) || recovery id (1), as Ethereum's ecrecover expects


class IdentityError(Exception):
    """The key file is missing, malformed or readable by others."""


def address_of(public_key: coincurve.PublicKey) -> str:
    """EIP-55 checksummed Ethereum address of a secp256k1 public key."""
    raw = keccak256(public_key.format(compressed=False)[1:])[12:].hex()
    return checksum_address("0x" + raw)


def peer_id_of(public_key: coincurve.PublicKey) -> str:
    """The libp2p peer id (base58, `16Uiu2H...`) of a secp256k1 public key."""
    return ID.from_pubkey(Secp256k1PublicKey(public_key)).to_base58()


@functools.lru_cache(maxsize=4096)
def public_key_of_peer(peer_id: str) -> coincurve.PublicKey:
    """Extract the secp256k1 public key embedded in a peer id.

    Raises `ValueError` when the id is malformed or does not embed a secp256k1 key.
    """
    try:
        key = ID.from_base58(peer_id).extract_public_key()
    except Exception as exc:  # base58 / protobuf decoding errors of several kinds
        raise ValueError(f"malformed peer id {peer_id!r}: {exc}") from exc
    if not isinstance(key, Secp256k1PublicKey):
        raise ValueError(f"peer id {peer_id!r} does not embed a secp256k1 key")
    return key.impl


def recover_signer(digest: bytes, signature: bytes) -> coincurve.PublicKey:
    """Public key that produced a 65-byte recoverable signature over a 32-byte digest."""
    if len(signature) != SIGNATURE_LENGTH:
        raise ValueError(f"signature must be {SIGNATURE_LENGTH} bytes, got {len(signature)}")
    if len(digest) != 32:
        raise ValueError("digest must be 32 bytes")
    return coincurve.PublicKey.from_signature_and_message(signature, digest, hasher=None)


@dataclass(frozen=True)
class NodeIdentity:
    """A node's private key and the names derived from it."""

    private_key: coincurve.PrivateKey

    @classmethod
    def generate(cls) -> NodeIdentity:
        return cls(coincurve.PrivateKey())

    @classmethod
    def from_secret(cls, secret: bytes) -> NodeIdentity:
        if len(secret) != 32:
            raise IdentityError(f"a secp256k1 secret is 32 bytes, got {len(secret)}")
        try:
            return cls(coincurve.PrivateKey(secret))
        except ValueError as exc:
            raise IdentityError(f"invalid secp256k1 secret: {exc}") from exc

    @property
    def public_key(self) -> coincurve.PublicKey:
        return self.private_key.public_key

    @functools.cached_property
    def peer_id(self) -> str:
        """Derived once: a node names itself in every message it sends."""
        return peer_id_of(self.public_key)

    @functools.cached_property
    def address(self) -> str:
        return address_of(self.public_key)

    def libp2p_key_pair(self) -> KeyPair:
        """The same key in py-libp2p's types, for building a host."""
        private = Secp256k1PrivateKey(self.private_key)
        return KeyPair(private, private.get_public_key())

    def sign_digest(self, digest: bytes) -> bytes:
        """65-byte recoverable signature (r || s || v with v in {0, 1}) over a 32-byte digest."""
        if len(digest) != 32:
            raise ValueError("digest must be 32 bytes")
        return self.private_key.sign_recoverable(digest, hasher=None)


def key_path(data_dir: Path) -> Path:
    return Path(data_dir) / KEY_FILE_NAME


def create_identity(data_dir: Path) -> NodeIdentity:
    """Write a fresh key into `data_dir` (mode 0600). Refuses to overwrite an existing one."""
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = key_path(data_dir)
    identity = NodeIdentity.generate()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError as exc:
        raise IdentityError(f"{path} already exists; refusing to replace a node key") from exc
    with os.fdopen(fd, "w") as handle:
        handle.write(identity.private_key.secret.hex() + "\n")
    return identity


def load_identity(data_dir: Path) -> NodeIdentity:
    """Read the node key from `data_dir`, refusing a file that others can read."""
    path = key_path(Path(data_dir))
    if not path.exists():
        raise IdentityError(f"no node key at {path}; create one with 'ravenp2p keys new'")
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise IdentityError(
            f"{path} is readable by other users (mode {mode:o}); run 'chmod 600 {path}'"
        )
    text = path.read_text().strip()
    try:
        secret = bytes.fromhex(text)
    except ValueError as exc:
        raise IdentityError(f"{path} does not hold a hex-encoded key") from exc
    return NodeIdentity.from_secret(secret)


def load_or_create_identity(data_dir: Path) -> tuple[NodeIdentity, bool]:
    """The node's key, created on first start. Returns (identity, created)."""
    if key_path(Path(data_dir)).exists():
        return load_identity(data_dir), False
    return create_identity(data_dir), True
