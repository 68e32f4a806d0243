"""The metrics model, its text format and the HTTP endpoint, on real sockets on 127.0.0.1."""

import logging
import math
import re
import socket
import struct
from contextlib import asynccontextmanager

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from ravenp2p.identity import NodeIdentity
from ravenp2p.network.memory import MemoryHub, MemoryNetwork
from ravenp2p.node.config import NodeConfig
from ravenp2p.node.metrics import (
    CONTENT_TYPE,
    JOB_STATES,
    Histogram,
    Metric,
    NodeMetrics,
    _AcceptedLatencies,
    check_host,
    counter,
    format_value,
    gauge,
    metrics_url,
    render,
    serve_metrics,
)
from ravenp2p.node.node import Node
from ravenp2p.roles.master import CalculationTiming, JobStatus, Master
from ravenp2p.roles.worker import Worker

# --- a strict reader of the text format, written from the format's description -------------------
_SAMPLE_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
_ESCAPES = {"\\": "\\", '"': '"', "n": "\n"}


def _unescape_help(text: str) -> str:
    out, chars = [], iter(text)
    for c in chars:
        if c == "\\":
            nxt = next(chars)
            assert nxt in ("\\", "n"), f"bad escape in HELP: \\{nxt}"
            out.append("\n" if nxt == "n" else "\\")
        else:
            out.append(c)
    return "".join(out)


def _parse_labels(line: str, pos: int) -> tuple[dict[str, str], int]:
    labels: dict[str, str] = {}
    assert line[pos] == "{"
    pos += 1
    while line[pos] != "}":
        match = _LABEL_NAME.match(line, pos)
        assert match, f"label name expected at {pos}: {line!r}"
        name, pos = match.group(), match.end()
        assert line[pos:pos + 2] == '="', line
        pos += 2
        value = []
        while line[pos] != '"':
            if line[pos] == "\\":
                value.append(_ESCAPES[line[pos + 1]])
                pos += 2
            else:
                assert line[pos] != "\n"
                value.append(line[pos])
                pos += 1
        pos += 1
        assert name not in labels, f"label {name} twice"
        labels[name] = "".join(value)
        if line[pos] == ",":
            pos += 1
    return labels, pos + 1


def parse_exposition(text: str) -> dict[str, dict]:
    """Families by name: {'help', 'type', 'samples': [(sample name, labels, value)]}."""
    assert text.endswith("\n")
    families: dict[str, dict] = {}
    current = None
    for line in text[:-1].split("\n"):
        if line.startswith("# HELP "):
            name, _, help_text = line[len("# HELP "):].partition(" ")
            assert name not in families, f"family {name} declared twice"
            families[name] = {"help": _unescape_help(help_text), "type": None, "samples": []}
            current = name
        elif line.startswith("# TYPE "):
            name, _, kind = line[len("# TYPE "):].partition(" ")
            assert name == current and families[name]["type"] is None
            assert kind in ("counter", "gauge", "histogram", "summary", "untyped")
            families[name]["type"] = kind
        else:
            match = _SAMPLE_NAME.match(line)
            assert match and current is not None, line
            name, pos = match.group(), match.end()
            labels = {}
            if line[pos:pos + 1] == "{":
                labels, pos = _parse_labels(line, pos)
            assert line[pos] == " ", line
            value = float(line[pos + 1:])
            family = families[current]
            allowed = {current}
            if family["type"] == "histogram":
                allowed = {current + s for s in ("_bucket", "_sum", "_count")}
            assert name in allowed, f"sample {name} outside its family {current}"
            family["samples"].append((name, labels, value))
    return families


def value_of(families: dict[str, dict], name: str, **labels: str) -> float:
    family_name = re.sub(r"_(bucket|sum|count)$", "", name) if name not in families else name
    for sample, sample_labels, value in families[family_name]["samples"]:
        if sample == name and sample_labels == labels:
            return value
    raise KeyError((name, labels))


# --- the model and the renderer ----------------------------------------------------------------
def test_render_writes_help_type_and_samples_that_read_back():
    hist = Histogram((0.5, 1.0, 5.0))
    for latency in (0.2, 0.7, 0.9, 3.0, 12.0):
        hist.observe(latency)
    jobs = Metric("x_jobs", "gauge", "Jobs by state.")
    jobs.add(2, {"state": "running"}).add(0, {"state": "done"})
    text = render([
        counter("x_bytes_total", "Bytes sent.", 10**24),
        gauge("x_peers", "Peers.", 3),
        jobs,
        hist.metric("x_latency_seconds", "Latency."),
    ])
    assert text.splitlines()[:3] == [
        "# HELP x_bytes_total Bytes sent.",
        "# TYPE x_bytes_total counter",
        "x_bytes_total 1000000000000000000000000",
    ]
    assert 'x_jobs{state="running"} 2' in text.splitlines()
    families = parse_exposition(text)
    assert {name: f["type"] for name, f in families.items()} == {
        "x_bytes_total": "counter", "x_peers": "gauge", "x_jobs": "gauge",
        "x_latency_seconds": "histogram",
    }
    assert families["x_peers"]["help"] == "Peers."
    assert value_of(families, "x_bytes_total") == 1e24
    assert value_of(families, "x_jobs", state="running") == 2
    assert value_of(families, "x_jobs", state="done") == 0
    buckets = [(s[1]["le"], s[2]) for s in families["x_latency_seconds"]["samples"]
               if s[0] == "x_latency_seconds_bucket"]
    assert buckets == [("0.5", 1), ("1.0", 3), ("5.0", 4), ("+Inf", 5)]
    assert value_of(families, "x_latency_seconds_count") == 5
    assert math.isclose(value_of(families, "x_latency_seconds_sum"), 0.2 + 0.7 + 0.9 + 3 + 12)


def test_label_values_and_help_text_are_escaped():
    tricky = 'back\\slash "quoted"\nnext line'
    metric = gauge("x_info", 'Help with \\ and\na newline, "quotes" kept.', 1, {"v": tricky})
    text = render([metric])
    assert text.count("\n") == 3  # escaped newlines never break a line
    assert r'x_info{v="back\\slash \"quoted\"\nnext line"} 1' in text
    assert r'# HELP x_info Help with \\ and\na newline, "quotes" kept.' in text
    family = parse_exposition(text)["x_info"]
    assert family["help"] == 'Help with \\ and\na newline, "quotes" kept.'
    assert family["samples"] == [("x_info", {"v": tricky}, 1.0)]


@given(values=st.lists(st.text(), min_size=1, max_size=5, unique=True), help_text=st.text())
def test_any_label_value_and_help_text_round_trip(values, help_text):
    metric = Metric("x_by_value", "gauge", help_text)
    for i, value in enumerate(values):
        metric.add(i, {"value": value, "n": str(i)})
    family = parse_exposition(render([metric]))["x_by_value"]
    assert family["help"] == help_text
    assert family["samples"] == [
        ("x_by_value", {"value": v, "n": str(i)}, float(i)) for i, v in enumerate(values)
    ]


def test_values_are_written_exactly():
    assert format_value(0) == "0"
    assert format_value(2**70) == str(2**70)
    assert format_value(0.25) == "0.25"
    assert format_value(float("inf")) == "+Inf"
    assert format_value(float("-inf")) == "-Inf"
    assert format_value(float("nan")) == "NaN"
    for bad in (True, "3", None):
        with pytest.raises(TypeError, match="must be a number"):
            format_value(bad)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: counter("x_bytes", "h", 1), "must end in _total"),
        (lambda: counter("x_total", "h", -1), "finite and >= 0"),
        (lambda: counter("x_total", "h", float("nan")), "finite and >= 0"),
        (lambda: counter("x_total", "h", float("inf")), "finite and >= 0"),
        (lambda: gauge("1x", "h", 1), "not a valid Prometheus name"),
        (lambda: gauge("x-y", "h", 1), "not a valid Prometheus name"),
        (lambda: gauge("x", "h", 1, {"__name": "a"}), "not a valid label name"),
        (lambda: gauge("x", "h", 1, {"a-b": "a"}), "not a valid label name"),
        (lambda: Metric("x", "summary", "h"), "unknown type"),  # type: ignore[arg-type]
        (lambda: Histogram((1.0, 0.5)), "strictly ascending"),
        (lambda: Histogram((1.0, float("inf"))), "strictly ascending"),
        (lambda: render([gauge("x", "h", 1), gauge("x", "h", 2)]), "appears twice"),
    ],
)
def test_malformed_metrics_are_refused(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_label_values_must_be_text():
    with pytest.raises(TypeError, match="label a must be a string"):
        gauge("x", "h", 1, {"a": 3})  # type: ignore[dict-item]


def test_hosts_and_urls():
    for good in ("127.0.0.1", "::1", "0.0.0.0", "localhost", "metrics.example.org"):
        assert check_host(good) == good
    for bad in ("", "bad host", "-x.org", "a..b", "[::1]", "x" * 300):
        with pytest.raises(ValueError, match="not an IP address or host name"):
            check_host(bad)
    assert metrics_url("127.0.0.1", 9464) == "http://127.0.0.1:9464/metrics"
    assert metrics_url("::1", 9464) == "http://[::1]:9464/metrics"


def test_accepted_latencies_are_counted_once_and_never_go_down():
    timings = [CalculationTiming(calc=i, opened_at=float(i)) for i in range(4)]
    tracker = _AcceptedLatencies((1.0, 10.0))
    assert tracker.update(timings).count == 0
    timings[1].accepted, timings[1].latency_s = True, 0.5
    timings[3].accepted, timings[3].latency_s = True, 4.0
    hist = tracker.update(timings)
    assert (hist.count, hist.sum, hist.counts) == (2, 4.5, [1, 1])
    assert tracker.update(timings).count == 2  # a second scrape adds nothing
    # The master forgets its oldest timings; what was counted stays counted.
    del timings[:2]
    timings.append(CalculationTiming(calc=9, opened_at=9.0, latency_s=20.0, accepted=True))
    hist = tracker.update(timings)
    assert (hist.count, hist.sum, hist.counts) == (3, 24.5, [1, 1])


def test_node_metrics_follow_the_roles_the_node_runs(tmp_path):
    identity = NodeIdentity.generate()
    node = Node(MemoryNetwork(MemoryHub(), identity), identity,
                NodeConfig(data_dir=tmp_path, control=False))
    master = Master(node)
    worker = Worker(node)
    worker.stats.computed, worker.stats.compute_s, worker.stats.earned = 7, 1.5, 3 * 10**18
    node.blobs.stats.served_bytes = 4096
    master.jobs = {
        "a": JobStatus("a", state="running", calculations_accepted=5, results_rejected=1),
        "b": JobStatus("b", state="done", calculations_accepted=8, results_rejected=2),
        "c": JobStatus("c", state="done"),
    }
    master.calculation_timings.append(
        CalculationTiming(calc=0, opened_at=0.0, latency_s=0.3, accepted=True))
    master.standby.takeovers = 2

    plain = parse_exposition(render(NodeMetrics(node).collect()))
    assert not [name for name in plain if "worker" in name or "master" in name]
    assert value_of(plain, "ravenp2p_peers_connected") == 0
    assert value_of(plain, "ravenp2p_blob_served_bytes_total") == 4096
    info = plain["ravenp2p_node_info"]["samples"][0][1]
    assert info["peer_id"] == node.peer_id and info["address"] == node.identity.address

    full = parse_exposition(render(NodeMetrics(node, worker=worker, master=master).collect()))
    assert value_of(full, "ravenp2p_worker_calculations_computed_total") == 7
    assert value_of(full, "ravenp2p_worker_compute_seconds_total") == 1.5
    assert value_of(full, "ravenp2p_worker_earned_base_units_total") == 3e18
    assert value_of(full, "ravenp2p_master_calculations_accepted_total") == 13
    assert value_of(full, "ravenp2p_master_results_rejected_total") == 3
    assert value_of(full, "ravenp2p_master_takeovers_total") == 2
    by_state = {s[1]["state"]: s[2] for s in full["ravenp2p_master_jobs"]["samples"]}
    assert by_state == {state: 0 for state in JOB_STATES} | {"running": 1, "done": 2}
    assert value_of(full, "ravenp2p_master_calculation_latency_seconds_count") == 1
    assert value_of(full, "ravenp2p_master_calculation_latency_seconds_bucket", le="0.5") == 1

    # Round durations: each completed round is counted once, however often it is scraped,
    # and rounds the master no longer remembers are not invented.
    metrics = NodeMetrics(node, master=master)
    master.round_seconds += [0.4, 3.0]
    master.rounds_completed = 2
    rounds = parse_exposition(render(metrics.collect()))
    assert value_of(rounds, "ravenp2p_master_round_seconds_count") == 2
    assert value_of(rounds, "ravenp2p_master_round_seconds_sum") == 3.4
    assert value_of(rounds, "ravenp2p_master_round_seconds_bucket", le="0.5") == 1
    assert value_of(parse_exposition(render(metrics.collect())),
                    "ravenp2p_master_round_seconds_count") == 2
    del master.round_seconds[:2]
    master.round_seconds.append(7.0)
    master.rounds_completed = 5  # two of the three new rounds were already forgotten
    rounds = parse_exposition(render(metrics.collect()))
    assert value_of(rounds, "ravenp2p_master_round_seconds_count") == 3
    assert value_of(rounds, "ravenp2p_master_round_seconds_sum") == 10.4


# --- the HTTP endpoint ---------------------------------------------------------------------------
class Collector:
    """Counts scrapes; fails on demand."""

    def __init__(self) -> None:
        self.calls = 0
        self.fail = False

    def __call__(self) -> list[Metric]:
        self.calls += 1
        if self.fail:
            raise RuntimeError("state is broken")
        return [counter("x_scrapes_total", "Scrapes answered.", self.calls)]


@asynccontextmanager
async def serving(collect, **options):
    async with trio.open_nursery() as nursery:
        port = await nursery.start(lambda task_status: serve_metrics(
            "127.0.0.1", 0, collect, task_status=task_status, **options))
        yield port
        nursery.cancel_scope.cancel()


async def exchange(port: int, request: bytes, *, timeout: float = 5.0) -> bytes:
    """Send `request` and read the whole response (the server closes the connection)."""
    with trio.fail_after(timeout):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(request)
            return await read_to_end(stream)


async def read_to_end(stream: trio.SocketStream) -> bytes:
    data = bytearray()
    while chunk := await stream.receive_some(65536):
        data += chunk
    return bytes(data)


def parse_response(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    version, status, _reason = lines[0].split(" ", 2)
    assert version == "HTTP/1.1"
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(": ")
        headers[name.lower()] = value
    return int(status), headers, body


async def test_get_metrics_answers_the_text_format():
    collect = Collector()
    async with serving(collect) as port:
        raw = await exchange(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: */*\r\n\r\n")
        status, headers, body = parse_response(raw)
        assert status == 200
        assert headers["content-type"] == CONTENT_TYPE
        assert headers["connection"] == "close"
        assert int(headers["content-length"]) == len(body)
        assert value_of(parse_exposition(body.decode()), "x_scrapes_total") == 1
        # A query string is ignored; HEAD gets the headers only; HTTP/1.0 and bare LF are fine.
        raw = await exchange(port, b"GET /metrics?name[]=up HTTP/1.0\n\n")
        assert parse_response(raw)[0] == 200
        raw = await exchange(port, b"HEAD /metrics HTTP/1.1\r\n\r\n")
        status, headers, body = parse_response(raw)
        assert status == 200 and body == b"" and int(headers["content-length"]) > 0
    assert collect.calls == 3


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GET / HTTP/1.1\r\n\r\n", 404),
        (b"GET /metrics/extra HTTP/1.1\r\n\r\n", 404),
        (b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n", 405),
        (b"DELETE /metrics HTTP/1.1\r\n\r\n", 405),
        (b"hello\r\n\r\n", 400),
        (b"GET /metrics\r\n\r\n", 400),
        (b"GET /metrics HTTP/2.0\r\n\r\n", 400),
        (b"GET  /metrics HTTP/1.1\r\n\r\n", 400),
        (b"GET http://x/metrics HTTP/1.1\r\n\r\n", 400),
        (b"GET /metrics HTTP/1.1\r\nno colon here\r\n\r\n", 400),
        (b"GET /metrics HTTP/1.1\r\n folded: header\r\n\r\n", 400),
        ("GET /métriques HTTP/1.1\r\n\r\n".encode(), 400),
        (b"GET /metrics HTTP/1.1\r\nHost: x", 400),  # the client stops before the blank line
    ],
)
async def test_bad_requests_get_clear_statuses(request_bytes, status):
    async with serving(Collector()) as port:
        with trio.fail_after(5):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                await stream.send_all(request_bytes)
                await stream.send_eof()
                got, headers, body = parse_response(await read_to_end(stream))
        assert got == status, body
        assert body.strip(), "an error says what was wrong"
        if status == 405:
            assert headers["allow"] == "GET, HEAD"
        # The server is unharmed.
        assert parse_response(await exchange(port, b"GET /metrics HTTP/1.1\r\n\r\n"))[0] == 200


async def test_oversized_requests_are_refused():
    async with serving(Collector(), max_request_bytes=1024) as port:
        padding = b"X-Pad: " + b"a" * 2000 + b"\r\n"
        raw = await exchange(port, b"GET /metrics HTTP/1.1\r\n" + padding + b"\r\n")
        status, _, body = parse_response(raw)
        assert status == 431 and b"1024" in body
        # A client that never ends its headers is cut off at the limit too.
        raw = await exchange(port, b"GET /metrics HTTP/1.1\r\n" + b"X-A: b\r\n" * 400)
        assert parse_response(raw)[0] == 431
        assert parse_response(await exchange(port, b"GET /metrics HTTP/1.1\r\n\r\n"))[0] == 200


async def test_slow_clients_time_out_without_holding_up_others():
    async with serving(Collector(), timeout_s=1.0) as port:
        silent = await trio.open_tcp_stream("127.0.0.1", port)
        dribbler = await trio.open_tcp_stream("127.0.0.1", port)
        started = trio.current_time()
        async with silent, dribbler, trio.open_nursery() as nursery:
            async def dribble():
                for byte in b"GET /metrics HTTP/1.1\r\nHost: x\r\n":
                    await dribbler.send_all(bytes([byte]))
                    await trio.sleep(0.05)
            nursery.start_soon(dribble)
            # Meanwhile a prompt scraper is answered at once.
            assert parse_response(await exchange(port, b"GET /metrics HTTP/1.1\r\n\r\n"))[0] == 200
            assert trio.current_time() - started < 0.8
            with trio.fail_after(3):
                assert parse_response(await read_to_end(silent))[0] == 408
                dribbled = await read_to_end(dribbler)
            nursery.cancel_scope.cancel()
        assert parse_response(dribbled)[0] == 408
        assert trio.current_time() - started < 3.0


async def test_concurrent_scrapes_are_all_answered():
    collect = Collector()
    async with serving(collect) as port:
        responses: list[bytes] = []

        async def scrape():
            responses.append(await exchange(port, b"GET /metrics HTTP/1.1\r\n\r\n"))

        async with trio.open_nursery() as nursery:
            for _ in range(20):
                nursery.start_soon(scrape)
    assert [parse_response(r)[0] for r in responses] == [200] * 20
    counts = sorted(value_of(parse_exposition(parse_response(r)[2].decode()), "x_scrapes_total")
                    for r in responses)
    assert counts == list(range(1, 21)) and collect.calls == 20


async def test_too_many_connections_are_turned_away_and_bad_clients_do_no_harm(caplog):
    collect = Collector()
    async with serving(collect, max_connections=2, timeout_s=2.0) as port:
        idle = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(2)]
        await trio.sleep(0.3)
        raw = await exchange(port, b"GET /metrics HTTP/1.1\r\n\r\n")
        assert parse_response(raw)[0] == 503
        for stream in idle:
            await stream.aclose()
        await trio.sleep(0.1)
        # Connections that close at once, or reset mid-request, leave the server serving.
        await (await trio.open_tcp_stream("127.0.0.1", port)).aclose()
        rude = await trio.open_tcp_stream("127.0.0.1", port)
        await rude.send_all(b"GET /met")
        rude.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await rude.aclose()
        collect.fail = True
        status, _, body = parse_response(await exchange(port, b"GET /metrics HTTP/1.1\r\n\r\n"))
        assert status == 500 and b"could not be collected" in body
        collect.fail = False
        assert parse_response(await exchange(port, b"GET /metrics HTTP/1.1\r\n\r\n"))[0] == 200
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings == ["Could not collect metrics: RuntimeError: state is broken"]


async def test_listening_problems_are_named():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError, match=f"metrics: cannot listen on 127.0.0.1:{port}"):
            await serve_metrics("127.0.0.1", port, Collector())
    with pytest.raises(ValueError, match="TCP port from 0 to 65535, not 70000"):
        await serve_metrics("127.0.0.1", 70000, Collector())
    with pytest.raises(ValueError, match="not an IP address or host name"):
        await serve_metrics("no such host!", 0, Collector())
