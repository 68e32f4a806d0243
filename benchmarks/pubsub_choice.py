"""FloodSub vs GossipSub through Libp2pNetwork: 20 peers on loopback, one process.

Usage: .venv/bin/python benchmarks/pubsub_choice.py [--peers 20] [--messages 200] [--rate 50]

Each peer dials 3 random earlier peers (a connected, sparse graph), everyone
subscribes, then random peers publish `--messages` messages at `--rate` per
second. Reports delivery ratio and publish-to-receive latency percentiles.
"""

from __future__ import annotations

import argparse
import random
import statistics
import struct
import time
from contextlib import AsyncExitStack

import trio

from ravenp2p.identity import NodeIdentity
from ravenp2p.network.libp2p import Libp2pConfig, Libp2pNetwork


async def run(router: str, peers: int, messages: int, rate: float, seed: int) -> dict[str, float]:
    rng = random.Random(seed)
    config = Libp2pConfig(pubsub=router)  # type: ignore[arg-type]
    latencies: list[float] = []
    received = 0
    async with AsyncExitStack() as stack:
        nets = [
            await stack.enter_async_context(Libp2pNetwork(NodeIdentity.generate(), config=config))
            for _ in range(peers)
        ]
        for i in range(1, peers):
            for j in rng.sample(range(i), min(3, i)):
                await nets[i].connect(nets[j].listen_addrs[0])
        subs = [await n.subscribe("bench") for n in nets]
        with trio.fail_after(20):
            while not all(n.topic_peers("bench") for n in nets):  # noqa: ASYNC110
                await trio.sleep(0.05)
        await trio.sleep(2.5 if router == "gossipsub" else 0.5)  # let the mesh form

        async def consume(index: int) -> None:
            nonlocal received
            async for message in subs[index]:
                sent_at, _ = struct.unpack(">dI", message.data[:12])
                if message.source == nets[index].peer_id:
                    continue
                latencies.append(time.perf_counter() - sent_at)
                received += 1

        t0 = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for i in range(peers):
                nursery.start_soon(consume, i)
            for k in range(messages):
                publisher = nets[rng.randrange(peers)]
                await publisher.publish("bench", struct.pack(">dI", time.perf_counter(), k))
                await trio.sleep(1 / rate)
            deadline = trio.current_time() + 10
            expected = messages * (peers - 1)
            while received < expected and trio.current_time() < deadline:  # noqa: ASYNC110
                await trio.sleep(0.05)
            nursery.cancel_scope.cancel()
        elapsed = time.perf_counter() - t0
    expected = messages * (peers - 1)
    lat = sorted(latencies) or [float("nan")]
    return {
        "delivered": received / expected,
        "p50_ms": 1000 * statistics.median(lat),
        "p95_ms": 1000 * lat[int(0.95 * (len(lat) - 1))],
        "max_ms": 1000 * lat[-1],
        "elapsed_s": elapsed,
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--peers", type=int, default=20)
    parser.add_argument("--messages", type=int, default=200)
    parser.add_argument("--rate", type=float, default=50.0)
    parser.add_argument("--runs", type=int, default=2)
    args = parser.parse_args()
    for router in ("floodsub", "gossipsub"):
        for run_index in range(args.runs):
            result = await run(router, args.peers, args.messages, args.rate, seed=run_index)
            print(
                f"{router:9s} run {run_index}: delivered {100 * result['delivered']:.1f}% "
                f"p50 {result['p50_ms']:.1f} ms p95 {result['p95_ms']:.1f} ms "
                f"max {result['max_ms']:.1f} ms ({result['elapsed_s']:.1f} s)",
                flush=True,
            )


if __name__ == "__main__":
    trio.run(main)
