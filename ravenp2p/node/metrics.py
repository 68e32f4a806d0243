"""Prometheus metrics of a node: a small exposition-format model and an HTTP endpoint.

`NodeMetrics.collect` reads the node's and its roles' live state at each
scrape (it keeps no counters of its own); `render` writes the text exposition format,
version 0.0.4; `serve_metrics` answers `GET /metrics` on a TCP port, loopback
by default. No client library is needed for so little.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import math
import numbers
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import trio

from ravenp2p import __version__

if TYPE_CHECKING:
    from ravenp2p.node.node import Node
    from ravenp2p.roles.master import CalculationTiming, Master
    from ravenp2p.roles.worker import Worker

log = logging.getLogger("ravenp2p.metrics")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
METRICS_PATH = "/metrics"
DEFAULT_HOST = "127.0.0.1"

MAX_REQUEST_BYTES = 8 * 1024
"""Most bytes of request line and headers a client may send."""
REQUEST_TIMEOUT_S = 10.0
"""Time a client has to send its request, and then to take the response."""
MAX_CONNECTIONS = 32
"""Connections served at once; more are answered 503 at once."""

LATENCY_BUCKETS_S = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
JOB_STATES = ("queued", "running", "done", "failed", "replaced")
"""States a master's job goes through; each is exported, so a series never vanishes."""

MetricType = Literal["counter", "gauge", "histogram"]

_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*\Z")
_LABEL = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*\Z")
_HOST_LABEL = re.compile(r"(?!-)[a-zA-Z0-9-]{1,63}(?<!-)\Z")
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9a-zA-Z-]+\Z")


# --- the exposition format ---------------------------------------------------------------------
def format_value(value: float) -> str:
    """A sample value as Prometheus writes it: integers exactly, `+Inf`, `-Inf`, `NaN`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"a metric value must be a number, not {value!r}")
    if isinstance(value, numbers.Integral):
        return str(int(value))
    value = float(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value)


def escape_label_value(value: str) -> str:
    """Escape a label value for the text format: backslash, double quote and newline."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def escape_help(text: str) -> str:
    """Escape `# HELP` text: backslash and newline."""
    return text.replace("\\", "\\\\").replace("\n", "\\n")


@dataclass(frozen=True)
class Sample:
    """One line of a metric family: full sample name, labels in order, value."""

    name: str
    labels: tuple[tuple[str, str], ...]
    value: float

    def render(self) -> str:
        if not self.labels:
            return f"{self.name} {format_value(self.value)}"
        pairs = ",".join(f'{k}="{escape_label_value(v)}"' for k, v in self.labels)
        return f"{self.name}{{{pairs}}} {format_value(self.value)}"


class Metric:
    """One metric family: name, type, help text and its samples, checked as they are added.

    Counter names end in `_total` (the family name the 0.0.4 format uses) and
    counters are finite and never negative.
    """

    def __init__(self, name: str, kind: MetricType, help: str) -> None:
        if not _NAME.match(name):
            raise ValueError(f"metric name {name!r} is not a valid Prometheus name")
        if kind not in ("counter", "gauge", "histogram"):
            raise ValueError(f"metric {name}: unknown type {kind!r}")
        if kind == "counter" and not name.endswith("_total"):
            raise ValueError(f"counter {name!r} must end in _total")
        self.name = name
        self.kind: MetricType = kind
        self.help = help
        self.samples: list[Sample] = []

    def add(
        self, value: float, labels: Mapping[str, str] | None = None, *, suffix: str = ""
    ) -> Metric:
        """Append a sample `name + suffix` with these labels; returns the metric for chaining."""
        pairs = tuple((labels or {}).items())
        for key, text in pairs:
            if not _LABEL.match(key) or key.startswith("__"):
                raise ValueError(f"metric {self.name}: {key!r} is not a valid label name")
            if not isinstance(text, str):
                raise TypeError(f"metric {self.name}: label {key} must be a string, not {text!r}")
        format_value(value)
        if self.kind == "counter" and (not value >= 0 or math.isinf(value)):
            raise ValueError(f"counter {self.name} must be finite and >= 0, not {value!r}")
        self.samples.append(Sample(self.name + suffix, pairs, value))
        return self

    def render(self) -> str:
        lines = [f"# HELP {self.name} {escape_help(self.help)}", f"# TYPE {self.name} {self.kind}"]
        lines += [sample.render() for sample in self.samples]
        return "\n".join(lines) + "\n"


def counter(name: str, help: str, value: float) -> Metric:
    """A counter family with one unlabelled sample."""
    return Metric(name, "counter", help).add(value)


def gauge(name: str, help: str, value: float, labels: Mapping[str, str] | None = None) -> Metric:
    """A gauge family with one sample."""
    return Metric(name, "gauge", help).add(value, labels)


class Histogram:
    """Cumulative observations in fixed buckets (upper bounds in ascending order)."""

    def __init__(self, bounds: Sequence[float]) -> None:
        if not bounds or list(bounds) != sorted(set(bounds)) or not all(map(math.isfinite, bounds)):
            raise ValueError(f"histogram bounds must be finite and strictly ascending: {bounds}")
        self.bounds = tuple(float(b) for b in bounds)
        self.counts = [0] * len(self.bounds)
        self.count = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[i] += 1
                break
        self.count += 1
        self.sum += value

    def metric(self, name: str, help: str) -> Metric:
        """The family: cumulative `_bucket` samples up to `le="+Inf"`, then `_sum` and `_count`."""
        family = Metric(name, "histogram", help)
        running = 0
        for bound, n in zip(self.bounds, self.counts, strict=True):
            running += n
            family.add(running, {"le": format_value(bound)}, suffix="_bucket")
        family.add(self.count, {"le": "+Inf"}, suffix="_bucket")
        family.add(self.sum, suffix="_sum")
        family.add(self.count, suffix="_count")
        return family


def render(metrics: Iterable[Metric]) -> str:
    """The text exposition format (0.0.4) of these families; a name may appear only once."""
    seen: set[str] = set()
    parts = []
    for metric in metrics:
        if metric.name in seen:
            raise ValueError(f"metric {metric.name} appears twice")
        seen.add(metric.name)
        parts.append(metric.render())
    return "".join(parts)


# --- what a node exports ---------------------------------------------------------------------
class _AcceptedLatencies:
    """Folds each accepted calculation's latency into a histogram exactly once.

    A master keeps only its most recent calculations' timings, while a
    Prometheus histogram must only grow; the timings already counted are
    remembered (by identity, for as long as the master keeps them).
    """

    def __init__(self, bounds: Sequence[float]) -> None:
        self.histogram = Histogram(bounds)
        self._counted: dict[int, CalculationTiming] = {}

    def update(self, timings: Iterable[CalculationTiming]) -> Histogram:
        counted: dict[int, CalculationTiming] = {}
        for timing in timings:
            if not timing.accepted:
                continue
            key = id(timing)
            if key not in self._counted:
                self.histogram.observe(timing.latency_s)
            # Holding the object keeps its id from being reused while it is remembered.
            counted[key] = timing
        self._counted = counted
        return self.histogram


class _RoundDurations:
    """Folds each completed round's duration into a histogram exactly once (by count)."""

    def __init__(self, bounds: Sequence[float]) -> None:
        self.histogram = Histogram(bounds)
        self._seen = 0

    def update(self, master: Master) -> Histogram:
        fresh = min(master.rounds_completed - self._seen, len(master.round_seconds))
        for seconds in master.round_seconds[len(master.round_seconds) - fresh:]:
            self.histogram.observe(seconds)
        self._seen = master.rounds_completed
        return self.histogram


class NodeMetrics:
    """The metrics of one node and the roles it runs, read from their live state at each scrape.

    A role that is not given exports nothing: a node that is no master has no
    master metrics.
    """

    def __init__(
        self, node: Node, *, worker: Worker | None = None, master: Master | None = None
    ) -> None:
        self.node = node
        self.worker = worker
        self.master = master
        self._latencies = _AcceptedLatencies(LATENCY_BUCKETS_S)
        self._rounds = _RoundDurations(LATENCY_BUCKETS_S)

    def collect(self) -> list[Metric]:
        """Every family, in a stable order."""
        metrics = self._node_metrics()
        if self.worker is not None:
            metrics += self._worker_metrics(self.worker)
        if self.master is not None:
            metrics += self._master_metrics(self.master)
        return metrics

    def _node_metrics(self) -> list[Metric]:
        node = self.node
        blobs = node.blobs.stats
        info = {"peer_id": node.peer_id, "address": node.identity.address, "version": __version__}
        return [
            gauge("ravenp2p_node_info", "This node's identity and software version.", 1, info),
            gauge("ravenp2p_peers_connected", "Peers with an open connection to this node.",
                  len(node.network.connected_peers())),
            gauge("ravenp2p_peers_known",
                  "Peers in this node's directory (verified capability records, not expired).",
                  len(node.directory)),
            counter("ravenp2p_blob_served_bytes_total",
                    "Blob bytes (shards, weights, results) sent to peers.", blobs.served_bytes),
            counter("ravenp2p_blob_fetched_bytes_total",
                    "Blob bytes received from peers.", blobs.fetched_bytes),
            counter("ravenp2p_blob_fetches_total",
                    "Blob transfers from peers completed.", blobs.fetches),
            counter("ravenp2p_blob_integrity_failures_total",
                    "Providers caught serving blob bytes that do not match their digest.",
                    blobs.integrity_failures),
        ]

    @staticmethod
    def _worker_metrics(worker: Worker) -> list[Metric]:
        stats = worker.stats
        return [
            counter("ravenp2p_worker_calculations_computed_total",
                    "Calculations this node's worker computed.", stats.computed),
            counter("ravenp2p_worker_calculations_delivered_total",
                    "Results this node's worker delivered to a master.", stats.delivered),
            counter("ravenp2p_worker_calculations_refused_total",
                    "Results a master refused from this node's worker.", stats.refused),
            counter("ravenp2p_worker_jobs_declined_total",
                    "Jobs this node's worker declined (no consent, or not a job it may join).",
                    stats.declined_jobs),
            counter("ravenp2p_worker_compute_seconds_total",
                    "Seconds this node's worker spent computing.", stats.compute_s),
            counter("ravenp2p_worker_throttled_seconds_total",
                    "Seconds this node's worker waited to stay within its share of the device.",
                    stats.throttled_s),
            counter("ravenp2p_worker_earned_base_units_total",
                    "RAVEN base units (10^-18 RAVEN) this node's worker claimed from settled jobs.",
                    stats.earned),
        ]

    def _master_metrics(self, master: Master) -> list[Metric]:
        jobs = list(master.jobs.values())
        by_state = dict.fromkeys(JOB_STATES, 0)
        for status in jobs:
            by_state[status.state] = by_state.get(status.state, 0) + 1
        states = Metric("ravenp2p_master_jobs", "gauge", "Jobs this master knows, by state.")
        for state, count in by_state.items():
            states.add(count, {"state": state})
        latencies = self._latencies.update(master.calculation_timings)
        return [
            states,
            counter("ravenp2p_master_calculations_accepted_total",
                    "Calculations accepted (R agreeing results), over this master's jobs.",
                    sum(status.calculations_accepted for status in jobs)),
            counter("ravenp2p_master_results_rejected_total",
                    "Worker results rejected (late, malformed or outvoted), over this master's "
                    "jobs.", sum(status.results_rejected for status in jobs)),
            counter("ravenp2p_master_takeovers_total",
                    "Paid jobs this node took over from a silent master.",
                    master.standby.takeovers),
            latencies.metric("ravenp2p_master_calculation_latency_seconds",
                             "Seconds from ordering a calculation to accepting it."),
            self._rounds.update(master).metric(
                "ravenp2p_master_round_seconds",
                "Seconds a round took, from its orders going out to its record published."),
        ]


# --- the HTTP endpoint -------------------------------------------------------------------------
def check_host(host: str) -> str:
    """Return `host` if it is an IP address or a host name to listen on, else `ValueError`."""
    if not isinstance(host, str) or not host:
        raise ValueError(f"{host!r} is not an IP address or host name")
    try:
        ipaddress.ip_address(host)
        return host
    except ValueError:
        pass
    if len(host) > 253 or not all(_HOST_LABEL.match(part) for part in host.split(".")):
        raise ValueError(f"{host!r} is not an IP address or host name")
    return host


def check_port(port: int) -> int:
    """Return `port` if it is a TCP port to listen on (0: any free one), else `ValueError`."""
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ValueError(f"must be a TCP port from 0 to 65535, not {port!r}")
    return port


def is_loopback(host: str) -> bool:
    """Whether `host` names this machine only."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def metrics_url(host: str, port: int) -> str:
    """The URL a scraper uses (IPv6 addresses in brackets)."""
    return f"http://[{host}]:{port}{METRICS_PATH}" if ":" in host else (
        f"http://{host}:{port}{METRICS_PATH}"
    )


_REASONS = {
    200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
    408: "Request Timeout", 431: "Request Header Fields Too Large",
    500: "Internal Server Error", 503: "Service Unavailable",
}


def _response(status: int, body: str, *, head_only: bool = False, extra: str = "") -> bytes:
    payload = body.encode()
    content_type = CONTENT_TYPE if status == 200 else "text/plain; charset=utf-8"
    header = (
        f"HTTP/1.1 {status} {_REASONS[status]}\r\n"
        f"Content-Type: {content_type}\r\n"
        f"Content-Length: {len(payload)}\r\n"
        f"{extra}Connection: close\r\n\r\n"
    )
    return header.encode() + (b"" if head_only else payload)


class _BadRequest(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


async def _read_head(stream: trio.abc.Stream, limit: int) -> bytes | None:
    """Request line and headers; None if the client closed without sending anything."""
    buffer = bytearray()
    while True:
        end = buffer.find(b"\r\n\r\n")
        if end < 0:
            end = buffer.find(b"\n\n")
        if end >= 0:
            if end > limit:
                break
            return bytes(buffer[:end])
        if len(buffer) > limit:
            break
        chunk = await stream.receive_some(4096)
        if not chunk:
            if not buffer:
                return None
            raise _BadRequest(400, "the request ended before its headers did")
        buffer += chunk
    raise _BadRequest(431, f"request headers longer than {limit} bytes")


def _parse_head(head: bytes) -> tuple[str, str]:
    """(method, path) of a well-formed HTTP/1.x request head, else `_BadRequest(400)`."""
    try:
        text = head.decode("ascii")
    except UnicodeDecodeError:
        raise _BadRequest(400, "the request is not ASCII") from None
    lines = text.replace("\r\n", "\n").split("\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not _TOKEN.match(parts[0]) or not parts[1]:
        raise _BadRequest(400, "the request line is not 'METHOD PATH HTTP/1.x'")
    method, target, version = parts
    if version not in ("HTTP/1.0", "HTTP/1.1"):
        raise _BadRequest(400, f"unsupported protocol {version[:16]!r}")
    if not target.startswith("/") or any(c <= " " or c == "\x7f" for c in target):
        raise _BadRequest(400, "the request target must be a path")
    for line in lines[1:]:
        name, colon, _value = line.partition(":")
        if not colon or not _TOKEN.match(name):
            raise _BadRequest(400, "a header line is malformed")
    return method, target.split("?", 1)[0]


@dataclass
class _Server:
    collect: Callable[[], Iterable[Metric]]
    timeout_s: float
    max_request_bytes: int
    max_connections: int
    active: int = 0

    async def handle(self, stream: trio.SocketStream) -> None:
        """Answer one request on one connection, whatever the client does."""
        self.active += 1
        try:
            if self.active > self.max_connections:
                response = _response(503, "too many connections to the metrics endpoint\n")
            else:
                response = await self._answer(stream)
            if response:
                with trio.move_on_after(self.timeout_s):
                    await stream.send_all(response)
                    await self._linger(stream)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client went away
        except Exception as exc:  # a scrape must never take the node down
            log.warning("Metrics request failed: %s: %s", type(exc).__name__, exc)
        finally:
            self.active -= 1
            await trio.aclose_forcefully(stream)

    async def _answer(self, stream: trio.SocketStream) -> bytes:
        try:
            with trio.fail_after(self.timeout_s):
                head = await _read_head(stream, self.max_request_bytes)
            if head is None:
                return b""
            method, path = _parse_head(head)
        except trio.TooSlowError:
            return _response(408, f"no complete request within {self.timeout_s:g} s\n")
        except _BadRequest as exc:
            log.debug("Bad metrics request: %s", exc)
            return _response(exc.status, f"{exc}\n")
        if method not in ("GET", "HEAD"):
            return _response(405, f"method {method} is not allowed\n", extra="Allow: GET, HEAD\r\n")
        if path != METRICS_PATH:
            return _response(404, f"only {METRICS_PATH} is served here\n",
                             head_only=method == "HEAD")
        try:
            text = render(self.collect())
        except Exception as exc:
            log.warning("Could not collect metrics: %s: %s", type(exc).__name__, exc)
            return _response(500, "metrics could not be collected\n", head_only=method == "HEAD")
        return _response(200, text, head_only=method == "HEAD")

    @staticmethod
    async def _linger(stream: trio.SocketStream) -> None:
        """Let the client read the response: closing with unread input would reset it."""
        await stream.send_eof()
        drained = 0
        while drained <= MAX_REQUEST_BYTES * 8:
            chunk = await stream.receive_some(4096)
            if not chunk:
                return
            drained += len(chunk)


async def serve_metrics(
    host: str,
    port: int,
    collect: Callable[[], Iterable[Metric]],
    *,
    timeout_s: float = REQUEST_TIMEOUT_S,
    max_request_bytes: int = MAX_REQUEST_BYTES,
    max_connections: int = MAX_CONNECTIONS,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `GET /metrics` (the text of `collect()`) on `host:port` until cancelled.

    Port 0 picks a free port; the bound port is reported through `task_status`.
    Each connection carries one request and gets `timeout_s` to send it and
    again to read the answer; bad requests are answered 400, 404, 405, 408 or
    431 and never disturb the node. Raises `OSError` naming the address when
    it cannot listen, `ValueError` for a malformed host or port.
    """
    check_host(host)
    check_port(port)
    try:
        listeners = await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        raise OSError(
            f"metrics: cannot listen on {host}:{port}: {exc.strerror or exc}"
        ) from None
    if port == 0 and len(listeners) > 1:
        # Each address family would get its own free port: keep one.
        for extra in listeners[1:]:
            await extra.aclose()
        listeners = listeners[:1]
    bound = int(listeners[0].socket.getsockname()[1])
    server = _Server(collect, timeout_s, max_request_bytes, max_connections)
    async with trio.open_nursery() as nursery:
        serve = functools.partial(trio.serve_listeners, handler_nursery=nursery)
        await nursery.start(serve, server.handle, listeners)
        task_status.started(bound)
