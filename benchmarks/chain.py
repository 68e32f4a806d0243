"""On-chain gas benchmark: deployment, staking, election, job creation, masters, settle, claims.

Run: `.venv/bin/python benchmarks/chain.py [--json] [--backend embedded|anvil]`

Deploys the contracts with room for 256 master candidates and a committee of
5, then measures the gas each operation uses (`gasUsed` of its receipt):

- `elect()` with 16, 64 and 256 staked candidates (stakes drawn at random);
- `settle` of jobs with 10, 1,000 and 100,000 contributors (trees built with
  `consensus.settlement`), and the `claim`s against each tree with their proof
  lengths: settle costs the same whatever the tree, a claim grows with log2(n);
- `stakeWithPermit`, `becomeCandidate`, `createJobWithPermit`, `heartbeat`,
  `takeOver` and the three deployments.

Gas is the same on every backend (same EVM rules, Prague); the embedded chain
needs no process. Building 256 candidates takes about a thousand transactions,
a minute or two on the embedded chain. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import trio

from consensus.abi import checksum_address, keccak256
from consensus.settlement import settle
from ravenp2p.chain.base import Deployment
from ravenp2p.chain.deploy import DeployParams, deploy_contracts
from ravenp2p.chain.devchain import Anvil, DevChain, EmbeddedChain
from ravenp2p.chain.web3chain import Web3Chain
from ravenp2p.identity import NodeIdentity

PARAMS = DeployParams(committee_size=5, max_candidates=256)
CANDIDATE_STEPS = (16, 64, 256)
CONTRIBUTOR_STEPS = (10, 1_000, 100_000)
CLAIMS_PER_TREE = 8
PRICE = 10**15  # 0.001 RAVEN per accepted result
ETH = 10**20
# Left in every account that will receive fees, so that each transfer under measurement
# updates a non-zero balance (a first credit to an empty account costs 17,100 gas more).
DUST = 1
Result = dict[str, Any]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass
class Bench:
    """The chain, the deployment and the accounts the measurements use."""

    dev: DevChain
    owner: Web3Chain
    requester: Web3Chain
    candidates: list[Web3Chain]

    def gas(self, tx_hash: str) -> int:
        return int(self.dev.w3.eth.get_transaction_receipt(tx_hash)["gasUsed"])

    def account(self, label: str) -> Web3Chain:
        """A funded account on the deployment, its key derived from `label`."""
        return funded(self.dev, self.owner.deployment, label)


def funded(dev: DevChain, deployment: Deployment, label: str) -> Web3Chain:
    """A Web3Chain for an account with ETH for gas, its key derived from `label`."""
    identity = NodeIdentity.from_secret(keccak256(f"chain benchmark: {label}".encode()))
    dev.fund(identity.address, ETH)
    return Web3Chain(dev.w3, deployment, identity.private_key.secret)


def deployment_gas(dev: DevChain, first_block: int) -> dict[str, int]:
    """Gas of the contract creations mined since `first_block`, by contract (deploy order)."""
    w3 = dev.w3
    gas = []
    for number in range(first_block, w3.eth.block_number + 1):
        for tx_hash in w3.eth.get_block(number)["transactions"]:
            receipt = w3.eth.get_transaction_receipt(tx_hash)
            if receipt["contractAddress"]:
                gas.append(int(receipt["gasUsed"]))
    names = ("RavenToken", "StakeRegistry", "JobEscrow")
    if len(gas) != len(names):
        raise RuntimeError(f"expected {len(names)} contract creations, found {len(gas)}")
    return dict(zip(names, gas, strict=True))


async def add_candidates(bench: Bench, count: int, rng: random.Random) -> Result:
    """Stake and register candidates until there are `count`; gas of each kind of step."""
    stake_gas, candidate_gas = [], []
    while len(bench.candidates) < count:
        node = bench.account(f"candidate {len(bench.candidates)}")
        amount = rng.randrange(PARAMS.min_master_stake, 10 * PARAMS.min_master_stake)
        await bench.owner.mint(node.address, amount + DUST)
        stake_gas.append(bench.gas(await node.stake(amount)))
        candidate_gas.append(bench.gas(await node.become_candidate()))
        bench.candidates.append(node)
    return {"stake": stake_gas, "become_candidate": candidate_gas}


def elect_gas(bench: Bench) -> int:
    """Gas of electing the current epoch now, without keeping the election."""
    snapshot = bench.dev.snapshot()
    try:
        return bench.gas(call(bench.owner.elect))
    finally:
        bench.dev.revert(snapshot)
        bench.owner.resync_nonce()


async def open_job(bench: Bench, label: str, results: int) -> tuple[bytes, int]:
    """A job with room for `results` accepted results; returns its id and createJob gas."""
    job_id = keccak256(f"benchmark job {label}".encode())
    deposit = results * PRICE * 110 // 100
    await bench.owner.mint(bench.requester.address, deposit)
    deadline = await bench.requester.now() + 24 * 3600
    tx = await bench.requester.create_job(job_id, PRICE, 1, results, deadline, deposit)
    return job_id, bench.gas(tx)


async def settle_and_claim(bench: Bench, contributors: int, rng: random.Random) -> Result:
    """Settle a job of `contributors` workers (one result each) and claim a few leaves."""
    job_id, _ = await open_job(bench, f"settle {contributors}", contributors)
    credits = {checksum_address("0x" + rng.randbytes(20).hex()): 1 for _ in range(contributors)}
    started = time.perf_counter()
    plan = settle(credits, PRICE, dict.fromkeys(credits), contributors * PRICE * 110 // 100)
    tree_seconds = time.perf_counter() - started
    master_address = await bench.requester.master_of(job_id)
    master = next(c for c in bench.candidates if c.address == master_address)
    settled = await master.settle(job_id, plan.root, plan.accepted_results, plan.partner_total)
    claims, proofs = [], []
    for account in rng.sample(sorted(plan.leaves), min(CLAIMS_PER_TREE, len(plan.leaves))):
        proof = plan.proof(account)
        tx = await bench.requester.claim(job_id, account, plan.leaves[account], proof)
        claims.append(bench.gas(tx))
        proofs.append(len(proof))
    return {
        "settle": bench.gas(settled.tx_hash),
        "claim_mean": round(statistics.mean(claims)),
        "claim_min": min(claims),
        "claim_max": max(claims),
        "proof_lengths": sorted(set(proofs)),
        "tree_seconds": round(tree_seconds, 2),
    }


async def masters_gas(bench: Bench) -> Result:
    """Gas of a heartbeat by a job's master and of a take-over by the next in rank."""
    job_id, _ = await open_job(bench, "masters", 10)
    ranked = await bench.requester.ranked_masters(job_id)
    by_address = {c.address: c for c in bench.candidates}
    heartbeat = bench.gas(await by_address[ranked[0]].heartbeat(job_id))
    bench.dev.advance_time(PARAMS.master_timeout)
    take_over = bench.gas(await by_address[ranked[1]].take_over(job_id))
    return {"heartbeat": heartbeat, "take_over": take_over}


def call(function: Callable[..., Awaitable[Any]], *args: Any) -> Any:
    """Run one async `Chain` call to completion."""
    return trio.run(function, *args)


def run(
    dev: DevChain,
    backend: str,
    seed: int,
    candidate_steps: tuple[int, ...] = CANDIDATE_STEPS,
    contributor_steps: tuple[int, ...] = CONTRIBUTOR_STEPS,
) -> Result:
    """Every measurement on `dev`; see the module docstring."""
    rng = random.Random(seed)
    w3 = dev.w3
    deployer = NodeIdentity.from_secret(keccak256(b"chain benchmark: deployer"))
    dev.fund(deployer.address, ETH)
    first_block = w3.eth.block_number + 1
    deployment = deploy_contracts(w3, deployer.private_key.secret, PARAMS)
    deployed = deployment_gas(dev, first_block)
    owner = Web3Chain(w3, deployment, deployer.private_key.secret)
    bench = Bench(dev, owner, funded(dev, deployment, "requester"), [])
    call(owner.mint, owner.address, DUST)  # the deployer is the treasury
    call(owner.mint, bench.requester.address, DUST)

    elect: dict[str, int] = {}
    stake_gas: list[int] = []
    candidate_gas: list[int] = []
    for count in candidate_steps:
        started = time.perf_counter()
        added = call(add_candidates, bench, count, rng)
        stake_gas += added["stake"]
        candidate_gas += added["become_candidate"]
        elect[str(count)] = elect_gas(bench)
        log(f"{count} candidates ({time.perf_counter() - started:.0f} s): "
            f"elect {elect[str(count)]:,} gas")

    call(owner.elect)  # the epoch of the jobs below, elected once with all candidates
    _, create_job = call(open_job, bench, "create", 10)
    masters = call(masters_gas, bench)
    settlements: dict[str, Result] = {}
    for contributors in contributor_steps:
        settlements[str(contributors)] = call(settle_and_claim, bench, contributors, rng)
        log(f"{contributors:,} contributors: settle {settlements[str(contributors)]['settle']:,} "
            f"gas, claim {settlements[str(contributors)]['claim_mean']:,} gas")
    return {
        "backend": backend,
        "chain_id": deployment.chain_id,
        "committee_size": PARAMS.committee_size,
        "max_candidates": PARAMS.max_candidates,
        "deployment": deployed,
        "stake_with_permit": round(statistics.median(stake_gas)),
        "become_candidate": round(statistics.median(candidate_gas)),
        "elect": elect,
        "create_job_with_permit": create_job,
        **masters,
        "settlements": settlements,
    }


def render(result: Result) -> str:
    """The result as a readable table."""
    rows: list[tuple[str, str, str]] = []
    for name, gas in result["deployment"].items():
        rows.append((f"deploy {name}", f"{gas:,}", ""))
    rows.append(("stakeWithPermit", f"{result['stake_with_permit']:,}", "median, first stake"))
    rows.append(("becomeCandidate", f"{result['become_candidate']:,}", "median"))
    for count, gas in result["elect"].items():
        rows.append((f"elect(), {count} candidates", f"{gas:,}",
                     f"committee of {result['committee_size']}"))
    rows.append(("createJobWithPermit", f"{result['create_job_with_permit']:,}",
                 "epoch already elected"))
    rows.append(("heartbeat", f"{result['heartbeat']:,}", ""))
    rows.append(("takeOver", f"{result['take_over']:,}", "rank 1 after one timeout"))
    for count, figures in result["settlements"].items():
        rows.append((f"settle, {int(count):,} contributors", f"{figures['settle']:,}", ""))
    for count, figures in result["settlements"].items():
        lengths = "/".join(str(n) for n in figures["proof_lengths"])
        rows.append((
            f"claim, {int(count):,} contributors",
            f"{figures['claim_mean']:,}",
            f"mean of {CLAIMS_PER_TREE}, proof length {lengths}",
        ))
    width = max(len(r[0]) for r in rows)
    lines = [f"backend: {result['backend']} (chain id {result['chain_id']})", ""]
    lines += [f"{name:<{width}}  {gas:>10}  {note}".rstrip() for name, gas, note in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--backend",
        choices=("embedded", "anvil"),
        default="embedded",
        help="the in-process chain (default) or a local anvil node started for the run",
    )
    parser.add_argument("--seed", type=int, default=1, help="seed for stakes and addresses")
    parser.add_argument(
        "--quick", action="store_true",
        help="16 candidates and 10 / 1,000 contributors only (a few seconds)",
    )
    args = parser.parse_args()
    steps = ((16,), (10, 1_000)) if args.quick else (CANDIDATE_STEPS, CONTRIBUTOR_STEPS)
    with ExitStack() as stack:
        dev: DevChain = (
            EmbeddedChain() if args.backend == "embedded" else stack.enter_context(Anvil())
        )
        result = run(dev, args.backend, args.seed, *steps)
    print(json.dumps(result) if args.json else render(result))


if __name__ == "__main__":
    main()
