"""No token is ever created or lost by the contracts, whatever sequence of operations runs.

A hypothesis state machine drives random sequences of stake, unbond,
withdraw (with time moving on), candidacy, job creation (which elects a new
epoch's committee), settlement, claims, refunds and both kinds of slashing by
several accounts on the embedded chain, some of them with website partners.
It keeps its own model of every balance and stake, derived from
docs/economics.md and `consensus.settlement`, and after every step checks the
chain against it:

- every tracked balance is the modelled one, and together they are the total supply;
- the registry holds exactly the sum of all stakes (active + unbonding);
- the escrow holds exactly the open deposits plus the unclaimed payouts, both by
  the model and by the escrow's own job records.

Each example starts from the same snapshot and is reverted afterwards.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, ClassVar

import pytest
from chain.market import max_cost, sync
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from consensus.abi import keccak256
from consensus.settlement import Settlement
from consensus.settlement import settle as settle_offchain
from ravenp2p.chain.artifacts import load_artifact
from ravenp2p.chain.base import ContractReverted, Deployment, JobStatusOnChain, StakeInfo
from ravenp2p.chain.deploy import RAVEN, DeployParams, deploy_contracts
from ravenp2p.chain.web3chain import Web3Chain
from ravenp2p.identity import NodeIdentity

if TYPE_CHECKING:
    from chain.conftest import ChainEnv

PARAMS = DeployParams(
    min_master_stake=100 * RAVEN,
    unbonding_delay=600,
    epoch_length=1200,
    committee_size=2,
    max_candidates=4,
    equivocation_slash_bps=5_000,
    reporter_share_bps=2_000,
    master_timeout=30,
)
NODES, REQUESTERS = 4, 1
INITIAL_TOKENS = 400 * RAVEN
REQUESTER_TOKENS = 2_000 * RAVEN  # enough for every job an example can open
INITIAL_STAKE = 150 * RAVEN  # nodes 0 and 1 start staked, as candidates
# Each node's website partner: another node's index, -1 for the outsider, None for none.
PARTNERS: tuple[int | None, ...] = (None, None, -1, 0)
MARGIN = 3  # seconds around a deadline in which the outcome depends on the next block's time
ETH = 10**20


@dataclass
class Job:
    """The model of one job in the escrow."""

    job_id: bytes
    requester: str
    price: int
    max_results: int
    deposit: int
    deadline: int
    epoch: int
    status: JobStatusOnChain = JobStatusOnChain.OPEN
    plan: Settlement | None = None
    claimed: set[str] = field(default_factory=set)

    def held(self) -> int:
        """What the escrow should still hold for this job."""
        if self.status == JobStatusOnChain.OPEN:
            return self.deposit
        if self.status == JobStatusOnChain.SETTLED:
            assert self.plan is not None
            return self.plan.payout_total - sum(self.plan.leaves[a] for a in self.claimed)
        return 0


@dataclass
class World:
    """The deployment every example starts from, and a snapshot of that starting point."""

    env: ChainEnv
    deployment: Deployment
    owner: Web3Chain
    treasury: str
    outsider: str
    nodes: list[Web3Chain]
    requesters: list[Web3Chain]
    first_job: Job | None = None
    start: int = 0

    @property
    def accounts(self) -> list[Web3Chain]:
        return [self.owner, *self.nodes, *self.requesters]

    def reset(self) -> None:
        self.env.dev.revert(self.start)
        self.start = self.env.dev.snapshot()  # a fresh one: a revert may use a snapshot up
        for chain in self.accounts:
            chain.resync_nonce()


def _identity(label: str) -> NodeIdentity:
    return NodeIdentity.from_secret(keccak256(f"conservation tests: {label}".encode()))


async def _prepare(world: World) -> None:
    """Fund the nodes, stake two candidates, set partners and open a first job."""
    nodes = world.nodes
    for node in nodes:
        await world.owner.mint(node.address, INITIAL_TOKENS)
    for node in nodes[:2]:
        await node.stake(INITIAL_STAKE)
        await node.become_candidate()
    for node, partner in zip(nodes, PARTNERS, strict=True):
        if partner is not None:
            await node.set_partner(world.outsider if partner == -1 else nodes[partner].address)
    requester = world.requesters[0]
    await world.owner.mint(requester.address, REQUESTER_TOKENS)
    job_id, price, redundancy, calculations = keccak256(b"first job"), RAVEN, 2, 3
    deposit = max_cost(price, redundancy, calculations)
    deadline = await requester.now() + 2000
    await requester.create_job(job_id, price, redundancy, calculations, deadline, deposit)
    job = await requester.job(job_id)
    world.first_job = Job(
        job_id, requester.address, price, redundancy * calculations, deposit, deadline, job.epoch
    )


@pytest.fixture(scope="module")
def world(embedded_env: ChainEnv) -> Iterator[World]:
    env = embedded_env
    snapshot = env.snapshot()
    try:
        keys = {
            label: _identity(label)
            for label in ["owner", *(f"node {i}" for i in range(NODES)),
                          *(f"requester {i}" for i in range(REQUESTERS))]
        }
        for identity in keys.values():
            env.dev.fund(identity.address, ETH)
        treasury, outsider = _identity("treasury").address, _identity("outsider").address
        secret = {label: i.private_key.secret for label, i in keys.items()}
        deployment = deploy_contracts(env.dev.w3, secret["owner"], PARAMS, treasury=treasury)

        def chain(label: str) -> Web3Chain:
            return Web3Chain(env.dev.w3, deployment, secret[label])

        world = World(
            env,
            deployment,
            chain("owner"),
            treasury,
            outsider,
            [chain(f"node {i}") for i in range(NODES)],
            [chain(f"requester {i}") for i in range(REQUESTERS)],
        )
        sync(_prepare, world)
        world.start = env.dev.snapshot()
        yield world
    finally:
        env.revert(snapshot)


def _expect(reverted: ContractReverted, *names: str) -> None:
    """Fail unless the refusal is one of the custom errors `names`."""
    assert reverted.reason.split("(")[0] in names, reverted.reason


class Conservation(RuleBasedStateMachine):
    """Random operations against the contracts, checked against a model after every step."""

    world: ClassVar[World]

    def __init__(self) -> None:
        super().__init__()
        w = self.world
        self.registry, self.escrow = w.deployment.registry, w.deployment.escrow
        nodes = [n.address for n in w.nodes]
        self.balances: dict[str, int] = {
            a: 0
            for a in (w.treasury, w.outsider, self.registry, self.escrow,
                      *nodes, *(r.address for r in w.requesters))
        }
        self.stakes: dict[str, list[int]] = {a: [0, 0, 0] for a in nodes}
        for i, address in enumerate(nodes):
            self.balances[address] = INITIAL_TOKENS - (INITIAL_STAKE if i < 2 else 0)
            if i < 2:
                self.stakes[address][0] = INITIAL_STAKE
        self.balances[self.registry] = 2 * INITIAL_STAKE
        self.candidates: set[str] = set(nodes[:2])
        self.partners: dict[str, str | None] = {a: None for a in self.balances}
        for address, partner in zip(nodes, PARTNERS, strict=True):
            if partner is not None:
                self.partners[address] = w.outsider if partner == -1 else nodes[partner]
        assert w.first_job is not None
        first = replace(w.first_job, claimed=set())
        self.balances[self.escrow] = first.deposit
        self.balances[first.requester] = REQUESTER_TOKENS - first.deposit
        self.elected: set[int] = {first.epoch}
        self.jobs: list[Job] = [first]
        self.evidence: set[tuple[str, int]] = set()
        self.orders = 0
        self.by_address = {c.address: c for c in w.accounts}
        self.token = w.owner.w3.eth.contract(
            address=w.deployment.token, abi=load_artifact("RavenToken").abi
        )

    def teardown(self) -> None:
        self.world.reset()

    # ------------------------------------------------------------------ helpers

    def run(self, function: Any, *args: Any) -> Any:
        return sync(function, *args)

    def move(self, source: str, target: str, amount: int) -> None:
        assert self.balances[source] >= amount
        self.balances[source] -= amount
        self.balances[target] += amount

    def now(self) -> int:
        return int(self.run(self.world.owner.now))

    def eligible(self) -> bool:
        return any(self.stakes[c][0] >= PARAMS.min_master_stake for c in self.candidates)

    def take(self, node: str, amount: int) -> None:
        """Slash `amount` off `node`'s stake the registry's way: active first, then unbonding."""
        stake = self.stakes[node]
        from_active = min(amount, stake[0])
        stake[0] -= from_active
        stake[1] -= amount - from_active
        if stake[1] == 0:
            stake[2] = 0
        if stake[0] < PARAMS.min_master_stake:  # a candidate slashed below it gives up its slot
            self.candidates.discard(node)

    def could_stand(self) -> list[Web3Chain]:
        """Nodes that are not candidates but hold the minimum stake."""
        return [
            n for n in self.world.nodes
            if n.address not in self.candidates
            and self.stakes[n.address][0] >= PARAMS.min_master_stake
        ]

    def open_jobs(self) -> list[Job]:
        return [j for j in self.jobs if j.status == JobStatusOnChain.OPEN]

    def expired_jobs(self) -> list[Job]:
        """Open jobs whose deadline has passed: anyone may have them refunded."""
        now = self.now()
        return [j for j in self.open_jobs() if now >= j.deadline]

    def staked(self) -> list[Web3Chain]:
        """Nodes with active stake."""
        return [n for n in self.world.nodes if self.stakes[n.address][0] > 0]

    def settled_jobs(self) -> list[Job]:
        return [
            j for j in self.jobs
            if j.status == JobStatusOnChain.SETTLED and j.plan is not None
            and len(j.claimed) < len(j.plan.leaves)
        ]

    # -------------------------------------------------------------------- stake

    @rule(node=st.integers(0, NODES - 1), amount=st.sampled_from([1, 40, 100, 160]))
    def stake(self, node: int, amount: int) -> None:
        chain = self.world.nodes[node]
        amount = min(amount * RAVEN, self.balances[chain.address])
        if amount == 0:
            return
        self.run(chain.stake, amount)
        self.move(chain.address, self.registry, amount)
        self.stakes[chain.address][0] += amount

    @precondition(lambda self: bool(self.staked()))
    @rule(data=st.data(), quarters=st.integers(1, 4))
    def request_unbond(self, data: st.DataObject, quarters: int) -> None:
        chain = data.draw(st.sampled_from(self.staked()))
        stake = self.stakes[chain.address]
        amount = max(1, stake[0] * quarters // 4)
        self.run(chain.request_unbond, amount)
        stake[0] -= amount
        stake[1] += amount
        stake[2] = (self.run(chain.stake_of, chain.address)).release_time
        assert stake[2] == self.now() + PARAMS.unbonding_delay
        if stake[0] < PARAMS.min_master_stake:
            self.candidates.discard(chain.address)

    @precondition(lambda self: any(s[1] for s in self.stakes.values()))
    @rule(data=st.data())
    def withdraw(self, data: st.DataObject) -> None:
        unbonding = [n for n in self.world.nodes if self.stakes[n.address][1]]
        chain = data.draw(st.sampled_from(unbonding))
        stake, now = self.stakes[chain.address], self.now()
        if now + 1 < stake[2] - MARGIN:
            with pytest.raises(ContractReverted) as refused:
                self.run(chain.withdraw)
            _expect(refused.value, "StillUnbonding")
        elif now >= stake[2]:
            self.run(chain.withdraw)
            self.move(self.registry, chain.address, stake[1])
            stake[1] = stake[2] = 0

    @rule(seconds=st.sampled_from([30, 300, 700, 2100]))
    def advance_time(self, seconds: int) -> None:
        self.world.env.dev.advance_time(seconds)

    @precondition(lambda self: bool(self.could_stand()))
    @rule(data=st.data())
    def become_candidate(self, data: st.DataObject) -> None:
        chain = data.draw(st.sampled_from(self.could_stand()))
        self.run(chain.become_candidate)
        self.candidates.add(chain.address)

    # --------------------------------------------------------------------- jobs

    @precondition(lambda self: len(self.open_jobs()) < 3)
    @rule(
        requester=st.integers(0, REQUESTERS - 1),
        price=st.sampled_from([RAVEN, 3 * RAVEN + 7, 101]),
        redundancy=st.integers(1, 3),
        max_calculations=st.integers(1, 4),
        lifetime=st.sampled_from([200, 2000, 2000]),
        extra=st.sampled_from([0, 5 * RAVEN]),
    )
    def create_job(
        self, requester: int, price: int, redundancy: int, max_calculations: int,
        lifetime: int, extra: int,
    ) -> None:
        chain = self.world.requesters[requester]
        deposit = max_cost(price, redundancy, max_calculations) + extra
        job_id = keccak256(f"conservation job {len(self.jobs)}".encode())
        deadline = self.now() + lifetime
        args = (job_id, price, redundancy, max_calculations, deadline, deposit)
        try:
            self.run(chain.create_job, *args)
        except ContractReverted as refused:
            _expect(refused, "NoEligibleCandidates")
            assert not self.eligible()
            return
        epoch = self.run(chain.job, job_id).epoch
        assert epoch in self.elected or self.eligible()
        self.elected.add(epoch)
        self.move(chain.address, self.escrow, deposit)
        self.jobs.append(
            Job(job_id, chain.address, price, redundancy * max_calculations, deposit, deadline,
                epoch)
        )

    @precondition(lambda self: bool(self.open_jobs()))
    @rule(data=st.data())
    def settle(self, data: st.DataObject) -> None:
        job = data.draw(st.sampled_from(self.open_jobs()))
        workers = [c.address for c in (*self.world.nodes, *self.world.requesters)]
        credits: dict[str, int] = {}
        budget = job.max_results
        chosen = st.lists(st.sampled_from(workers), min_size=1, max_size=4, unique=True)
        for worker in data.draw(chosen):
            count = min(budget, data.draw(st.integers(0, 3)))
            credits[worker] = count
            budget -= count
        plan = settle_offchain(
            credits, job.price, {w: self.partners[w] for w in credits}, job.deposit, job.max_results
        )
        master = self.by_address[self.run(self.world.owner.master_of, job.job_id)]
        args = (job.job_id, plan.root, plan.accepted_results, plan.partner_total)
        now = self.now()
        if now + 1 > job.deadline:
            with pytest.raises(ContractReverted) as refused:
                self.run(master.settle, *args)
            _expect(refused.value, "JobDeadlinePassed")
            return
        if now + 1 + MARGIN > job.deadline:
            return
        if self.stakes[master.address][0] < PARAMS.min_master_stake:
            with pytest.raises(ContractReverted) as refused:
                self.run(master.settle, *args)
            _expect(refused.value, "MasterStakeTooLow")
            return
        self.run(master.settle, *args)
        self.move(self.escrow, master.address, plan.master_fee)
        self.move(self.escrow, self.world.treasury, plan.protocol_fee)
        self.move(self.escrow, job.requester, plan.refund)
        job.status, job.plan = JobStatusOnChain.SETTLED, plan
        for _ in range(data.draw(st.sampled_from(range(len(plan.leaves) + 1)))):  # some at once
            self._claim(data, job)

    @precondition(lambda self: bool(self.settled_jobs()))
    @rule(data=st.data())
    def claim(self, data: st.DataObject) -> None:
        self._claim(data, data.draw(st.sampled_from(self.settled_jobs())))

    def _claim(self, data: st.DataObject, job: Job) -> None:
        """Anyone (a random node) claims one unclaimed leaf of a settled job."""
        assert job.plan is not None
        account = data.draw(st.sampled_from(sorted(set(job.plan.leaves) - job.claimed)))
        amount = job.plan.leaves[account]
        submitter = data.draw(st.sampled_from(self.world.nodes))
        self.run(submitter.claim, job.job_id, account, amount, job.plan.proof(account))
        self.move(self.escrow, account, amount)
        job.claimed.add(account)

    @precondition(lambda self: bool(self.expired_jobs()))
    @rule(data=st.data())
    def refund(self, data: st.DataObject) -> None:
        job = data.draw(st.sampled_from(self.expired_jobs()))
        self.run(self.world.owner.refund, job.job_id)
        self.move(self.escrow, job.requester, job.deposit)
        job.status = JobStatusOnChain.REFUNDED

    # ----------------------------------------------------------------- slashing

    @rule(data=st.data(), by_committee=st.booleans())
    def slash(self, data: st.DataObject, by_committee: bool) -> None:
        """Slash a node: by a committee order when an epoch is elected, else for equivocation."""
        nodes = st.sampled_from(self.world.nodes)
        if by_committee and self.elected:
            self.slash_by_committee(
                data.draw(st.sampled_from(sorted(self.elected))),
                data.draw(nodes),
                data.draw(st.sampled_from([1, 30 * RAVEN, 10**6 * RAVEN])),
            )
        else:
            calculation = data.draw(st.integers(0, 2))
            self.slash_equivocation(data.draw(nodes), data.draw(nodes), calculation)

    def slash_equivocation(
        self, offender: Web3Chain, submitter: Web3Chain, calculation: int
    ) -> None:
        job = keccak256(b"conservation evidence")
        a, b = keccak256(b"digest a"), keccak256(b"digest b")
        args = (
            offender.address, job, calculation,
            a, offender.sign_result(job, calculation, a),
            b, offender.sign_result(job, calculation, b),
        )
        stake = self.stakes[offender.address]
        amount = (stake[0] + stake[1]) * PARAMS.equivocation_slash_bps // 10_000
        key = (offender.address, calculation)
        if key in self.evidence or amount == 0:
            with pytest.raises(ContractReverted) as refused:
                self.run(submitter.slash_equivocation, *args)
            _expect(
                refused.value,
                "EquivocationAlreadySlashed" if key in self.evidence else "NothingToSlash",
            )
            return
        self.run(submitter.slash_equivocation, *args)
        self.evidence.add(key)
        self.take(offender.address, amount)
        reward = amount * PARAMS.reporter_share_bps // 10_000
        self.move(self.registry, submitter.address, reward)
        self.move(self.registry, self.world.treasury, amount - reward)

    def slash_by_committee(self, epoch: int, offender: Web3Chain, amount: int) -> None:
        members = [self.by_address[a] for a in self.run(self.world.owner.committee, epoch)]
        target = offender.address
        self.orders += 1
        evidence = keccak256(b"order %d" % self.orders)
        signers = members[: len(members) // 2 + 1]
        signatures = [m.sign_slash_order(target, amount, evidence, epoch) for m in signers]
        args = (target, amount, evidence, epoch, signatures)
        stake = self.stakes[target]
        available = stake[0] + stake[1]
        current = self.run(self.world.owner.current_epoch)
        if epoch + 1 < current:
            with pytest.raises(ContractReverted) as refused:
                self.run(self.world.owner.slash_by_committee, *args)
            _expect(refused.value, "SlashOrderExpired")
            return
        if available == 0:
            with pytest.raises(ContractReverted) as refused:
                self.run(self.world.owner.slash_by_committee, *args)
            _expect(refused.value, "NothingToSlash")
            return
        self.run(self.world.owner.slash_by_committee, *args)
        taken = min(amount, available)
        self.take(target, taken)
        self.move(self.registry, self.world.treasury, taken)

    # --------------------------------------------------------------- invariants

    @invariant()
    def tokens_are_conserved(self) -> None:
        self.run(self._check)

    async def _check(self) -> None:
        observer = self.world.owner
        # The owner only mints, so every token is with one of these (the sum proves it).
        for address, expected in self.balances.items():
            assert await observer.balance_of(address) == expected, address
        assert int(self.token.functions.totalSupply().call()) == sum(self.balances.values())
        for address, (active, unbonding, release) in self.stakes.items():
            assert await observer.stake_of(address) == StakeInfo(active, unbonding, release)
        assert self.balances[self.registry] == sum(a + u for a, u, _ in self.stakes.values())
        assert self.balances[self.escrow] == sum(job.held() for job in self.jobs)
        on_chain = 0
        for job in self.jobs:
            record = await observer.job(job.job_id)
            assert record.status == job.status
            if record.status == JobStatusOnChain.OPEN:
                on_chain += record.deposit
            elif record.status == JobStatusOnChain.SETTLED:
                on_chain += record.payout_total - record.claimed_total
        assert self.balances[self.escrow] == on_chain
        assert set(await observer.candidates()) == self.candidates


def test_tokens_are_conserved_by_every_sequence_of_operations(world: World) -> None:
    Conservation.world = world
    run_state_machine_as_test(
        Conservation,
        settings=settings(
            max_examples=6,
            stateful_step_count=15,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
            # Every step is a transaction and shrinking would replay hundreds of sequences:
            # a failing sequence is reported as found.
            phases=(Phase.explicit, Phase.reuse, Phase.generate),
        ),
    )
