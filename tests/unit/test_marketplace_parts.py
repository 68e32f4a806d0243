"""The marketplace's pieces without a network: record schema and validator, catalog, inputs,
predictions and the payment ledger."""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import msgpack
import numpy as np
import pytest
from market_models import DIGITS, TABULAR, TEXT, forge, job_id_for, make_model
from safetensors.numpy import save as save_safetensors

from ravenp2p.identity import NodeIdentity
from ravenp2p.market.catalog import Catalog, CatalogFull
from ravenp2p.market.inputs import (
    MAX_BATCH,
    InputError,
    decode_inputs,
    decode_outputs,
    encode_inputs,
    encode_outputs,
    encode_prompt,
    predictions,
    read_input_file,
    shape_inputs,
)
from ravenp2p.market.payments import PaymentLedger, PaymentRefused
from ravenp2p.market.records import (
    MODELS_TOPIC,
    InferenceRequest,
    ModelRecord,
    model_key,
    open_record,
    record_for,
)
from ravenp2p.training.model_file import read_model
from ravenp2p.training.tensors import digest_of, encode_tensors
from ravenp2p.wire import EnvelopeCodec, WireError, WireLimits

TOKEN = "0x" + "12" * 20


def record_of(path: Path, **kwargs: object) -> ModelRecord:
    data = path.read_bytes()
    fields = {"name": "digits-test", "created_ms": 1_700_000_000_000, **kwargs}
    return record_for(read_model(path), digest=digest_of(data), size=len(data), **fields)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("models")
    return {
        "digits": make_model(folder / "digits.safetensors", DIGITS),
        "tabular": make_model(folder / "tabular.safetensors", TABULAR, name="iris-ish"),
        "text": make_model(folder / "text.safetensors", TEXT, name="hello-chars"),
    }


@pytest.fixture(scope="module")
def digits(models: dict[str, Path]) -> ModelRecord:
    return record_of(models["digits"], license="MIT", price=10**16, chain_id=31337, token=TOKEN,
                     description="8x8 digits, untrained")


# --- the record ----------------------------------------------------------------------------------
def test_a_record_describes_its_model_file(models: dict[str, Path], digits: ModelRecord) -> None:
    saved = read_model(models["digits"])
    assert digits.model == digest_of(models["digits"].read_bytes())
    assert digits.size == models["digits"].stat().st_size
    assert digits.weights == digest_of(encode_tensors(saved.weights))
    assert digits.job == job_id_for("digits-test/0")
    assert (digits.kind, digits.task, digits.input_shape, digits.input_dtype) == (
        "image", "classification", (1, 8, 8), "uint8")
    assert (digits.num_classes, digits.vocab, digits.architecture) == (10, "", "cnn")
    assert (digits.metrics.accuracy, digits.metrics.loss, digits.metrics.samples,
            digits.metrics.rounds) == (0.5, 1.25, 180, 7)
    assert (digits.price, digits.price_units, digits.price_raven) == ("10000000000000000",
                                                                      10**16, "0.01")
    text = record_of(models["text"], name="hello-chars")
    assert (text.input_dtype, text.vocab, text.num_classes, text.metrics.accuracy) == (
        "int64", " abcdehlorw", None, None)
    tabular = record_of(models["tabular"])
    assert (tabular.kind, tabular.input_dtype, tabular.input_shape) == ("tabular", "float32", (5,))


def test_a_signed_record_round_trips_and_names_its_publisher(digits: ModelRecord) -> None:
    publisher = NodeIdentity.generate()
    codec = EnvelopeCodec(publisher)
    for context in (MODELS_TOPIC, model_key(publisher.peer_id, digits.name)):
        raw = codec.seal(digits, context=context)
        envelope = open_record(EnvelopeCodec(NodeIdentity.generate()), raw)
        assert envelope.message == digits and envelope.sender == publisher.peer_id
    key = model_key(publisher.peer_id, digits.name)
    assert key == f"/ravenp2p-model/{publisher.peer_id}/digits-test"
    assert open_record(codec, codec.seal(digits, context=key), key).message == digits


@pytest.mark.parametrize(("change", "field", "reason"), [
    ({"name": "a/b"}, "body.name", "expected format"),
    ({"price": "-1"}, "body.price", "expected format"),
    ({"price": "007"}, "body.price", "expected format"),
    ({"price": 5}, "body.price", "must be a string"),
    ({"size": 0}, "body.size", ">= 1"),
    ({"model": "AB" * 32}, "body.model", "expected format"),
    ({"input_shape": [1, 0, 8]}, "body.input_shape[1]", "1.."),
    ({"input_shape": [64]}, "body.input_shape", "dimensions"),
    ({"input_dtype": "int64"}, "body.input_dtype", "takes uint8 or float32"),
    ({"task": "language"}, "body.task", "does not go with kind"),
    ({"num_classes": None}, "body.num_classes", "must be an integer"),
    ({"chain_id": 0}, "body.chain_id", "must name the chain"),
    ({"token": ""}, "body.chain_id", "must name the chain"),
    ({"description": "fine\x1b[31m red"}, "body.description", "expected format"),
    ({"description": "fine\x9b31m red"}, "body.description", "expected format"),
    ({"description": "cheap \u202eeerf"}, "body.description", "expected format"),
    ({"license": "x" * 129}, "body.license", "too long"),
    ({"metrics": {"accuracy": 1.5}}, "body.metrics.accuracy", "<= 1.0"),
    ({"extra": 1}, "body.extra", "unknown field"),
])
def test_a_malformed_record_is_refused_naming_the_field(
    digits: ModelRecord, change: dict[str, object], field: str, reason: str
) -> None:
    body = {**digits.to_body(), **change}
    with pytest.raises(WireError) as refused:
        ModelRecord.from_body(body)
    assert refused.value.field == field
    assert reason in refused.value.reason


def test_a_signed_but_malformed_record_is_refused_naming_the_field(digits: ModelRecord) -> None:
    publisher = NodeIdentity.generate()
    checker = EnvelopeCodec(NodeIdentity.generate())
    good = forge(publisher, ModelRecord.TYPE, MODELS_TOPIC, digits.to_body())
    assert open_record(checker, good).message == digits  # the forging itself is sound
    for change, field in (({"price": "-5"}, "body.price"), ({"input_dtype": "int64"},
                                                            "body.input_dtype")):
        raw = forge(publisher, ModelRecord.TYPE, MODELS_TOPIC, {**digits.to_body(), **change})
        with pytest.raises(WireError) as refused:
            open_record(checker, raw)
        assert refused.value.field == field


def test_forged_misdirected_and_foreign_records_are_refused(digits: ModelRecord) -> None:
    publisher, other = NodeIdentity.generate(), NodeIdentity.generate()
    codec, checker = EnvelopeCodec(publisher), EnvelopeCodec(NodeIdentity.generate())
    raw = codec.seal(digits, context=MODELS_TOPIC)
    tampered = bytearray(raw)
    tampered[raw.index(b"digits-test")] ^= 0x01  # one byte of the signed body
    with pytest.raises(WireError) as forged:
        open_record(checker, bytes(tampered))
    assert forged.value.field == "signature"
    # A publisher cannot sign a record into another publisher's DHT key...
    mine, theirs = model_key(publisher.peer_id, digits.name), model_key(other.peer_id, digits.name)
    with pytest.raises(WireError, match="signed by"):
        open_record(checker, codec.seal(digits, context=theirs), theirs)
    with pytest.raises(WireError, match="meant for"):  # nor is its own record stored there
        open_record(checker, codec.seal(digits, context=mine), theirs)
    # ... nor under another name, nor for another topic.
    with pytest.raises(WireError, match="signed by"):
        open_record(checker, codec.seal(digits, context=model_key(publisher.peer_id, "x")),
                    model_key(publisher.peer_id, "x"))
    with pytest.raises(WireError, match="not meant for"):
        open_record(checker, codec.seal(digits, context="/ravenp2p/peers/1"))
    # Another message type in the models namespace is no record.
    request = InferenceRequest(name="x", model="ab" * 32, inputs=b"\0" * 8)
    with pytest.raises(WireError, match="a model record was expected"):
        open_record(checker, codec.seal(request, context=mine), mine)


# --- the catalog ---------------------------------------------------------------------------------
def sealed(identity: NodeIdentity, record: ModelRecord) -> object:
    return open_record(EnvelopeCodec(identity), EnvelopeCodec(identity).seal(record,
                                                                              context=MODELS_TOPIC))


def test_the_catalog_keeps_the_newest_record_per_publisher_and_name(digits: ModelRecord) -> None:
    alice, bob = NodeIdentity.generate(), NodeIdentity.generate()
    catalog = Catalog()
    newer = dataclasses.replace(digits, created_ms=digits.created_ms + 1, model="cd" * 32)
    assert catalog.offer(sealed(alice, digits), heard_at=100.0)
    assert catalog.offer(sealed(alice, newer), heard_at=101.0)
    assert not catalog.offer(sealed(alice, digits), heard_at=150.0)  # an old one replayed
    entry = catalog.get(alice.peer_id, "digits-test")
    assert entry is not None and entry.record == newer and entry.heard_at == 101.0
    assert not catalog.offer(sealed(alice, newer), heard_at=200.0)  # re-announced: fresher
    assert entry.heard_at == 200.0
    assert catalog.offer(sealed(bob, digits), heard_at=100.0)  # another publisher, same name
    assert len(catalog) == 2
    assert [e.publisher for e in catalog.published_by(alice.peer_id)] == [alice.peer_id]
    assert entry.address == alice.address


def test_references_name_one_model_or_say_why_not(digits: ModelRecord) -> None:
    alice, bob = NodeIdentity.generate(), NodeIdentity.generate()
    catalog = Catalog()
    catalog.offer(sealed(alice, digits), 1.0)
    other = dataclasses.replace(digits, name="other", model="ef" * 32)
    catalog.offer(sealed(bob, other), 1.0)
    assert catalog.resolve("other").publisher == bob.peer_id
    assert catalog.resolve(digits.model[:8]).record == digits
    assert catalog.resolve("efefefef").record == other
    catalog.offer(sealed(bob, digits), 1.0)
    with pytest.raises(ValueError, match=r"names 2 models .*write NAME@PEER"):
        catalog.resolve("digits-test")
    assert catalog.resolve(f"digits-test@{bob.peer_id[:12]}").publisher == bob.peer_id
    assert catalog.resolve("digits-test", prefer=alice.peer_id).publisher == alice.peer_id
    for missing in ("nothing", "digits-test@16Uiu2HAmNope", "abcdef12"):
        with pytest.raises(ValueError, match=r"no model .* is in this node's catalog"):
            catalog.resolve(missing)
    with pytest.raises(ValueError, match="model: a model name"):
        catalog.resolve("")


def test_the_catalog_is_bounded_per_publisher_and_overall(digits: ModelRecord) -> None:
    alice, bob = NodeIdentity.generate(), NodeIdentity.generate()
    catalog = Catalog(max_entries=3, max_per_publisher=2)
    for i in range(2):
        catalog.offer(sealed(alice, dataclasses.replace(digits, name=f"m{i}")), 1.0)
    with pytest.raises(CatalogFull, match="already has 2 models"):
        catalog.offer(sealed(alice, dataclasses.replace(digits, name="m2")), 1.0)
    catalog.offer(sealed(bob, digits), 1.0)
    with pytest.raises(CatalogFull, match="holds 3 models"):
        catalog.offer(sealed(bob, dataclasses.replace(digits, name="m9")), 1.0)
    # A newer version of a listed model still gets in.
    newer = dataclasses.replace(digits, name="m0", created_ms=digits.created_ms + 5)
    assert catalog.offer(sealed(alice, newer), 2.0)


def test_a_saved_catalog_loads_reverified(tmp_path: Path, digits: ModelRecord) -> None:
    alice = NodeIdentity.generate()
    path = tmp_path / "catalog.msgpack"
    catalog = Catalog(path)
    catalog.offer(sealed(alice, digits), heard_at=1000.0)
    catalog.offer(sealed(alice, dataclasses.replace(digits, name="stale")), heard_at=10.0)
    catalog.save()
    archive = EnvelopeCodec(NodeIdentity.generate(), WireLimits(max_age_s=1e9,
                                                                max_future_skew_s=1e9))
    reloaded = Catalog(path, forget_after_s=1500.0)
    assert reloaded.load(archive, now=2000.0) == 1  # "stale" was not heard of for too long
    entry = reloaded.get(alice.peer_id, "digits-test")
    assert entry is not None and entry.record == digits and entry.heard_at == 1000.0
    # A record altered on disk fails its signature and is dropped; the rest still loads.
    data = msgpack.unpackb(path.read_bytes(), raw=False)
    raw = bytearray(data["entries"][0][0])
    raw[raw.index(b"digits-test")] ^= 0x01
    data["entries"][0][0] = bytes(raw)
    path.write_bytes(msgpack.packb(data, use_bin_type=True))
    assert Catalog(path, forget_after_s=1500.0).load(archive, now=2000.0) == 0
    assert Catalog(path).load(archive, now=2000.0) == 1  # "stale" alone is left
    path.write_bytes(b"\xc1 not msgpack")
    assert Catalog(path).load(archive, now=2000.0) == 0


# --- inputs --------------------------------------------------------------------------------------
def test_inputs_are_shaped_converted_and_checked(models: dict[str, Path],
                                                 digits: ModelRecord) -> None:
    pixels = np.arange(64, dtype=np.float64).reshape(1, 8, 8) % 17
    one = shape_inputs(pixels, digits)  # one sample gets a batch axis, floats become uint8
    assert one.shape == (1, 1, 8, 8) and one.dtype == np.uint8
    flat = shape_inputs(np.tile(pixels.reshape(1, 64), (3, 1)), digits)  # CSV-like rows
    assert flat.shape == (3, 1, 8, 8)
    refusals = [
        (pixels + 0.5, "whole numbers only"),
        (pixels * 100, "must fit uint8"),
        (np.zeros((2, 8, 8)), "takes samples of shape (1, 8, 8)"),
        (np.zeros((MAX_BATCH + 1, 1, 8, 8)), "takes 1..256 samples"),
        (np.array(["a"]), "must be numbers"),
        (np.full((1, 1, 8, 8), np.nan), "finite"),
    ]
    for bad, reason in refusals:
        with pytest.raises(InputError, match=reason.replace("(", r"\(").replace(")", r"\)")):
            shape_inputs(bad, digits)
    tabular = record_of(models["tabular"])
    features = shape_inputs(np.ones((4, 5)), tabular)
    assert features.dtype == np.float32 and features.shape == (4, 5)
    with pytest.raises(InputError, match="finite"):
        shape_inputs(np.array([[1, 2, np.inf, 4, 5]]), tabular)


def test_a_prompt_becomes_token_ids_of_the_text_model(models: dict[str, Path]) -> None:
    text = record_of(models["text"], name="hello-chars")
    tokens = encode_prompt("hello world", text)
    assert tokens.dtype == np.int64 and tokens.tolist() == [[6, 5, 7, 7, 8, 0, 10, 8, 9, 7, 4]]
    assert encode_prompt("a" * 50, text).shape == (1, 12)  # the last seq_len characters
    with pytest.raises(InputError, match=r"never saw: 'X', 'z'"):
        encode_prompt("hello zX", text)
    with pytest.raises(InputError, match="not a text prompt"):
        encode_prompt("hello", record_of(models["tabular"]))
    with pytest.raises(InputError, match=r"token ids must be 0\.\.10"):
        shape_inputs(np.array([[1, 2, 11]]), text)
    with pytest.raises(InputError, match=r"1\.\.12 steps"):
        shape_inputs(np.zeros((1, 13), dtype=np.int64), text)


def test_input_files_of_every_kind_are_read(tmp_path: Path, digits: ModelRecord,
                                            models: dict[str, Path]) -> None:
    images = (np.arange(2 * 64).reshape(2, 1, 8, 8) % 17).astype(np.uint8)
    np.save(tmp_path / "x.npy", images)
    np.savez(tmp_path / "x.npz", x=images, y=np.zeros(2))
    (tmp_path / "x.safetensors").write_bytes(save_safetensors({"input": images}))
    rows = io.StringIO()
    np.savetxt(rows, images.reshape(2, 64), fmt="%d", delimiter=",")
    header = ",".join(f"p{i}" for i in range(64))
    (tmp_path / "x.csv").write_text(f"{header}\n{rows.getvalue()}")
    for name in ("x.npy", "x.npz", "x.safetensors", "x.csv"):
        read = read_input_file(tmp_path / name, digits)
        assert np.array_equal(read, images), name
    (tmp_path / "prompt.txt").write_text("hello")
    text = record_of(models["text"], name="hello-chars")
    assert read_input_file(tmp_path / "prompt.txt", text).tolist() == [[6, 5, 7, 7, 8]]
    (tmp_path / "bad.csv").write_text("1,2,3\n4,5\n")
    with pytest.raises(InputError, match="rows have 3 and 2 values"):
        read_input_file(tmp_path / "bad.csv", digits)
    np.savez(tmp_path / "two.npz", a=images, b=images)
    with pytest.raises(InputError, match="expected an array named x, inputs, X"):
        read_input_file(tmp_path / "two.npz", digits)
    with pytest.raises(InputError, match="no such file"):
        read_input_file(tmp_path / "missing.npy", digits)
    with pytest.raises(InputError, match="unknown kind of file"):
        read_input_file(tmp_path / "x.pkl", digits)
    (tmp_path / "pickled.npy").write_bytes(b"\x93NUMPY\x01\x00v\x00{'descr': '|O', "
                                           b"'fortran_order': False, 'shape': (1,), }" + b" " * 54
                                           + b"\n" + b"\x80\x04N.")
    with pytest.raises(InputError, match=r"not a readable \.npy"):
        read_input_file(tmp_path / "pickled.npy", digits)


def test_inputs_and_outputs_on_the_wire(digits: ModelRecord) -> None:
    batch = np.zeros((3, 1, 8, 8), dtype=np.uint8)
    assert np.array_equal(decode_inputs(encode_inputs(batch), digits), batch)
    with pytest.raises(InputError, match="exactly one tensor"):
        decode_inputs(encode_tensors({"images": batch}), digits)
    with pytest.raises(InputError, match="takes uint8 values, not float32"):
        decode_inputs(encode_inputs(batch.astype(np.float32)), digits)
    with pytest.raises(InputError, match="inputs: metadata is not allowed"):
        decode_inputs(save_safetensors({"input": batch}, metadata={"x": "y"}), digits)
    logits = np.zeros((3, 10), dtype=np.float32)
    assert np.array_equal(decode_outputs(encode_outputs(logits), digits, batch), logits)
    with pytest.raises(ValueError, match=r"outputs: expected float32 \(3, 10\)"):
        decode_outputs(encode_outputs(logits[:2]), digits, batch)


def test_predictions_read_the_outputs(models: dict[str, Path], digits: ModelRecord) -> None:
    logits = np.zeros((2, 10), dtype=np.float32)
    logits[0, 7] = 10.0
    logits[1, 2] = np.log(3.0)
    rows = predictions(logits, digits)
    assert rows[0]["class"] == 7 and rows[0]["probability"] > 0.999
    assert rows[1] == {"class": 2, "probability": round(3 / 12, 6)}
    text = record_of(models["text"], name="hello-chars")
    out = np.zeros((1, 2, 11), dtype=np.float32)
    out[0, -1, 2] = 5.0  # 'b'
    out[0, 0, 9] = 50.0  # an earlier step does not count
    row = predictions(out, text)[0]
    assert row["next"] == "b" and row["top"][0]["token"] == "b"
    assert len(row["top"]) == 5


# --- the payment ledger --------------------------------------------------------------------------
def test_a_transaction_pays_for_one_call_even_across_restarts(tmp_path: Path) -> None:
    tx, other = "0x" + "ab" * 32, "0x" + "cd" * 32
    ledger = PaymentLedger(tmp_path / "payments.log")
    with ledger.holding(tx):
        with (pytest.raises(PaymentRefused, match="paying for a call in progress"),
              ledger.holding(tx)):
            pass
        ledger.commit(tx)
    with (pytest.raises(PaymentRefused, match="already paid for an earlier call"),
          ledger.holding(tx.upper().replace("0X", "0x"))):
        pass
    with ledger.holding(other):
        pass  # the call failed: not committed, so the transaction stays usable
    reloaded = PaymentLedger(tmp_path / "payments.log")
    assert reloaded.is_used(tx) and not reloaded.is_used(other) and len(reloaded) == 1
    assert (tmp_path / "payments.log").stat().st_mode & 0o777 == 0o600
