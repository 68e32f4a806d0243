"""The signed, versioned msgpack envelope every ravenp2p message travels in.

Layout (a msgpack map with exactly these keys):

    v    protocol version (int)
    t    message type (str, a registered `Message.TYPE`)
    c    context: the topic or protocol id the message is meant for (str)
    s    sender peer id (str; embeds the sender's secp256k1 public key)
    ts   sender's timestamp, milliseconds since the Unix epoch (int)
    n    nonce, 16 random bytes
    b    body: msgpack bytes of the message's fields
    sig  65-byte recoverable secp256k1 signature

The signature covers keccak256 of the msgpack array
`["ravenp2p-envelope", v, t, c, s, ts, n, b]`: a fixed field order over the
body's exact bytes, so no map ordering can change what was signed. Binding the
context stops a message signed for one topic or protocol from being replayed on
another. The same key signs on-chain data, so the digest is also checkable with
ecrecover.
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack

from ravenp2p import PROTOCOL_VERSION
from ravenp2p.identity import NodeIdentity, keccak256, public_key_of_peer, recover_signer
from ravenp2p.wire.errors import WireError
from ravenp2p.wire.schema import Message, message_class

SIGNING_DOMAIN = "ravenp2p-envelope"
_SECP256K1_HALF_ORDER = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141 // 2
NONCE_LENGTH = 16
SUPPORTED_VERSIONS = frozenset({PROTOCOL_VERSION})
FIELD_NAMES = {
    "v": "version",
    "t": "type",
    "c": "context",
    "s": "sender",
    "ts": "timestamp",
    "n": "nonce",
    "b": "body",
    "sig": "signature",
}
_KEYS = frozenset(FIELD_NAMES)


@dataclass(frozen=True)
class WireLimits:
    """Limits a node applies to every incoming envelope."""

    max_envelope_bytes: int = 4 * 1024 * 1024
    max_age_s: float = 300.0
    """Refuse envelopes whose timestamp is older than this."""
    max_future_skew_s: float = 30.0
    """Refuse envelopes stamped further than this into the future (clock skew)."""
    replay_cache_entries: int = 1_000_000
    replay_entries_per_sender: int = 50_000
    """One sender may have this many messages in the replay window (~150/s sustained)."""

    def __post_init__(self) -> None:
        if self.max_envelope_bytes < 1024:
            raise ValueError("max_envelope_bytes must be at least 1024")
        if self.max_age_s <= 0 or self.max_future_skew_s < 0:
            raise ValueError("max_age_s must be positive and max_future_skew_s not negative")
        if self.replay_cache_entries < 1 or self.replay_entries_per_sender < 1:
            raise ValueError("replay_cache_entries and replay_entries_per_sender must be positive")


@dataclass(frozen=True)
class Envelope:
    """A decoded, verified envelope and its typed message."""

    message: Message
    sender: str
    context: str
    timestamp_ms: int
    nonce: bytes
    version: int = PROTOCOL_VERSION
    raw: bytes = field(default=b"", repr=False, compare=False)

    @property
    def type(self) -> str:
        return self.message.TYPE


def _signing_digest(version: int, type_: str, context: str, sender: str, ts: int,
                    nonce: bytes, body: bytes) -> bytes:
    payload = msgpack.packb([SIGNING_DOMAIN, version, type_, context, sender, ts, nonce, body])
    return keccak256(payload)


class ReplayCache:
    """Remembers (sender, nonce) pairs until their timestamps can no longer pass the window.

    Each sender has a quota of entries, so one chatty or hostile peer exhausts
    its own allowance rather than the node's.
    """

    def __init__(self, ttl_s: float, max_entries: int, max_per_sender: int) -> None:
        self._ttl = ttl_s
        self._max = max_entries
        self._max_per_sender = max_per_sender
        self._entries: OrderedDict[tuple[str, bytes], float] = OrderedDict()
        self._per_sender: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def check_and_add(self, sender: str, nonce: bytes, now: float) -> None:
        self._expire(now)
        key = (sender, nonce)
        if key in self._entries:
            raise WireError("nonce", "replayed: this (sender, nonce) was already accepted")
        held = self._per_sender.get(sender, 0)
        if held >= self._max_per_sender:
            raise WireError(
                "sender", f"more than {self._max_per_sender} messages in {self._ttl:.0f} s"
            )
        if len(self._entries) >= self._max:
            raise WireError("envelope", "replay cache is full; try again shortly")
        self._entries[key] = now + self._ttl
        self._per_sender[sender] = held + 1

    def _expire(self, now: float) -> None:
        entries = self._entries
        while entries:
            key, expiry = next(iter(entries.items()))
            if expiry > now:
                break
            del entries[key]
            sender = key[0]
            left = self._per_sender[sender] - 1
            if left:
                self._per_sender[sender] = left
            else:
                del self._per_sender[sender]


VERIFIED_CACHE_ENTRIES = 4096
VERIFIED_CACHE_MAX_BYTES = 64 * 1024
_VERIFIED: OrderedDict[bytes, Envelope] = OrderedDict()
"""Envelopes whose signature, canonical form and body schema this process has verified, by
their exact bytes: a pure function of the bytes, so any codec may reuse it. Pays off where
one process runs many nodes (devnet, simulator) that each receive the same gossip; the
checks that depend on the receiver (context, transport peer, age, replay) are always made."""


class EnvelopeCodec:
    """Seals outgoing messages and opens incoming ones for one node.

    `open` performs, in order: size limit, msgpack structure, version, type,
    sender, timestamp window, signature, replay cache, body schema. Each failure
    raises `WireError` naming the field and the reason; nothing is remembered
    from a message that fails before its signature is verified.
    """

    def __init__(
        self,
        identity: NodeIdentity,
        limits: WireLimits | None = None,
        now: Callable[[], float] = time.time,
    ) -> None:
        self.identity = identity
        self.limits = limits or WireLimits()
        self._now = now
        self._peer_id = identity.peer_id
        self.replay_cache = ReplayCache(
            self.limits.max_age_s + self.limits.max_future_skew_s,
            self.limits.replay_cache_entries,
            self.limits.replay_entries_per_sender,
        )

    def seal(self, message: Message, context: str) -> bytes:
        """Validate, sign and encode `message` for `context` (a topic or protocol id)."""
        message.validate()
        body = msgpack.packb(message.to_body(), use_bin_type=True)
        ts = int(self._now() * 1000)
        nonce = os.urandom(NONCE_LENGTH)
        digest = _signing_digest(
            PROTOCOL_VERSION, message.TYPE, context, self._peer_id, ts, nonce, body
        )
        raw = _pack_envelope(
            PROTOCOL_VERSION, message.TYPE, context, self._peer_id, ts, nonce, body,
            self.identity.sign_digest(digest),
        )
        if len(raw) > self.limits.max_envelope_bytes:
            raise WireError(
                "envelope",
                f"{len(raw)} bytes exceeds the {self.limits.max_envelope_bytes}-byte limit; "
                "send bulk data over a stream",
            )
        return raw

    def open(
        self,
        raw: bytes,
        *,
        context: str | None = None,
        from_peer: str | None = None,
        check_replay: bool = True,
    ) -> Envelope:
        """Decode and verify an envelope.

        `context`, when given, must match the envelope's; `from_peer`, when given,
        is the authenticated transport peer, which must be the signer.
        """
        limits = self.limits
        if len(raw) > limits.max_envelope_bytes:
            raise WireError(
                "envelope", f"{len(raw)} bytes exceeds the {limits.max_envelope_bytes}-byte limit"
            )
        known = _VERIFIED.get(raw)
        if known is not None:
            return self._open_verified(known, context, from_peer, check_replay)
        outer = _unpack(raw, limits.max_envelope_bytes)
        if not isinstance(outer, dict):
            raise WireError("envelope", f"must be a map, got {type(outer).__name__}")
        missing = sorted(_KEYS - set(outer))
        if missing:
            raise WireError(FIELD_NAMES[missing[0]], "missing from envelope")
        extra = sorted(str(k) for k in set(outer) - _KEYS)
        if extra:
            raise WireError(extra[0], "unexpected envelope field")

        version = outer["v"]
        if isinstance(version, bool) or not isinstance(version, int):
            raise WireError("version", "protocol version must be an integer")
        if version not in SUPPORTED_VERSIONS:
            raise WireError(
                "version", f"unsupported protocol version {version} (this node speaks "
                f"{sorted(SUPPORTED_VERSIONS)})"
            )
        type_ = _expect(outer, "t", str)
        cls = message_class(type_)
        msg_context = _expect(outer, "c", str)
        if len(msg_context) > 256:
            raise WireError("context", "context longer than 256 characters")
        if context is not None and msg_context != context:
            raise WireError("context", f"meant for {msg_context!r}, received on {context!r}")
        sender = _expect(outer, "s", str)
        if len(sender) > 128:
            raise WireError("sender", "sender longer than 128 characters")
        try:
            sender_key = public_key_of_peer(sender)
        except ValueError as exc:
            raise WireError("sender", str(exc)) from None
        if from_peer is not None and sender != from_peer:
            raise WireError("sender", f"signed by {sender} but sent by {from_peer}")

        ts = _expect(outer, "ts", int)
        now = self._now()
        age = now - ts / 1000.0
        if age > limits.max_age_s:
            window = f"{limits.max_age_s:.0f} s window"
            raise WireError("timestamp", f"stale: {age:.0f} s old, older than the {window}")
        if -age > limits.max_future_skew_s:
            raise WireError(
                "timestamp", f"{-age:.0f} s in the future, beyond the allowed clock skew"
            )

        nonce = _expect(outer, "n", bytes)
        if len(nonce) != NONCE_LENGTH:
            raise WireError("nonce", f"nonce must be {NONCE_LENGTH} bytes, got {len(nonce)}")
        body_bytes = _expect(outer, "b", bytes)
        signature = _expect(outer, "sig", bytes)
        digest = _signing_digest(version, type_, msg_context, sender, ts, nonce, body_bytes)
        try:
            signer = recover_signer(digest, signature)
        except Exception as exc:  # coincurve raises several types for garbage signatures
            raise WireError("signature", f"not a valid signature ({exc})") from None
        if signer != sender_key:
            raise WireError("signature", "signature does not match the sender's key")
        if int.from_bytes(signature[32:64], "big") > _SECP256K1_HALF_ORDER:
            raise WireError("signature", "high-S form is not accepted (use the low-S twin)")
        # One signed message has exactly one valid byte string, so a relay cannot
        # mint look-alike copies (message ids are hashes of these bytes).
        canonical = _pack_envelope(
            version, type_, msg_context, sender, ts, nonce, body_bytes, signature
        )
        if canonical != raw:
            raise WireError("envelope", "not in canonical encoding")

        body = _unpack(body_bytes, limits.max_envelope_bytes, field_name="body")
        envelope = Envelope(
            message=cls.from_body(body),
            sender=sender,
            context=msg_context,
            timestamp_ms=ts,
            nonce=nonce,
            version=version,
            raw=raw,
        )
        if len(raw) <= VERIFIED_CACHE_MAX_BYTES:
            _VERIFIED[raw] = envelope
            while len(_VERIFIED) > VERIFIED_CACHE_ENTRIES:
                _VERIFIED.popitem(last=False)
        if check_replay:
            self.check_replay(envelope)
        return envelope

    def _open_verified(
        self, envelope: Envelope, context: str | None, from_peer: str | None, check_replay: bool
    ) -> Envelope:
        """The checks of `open` that depend on the call (context, peer, time, replay), for
        bytes whose signature and schema were already verified in this process."""
        if context is not None and envelope.context != context:
            raise WireError("context", f"meant for {envelope.context!r}, received on {context!r}")
        if from_peer is not None and envelope.sender != from_peer:
            raise WireError("sender", f"signed by {envelope.sender} but sent by {from_peer}")
        age = self._now() - envelope.timestamp_ms / 1000.0
        if age > self.limits.max_age_s:
            window = f"{self.limits.max_age_s:.0f} s window"
            raise WireError("timestamp", f"stale: {age:.0f} s old, older than the {window}")
        if -age > self.limits.max_future_skew_s:
            raise WireError(
                "timestamp", f"{-age:.0f} s in the future, beyond the allowed clock skew"
            )
        if check_replay:
            self.check_replay(envelope)
        return envelope

    def check_replay(self, envelope: Envelope) -> None:
        """Accept `envelope` once: a second call for the same (sender, nonce) raises `WireError`.

        For envelopes opened with `check_replay=False` (e.g. verified before a
        relay decision) when they are finally taken in.
        """
        self.replay_cache.check_and_add(envelope.sender, envelope.nonce, self._now())


def _pack_envelope(version: int, type_: str, context: str, sender: str, ts: int,
                   nonce: bytes, body: bytes, signature: bytes) -> bytes:
    """The one canonical encoding: keys in this order, minimal msgpack forms."""
    packed: bytes = msgpack.packb(
        {"v": version, "t": type_, "c": context, "s": sender, "ts": ts, "n": nonce, "b": body,
         "sig": signature},
        use_bin_type=True,
    )
    return packed


def _unpack(data: bytes, limit: int, field_name: str = "envelope") -> Any:
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            max_str_len=limit,
            max_bin_len=limit,
            max_array_len=100_000,
            max_map_len=10_000,
            max_ext_len=0,
        )
    except (msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, ValueError,
            TypeError) as exc:
        raise WireError(field_name, f"not valid msgpack ({type(exc).__name__}: {exc})") from None


def _expect(outer: dict[str, Any], key: str, kind: type) -> Any:
    value = outer[key]
    name = FIELD_NAMES[key]
    if kind is int and isinstance(value, bool):
        raise WireError(name, "must be an integer")
    if not isinstance(value, kind):
        raise WireError(name, f"must be {kind.__name__}, got {type(value).__name__}")
    return value
