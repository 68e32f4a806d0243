"""A content-addressed blob store: bytes named by the sha256 of their contents.

Weights, dataset shards and gradients are kept here under their digest (64
lowercase hex characters, see `ravenp2p.training.tensors.digest_of`). The store
lives in a folder, or in memory when no folder is given (tests, simulations).

On disk a blob is the file `<root>/<first two hex digits>/<digest>`, written to
a temporary file in the same folder and moved into place with `os.replace`, so
a reader never sees half a blob; files are created 0600 and folders 0700. A
file whose bytes no longer hash to its name (disk fault, tampering, a crash
mid-write on a filesystem that reorders) is deleted when `get` or `verify`
notices, and from then on reported as missing.

With `max_bytes` set, the least recently used blobs are evicted to make room
for new ones, except pinned blobs: `pin`/`unpin` are counted, so two roles that
both need a blob each pin it once and unpin it once. Recency is tracked in
memory; a store opened on an existing folder starts from the files'
modification times.

Every method is safe to call from worker threads (`trio.to_thread`) as well as
from the event loop: index updates happen under a lock.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import secrets
import threading
from collections import Counter, OrderedDict
from pathlib import Path

from ravenp2p.training.tensors import DIGEST_PATTERN, digest_of

__all__ = ["BlobStore", "StoreFullError", "check_digest", "chunk_digests"]

logger = logging.getLogger("ravenp2p.data")

_DIGEST_RE = re.compile(DIGEST_PATTERN)
_TMP_SUFFIX = ".tmp"
_READ_PIECE = 1 << 20  # bytes per read while verifying a file


class StoreFullError(Exception):
    """A blob does not fit: `max_bytes` is reached and everything left is pinned."""


def check_digest(digest: object, what: str = "digest") -> str:
    """Return `digest` if it is 64 lowercase hex characters; ValueError naming `what` otherwise.

    Runs before a digest is ever used in a path, so names like "../x" never
    reach the filesystem.
    """
    if not isinstance(digest, str):
        raise ValueError(f"{what} must be a str of 64 lowercase hex digits, got {type(digest)}")
    if _DIGEST_RE.fullmatch(digest) is None:
        shown = digest if len(digest) <= 80 else digest[:77] + "..."
        raise ValueError(f"{what} must be 64 lowercase hex digits (a sha256), got {shown!r}")
    return digest


def chunk_digests(data: bytes | bytearray | memoryview, chunk_size: int) -> list[str]:
    """The sha256 (hex) of each `chunk_size` piece of `data`; the last piece may be short.

    Empty data has no chunks. Lets a receiver check a blob piece by piece
    before it has all of it.
    """
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    view = memoryview(data).cast("B")
    return [digest_of(view[i : i + chunk_size]) for i in range(0, len(view), chunk_size)]


class BlobStore:
    """Content-addressed blobs in a folder (in memory when root is None), named by sha256.

    Missing blobs read as None (`get`, `size`) or raise KeyError (`read`);
    malformed digests raise ValueError everywhere.
    """

    def __init__(self, root: Path | None = None, *, max_bytes: int | None = None) -> None:
        if max_bytes is not None and (
            isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0
        ):
            raise ValueError(f"max_bytes must be None or an int >= 0, got {max_bytes!r}")
        self.root = Path(root) if root is not None else None
        self.max_bytes = max_bytes
        self._lock = threading.RLock()
        self._index: OrderedDict[str, int] = OrderedDict()  # digest -> size, oldest use first
        self._memory: dict[str, bytes] = {}
        self._pins: Counter[str] = Counter()
        self._total = 0
        if self.root is not None:
            self._open_folder(self.root)
            with self._lock:
                self._make_room(0)

    # --- reading ------------------------------------------------------------------------
    def has(self, digest: str) -> bool:
        """Whether the blob is in the store (as far as the index knows)."""
        check_digest(digest)
        with self._lock:
            return digest in self._index

    def size(self, digest: str) -> int | None:
        """The blob's length in bytes, or None when it is not here."""
        check_digest(digest)
        with self._lock:
            return self._index.get(digest)

    def get(self, digest: str) -> bytes | None:
        """The whole blob, checked against its digest; None when missing or found corrupt."""
        check_digest(digest)
        with self._lock:
            if digest not in self._index:
                return None
            if self.root is None:
                self._index.move_to_end(digest)
                return self._memory[digest]
        try:
            data = self._path(digest).read_bytes()
        except FileNotFoundError:
            self._forget(digest, "its file disappeared")
            return None
        if digest_of(data) != digest:
            self._drop_corrupt(digest)
            return None
        with self._lock:
            if digest in self._index:
                self._index.move_to_end(digest)
        return data

    def read(self, digest: str, offset: int, length: int) -> bytes:
        """Up to `length` bytes of the blob from `offset` (fewer at its end).

        KeyError when the blob is not here; ValueError for a negative length or
        an offset outside 0..size. Partial reads are not checked against the
        digest (that needs the whole blob: see `verify`); the blob protocol
        checks every chunk at the receiver.
        """
        check_digest(digest)
        _check_count(offset, "offset")
        _check_count(length, "length")
        with self._lock:
            size = self._index.get(digest)
            if size is None:
                raise KeyError(f"blob {digest} is not in the store")
            if offset > size:
                raise ValueError(f"offset {offset} is past the end of blob {digest} ({size} bytes)")
            self._index.move_to_end(digest)
            if self.root is None:
                return self._memory[digest][offset : offset + length]
        try:
            with self._path(digest).open("rb") as fh:
                fh.seek(offset)
                return fh.read(length)
        except FileNotFoundError:
            self._forget(digest, "its file disappeared")
            raise KeyError(f"blob {digest} is not in the store") from None

    def verify(self, digest: str) -> bool:
        """Re-hash the stored blob; a corrupt one is deleted. True when it is here and intact."""
        check_digest(digest)
        with self._lock:
            if digest not in self._index:
                return False
            if self.root is None:
                return True
        try:
            hasher = hashlib.sha256()
            with self._path(digest).open("rb") as fh:
                while piece := fh.read(_READ_PIECE):
                    hasher.update(piece)
        except FileNotFoundError:
            self._forget(digest, "its file disappeared")
            return False
        if hasher.hexdigest() != digest:
            self._drop_corrupt(digest)
            return False
        return True

    def digests(self) -> list[str]:
        """Digests of every blob in the store, sorted."""
        with self._lock:
            return sorted(self._index)

    @property
    def total_bytes(self) -> int:
        """Sum of the sizes of the blobs in the store."""
        with self._lock:
            return self._total

    # --- writing ------------------------------------------------------------------------
    def put(self, data: bytes | bytearray | memoryview) -> str:
        """Store `data` and return its digest; storing the same bytes again changes nothing."""
        data = bytes(data)
        digest = digest_of(data)
        self._store(digest, data)
        return digest

    def put_verified(self, digest: str, data: bytes | bytearray | memoryview) -> None:
        """Store `data` under `digest`; ValueError (nothing stored) if the bytes do not match."""
        check_digest(digest)
        data = bytes(data)
        actual = digest_of(data)
        if actual != digest:
            raise ValueError(
                f"data does not match digest {digest}: its {len(data)} bytes hash to {actual}"
            )
        self._store(digest, data)

    def delete(self, digest: str) -> None:
        """Remove the blob if present (pins stay: they protect it if it comes back)."""
        check_digest(digest)
        with self._lock:
            self._remove(digest)

    # --- pins ---------------------------------------------------------------------------
    def pin(self, digest: str) -> None:
        """Protect the blob from eviction (counted; the blob need not be here yet)."""
        check_digest(digest)
        with self._lock:
            self._pins[digest] += 1

    def unpin(self, digest: str) -> None:
        """Undo one `pin`; ValueError when the digest is not pinned."""
        check_digest(digest)
        with self._lock:
            count = self._pins.get(digest, 0)
            if count <= 0:
                raise ValueError(f"blob {digest} is not pinned")
            if count == 1:
                del self._pins[digest]
            else:
                self._pins[digest] = count - 1

    def is_pinned(self, digest: str) -> bool:
        """Whether at least one `pin` of the blob is outstanding."""
        check_digest(digest)
        with self._lock:
            return self._pins.get(digest, 0) > 0

    # --- internals ----------------------------------------------------------------------
    def _path(self, digest: str) -> Path:
        assert self.root is not None
        return self.root / digest[:2] / digest

    def _open_folder(self, root: Path) -> None:
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        found: list[tuple[int, str, int]] = []
        for sub in root.iterdir():
            if not (sub.is_dir() and len(sub.name) == 2):
                continue
            for entry in sub.iterdir():
                name = entry.name
                if name.startswith(".") and name.endswith(_TMP_SUFFIX):
                    with contextlib.suppress(OSError):  # left over from an interrupted write
                        entry.unlink()
                    continue
                if _DIGEST_RE.fullmatch(name) is None or name[:2] != sub.name:
                    continue
                try:
                    stat = entry.stat()
                except OSError:
                    continue
                found.append((stat.st_mtime_ns, name, stat.st_size))
        for _, digest, size in sorted(found):
            self._index[digest] = size
            self._total += size

    def _store(self, digest: str, data: bytes) -> None:
        with self._lock:
            if digest in self._index:
                self._index.move_to_end(digest)
                return
            self._make_room(len(data))
            if self.root is None:
                self._memory[digest] = data
            else:
                self._write_file(digest, data)
            self._index[digest] = len(data)
            self._total += len(data)

    def _write_file(self, digest: str, data: bytes) -> None:
        final = self._path(digest)
        final.parent.mkdir(mode=0o700, exist_ok=True)
        tmp = final.parent / f".{digest}.{secrets.token_hex(6)}{_TMP_SUFFIX}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            try:
                os.fchmod(fd, 0o600)  # whatever the umask
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, final)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise

    def _make_room(self, need: int) -> None:
        """Evict least recently used unpinned blobs until `need` more bytes fit (lock held)."""
        limit = self.max_bytes
        if limit is None or self._total + need <= limit:
            return
        if need > limit:
            raise StoreFullError(f"a blob of {need} bytes is larger than max_bytes={limit}")
        for digest in list(self._index):
            if self._total + need <= limit:
                return
            if self._pins.get(digest, 0) <= 0:
                logger.debug("evicting blob %s (%d bytes)", digest, self._index[digest])
                self._remove(digest)
        if self._total + need > limit:
            raise StoreFullError(
                f"no room for {need} bytes: {self._total} of max_bytes={limit} are held by "
                "pinned blobs"
            )

    def _remove(self, digest: str) -> None:
        """Drop the blob from the index and its bytes from memory or disk (lock held)."""
        size = self._index.pop(digest, None)
        if size is None:
            return
        self._total -= size
        if self.root is None:
            self._memory.pop(digest, None)
        else:
            with contextlib.suppress(FileNotFoundError):
                self._path(digest).unlink()

    def _forget(self, digest: str, why: str) -> None:
        logger.warning("blob %s dropped from the store: %s", digest, why)
        with self._lock:
            self._remove(digest)

    def _drop_corrupt(self, digest: str) -> None:
        self._forget(digest, "its bytes no longer match the digest (corrupt file deleted)")


def _check_count(value: object, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{what} must be an int >= 0, got {value!r}")
