"""The marketplace role every node runs: publish models, list them, fetch them, serve inference.

`ModelCatalog` keeps the node's `Catalog` of model records fed from the
models topic (and the DHT when a record is looked up by publisher and
name), re-announces the models this node publishes, fetches a model file
from its publisher (or any peer that provides its blob), checks it against
its signed record, and answers inference requests for its own models,
checking the payment of priced ones on-chain. It answers the control
endpoint's `models`, `model_publish`, `model_get` and `infer` operations.

Its files live in `<data dir>/models/`: `catalog.msgpack` (the signed
records seen), `payments.log` (transaction hashes accepted as payment),
and `files/<digest>.safetensors` (model files published or fetched, each
checked against its record before it is kept).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import trio

from ravenp2p.blocking import run_blocking
from ravenp2p.chain.base import ChainError
from ravenp2p.data.blobs import BlobError
from ravenp2p.data.store import StoreFullError
from ravenp2p.market.catalog import Catalog, CatalogEntry, CatalogFull
from ravenp2p.market.inference import InferenceStats, ModelCache, ModelFailed
from ravenp2p.market.inputs import (
    INPUT_SUFFIXES,
    MAX_INPUT_FILE_BYTES,
    InputError,
    check_inputs,
    decode_inputs,
    decode_outputs,
    encode_inputs,
    encode_outputs,
    encode_prompt,
    parse_input_file,
    predictions,
    shape_inputs,
)
from ravenp2p.market.payments import PaymentLedger, PaymentRefused, check_payment
from ravenp2p.market.records import (
    INFER_PROTOCOL,
    MODEL_NAMESPACE,
    MODELS_TOPIC,
    InferenceReply,
    InferenceRequest,
    ModelRecord,
    check_name,
    model_key,
    open_record,
    record_for,
    weights_digest,
)
from ravenp2p.network.base import NetworkError
from ravenp2p.node.control import RequestRefused
from ravenp2p.node.node import Node, short
from ravenp2p.roles.escrow import peer_address
from ravenp2p.training.model_file import ModelFile, ModelFileError, copy_model, read_model
from ravenp2p.training.spec import format_amount, parse_amount
from ravenp2p.training.tensors import TensorFormatError, decode_tensors, digest_of
from ravenp2p.wire.envelope import Envelope, EnvelopeCodec, WireLimits
from ravenp2p.wire.errors import WireError

log = logging.getLogger("ravenp2p.market")

MODELS_FOLDER = "models"
FILES_FOLDER = "files"
CATALOG_FILE = "catalog.msgpack"
PAYMENTS_FILE = "payments.log"
ARCHIVE_AGE_S = 10 * 365 * 24 * 3600.0
"""Saved records are re-verified without an age limit (their catalog entry has its own)."""
SAVE_DELAY_S = 5.0
"""A changed catalog is saved at most this often (and when the node stops)."""
PUBLISH_TIMEOUT_S = 120.0
GET_TIMEOUT_S = 600.0
INFER_TIMEOUT_S = 600.0
"""Control timeouts: a fetch, a payment mined and a call can each take a while."""


class MarketError(RuntimeError):
    """A marketplace operation failed (a fetch, a publication, a call); the message says why."""


class InferenceRefused(MarketError):
    """The serving peer refused the call; the message carries its reason."""


@dataclass(frozen=True)
class MarketConfig:
    """How often a node re-announces its models and how long its operations may take."""

    announce_interval_s: float = 60.0
    """Records are re-announced (topic and DHT) this often: a signed record is only
    accepted for 300 s, and a peer that joins later hears of the model this way."""
    fetch_timeout_s: float = 300.0
    request_timeout_s: float = 60.0
    max_loaded_models: int = 4

    def __post_init__(self) -> None:
        if not 1.0 <= self.announce_interval_s <= 240.0:
            raise ValueError("announce_interval_s must be 1..240 s (records expire after 300 s)")
        if self.fetch_timeout_s <= 0 or self.request_timeout_s <= 0:
            raise ValueError("fetch_timeout_s and request_timeout_s must be positive")


@dataclass(frozen=True)
class InferenceResult:
    """One inference call's outcome: the outputs for the inputs, where they ran, what it cost."""

    entry: CatalogEntry
    inputs: np.ndarray
    outputs: np.ndarray
    where: str
    """`remote` (at the publisher) or `local` (here, on a fetched copy)."""
    compute_ms: float
    paid_units: int = 0
    payment: str = ""

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON data: predictions (and a classifier's logits), the outputs as safetensors."""
        record = self.entry.record
        data: dict[str, Any] = {
            "model": record.name,
            "publisher": self.entry.publisher,
            "digest": record.model,
            "where": self.where,
            "task": record.task,
            "batch": int(self.inputs.shape[0]),
            "predictions": predictions(self.outputs, record),
            "compute_ms": round(self.compute_ms, 3),
            "paid": format_amount(self.paid_units),
            "payment_tx": self.payment,
            "outputs": base64.b64encode(encode_outputs(self.outputs)).decode("ascii"),
        }
        if record.task == "classification":
            data["logits"] = [[float(v) for v in row] for row in self.outputs]
        return data


class ModelCatalog:
    """The model marketplace on one node; start `run` in the node's nursery (`add_role`).

    With `results_dir` (the requester's results folder), `model_publish`
    can publish a finished job's model by its job id.
    """

    def __init__(
        self, node: Node, results_dir: Path | None = None, config: MarketConfig | None = None
    ) -> None:
        self.node = node
        self.results_dir = results_dir
        self.config = config or MarketConfig()
        self.folder = Path(node.config.data_dir) / MODELS_FOLDER
        self.files = self.folder / FILES_FOLDER
        self.catalog = Catalog(self.folder / CATALOG_FILE)
        self.ledger = PaymentLedger(self.folder / PAYMENTS_FILE)
        self.cache = ModelCache(self.config.max_loaded_models)
        self.stats = InferenceStats()
        self._codec = EnvelopeCodec(node.identity, node.config.limits, now=node.clock.now)
        limits = node.config.limits
        self._archive_codec = EnvelopeCodec(
            node.identity,
            WireLimits(max_envelope_bytes=limits.max_envelope_bytes, max_age_s=ARCHIVE_AGE_S,
                       max_future_skew_s=ARCHIVE_AGE_S),
            now=node.clock.now,
        )
        self._nursery: trio.Nursery | None = None
        self._save_soon = trio.Event()
        self._fetching: dict[str, trio.Lock] = {}
        node.add_control_op("models", self._control_models)
        node.add_control_op("model_publish", self._control_publish, PUBLISH_TIMEOUT_S)
        node.add_control_op("model_get", self._control_get, GET_TIMEOUT_S)
        node.add_control_op("infer", self._control_infer, INFER_TIMEOUT_S)

    @property
    def peer_id(self) -> str:
        return self.node.peer_id

    # --- lifecycle -------------------------------------------------------------------------------
    async def run(
        self, *, task_status: trio.TaskStatus[ModelCatalog] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Listen for records, re-announce this node's models, serve inference, until cancelled."""
        network = self.node.network
        network.set_record_validator(MODEL_NAMESPACE, self._validate_record)
        network.set_request_handler(INFER_PROTOCOL, self._serve_infer)
        kept = self.catalog.load(self._archive_codec, self.node.clock.now())
        if kept:
            log.info("Loaded %d model record%s from %s", kept, "" if kept == 1 else "s",
                     self.catalog.path)
        records = await self.node.topics.subscribe(MODELS_TOPIC)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._read_records, records)
                nursery.start_soon(self._announce_loop)
                nursery.start_soon(self._save_loop)
                task_status.started(self)
                await trio.sleep_forever()
        finally:
            self._nursery = None
            if self.catalog.dirty:
                self.catalog.save()

    # --- records in ------------------------------------------------------------------------------
    async def _read_records(self, channel: trio.MemoryReceiveChannel[Envelope]) -> None:
        async for envelope in channel:
            if isinstance(envelope.message, ModelRecord):
                self._take(envelope)

    def _take(self, envelope: Envelope) -> bool:
        """Put a verified record in the catalog; True when it is new or newer."""
        try:
            changed = self.catalog.offer(envelope, self.node.clock.now())
        except CatalogFull as exc:
            log.debug("Not listing a model of %s: %s", short(envelope.sender), exc)
            return False
        if changed:
            record = envelope.message
            assert isinstance(record, ModelRecord)
            if envelope.sender != self.peer_id:
                log.info("Listed model %s of %s (%s, %s RAVEN a call)", record.name,
                         short(envelope.sender), record.model[:12], record.price_raven)
            self._save_soon.set()
        return changed

    def _validate_record(self, key: str, value: bytes) -> None:
        """DHT validator of the model namespace: a record signed by the peer its key names."""
        open_record(self._codec, value, key)

    async def lookup(self, publisher: str, name: str, timeout: float = 10.0) -> CatalogEntry | None:
        """A publisher's record of `name` from the DHT (taken into the catalog), or None."""
        key = model_key(publisher, name)
        try:
            raw = await self.node.network.get_value(key, timeout=timeout)
        except (NetworkError, ValueError) as exc:
            log.debug("Looking up %s failed: %s", key, exc)
            return None
        if raw is None:
            return None
        try:
            envelope = open_record(self._codec, raw, key)
        except WireError as exc:
            log.warning("The DHT record %s does not verify: %s", key, exc)
            return None
        self._take(envelope)
        return self.catalog.get(publisher, name)

    async def resolve(self, reference: object) -> CatalogEntry:
        """The catalog entry `reference` names (see `Catalog.resolve`); a `NAME@PEER` the
        catalog lacks is looked up in the DHT. ValueError when no model (or several) fit."""
        try:
            return self.catalog.resolve(reference, prefer=self.peer_id)
        except ValueError:
            name, _, peer = str(reference).partition("@")
            if not peer or not _is_peer_id(peer):
                raise
            with contextlib.suppress(ValueError):
                check_name(name)
                entry = await self.lookup(peer, name)
                if entry is not None:
                    return entry
            raise

    # --- records out -----------------------------------------------------------------------------
    def _own_entries(self) -> list[CatalogEntry]:
        """This node's records whose model file it still holds."""
        return [e for e in self.catalog.published_by(self.peer_id)
                if self.local_file(e.record.model).exists()]

    async def _announce_loop(self) -> None:
        for entry in self._own_entries():
            await self._restore_blob(entry.record)
        await self.node.joined.wait()
        while True:
            for entry in self._own_entries():
                await self._announce(entry.record)
            if self.catalog.dirty:  # fresher announcements heard: worth keeping too
                self._save_soon.set()
            jitter = 0.8 + 0.4 * self.node.rng.random()
            await self.node.clock.sleep(self.config.announce_interval_s * jitter)

    async def _announce(self, record: ModelRecord, *, dht: bool = True) -> None:
        """Publish `record` on the models topic, and (with `dht`) in the DHT with its blob."""
        try:
            envelope = await self.node.topics.publish(MODELS_TOPIC, record)
        except WireError as exc:
            log.warning("Could not announce model %s: %s", record.name, exc)
            return
        self._take(envelope)
        if dht:
            await self._announce_in_dht(record)

    async def _announce_in_dht(self, record: ModelRecord) -> None:
        key = model_key(self.peer_id, record.name)
        try:
            await self.node.network.put_value(key, self.node.codec.seal(record, context=key),
                                              timeout=10.0)
        except (NetworkError, ValueError) as exc:
            log.debug("Could not store the record of %s in the DHT yet: %s", record.name, exc)
        await self.node.blobs.announce(record.model)

    async def _restore_blob(self, record: ModelRecord) -> bool:
        """Make sure a published model file is in the blob store (pinned once) so peers can
        fetch it; False (logged) when it cannot be."""
        store = self.node.store
        if not store.is_pinned(record.model):
            store.pin(record.model)
        if not store.has(record.model):
            path = self.local_file(record.model)
            try:
                data = await trio.Path(path).read_bytes()
                store.put_verified(record.model, data)
            except (OSError, ValueError, StoreFullError) as exc:
                log.warning("Cannot serve the file of model %s (%s): %s", record.name, path, exc)
                return False
        return True

    async def _save_loop(self) -> None:
        while True:
            await self._save_soon.wait()
            self._save_soon = trio.Event()
            if self.catalog.dirty:
                self.catalog.save()
            await trio.sleep(SAVE_DELAY_S)

    # --- publishing ------------------------------------------------------------------------------
    def local_file(self, digest: str) -> Path:
        """Where this node keeps the model file with this digest (published or fetched)."""
        return self.files / f"{digest}.safetensors"

    async def publish(
        self,
        path: Path,
        *,
        name: str | None = None,
        license: str = "",
        price: int = 0,
        description: str = "",
    ) -> CatalogEntry:
        """Offer the model file at `path` to the network; a new version of an own name replaces it.

        The file is checked (a ravenp2p model file whose weights fit its
        model), copied into the node's models folder, stored (pinned) in the
        blob store, and its signed record announced on the models topic and
        in the DHT. A priced model needs the node's chain account: payments
        go to its address. ValueError names an invalid argument.
        """
        chain = self.node.chain
        if price and chain is None:
            raise ValueError("price: a priced model is paid on-chain, and this node has no chain "
                             "account (start it with --chain and --contracts)")
        if name is not None:
            check_name(name)
        model_file, digest, size = await run_blocking(
            _prepare_publication, Path(path), self.files
        )
        name = check_name(name if name is not None else model_file.spec.name)
        previous = self.catalog.get(self.peer_id, name)
        created_ms = int(self.node.clock.now() * 1000)
        if previous is not None:
            created_ms = max(created_ms, previous.record.created_ms + 1)
        try:
            record = record_for(
                model_file, name=name, digest=digest, size=size, created_ms=created_ms,
                license=license, price=price, description=description,
                chain_id=chain.deployment.chain_id if chain is not None and price else 0,
                token=chain.deployment.token if chain is not None and price else "",
            )
        except WireError as exc:
            raise ValueError(f"{exc.field.removeprefix('body.')}: {exc.reason}") from None
        if not await self._restore_blob(record):
            raise MarketError(f"the model file cannot be stored for peers to fetch (see the "
                              f"node's log): {name} was not published")
        await self._announce(record, dht=False)
        if previous is not None and previous.record.model != digest and not any(
                e.record.model == previous.record.model for e in self._own_entries()):
            with contextlib.suppress(ValueError):
                self.node.store.unpin(previous.record.model)
        if self._nursery is not None:
            self._nursery.start_soon(self._announce_in_dht, record)
        entry = self.catalog.get(self.peer_id, name)
        if entry is None:  # the catalog was full of others' records
            raise MarketError("the catalog is full: the model was announced but is not listed")
        self.catalog.save()
        log.info("Published model %s (%s, %d bytes, %s RAVEN a call)", name, digest[:12], size,
                 record.price_raven)
        return entry

    def job_model_file(self, reference: object) -> Path:
        """The model file of a finished job this node submitted (a job id or unique prefix)."""
        from ravenp2p.roles.requester import MODEL_FILE

        if not isinstance(reference, str) or not reference:
            raise ValueError("job: a job id (or a unique prefix of one) is needed")
        if self.results_dir is None:
            raise ValueError("job: this node keeps no job results to publish from")
        jobs = sorted(p.parent.name for p in self.results_dir.glob(f"*/{MODEL_FILE}"))
        matches = [j for j in jobs if j == reference] or [
            j for j in jobs if j.startswith(reference.lower())
        ]
        if len(matches) > 1:
            raise ValueError(f"job: {reference!r} is the prefix of {len(matches)} jobs; "
                             "give more of the id")
        if not matches:
            raise ValueError(f"job: this node has no finished job {reference!r} with a model")
        return self.results_dir / matches[0] / MODEL_FILE

    # --- fetching --------------------------------------------------------------------------------
    async def fetch(self, entry: CatalogEntry) -> Path:
        """This node's copy of the entry's model file, fetched and checked the first time.

        The blob comes from the publisher (or any peer the DHT names as a
        provider) and is verified by digest chunk by chunk; the file must
        then be the job, weights and data kind its record names. Raises
        `MarketError` naming what failed.
        """
        record = entry.record
        path = self.local_file(record.model)
        lock = self._fetching.setdefault(record.model, trio.Lock())
        async with lock:
            if path.exists():
                return path
            with contextlib.suppress(NetworkError):
                await self.node.reach(entry.publisher, timeout=10.0)
            try:
                data = await self.node.blobs.fetch(
                    record.model, providers=[entry.publisher], size=record.size,
                    timeout=self.config.fetch_timeout_s,
                )
            except (BlobError, NetworkError) as exc:
                raise MarketError(f"could not fetch model {record.name}: {exc}") from None
            except trio.TooSlowError:
                raise MarketError(f"could not fetch model {record.name} within "
                                  f"{self.config.fetch_timeout_s:.0f} s") from None
            try:
                await run_blocking(_keep_fetched, data, record, path)
            except ModelFileError as exc:
                with contextlib.suppress(ValueError):
                    self.node.store.delete(record.model)
                raise MarketError(f"the file of model {record.name} from {short(entry.publisher)} "
                                  f"does not match its signed record: {exc}") from None
        log.info("Fetched model %s of %s (%d bytes)", record.name, short(entry.publisher),
                 record.size)
        return path

    # --- inference: calling ----------------------------------------------------------------------
    async def infer(
        self,
        entry: CatalogEntry,
        inputs: np.ndarray,
        *,
        local: bool = False,
        max_price: int = 0,
        payment: str = "",
    ) -> InferenceResult:
        """Run the entry's model on a batch: at its publisher, or here with `local` (fetched first).

        A priced remote call is paid first: `price` RAVEN to the publisher's
        address on-chain, unless `payment` names a transfer already made (a
        call that failed after paying can be retried with it). A price above
        `max_price` (base units) is not paid. The inputs are checked against
        the record before anything is paid. Raises `InputError` for inputs
        the model cannot take, `InferenceRefused` with the publisher's reason,
        `MarketError` for other failures.
        """
        record = entry.record
        check_inputs(inputs, record)
        if local or entry.publisher == self.peer_id:
            path = await self.fetch(entry)
            try:
                outputs, ms = await self.cache.run(record.model, path, inputs)
            except ModelFailed as exc:
                raise MarketError(str(exc)) from None
            self.stats.local += 1
            return InferenceResult(entry, inputs, outputs, "local", ms)
        paid, tx = 0, payment.lower()
        price = record.price_units
        if price and not tx:
            tx = await self._pay(entry, max_price)
            paid = price
        request = InferenceRequest(name=record.name, model=record.model,
                                   inputs=encode_inputs(inputs), payment=tx if price else "")
        keep = f" (transaction {tx} paid for it: retry with that payment)" if paid else ""
        try:
            await self.node.reach(entry.publisher, timeout=10.0)
            raw = await self.node.network.request(
                entry.publisher, INFER_PROTOCOL,
                self.node.codec.seal(request, context=INFER_PROTOCOL),
                timeout=self.config.request_timeout_s,
            )
            reply = self.node.codec.open(raw, context=INFER_PROTOCOL, from_peer=entry.publisher)
        except (NetworkError, WireError) as exc:
            raise MarketError(f"the call to {short(entry.publisher)} failed: {exc}{keep}") from None
        answer = reply.message
        if not isinstance(answer, InferenceReply) or answer.model != record.model:
            raise MarketError(f"{short(entry.publisher)} answered something else than this "
                              f"call's outputs{keep}")
        if not answer.ok:
            raise InferenceRefused(f"{short(entry.publisher)} refused the call: "
                                   f"{answer.reason}{keep}")
        try:
            outputs = decode_outputs(answer.outputs, record, inputs)
        except ValueError as exc:
            raise MarketError(f"{short(entry.publisher)} sent unusable {exc}") from None
        return InferenceResult(entry, inputs, outputs, "remote", answer.compute_ms,
                               paid, answer.payment)

    async def _pay(self, entry: CatalogEntry, max_price: int) -> str:
        record = entry.record
        chain = self.node.chain
        price = record.price_units
        if chain is None:
            raise MarketError(f"model {record.name} costs {record.price_raven} RAVEN a call, and "
                              "this node has no chain account to pay with (--chain, --contracts)")
        deployment = chain.deployment
        same_token = deployment.token.lower() == record.token.lower()
        if deployment.chain_id != record.chain_id or not same_token:
            raise MarketError(f"model {record.name} is paid in token {record.token} on chain "
                              f"{record.chain_id}; this node is on chain {deployment.chain_id} "
                              f"with token {deployment.token}")
        if price > max_price:
            raise MarketError(f"model {record.name} costs {record.price_raven} RAVEN a call, more "
                              f"than the {format_amount(max_price)} RAVEN allowed (max price)")
        try:
            tx = await chain.transfer(entry.address, price)
        except ChainError as exc:
            raise MarketError(f"paying {record.price_raven} RAVEN for a call failed: "
                              f"{exc}") from None
        log.info("Paid %s RAVEN to %s for a call of %s: %s", record.price_raven,
                 short(entry.publisher), record.name, tx)
        return tx

    # --- inference: serving ----------------------------------------------------------------------
    async def _serve_infer(self, peer: str, request: bytes) -> bytes:
        envelope = self.node.codec.open(request, context=INFER_PROTOCOL, from_peer=peer)
        message = envelope.message
        if not isinstance(message, InferenceRequest):
            raise WireError("type", f"expected {InferenceRequest.TYPE}, got {message.TYPE}")
        try:
            reply = await self._answer(peer, message)
        except _Refusal as refusal:
            self.stats.refused += 1
            log.info("Refused a call of %s from %s: %s", message.name, short(peer), refusal)
            reply = InferenceReply(model=message.model, ok=False, reason=str(refusal)[:512])
        return self.node.codec.seal(reply, context=INFER_PROTOCOL)

    async def _answer(self, peer: str, request: InferenceRequest) -> InferenceReply:
        entry = self.catalog.get(self.peer_id, request.name)
        if entry is None:
            raise _Refusal(f"model: this node publishes no model {request.name!r}")
        record = entry.record
        if record.model != request.model:
            raise _Refusal(f"model: {request.name} is now model file {record.model} here (its "
                           "record was replaced): list the models again")
        path = self.local_file(record.model)
        if not path.exists():
            raise _Refusal(f"model: this node no longer has the file of {request.name}")
        try:
            inputs = decode_inputs(request.inputs, record)
        except InputError as exc:
            raise _Refusal(str(exc)) from None
        price = record.price_units
        if not price:
            outputs, ms = await self._compute(record, path, inputs)
            self.stats.served += 1
            return InferenceReply(model=record.model, ok=True, outputs=encode_outputs(outputs),
                                  compute_ms=ms)
        chain = self.node.chain
        if not request.payment:
            raise _Refusal(f"payment: {record.name} costs {record.price_raven} RAVEN a call: "
                           f"transfer it to {self.node.identity.address} and send the "
                           "transaction hash")
        if chain is None:
            raise _Refusal("payment: this node cannot check payments now (no chain account)")
        try:
            with self.ledger.holding(request.payment):
                await check_payment(chain, request.payment, peer_address(peer), price)
                outputs, ms = await self._compute(record, path, inputs)
                self.ledger.commit(request.payment)
        except PaymentRefused as exc:
            raise _Refusal(str(exc)) from None
        except OSError as exc:
            log.error("Cannot record payment %s: %s", request.payment, exc)
            raise _Refusal("payment: this node cannot record payments now; nothing was "
                           "charged") from None
        self.stats.served += 1
        self.stats.paid_units += price
        log.info("Served a paid call of %s to %s (%d samples, %s RAVEN)", record.name,
                 short(peer), len(inputs), record.price_raven)
        return InferenceReply(model=record.model, ok=True, outputs=encode_outputs(outputs),
                              compute_ms=ms, payment=request.payment)

    async def _compute(self, record: ModelRecord, path: Path,
                       inputs: np.ndarray) -> tuple[np.ndarray, float]:
        try:
            return await self.cache.run(record.model, path, inputs)
        except ModelFailed as exc:
            raise _Refusal(str(exc)) from None

    # --- the control endpoint --------------------------------------------------------------------
    def _row(self, entry: CatalogEntry) -> dict[str, Any]:
        return entry.to_dict(self.node.clock.now(), own=entry.publisher == self.peer_id,
                             fetched=self.local_file(entry.record.model).exists())

    async def _control_models(self, request: dict[str, Any]) -> list[dict[str, Any]]:
        name = _optional_str(request, "name")
        publisher = _optional_str(request, "publisher")
        return [self._row(e) for e in self.catalog.entries()
                if (not name or name.lower() in e.record.name.lower())
                and (not publisher or e.publisher.startswith(publisher))]

    async def _control_publish(self, request: dict[str, Any]) -> dict[str, Any]:
        job, file = _optional_str(request, "job"), _optional_str(request, "file")
        if bool(job) == bool(file):
            raise ValueError('model_publish needs either "job" (a job id) or "file" (a path)')
        path = self.job_model_file(job) if job else _user_path(file or "")
        price = parse_amount("price", request.get("price", "0"))
        try:
            entry = await self.publish(
                path, name=_optional_str(request, "name"),
                license=_optional_str(request, "license") or "", price=price,
                description=_optional_str(request, "description") or "",
            )
        except ModelFileError as exc:
            raise ValueError(f"file: {exc}") from None
        except MarketError as exc:
            raise RequestRefused(str(exc)) from None
        return self._row(entry)

    async def _control_get(self, request: dict[str, Any]) -> dict[str, Any]:
        entry = await self.resolve(request.get("model"))
        out = _optional_str(request, "out")
        try:
            path = await self.fetch(entry)
        except MarketError as exc:
            raise RequestRefused(str(exc)) from None
        result: dict[str, Any] = {"model": self._row(entry), "file": str(path), "out": None,
                                  "spec": None}
        if out:
            target = _user_path(out)
            try:
                written = await run_blocking(copy_model, path, target)
            except OSError as exc:
                raise RequestRefused(f"out: cannot write {target}: {exc.strerror or exc}") from None
            result["out"], result["spec"] = str(written), str(written.with_suffix(".toml"))
        return result

    async def _control_infer(self, request: dict[str, Any]) -> dict[str, Any]:
        entry = await self.resolve(request.get("model"))
        inputs = await self._control_inputs(request, entry.record)
        local = request.get("local", False)
        if not isinstance(local, bool):
            raise ValueError("local: must be true or false")
        max_price = parse_amount("max_price", request.get("max_price", "0"))
        payment = _optional_str(request, "payment") or ""
        if payment and not _is_tx_hash(payment):
            raise ValueError(f"payment: {payment!r} is not a transaction hash "
                             "(0x and 64 hex digits)")
        try:
            result = await self.infer(entry, inputs, local=local, max_price=max_price,
                                      payment=payment.lower())
        except MarketError as exc:
            raise RequestRefused(str(exc)) from None
        return result.to_dict()

    async def _control_inputs(self, request: dict[str, Any], record: ModelRecord) -> np.ndarray:
        given = [key for key in ("inputs", "file", "text") if request.get(key) is not None]
        if len(given) != 1:
            raise ValueError('infer needs exactly one of "inputs" (base64 safetensors), "file" '
                             '(a path) or "text" (a prompt)')
        key = given[0]
        value = request[key]
        if not isinstance(value, str):
            raise ValueError(f"{key}: must be a string")
        if key == "text":
            return encode_prompt(value, record)
        if key == "file":
            path = _user_path(value)
            if path.suffix.lower() not in INPUT_SUFFIXES:
                raise InputError(f"{path}: unknown kind of file; give one of "
                                 f"{', '.join(INPUT_SUFFIXES)}")
            try:
                size = (await trio.Path(path).stat()).st_size
                if size > MAX_INPUT_FILE_BYTES:
                    raise InputError(f"{path}: {size} bytes, more than the "
                                     f"{MAX_INPUT_FILE_BYTES} read at most")
                data = await trio.Path(path).read_bytes()
            except FileNotFoundError:
                raise InputError(f"{path}: no such file") from None
            except OSError as exc:
                raise InputError(f"{path}: cannot be read ({exc.strerror or exc})") from None
            return parse_input_file(data, path, record)
        try:
            tensors = decode_tensors(base64.b64decode(value, validate=True))
        except (binascii.Error, ValueError) as exc:
            reason = exc if isinstance(exc, TensorFormatError) else "not base64"
            raise InputError(f"not base64 canonical safetensors ({reason})") from None
        if len(tensors) != 1:
            raise InputError("must hold exactly one tensor")
        return shape_inputs(next(iter(tensors.values())), record)


class _Refusal(Exception):
    """Why this node does not answer an inference call (sent back as the reply's reason)."""


def _optional_str(request: dict[str, Any], key: str) -> str | None:
    value = request.get(key)
    if value is not None and not isinstance(value, str):
        raise ValueError(f"{key}: must be a string")
    return value


def _user_path(text: str) -> Path:
    """A path given by the node's own user (on the control socket): `~` expanded."""
    return Path(os.path.expanduser(text))


def _is_peer_id(text: str) -> bool:
    try:
        peer_address(text)
    except ValueError:
        return False
    return True


def _is_tx_hash(text: str) -> bool:
    return len(text) == 66 and text[:2] == "0x" and all(c in "0123456789abcdefABCDEF"
                                                         for c in text[2:])


def _prepare_publication(path: Path, folder: Path) -> tuple[ModelFile, str, int]:
    """Check a model file, copy it into `folder` under its digest; (its contents, digest, size).

    Blocking (reads, parses and hashes the whole file): run it in a worker thread.
    """
    model_file = read_model(path)
    try:
        model_file.module()  # the weights must fit the model the spec builds
    except ValueError as exc:
        raise ModelFileError(f"{path}: the weights do not fit the model ({exc})") from None
    data = path.read_bytes()
    digest = digest_of(data)
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    target = folder / f"{digest}.safetensors"
    if not target.exists():
        _write_atomically(target, data)
    return model_file, digest, len(data)


def _keep_fetched(data: bytes, record: ModelRecord, path: Path) -> None:
    """Check a fetched model file against its record, then keep it at `path`.

    Raises `ModelFileError` saying what does not match. Blocking: run it in a worker thread.
    """
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, name = tempfile.mkstemp(dir=path.parent, suffix=".part")
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        model_file = read_model(tmp)
        problems = []
        if model_file.job_id != record.job:
            problems.append(f"job {model_file.job_id}, the record says {record.job}")
        if weights_digest(model_file) != record.weights:
            problems.append("its weights are not the ones the record names")
        info = model_file.info
        if (info.kind, info.task, tuple(info.input_shape)) != (
                record.kind, record.task, tuple(record.input_shape)):
            problems.append(f"it takes {info.kind} {tuple(info.input_shape)}, the record says "
                            f"{record.kind} {tuple(record.input_shape)}")
        if problems:
            raise ModelFileError("; ".join(problems))
        try:
            model_file.module()
        except ValueError as exc:
            raise ModelFileError(f"the weights do not fit the model ({exc})") from None
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_atomically(target: Path, data: bytes) -> None:
    fd, name = tempfile.mkstemp(dir=target.parent, suffix=".part")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(name, target)
    finally:
        Path(name).unlink(missing_ok=True)


__all__ = [
    "InferenceRefused",
    "InferenceResult",
    "MarketConfig",
    "MarketError",
    "ModelCatalog",
]
