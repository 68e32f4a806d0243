"""Nodes recompute each epoch's committee and each job's masters from public chain data.

`Web3Chain.election_table` reads back what an election drew from (on the
embedded chain and on anvil, whose historical state reads differ), and
`CommitteeView` redoes the draw with `consensus.election` and compares it with
what the registry stored; the expected committees are the registry's own.
"""

from __future__ import annotations

import dataclasses
import logging
import socket
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import pytest
import trio
import trio.testing
from chain.conftest import BACKENDS
from chain.market import Market, isolated_market, market_on, open_job
from web3 import EthereumTesterProvider, Web3

from ravenp2p.chain.artifacts import load_artifact
from ravenp2p.chain.base import ChainError, ElectionTable
from ravenp2p.chain.deploy import RAVEN, DeployParams
from ravenp2p.chain.devchain import EmbeddedChain
from ravenp2p.chain.web3chain import Web3Chain
from ravenp2p.roles.committee import CommitteeMismatch, CommitteeView, verify_committee

if TYPE_CHECKING:
    from chain.conftest import ChainEnv

WAIT_S = 10.0  # the longest any test waits for the view to catch up


@pytest.fixture(scope="module")
def embedded_prepared(embedded_env: ChainEnv) -> Iterator[Market]:
    with market_on(embedded_env) as market:
        yield market


@pytest.fixture(scope="module")
def anvil_prepared(anvil_env: ChainEnv) -> Iterator[Market]:
    with market_on(anvil_env) as market:
        yield market


@pytest.fixture
def market(embedded_prepared: Market) -> Iterator[Market]:
    """The market on the embedded chain, isolated per test."""
    with isolated_market(embedded_prepared) as isolated:
        yield isolated


@pytest.fixture(params=BACKENDS)
def any_market(request: pytest.FixtureRequest) -> Iterator[Market]:
    """The market on each backend in turn, isolated per test."""
    prepared: Market = request.getfixturevalue(f"{request.param}_prepared")
    with isolated_market(prepared) as isolated:
        yield isolated


def registry_at(market: Market) -> Callable[[str, int, object], object]:
    """Call a registry view at a given block (the `Chain` API reads the latest state only)."""
    w3 = market.requester.w3
    registry = w3.eth.contract(
        address=market.env.deployment.registry, abi=load_artifact("StakeRegistry").abi
    )

    def call(function: str, block: int, *args: object) -> object:
        return getattr(registry.functions, function)(*args).call(block_identifier=block)

    return call


async def stakes_now(chain: Web3Chain, nodes: list[str]) -> tuple[int, ...]:
    return tuple([(await chain.stake_of(node)).active for node in nodes])


async def elect_next_epoch(market: Market) -> int:
    """Move to the next epoch and elect its committee; return the epoch."""
    market.env.advance_time(market.env.params.epoch_length)
    await market.outsider.elect()
    return await market.outsider.current_epoch()


async def set_stakes(market: Market, targets: list[int]) -> None:
    """Give node i an active stake of `targets[i]`; those at the minimum or above stand."""
    env, reader = market.env, market.requester
    minimum = env.params.min_master_stake
    for node, target in zip(env.nodes, targets, strict=True):
        active = (await reader.stake_of(node.address)).active
        if target > active:
            await env.mint(node.address, target - active)
            await node.stake(target - active)
        elif target < active:
            await node.request_unbond(active - target)
        if target >= minimum and node.address not in await reader.candidates():
            await node.become_candidate()


# ------------------------------------------------------------------ election table


async def test_election_table_is_the_state_the_election_read(any_market: Market) -> None:
    market, reader = any_market, any_market.requester
    epoch = market.epoch
    candidates = await reader.candidates()
    stakes = await stakes_now(reader, candidates)
    params = await reader.registry_params()
    table = await reader.election_table(epoch)

    assert table.epoch == epoch
    assert list(table.candidates) == candidates
    assert table.stakes == stakes
    assert table.minimum == params.min_master_stake
    assert table.committee_size == params.committee_size
    assert list(table.committee) == await reader.committee(epoch)
    assert table.seed == await reader.epoch_seed(epoch)
    call = registry_at(market)
    assert call("isElected", table.block, epoch) is True
    assert call("isElected", table.block - 1, epoch) is False
    assert verify_committee(table, market.env.deployment.registry) == list(table.committee)

    # Stake moves after the election change neither the table nor the recomputed committee.
    first, second = market.masters[0], market.masters[1]
    await first.request_unbond((await reader.stake_of(first.address)).active)
    await market.env.mint(second.address, 1_000 * RAVEN)
    await second.stake(1_000 * RAVEN)
    await market.workers[0].become_candidate()
    assert await reader.candidates() != candidates
    again = await reader.election_table(epoch)
    assert again == table
    assert await CommitteeView(reader).committee(epoch) == await reader.committee(epoch)


@pytest.mark.parametrize(
    "targets",
    [
        pytest.param([150, 0, 0, 0, 0, 0], id="one candidate"),
        pytest.param([500, 500, 500, 500, 500, 500], id="equal stakes"),
        pytest.param([100, 100, 100, 100, 100, 20_000], id="one whale at minimum stakes"),
        pytest.param([101, 2_000, 350, 0, 777, 4_000], id="uneven"),
    ],
)
async def test_view_draws_the_registry_committee_across_epochs(
    market: Market, targets: list[int]
) -> None:
    reader = market.requester
    await set_stakes(market, [t * RAVEN for t in targets])
    for round_ in range(2):
        candidates = await reader.candidates()
        stakes = await stakes_now(reader, candidates)
        epoch = await elect_next_epoch(market)
        stored = await reader.committee(epoch)
        assert len(stored) == min(market.env.params.committee_size, len(candidates))

        # Reshuffle the stakes before checking: the draw must still come out the same.
        member = market.chain_of(stored[0])
        await market.env.mint(member.address, (round_ + 1) * 300 * RAVEN)
        await member.stake((round_ + 1) * 300 * RAVEN)
        table = await reader.election_table(epoch)
        assert (list(table.candidates), table.stakes) == (candidates, stakes)
        assert await CommitteeView(reader).committee(epoch) == stored


async def test_table_replays_registry_changes_earlier_in_the_election_block(
    market: Market,
) -> None:
    """On a chain with several transactions per block, the state before the election is
    the previous block's state updated with the earlier transactions of its own block."""
    env, reader = market.env, market.requester
    dev = env.dev
    assert isinstance(dev, EmbeddedChain)
    topped_up, leaving = market.masters[0], market.masters[1]
    joining, late = market.workers
    await env.mint(topped_up.address, 400 * RAVEN)
    env.advance_time(env.params.epoch_length)
    in_one_block = [
        (topped_up.stake, 400 * RAVEN),
        (joining.become_candidate,),
        (leaving.request_unbond, 100 * RAVEN),
        (market.outsider.elect,),
        (late.become_candidate,),  # after the election: not part of its table
    ]
    dev.tester.disable_auto_mine_transactions()
    try:
        with trio.fail_after(WAIT_S):
            async with trio.open_nursery() as nursery:
                for send, *args in in_one_block:  # one at a time, so they enter the block in order
                    nursery.start_soon(send, *args)
                    await trio.testing.wait_all_tasks_blocked()
                dev.tester.mine_blocks()
    finally:
        dev.tester.enable_auto_mine_transactions()

    epoch = await reader.current_epoch()
    table = await reader.election_table(epoch)
    block = reader.w3.eth.get_block(table.block)
    assert len(block["transactions"]) == len(in_one_block)
    seen_by_election = [c for c in await reader.candidates() if c != late.address]
    assert list(table.candidates) == seen_by_election
    assert joining.address in table.candidates and leaving.address not in table.candidates
    assert table.stakes == await stakes_now(reader, seen_by_election)
    before_block = registry_at(market)("candidates", table.block - 1)
    assert list(table.candidates) != before_block  # so the replay made the difference
    assert await CommitteeView(reader).committee(epoch) == await reader.committee(epoch)


async def test_not_elected_epochs_are_a_clear_error(market: Market) -> None:
    reader = market.requester
    later = market.epoch + 1
    with pytest.raises(ChainError, match=f"epoch {later} is not elected"):
        await reader.election_table(later)
    market.env.advance_time(2 * market.env.params.epoch_length)  # `later` passes unelected
    view = CommitteeView(reader)
    with pytest.raises(ChainError, match=f"epoch {later} is not elected") as caught:
        await view.committee(later)
    assert not isinstance(caught.value, CommitteeMismatch)
    with pytest.raises(ValueError, match="epoch must be an integer"):
        await reader.election_table("1")  # type: ignore[arg-type]


# ------------------------------------------------------------------ verification step


async def test_tampered_tables_are_refused(market: Market) -> None:
    reader = market.requester
    registry = market.env.deployment.registry
    table = await reader.election_table(market.epoch)
    stored = list(table.committee)
    assert len(stored) > 1

    reordered = dataclasses.replace(table, committee=tuple(reversed(stored)))
    with pytest.raises(CommitteeMismatch, match="committee") as caught:
        verify_committee(reordered, registry)
    assert str(stored) in str(caught.value) and str(stored[::-1]) in str(caught.value)

    # Only the last candidate keeps a master's stake: the draw can elect no one else.
    below = table.minimum - 1
    lone = dataclasses.replace(
        table, stakes=(*[below] * (len(table.stakes) - 1), table.stakes[-1])
    )
    with pytest.raises(CommitteeMismatch) as caught:
        verify_committee(lone, registry)
    assert caught.value.computed == [table.candidates[-1]]
    assert caught.value.stored == stored

    reseeded = dataclasses.replace(table, seed=bytes(32))
    with pytest.raises(CommitteeMismatch, match=f"epoch {table.epoch} seed"):
        verify_committee(reseeded, registry)
    with pytest.raises(CommitteeMismatch, match="seed"):
        verify_committee(table, market.env.deployment.escrow)  # another contract's seed

    negative = dataclasses.replace(table, stakes=(-1, *table.stakes[1:]))
    with pytest.raises(ChainError, match=r"election table is invalid: .*negative stake"):
        verify_committee(negative, registry)


def test_election_table_refuses_malformed_fields() -> None:
    fields = dict(
        epoch=0, block=1, parent_hash=bytes(32), seed=bytes(32), candidates=("0x" + "11" * 20,),
        stakes=(1,), minimum=1, committee_size=1, committee=(),
    )
    assert ElectionTable(**fields).candidates == ("0x" + "11" * 20,)  # type: ignore[arg-type]
    for change, message in [
        ({"stakes": (1, 2)}, "1 candidates but 2 stakes"),
        ({"seed": b"short"}, "seed: must be 32 bytes"),
        ({"committee": ("0x1234",)}, "committee: not a 0x-prefixed 20-byte hex address"),
    ]:
        with pytest.raises(ValueError, match=message):
            ElectionTable(**{**fields, **change})  # type: ignore[arg-type]


# ------------------------------------------------------------------ jobs and timeout


async def test_job_masters_match_the_escrow_ranking(any_market: Market) -> None:
    market, reader = any_market, any_market.requester
    view = CommitteeView(reader)
    assert await view.job_masters(market.job_id) == await reader.ranked_masters(market.job_id)
    assert await view.job_masters(market.job_id) == [c.address for c in market.ranked]

    market.env.advance_time(market.env.params.epoch_length)
    later = await open_job(market.env, reader, "a job of the next epoch")
    assert (await reader.job(later)).epoch == market.epoch + 1
    assert await view.job_masters(later) == await reader.ranked_masters(later)

    with pytest.raises(ChainError, match="is not in the escrow"):
        await view.job_masters(bytes(range(32)))


async def test_master_timeout_is_the_escrows(market: Market) -> None:
    assert DeployParams().master_timeout == 10
    view = CommitteeView(market.requester)
    assert await market.requester.master_timeout() == market.env.params.master_timeout
    assert await view.master_timeout() == market.env.params.master_timeout


def test_view_refuses_bad_intervals(market: Market) -> None:
    with pytest.raises(ValueError, match="poll_s must be positive"):
        CommitteeView(market.requester, poll_s=0)
    with pytest.raises(ValueError, match="timeout_s must be positive"):
        CommitteeView(market.requester, timeout_s=-1)


# ------------------------------------------------------------------ following epochs


def closed_port_url() -> str:
    """An http URL nothing listens on: every request to it fails to connect."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


async def wait_for(condition: Callable[[], bool], what: str) -> None:
    with trio.move_on_after(WAIT_S):
        while not condition():
            await trio.sleep(0.005)
    assert condition(), f"gave up waiting for {what}"


async def test_run_follows_epochs_and_outlives_chain_failures(
    market: Market, caplog: pytest.LogCaptureFixture
) -> None:
    env = market.env
    dev = env.dev
    assert isinstance(dev, EmbeddedChain)
    # The view's own connection to the chain, which the test can cut and restore.
    w3 = Web3(EthereumTesterProvider(dev.tester))
    node = Web3Chain(w3, env.deployment, env.identities[5].private_key.secret)
    working, dead = w3.provider, Web3.HTTPProvider(closed_port_url())
    view = CommitteeView(node, poll_s=0.01)
    caplog.set_level(logging.DEBUG, logger="ravenp2p.committee")

    def warnings() -> list[str]:
        return [
            r.getMessage() for r in caplog.records
            if r.name == "ravenp2p.committee" and r.levelno == logging.WARNING
        ]

    def committees_logged() -> list[str]:
        return [
            r.getMessage() for r in caplog.records
            if r.name == "ravenp2p.committee" and r.levelno == logging.INFO
        ]

    async with trio.open_nursery() as nursery:
        w3.provider = dead
        await nursery.start(view.run)  # starts even though the chain is unreachable
        assert view.epoch is None and view.current_committee is None
        assert len(warnings()) == 1 and "cannot reach" in warnings()[0]
        w3.provider = working
        first = market.epoch
        stored = await market.requester.committee(first)
        await wait_for(lambda: view.current_committee == stored, "the first committee")
        assert view.epoch == first

        env.advance_time(env.params.epoch_length)
        await wait_for(lambda: view.epoch == first + 1, "the epoch change")
        await trio.sleep(5 * view.poll_s)
        assert view.current_committee is None  # not elected yet
        await market.outsider.elect()
        stored = await market.requester.committee(first + 1)
        await wait_for(lambda: view.current_committee == stored, "the second committee")
        assert view.epoch == first + 1

        w3.provider = dead
        env.advance_time(env.params.epoch_length)
        await market.outsider.elect()
        await wait_for(lambda: len(warnings()) == 2, "a warning for the outage")
        await trio.sleep(5 * view.poll_s)  # failing polls: logged once, the view holds on
        assert len(warnings()) == 2 and view.epoch == first + 1
        w3.provider = working
        stored = await market.requester.committee(first + 2)
        # Two epochs may draw the same committee: wait for the epoch as well.
        await wait_for(
            lambda: (view.epoch, view.current_committee) == (first + 2, stored),
            "the third committee",
        )
        nursery.cancel_scope.cancel()

    logged = committees_logged()
    assert [m.split(":")[0] for m in logged] == [f"epoch {first + i} committee" for i in range(3)]
