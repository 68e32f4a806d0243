"""The job manifest: everything a peer needs to take part in a job, as one signed-off blob.

The requester writes it: the job spec (with the model chosen, when it was
`auto`), what the data looks like, the list of shards (digest, size, chunk
digests) and the digest of the initial weights, and, for a paid job, the chain deployment that
holds its escrow (results are signed in that deployment's EIP-712 domain). It travels as canonical
msgpack bytes, so it is itself a content-addressed blob: the job id *is* the
manifest's sha256, and nobody can change a job without changing its id.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import msgpack

from ravenp2p.chain.base import Deployment
from ravenp2p.training.datasets import DataInfo, DatasetError
from ravenp2p.training.spec import JobSpec, JobSpecError
from ravenp2p.training.tensors import digest_of
from ravenp2p.wire.job_messages import DIGEST_PATTERN

MANIFEST_VERSION = 1
MAX_MANIFEST_BYTES = 16 * 1024 * 1024
MAX_SHARDS = 100_000
MAX_SHARD_BYTES = 256 * 1024 * 1024

_KEYS = ("version", "spec", "data", "shards", "initial_weights", "requester",
         "holdout_samples", "chunk_size", "created_ms", "chain")


class ManifestError(ValueError):
    """A manifest is malformed; the message names the field."""


@dataclass(frozen=True)
class ShardRef:
    """One dataset shard: its digest, its size and the digests of its chunks."""

    digest: str
    size: int
    chunks: tuple[str, ...]


@dataclass(frozen=True)
class JobManifest:
    """A job as every peer sees it; `job_id` is the digest of `encode()`."""

    spec: JobSpec
    data: DataInfo
    shards: tuple[ShardRef, ...]
    initial_weights: str
    requester: str
    holdout_samples: int
    chunk_size: int
    created_ms: int
    chain: Deployment | None = None
    """Where the job's escrow lives; None for an unpaid job (no chain)."""

    def encode(self) -> bytes:
        """Canonical msgpack bytes (fixed key order, no floats reformatted)."""
        body = {
            "version": MANIFEST_VERSION,
            "spec": self.spec.to_dict(),
            "data": self.data.to_dict(),
            "shards": [[s.digest, s.size, list(s.chunks)] for s in self.shards],
            "initial_weights": self.initial_weights,
            "requester": self.requester,
            "holdout_samples": self.holdout_samples,
            "chunk_size": self.chunk_size,
            "created_ms": self.created_ms,
            "chain": None if self.chain is None else [
                self.chain.chain_id, self.chain.token, self.chain.registry, self.chain.escrow,
            ],
        }
        return msgpack.packb(body, use_bin_type=True)

    @property
    def job_id(self) -> str:
        return digest_of(self.encode())

    def shard(self, digest: str) -> ShardRef | None:
        """The shard with this digest, if the job has it."""
        for ref in self.shards:
            if ref.digest == digest:
                return ref
        return None

    @classmethod
    def decode(cls, data: bytes) -> JobManifest:
        """Parse and validate manifest bytes; `ManifestError` names what is wrong."""
        if len(data) > MAX_MANIFEST_BYTES:
            raise ManifestError(f"manifest: {len(data)} bytes, more than {MAX_MANIFEST_BYTES}")
        try:
            body = msgpack.unpackb(data, raw=False, strict_map_key=True, max_bin_len=0)
        except Exception as exc:  # msgpack raises several unrelated types
            raise ManifestError(f"manifest: not valid msgpack ({exc})") from None
        if not isinstance(body, dict):
            raise ManifestError("manifest: must be a map")
        unknown = sorted(set(body) - set(_KEYS), key=str)
        if unknown:
            raise ManifestError(f"manifest.{unknown[0]}: unknown field")
        missing = [k for k in _KEYS if k not in body]
        if missing:
            raise ManifestError(f"manifest.{missing[0]}: missing")
        if body["version"] != MANIFEST_VERSION:
            raise ManifestError(f"manifest.version: unsupported version {body['version']!r}")
        try:
            spec = JobSpec.from_dict(body["spec"])
        except JobSpecError as exc:
            raise ManifestError(f"manifest.spec.{exc.field}: {exc.reason}") from None
        try:
            info = DataInfo.from_dict(body["data"])
        except DatasetError as exc:
            raise ManifestError(f"manifest.data: {exc}") from None
        manifest = cls(
            spec=spec,
            data=info,
            shards=_shards(body["shards"]),
            initial_weights=_digest("manifest.initial_weights", body["initial_weights"]),
            requester=_text("manifest.requester", body["requester"], 128),
            holdout_samples=_int("manifest.holdout_samples", body["holdout_samples"], 0),
            chunk_size=_int("manifest.chunk_size", body["chunk_size"], 4096),
            created_ms=_int("manifest.created_ms", body["created_ms"], 0),
            chain=_chain(body["chain"]),
        )
        if manifest.encode() != data:
            raise ManifestError("manifest: not in canonical form")
        for i, ref in enumerate(manifest.shards):
            expected = -(-ref.size // manifest.chunk_size)
            if len(ref.chunks) != expected:
                raise ManifestError(
                    f"manifest.shards[{i}]: {len(ref.chunks)} chunk digests for {ref.size} bytes "
                    f"in chunks of {manifest.chunk_size} (expected {expected})"
                )
        return manifest


def _digest(field: str, value: Any) -> str:
    if not isinstance(value, str) or not re.fullmatch(DIGEST_PATTERN, value):
        raise ManifestError(f"{field}: must be a 64-character lowercase hex sha256 digest")
    return value


def _int(field: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ManifestError(f"{field}: must be an integer >= {minimum}")
    return value


def _text(field: str, value: Any, max_len: int) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= max_len:
        raise ManifestError(f"{field}: must be a string of 1 to {max_len} characters")
    return value


def _chain(value: Any) -> Deployment | None:
    if value is None:
        return None
    if not isinstance(value, list) or len(value) != 4:
        raise ManifestError("manifest.chain: must be [chain id, token, registry, escrow] or nil")
    try:
        return Deployment.from_dict(dict(zip(("chain_id", "token", "registry", "escrow"),
                                             value, strict=True)))
    except ValueError as exc:
        raise ManifestError(f"manifest.chain: {exc}") from None


def _shards(value: Any) -> tuple[ShardRef, ...]:
    if not isinstance(value, list) or not 0 < len(value) <= MAX_SHARDS:
        raise ManifestError(f"manifest.shards: must be a list of 1 to {MAX_SHARDS} shards")
    refs = []
    for i, item in enumerate(value):
        field = f"manifest.shards[{i}]"
        if not isinstance(item, list) or len(item) != 3 or not isinstance(item[2], list):
            raise ManifestError(f"{field}: must be [digest, size, [chunk digests]]")
        size = _int(f"{field}.size", item[1], 1)
        if size > MAX_SHARD_BYTES:
            raise ManifestError(f"{field}.size: {size} bytes, more than {MAX_SHARD_BYTES}")
        chunks = tuple(_digest(f"{field}.chunks[{j}]", c) for j, c in enumerate(item[2]))
        refs.append(ShardRef(_digest(f"{field}.digest", item[0]), size, chunks))
    if len({r.digest for r in refs}) != len(refs):
        raise ManifestError("manifest.shards: the same shard is listed twice")
    return tuple(refs)
