"""The model chain (sims/model_chain.py) behaves as the contracts do.

The key test runs one market, step by step, on the real contracts (`Web3Chain`
on the embedded chain) and on a `ChainState` whose clock is set to the real
block's timestamp before each step, and compares every outcome: values read,
tokens moved, and the reason of each refusal. Seeds differ (block hashes
differ), so the deployment's committee holds every candidate and each model
committee is checked against `consensus.election` redrawn from its own
election table. A hypothesis test checks that tokens only move, whatever
happens, and smaller tests cover determinism and the model's own helpers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import re
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import pytest
from chain.conftest import labelled_identity
from chain.market import DEPOSIT, LIFETIME, MAX_CALCULATIONS, PRICE, REDUNDANCY, max_cost
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from consensus.abi import ZERO_ADDRESS, keccak256
from consensus.eip712 import Domain, slash_order_digest
from consensus.election import draw_committee, election_seed, eligible
from consensus.settlement import settle as settle_offchain
from ravenp2p.chain.artifacts import load_artifact
from ravenp2p.chain.base import (
    Chain,
    ChainError,
    ContractReverted,
    Deployment,
    ElectionTable,
    JobStatusOnChain,
    RegistryParams,
    Settled,
    StakeInfo,
)
from ravenp2p.chain.deploy import RAVEN, DeployParams
from ravenp2p.identity import NodeIdentity
from sims.model_chain import ChainState, ModelChain

if TYPE_CHECKING:
    from chain.conftest import ChainEnv

T = TypeVar("T")
TX_HASH = re.compile(r"0x[0-9a-f]{64}")
LABELS = ("m0", "m1", "m2", "w0", "w1", "out")  # env.nodes in order; "req" is an extra account
JOB = keccak256(b"twin job")
JOB2 = keccak256(b"twin job 2")
UNKNOWN = keccak256(b"no such job")
DIGEST_A, DIGEST_B = keccak256(b"weights a"), keccak256(b"weights b")
EVIDENCE = keccak256(b"contradictions")


def done(coroutine: Coroutine[Any, Any, T]) -> T:
    """The result of a model chain call, which must complete without ever waiting."""
    try:
        coroutine.send(None)
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]
    coroutine.close()
    raise AssertionError("a model chain call waited for something")


# ------------------------------------------------------------------ the twin harness


@dataclass
class Side:
    """One of the two chains: an account object per label, and what differs from the other."""

    name: str
    chains: dict[str, Any]
    deployment: Deployment
    mint: Callable[[str, int], Awaitable[str]]
    labels: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("token", "registry", "escrow"):
            self.labels[getattr(self.deployment, name)] = f"<{name}>"

    def __getitem__(self, label: str) -> Any:
        return self.chains[label]

    @property
    def domain(self) -> Domain:
        return Domain(self.deployment.chain_id, self.deployment.registry)

    def norm(self, value: Any) -> Any:
        """`value` with this side's own addresses and digests replaced by labels."""
        if isinstance(value, str):
            for raw, label in self.labels.items():
                value = value.replace(raw, label)
            return value
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            fields = dataclasses.fields(value)
            return (type(value).__name__, *(self.norm(getattr(value, f.name)) for f in fields))
        if isinstance(value, list | tuple):
            return tuple(self.norm(v) for v in value)
        return value


@dataclass(frozen=True)
class Contract:
    """An argument: this side's address of one of its contracts."""

    name: str

    def resolve(self, side: Side) -> str:
        return str(getattr(side.deployment, self.name))


@dataclass(frozen=True)
class ResultSig:
    """An argument: `signer`'s `Result` signature, made in this side's domain."""

    signer: str
    job: bytes
    calculation: int
    digest: bytes

    def resolve(self, side: Side) -> bytes:
        return bytes(side[self.signer].sign_result(self.job, self.calculation, self.digest))


@dataclass(frozen=True)
class OrderSig:
    """An argument: `signer`'s `SlashOrder` signature in this side's domain (digest labelled)."""

    signer: str
    order: tuple[str, int, bytes, int]

    def resolve(self, side: Side) -> bytes:
        digest = slash_order_digest(side.domain, *self.order)
        side.labels["0x" + digest.hex()] = "<order digest>"
        return bytes(side[self.signer].sign_slash_order(*self.order))


def resolve(arg: Any, side: Side) -> Any:
    if isinstance(arg, list):
        return [resolve(a, side) for a in arg]
    return arg.resolve(side) if hasattr(arg, "resolve") else arg


class Twin:
    """Runs each step on the contracts, then on the model at the same block timestamp."""

    def __init__(self, env: ChainEnv) -> None:
        self.env = env
        self.w3 = env.dev.w3
        requester = env.account("twin requester")
        self.real = Side(
            "contracts",
            {**dict(zip(LABELS, env.nodes, strict=True)), "req": requester},
            env.deployment,
            env.owner.mint,
        )
        registry = self.w3.eth.contract(
            address=env.deployment.registry, abi=load_artifact("StakeRegistry").abi
        )
        self.clock = int(registry.functions.genesis().call())
        self.state = ChainState.from_deploy_params(
            lambda: self.clock, env.treasury.address, env.params
        )
        identities = [*env.identities, labelled_identity("twin requester")]
        models = [self.state.account(i) for i in identities]

        async def mint(to: str, amount: int) -> str:
            return self.state.mint(to, amount)

        self.model = Side(
            "model", dict(zip((*LABELS, "req"), models, strict=True)), self.state.deployment, mint
        )
        self.addresses = {label: chain.address for label, chain in self.real.chains.items()}
        assert self.addresses == {label: c.address for label, c in self.model.chains.items()}

    def addr(self, label: str) -> str:
        return self.addresses[label]

    def latest(self) -> int:
        return int(self.w3.eth.get_block("latest")["timestamp"])

    def advance(self, seconds: int) -> None:
        """Mine an empty block `seconds` later on the contracts' chain (the model follows)."""
        self.env.advance_time(seconds)

    async def _run(self, side: Side, who: str, method: str, args: tuple[Any, ...]) -> Any:
        try:
            if method == "mint":
                value = await side.mint(*(resolve(a, side) for a in args))
            else:
                value = await getattr(side[who], method)(*(resolve(a, side) for a in args))
        except ContractReverted as exc:
            return ("reverted", exc.contract, exc.function, side.norm(exc.reason))
        except ChainError as exc:
            return ("chain error", side.norm(str(exc)))
        if isinstance(value, Settled):
            transfers = await side["req"].token_transfers(value.tx_hash)
            return ("settled", side.norm(dataclasses.replace(value, tx_hash="")),
                    side.norm(transfers))
        if isinstance(value, str) and TX_HASH.fullmatch(value):
            return ("mined", side.norm(await side["req"].token_transfers(value)))
        return ("value", side.norm(value))

    async def tx(self, who: str, method: str, *args: Any) -> Any:
        """A transaction by `who` on both chains; asserts both had the same outcome."""
        pending = self.latest() + 1  # eth-tester stamps the next block one second later
        real = await self._run(self.real, who, method, args)
        if real[0] in ("mined", "settled"):
            assert self.latest() == pending
        self.clock = pending
        model = await self._run(self.model, who, method, args)
        assert model == real, f"{who}.{method}: contracts {real}, model {model}"
        return real

    async def ok(self, who: str, method: str, *args: Any) -> Any:
        outcome = await self.tx(who, method, *args)
        assert outcome[0] in ("mined", "settled"), f"{who}.{method} failed: {outcome}"
        return outcome

    async def mint(self, label: str, amount: int) -> None:
        await self.ok("owner", "mint", self.addr(label), amount)

    async def refused(self, reason: str, who: str, method: str, *args: Any) -> None:
        """A transaction both chains refuse with `reason`."""
        outcome = await self.tx(who, method, *args)
        assert outcome[0] == "reverted" and outcome[3] == reason, outcome

    async def view(self, method: str, *args: Any) -> Any:
        """A read on both chains at the latest block; asserts both read the same."""
        real = await self._run(self.real, "req", method, args)
        self.clock = self.latest()
        model = await self._run(self.model, "req", method, args)
        assert model == real, f"{method}: contracts {real}, model {model}"
        return real[1] if real[0] == "value" else real

    async def same_state(self) -> None:
        """Balances, stakes, partners and candidates read the same on both chains."""
        for label in (*self.addresses, "treasury"):
            address = self.env.treasury.address if label == "treasury" else self.addr(label)
            await self.view("balance_of", address)
            await self.view("stake_of", address)
            await self.view("partner_of", address)
        for name in ("token", "registry", "escrow"):
            await self.view("balance_of", Contract(name))
        await self.view("candidates")
        await self.view("current_epoch")

    async def same_election(self, epoch: int) -> ElectionTable:
        """The epoch's election tables agree on what was drawn from; the model redraws right."""
        real = await self.real["req"].election_table(epoch)
        self.clock = self.latest()
        model = await self.model["req"].election_table(epoch)
        assert (model.epoch, model.candidates, model.stakes) == (
            real.epoch, real.candidates, real.stakes
        )
        assert (model.minimum, model.committee_size) == (real.minimum, real.committee_size)
        assert sorted(model.committee) == sorted(real.committee)
        assert model.seed == election_seed(model.parent_hash, epoch, self.state.deployment.registry)
        table, weights = eligible(model.candidates, dict(zip(model.candidates, model.stakes,
                                                             strict=True)), model.minimum)
        assert list(model.committee) == draw_committee(
            table, weights, model.seed, model.committee_size
        )
        assert await self.model["req"].committee(epoch) == list(model.committee)
        assert await self.model["req"].epoch_seed(epoch) == model.seed
        return model


# ------------------------------------------------------------------ the key test


async def test_model_chain_matches_the_contracts(chain_env: ChainEnv) -> None:
    t = Twin(chain_env)
    params = chain_env.params
    minimum = params.min_master_stake
    # Start at an epoch boundary, so that the steps below fall in the epochs they expect.
    t.advance(params.epoch_length - (t.latest() - t.clock) % params.epoch_length)
    await t.view("registry_params")
    await t.view("master_timeout")

    # Stakes, partners, candidates.
    stakes = {"m0": 150 * RAVEN, "m1": 190 * RAVEN, "m2": 230 * RAVEN, "w0": 120 * RAVEN,
              "w1": 120 * RAVEN}
    for label, amount in stakes.items():
        await t.mint(label, amount)
        await t.ok(label, "stake", amount)
    for label in ("m0", "m1", "m2"):
        await t.ok(label, "become_candidate")
    out = t.addr("out")
    await t.refused(f"StakeBelowMinimum(node={out}, active=0, minimum={minimum})",
                    "out", "become_candidate")
    await t.refused(f"AlreadyCandidate(node={t.addr('m0')})", "m0", "become_candidate")
    await t.refused(f"NotCandidate(node={out})", "out", "leave_candidacy")
    await t.refused("ZeroAmount()", "out", "stake", 0)
    await t.refused(f"ERC20InsufficientBalance(sender={out}, balance=0, needed=1)",
                    "out", "stake", 1)
    await t.refused(f"InsufficientStake(node={out}, requested=1, active=0)",
                    "out", "request_unbond", 1)
    await t.refused(f"NothingToWithdraw(node={out})", "out", "withdraw")
    await t.ok("w0", "set_partner", out)
    epoch = await t.view("current_epoch")
    assert await t.view("is_elected", epoch) is False
    assert await t.view("committee", epoch) == ()
    assert await t.view("epoch_seed", epoch) == bytes(32)
    assert (await t.view("election_table", epoch))[0] == "chain error"
    await t.same_state()

    # A job: refusals first, then the deposit (which elects the epoch's committee).
    await t.mint("req", 2 * DEPOSIT)
    deadline = t.latest() + LIFETIME
    terms = (PRICE, REDUNDANCY, MAX_CALCULATIONS, deadline, DEPOSIT)
    await t.refused("ZeroJobId()", "req", "create_job", bytes(32), *terms)
    now = t.latest() + 1
    await t.refused(f"DeadlineNotInFuture(deadline={now}, timestamp={now})", "req", "create_job",
                    JOB, PRICE, REDUNDANCY, MAX_CALCULATIONS, now, DEPOSIT)
    await t.refused("ZeroPrice()", "req", "create_job", JOB, 0, *terms[1:])
    await t.refused("ZeroRedundancy()", "req", "create_job", JOB, PRICE, 0, *terms[2:])
    await t.refused("ZeroMaxCalculations()", "req", "create_job", JOB, PRICE, REDUNDANCY, 0,
                    deadline, DEPOSIT)
    await t.refused(f"DepositBelowMaxCost(deposit={DEPOSIT - 1}, maxCost={DEPOSIT})",
                    "req", "create_job", JOB, *terms[:-1], DEPOSIT - 1)
    await t.refused(
        f"ERC20InsufficientBalance(sender={t.addr('req')}, balance={2 * DEPOSIT}, "
        f"needed={3 * DEPOSIT})", "req", "create_job", JOB, *terms[:-1], 3 * DEPOSIT,
    )
    assert await t.view("is_elected", epoch) is False  # the refused deposit elected nothing
    await t.ok("req", "create_job", JOB, *terms)
    await t.refused(f"JobAlreadyExists(job=0x{JOB.hex()})", "req", "create_job", JOB, *terms)
    await t.refused(f"EpochAlreadyElected(epoch={epoch})", "out", "elect")
    await t.same_election(epoch)
    assert await t.view("is_elected", epoch) is True
    await t.view("job", JOB)
    await t.view("job", UNKNOWN)
    ranked_addresses = await t.view("ranked_masters", JOB)
    await t.view("master_of", JOB)
    assert (await t.view("master_of", UNKNOWN))[3] == f"UnknownJob(job=0x{UNKNOWN.hex()})"
    by_address = {a: label for label, a in t.addresses.items()}
    r0, r1, r2 = (by_address[a] for a in ranked_addresses)
    job = f"0x{JOB.hex()}"

    # Masters: only the current one acts; a later one takes over after its timeout.
    timeout = params.master_timeout
    await t.refused(f"NotJobMaster(job={job}, caller={t.addr(r1)})", r1, "heartbeat", JOB)
    await t.refused(f"NotJobMaster(job={job}, caller={t.addr(r1)})", r1, "settle", JOB,
                    keccak256(b"root"), 1, 0)
    await t.refused(f"NotJobCommitteeMember(job={job}, caller={out})", "out", "take_over", JOB)
    await t.refused(f"RankNotAfterMaster(job={job}, rank=0, masterRank=0)", r0, "take_over", JOB)
    await t.refused(f"DeadlineNotPassed(job={job}, deadline={deadline})", "out", "refund", JOB)
    await t.refused(f"JobNotSettled(job={job}, status=1)", "out", "claim", JOB, out, 1, [])
    await t.ok(r0, "heartbeat", JOB)
    beat = t.latest()
    t.advance(timeout - 2)
    await t.refused(f"TakeOverTooEarly(job={job}, allowedAt={beat + timeout})", r1, "take_over",
                    JOB)
    await t.refused(f"TakeOverTooEarly(job={job}, allowedAt={beat + 2 * timeout})", r2,
                    "take_over", JOB)
    t.advance(0)
    await t.ok(r1, "take_over", JOB)
    await t.refused(f"NotJobMaster(job={job}, caller={t.addr(r0)})", r0, "heartbeat", JOB)
    await t.refused(f"RankNotAfterMaster(job={job}, rank=0, masterRank=1)", r0, "take_over", JOB)
    await t.view("job", JOB)
    await t.view("master_of", JOB)

    # Equivocation: two signed digests for one calculation cost the worker its stake.
    w1 = t.addr("w1")
    sig_a, sig_b = ResultSig("w1", JOB, 7, DIGEST_A), ResultSig("w1", JOB, 7, DIGEST_B)
    await t.refused(f"IdenticalDigests(digest=0x{DIGEST_A.hex()})", "out", "slash_equivocation",
                    w1, JOB, 7, DIGEST_A, sig_a, DIGEST_A, sig_a)
    await t.refused(f"SignatureNotByWorker(worker={w1}, signer={t.addr('w0')})", "out",
                    "slash_equivocation", w1, JOB, 7, DIGEST_A, sig_a, DIGEST_B,
                    ResultSig("w0", JOB, 7, DIGEST_B))
    await t.refused(f"NothingToSlash(offender={out})", "w0", "slash_equivocation", out, JOB, 7,
                    DIGEST_A, ResultSig("out", JOB, 7, DIGEST_A), DIGEST_B,
                    ResultSig("out", JOB, 7, DIGEST_B))
    await t.ok("out", "slash_equivocation", w1, JOB, 7, DIGEST_A, sig_a, DIGEST_B, sig_b)
    await t.refused(f"EquivocationAlreadySlashed(worker={w1}, job={job}, calculation=7)", "out",
                    "slash_equivocation", w1, JOB, 7, DIGEST_A, sig_a, DIGEST_B, sig_b)
    await t.same_state()

    # Settlement by the new master: fees, refund, and every claim against the root.
    credits = {t.addr("w0"): 4, t.addr("w1"): 3}
    plan = settle_offchain(credits, PRICE, {t.addr("w0"): out, t.addr("w1"): None}, DEPOSIT,
                           REDUNDANCY * MAX_CALCULATIONS)
    assert plan.partner_total > 0 and plan.refund > 0
    most = REDUNDANCY * MAX_CALCULATIONS
    await t.refused(f"TooManyResults(job={job}, acceptedResults={most + 1}, maxResults={most})",
                    r1, "settle", JOB, plan.root, most + 1, 0)
    high = plan.cost * 3 // 100
    await t.refused(
        f"PartnerTotalTooHigh(job={job}, partnerTotal={high + 1}, maxPartnerTotal={high})",
        r1, "settle", JOB, plan.root, plan.accepted_results, high + 1,
    )
    await t.refused(f"EmptyRoot(job={job})", r1, "settle", JOB, bytes(32), 1, 0)
    await t.ok(r1, "settle", JOB, plan.root, plan.accepted_results, plan.partner_total)
    await t.view("settlement", JOB)
    await t.view("settlement", JOB2)
    await t.refused(f"JobNotOpen(job={job}, status=2)", r1, "settle", JOB, plan.root, 1, 0)
    w0 = t.addr("w0")
    await t.refused(f"InvalidProof(job={job}, account={w0}, amount={plan.amount_of(w0) + 1})",
                    "w0", "claim", JOB, w0, plan.amount_of(w0) + 1, plan.proof(w0))
    for account in plan.leaves:
        await t.ok("req", "claim", JOB, account, plan.amount_of(account), plan.proof(account))
        assert await t.view("has_claimed", JOB, account) is True
    await t.refused(f"AlreadyClaimed(job={job}, account={w0})", "w0", "claim", JOB, w0,
                    plan.amount_of(w0), plan.proof(w0))
    assert await t.view("has_claimed", JOB, t.addr("req")) is False
    await t.view("job", JOB)
    await t.same_state()
    # Earnings (slow to read from the contracts: every log since block 0) of the master,
    # a worker, a partner that claimed and the requester that got its refund.
    earned = {label: await t.view("earnings", t.addr(label)) for label in (r1, "w0", "out", "req")}
    assert earned[r1][3:] == (plan.master_fee, 1)  # ("Earnings", claimed, claims, fees, jobs)
    assert earned["out"][1:3] == (plan.amount_of(out), 1)

    # A second job runs out its deadline and is refunded.
    deadline2 = t.latest() + 30
    await t.ok("req", "create_job", JOB2, PRICE, 1, 1, deadline2, max_cost(PRICE, 1, 1))
    job2 = f"0x{JOB2.hex()}"
    t.advance(30)
    first2 = by_address[(await t.view("ranked_masters", JOB2))[0]]
    await t.refused(f"JobDeadlinePassed(job={job2}, deadline={deadline2})", first2, "heartbeat",
                    JOB2)
    await t.ok("out", "refund", JOB2)
    await t.refused(f"JobNotOpen(job={job2}, status=3)", "out", "refund", JOB2)
    await t.refused(f"UnknownJob(job=0x{UNKNOWN.hex()})", "out", "refund", UNKNOWN)
    await t.view("job", JOB2)

    # A committee order: more than half of the epoch's committee signs it.
    order = (w0, 50 * RAVEN, EVIDENCE, epoch)
    members = sorted(ranked_addresses)
    m_a, m_b = (by_address[a] for a in members[:2])
    signed = [OrderSig(m_a, order), OrderSig(m_b, order)]
    await t.refused("ZeroAmount()", "out", "slash_by_committee", w0, 0, EVIDENCE, epoch, signed)
    await t.refused(f"EpochNotElected(epoch={epoch + 5})", "out", "slash_by_committee", w0,
                    50 * RAVEN, EVIDENCE, epoch + 5, signed)
    await t.refused("NotEnoughSignatures(signers=1, required=2)", "out", "slash_by_committee",
                    *order, signed[:1])
    await t.refused(f"SignerNotInCommittee(signer={out}, epoch={epoch})", "out",
                    "slash_by_committee", *order, [signed[0], OrderSig("out", order)])
    await t.refused(f"DuplicateSigner(signer={t.addr(m_a)})", "out", "slash_by_committee",
                    *order, [signed[0], signed[0]])
    await t.refused("InvalidSignature(index=1)", "out", "slash_by_committee", *order,
                    [signed[0], bytes(64) + b"\x1d"])
    nothing = (t.addr("req"), RAVEN, EVIDENCE, epoch)
    await t.refused(f"NothingToSlash(offender={t.addr('req')})", "out", "slash_by_committee",
                    *nothing, [OrderSig(m_a, nothing), OrderSig(m_b, nothing)])
    await t.ok("out", "slash_by_committee", *order, signed)
    await t.refused("SlashOrderAlreadyExecuted(orderDigest=<order digest>)", "out",
                    "slash_by_committee", *order, signed)
    await t.same_state()

    # An order stays valid in the epoch after its own, and expires in the one after that.
    t.advance(params.epoch_length)
    assert await t.view("current_epoch") == epoch + 1
    second = (w0, RAVEN, EVIDENCE, epoch)
    await t.ok("out", "slash_by_committee", *second,
               [OrderSig(m_a, second), OrderSig(m_b, second)])
    t.advance(params.epoch_length)
    third = (w0, 2 * RAVEN, EVIDENCE, epoch)
    await t.refused(f"SlashOrderExpired(epoch={epoch}, currentEpoch={epoch + 2})", "out",
                    "slash_by_committee", *third, [OrderSig(m_a, third), OrderSig(m_b, third)])

    # Unbonding below the minimum leaves the candidate set; withdrawing waits for the delay.
    active = stakes[r2]
    await t.ok(r2, "request_unbond", active - minimum + 1)
    release = t.latest() + params.unbonding_delay
    await t.refused(f"StillUnbonding(node={t.addr(r2)}, releaseTime={release})", r2, "withdraw")
    await t.view("candidates")
    t.advance(params.unbonding_delay)
    await t.ok(r2, "withdraw")
    held = await t.view("balance_of", w1)
    await t.refused(f"ERC20InsufficientBalance(sender={w1}, balance={held}, needed={held + 1})",
                    "w1", "transfer", out, held + 1)
    await t.refused(f"ERC20InvalidReceiver(receiver={ZERO_ADDRESS})", "out", "transfer",
                    ZERO_ADDRESS, 1)
    await t.ok("out", "transfer", t.addr("req"), 1)

    # A later epoch is elected by anyone, once, from the candidates left.
    later = await t.view("current_epoch")
    await t.ok("out", "elect")
    await t.refused(f"EpochAlreadyElected(epoch={later})", "out", "elect")
    assert len((await t.same_election(later)).candidates) == 2
    await t.same_state()
    supply = sum(stakes.values()) + 2 * DEPOSIT
    assert t.state.total_supply == supply
    assert sum(t.state.balances().values()) == supply


# ------------------------------------------------------------------ the model on its own


def new_state(
    clock: list[int], params: DeployParams | None = None, feed: bool = True
) -> ChainState:
    return ChainState.from_deploy_params(
        lambda: clock[0], TREASURY.address, params, with_price_feed=feed
    )


TREASURY = labelled_identity("model treasury")
PEOPLE = [labelled_identity(f"model account {i}") for i in range(8)]


def test_model_chain_has_every_chain_method() -> None:
    clock = [1_000_000]
    chain = new_state(clock).account(PEOPLE[0])
    members = [n for n in vars(Chain) if not n.startswith("_")]
    assert len(members) > 30
    for name in members:
        mine, theirs = getattr(ModelChain, name), vars(Chain)[name]
        assert type(mine) is type(theirs), name
        assert inspect.iscoroutinefunction(mine) == inspect.iscoroutinefunction(theirs), name
    assert isinstance(chain.address, str)
    assert chain.state.account(PEOPLE[0].private_key) is chain
    assert chain.state.account(PEOPLE[0].private_key.secret) is chain


def run_script(clock: list[int], state: ChainState) -> list[Any]:
    """A short history on `state`: stakes, three elections, jobs, a slash; what it produced."""
    chains = [state.account(p) for p in PEOPLE]
    produced: list[Any] = []
    for i, chain in enumerate(chains):
        produced.append(state.mint(chain.address, (200 + 50 * i) * RAVEN))
        produced.append(done(chain.stake((150 + 50 * i) * RAVEN)))
        produced.append(done(chain.become_candidate()))
    for epoch in range(3):
        clock[0] += 3600
        produced.append(done(chains[epoch].elect()))
        produced.append(done(chains[0].election_table(epoch + 1)))
        last = chains.pop()
        active = done(last.stake_of(last.address)).active
        produced.append(done(last.request_unbond(active - RAVEN * 100 + 1)))
    produced.append(state.block_hash)
    return produced


def test_model_chain_replays_byte_for_byte_and_redraws_its_committees() -> None:
    params = DeployParams(committee_size=5, max_candidates=8)
    first_clock, second_clock = [1_000_000], [1_000_000]
    first = run_script(first_clock, new_state(first_clock, params))
    second = run_script(second_clock, new_state(second_clock, params))
    assert first == second
    tables = [p for p in first if isinstance(p, ElectionTable)]
    assert len({t.seed for t in tables}) == 3
    for table in tables:
        drawn_from, weights = eligible(
            table.candidates, dict(zip(table.candidates, table.stakes, strict=True)), table.minimum
        )
        assert list(table.committee) == draw_committee(drawn_from, weights, table.seed, 5)
        assert len(table.committee) == 5
    assert len(tables[2].candidates) == 6  # one candidate unbonded below the minimum per epoch
    hashes = [p for p in first if isinstance(p, str) and p.startswith("0x")]
    assert all(TX_HASH.fullmatch(h) for h in hashes) and len(set(hashes)) == len(hashes)


def test_model_chain_helpers_and_refusals() -> None:
    clock = [2_000_000]
    state = new_state(clock)
    chain = state.account(PEOPLE[0])
    assert state.deployment == new_state(clock).deployment
    assert state.deployment.price_feed is not None
    quote = done(chain.raven_usd_price())
    assert (quote.round_id, quote.answer, quote.updated_at) == (1, 50_000_000, 2_000_000)
    clock[0] += 10
    state.set_usd_price(60_000_000)
    assert done(chain.raven_usd_price()).answer == 60_000_000
    with pytest.raises(ContractReverted, match=r"NonPositiveAnswer\(answer=0\)"):
        state.set_usd_price(0)
    with pytest.raises(ChainError, match="no price feed"):
        done(new_state(clock, feed=False).account(PEOPLE[0]).raven_usd_price())

    tx = state.mint(chain.address, 5)
    assert done(chain.token_transfers(tx))[0].amount == 5
    with pytest.raises(ChainError, match="not mined"):
        done(chain.token_transfers("0x" + "ab" * 32))
    with pytest.raises(ValueError, match="64 hex digits"):
        done(chain.token_transfers("0x12"))
    with pytest.raises(ValueError, match="account is not a 20-byte hex address"):
        done(chain.balance_of("0x12"))
    with pytest.raises(ValueError, match="redundancy must be between 0 and 4294967295"):
        done(chain.create_job(JOB, 1, 2**32, 1, 1, 1))
    assert done(chain.balance_of(chain.address.lower())) == 5
    clock[0] -= 100  # a clock that steps back does not move the chain's clock back
    assert done(chain.now()) == 2_000_010

    base = RegistryParams(RAVEN, 1, 1, 1, 1, 0, 0)
    with pytest.raises(ContractReverted, match=r'InvalidParameter\(parameter="committeeSize"'):
        ChainState(lambda: 0, dataclasses.replace(base, committee_size=2), 1, TREASURY.address)
    with pytest.raises(ContractReverted, match=r'ZeroAddress\(parameter="treasury"\)'):
        ChainState(lambda: 0, base, 1, ZERO_ADDRESS)
    with pytest.raises(ContractReverted, match=r'InvalidParameter\(parameter="masterTimeout"'):
        ChainState(lambda: 0, base, 0, TREASURY.address)


def test_partners_and_earnings_of_a_master_that_is_also_the_requester() -> None:
    clock = [3_000_000]
    state = new_state(clock, DeployParams(committee_size=1))
    boss, worker, partner = (state.account(p) for p in PEOPLE[:3])
    state.mint(boss.address, 1000 * RAVEN)
    done(boss.stake(100 * RAVEN))
    done(boss.become_candidate())
    done(worker.set_partner(partner.address))
    done(boss.set_partner(partner.address))
    done(boss.set_partner(ZERO_ADDRESS))
    assert done(boss.partnered_nodes(partner.address)) == [worker.address]
    assert done(boss.partner_of(boss.address)) is None
    # The master's own job, settled with nothing accepted: no fee, but its refund.
    done(boss.create_job(JOB, RAVEN, 1, 1, clock[0] + 100, max_cost(RAVEN, 1, 1)))
    settled = done(boss.settle(JOB, bytes(32), 0, 0))
    assert (settled.master_fee, settled.refund) == (0, max_cost(RAVEN, 1, 1))
    earnings = done(boss.earnings(boss.address))
    assert (earnings.master_fees, earnings.settled) == (0, 1)  # as Web3Chain.earnings counts it
    assert done(boss.job(JOB)).status == JobStatusOnChain.SETTLED


# ------------------------------------------------------------------ conservation

ACCOUNTS = len(PEOPLE)
who = st.integers(0, ACCOUNTS - 1)
small = st.integers(0, 400)
master_or = st.one_of(st.just(-1), who)  # -1: the job's current master
job_index = st.integers(0, 9)  # counted from the newest job
actions = st.one_of(
    st.tuples(st.just("advance"), st.integers(0, 200)),
    st.tuples(st.just("transfer"), who, who, small),
    st.tuples(st.just("stake"), who, small),
    st.tuples(st.just("unbond"), who, st.integers(0, 120)),
    st.tuples(st.just("withdraw"), who),
    st.tuples(st.just("candidate"), who),
    st.tuples(st.just("create"), who, st.integers(1, 5), st.integers(1, 3), st.integers(1, 4),
              st.integers(1, 150), st.integers(0, 5)),
    st.tuples(st.just("heartbeat"), master_or, job_index),
    st.tuples(st.just("takeover"), who, job_index),
    st.tuples(st.just("settle"), master_or, job_index,
              st.dictionaries(who, st.integers(0, 3), min_size=1, max_size=3),
              st.sampled_from([False, False, False, True])),
    st.tuples(st.just("claim"), who, job_index, st.integers(0, 3), st.sampled_from([0, 0, 1, -1])),
    st.tuples(st.just("refund"), who, job_index),
    st.tuples(st.just("partner"), who, who),
    st.tuples(st.just("equivocate"), who, who, st.integers(0, 3)),
    st.tuples(st.just("committee"), who, st.integers(0, 500), st.integers(0, 3)),
    st.tuples(st.just("elect"), who),
)
CONSERVATION = DeployParams(
    min_master_stake=100, unbonding_delay=50, epoch_length=300, committee_size=3,
    max_candidates=4, equivocation_slash_bps=5000, reporter_share_bps=1000, master_timeout=10,
)


class Conservation:
    """A model chain under random use, and the plans of the jobs it settled."""

    def __init__(self) -> None:
        self.clock = [5_000_000]
        self.state = new_state(self.clock, CONSERVATION, feed=False)
        self.chains = [self.state.account(p) for p in PEOPLE]
        self.jobs: list[bytes] = []
        self.plans: dict[bytes, Any] = {}
        for i, chain in enumerate(self.chains):
            self.state.mint(chain.address, 1000)
            if i < 3:
                done(chain.stake(100 + 40 * i))
                done(chain.become_candidate())
        self.apply(("create", 3, 4, 2, 3, 60, 1))

    def job(self, index: int) -> bytes | None:
        """The `index`-th newest job (the newest are the likeliest still open)."""
        return self.jobs[-1 - index % len(self.jobs)] if self.jobs else None

    def sender(self, index: int, job: bytes) -> ModelChain:
        if index >= 0:
            return self.chains[index]
        master = done(self.chains[0].master_of(job))
        return next(c for c in self.chains if c.address == master)

    def apply(self, action: tuple[Any, ...]) -> None:
        kind, *args = action
        c = self.chains
        if kind == "advance":
            self.clock[0] += args[0]
        elif kind == "transfer":
            done(c[args[0]].transfer(c[args[1]].address, args[2]))
        elif kind == "stake":
            done(c[args[0]].stake(args[1]))
        elif kind == "unbond":
            done(c[args[0]].request_unbond(args[1]))
        elif kind == "withdraw":  # preferably by an account with something unbonding
            leaving = [x for x in c if self.state.stake_info(x.address).unbonding] or c
            done(leaving[args[0] % len(leaving)].withdraw())
        elif kind == "candidate":
            done(c[args[0]].become_candidate())
        elif kind == "elect":
            done(c[args[0]].elect())
        elif kind == "create":
            requester, price, redundancy, most, life, extra = args
            job_id = keccak256(len(self.jobs).to_bytes(8, "big"))
            self.jobs.append(job_id)
            deposit = max_cost(price, redundancy, most) + extra
            done(c[requester].create_job(job_id, price, redundancy, most, self.clock[0] + life,
                                         deposit))
        elif kind == "partner":
            done(c[args[0]].set_partner(c[args[1]].address))
        elif kind == "equivocate":
            reporter, worker, calculation = args
            job_id = keccak256(b"equivocated")
            sigs = [c[worker].sign_result(job_id, calculation, d) for d in (DIGEST_A, DIGEST_B)]
            done(c[reporter].slash_equivocation(c[worker].address, job_id, calculation,
                                                DIGEST_A, sigs[0], DIGEST_B, sigs[1]))
        elif kind == "committee":
            self.committee_order(*args)
        elif kind == "claim":
            self.claim(*args)
        elif (job_id := self.job(args[1])) is not None:
            self.apply_to_job(kind, args, job_id)

    def committee_order(self, offender: int, amount: int, signers: int) -> None:
        epoch = done(self.chains[0].current_epoch())
        members = done(self.chains[0].committee(epoch))
        order = (self.chains[offender].address, amount, EVIDENCE, epoch)
        sigs = [self.state.account(p).sign_slash_order(*order) for p in PEOPLE
                if self.state.account(p).address in members[:signers]]
        done(self.chains[0].slash_by_committee(*order, sigs))

    def apply_to_job(self, kind: str, args: list[Any], job_id: bytes) -> None:
        sender = self.sender(args[0], job_id)
        if kind == "heartbeat":
            done(sender.heartbeat(job_id))
        elif kind == "takeover":
            done(sender.take_over(job_id))
        elif kind == "refund":  # the oldest jobs are the likeliest past their deadline
            done(sender.refund(self.jobs[args[1] % len(self.jobs)]))
        elif kind == "settle":
            on_chain = done(sender.job(job_id))
            credits = {self.chains[w].address: n for w, n in args[2].items()}
            partners = {w: done(sender.partner_of(w)) for w in credits}
            try:
                plan = settle_offchain(credits, on_chain.price, partners, on_chain.deposit)
            except ValueError:  # more results than the deposit pays for: one result
                plan = settle_offchain({sender.address: 1}, on_chain.price,
                                       {sender.address: None}, on_chain.deposit)
            accepted, partner_total = plan.accepted_results, plan.partner_total
            if args[3]:  # a master that overstates what it pays
                accepted, partner_total = accepted + 1, partner_total + 1
            done(sender.settle(job_id, plan.root, accepted, partner_total))
            self.plans[job_id] = plan

    def claim(self, submitter: int, index: int, leaf: int, error: int) -> None:
        """Claim a leaf of a settled job (with a wrong amount when `error` is not 0)."""
        settled = [job_id for job_id, plan in self.plans.items() if plan.leaves]
        if settled:
            job_id = settled[index % len(settled)]
            plan = self.plans[job_id]
            account = sorted(plan.leaves)[leaf % len(plan.leaves)]
            amount = plan.amount_of(account) + error
            done(self.chains[submitter].claim(job_id, account, amount, plan.proof(account)))

    def check(self) -> None:
        state = self.state
        assert sum(state.balances().values()) == state.total_supply == 1000 * ACCOUNTS
        staked = 0
        for chain in self.chains:
            info: StakeInfo = state.stake_info(chain.address)
            staked += info.active + info.unbonding
        assert state.balance(state.deployment.registry) == staked
        held = 0
        for job_id in self.jobs:
            job = state.job_on_chain(job_id)
            assert job.claimed_total <= job.payout_total
            if job.status == JobStatusOnChain.OPEN:
                held += job.deposit
            elif job.status == JobStatusOnChain.SETTLED:
                held += job.payout_total - job.claimed_total
        assert state.balance(state.deployment.escrow) == held


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=st.lists(actions, min_size=10, max_size=60))
def test_tokens_only_move(steps: list[tuple[Any, ...]]) -> None:
    world = Conservation()
    for step in steps:
        with contextlib.suppress(ContractReverted):
            world.apply(step)
        world.check()


def test_a_model_chain_identity_is_a_node_identity() -> None:
    identity = NodeIdentity.from_secret(keccak256(b"some node"))
    state = new_state([0])
    assert state.account(identity).address == identity.address
