"""Job manifests: one canonical encoding, the job id is its digest, bad manifests are named."""

from __future__ import annotations

import dataclasses

import msgpack
import numpy as np
import pytest

from ravenp2p.chain.base import Deployment
from ravenp2p.devnet import devnet_spec
from ravenp2p.identity import NodeIdentity
from ravenp2p.roles.faults import FAULT_KINDS, ByzantineResults, FaultPool
from ravenp2p.roles.requester import prepare_job
from ravenp2p.training.manifest import JobManifest, ManifestError
from ravenp2p.training.tensors import decode_tensors, digest_of
from ravenp2p.wire.job_messages import CalculationOrder


@pytest.fixture(scope="module")
def prepared():
    return prepare_job(devnet_spec("digits", 3), NodeIdentity.generate().peer_id)


def test_a_prepared_job_is_complete_and_content_addressed(prepared) -> None:
    manifest = prepared.manifest
    raw = manifest.encode()
    assert manifest.job_id == digest_of(raw)
    assert prepared.blobs[manifest.job_id] == raw
    assert JobManifest.decode(raw) == manifest
    # Every shard and the initial weights are among the blobs, under their digests.
    for ref in manifest.shards:
        assert digest_of(prepared.blobs[ref.digest]) == ref.digest
        assert len(prepared.blobs[ref.digest]) == ref.size
    weights = decode_tensors(prepared.blobs[manifest.initial_weights])
    assert all(a.dtype == np.float32 for a in weights.values())
    # The automatic model choice is recorded in the job.
    assert manifest.spec.model.auto and manifest.spec.model.chosen == "cnn"
    assert manifest.holdout_samples == len(prepared.holdout.targets) > 0


def test_any_change_changes_the_job_id(prepared) -> None:
    manifest = prepared.manifest
    other = dataclasses.replace(manifest, created_ms=manifest.created_ms + 1)
    assert other.job_id != manifest.job_id


def _body(prepared) -> dict:
    return msgpack.unpackb(prepared.manifest.encode(), raw=False)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda b: b.update(extra=1), "manifest.extra"),
        (lambda b: b.pop("shards"), "manifest.shards"),
        (lambda b: b.update(shards=[]), "manifest.shards"),
        (lambda b: b["shards"][0].__setitem__(0, "../../etc/passwd"), "manifest.shards[0].digest"),
        (lambda b: b["shards"][0][2].pop(), "manifest.shards[0]"),
        (lambda b: b.update(initial_weights="xyz"), "manifest.initial_weights"),
        (lambda b: b["spec"]["payment"].update(budget="0.000001"), "manifest.spec.payment.budget"),
        (lambda b: b["spec"].update(redundancy=0), "manifest.spec.redundancy"),
        (lambda b: b.update(version=2), "manifest.version"),
        (lambda b: b.update(chain=[1, "0x12"]), "manifest.chain"),
        (lambda b: b.update(chain=[0, "0x" + "11" * 20, "0x" + "22" * 20, "0x" + "33" * 20]),
         "manifest.chain"),
        (lambda b: b.update(chain=[5, "0x" + "11" * 20, "not an address", "0x" + "33" * 20]),
         "manifest.chain"),
    ],
)
def test_bad_manifests_are_refused_naming_the_field(prepared, change, field) -> None:
    body = _body(prepared)
    change(body)
    with pytest.raises(ManifestError) as info:
        JobManifest.decode(msgpack.packb(body, use_bin_type=True))
    assert str(info.value).startswith(field)


def test_a_paid_job_names_its_chain_deployment(prepared) -> None:
    deployment = Deployment(31337, "0x" + "11" * 20, "0x" + "22" * 20, "0x" + "33" * 20)
    paid = dataclasses.replace(prepared.manifest, chain=deployment)
    assert JobManifest.decode(paid.encode()).chain == deployment
    assert paid.job_id != prepared.manifest.job_id
    assert JobManifest.decode(prepared.manifest.encode()).chain is None


def test_non_canonical_and_garbage_bytes_are_refused(prepared) -> None:
    body = _body(prepared)
    reordered = msgpack.packb(dict(reversed(list(body.items()))), use_bin_type=True)
    with pytest.raises(ManifestError, match="canonical"):
        JobManifest.decode(reordered)
    with pytest.raises(ManifestError, match="msgpack"):
        JobManifest.decode(b"\xc1 not msgpack")
    with pytest.raises(ManifestError, match="map"):
        JobManifest.decode(msgpack.packb([1, 2, 3]))


def test_byzantine_results_are_plausible_but_wrong() -> None:
    """Each fault kind keeps names, shapes and dtype, and differs from the true result."""
    rng = np.random.default_rng(0)
    truth = {"w": rng.standard_normal((4, 3)).astype(np.float32), "b": np.ones(3, np.float32)}
    pool = FaultPool()
    for kind in FAULT_KINDS:
        liar = ByzantineResults(seed=1, pool=pool, kinds=(kind,))
        for calc in range(3):
            order = CalculationOrder(
                calc=calc, round=0, kind="gradient", weights="0" * 64, shard="1" * 64, seed=calc,
                threads=1, workers=(), deadline_s=1.0,
            )
            honest = {k: v + calc for k, v in truth.items()}
            wrong = liar(order, honest)
            assert wrong.keys() == honest.keys()
            assert all(wrong[k].shape == honest[k].shape for k in honest)
            assert any(not np.array_equal(wrong[k], honest[k]) for k in honest), kind
    with pytest.raises(ValueError, match="fault kinds"):
        ByzantineResults(seed=0, kinds=("honest",))
