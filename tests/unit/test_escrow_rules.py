"""The rules the roles share about a paid job: result signatures, escrow checks, addresses."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import msgpack
import pytest

from consensus.eip712 import Domain, from_eth_signature, result_digest
from ravenp2p.chain.base import Deployment, JobOnChain, JobStatusOnChain
from ravenp2p.chain.deploy import RAVEN, deploy_contracts
from ravenp2p.chain.devchain import EmbeddedChain
from ravenp2p.chain.web3chain import Web3Chain
from ravenp2p.devnet import devnet_spec
from ravenp2p.identity import NodeIdentity, address_of, recover_signer
from ravenp2p.roles.escrow import (
    check_escrow,
    job_key,
    max_calculations,
    peer_address,
    result_signed_by,
    sign_result,
)
from ravenp2p.roles.requester import prepare_job
from ravenp2p.roles.worker import Worker, _JobContext

SECP256K1_ORDER = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
DEPLOYMENT = Deployment(31337, "0x" + "11" * 20, "0x" + "22" * 20, "0x" + "33" * 20)
DIGEST = "ab" * 32


@pytest.fixture(scope="module")
def manifest():
    prepared = prepare_job(devnet_spec("digits", 3), NodeIdentity.generate().peer_id,
                           chain=DEPLOYMENT)
    return prepared.manifest


def test_a_result_signature_is_eip712_in_the_registry_domain(manifest) -> None:
    worker = NodeIdentity.generate()
    signature = sign_result(worker, manifest, 7, DIGEST)
    assert len(signature) == 65 and signature[64] in (27, 28)
    domain = Domain(chain_id=DEPLOYMENT.chain_id, verifying_contract=DEPLOYMENT.registry)
    digest = result_digest(domain, job_key(manifest.job_id), 7, bytes.fromhex(DIGEST))
    assert address_of(recover_signer(digest, from_eth_signature(signature))) == worker.address
    assert result_signed_by(manifest, worker.peer_id, 7, DIGEST, signature)


def test_a_signature_does_not_carry_over_to_anything_else(manifest) -> None:
    worker, other = NodeIdentity.generate(), NodeIdentity.generate()
    signature = sign_result(worker, manifest, 7, DIGEST)
    assert not result_signed_by(manifest, other.peer_id, 7, DIGEST, signature)
    assert not result_signed_by(manifest, worker.peer_id, 8, DIGEST, signature)
    assert not result_signed_by(manifest, worker.peer_id, 7, "cd" * 32, signature)
    elsewhere = dataclasses.replace(
        manifest, chain=dataclasses.replace(DEPLOYMENT, chain_id=DEPLOYMENT.chain_id + 1)
    )
    assert not result_signed_by(elsewhere, worker.peer_id, 7, DIGEST, signature)
    unpaid = dataclasses.replace(manifest, chain=None)
    assert not result_signed_by(unpaid, worker.peer_id, 7, DIGEST, signature)
    assert result_signed_by(unpaid, worker.peer_id, 7, DIGEST,
                            sign_result(worker, unpaid, 7, DIGEST))
    assert not result_signed_by(manifest, worker.peer_id, 7, DIGEST, bytes(65))
    # The malleable twin (n - s, flipped v) recovers the same key; the chain refuses it.
    r, s_value, v = signature[:32], int.from_bytes(signature[32:64], "big"), signature[64]
    twin = r + (SECP256K1_ORDER - s_value).to_bytes(32, "big") + bytes([55 - v])
    assert not result_signed_by(manifest, worker.peer_id, 7, DIGEST, twin)


def test_a_peer_address_is_derived_from_its_key() -> None:
    identity = NodeIdentity.generate()
    assert peer_address(identity.peer_id) == identity.address
    with pytest.raises(ValueError):
        peer_address("not-a-peer-id")


def _job(manifest, **changes) -> JobOnChain:
    spec = manifest.spec
    job = JobOnChain(
        job_id=job_key(manifest.job_id), requester=peer_address(manifest.requester),
        price=spec.price_per_calculation, redundancy=spec.redundancy,
        max_calculations=max_calculations(manifest), deadline=2**40, deposit=spec.budget,
        epoch=0, master_rank=0, last_heartbeat=0, status=JobStatusOnChain.OPEN, root=bytes(32),
        payout_total=0, claimed_total=0,
    )
    return dataclasses.replace(job, **changes)


def test_an_escrow_that_matches_the_spec_is_accepted(manifest) -> None:
    assert check_escrow(manifest, _job(manifest)) == ""


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"status": JobStatusOnChain.SETTLED}, "settled on-chain"),
        ({"status": JobStatusOnChain.NONE}, "none on-chain"),
        ({"price": 1}, "price per calculation"),
        ({"redundancy": 1}, "redundancy"),
        ({"max_calculations": 5}, "maximum calculations"),
        ({"deposit": 1}, "does not cover"),
        ({"requester": "0x" + "44" * 20}, "not by the job's requester"),
    ],
)
def test_an_escrow_that_does_not_match_is_refused_with_the_reason(manifest, changes, words):
    assert words in check_escrow(manifest, _job(manifest, **changes))


def test_a_worker_never_signs_two_digests_for_one_calculation(manifest) -> None:
    """Whoever re-orders a calculation, a second, different result would be equivocation."""
    identity = NodeIdentity.generate()
    worker = Worker.__new__(Worker)  # only the signing logic, above any network
    worker.node = SimpleNamespace(identity=identity)
    context = _JobContext(manifest, master=NodeIdentity.generate().peer_id)
    first = worker._sign_once(context, 3, DIGEST)
    assert first is not None and result_signed_by(manifest, identity.peer_id, 3, DIGEST, first)
    assert worker._sign_once(context, 3, DIGEST) == first
    assert worker._sign_once(context, 3, "cd" * 32) is None
    assert worker._sign_once(context, 4, "cd" * 32) is not None


def test_a_restarted_worker_still_never_signs_a_second_digest(manifest, tmp_path) -> None:
    """The journal on disk outlives the process: a re-ordered calculation gets the old answer."""
    identity = NodeIdentity.generate()
    worker = Worker.__new__(Worker)
    worker.node = SimpleNamespace(identity=identity)
    master = NodeIdentity.generate().peer_id
    journal = tmp_path / "signed" / "job.msgpack"
    first = worker._sign_once(_JobContext(manifest, master, journal=journal), 3, DIGEST)
    restarted = _JobContext(manifest, master, journal=journal)
    assert worker._sign_once(restarted, 3, "cd" * 32) is None
    assert worker._sign_once(restarted, 3, DIGEST) == first
    # A record cut short by a crash is dropped; the records before it are kept.
    with journal.open("ab") as raw:
        raw.write(msgpack.packb([4, "cd" * 32, b"\x01" * 65])[:-7])
    again = _JobContext(manifest, master, journal=journal)
    assert again.signed.get(3) == (DIGEST, first) and again.signed.get(4) is None
    again.signed.discard()
    assert not journal.exists() and again.signed.get(3) is None


async def test_a_worker_checks_a_paid_jobs_escrow_and_master_before_working() -> None:
    dev = EmbeddedChain()
    deployment = deploy_contracts(dev.w3, dev.funded_secret)
    owner = Web3Chain(dev.w3, deployment, dev.funded_secret)
    master, requester, worker_key = (NodeIdentity.generate() for _ in range(3))
    chains = {}
    for identity in (master, requester, worker_key):
        dev.fund(identity.address, 10**18)
        chains[identity.address] = Web3Chain(dev.w3, deployment, identity.private_key.secret)
    await owner.mint(master.address, 200 * RAVEN)
    await chains[master.address].stake(200 * RAVEN)
    await chains[master.address].become_candidate()
    manifest = prepare_job(devnet_spec("digits", 3), requester.peer_id, chain=deployment).manifest
    worker = Worker.__new__(Worker)  # only the escrow check, above any network
    worker.node = SimpleNamespace(chain=chains[worker_key.address])

    assert "none on-chain" in await worker._escrow_refusal(manifest, master.peer_id)
    spec = manifest.spec
    await owner.mint(requester.address, spec.budget)
    await chains[requester.address].create_job(
        job_key(manifest.job_id), spec.price_per_calculation, spec.redundancy,
        max_calculations(manifest), await owner.now() + 3600, spec.budget,
    )
    assert await worker._escrow_refusal(manifest, master.peer_id) == ""
    impostor = NodeIdentity.generate().peer_id
    assert "names" in await worker._escrow_refusal(manifest, impostor)
    elsewhere = dataclasses.replace(
        manifest, chain=dataclasses.replace(deployment, chain_id=deployment.chain_id + 1)
    )
    assert "not connected" in await worker._escrow_refusal(elsewhere, master.peer_id)
