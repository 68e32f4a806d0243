"""The daemon's local control endpoint: a Unix socket in the data dir, for its own user only.

The socket file is created with mode 0600 inside a 0700 data dir, and every
connection's peer credentials are checked against the daemon's uid, so no other
local user can query or steer the node. One JSON object per line in each
direction: `{"op": "peers"}` -> `{"ok": true, "result": ...}` or
`{"ok": false, "error": "..."}`. Each operation is a `ControlOp`: the node
registers its own (peers, status, find_peer) and its roles add theirs (the
requester's submit, jobs, job, cancel).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

SOCKET_NAME = "control.sock"
MAX_REQUEST_BYTES = 256 * 1024
MAX_REPLY_BYTES = 64 * 1024 * 1024
REQUEST_TIMEOUT_S = 5.0
HANDLER_TIMEOUT_S = 30.0
_UNIX_PATH_MAX = 107

log = logging.getLogger("ravenp2p.control")

ControlHandler = Callable[[dict[str, Any]], Awaitable[Any]]


@dataclass(frozen=True)
class ControlOp:
    """One operation of the control endpoint: what answers it, and how long it may take."""

    handler: ControlHandler
    timeout_s: float = HANDLER_TIMEOUT_S


class ControlError(Exception):
    """The control endpoint could not be reached, or did not answer."""


class RequestRefused(Exception):
    """The node answered, refusing the request: `invalid` (bad request) or it `failed`."""

    def __init__(self, message: str, kind: str = "failed") -> None:
        super().__init__(message)
        self.kind = kind


def socket_path(data_dir: Path) -> Path:
    return Path(data_dir) / SOCKET_NAME


def check_socket_path(data_dir: Path) -> None:
    """Raise `ValueError` when the control socket path would be too long for a Unix socket."""
    path = socket_path(data_dir)
    if len(os.fsencode(path)) > _UNIX_PATH_MAX:
        raise ValueError(
            f"control socket path {path} is longer than {_UNIX_PATH_MAX} bytes; "
            "use a shorter --data-dir"
        )


def _peer_uid(sock: trio.socket.SocketType) -> int:
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return uid


async def serve_control(
    data_dir: Path,
    ops: Mapping[str, ControlOp],
    *,
    task_status: trio.TaskStatus[Path] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Answer control requests on `<data_dir>/control.sock` until cancelled."""
    check_socket_path(data_dir)
    path = socket_path(data_dir)
    if path.exists() or path.is_symlink():
        path.unlink()
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        await sock.bind(os.fspath(path))
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)
    sock.listen(16)
    listener = trio.SocketListener(sock)
    try:
        async with trio.open_nursery() as nursery:
            task_status.started(path)
            while True:
                stream = await listener.accept()
                nursery.start_soon(_serve_one, stream, ops)
    finally:
        path.unlink(missing_ok=True)
        await listener.aclose()


async def _serve_one(stream: trio.SocketStream, ops: Mapping[str, ControlOp]) -> None:
    async with stream:
        if _peer_uid(stream.socket) != os.getuid():
            log.warning("Refused a control connection from another user")
            return
        reply: dict[str, Any]
        try:
            with trio.fail_after(REQUEST_TIMEOUT_S):
                line = await _read_line(stream, MAX_REQUEST_BYTES)
            request = json.loads(line)
            if not isinstance(request, dict) or not isinstance(request.get("op"), str):
                raise ValueError('a request is a JSON object with an "op" string')
            op = ops.get(request["op"])
            if op is None:
                raise ValueError(f"unknown control operation {request['op']!r}")
            with trio.fail_after(op.timeout_s):
                reply = {"ok": True, "result": await op.handler(request)}
        except trio.TooSlowError:
            reply = {"ok": False, "error": "request timed out", "kind": "failed"}
        except RequestRefused as exc:
            reply = {"ok": False, "error": str(exc), "kind": exc.kind}
        except (ValueError, KeyError) as exc:
            text = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
            reply = {"ok": False, "error": text, "kind": "invalid"}
        except Exception as exc:  # a control request must never take the node down
            log.warning("Control request failed: %s: %s", type(exc).__name__, exc)
            reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "kind": "failed"}
        with trio.move_on_after(REQUEST_TIMEOUT_S):
            await stream.send_all(json.dumps(reply).encode() + b"\n")


async def _read_line(stream: trio.SocketStream, limit: int) -> bytes:
    buffer = bytearray()
    while b"\n" not in buffer:
        chunk = await stream.receive_some(65536)
        if not chunk:
            break
        buffer += chunk
        if len(buffer) > limit:
            raise ValueError(f"line longer than {limit} bytes")
    return bytes(buffer.split(b"\n", 1)[0])


async def control_request(
    data_dir: Path, request: dict[str, Any], timeout: float = REQUEST_TIMEOUT_S
) -> Any:
    """Send one request to the daemon running on `data_dir` and return its result.

    Raises `ControlError` when no node answers, `RequestRefused` when it refuses.
    """
    check_socket_path(data_dir)
    path = socket_path(data_dir)
    if not path.exists():
        raise ControlError(f"no node is running with data dir {data_dir} (no {path})")
    try:
        with trio.fail_after(timeout):
            stream = await trio.open_unix_socket(os.fspath(path))
            async with stream:
                await stream.send_all(json.dumps(request).encode() + b"\n")
                line = await _read_line(stream, MAX_REPLY_BYTES)
    except trio.TooSlowError:
        raise ControlError(f"the node on {data_dir} did not answer within {timeout} s") from None
    except OSError as exc:
        raise ControlError(f"cannot reach the node on {data_dir}: {exc.strerror or exc}") from None
    except trio.BrokenResourceError:
        raise ControlError(f"the node on {data_dir} closed the connection (did it stop?)") from None
    if not line:
        raise ControlError(f"the node on {data_dir} closed the connection without answering")
    reply = json.loads(line)
    if not reply.get("ok"):
        kind = "invalid" if reply.get("kind") == "invalid" else "failed"
        raise RequestRefused(str(reply.get("error", "request refused")), kind)
    return reply.get("result")
