"""Where a job meets the chain: result signatures, escrow checks, settlement and claims.

The roles share these steps so that the requester, the master and every worker
apply the same rules: results are signed with EIP-712 in the domain of the
job's stake registry (so an equivocation is provable on-chain), the master
settles with the payouts `consensus.settlement` computes from its signed
`job.done` credits, and each worker rebuilds the same tree, checks that the
root on-chain is the one it computed, and claims its own leaf.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

from consensus.abi import ZERO_ADDRESS
from consensus.eip712 import Domain, from_eth_signature, result_digest, to_eth_signature
from consensus.settlement import Settlement, settle
from ravenp2p.chain.base import Chain, ChainError, JobOnChain, JobStatusOnChain
from ravenp2p.identity import NodeIdentity, address_of, public_key_of_peer, recover_signer
from ravenp2p.training.manifest import JobManifest
from ravenp2p.wire.job_messages import WorkerCredit

log = logging.getLogger("ravenp2p.escrow")

UNPAID_CHAIN_ID = 0


class NotSettledYet(ChainError):
    """The job is not settled on the chain this node reads (yet: nodes may lag)."""


class SettlementMismatch(ChainError):
    """The root settled on-chain is not the root of the credits the master announced."""


def job_key(job_id: str) -> bytes:
    """The escrow's bytes32 job id: the manifest digest."""
    return bytes.fromhex(job_id)


def result_domain(manifest: JobManifest) -> Domain:
    """The EIP-712 domain results of this job are signed in.

    A paid job uses its stake registry's domain (verifiable on-chain); an
    unpaid job a domain bound to no chain, so its signatures are worthless on
    any chain.
    """
    chain = manifest.chain
    if chain is None:
        return Domain(chain_id=UNPAID_CHAIN_ID, verifying_contract=ZERO_ADDRESS)
    return Domain(chain_id=chain.chain_id, verifying_contract=chain.registry)


def sign_result(identity: NodeIdentity, manifest: JobManifest, calc: int, digest: str) -> bytes:
    """The worker's EIP-712 signature of Result(job, calc, digest), v in {27, 28}."""
    message = result_digest(result_domain(manifest), job_key(manifest.job_id), calc,
                            bytes.fromhex(digest))
    return to_eth_signature(identity.sign_digest(message))


def result_signed_by(
    manifest: JobManifest, worker: str, calc: int, digest: str, signature: bytes
) -> bool:
    """True when `signature` is `worker`'s (a peer id) EIP-712 signature of this result."""
    message = result_digest(result_domain(manifest), job_key(manifest.job_id), calc,
                            bytes.fromhex(digest))
    try:
        signer = recover_signer(message, from_eth_signature(signature))
    except ValueError:
        return False
    return address_of(signer) == peer_address(worker)


def peer_address(peer_id: str) -> str:
    """The Ethereum address of a peer: the same secp256k1 key as its peer id."""
    return address_of(public_key_of_peer(peer_id))


def check_escrow(manifest: JobManifest, job: JobOnChain) -> str:
    """Why a master must not run this paid job, or "" when the escrow is in order."""
    spec = manifest.spec
    if job.status is not JobStatusOnChain.OPEN:
        return f"escrow: the job is {job.status.name.lower()} on-chain, not open"
    requester = peer_address(manifest.requester)
    if job.requester != requester:
        return (f"escrow: the deposit was made by {job.requester}, not by the job's requester "
                f"{requester}")
    if job.price != spec.price_per_calculation:
        return (f"escrow: price per calculation on-chain is {job.price}, "
                f"the spec says {spec.price_per_calculation}")
    if job.redundancy != spec.redundancy:
        return f"escrow: redundancy on-chain is {job.redundancy}, the spec says {spec.redundancy}"
    calculations = max_calculations(manifest)
    if job.max_calculations != calculations:
        return (f"escrow: maximum calculations on-chain is {job.max_calculations}, "
                f"the spec allows {calculations}")
    if job.deposit < spec.max_cost():
        return f"escrow: deposit {job.deposit} does not cover the worst case {spec.max_cost()}"
    return ""


def max_calculations(manifest: JobManifest) -> int:
    """The most calculations the job may run (each paid to at most R workers)."""
    spec = manifest.spec
    return spec.stop.max_rounds * spec.calculations_per_round


async def with_partners(chain: Chain, credits: Sequence[WorkerCredit]) -> list[WorkerCredit]:
    """The credits with each paid worker's website partner, as the registry names it now."""
    rows = []
    for row in credits:
        partner = await chain.partner_of(peer_address(row.worker)) if row.accepted else None
        rows.append(dataclasses.replace(row, partner=partner or ""))
    return rows


def payout_plan(
    manifest: JobManifest, credits: Sequence[WorkerCredit], deposit: int
) -> Settlement:
    """The settlement of a job from its final credits (partners included) and its deposit.

    Pure: the master settles with it and every worker rebuilds the same tree
    from the signed `job.done`, whatever the registry says later.
    """
    earned: dict[str, int] = {}
    partners: dict[str, str | None] = {}
    for row in credits:
        if row.accepted > 0:
            address = peer_address(row.worker)
            earned[address] = row.accepted
            partners[address] = row.partner or None
    return settle(
        earned, manifest.spec.price_per_calculation, partners, deposit,
        max_results=max_calculations(manifest) * manifest.spec.redundancy,
    )


async def claim_own_payout(
    chain: Chain, manifest: JobManifest, credits: Sequence[WorkerCredit]
) -> int:
    """Check the settled root against the credits and claim this account's leaf.

    Returns the amount claimed (0 when there is nothing to claim). Raises
    `NotSettledYet`, or `SettlementMismatch` when the settled root is not the
    one the credits give: the master settled something else than it announced.
    """
    key = job_key(manifest.job_id)
    job = await chain.job(key)
    if job.status is not JobStatusOnChain.SETTLED:
        raise NotSettledYet(f"job {manifest.job_id[:12]} is {job.status.name.lower()}, "
                            "not settled")
    plan = payout_plan(manifest, credits, job.deposit)
    if plan.root != job.root:
        raise SettlementMismatch(
            f"the settled root 0x{job.root.hex()} is not the root of the announced credits "
            f"(0x{plan.root.hex()})"
        )
    me = chain.address
    amount = plan.amount_of(me)
    if amount == 0 or await chain.has_claimed(key, me):
        return 0
    await chain.claim(key, me, amount, plan.proof(me))
    return amount


async def confirmed_master(chain: Chain, job_id: str, address: str) -> bool:
    """Whether the escrow names `address` as the job's current master (a takeover is real).

    Raises `ChainError` when the chain cannot say.
    """
    return (await chain.master_of(job_key(job_id))).lower() == address.lower()
