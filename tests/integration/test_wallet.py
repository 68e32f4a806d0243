"""`ravenp2p wallet`, `stake`, `unstake` and `withdraw` against a real anvil node.

One anvil and one deployment serve the module; each test works with node keys
of its own. The commands run through the CLI's `main` in this process (the
same code the console script runs), and twice as a real subprocess.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trio
from cli_run import cli, cli_json, one_line_error

from consensus.abi import keccak256
from consensus.settlement import settle as settle_offchain
from ravenp2p.chain.base import Deployment
from ravenp2p.chain.deploy import deploy_contracts, save_deployment
from ravenp2p.chain.devchain import Anvil, anvil_path
from ravenp2p.chain.web3chain import Web3Chain
from ravenp2p.cli import EXIT_FAILED, EXIT_OK, EXIT_USAGE
from ravenp2p.identity import NodeIdentity, create_identity
from ravenp2p.training.spec import format_amount
from ravenp2p.wallet import utc

pytestmark = pytest.mark.skipif(
    anvil_path() is None, reason="anvil is not installed (run `make install`)"
)

RAVEN = 10**18
ETH = 10**18
TX_HASH = re.compile(r"0x[0-9a-f]{64}")
CLI = [str(Path(sys.executable).with_name("ravenp2p"))]


@dataclass
class Net:
    """The module's anvil node, its deployment (and file), and the token's owner."""

    anvil: Anvil
    deployment: Deployment
    contracts: Path
    owner: Web3Chain

    def node(self, data_dir: Path, raven: int = 0, eth: int = ETH) -> NodeIdentity:
        """A new node key in `data_dir`, with `eth` wei for gas and `raven` base units minted."""
        identity = create_identity(data_dir)
        if eth:
            self.anvil.fund(identity.address, eth)
        if raven:
            trio.run(self.owner.mint, identity.address, raven)
        return identity

    def chain_of(self, identity: NodeIdentity) -> Web3Chain:
        """The library's chain object for a key, to do what the CLI does not (settle, claim)."""
        return Web3Chain(self.anvil.w3, self.deployment, identity.private_key.secret)

    def flags(self, data_dir: Path) -> list[str]:
        return ["--data-dir", str(data_dir), "--chain", self.anvil.url,
                "--contracts", str(self.contracts)]


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Net]:
    with Anvil() as anvil:
        # Not anvil's funded account, which `fund` sends from: the owner's nonce stays its own.
        secret = NodeIdentity.generate().private_key.secret
        anvil.fund(NodeIdentity.from_secret(secret).address, 100 * ETH)
        deployment = deploy_contracts(anvil.w3, secret)
        contracts = tmp_path_factory.mktemp("deployment") / "contracts.json"
        save_deployment(deployment, contracts)
        owner = Web3Chain(anvil.w3, deployment, secret)
        yield Net(anvil, deployment, contracts, owner)


def test_stake_unstake_and_withdraw_move_raven_between_wallet_and_stake(
    net: Net, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data_dir = tmp_path / "node"
    node = net.node(data_dir, raven=300 * RAVEN)
    flags = net.flags(data_dir)
    delay = trio.run(net.owner.registry_params).unbonding_delay

    before = cli_json(capsys, "wallet", *flags)
    assert before["address"] == node.address
    assert before["chain_id"] == net.deployment.chain_id
    assert before["eth_wei"] == str(net.anvil.w3.eth.get_balance(node.address))
    assert before["raven"] == str(300 * RAVEN)
    assert before["stake"] == {"active": "0", "unbonding": "0", "release_time": None,
                               "release_at": None, "release_in_s": None, "withdrawable": False}
    assert (before["candidate"], before["partner"], before["partner_of"]) == (False, None, [])
    assert before["earnings"] == {"claimed": "0", "claims": 0, "master_fees": "0",
                                  "settled_jobs": 0, "total": "0"}

    staked = cli_json(capsys, "stake", "200", *flags)
    assert TX_HASH.fullmatch(staked["tx"])
    assert net.anvil.w3.eth.get_transaction_receipt(staked["tx"])["status"] == 1
    assert (staked["action"], staked["amount"]) == ("stake", str(200 * RAVEN))
    assert (staked["stake"]["active"], staked["raven"]) == (str(200 * RAVEN), str(100 * RAVEN))
    assert trio.run(net.owner.stake_of, node.address).active == 200 * RAVEN

    code, out, err = cli(capsys, "unstake", "50.5", *flags)
    assert code == EXIT_OK, err
    stake = trio.run(net.owner.stake_of, node.address)
    assert (stake.active, stake.unbonding) == (RAVEN * 1495 // 10, RAVEN * 505 // 10)
    tx = TX_HASH.search(out)
    assert tx is not None
    mined_at = net.anvil.w3.eth.get_block(
        net.anvil.w3.eth.get_transaction_receipt(tx.group())["blockNumber"])["timestamp"]
    assert stake.release_time == mined_at + delay
    assert f"withdrawable at {utc(stake.release_time)} (in {delay} s)" in out
    assert "149.5 RAVEN stays active" in out

    waiting = cli_json(capsys, "wallet", *flags)
    assert waiting["stake"]["unbonding"] == str(RAVEN * 505 // 10)
    assert waiting["stake"]["release_time"] == stake.release_time
    assert waiting["stake"]["release_at"] == utc(stake.release_time)
    assert waiting["stake"]["release_in_s"] == stake.release_time - waiting["chain_time"] > 0
    assert waiting["stake"]["withdrawable"] is False

    code, _, err = cli(capsys, "withdraw", *flags)
    assert code == EXIT_FAILED
    line = one_line_error(err)
    assert "withdraw: refused:" in line and "StillUnbonding" in line
    assert f"until {utc(stake.release_time)}" in line

    net.anvil.advance_time(delay)
    due = cli_json(capsys, "wallet", *flags)
    assert (due["stake"]["release_in_s"], due["stake"]["withdrawable"]) == (0, True)
    withdrawn = cli_json(capsys, "withdraw", *flags)
    assert (withdrawn["action"], withdrawn["amount"]) == ("withdraw", str(RAVEN * 505 // 10))
    assert withdrawn["raven"] == str(RAVEN * 1505 // 10)
    assert withdrawn["stake"]["unbonding"] == "0" and withdrawn["stake"]["release_at"] is None
    assert trio.run(net.owner.balance_of, node.address) == RAVEN * 1505 // 10

    code, out, _ = cli(capsys, "wallet", *flags)
    assert code == EXIT_OK
    rows = dict(re.split(r"\s{2,}", line, maxsplit=1) for line in out.splitlines())
    assert rows["address"] == node.address
    assert rows["wallet"] == "150.5 RAVEN"
    assert rows["staked"] == "149.5 RAVEN active"
    assert rows["unbonding"] == "none"
    assert rows["candidate"] == "no"  # 149.5 RAVEN is enough, but it never stood
    lines = out.splitlines()
    assert len({line.index(rows[label]) for line, label in zip(lines, rows, strict=True)}) == 1


def test_earnings_show_claims_for_worker_and_partner_and_master_fees(
    net: Net, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The node stakes, stands, masters a job and works in it; its partner is paid a fee."""
    node_dir = tmp_path / "node"
    node = net.node(node_dir, raven=100 * RAVEN)
    partner = NodeIdentity.generate().address
    other_worker = NodeIdentity.generate().address
    requester = net.node(tmp_path / "requester")
    node_chain, requester_chain = net.chain_of(node), net.chain_of(requester)
    params = trio.run(net.owner.registry_params)
    price, redundancy, calculations = RAVEN // 100, 1, 10
    deposit = 2 * price * redundancy * calculations

    async def stand_and_open_job() -> bytes:
        await node_chain.stake(params.min_master_stake)
        await node_chain.become_candidate()
        await node_chain.set_partner(partner)
        await net.owner.mint(requester.address, deposit)
        job_id = keccak256(f"wallet test job {node.address}".encode())
        deadline = await requester_chain.now() + 3600
        await requester_chain.create_job(job_id, price, redundancy, calculations, deadline,
                                         deposit)
        return job_id

    job_id = trio.run(stand_and_open_job)
    assert trio.run(net.owner.master_of, job_id) == node.address
    credits = {node.address: 4, other_worker: 3}
    plan = settle_offchain(credits, price, {node.address: partner, other_worker: None}, deposit)
    assert plan.master_fee > 0 and plan.amount_of(partner) > 0

    async def settle_and_claim() -> None:
        await node_chain.settle(job_id, plan.root, plan.accepted_results, plan.partner_total)
        for account in (node.address, partner):  # anyone may submit a claim
            await requester_chain.claim(job_id, account, plan.amount_of(account),
                                        plan.proof(account))

    trio.run(settle_and_claim)

    mine = cli_json(capsys, "wallet", *net.flags(node_dir))
    assert (mine["candidate"], mine["partner"]) == (True, partner)
    assert mine["raven"] == str(plan.amount_of(node.address) + plan.master_fee)
    assert mine["earnings"] == {
        "claimed": str(plan.amount_of(node.address)),
        "claims": 1,
        "master_fees": str(plan.master_fee),
        "settled_jobs": 1,
        "total": str(plan.amount_of(node.address) + plan.master_fee),
    }

    # Any address can be looked at without a key: here the data dir holds none.
    no_key = net.flags(tmp_path / "empty")
    theirs = cli_json(capsys, "wallet", *no_key, "--address", partner.lower())
    assert theirs["address"] == partner
    assert theirs["partner_of"] == [node.address]
    assert theirs["raven"] == str(plan.amount_of(partner))
    assert (theirs["earnings"]["claimed"], theirs["earnings"]["claims"]) == (
        str(plan.amount_of(partner)), 1)
    assert theirs["earnings"]["master_fees"] == "0"

    # The requester's refund and the treasury's protocol fee come in the settling
    # transaction, but neither settled the job: no master fee for them.
    treasury = net.owner.address
    for account in (requester.address, treasury):
        view = cli_json(capsys, "wallet", *no_key, "--address", account)
        assert (view["earnings"]["master_fees"], view["earnings"]["settled_jobs"]) == ("0", 0)
    assert cli_json(capsys, "wallet", *no_key, "--address", requester.address)["raven"] == str(
        plan.refund)

    # A leaf counts once it is claimed.
    assert cli_json(capsys, "wallet", *no_key, "--address", other_worker)["earnings"][
        "claims"] == 0
    trio.run(requester_chain.claim, job_id, other_worker, plan.amount_of(other_worker),
             plan.proof(other_worker))
    worker_view = cli_json(capsys, "wallet", *no_key, "--address", other_worker)
    assert (worker_view["earnings"]["claimed"], worker_view["earnings"]["claims"]) == (
        str(plan.amount_of(other_worker)), 1)

    code, out, err = cli(capsys, "wallet", *net.flags(node_dir))
    assert code == EXIT_OK, err
    rows = dict(re.split(r"\s{2,}", line, maxsplit=1) for line in out.splitlines())
    assert rows["candidate"] == "yes" and rows["partner"] == partner
    claimed = format_amount(plan.amount_of(node.address))
    assert rows["claimed"].startswith(f"{claimed} RAVEN from 1 job")
    assert rows["master fees"] == f"{format_amount(plan.master_fee)} RAVEN from 1 settled job"

    # Unbonding below the minimum stake ends the candidacy, and the command says so.
    code, out, err = cli(capsys, "unstake", "1", *net.flags(node_dir))
    assert code == EXIT_OK, err
    assert "no longer a master candidate" in out
    assert node.address not in trio.run(net.owner.candidates)


def test_refusals_are_one_line_errors_naming_the_reason(
    net: Net, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data_dir = tmp_path / "node"
    node = net.node(data_dir, raven=10 * RAVEN)
    flags = net.flags(data_dir)

    code, _, err = cli(capsys, "stake", "20", *flags)
    assert code == EXIT_FAILED
    line = one_line_error(err)
    assert "stake: refused: the wallet holds 10 RAVEN, less than 20 RAVEN" in line
    assert "ERC20InsufficientBalance" in line

    code, _, err = cli(capsys, "unstake", "1", *flags)
    assert code == EXIT_FAILED
    line = one_line_error(err)
    assert "unstake: refused: 1 RAVEN is more than the active stake of 0 RAVEN" in line
    assert "InsufficientStake" in line

    code, _, err = cli(capsys, "withdraw", *flags)
    assert code == EXIT_FAILED
    assert "NothingToWithdraw" in one_line_error(err)
    assert trio.run(net.owner.balance_of, node.address) == 10 * RAVEN  # nothing moved

    broke_dir = tmp_path / "broke"
    broke = net.node(broke_dir, raven=10 * RAVEN, eth=0)
    code, _, err = cli(capsys, "stake", "1", *net.flags(broke_dir))
    assert code == EXIT_FAILED
    assert f"stake: {broke.address} holds no ETH to pay for gas" in one_line_error(err)


def test_bad_input_gives_one_line_errors_before_touching_the_chain(
    net: Net, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    no_key = net.flags(tmp_path / "empty")
    code, _, err = cli(capsys, "wallet", *no_key)
    assert code == EXIT_FAILED
    assert "no node key at" in one_line_error(err)

    for amount, reason in (("12.5.3", "must be a decimal number"), ("-1", "must not be negative"),
                           ("0", "must be more than 0"), ("1e3", "must be a decimal number")):
        code, _, err = cli(capsys, "stake", amount, *no_key)
        assert code == EXIT_USAGE
        assert one_line_error(err).startswith(f"amount: {reason}")

    code, _, err = cli(capsys, "unstake", "1", "--chain", net.anvil.url)
    assert code == EXIT_USAGE
    assert "contracts: a deployment file is needed" in one_line_error(err)
    code, _, err = cli(capsys, "withdraw", "--contracts", str(net.contracts))
    assert code == EXIT_USAGE
    assert "chain: --chain URL is needed" in one_line_error(err)
    code, _, err = cli(capsys, "wallet", *no_key, "--address", "0x1234")
    assert code == EXIT_USAGE
    assert one_line_error(err).startswith("address: ")

    elsewhere = tmp_path / "elsewhere.json"
    save_deployment(Deployment(net.deployment.chain_id + 1, net.deployment.token,
                               net.deployment.registry, net.deployment.escrow), elsewhere)
    code, _, err = cli(capsys, "wallet", "--chain", net.anvil.url, "--contracts", str(elsewhere),
                       "--address", net.owner.address)
    assert code == EXIT_FAILED
    assert f"chain id {net.deployment.chain_id + 1}" in one_line_error(err)


def test_the_console_script_prints_json_and_one_line_errors(net: Net, tmp_path: Path) -> None:
    looked_at = net.owner.address
    shown = subprocess.run(
        [*CLI, "wallet", *net.flags(tmp_path / "empty"), "--address", looked_at, "--json"],
        capture_output=True, text=True, timeout=60,
    )
    assert shown.returncode == EXIT_OK, shown.stderr
    view = json.loads(shown.stdout)
    assert view["address"] == looked_at
    assert view["raven"] == str(trio.run(net.owner.balance_of, looked_at))

    data_dir = tmp_path / "node"
    net.node(data_dir, eth=0)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = sock.getsockname()[1]
    unreachable = subprocess.run(
        [*CLI, "stake", "5", "--data-dir", str(data_dir), "--chain", f"http://127.0.0.1:{closed}",
         "--contracts", str(net.contracts)],
        capture_output=True, text=True, timeout=60,
    )
    assert unreachable.returncode == EXIT_FAILED
    assert f"127.0.0.1:{closed}" in one_line_error(unreachable.stderr)
