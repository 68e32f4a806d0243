"""Metrics of real nodes on py-libp2p, scraped over HTTP; the `node` command's metrics flags."""

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import trio
from integration.test_node import start_nodes
from unit.test_metrics import parse_exposition, value_of

from ravenp2p.cli import main
from ravenp2p.identity import create_identity
from ravenp2p.network.libp2p import Libp2pNetwork
from ravenp2p.node.config import ConfigError, NodeConfig
from ravenp2p.node.metrics import CONTENT_TYPE, JOB_STATES, NodeMetrics, serve_metrics
from ravenp2p.node.node import Node
from ravenp2p.roles.master import Master
from ravenp2p.roles.worker import Worker

CLI = [str(Path(sys.executable).with_name("ravenp2p"))]


async def scrape(port: int) -> dict[str, dict]:
    """GET /metrics over a real TCP connection; the parsed families."""
    with trio.fail_after(5):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            raw = bytearray()
            while chunk := await stream.receive_some(65536):
                raw += chunk
    head, _, body = bytes(raw).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n"), head
    assert f"Content-Type: {CONTENT_TYPE}".encode() in head
    return parse_exposition(body.decode())


async def test_a_running_node_exports_its_live_state(tmp_path):
    async with trio.open_nursery() as nursery:
        peers = await start_nodes(nursery, tmp_path, 2)
        identity = create_identity(tmp_path / "observed")
        config = NodeConfig(data_dir=tmp_path / "observed", control=False, share=10, consent=True,
                            bootstrap=tuple(peers[0].network.listen_addrs[:1]))
        node = Node(Libp2pNetwork(identity), identity, config)
        worker, master = Worker(node), Master(node)
        node.add_role(worker.run)
        node.add_role(master.run)
        await nursery.start(node.run)
        metrics = NodeMetrics(node, worker=worker, master=master)
        port = await nursery.start(serve_metrics, "127.0.0.1", 0, metrics.collect)
        plain_port = await nursery.start(serve_metrics, "127.0.0.1", 0,
                                         NodeMetrics(peers[1]).collect)
        with trio.fail_after(15):
            await node.wait_for_peers(2)
            await peers[1].wait_for_peers(2)

        # A blob moves from a peer to the observed node: both sides count its bytes.
        data = os.urandom(300_000)
        digest = await peers[1].blobs.publish(data)
        assert await node.blobs.fetch(digest, providers=[peers[1].peer_id]) == data

        for _ in range(20):  # links may still be settling; compare on a quiet moment
            before = sorted(node.network.connected_peers())
            families = await scrape(port)
            if sorted(node.network.connected_peers()) == before:
                break
            await trio.sleep(0.1)
        assert value_of(families, "ravenp2p_peers_connected") == len(before) >= 2
        assert value_of(families, "ravenp2p_peers_known") == len(node.directory) == 2
        info = families["ravenp2p_node_info"]["samples"][0][1]
        assert info["peer_id"] == node.peer_id and info["address"] == identity.address
        fetched = value_of(families, "ravenp2p_blob_fetched_bytes_total")
        assert fetched == node.blobs.stats.fetched_bytes >= len(data)
        assert value_of(families, "ravenp2p_blob_fetches_total") == 1
        assert value_of(families, "ravenp2p_worker_calculations_computed_total") == 0
        assert value_of(families, "ravenp2p_worker_jobs_declined_total") == (
            worker.stats.declined_jobs
        )
        jobs = {s[1]["state"]: s[2] for s in families["ravenp2p_master_jobs"]["samples"]}
        assert jobs == dict.fromkeys(JOB_STATES, 0)
        assert value_of(families, "ravenp2p_master_calculation_latency_seconds_count") == 0

        # The peer that served the blob has no roles: no worker or master metrics.
        served = await scrape(plain_port)
        assert value_of(served, "ravenp2p_blob_served_bytes_total") >= len(data)
        assert not [name for name in served if "_worker_" in name or "_master_" in name]
        assert value_of(served, "ravenp2p_peers_known") == len(peers[1].directory)

        # Values are read at scrape time, not copied once.
        worker.stats.computed += 1
        assert value_of(await scrape(port), "ravenp2p_worker_calculations_computed_total") == 1
        for n in (*peers, node):
            n.stop()
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize(
    ("flags", "field", "reason"),
    [
        (["--metrics-port", "70000"], "metrics_port", "from 0 to 65535, not 70000"),
        (["--metrics-port", "-1"], "metrics_port", "not -1"),
        (["--metrics-port", "9464", "--metrics-host", "not a host"], "metrics_host",
         "not an IP address or host name"),
        (["--metrics-host", "0.0.0.0"], "metrics_host", "needs --metrics-port"),
    ],
)
def test_bad_metrics_settings_are_one_line_errors_naming_the_field(
    tmp_path, capsys, flags, field, reason
):
    assert main(["node", "--data-dir", str(tmp_path), *flags]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith(f"ravenp2p: error: {field}: ") and reason in err


@pytest.mark.parametrize("flags", [["--metrics-port"], ["--metrics-port", "lots"]])
def test_a_missing_or_non_numeric_port_is_a_usage_error(tmp_path, capsys, flags):
    with pytest.raises(SystemExit) as exit_info:
        main(["node", "--data-dir", str(tmp_path), *flags])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("usage: ")
    assert "error: argument --metrics-port" in err[-1]


def test_config_checks_the_metrics_settings(tmp_path):
    assert NodeConfig(data_dir=tmp_path, metrics_port=0).metrics_host == "127.0.0.1"
    with pytest.raises(ConfigError, match="metrics_port: must be a TCP port"):
        NodeConfig(data_dir=tmp_path, metrics_port=True)
    with pytest.raises(ConfigError, match="metrics_host: ''"):
        NodeConfig(data_dir=tmp_path, metrics_port=9464, metrics_host="")


@pytest.mark.slow
def test_the_daemon_serves_metrics_where_it_logs_and_names_a_taken_port(tmp_path):
    data_dir = tmp_path / "n"
    log = tmp_path / "n.log"
    args = [*CLI, "node", "--data-dir", str(data_dir), "--master", "--metrics-port", "0"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=log.open("w"))
    try:
        deadline = time.monotonic() + 30
        while not (found := re.search(r"Prometheus metrics at (http://\S+)", log.read_text())):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        url = found.group(1)
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/metrics", url), url
        with urllib.request.urlopen(url, timeout=10) as response:
            assert response.headers["Content-Type"] == CONTENT_TYPE
            families = parse_exposition(response.read().decode())
        assert "ravenp2p_worker_calculations_delivered_total" in families
        assert "ravenp2p_master_jobs" in families
        assert value_of(families, "ravenp2p_peers_connected") == 0
        # A second node cannot take the same port: it says so and exits.
        port = url.split(":")[-1].split("/")[0]
        clash = subprocess.run(
            [*CLI, "node", "--data-dir", str(tmp_path / "m"), "--metrics-port", port],
            capture_output=True, text=True, timeout=30,
        )
        assert clash.returncode == 1
        assert f"ravenp2p: error: metrics: cannot listen on 127.0.0.1:{port}" in clash.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0, log.read_text()[-2000:]
