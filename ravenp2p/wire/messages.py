"""Message types of the node layer: capability records and reliable-topic resync."""

from __future__ import annotations

from dataclasses import dataclass

from ravenp2p.wire.schema import Message, constrained, register

PEER_ID_PATTERN = r"[1-9A-HJ-NP-Za-km-z]{32,64}"
ADDRESS_PATTERN = r"0x[0-9a-fA-F]{40}"
MESSAGE_ID_BYTES = 16
MAX_SYNC_ITEMS = 4096
MAX_TOPIC_ITEM_BYTES = 1024 * 1024


@register
@dataclass(frozen=True)
class CapabilityRecord(Message):
    """What a node offers, published in the DHT and on the peers topic.

    `share` is the percentage of the device the operator lends (0 = joins the
    network but computes nothing); masters use it to weight assignments.
    """

    TYPE = "node.capability"

    address: str = constrained(pattern=ADDRESS_PATTERN)
    device: str = constrained(choices=("cpu", "cuda"))
    share: int = constrained(min=0, max=100)
    version: str = constrained(max_len=32, pattern=r"[0-9A-Za-z.+\-]+")
    addrs: tuple[str, ...] = constrained(max_len=16, item_max_len=256)
    consent: bool = constrained(default=False)


@register
@dataclass(frozen=True)
class TopicSyncRequest(Message):
    """Pull request of the reliable-topic layer: "these are the ids I hold; send me the rest"."""

    TYPE = "topics.sync_request"

    topic: str = constrained(min_len=1, max_len=256)
    have: tuple[bytes, ...] = constrained(max_len=65_536, item_max_len=MESSAGE_ID_BYTES)


@register
@dataclass(frozen=True)
class TopicSyncResponse(Message):
    """Envelopes the requester lacked, each still individually signed by its publisher."""

    TYPE = "topics.sync_response"

    topic: str = constrained(min_len=1, max_len=256)
    messages: tuple[bytes, ...] = constrained(
        max_len=MAX_SYNC_ITEMS, item_max_len=MAX_TOPIC_ITEM_BYTES
    )
    more: bool = constrained(default=False)
