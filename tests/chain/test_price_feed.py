"""The RAVEN/USD `PriceFeed` contract, reading it from Python, and a USD-priced job's deposit.

Contract behaviour runs on the embedded chain and on anvil (the `backend`
fixture); the USD job goes through a real devnet: the requester reads the feed,
converts, and deposits, and the escrow holds exactly the converted figures.
"""

from __future__ import annotations

import dataclasses
import math
from fractions import Fraction
from typing import TYPE_CHECKING, Any

import pytest
from web3.logs import DISCARD

from ravenp2p.chain.artifacts import load_artifact
from ravenp2p.chain.base import ChainError, ContractReverted, PriceQuote
from ravenp2p.chain.deploy import PRICE_FEED_DECIMALS, DeployParams, deploy_contracts
from ravenp2p.chain.devchain import EmbeddedChain
from ravenp2p.chain.errors import chain_errors
from ravenp2p.chain.pricing import MAX_PRICE_AGE_S, PriceRefused, current_quote, price_in_raven
from ravenp2p.chain.sender import TransactionSender
from ravenp2p.chain.web3chain import Web3Chain
from ravenp2p.devnet import RAVEN, devnet_spec, start_devnet
from ravenp2p.roles.escrow import job_key
from ravenp2p.training.spec import JobSpec

if TYPE_CHECKING:
    from chain.conftest import ChainEnv

DEVNET_ANSWER = DeployParams().usd_per_raven


def feed_contract(env: ChainEnv) -> Any:
    """The deployment's feed as a web3 contract, for what the `Chain` interface does not read."""
    assert env.deployment.price_feed is not None
    return env.dev.w3.eth.contract(
        address=env.deployment.price_feed, abi=load_artifact("PriceFeed").abi
    )


def block_time(env: ChainEnv, tx_hash: str) -> int:
    receipt = env.dev.w3.eth.get_transaction_receipt(tx_hash)  # type: ignore[arg-type]
    return int(env.dev.w3.eth.get_block(receipt["blockNumber"])["timestamp"])


async def test_the_deployed_feed_reports_the_devnet_price(backend: ChainEnv) -> None:
    feed = feed_contract(backend)
    assert DEVNET_ANSWER == 50_000_000  # 0.50 USD per RAVEN with 8 decimals
    assert feed.functions.decimals().call() == PRICE_FEED_DECIMALS == 8
    assert feed.functions.description().call() == "RAVEN / USD"
    assert feed.functions.version().call() == 1
    assert feed.functions.owner().call() == backend.owner.address
    quote = await backend.nodes[0].raven_usd_price()
    assert dataclasses.replace(quote, started_at=0, updated_at=0) == PriceQuote(
        feed=backend.deployment.price_feed or "", round_id=1, answer=DEVNET_ANSWER,
        started_at=0, updated_at=0, answered_in_round=1, decimals=8,
    )
    assert quote.started_at == quote.updated_at <= await backend.nodes[0].now()
    assert await current_quote(backend.nodes[0]) == quote
    assert feed.functions.getRoundData(1).call() == [
        1, DEVNET_ANSWER, quote.started_at, quote.updated_at, 1,
    ]


async def test_the_owner_publishes_rounds_with_chainlink_events(backend: ChainEnv) -> None:
    feed = feed_contract(backend)
    tx = await backend.owner.set_usd_price(37_500_000)
    second = await backend.owner.set_usd_price(123_456_789)
    t1, t2 = block_time(backend, tx), block_time(backend, second)
    receipt = backend.dev.w3.eth.get_transaction_receipt(tx)  # type: ignore[arg-type]
    [new_round] = feed.events.NewRound().process_receipt(receipt, errors=DISCARD)
    [updated] = feed.events.AnswerUpdated().process_receipt(receipt, errors=DISCARD)
    assert dict(new_round["args"]) == {
        "roundId": 2, "startedBy": backend.owner.address, "startedAt": t1,
    }
    assert dict(updated["args"]) == {"current": 37_500_000, "roundId": 2, "updatedAt": t1}
    quote = await backend.nodes[0].raven_usd_price()
    assert (quote.round_id, quote.answer, quote.updated_at, quote.answered_in_round) == (
        3, 123_456_789, t2, 3,
    )
    assert feed.functions.getRoundData(2).call() == [2, 37_500_000, t1, t1, 2]
    assert feed.functions.getRoundData(1).call()[1] == DEVNET_ANSWER
    assert feed.functions.latestRound().call() == 3


async def test_only_the_owner_sets_a_positive_price(backend: ChainEnv) -> None:
    stranger = backend.nodes[1]
    with pytest.raises(ContractReverted) as refused:
        await stranger.set_usd_price(10**8)
    assert refused.value.reason == f"OwnableUnauthorizedAccount(account={stranger.address})"
    for answer in (0, -1, -(2**255)):
        with pytest.raises(ContractReverted) as refused:
            await backend.owner.set_usd_price(answer)
        assert refused.value.reason == f"NonPositiveAnswer(answer={answer})"
    with pytest.raises(ValueError, match="answer must fit an int256"):
        await backend.owner.set_usd_price(2**255)
    assert (await stranger.raven_usd_price()).round_id == 1


def test_unknown_rounds_are_refused(backend: ChainEnv) -> None:
    feed = feed_contract(backend)
    for round_id in (0, 2, 2**80 - 1):
        with pytest.raises(ContractReverted) as refused, chain_errors(
            backend.dev.w3, "PriceFeed", "getRoundData"
        ):
            feed.functions.getRoundData(round_id).call()
        assert refused.value.reason == f"RoundNotFound(roundId={round_id})"
    assert feed.functions.getRoundData(1).call()[0] == 1


def test_a_feed_must_start_with_a_positive_price(chain_env: ChainEnv) -> None:
    deployer = chain_env.identities[0].private_key.secret
    with pytest.raises(ContractReverted) as refused:
        deploy_contracts(chain_env.dev.w3, deployer, DeployParams(usd_per_raven=0))
    assert (refused.value.contract, refused.value.function) == ("PriceFeed", "constructor")
    assert refused.value.reason == "NonPositiveAnswer(answer=0)"


async def test_any_feed_with_the_interface_prices_a_job(chain_env: ChainEnv) -> None:
    """A feed with 18 decimals (as some market feeds have) gives the same RAVEN figures."""
    artifact = load_artifact("PriceFeed")
    factory = chain_env.dev.w3.eth.contract(abi=artifact.abi, bytecode=artifact.bytecode)
    sender = TransactionSender(chain_env.dev.w3, chain_env.identities[2].private_key.secret)
    init = factory.constructor("RAVEN / USD", 18, 5 * 10**17).data_in_transaction
    address = sender.deploy("PriceFeed", init)["contractAddress"]
    other = dataclasses.replace(chain_env.deployment, price_feed=address)
    reader = Web3Chain(chain_env.dev.w3, other, chain_env.identities[3].private_key.secret)
    wide = await current_quote(reader)
    narrow = await current_quote(chain_env.nodes[3])
    assert (wide.decimals, wide.answer, wide.feed) == (18, 5 * 10**17, address)
    spec = usd_devnet_spec("0.002", "6")
    assert price_in_raven(spec, wide) == price_in_raven(spec, narrow)
    assert price_in_raven(spec, wide).price_per_calculation == 4 * RAVEN // 1000


async def test_a_stale_answer_is_refused_until_the_owner_updates_it(chain_env: ChainEnv) -> None:
    reader = chain_env.nodes[0]
    published = (await reader.raven_usd_price()).updated_at
    chain_env.advance_time(published + MAX_PRICE_AGE_S + 1 - await reader.now())
    with pytest.raises(PriceRefused, match=f"updated {MAX_PRICE_AGE_S + 1} s ago"):
        await current_quote(reader)
    assert (await current_quote(reader, max_age_s=2 * MAX_PRICE_AGE_S)).round_id == 1
    await chain_env.owner.set_usd_price(DEVNET_ANSWER)
    assert (await current_quote(reader)).round_id == 2


async def test_a_deployment_without_a_feed_cannot_price_in_usd(chain_env: ChainEnv) -> None:
    bare = dataclasses.replace(chain_env.deployment, price_feed=None)
    chain = Web3Chain(chain_env.dev.w3, bare, chain_env.identities[0].private_key.secret)
    with pytest.raises(ChainError, match=r"names no price feed \(deployment.price_feed\)"):
        await chain.raven_usd_price()
    nowhere = dataclasses.replace(chain_env.deployment, price_feed=chain_env.treasury.address)
    with pytest.raises(ChainError, match=r"no contract at 0x\w+ \(the deployment's PriceFeed\)"):
        Web3Chain(chain_env.dev.w3, nowhere, chain_env.identities[0].private_key.secret)


# ------------------------------------------------------------------ a USD-priced job


def usd_devnet_spec(price: str, budget: str) -> JobSpec:
    """The devnet job (400 rounds x 2 calculations x 3 workers at most), priced in USD."""
    data = devnet_spec().to_dict()
    data["payment"] = {"currency": "USD", "price_per_calculation": price, "budget": budget}
    return JobSpec.from_dict(data)


async def test_a_usd_job_deposits_its_budget_converted_at_the_feed() -> None:
    async with start_devnet(1, masters=1, economy=True) as net:
        money = net.economy
        assert money is not None and isinstance(money.backend, EmbeddedChain)
        owner, requester = money.owner, net.requester.node.identity.address
        await owner.set_usd_price(30_000_000)  # 0.30 USD per RAVEN
        await owner.mint(requester, 20 * RAVEN)
        spec = usd_devnet_spec("0.001", "2.65")  # the worst case is 2.64 USD
        handle = await net.requester.submit(spec)

        rate = Fraction(30_000_000, 10**8)
        price = math.floor(Fraction(1, 1000) / rate * RAVEN)
        budget = math.ceil(Fraction(265, 100) / rate * RAVEN)
        assert (price, budget) == (3_333_333_333_333_333, 8_833_333_333_333_333_334)
        job = await owner.job(job_key(handle.job_id))
        assert (job.price, job.deposit) == (price, budget)
        paid = handle.manifest.spec
        assert (paid.currency, paid.price_per_calculation, paid.budget) == ("RAVEN", price, budget)
        assert paid.max_cost() <= budget
        assert await owner.balance_of(requester) == 20 * RAVEN - budget

        # An hour and a second later the answer is stale: nothing more is deposited.
        money.backend.advance_time(MAX_PRICE_AGE_S + 1)
        with pytest.raises(PriceRefused, match="stale answer"):
            await net.requester.submit(spec)
        assert await owner.balance_of(requester) == 20 * RAVEN - budget
