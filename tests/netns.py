"""Private layer-2 networks built from Linux network namespaces, for network-partition tests.

A test that cuts a peer off the network needs the peer's process to keep running while its
packets silently vanish, which is what a real network split looks like to everyone else.
:class:`Lan` builds such a network: a Linux bridge inside a "hub" namespace, the test process
(in the root namespace) attached to it through a veth pair, and any number of member namespaces,
one per peer process, attached the same way. :meth:`Member.cut` takes a member's bridge port
down and :meth:`Member.heal` brings it back. Nothing else on the machine changes: no IP
forwarding, no firewall rules, no sysctl settings.

This needs Linux, root and the ``ip`` command from iproute2; :func:`netns_unavailable` says why
it cannot be used here, for ``pytest.skip``.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import os
import secrets
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from types import TracebackType

IP_TIMEOUT_S = 10.0
"""Upper bound on one ``ip`` command; none should take more than milliseconds."""

_NAME_STEM = "rvn"
_MAX_IFNAME = 15  # IFNAMSIZ - 1
_CAP_NET_ADMIN_BIT = 12
_SUBNET_ATTEMPTS = 20


class NetnsError(RuntimeError):
    """An ``ip`` command failed, or a :class:`Lan` was used in a way it does not support."""


def _run(cmd: list[str]) -> str:
    """Run one command with a timeout and return its stdout; raise :class:`NetnsError` naming it."""
    shown = shlex.join(cmd)
    try:
        done = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=IP_TIMEOUT_S)
    except FileNotFoundError:
        raise NetnsError(f"`{shown}` failed: {cmd[0]} is not installed") from None
    except subprocess.TimeoutExpired:
        raise NetnsError(f"`{shown}` did not finish within {IP_TIMEOUT_S:g} s") from None
    except subprocess.CalledProcessError as exc:
        detail = exc.stderr.strip() or "no error output"
        raise NetnsError(f"`{shown}` failed with exit status {exc.returncode}: {detail}") from None
    return done.stdout


def _ip(*args: str, netns: str | None = None) -> str:
    """Run ``ip ARGS``, inside the named namespace when one is given."""
    where = ["-n", netns] if netns is not None else []
    return _run(["ip", *where, *args])


def _has_cap_net_admin() -> bool:
    """Whether this process holds CAP_NET_ADMIN in its effective capability set."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> _CAP_NET_ADMIN_BIT & 1)
    except (OSError, ValueError, IndexError):
        pass
    return False


@functools.cache
def netns_unavailable() -> str | None:
    """Say why :class:`Lan` cannot work in this process, or return None when it can.

    Beyond the cheap checks it builds (and deletes) a throw-away namespace holding a bridge and a
    veth pair and runs a command in it, since containers often refuse some of that even to root.
    """
    if not sys.platform.startswith("linux"):
        return f"network namespaces exist only on Linux; this is {sys.platform}"
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    if os.geteuid() != 0 and not _has_cap_net_admin():
        return (
            f"creating network namespaces needs root (CAP_NET_ADMIN); running as uid {os.geteuid()}"
        )
    probe = f"{_NAME_STEM}{secrets.token_hex(3)}probe"
    try:
        _ip("netns", "add", probe)
    except NetnsError as exc:
        return f"cannot create a network namespace: {exc}"
    reason: str | None = None
    try:
        _ip("link", "add", "probebr", "type", "bridge", netns=probe)
        _ip("link", "add", "probea", "type", "veth", "peer", "name", "probeb", netns=probe)
        _run(["ip", "netns", "exec", probe, "true"])
    except NetnsError as exc:
        reason = f"cannot build a bridged network inside a namespace: {exc}"
    finally:
        try:
            _ip("netns", "del", probe)
        except NetnsError as exc:
            reason = reason or f"cannot delete a network namespace: {exc}"
    return reason


def _parse_network(text: str) -> ipaddress.IPv4Network:
    """Validate a caller-chosen subnet for a :class:`Lan`."""
    try:
        network = ipaddress.ip_network(text)
    except ValueError as exc:
        raise ValueError(f"Lan network {text!r} is not a network address: {exc}") from None
    if not isinstance(network, ipaddress.IPv4Network):
        raise ValueError(f"Lan network {text!r} is not IPv4")
    if not network.is_private:
        raise ValueError(f"Lan network {text!r} is not a private address range")
    if not 16 <= network.prefixlen <= 29:
        raise ValueError(f"Lan network {text!r} must have a prefix length from /16 to /29")
    return network


def _subnet_users(network: ipaddress.IPv4Network, ignore_dev: str | None = None) -> list[str]:
    """Describe the addresses and routes of the root namespace that overlap ``network``.

    Default routes overlap everything and are not counted; nor is anything on ``ignore_dev``.
    """
    users: list[str] = []
    for link in json.loads(_ip("-j", "-4", "addr", "show") or "[]"):
        dev = link.get("ifname")
        for addr in link.get("addr_info", []):
            iface = ipaddress.IPv4Interface(f"{addr['local']}/{addr['prefixlen']}")
            if dev != ignore_dev and iface.network.overlaps(network):
                users.append(f"address {iface} on {dev}")
    for route in json.loads(_ip("-j", "-4", "route", "show", "table", "all") or "[]"):
        dst = route.get("dst", "default")
        if dst == "default":
            continue
        dest = ipaddress.IPv4Network(dst, strict=False)
        dev = route.get("dev")
        if dest.prefixlen > 0 and dev != ignore_dev and dest.overlaps(network):
            users.append(f"route to {dst} on {dev or 'no device'}")
    return users


class Member:
    """A network namespace on a :class:`Lan`, for one peer process; start it via ``exec_prefix``."""

    def __init__(self, lan: Lan, name: str, ip: str, port: str) -> None:
        self._lan = lan
        self.name = name
        """The namespace's name, as ``ip netns`` knows it."""
        self.ip = ip
        """The member's IPv4 address on the Lan (no prefix length)."""
        self._port = port  # its end of the veth pair on the bridge, in the hub namespace

    @property
    def exec_prefix(self) -> list[str]:
        """Command-line prefix that runs the rest of the command line inside this namespace."""
        return ["ip", "netns", "exec", self.name]

    def cut(self) -> None:
        """Partition the member: frames to and from it are dropped; its processes keep running."""
        self._lan._set_port(self._port, up=False)

    def heal(self) -> None:
        """Undo :meth:`cut`: the member's link is up again."""
        self._lan._set_port(self._port, up=True)

    def __repr__(self) -> str:
        return f"Member(name={self.name!r}, ip={self.ip!r})"


class Lan:
    """A private layer-2 network of namespaces that the test process (the host) is on too.

    Use it as a context manager. Every name it creates starts with :attr:`prefix`, which is random,
    so Lans in parallel test runs do not clash; the host gets the first address of a free subnet
    (by default a random 10.R.0.0/24 that no address or route of the root namespace overlaps) and
    members the following ones. On exit, also on errors and KeyboardInterrupt, it deletes what it
    created and nothing else. Processes started in a member are the caller's to stop: exit does
    not wait for them. Deleting a namespace that still has processes only removes its name, and the
    namespace lives on, unnamed, until its last process ends; since the member's veth pair is
    deleted first, such leftovers are cut off from everything.
    """

    def __init__(self, network: str | None = None) -> None:
        """Prepare a Lan; ``network`` picks the subnet instead of a random free one."""
        self._requested = None if network is None else _parse_network(network)
        self.prefix = f"{_NAME_STEM}{secrets.token_hex(3)}"
        """Start of the name of every namespace and interface this Lan creates."""
        self._hub = f"{self.prefix}hub"
        self._bridge = f"{self.prefix}br"
        self._host_if = f"{self.prefix}h"
        self._host_port = f"{self.prefix}hp"
        self._state = "new"
        self._network: ipaddress.IPv4Network | None = None
        self._host_ip = ""
        self._addresses: Iterator[ipaddress.IPv4Address] = iter(())
        self._members: list[Member] = []
        self._serial = 0
        # How to delete each thing created so far, oldest first: (namespace, ip arguments).
        self._undo: list[tuple[str | None, list[str]]] = []

    @property
    def host_ip(self) -> str:
        """The test process's IPv4 address on the Lan (no prefix length)."""
        self._require_open()
        return self._host_ip

    @property
    def network(self) -> ipaddress.IPv4Network:
        """The Lan's subnet."""
        self._require_open()
        assert self._network is not None
        return self._network

    @property
    def members(self) -> tuple[Member, ...]:
        """The namespaces added so far, oldest first."""
        return tuple(self._members)

    def __enter__(self) -> Lan:
        if self._state != "new":
            raise NetnsError(f"Lan {self.prefix} was already used; create a new one")
        self._state = "open"
        try:
            self._create(None, ["netns", "add", self._hub], undo=["netns", "del", self._hub])
            self._create(
                self._hub,
                ["link", "add", self._bridge, "type", "bridge"],
                undo=["link", "del", self._bridge],
            )
            _ip("link", "set", self._bridge, "up", netns=self._hub)
            self._attach_host()
        except BaseException as exc:
            self.__exit__(type(exc), exc, exc.__traceback__)
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self.close()
        except NetnsError as cleanup_error:
            if exc is None:
                raise
            exc.add_note(str(cleanup_error))

    def close(self) -> None:
        """Delete everything this Lan created, newest first; later calls do nothing.

        A failing deletion does not stop the others; the failures are raised together at the end.
        """
        self._state = "closed"
        problems: list[str] = []
        interrupt: BaseException | None = None
        while self._undo:
            netns, args = self._undo.pop()
            try:
                _ip(*args, netns=netns)
            except NetnsError as exc:
                problems.append(str(exc))
            except BaseException as exc:  # e.g. KeyboardInterrupt: finish cleaning up first
                interrupt = interrupt or exc
        if interrupt is not None:
            raise interrupt
        if problems:
            raise NetnsError(
                f"Lan {self.prefix} could not delete everything it created: " + "; ".join(problems)
            )

    def add_namespace(self) -> Member:
        """Create a namespace attached to the bridge, with the next free address and ``lo`` up."""
        self._require_open()
        address = next(self._addresses, None)
        if address is None:
            raise NetnsError(f"Lan network {self._network} has no address left for a member")
        self._serial += 1
        name, port, inner = (f"{self.prefix}{kind}{self._serial}" for kind in "mpe")
        assert len(port) <= _MAX_IFNAME and len(inner) <= _MAX_IFNAME
        self._create(None, ["netns", "add", name], undo=["netns", "del", name])
        # Deleting the hub end deletes the pair, even if the member namespace outlives its name.
        self._create(
            self._hub,
            ["link", "add", port, "type", "veth", "peer", "name", inner, "netns", name],
            undo=["link", "del", port],
        )
        _ip("link", "set", port, "master", self._bridge, "up", netns=self._hub)
        _ip("addr", "add", f"{address}/{self.network.prefixlen}", "dev", inner, netns=name)
        _ip("link", "set", inner, "up", netns=name)
        _ip("link", "set", "lo", "up", netns=name)
        member = Member(self, name, str(address), port)
        self._members.append(member)
        return member

    def _attach_host(self) -> None:
        """Connect the root namespace to the bridge, on a subnet nothing else there uses."""
        for _ in range(_SUBNET_ATTEMPTS):
            network = self._pick_network()
            addresses = network.hosts()
            host_ip = next(addresses)
            peer = ["peer", "name", self._host_port, "netns", self._hub]
            self._create(
                None,
                ["link", "add", self._host_if, "type", "veth", *peer],
                undo=["link", "del", self._host_if],
            )
            _ip("link", "set", self._host_port, "master", self._bridge, "up", netns=self._hub)
            _ip("addr", "add", f"{host_ip}/{network.prefixlen}", "dev", self._host_if)
            _ip("link", "set", self._host_if, "up")
            # Someone else may have taken the same subnet since it was picked.
            users = _subnet_users(network, ignore_dev=self._host_if)
            if not users:
                self._network, self._host_ip, self._addresses = network, str(host_ip), addresses
                return
            netns, args = self._undo.pop()
            _ip(*args, netns=netns)
            if self._requested is not None:
                raise NetnsError(f"Lan network {network} is already in use: {', '.join(users)}")
        raise NetnsError(f"found no free subnet for a Lan in {_SUBNET_ATTEMPTS} attempts")

    def _pick_network(self) -> ipaddress.IPv4Network:
        """The requested subnet if it is free, else a random free 10.R.0.0/24."""
        if self._requested is not None:
            users = _subnet_users(self._requested)
            if users:
                raise NetnsError(
                    f"Lan network {self._requested} is already in use: {', '.join(users)}"
                )
            return self._requested
        for _ in range(_SUBNET_ATTEMPTS):
            candidate = ipaddress.IPv4Network(f"10.{16 + secrets.randbelow(239)}.0.0/24")
            if not _subnet_users(candidate):
                return candidate
        raise NetnsError(f"found no free 10.R.0.0/24 subnet in {_SUBNET_ATTEMPTS} attempts")

    def _create(self, netns: str | None, args: list[str], undo: list[str]) -> None:
        """Run an ``ip`` command that creates something, and remember how to delete it."""
        _ip(*args, netns=netns)
        self._undo.append((netns, undo))

    def _set_port(self, port: str, up: bool) -> None:
        """Bring a member's bridge port up or down."""
        self._require_open()
        _ip("link", "set", port, "up" if up else "down", netns=self._hub)

    def _require_open(self) -> None:
        if self._state != "open":
            raise NetnsError(f"Lan {self.prefix} is not open; use it in a `with` block")
