"""What a worker signed, kept on disk: a restart never makes it sign a second digest.

Two different digests signed for one calculation are equivocation, which the
stake registry slashes. A worker that forgot, after a restart, what it had
signed could be ordered the same calculation again (by a master that resumed
the job, say) and, computing it again with other low bits, sign a second
result. The journal is a file of msgpack records `[calc, digest, signature]`,
appended and flushed to disk before the signature leaves the node; a record
cut short by a crash is ignored, since its signature never left.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import msgpack

log = logging.getLogger("ravenp2p.worker")


class SignedJournal:
    """The digests and signatures this worker gave for one job's calculations.

    With `path` None it lives in memory only (tests, throwaway nodes).
    """

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self.signed: dict[int, tuple[str, bytes]] = self._load() if path is not None else {}

    def get(self, calc: int) -> tuple[str, bytes] | None:
        """The digest and signature given for `calc`, if any."""
        return self.signed.get(calc)

    def record(self, calc: int, digest: str, signature: bytes) -> None:
        """Remember a signature; on disk before this returns."""
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            with self.path.open("ab") as journal:
                journal.write(msgpack.packb([calc, digest, signature], use_bin_type=True))
                journal.flush()
                os.fsync(journal.fileno())
        self.signed[calc] = (digest, signature)

    def discard(self) -> None:
        """Forget the job (it ended): its calculations will not be ordered again."""
        if self.path is not None:
            self.path.unlink(missing_ok=True)
        self.signed.clear()

    def _load(self) -> dict[int, tuple[str, bytes]]:
        assert self.path is not None
        signed: dict[int, tuple[str, bytes]] = {}
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return signed
        unpacker = msgpack.Unpacker(raw=False)
        unpacker.feed(raw)
        try:
            for record in unpacker:
                calc, digest, signature = record
                if (isinstance(calc, int) and isinstance(digest, str)
                        and isinstance(signature, bytes)):
                    signed.setdefault(calc, (digest, signature))
        except (ValueError, TypeError, msgpack.ExtraData) as exc:
            log.warning("Journal %s ends in a damaged record (%s); the rest is kept",
                        self.path, exc)
        return signed
