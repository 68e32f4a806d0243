"""The data repository: content-addressed blobs and the protocol that moves them.

`BlobStore` keeps blobs named by their sha256; `BlobService` serves them to
peers and fetches them, chunk by chunk, verified and resumable. The wire
format is specified in docs/data-repository.md.
"""

from ravenp2p.data.blobs import (
    BLOB_NAMESPACE,
    BLOB_PROTOCOL,
    BlobError,
    BlobIntegrityError,
    BlobNotFound,
    BlobService,
    BlobStats,
    provider_key,
)
from ravenp2p.data.store import BlobStore, StoreFullError, check_digest, chunk_digests

__all__ = [
    "BLOB_NAMESPACE",
    "BLOB_PROTOCOL",
    "BlobError",
    "BlobIntegrityError",
    "BlobNotFound",
    "BlobService",
    "BlobStats",
    "BlobStore",
    "StoreFullError",
    "check_digest",
    "chunk_digests",
    "provider_key",
]
