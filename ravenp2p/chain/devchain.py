"""Development chains: an in-process eth-tester chain and a local anvil node.

Both offer the same helpers (a pre-funded account, funding, time travel,
snapshots), so tests and the devnet run unchanged on either. `connect` turns a
chain URL from the command line into a `Web3`.
"""

from __future__ import annotations

import os
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import trio
from eth_account import Account
from eth_tester import EthereumTester, PyEVMBackend
from eth_utils import to_checksum_address
from web3 import EthereumTesterProvider, Web3

from ravenp2p.chain.base import ChainError
from ravenp2p.chain.errors import chain_errors

EMBEDDED = "embedded"
ANVIL_ENV = "RAVENP2P_ANVIL"
ANVIL_RELATIVE_PATH = Path("node_modules/@foundry-rs/anvil-linux-amd64/bin/anvil")
# anvil's well-known development mnemonic: its accounts are public, never use them elsewhere.
ANVIL_MNEMONIC = "test test test test test test test test test test test junk"
HTTP_TIMEOUT = 10.0


def _wait_mined(w3: Web3, tx_hash: Any) -> None:
    receipt = w3.eth.wait_for_transaction_receipt(tx_hash, timeout=30, poll_latency=0.05)
    if receipt["status"] != 1:
        raise ChainError(f"transaction {tx_hash.to_0x_hex()} failed")


class EmbeddedChain:
    """An in-process chain (eth-tester on py-evm): no process, no port, instant blocks."""

    def __init__(self) -> None:
        self.tester = EthereumTester(PyEVMBackend())
        self.w3 = Web3(EthereumTesterProvider(self.tester))
        self._funder = str(self.tester.get_accounts()[0])

    @property
    def funded_secret(self) -> bytes:
        """The secret of a pre-funded account (holds a large ETH balance)."""
        return bytes(self.tester.backend.account_keys[0].to_bytes())

    def fund(self, address: str, wei: int) -> None:
        """Send `wei` of ETH to `address` from the pre-funded account."""
        with chain_errors(self.w3, "chain", "fund"):
            tx = self.w3.eth.send_transaction(
                {"from": self._funder, "to": to_checksum_address(address), "value": wei}
            )
            _wait_mined(self.w3, tx)

    async def keep_time(self, block_time_s: float = 1.0) -> None:
        """Mine a block every `block_time_s` seconds, until cancelled, like a real chain.

        eth-tester stamps each block one second after its parent, however long
        ago that was, so an idle embedded chain's clock stands still and
        timeouts judged by it (a master's failover) never expire. With this
        task running it never falls behind the wall clock, and it advances at
        least a second per second when ahead (blocks came faster than one a
        second).
        """
        await _tick(self.tick, block_time_s)

    def tick(self) -> None:
        """Mine one block: at the wall-clock time if the chain's clock is behind it."""
        latest = int(self.w3.eth.get_block("latest")["timestamp"])
        self.advance_time(max(0, int(time.time()) - latest))

    def advance_time(self, seconds: int) -> None:
        """Move the chain clock forward by `seconds` and mine a block at the new time."""
        if seconds < 0:
            raise ValueError(f"cannot move a chain's clock backwards ({seconds} s)")
        latest = int(self.w3.eth.get_block("latest")["timestamp"])
        if seconds:
            self.tester.time_travel(latest + seconds)
        self.tester.mine_blocks()

    def snapshot(self) -> int:
        """Remember the current state; `revert` returns to it."""
        return int(self.tester.take_snapshot())

    def revert(self, snapshot_id: int) -> None:
        """Return to a snapshot, forgetting every block mined since."""
        self.tester.revert_to_snapshot(snapshot_id)


def anvil_path() -> Path | None:
    """The anvil binary to run: $RAVENP2P_ANVIL if set, else the one under node_modules/.

    None when the variable is unset and no anvil is installed there.
    """
    configured = os.environ.get(ANVIL_ENV)
    if configured:
        return Path(configured)
    installed = Path(__file__).resolve().parents[2] / ANVIL_RELATIVE_PATH
    return installed if installed.is_file() else None


def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class Anvil:
    """A local anvil node (Prague rules), started and stopped by this object.

    It listens on `host`: loopback by default, or an address of a test network.

    Use as a context manager, or call `start()` and `stop()`.
    """

    def __init__(
        self, binary: Path | None = None, start_timeout: float = 15.0, host: str = "127.0.0.1"
    ) -> None:
        self.host = host
        self.binary = Path(binary) if binary is not None else anvil_path()
        self.start_timeout = start_timeout
        self.port = 0
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._w3: Web3 | None = None

    @property
    def url(self) -> str:
        """The node's JSON-RPC URL."""
        if self._process is None:
            raise ChainError("anvil is not running")
        return f"http://{self.host}:{self.port}"

    @property
    def w3(self) -> Web3:
        """A connection to the running node."""
        if self._w3 is None:
            raise ChainError("anvil is not running")
        return self._w3

    @property
    def funded_secret(self) -> bytes:
        """The secret of anvil's pre-funded account 0 (derived from the development mnemonic)."""
        Account.enable_unaudited_hdwallet_features()
        return bytes(Account.from_mnemonic(ANVIL_MNEMONIC).key)

    def start(self) -> Anvil:
        """Start the node on a free port and wait until it answers JSON-RPC."""
        if self._process is not None:
            raise ChainError("anvil is already running")
        if self.binary is None:
            raise ChainError(
                f"anvil is not installed: run 'npm ci' or point ${ANVIL_ENV} at an anvil binary"
            )
        if not self.binary.is_file() or not os.access(self.binary, os.X_OK):
            raise ChainError(
                f"no executable anvil at {self.binary}; install it with 'npm ci' or point "
                f"${ANVIL_ENV} at one"
            )
        for _ in range(3):  # another process may grab the free port before anvil binds it
            self.port = _free_port(self.host)
            self._log = tempfile.TemporaryFile()  # noqa: SIM115 (closed by stop())
            self._process = subprocess.Popen(
                [
                    str(self.binary),
                    "--host", self.host,
                    "--port", str(self.port),
                    "--hardfork", "prague",
                    "--mnemonic", ANVIL_MNEMONIC,
                ],
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
            )
            try:
                ready = self._wait_ready()
            except ChainError:
                self.stop()
                raise
            if ready:
                return self
            self.stop()
        raise ChainError(f"anvil at {self.binary} did not start")

    def _output_tail(self) -> str:
        if self._log is None:
            return ""
        self._log.seek(0)
        return self._log.read().decode(errors="replace")[-2000:]

    def _wait_ready(self) -> bool:
        assert self._process is not None
        w3 = Web3(Web3.HTTPProvider(
            f"http://{self.host}:{self.port}", request_kwargs={"timeout": HTTP_TIMEOUT}
        ))
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                if "in use" in self._output_tail().lower():
                    return False
                raise ChainError(
                    f"anvil exited with status {self._process.returncode}: {self._output_tail()}"
                )
            try:
                w3.eth.get_block_number()
            except Exception:  # not listening yet
                time.sleep(0.05)
                continue
            self._w3 = w3
            return True
        raise ChainError(f"anvil did not answer on port {self.port} within {self.start_timeout} s")

    def stop(self) -> None:
        """Stop the node: terminate, wait, kill if it lingers."""
        process, self._process, self._w3 = self._process, None, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> Anvil:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def _rpc(self, method: str, params: list[Any]) -> Any:
        with chain_errors(self.w3, "anvil", method):
            response = self.w3.provider.make_request(method, params)  # type: ignore[arg-type]
        if "error" in response:
            raise ChainError(f"anvil {method} failed: {response['error']}")
        return response.get("result")

    def fund(self, address: str, wei: int) -> None:
        """Send `wei` of ETH to `address` from the pre-funded account."""
        w3 = self.w3
        with chain_errors(w3, "chain", "fund"):
            tx = w3.eth.send_transaction(
                {"from": w3.eth.accounts[0], "to": to_checksum_address(address), "value": wei}
            )
            _wait_mined(w3, tx)

    async def keep_time(self, block_time_s: float = 1.0) -> None:
        """Mine a block every `block_time_s` seconds, until cancelled (see `EmbeddedChain`).

        anvil stamps a block with the wall clock unless its parent is newer,
        so after a burst of transactions its idle clock stands still too.
        """
        await _tick(self.tick, block_time_s)

    def tick(self) -> None:
        """Mine one block."""
        self._rpc("evm_mine", [])

    def advance_time(self, seconds: int) -> None:
        """Move the chain clock forward by `seconds` and mine a block at the new time."""
        if seconds < 0:
            raise ValueError(f"cannot move a chain's clock backwards ({seconds} s)")
        self._rpc("evm_increaseTime", [seconds])
        self._rpc("evm_mine", [])

    def snapshot(self) -> int:
        """Remember the current state; `revert` returns to it (once: anvil then drops it)."""
        return int(self._rpc("evm_snapshot", []), 16)

    def revert(self, snapshot_id: int) -> None:
        """Return to a snapshot, forgetting every block mined since."""
        if not self._rpc("evm_revert", [hex(snapshot_id)]):
            raise ChainError(f"anvil has no snapshot {snapshot_id}")


DevChain = EmbeddedChain | Anvil


async def _tick(tick: Callable[[], None], block_time_s: float) -> None:
    if not block_time_s > 0:
        raise ValueError(f"block_time_s must be positive, got {block_time_s}")
    while True:
        await trio.sleep(block_time_s)
        tick()
"""A development chain: either offers `w3`, `funded_secret`, `fund`, `advance_time`, snapshots."""


def connect(url: str | None) -> Web3:
    """A `Web3` for `url`: a fresh embedded chain for None or "embedded", else an HTTP node.

    Checks that the node answers; a `ChainError` names the URL when it does not.
    """
    if url is None or url == EMBEDDED:
        return EmbeddedChain().w3
    if not url.startswith(("http://", "https://")):
        raise ChainError(f"chain URL {url!r}: expected 'embedded' or an http(s):// JSON-RPC URL")
    w3 = Web3(Web3.HTTPProvider(url, request_kwargs={"timeout": HTTP_TIMEOUT}))
    try:
        w3.eth.get_block_number()
    except Exception as exc:
        raise ChainError(f"the Ethereum node at {url} does not answer: {exc}") from exc
    return w3
