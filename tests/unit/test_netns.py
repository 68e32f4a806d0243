"""The network-namespace harness, checked with real TCP connections between real namespaces."""

from __future__ import annotations

import contextlib
import errno
import inspect
import ipaddress
import itertools
import select
import socket
import socketserver
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from netns import Lan, Member, NetnsError, netns_unavailable

pytestmark = pytest.mark.skipif(netns_unavailable() is not None, reason=str(netns_unavailable()))

OK_TIMEOUT_S = 5.0  # generous: a reachable peer on a local bridge answers in milliseconds
CUT_TIMEOUT_S = 1.0  # how long a connection attempt to or from a cut member is given

# Serves each connection a greeting, so that a test knows it reached this very server.
SERVER = """
import socket
server = socket.create_server(("0.0.0.0", 0))
print(server.getsockname()[1], flush=True)
while True:
    conn, _ = server.accept()
    with conn:
        conn.sendall(b"ok")
"""


def _connect(ip: str, port: int, timeout: float) -> str:
    """Read a greeting over TCP: the greeting, "timeout", or the errno name of the failure."""
    try:
        with socket.create_connection((ip, port), timeout=timeout) as conn:
            greeting = b""
            while chunk := conn.recv(16):
                greeting += chunk
            return greeting.decode()
    except TimeoutError:
        return "timeout"
    except OSError as exc:
        return errno.errorcode.get(exc.errno or 0, repr(exc))


def _connect_from(member: Member, ip: str, port: int, timeout: float) -> str:
    """Run :func:`_connect` in a process inside ``member``'s namespace."""
    script = (
        f"import errno, socket\n{inspect.getsource(_connect)}\n"
        f"print(_connect({ip!r}, {port}, {timeout}))"
    )
    done = subprocess.run(
        [*member.exec_prefix, sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=timeout + 10,
        check=True,
    )
    return done.stdout.strip()


@contextlib.contextmanager
def _host_server(ip: str) -> Iterator[int]:
    """Serve the greeting from the test process on ``ip``; yield the port."""

    class Greet(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            self.request.sendall(b"ok")

    with socketserver.TCPServer((ip, 0), Greet) as server:
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
        thread.start()
        try:
            yield server.server_address[1]
        finally:
            server.shutdown()
            thread.join()


@contextlib.contextmanager
def _member_server(member: Member) -> Iterator[int]:
    """Run the greeting server in ``member``'s namespace; yield its port; stop it afterwards."""
    command = [*member.exec_prefix, sys.executable, "-c", SERVER]
    with subprocess.Popen(command, stdout=subprocess.PIPE, text=True) as proc:
        try:
            assert proc.stdout is not None
            ready, _, _ = select.select([proc.stdout], [], [], OK_TIMEOUT_S)
            port = proc.stdout.readline().strip() if ready else ""
            assert port.isdigit(), f"the server in {member.name} did not start"
            yield int(port)
        finally:
            proc.kill()


@dataclass
class Net:
    """A running Lan with two members, a greeting server on the host and one in each member."""

    lan: Lan
    a: Member
    b: Member
    host_port: int
    member_ports: dict[str, int]

    def reach(self, src: Member | None, dst: Member | None, timeout: float) -> str:
        """Connect from ``src`` to ``dst`` (None is the host) and report the outcome."""
        if dst is None:
            ip, port = self.lan.host_ip, self.host_port
        else:
            ip, port = dst.ip, self.member_ports[dst.name]
        if src is None:
            return _connect(ip, port, timeout)
        return _connect_from(src, ip, port, timeout)

    def reach_all(
        self, pairs: list[tuple[Member | None, Member | None]], timeout: float
    ) -> dict[tuple[str, str], str]:
        """Try all ``pairs`` at once; map (source, destination) names to outcomes."""
        with ThreadPoolExecutor(len(pairs)) as pool:
            outcomes = pool.map(lambda pair: self.reach(*pair, timeout), pairs)
            return {
                (_label(src), _label(dst)): out
                for (src, dst), out in zip(pairs, outcomes, strict=True)
            }


def _label(node: Member | None) -> str:
    return "host" if node is None else node.name


@pytest.fixture(scope="module")
def net() -> Iterator[Net]:
    with Lan() as lan, contextlib.ExitStack() as servers:
        a, b = lan.add_namespace(), lan.add_namespace()
        host_port = servers.enter_context(_host_server(lan.host_ip))
        ports = {m.name: servers.enter_context(_member_server(m)) for m in (a, b)}
        yield Net(lan, a, b, host_port, ports)


def _leftovers(prefix: str) -> list[str]:
    """Namespaces, and interfaces of the root namespace, whose names start with ``prefix``."""
    names = _ip_output("netns", "list").split()
    links = _ip_output("-o", "link", "show").splitlines()
    names += [line.split(":")[1].strip().split("@")[0] for line in links]
    return [name for name in names if name.startswith(prefix)]


def _ip_output(*args: str) -> str:
    return subprocess.run(
        ["ip", *args], capture_output=True, text=True, check=True, timeout=OK_TIMEOUT_S
    ).stdout


def test_addresses_are_distinct_and_on_the_lan(net: Net) -> None:
    ips = [net.lan.host_ip, net.a.ip, net.b.ip]
    assert len(set(ips)) == 3
    assert all(ipaddress.ip_address(ip) in net.lan.network for ip in ips)
    assert f" {net.lan.host_ip}/{net.lan.network.prefixlen} " in _ip_output("-4", "-o", "addr")
    assert net.a.name != net.b.name and net.lan.members == (net.a, net.b)


def test_everyone_reaches_everyone(net: Net) -> None:
    pairs = list(itertools.permutations([None, net.a, net.b], 2))
    outcomes = net.reach_all(pairs, OK_TIMEOUT_S)
    assert outcomes == dict.fromkeys(outcomes, "ok")
    assert len(outcomes) == 6


def test_members_see_nothing_beyond_the_lan(net: Net) -> None:
    # No forwarding and no default route: an outside address is not even routable.
    assert _connect_from(net.a, "203.0.113.1", 9, OK_TIMEOUT_S) == "ENETUNREACH"


def test_cut_isolates_only_that_member_until_healed(net: Net) -> None:
    a, b = net.a, net.b
    everyone = list(itertools.permutations([None, a, b], 2))
    to_or_from_a = [pair for pair in everyone if a in pair]
    others = [pair for pair in everyone if a not in pair]
    a.cut()
    try:
        cut_off = net.reach_all(to_or_from_a, CUT_TIMEOUT_S)
        assert cut_off == dict.fromkeys(cut_off, "timeout") and len(cut_off) == 4
        still = net.reach_all(others, OK_TIMEOUT_S)
        assert still == dict.fromkeys(still, "ok") and len(still) == 2
    finally:
        a.heal()
    healed = net.reach_all(everyone, OK_TIMEOUT_S)
    assert healed == dict.fromkeys(healed, "ok") and len(healed) == 6


def test_exit_on_interrupt_deletes_everything_despite_live_processes() -> None:
    lan = Lan()
    sleeper: subprocess.Popen[str] | None = None
    try:
        with pytest.raises(KeyboardInterrupt), lan:
            host_ip = lan.host_ip
            member = lan.add_namespace()
            lan.add_namespace()
            assert len(_leftovers(lan.prefix)) == 4  # hub, two members, host veth
            sleeper = subprocess.Popen(
                [
                    *member.exec_prefix,
                    sys.executable,
                    "-c",
                    "import time; print('in', flush=True); time.sleep(60)",
                ],
                stdout=subprocess.PIPE,
                text=True,
            )
            assert sleeper.stdout is not None and sleeper.stdout.readline() == "in\n"
            raise KeyboardInterrupt
        assert _leftovers(lan.prefix) == []
        assert f" {host_ip}/" not in _ip_output("-4", "-o", "addr")
        # The process lives on in its now nameless namespace, whose veth went with the Lan.
        assert sleeper.poll() is None
        devices = Path(f"/proc/{sleeper.pid}/net/dev").read_text().splitlines()[2:]
        assert [line.split(":")[0].strip() for line in devices] == ["lo"]
        with pytest.raises(NetnsError, match="not open"):
            lan.add_namespace()
    finally:
        if sleeper is not None:
            sleeper.kill()
            sleeper.communicate(timeout=OK_TIMEOUT_S)


def test_subnet_in_use_is_refused_and_nothing_is_left(net: Net) -> None:
    taken = str(net.lan.network)
    clash = Lan(network=taken)
    with pytest.raises(NetnsError, match=f"{taken} is already in use"), clash:
        pass
    assert _leftovers(clash.prefix) == []


def test_chosen_free_subnet_is_used() -> None:
    with Lan() as earlier:  # leaves behind a subnet known to be free
        chosen = ipaddress.ip_network(f"{earlier.network.network_address}/29")
    lan = Lan(network=str(chosen))
    with lan:
        member = lan.add_namespace()
        hosts = list(chosen.hosts())
        assert lan.network == chosen
        assert (lan.host_ip, member.ip) == (str(hosts[0]), str(hosts[1]))
        with _host_server(lan.host_ip) as port:
            assert _connect_from(member, lan.host_ip, port, OK_TIMEOUT_S) == "ok"
        for _ in range(4):
            lan.add_namespace()
        with pytest.raises(NetnsError, match="no address left"):
            lan.add_namespace()
    assert _leftovers(lan.prefix) == []


@pytest.mark.parametrize(
    ("network", "problem"),
    [
        ("not-a-net", "not a network address"),
        ("10.1.2.0/255.0.0.255", "not a network address"),
        ("fd00::/64", "not IPv4"),
        ("8.8.8.0/24", "not a private address range"),
        ("10.0.0.0/8", "prefix length"),
        ("10.9.9.0/30", "prefix length"),
    ],
)
def test_bad_network_is_rejected(network: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        Lan(network=network)
