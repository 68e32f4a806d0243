"""The model marketplace on real py-libp2p nodes and the embedded chain.

A worker publishes a model (made by `save_model`, trained by nothing) with a
price; the requester, through its control socket, lists it, fetches it
(digest and record checked), pays for and runs a call at the publisher,
and runs the fetched copy here with the same outputs. Refusals (an unpaid
call, a reused, foreign or short payment) are checked on the publisher.
"""

from __future__ import annotations

import base64
import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
import trio
from market_models import forge, make_model

from ravenp2p.chain.base import Chain
from ravenp2p.devnet import start_devnet
from ravenp2p.market.catalog import Catalog, CatalogEntry
from ravenp2p.market.inputs import encode_inputs
from ravenp2p.market.payments import PaymentLedger
from ravenp2p.market.records import (
    INFER_PROTOCOL,
    InferenceReply,
    InferenceRequest,
    model_key,
    open_record,
)
from ravenp2p.market.role import InferenceRefused, MarketConfig, MarketError, ModelCatalog
from ravenp2p.network.base import RequestFailed
from ravenp2p.node.control import RequestRefused, control_request
from ravenp2p.node.node import Node
from ravenp2p.training.model_file import load_model
from ravenp2p.training.spec import RAVEN
from ravenp2p.training.tensors import decode_tensors, digest_of
from ravenp2p.wire import WireError

PRICE = RAVEN // 100  # 0.01 RAVEN a call
NAME = "digits-market"


async def wait_listed(catalog: ModelCatalog, publisher: str, name: str) -> CatalogEntry:
    with trio.fail_after(20):
        while (entry := catalog.catalog.get(publisher, name)) is None:
            await trio.sleep(0.05)
    return entry


async def raw_call(node: Node, peer: str, request: InferenceRequest) -> InferenceReply:
    """Send an inference request as is (no payment made for it) and return the reply."""
    await node.reach(peer)
    raw = await node.network.request(peer, INFER_PROTOCOL,
                                     node.codec.seal(request, context=INFER_PROTOCOL), timeout=30)
    reply = node.codec.open(raw, context=INFER_PROTOCOL, from_peer=peer).message
    assert isinstance(reply, InferenceReply)
    return reply


async def balance(chain: Chain, address: str) -> int:
    return await chain.balance_of(address)


async def test_a_model_is_published_listed_fetched_and_called_for_a_price(tmp_path: Path) -> None:
    requester_dir = tmp_path / "requester"
    market = MarketConfig(announce_interval_s=2)  # every node runs it, as every daemon does
    async with start_devnet(1, economy=True, requester_dir=requester_dir, market=market) as net:
        money = net.economy
        assert money is not None
        caller_node, publisher_node = net.requester.node, net.workers[0].node
        catalogs = net.catalogs
        publisher, caller = catalogs[publisher_node.peer_id], catalogs[caller_node.peer_id]
        pub_id = publisher_node.peer_id

        # --- publish, list -----------------------------------------------------------------------
        model_path = make_model(tmp_path / "model.safetensors", name="digits-job")
        published = await publisher.publish(model_path, name=NAME, license="MIT", price=PRICE,
                                            description="untrained 8x8 digits")
        record = published.record
        assert record.model == digest_of(model_path.read_bytes())
        assert (record.price_units, record.chain_id, record.token) == (
            PRICE, money.deployment.chain_id, money.deployment.token)
        listed = await wait_listed(caller, pub_id, NAME)
        assert listed.record == record
        rows = await control_request(requester_dir, {"op": "models"})
        assert [(r["name"], r["publisher"], r["price"], r["own"], r["fetched"]) for r in rows] == [
            (NAME, pub_id, "0.01", False, False)]
        assert rows[0]["address"] == publisher_node.identity.address
        assert (rows[0]["kind"], rows[0]["input_shape"], rows[0]["accuracy"]) == (
            "image", [1, 8, 8], 0.5)
        # The signed record is in the DHT too, under the publisher's key, and verifies.
        key = model_key(pub_id, NAME)
        with trio.fail_after(20):
            while (raw := await caller_node.network.get_value(key, timeout=5)) is None:
                await trio.sleep(0.2)
        found = open_record(caller_node.codec, raw, key)
        assert found.sender == pub_id and found.message == record
        # Nobody else can put a record under the publisher's key.
        with pytest.raises(WireError, match="signed by"):
            await caller_node.network.put_value(key, caller_node.codec.seal(record, context=key))

        # --- fetch -------------------------------------------------------------------------------
        got = await control_request(
            requester_dir, {"op": "model_get", "model": NAME, "out": str(tmp_path / "got.st")},
            timeout=60)
        assert digest_of(await trio.Path(got["file"]).read_bytes()) == record.model
        assert await trio.Path(got["out"]).read_bytes() == model_path.read_bytes()
        assert (await trio.Path(got["spec"]).read_text()).startswith('name = "digits-job"')
        assert got["model"]["fetched"] is True

        # --- a paid call at the publisher --------------------------------------------------------
        images = np.random.default_rng(1).integers(0, 17, size=(5, 1, 8, 8), dtype=np.uint8)
        np.save(tmp_path / "images.npy", images)
        call = {"op": "infer", "model": f"{NAME}@{pub_id[:10]}",
                "file": str(tmp_path / "images.npy")}
        with pytest.raises(RequestRefused, match=r"costs 0.01 RAVEN a call, more than the 0 RAVEN"):
            await control_request(requester_dir, call, timeout=60)  # no consent to pay
        caller_chain, publisher_chain = caller_node.chain, publisher_node.chain
        assert caller_chain is not None and publisher_chain is not None
        await money.owner.mint(caller_chain.address, 10 * PRICE)
        paid_before = await balance(caller_chain, publisher_chain.address)
        remote = await control_request(requester_dir, {**call, "max_price": "0.01"}, timeout=60)
        assert remote["where"] == "remote" and remote["paid"] == "0.01"
        tx = remote["payment_tx"]
        assert await balance(caller_chain, publisher_chain.address) - paid_before == PRICE
        outputs = decode_tensors(base64.b64decode(remote["outputs"]))["output"]
        with torch.no_grad():
            expected = load_model(model_path)(torch.from_numpy(images)).numpy()
        assert outputs.shape == (5, 10)
        np.testing.assert_allclose(outputs, expected, rtol=0, atol=1e-6)
        assert [p["class"] for p in remote["predictions"]] == expected.argmax(axis=1).tolist()
        assert remote["logits"] == outputs.tolist()
        assert publisher.stats.served == 1 and publisher.stats.paid_units == PRICE
        assert PaymentLedger(publisher.ledger.path).is_used(tx)  # on disk

        # --- refusals ----------------------------------------------------------------------------
        with pytest.raises(RequestRefused, match="already paid for an earlier call"):
            await control_request(requester_dir, {**call, "payment": tx}, timeout=60)
        unpaid = InferenceRequest(name=NAME, model=record.model, inputs=encode_inputs(images))
        reply = await raw_call(caller_node, pub_id, unpaid)
        assert not reply.ok and reply.outputs == b""
        assert reply.reason.startswith("payment: digits-market costs 0.01 RAVEN a call")
        assert publisher_chain.address in reply.reason
        # Someone else's transfer to the publisher does not pay for this caller's call...
        master_chain = net.masters[0].node.chain
        assert master_chain is not None
        await money.owner.mint(master_chain.address, PRICE)
        foreign_tx = await master_chain.transfer(publisher_chain.address, PRICE)
        reply = await raw_call(caller_node, pub_id, dataclasses.replace(unpaid, payment=foreign_tx))
        assert not reply.ok
        assert f"moved 0 RAVEN from {caller_chain.address}" in reply.reason
        # ... nor does a transfer short of the price.
        short_tx = await caller_chain.transfer(publisher_chain.address, PRICE - 1)
        reply = await raw_call(caller_node, pub_id, dataclasses.replace(unpaid, payment=short_tx))
        assert not reply.ok and "moved 0.009999999999999999 RAVEN" in reply.reason
        # A malformed request, signed or not, is refused with its reason; the node goes on.
        with pytest.raises(RequestFailed, match="WireError: envelope: not valid msgpack"):
            await caller_node.network.request(pub_id, INFER_PROTOCOL, b"junk", timeout=30)
        malformed = forge(caller_node.identity, InferenceRequest.TYPE, INFER_PROTOCOL,
                          {**unpaid.to_body(), "payment": "0xnot-a-hash"})
        with pytest.raises(RequestFailed, match=r"WireError: body\.payment: does not match"):
            await caller_node.network.request(pub_id, INFER_PROTOCOL, malformed, timeout=30)
        # Inputs the model cannot take are refused before any payment is looked at.
        bad = dataclasses.replace(unpaid, inputs=encode_inputs(images.astype(np.float32)),
                                  payment=foreign_tx)
        reply = await raw_call(caller_node, pub_id, bad)
        assert reply.reason == "inputs: model digits-market takes uint8 values, not float32"
        with pytest.raises(InferenceRefused, match="no model 'nothing'"):
            stale = dataclasses.replace(listed, record=dataclasses.replace(record, name="nothing"))
            await caller.infer(stale, images, payment=foreign_tx)
        assert publisher.stats.served == 1 and publisher.stats.refused == 6

        # --- the same model run here, on the fetched copy ----------------------------------------
        local = await control_request(requester_dir, {**call, "local": True}, timeout=60)
        assert local["where"] == "local" and local["paid"] == "0" and local["payment_tx"] == ""
        assert local["outputs"] == remote["outputs"]
        given = {"op": "infer", "model": NAME, "local": True,
                 "inputs": base64.b64encode(encode_inputs(images)).decode()}
        from_base64 = await control_request(requester_dir, given, timeout=60)
        assert from_base64["outputs"] == local["outputs"]
        with pytest.raises(RequestRefused, match="inputs: not base64"):
            await control_request(requester_dir, {**given, "inputs": "%%%"}, timeout=60)
        direct = await caller.infer(listed, images, local=True)
        assert np.array_equal(direct.outputs, outputs)
        assert caller.cache.loads == 1  # loaded once, used twice

        # --- a failed remote call can be retried with its payment --------------------------------
        await money.owner.mint(caller_chain.address, PRICE)
        retry_tx = await caller_chain.transfer(publisher_chain.address, PRICE)
        again = await caller.infer(listed, images[:2], payment=retry_tx)
        assert again.payment == retry_tx and again.where == "remote"
        np.testing.assert_allclose(again.outputs, outputs[:2], rtol=0, atol=1e-6)  # batch of 2
        with pytest.raises(MarketError, match="already paid"):
            await caller.infer(listed, images[:2], payment=retry_tx)

        # --- the catalog outlives the node -------------------------------------------------------
        caller.catalog.save()
        reloaded = Catalog(caller.catalog.path)
        assert reloaded.load(caller._archive_codec, caller_node.clock.now()) == 1
        entry = reloaded.get(pub_id, NAME)
        assert entry is not None and entry.record == record

