"""Length-prefixed frames on a `Stream`: the one way roles put messages on streams."""

from __future__ import annotations

import struct

from ravenp2p.network.base import NetworkError, Stream

_LENGTH = struct.Struct(">I")


class FrameError(NetworkError):
    """A frame was cut short or is larger than the reader allows."""


async def read_exactly(stream: Stream, n: int) -> bytes:
    """Exactly `n` bytes from `stream`; `FrameError` if it ends first."""
    parts: list[bytes] = []
    have = 0
    while have < n:
        chunk = await stream.read(min(n - have, 1 << 20))
        if not chunk:
            raise FrameError(f"stream ended after {have} of {n} bytes")
        parts.append(chunk)
        have += len(chunk)
    return b"".join(parts)


async def write_frame(stream: Stream, payload: bytes) -> None:
    """Write a 4-byte big-endian length, then `payload`."""
    await stream.write(_LENGTH.pack(len(payload)) + payload)


async def read_frame(stream: Stream, max_bytes: int) -> bytes:
    """Read one frame written by `write_frame`, refusing one longer than `max_bytes`."""
    (length,) = _LENGTH.unpack(await read_exactly(stream, _LENGTH.size))
    if length > max_bytes:
        raise FrameError(f"a frame of {length} bytes exceeds the limit of {max_bytes}")
    return await read_exactly(stream, length)
