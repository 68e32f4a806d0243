"""The catalog of model records a node has seen: newest per publisher and name, kept on disk.

Records arrive verified (signature, schema, context) from the models topic,
the DHT or this node's own publishing. For each (publisher, name) the
catalog keeps the record with the latest `created_ms`, so a publisher
replaces a model by publishing a new version under the same name, and a
relay replaying an old record changes nothing. Both the number of entries
and the entries per publisher are bounded, so a flood of records from one
peer cannot crowd out the rest.

The catalog is saved in the node's data dir as the signed envelopes
themselves; loading re-verifies every signature (their age is not checked:
a record stays listed after its publisher's last announcement, until it has
not been heard of for `forget_after_s`).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack

from ravenp2p.identity import address_of, public_key_of_peer
from ravenp2p.market.records import ModelRecord, open_record
from ravenp2p.node.node import short
from ravenp2p.wire.envelope import Envelope, EnvelopeCodec
from ravenp2p.wire.errors import WireError

log = logging.getLogger("ravenp2p.market")

CATALOG_VERSION = 1
MAX_ENTRIES = 4096
MAX_PER_PUBLISHER = 256
FORGET_AFTER_S = 7 * 24 * 3600.0
"""A record not heard of for this long is dropped when the catalog is loaded."""
MAX_CATALOG_FILE_BYTES = 64 * 1024 * 1024
MIN_DIGEST_PREFIX = 8
"""Hex digits of a model digest that name it in a reference."""


class CatalogFull(Exception):
    """The catalog holds as many entries as it may (overall, or for one publisher)."""


@dataclass
class CatalogEntry:
    """One publisher's newest record of one model, and when this node last heard of it."""

    record: ModelRecord
    publisher: str
    raw: bytes
    """The signed envelope, as received: what is saved and re-verified."""
    heard_at: float
    """Unix time of the latest announcement of this record (or a newer one)."""

    @property
    def key(self) -> tuple[str, str]:
        return (self.publisher, self.record.name)

    @property
    def address(self) -> str:
        """The publisher's Ethereum address (derived from its peer id): where payments go."""
        return address_of(public_key_of_peer(self.publisher))

    def to_dict(self, now: float, *, own: bool = False, fetched: bool = False) -> dict[str, Any]:
        """The entry as plain JSON data: what `models list --json` prints.

        Amounts are strings (base units in `price_units`, RAVEN in `price`)
        so that no JSON reader rounds them.
        """
        record = self.record
        return {
            "name": record.name,
            "publisher": self.publisher,
            "address": self.address,
            "model": record.model,
            "size": record.size,
            "weights": record.weights,
            "job": record.job,
            "kind": record.kind,
            "task": record.task,
            "input_shape": list(record.input_shape),
            "input_dtype": record.input_dtype,
            "num_classes": record.num_classes,
            "architecture": record.architecture,
            "accuracy": record.metrics.accuracy,
            "loss": record.metrics.loss,
            "samples": record.metrics.samples,
            "rounds": record.metrics.rounds,
            "license": record.license,
            "price": record.price_raven,
            "price_units": record.price,
            "chain_id": record.chain_id,
            "token": record.token,
            "created_ms": record.created_ms,
            "description": record.description,
            "heard_s_ago": round(max(0.0, now - self.heard_at), 1),
            "own": own,
            "fetched": fetched,
        }


class Catalog:
    """Model records by (publisher, name), newest first wins; saved to `path` when given."""

    def __init__(
        self,
        path: Path | None = None,
        *,
        max_entries: int = MAX_ENTRIES,
        max_per_publisher: int = MAX_PER_PUBLISHER,
        forget_after_s: float = FORGET_AFTER_S,
    ) -> None:
        if max_entries < 1 or max_per_publisher < 1:
            raise ValueError("max_entries and max_per_publisher must be positive")
        self.path = path
        self.max_entries = max_entries
        self.max_per_publisher = max_per_publisher
        self.forget_after_s = forget_after_s
        self._entries: dict[tuple[str, str], CatalogEntry] = {}
        self._per_publisher: dict[str, int] = {}
        self.dirty = False
        """Something changed since the last `save` (a new record, or a fresher announcement)."""

    def __len__(self) -> int:
        return len(self._entries)

    def entries(self) -> list[CatalogEntry]:
        """Every entry, by name then publisher."""
        return sorted(self._entries.values(), key=lambda e: (e.record.name, e.publisher))

    def get(self, publisher: str, name: str) -> CatalogEntry | None:
        return self._entries.get((publisher, name))

    def published_by(self, publisher: str) -> list[CatalogEntry]:
        """The entries one publisher offers, by name."""
        return [e for e in self.entries() if e.publisher == publisher]

    # --- taking records in -----------------------------------------------------------------
    def offer(self, envelope: Envelope, heard_at: float) -> bool:
        """Take in a verified record; True when it is new or replaces an older one.

        An announcement of the record already held only refreshes `heard_at`;
        an older record than the one held is ignored. Raises `CatalogFull`
        when the record would be a new entry beyond the bounds, and
        `WireError` when the envelope does not hold a `ModelRecord`.
        """
        record = envelope.message
        if not isinstance(record, ModelRecord):
            raise WireError("type", f"a model record was expected, not {envelope.type}")
        key = (envelope.sender, record.name)
        held = self._entries.get(key)
        if held is not None:
            if not _newer(record, held.record):
                if record == held.record and heard_at > held.heard_at:
                    held.heard_at = heard_at
                    self.dirty = True
                return False
            self._entries[key] = CatalogEntry(record, envelope.sender, envelope.raw,
                                              max(heard_at, held.heard_at))
            self.dirty = True
            return True
        if len(self._entries) >= self.max_entries:
            raise CatalogFull(f"the catalog holds {self.max_entries} models already")
        if self._per_publisher.get(envelope.sender, 0) >= self.max_per_publisher:
            raise CatalogFull(
                f"{envelope.sender} already has {self.max_per_publisher} models in the catalog"
            )
        self._entries[key] = CatalogEntry(record, envelope.sender, envelope.raw, heard_at)
        self._per_publisher[envelope.sender] = self._per_publisher.get(envelope.sender, 0) + 1
        self.dirty = True
        return True

    # --- finding a model ---------------------------------------------------------------------
    def resolve(self, reference: object, *, prefer: str | None = None) -> CatalogEntry:
        """The entry `reference` names; ValueError (naming `model`) when none or several.

        A reference is `NAME`, `NAME@PEER` (the publisher's peer id, or a
        unique prefix of it), or a model-file digest (or a unique prefix of at
        least 8 hex digits). A bare name that several publishers use is
        ambiguous unless one of them is `prefer` (this node, say).
        """
        if not isinstance(reference, str) or not reference:
            raise ValueError("model: a model name, NAME@PEER or a model digest is needed")
        name, _, peer = reference.partition("@")
        if peer:
            found = [e for e in self._entries.values()
                     if e.record.name == name and e.publisher.startswith(peer)]
        else:
            found = [e for e in self._entries.values() if e.record.name == name]
            if not found and len(reference) >= MIN_DIGEST_PREFIX:
                lowered = reference.lower()
                found = [e for e in self._entries.values() if e.record.model.startswith(lowered)]
        if len(found) == 1:
            return found[0]
        if not found:
            raise ValueError(f"model: no model {reference!r} is in this node's catalog "
                             "(`models list` shows what it knows)")
        if prefer is not None:
            own = [e for e in found if e.publisher == prefer]
            if len(own) == 1:
                return own[0]
        publishers = ", ".join(sorted({short(e.publisher) for e in found}))
        raise ValueError(f"model: {reference!r} names {len(found)} models (published by "
                         f"{publishers}): write NAME@PEER")

    # --- on disk ---------------------------------------------------------------------------------
    def save(self) -> None:
        """Write the catalog (atomically); errors are logged, the catalog stays in memory."""
        if self.path is None:
            self.dirty = False
            return
        data = {
            "version": CATALOG_VERSION,
            "entries": [[e.raw, e.heard_at] for e in self._entries.values()],
        }
        tmp = self.path.with_suffix(".tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            tmp.write_bytes(msgpack.packb(data, use_bin_type=True))
            os.replace(tmp, self.path)
            self.dirty = False
        except OSError as exc:
            log.warning("Could not save the model catalog to %s: %s", self.path, exc)
            with contextlib.suppress(OSError):
                tmp.unlink()

    def load(self, codec: EnvelopeCodec, now: float) -> int:
        """Read the saved catalog, re-verifying every record; returns how many were kept.

        `codec` must accept old envelopes (a long `max_age_s`): a record is
        kept as long as it was heard of within `forget_after_s`. A damaged
        file or record is skipped with a warning.
        """
        if self.path is None:
            return 0
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return 0
        except OSError as exc:
            log.warning("Ignoring an unreadable model catalog %s: %s", self.path, exc)
            return 0
        entries = _saved_entries(raw, self.path)
        kept = 0
        for envelope_bytes, heard_at in entries:
            if now - heard_at > self.forget_after_s:
                continue
            try:
                envelope = open_record(codec, envelope_bytes)
                if self.offer(envelope, heard_at):
                    kept += 1
            except (WireError, CatalogFull) as exc:
                log.warning("Dropped a saved model record from %s: %s", self.path, exc)
        self.dirty = False
        return kept


def _saved_entries(raw: bytes, path: Path) -> Iterable[tuple[bytes, float]]:
    if len(raw) > MAX_CATALOG_FILE_BYTES:
        log.warning("Ignoring the model catalog %s: larger than %d bytes", path,
                    MAX_CATALOG_FILE_BYTES)
        return []
    try:
        data = msgpack.unpackb(raw, raw=False, strict_map_key=True)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        log.warning("Ignoring a damaged model catalog %s: %s", path, exc)
        return []
    if not isinstance(data, dict) or data.get("version") != CATALOG_VERSION:
        log.warning("Ignoring the model catalog %s: not a version %d catalog", path,
                    CATALOG_VERSION)
        return []
    rows = data.get("entries")
    found = []
    for row in rows if isinstance(rows, list) else []:
        if (isinstance(row, list) and len(row) == 2 and isinstance(row[0], bytes)
                and isinstance(row[1], int | float) and not isinstance(row[1], bool)):
            found.append((row[0], float(row[1])))
    return found


def _newer(candidate: ModelRecord, held: ModelRecord) -> bool:
    """Whether `candidate` replaces `held`: created later (ties: the greater model digest)."""
    if candidate.created_ms != held.created_ms:
        return candidate.created_ms > held.created_ms
    return candidate != held and candidate.model > held.model

