"""Signed, versioned msgpack envelopes and the typed messages they carry."""

from ravenp2p.wire.envelope import Envelope, EnvelopeCodec, ReplayCache, WireLimits
from ravenp2p.wire.errors import WireError
from ravenp2p.wire.messages import CapabilityRecord, TopicSyncRequest, TopicSyncResponse
from ravenp2p.wire.schema import Message, constrained, register

__all__ = [
    "CapabilityRecord",
    "Envelope",
    "EnvelopeCodec",
    "Message",
    "ReplayCache",
    "TopicSyncRequest",
    "TopicSyncResponse",
    "WireError",
    "WireLimits",
    "constrained",
    "register",
]
