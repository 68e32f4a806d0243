"""Network benchmark: connect, bulk throughput, request/response, topics, DHT.

Run: `.venv/bin/python benchmarks/net.py [--json] [--quick]`

Everything runs in one trio process on 127.0.0.1 and stops by itself (every
wait is bounded). Targets checked: connect median < 10 ms; bulk stream
throughput >= 0.10x raw TCP measured in the same run; topic delivery p50 <=
100 ms at 20 peers with 100% delivery.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Any

import trio

from ravenp2p.identity import NodeIdentity
from ravenp2p.network.base import Stream
from ravenp2p.network.libp2p import Libp2pNetwork, quiet_libp2p_loggers
from ravenp2p.topics import ReliableTopics
from ravenp2p.wire import EnvelopeCodec, Message, constrained, register

MiB = 1 << 20
CHUNK = MiB
SINK = "/ravenp2p/bench/sink/1"
ECHO = "/ravenp2p/bench/echo/1"
TOPIC = "bench/topic"

Result = dict[str, Any]


def _pct(values: list[float], q: float) -> float:
    """The q-quantile (0..1) of `values`, nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def _ms(values: list[float]) -> Result:
    return {
        "n": len(values),
        "median_ms": round(statistics.median(values) * 1e3, 2),
        "p99_ms": round(_pct(values, 0.99) * 1e3, 2),
    }


@asynccontextmanager
async def nodes(count: int) -> AsyncIterator[list[Libp2pNetwork]]:
    """`count` started `Libp2pNetwork` nodes on 127.0.0.1 (stopped on exit)."""
    async with AsyncExitStack() as stack:
        nets = [Libp2pNetwork(NodeIdentity.generate()) for _ in range(count)]
        for net in nets:  # each start is bounded inside the adapter
            await stack.enter_async_context(net)
        yield nets


async def connect_sparse(nets: list[Libp2pNetwork], seed: int = 7) -> None:
    """Ring plus one random chord per node: connected, degree ~4."""
    rng = random.Random(seed)
    n = len(nets)
    pairs = {(i, (i + 1) % n) for i in range(n)} if n > 2 else {(0, 1)}
    for i in range(n):
        j = rng.randrange(n)
        if j != i and (j, i) not in pairs:
            pairs.add((i, j))
    for i, j in sorted(pairs):
        if i != j:
            await nets[i].connect(nets[j].listen_addrs[0], timeout=10)


# --- (a) connect latency ------------------------------------------------------------


async def bench_connect(count: int) -> Result:
    samples: list[float] = []
    async with nodes(2) as (a, b):
        addr = b.listen_addrs[0]
        for _ in range(count):
            with trio.move_on_after(3):  # polling: the adapter exposes no disconnect event
                while b.peer_id in a.connected_peers() or a.peer_id in b.connected_peers():  # noqa: ASYNC110
                    await trio.sleep(0.005)
            start = time.perf_counter()
            await a.connect(addr, timeout=5)
            samples.append(time.perf_counter() - start)
            await a.disconnect(b.peer_id)
    return _ms(samples)


# --- (b) throughput -----------------------------------------------------------------


async def transfer_raw_tcp(size: int) -> float:
    """Seconds to move `size` bytes one way over a plain trio TCP socket."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    received = trio.Event()
    total = [0]

    async def sink(conn: trio.SocketStream) -> None:
        buf = bytearray(CHUNK)
        while n := await conn.socket.recv_into(buf):
            total[0] += n
        received.set()
        await conn.aclose()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, sink, listeners)
        conn = await trio.open_tcp_stream("127.0.0.1", port)
        data = os.urandom(CHUNK)
        start = time.perf_counter()
        for _ in range(size // CHUNK):
            await conn.send_all(data)
        await conn.aclose()
        with trio.fail_after(60):
            await received.wait()
        elapsed = time.perf_counter() - start
        nursery.cancel_scope.cancel()
    assert total[0] == size
    return elapsed


async def transfer_stream(
    open_fn: Callable[[], Awaitable[Stream]], done: trio.Event, got: list[int], size: int
) -> float:
    """Seconds from opening a stream to the sink having read all `size` bytes and EOF.

    No hashing in the timed path (it would cost more than the transport): the
    sink checks the byte count; integrity is the AEAD's job and is covered by
    tests/network/test_bulk.py.
    """
    data = os.urandom(CHUNK)
    start = time.perf_counter()
    stream = await open_fn()
    for _ in range(size // CHUNK):
        await stream.write(data)
    await stream.close()
    with trio.fail_after(120):
        await done.wait()
    elapsed = time.perf_counter() - start
    if got[0] != size:
        raise RuntimeError(f"sink got {got[0]} of {size} bytes")
    return elapsed


async def bench_throughput(size: int, reps: int) -> Result:
    res: Result = {"bytes": size, "reps": reps}
    raw = [await transfer_raw_tcp(size) for _ in range(reps)]
    res["raw_tcp_MBps"] = round(size / min(raw) / 1e6, 1)
    async with nodes(2) as (a, b):
        await a.connect(b.listen_addrs[0])
        state: dict[str, Any] = {}

        async def sink(stream: Stream) -> None:
            total = 0
            while chunk := await stream.read(CHUNK):
                total += len(chunk)
            state["got"][0] = total
            state["done"].set()

        b.set_stream_handler(SINK, sink)
        for name, opener in (
            ("libp2p_stream", lambda: a.open_stream(b.peer_id, SINK)),
            ("bulk_stream", lambda: a.open_bulk_stream(b.peer_id, SINK)),
        ):
            times = []
            for _ in range(reps):
                state["done"], state["got"] = trio.Event(), [0]
                times.append(await transfer_stream(opener, state["done"], state["got"], size))
            res[f"{name}_MBps"] = round(size / min(times) / 1e6, 1)
            res[f"{name}_ratio_to_raw"] = round(res[f"{name}_MBps"] / res["raw_tcp_MBps"], 3)
    return res


# --- (c) request / response ---------------------------------------------------------


async def bench_request(count: int) -> Result:
    async def echo(_peer: str, data: bytes) -> bytes:
        return data

    samples: list[float] = []
    async with nodes(2) as (a, b):
        b.set_request_handler(ECHO, echo)
        await a.connect(b.listen_addrs[0])
        payload = os.urandom(256)
        for _ in range(count):
            start = time.perf_counter()
            reply = await a.request(b.peer_id, ECHO, payload, timeout=5)
            samples.append(time.perf_counter() - start)
            assert reply == payload
    return _ms(samples)


# --- (d) topic delivery -------------------------------------------------------------


@register
@dataclass(frozen=True)
class Probe(Message):
    """A timestamped message for measuring reliable-topic delivery."""

    TYPE = "bench.probe"

    publisher: int = constrained(min=0)
    seq: int = constrained(min=0)
    sent_at: float = constrained()


async def bench_topic(
    peers: int, publishers: int, per_publisher: int, rate: float, reliable: bool
) -> Result:
    """Latency from publish to each other subscriber.

    `reliable=False` measures raw pubsub (opaque bytes); `reliable=True` measures
    `ReliableTopics`: signed envelopes, verified on every receipt, with resync.
    """
    latencies: list[float] = []
    async with nodes(peers) as nets, trio.open_nursery() as nursery:
        await connect_sparse(nets)
        topics = [ReliableTopics(net, EnvelopeCodec(net.identity)) for net in nets]
        if reliable:
            for layer in topics:
                await nursery.start(layer.run)
            feeds: list[Any] = [await layer.subscribe(TOPIC) for layer in topics]
        else:
            feeds = [await net.subscribe(TOPIC) for net in nets]
        with trio.move_on_after(5):  # wait until every node sees a subscribed neighbour
            while not all(net.topic_peers(TOPIC) for net in nets):  # noqa: ASYNC110
                await trio.sleep(0.05)
        await trio.sleep(0.3)
        expected = publishers * per_publisher * (peers - 1)
        seen: set[tuple[int, int, int]] = set()
        all_in = trio.Event()

        def record(index: int, pub: int, seq: int, stamp: float) -> None:
            if pub != index and (index, pub, seq) not in seen:
                seen.add((index, pub, seq))
                latencies.append(time.perf_counter() - stamp)
                if len(seen) == expected:
                    all_in.set()

        async def collect(index: int) -> None:
            async for item in feeds[index]:
                if reliable:
                    probe = item.message
                    record(index, probe.publisher, probe.seq, probe.sent_at)
                else:
                    record(index, *json.loads(item.data))

        async def publish(index: int) -> None:
            for seq in range(per_publisher):
                if reliable:
                    probe = Probe(publisher=index, seq=seq, sent_at=time.perf_counter())
                    await topics[index].publish(TOPIC, probe)
                else:
                    body = json.dumps([index, seq, time.perf_counter()]).encode()
                    await nets[index].publish(TOPIC, body)
                await trio.sleep(publishers / rate)

        async with trio.open_nursery() as collectors:
            for i in range(peers):
                collectors.start_soon(collect, i)
            async with trio.open_nursery() as pubs:
                for k in range(publishers):
                    pubs.start_soon(publish, k * peers // publishers)
            with trio.move_on_after(10):
                await all_in.wait()
            collectors.cancel_scope.cancel()
        nursery.cancel_scope.cancel()
    res = _ms(latencies) if latencies else {"n": 0}
    res.update(
        peers=peers,
        expected=expected,
        delivered=len(seen),
        delivery_pct=round(100 * len(seen) / expected, 1),
    )
    res["p50_ms"] = res.pop("median_ms", None)
    return res


# --- (e) DHT lookups ----------------------------------------------------------------


async def bench_dht(peers: int, records: int) -> Result:
    def accept(_key: str, _value: bytes) -> None:
        return None

    get_times: list[float] = []
    find_times: list[float] = []
    found = located = 0
    async with nodes(peers) as nets:
        for net in nets:
            net.set_record_validator("bench", accept)
        await connect_sparse(nets)
        await trio.sleep(0.5)  # let identify seed the routing tables
        rng = random.Random(3)
        for r in range(records):
            writer = rng.choice(nets)
            key, value = f"/bench/rec{r}", os.urandom(64)
            await writer.put_value(key, value, timeout=10)
            # time a network lookup: the reader must not answer from its own store
            # (at 10 peers every node holds every record), so drop its local copy
            reader = rng.choice([n for n in nets if n is not writer])
            reader.dht.value_store.remove(key.encode())
            start = time.perf_counter()
            got = await reader.get_value(key, timeout=10)
            get_times.append(time.perf_counter() - start)
            found += got == value
            # and a peer the searcher is not connected to (else it answers locally)
            searcher = rng.choice(nets)
            strangers = [
                n for n in nets if n is not searcher and n.peer_id not in searcher.connected_peers()
            ]
            if strangers:
                start = time.perf_counter()
                info = await searcher.find_peer(rng.choice(strangers).peer_id, timeout=10)
                find_times.append(time.perf_counter() - start)
                located += info is not None
    res: Result = {"peers": peers}
    res["get_value"] = _ms(get_times) if get_times else {"n": 0}
    res["get_value"]["found_pct"] = round(100 * found / max(len(get_times), 1), 1)
    res["find_peer"] = _ms(find_times) if find_times else {"n": 0}
    res["find_peer"]["found_pct"] = round(100 * located / max(len(find_times), 1), 1)
    return res


# --- driver -------------------------------------------------------------------------


async def run(quick: bool) -> Result:
    size = (16 if quick else 64) * MiB
    out: Result = {
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "quick": quick,
    }
    steps: list[tuple[str, Callable[[], Awaitable[Result]]]] = [
        ("connect", lambda: bench_connect(20 if quick else 50)),
        ("throughput", lambda: bench_throughput(size, 1 if quick else 3)),
        ("request", lambda: bench_request(50 if quick else 200)),
        ("topic_5", lambda: bench_topic(5, 2, 10 if quick else 30, 10.0, reliable=False)),
        ("topic_20", lambda: bench_topic(20, 3, 6 if quick else 20, 10.0, reliable=False)),
        ("reliable_topic_5", lambda: bench_topic(5, 2, 10 if quick else 30, 10.0, reliable=True)),
        ("reliable_topic_20", lambda: bench_topic(20, 3, 6 if quick else 20, 10.0, reliable=True)),
        ("dht_10", lambda: bench_dht(10, 3 if quick else 10)),
        ("dht_30", lambda: bench_dht(30, 3 if quick else 8)),
    ]
    for name, step in steps:
        start = time.perf_counter()
        try:
            with trio.fail_after(90):
                out[name] = await step()
        except Exception as exc:  # report and go on: one broken part must not hide the rest
            out[name] = {"error": f"{type(exc).__name__}: {exc}"}
        out[name]["seconds"] = round(time.perf_counter() - start, 1)
    tp, t20 = out["throughput"], out["reliable_topic_20"]
    out["targets"] = {
        "connect_median_lt_10ms": out["connect"].get("median_ms", 1e9) < 10,
        "bulk_ratio_ge_0.10": tp.get("bulk_stream_ratio_to_raw", 0) >= 0.10,
        "reliable_topic20_p50_le_100ms_and_100pct": (t20.get("p50_ms") or 1e9) <= 100
        and t20.get("delivery_pct") == 100.0,
    }
    return out


def render(res: Result) -> str:
    """A human-readable table of `run`'s result."""
    lines = [
        f"ravenp2p network benchmark ({res['machine']['cpus']} CPUs, "
        f"Python {res['machine']['python']}{', quick' if res['quick'] else ''})",
        "",
    ]

    def row(what: str, value: str) -> None:
        lines.append(f"  {what:<44} {value}")

    def err(part: str) -> bool:
        if "error" in res[part]:
            row(part, "ERROR " + res[part]["error"])
            return True
        return False

    if not err("connect"):
        c = res["connect"]
        row(f"connect (n={c['n']})", f"median {c['median_ms']} ms   p99 {c['p99_ms']} ms")
    if not err("throughput"):
        t = res["throughput"]
        row(f"raw TCP, {t['bytes'] // MiB} MiB one way", f"{t['raw_tcp_MBps']} MB/s")
        for name, label in (
            ("libp2p_stream", "libp2p stream (Noise+yamux)"),
            ("bulk_stream", "bulk stream (AES-256-GCM)"),
        ):
            row(label, f"{t[name + '_MBps']} MB/s   {t[name + '_ratio_to_raw']}x raw")
    if not err("request"):
        r = res["request"]
        row(
            f"request/response 256 B (n={r['n']})",
            f"median {r['median_ms']} ms   p99 {r['p99_ms']} ms",
        )
    for part in ("topic_5", "topic_20", "reliable_topic_5", "reliable_topic_20"):
        if not err(part):
            t = res[part]
            kind = "reliable topic" if part.startswith("reliable") else "raw pubsub"
            row(
                f"{kind}, {t['peers']} peers ({t['expected']} deliveries)",
                f"p50 {t.get('p50_ms')} ms   p99 {t.get('p99_ms')} ms   "
                f"delivered {t['delivery_pct']}%",
            )
    for part in ("dht_10", "dht_30"):
        if not err(part):
            d = res[part]
            for op in ("get_value", "find_peer"):
                m = d[op]
                row(
                    f"DHT {op}, {d['peers']} peers (n={m['n']}, found {m['found_pct']}%)",
                    f"median {m.get('median_ms')} ms   p99 {m.get('p99_ms')} ms",
                )
    lines.append("")
    for name, ok in res["targets"].items():
        row(f"target {name}", "PASS" if ok else "FAIL")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--quick", action="store_true", help="smaller runs (< 60 s)")
    args = parser.parse_args()
    quiet_libp2p_loggers()
    result = trio.run(run, args.quick)
    print(json.dumps(result) if args.json else render(result))


if __name__ == "__main__":
    main()
