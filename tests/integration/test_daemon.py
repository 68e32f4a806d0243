"""`ravenp2p node` daemons as separate processes: bootstrap, discovery, control, clean shutdown."""

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

DAEMONS = 9  # one bootstrap and eight that join through it
CLI = [str(Path(sys.executable).with_name("ravenp2p"))]


def cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_node(data_dir: Path, listen: str, bootstrap: str | None, log: Path) -> subprocess.Popen:
    args = [*CLI, "node", "--data-dir", str(data_dir), "--listen", listen, "--share", "10"]
    if bootstrap:
        args += ["--bootstrap", bootstrap]
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=log.open("w"))


def wait_until(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout} s waiting for {what} (last: {last!r})")


def peers_of(data_dir: Path) -> set[str]:
    result = cli("peers", "--data-dir", str(data_dir), "--json", timeout=10)
    if result.returncode != 0:
        return set()
    return {row["peer_id"] for row in json.loads(result.stdout)}


def test_keys_new_and_show(tmp_path):
    created = cli("keys", "new", "--data-dir", str(tmp_path / "k"), "--json")
    assert created.returncode == 0, created.stderr
    info = json.loads(created.stdout)
    assert info["peer_id"].startswith("16Uiu2H") and info["address"].startswith("0x")
    assert stat.S_IMODE((tmp_path / "k" / "node.key").stat().st_mode) == 0o600
    shown = json.loads(cli("keys", "show", "--data-dir", str(tmp_path / "k"), "--json").stdout)
    assert shown["peer_id"] == info["peer_id"] and shown["address"] == info["address"]
    again = cli("keys", "new", "--data-dir", str(tmp_path / "k"))
    assert again.returncode != 0 and "refusing to replace" in again.stderr
    missing = cli("keys", "show", "--data-dir", str(tmp_path / "none"))
    assert missing.returncode != 0 and "no node key" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1


def test_peers_without_a_running_node_says_so(tmp_path):
    result = cli("peers", "--data-dir", str(tmp_path))
    assert result.returncode == 3
    assert "no node is running" in result.stderr


def test_bad_node_flags_are_refused_with_the_setting_named(tmp_path):
    result = cli("node", "--data-dir", str(tmp_path), "--bootstrap", "/ip4/127.0.0.1/tcp/1")
    assert result.returncode == 2
    assert "bootstrap" in result.stderr and "/p2p/" in result.stderr
    result = cli("node", "--data-dir", str(tmp_path / ("d" * 120)))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert "data_dir" in result.stderr and "shorter --data-dir" in result.stderr


def test_daemons_bootstrap_discover_and_stop_cleanly(tmp_path):
    dirs = [tmp_path / f"n{i}" for i in range(DAEMONS)]
    boot_info = json.loads(cli("keys", "new", "--data-dir", str(dirs[0]), "--json").stdout)
    port = free_port()
    bootstrap = f"/ip4/127.0.0.1/tcp/{port}/p2p/{boot_info['peer_id']}"
    procs: list[subprocess.Popen] = []
    try:
        procs.append(start_node(dirs[0], f"/ip4/127.0.0.1/tcp/{port}", None, tmp_path / "n0.log"))
        for i, d in enumerate(dirs[1:], start=1):
            procs.append(start_node(d, "/ip4/127.0.0.1/tcp/0", bootstrap, tmp_path / f"n{i}.log"))
        ids = [
            wait_until(lambda d=d: json.loads(cli("keys", "show", "--data-dir", str(d),
                                                  "--json").stdout or "null"),
                       30, f"key of {d.name}")["peer_id"]
            for d in dirs
        ]
        everyone = set(ids)
        for d, me in zip(dirs, ids, strict=True):
            wait_until(lambda d=d, me=me: peers_of(d) >= everyone - {me}, 60,
                       f"{d.name} to know all peers")
            mode = stat.S_IMODE((d / "control.sock").stat().st_mode)
            assert mode == 0o600
        # Each node finds another by peer id through the DHT.
        for i, d in enumerate(dirs):
            target = ids[(i + 3) % DAEMONS]
            found = cli("peers", "--data-dir", str(d), "--find", target, "--json")
            assert found.returncode == 0, found.stderr
            assert json.loads(found.stdout)["peer_id"] == target

        # Graceful stop within 5 s on SIGTERM (and SIGINT for one of them).
        for i, proc in enumerate(procs):
            proc.send_signal(signal.SIGINT if i == 1 else signal.SIGTERM)
        for i, proc in enumerate(procs):
            started = time.monotonic()
            code = proc.wait(timeout=10)
            assert time.monotonic() - started < 5.5, f"node {i} took too long to stop"
            assert code == 0, (tmp_path / f"n{i}.log").read_text()[-2000:]
        for i, d in enumerate(dirs):
            log = (tmp_path / f"n{i}.log").read_text()
            assert "stopped" in log and "Shutting down" in log, log[-2000:]
            assert not (d / "control.sock").exists()
            assert json.loads((d / "peers.json").read_text())["addrs"]
        assert "Joined the network through" in (tmp_path / "n5.log").read_text()
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()


def test_one_daemon_per_data_dir_and_a_control_socket_that_survives_garbage(tmp_path):
    data_dir = tmp_path / "n"
    proc = start_node(data_dir, "/ip4/127.0.0.1/tcp/0", None, tmp_path / "n.log")
    try:
        wait_until(lambda: (data_dir / "control.sock").exists(), 30, "the control socket")
        second = cli("node", "--data-dir", str(data_dir))
        assert second.returncode == 1
        assert "already running with data dir" in second.stderr
        for garbage in (b"[" * 60_000 + b"\n", b"\xff\xfe\n", b'{"op": "nope"}\n', b"{}\n"):
            with socket.socket(socket.AF_UNIX) as sock:
                sock.settimeout(10)
                sock.connect(str(data_dir / "control.sock"))
                sock.sendall(garbage)
                reply = json.loads(sock.makefile().readline())
            assert reply["ok"] is False and reply["error"]
        assert proc.poll() is None
        assert peers_of(data_dir) == set()
        status = cli("peers", "--data-dir", str(data_dir), "--json")
        assert status.returncode == 0 and json.loads(status.stdout) == []
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
