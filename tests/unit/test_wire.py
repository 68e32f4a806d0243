"""The envelope refuses every kind of bad input with a reason naming the field."""

import contextlib
from dataclasses import dataclass

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ravenp2p.identity import NodeIdentity
from ravenp2p.wire import (
    CapabilityRecord,
    EnvelopeCodec,
    Message,
    WireError,
    WireLimits,
    constrained,
    register,
)
from ravenp2p.wire.envelope import _signing_digest

ALICE = NodeIdentity.generate()
BOB = NodeIdentity.generate()
NOW = 1_800_000_000.0


@register
@dataclass(frozen=True)
class Sample(Message):
    TYPE = "test.sample"

    text: str = constrained(max_len=10)
    count: int = constrained(min=0, max=5)
    blob: bytes = constrained(max_len=8, default=b"")


def codec(identity=BOB, now=NOW, **limits):
    return EnvelopeCodec(identity, WireLimits(**limits) if limits else None, now=lambda: now)


def capability(identity=ALICE, share=10):
    return CapabilityRecord(
        address=identity.address, device="cpu", share=share, version="0.1.0", addrs=()
    )


def forge(identity=ALICE, body=None, **fields):
    """A correctly signed envelope with arbitrary header fields."""
    header = {
        "v": 1,
        "t": Sample.TYPE,
        "c": "ctx",
        "s": identity.peer_id,
        "ts": int(NOW * 1000),
        "n": b"\x01" * 16,
        "b": msgpack.packb(body if body is not None else {"text": "hi", "count": 1}),
    }
    header.update(fields)
    digest = _signing_digest(
        header["v"], header["t"], header["c"], header["s"], header["ts"], header["n"], header["b"]
    )
    header.setdefault("sig", identity.sign_digest(digest))
    return msgpack.packb(header, use_bin_type=True)


def refused(raw, field, match, receiver=None, **kwargs):
    with pytest.raises(WireError) as info:
        (receiver or codec()).open(raw, **kwargs)
    assert info.value.field == field, str(info.value)
    assert match in info.value.reason, str(info.value)
    return info.value


def test_round_trip_carries_typed_message_and_sender():
    raw = codec(ALICE).seal(capability(), "peers")
    envelope = codec().open(raw, context="peers")
    assert envelope.message == capability()
    assert envelope.sender == ALICE.peer_id
    assert envelope.context == "peers"
    assert envelope.raw == raw


def test_truncated_and_garbage_bytes():
    raw = codec(ALICE).seal(capability(), "peers")
    refused(raw[: len(raw) // 2], "envelope", "not valid msgpack")
    refused(b"\xc1\xff\x00garbage", "envelope", "not valid msgpack")
    refused(msgpack.packb([1, 2, 3]), "envelope", "must be a map")


def test_wrong_signature():
    raw = forge(sig=ALICE.sign_digest(b"\x00" * 32))
    refused(raw, "signature", "does not match the sender")
    refused(forge(sig=b"\x00" * 65), "signature", "not a valid signature")
    refused(forge(sig=b"short"), "signature", "not a valid signature")


def test_signed_by_someone_else_than_claimed_sender():
    raw = forge(identity=ALICE, s=BOB.peer_id)
    refused(raw, "signature", "does not match the sender")


def test_sender_mismatch_with_transport_peer():
    raw = forge()
    refused(raw, "sender", "sent by", from_peer=BOB.peer_id)


def test_oversized_envelope():
    small = codec(max_envelope_bytes=1024)
    raw = forge(body={"text": "x", "count": 1, "blob": b"\x00" * 4})
    big = raw + b"\x00" * 2000
    refused(big, "envelope", "exceeds the 1024-byte limit", receiver=small)
    with pytest.raises(WireError, match="send bulk data over a stream"):
        codec(ALICE, max_envelope_bytes=1024).seal(
            CapabilityRecord(
                address=ALICE.address, device="cpu", share=1, version="1",
                addrs=tuple("/ip4/127.0.0.1/tcp/1" + "0" * 200 for _ in range(8)),
            ),
            "peers",
        )


def test_unknown_type_and_unsupported_version():
    refused(forge(t="no.such.type"), "type", "unknown message type")
    refused(forge(v=99), "version", "unsupported protocol version 99")
    refused(forge(v=True), "version", "must be an integer")


def test_replayed_nonce():
    receiver = codec()
    raw = forge()
    receiver.open(raw)
    refused(raw, "nonce", "replayed", receiver=receiver)
    # A different nonce from the same sender is fine.
    receiver.open(forge(n=b"\x02" * 16))


def test_replay_cache_forgets_only_after_the_age_window():
    clock = [NOW]
    limits = WireLimits(max_age_s=60, max_future_skew_s=5)
    receiver = EnvelopeCodec(BOB, limits, now=lambda: clock[0])
    raw = forge()
    receiver.open(raw)
    clock[0] += 50
    refused(raw, "nonce", "replayed", receiver=receiver)
    clock[0] += 20  # cache entry has expired, but so has the timestamp
    refused(raw, "timestamp", "stale", receiver=receiver)


def test_stale_and_future_timestamps():
    refused(forge(ts=int((NOW - 301) * 1000)), "timestamp", "stale")
    refused(forge(ts=int((NOW + 60) * 1000)), "timestamp", "in the future")
    codec().open(forge(ts=int((NOW + 10) * 1000)))  # small skew is tolerated


def test_context_binding():
    refused(forge(c="topic-a"), "context", "meant for 'topic-a'", context="topic-b")


def test_body_errors_name_the_field():
    refused(forge(body={"text": "x" * 11, "count": 1}), "body.text", "too long")
    refused(forge(body={"text": "x", "count": 9}), "body.count", "must be <= 5")
    refused(forge(body={"text": "x", "count": "1"}), "body.count", "must be an integer")
    refused(forge(body={"text": "x"}), "body.count", "missing")
    refused(forge(body={"text": "x", "count": 1, "evil": 1}), "body.evil", "unknown field")
    refused(forge(body=[1, 2]), "body", "must be a map")
    refused(forge(b=b"\xc1"), "body", "not valid msgpack")


def test_missing_and_extra_header_fields():
    raw = msgpack.packb({"v": 1, "t": Sample.TYPE})
    refused(raw, "body", "missing")
    good = msgpack.unpackb(forge(), raw=False)
    good["extra"] = 1
    refused(msgpack.packb(good, use_bin_type=True), "extra", "unexpected")
    good = msgpack.unpackb(forge(), raw=False)
    good["n"] = b"\x00" * 3
    refused(msgpack.packb(good, use_bin_type=True), "nonce", "16 bytes")


def test_capability_record_validation():
    with pytest.raises(WireError, match=r"body\.share: must be <= 100"):
        capability(share=150).validate()
    with pytest.raises(WireError, match=r"body\.device: must be one of"):
        CapabilityRecord(
            address=ALICE.address, device="tpu", share=1, version="1", addrs=()
        ).validate()
    with pytest.raises(WireError, match=r"body\.address: does not match"):
        CapabilityRecord(address="0x12", device="cpu", share=1, version="1", addrs=()).validate()


def test_nothing_is_remembered_from_a_forged_message():
    receiver = codec()
    forged = forge(s=BOB.peer_id)  # claims Bob, signed by Alice, same nonce as below
    refused(forged, "signature", "does not match", receiver=receiver)
    assert len(receiver.replay_cache) == 0


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2048))
def test_random_bytes_only_ever_raise_wire_error(data):
    with contextlib.suppress(WireError):
        codec().open(data)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_any_single_byte_flip_is_refused(data):
    raw = bytearray(codec(ALICE).seal(capability(), "peers"))
    index = data.draw(st.integers(0, len(raw) - 1))
    raw[index] ^= data.draw(st.integers(1, 255))
    with pytest.raises(WireError):
        codec().open(bytes(raw), context="peers")


SECP256K1_ORDER = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141


def test_a_signed_message_has_exactly_one_valid_encoding():
    raw = codec(ALICE).seal(capability(), "peers")
    fields = msgpack.unpackb(raw, raw=False)
    # Same fields, keys in another order: still signed correctly, but refused.
    reordered = msgpack.packb(dict(reversed(list(fields.items()))), use_bin_type=True)
    assert reordered != raw
    refused(reordered, "envelope", "canonical")
    # The high-S twin of a valid signature recovers the same key; it is refused too.
    sig = fields["sig"]
    s = int.from_bytes(sig[32:64], "big")
    twin = sig[:32] + (SECP256K1_ORDER - s).to_bytes(32, "big") + bytes([sig[64] ^ 1])
    refused(msgpack.packb({**fields, "sig": twin}, use_bin_type=True), "signature", "high-S")
    codec().open(raw)


def test_each_sender_has_its_own_replay_quota():
    receiver = codec(replay_entries_per_sender=3)
    for i in range(3):
        receiver.open(forge(n=bytes([i]) * 16))
    refused(forge(n=b"\x09" * 16), "sender", "more than 3 messages", receiver=receiver)
    receiver.open(forge(identity=BOB, n=b"\x09" * 16))  # others are unaffected


def test_an_invalid_body_uses_no_replay_entry():
    receiver = codec()
    refused(forge(body={"text": "x", "count": 99}), "body.count", "must be <=", receiver=receiver)
    assert len(receiver.replay_cache) == 0


def test_bytes_verified_once_are_still_checked_per_receiver():
    """Nodes in one process share the verification of identical bytes (signature, schema),
    never the checks that depend on the receiver: context, transport peer, age, replay."""
    from ravenp2p.wire.envelope import _VERIFIED

    raw = codec(ALICE).seal(capability(), context="/t")
    first = codec().open(raw, context="/t")
    assert _VERIFIED.get(raw) is first  # the second receiver takes the cached verification
    second_receiver = codec()
    assert second_receiver.open(raw, context="/t", from_peer=ALICE.peer_id).message == (
        first.message)
    with pytest.raises(WireError, match="replayed"):
        second_receiver.open(raw, context="/t")
    with pytest.raises(WireError, match="context"):
        codec().open(raw, context="/other")
    with pytest.raises(WireError, match="sender"):
        codec().open(raw, context="/t", from_peer=BOB.peer_id)
    with pytest.raises(WireError, match="timestamp"):
        codec(now=NOW + 10_000).open(raw, context="/t")
    # A forged copy differs in its bytes, so it is verified afresh and refused.
    forged = bytearray(raw)
    forged[-1] ^= 1
    with pytest.raises(WireError):
        codec().open(bytes(forged), context="/t")
