"""The model marketplace on the wire: signed model records, inference requests and replies.

A `ModelRecord` says "this node serves this trained model": the digest and
size of its model file (a blob any peer may fetch and verify), the digest of
the weights inside, the holdout metrics the job reached, a license, the
price of one inference call, and what the model takes (kind, task, input
shape and dtype) so that a lister can show it and a caller can check its
inputs before paying. The envelope's sender is the publisher, and the peer
that answers inference calls for it.

Records travel on the reliable topic `MODELS_TOPIC` and in the DHT under
`model_key(publisher, name)`. Inference is request/response on
`INFER_PROTOCOL`: an `InferenceRequest` carrying canonical safetensors
inputs (and, for a priced model, the hash of the caller's RAVEN transfer to
the publisher), answered by an `InferenceReply`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ravenp2p.training.datasets import MAX_CLASSES, MAX_DIM, MAX_VOCAB, DataInfo, DatasetError
from ravenp2p.training.spec import format_amount
from ravenp2p.training.tensors import encode_tensors
from ravenp2p.wire.envelope import Envelope, EnvelopeCodec
from ravenp2p.wire.errors import WireError
from ravenp2p.wire.job_messages import DIGEST_PATTERN
from ravenp2p.wire.messages import ADDRESS_PATTERN
from ravenp2p.wire.schema import Message, constrained, register

if TYPE_CHECKING:
    from ravenp2p.training.model_file import ModelFile

MODELS_TOPIC = "/ravenp2p/models/1"
"""Reliable topic: publishers announce (and re-announce) their model records."""
INFER_PROTOCOL = "/ravenp2p/infer/1.0.0"
"""Request/response: run a published model on the caller's inputs at its publisher."""
MODEL_NAMESPACE = "ravenp2p-model"
"""DHT namespace of model records: `/ravenp2p-model/<publisher peer id>/<name>`."""

NAME_PATTERN = r"[A-Za-z0-9._-]{1,64}"
"""A model's name: what a job spec's name may be."""
AMOUNT_PATTERN = r"0|[1-9][0-9]{0,35}"
"""RAVEN base units in decimal (they exceed the wire's 64-bit integers)."""
TX_HASH_PATTERN = r"0x[0-9a-f]{64}"
TEXT_PATTERN = r"[^\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]*"
"""Free text shown to people: no control characters (no terminal escapes, no new lines, no
text-direction overrides that would make it read differently than it is)."""
LICENSE_PATTERN = r"[ -~]*"
"""Printable ASCII, such as an SPDX identifier (`MIT`, `CC-BY-4.0`)."""
INPUT_DTYPES = ("uint8", "float32", "int64")
KINDS = ("tabular", "image", "text")
DTYPES_FOR_KIND = {"tabular": ("float32",), "image": ("uint8", "float32"), "text": ("int64",)}
"""Raw pixels (uint8, normalised inside the model) or already normalised floats for images."""
TASKS = ("classification", "language")

MAX_MODEL_BYTES = 512 * 1024 * 1024
"""Largest model file a record may name (what a node's blob service fetches at most)."""
MAX_INPUT_BYTES = 1024 * 1024
"""Largest inputs of one inference call (canonical safetensors bytes)."""
MAX_OUTPUT_BYTES = 3 * 1024 * 1024
"""Largest outputs of one call: the reply must fit a request/response frame (4 MiB)."""
MAX_BATCH = 256
"""Most samples one inference call may carry."""
MAX_DESCRIPTION = 1024
MAX_LICENSE = 128
MAX_AMOUNT_UNITS = 10**36 - 1

INPUT_TENSOR = "input"
"""The one tensor of an inference request's safetensors inputs."""
OUTPUT_TENSOR = "output"
"""The one tensor of an inference reply's safetensors outputs."""

_NAME_RE = re.compile(NAME_PATTERN)


def model_key(publisher: str, name: str) -> str:
    """The DHT key of a publisher's newest record for the model called `name`."""
    return f"/{MODEL_NAMESPACE}/{publisher}/{name}"


def check_name(name: object, what: str = "name") -> str:
    """`name` if it is a valid model name; ValueError naming `what` otherwise."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise ValueError(f"{what}: a model name is 1..64 characters of A-Z a-z 0-9 . _ -, "
                         f"got {name!r}")
    return name


@register
@dataclass(frozen=True)
class ModelMetrics(Message):
    """How the model scored on its job's holdout split when the job ended."""

    TYPE = "model.metrics"

    accuracy: float | None = constrained(min=0.0, max=1.0, default=None)
    """Classification accuracy, None for language models or when never evaluated."""
    loss: float | None = constrained(default=None)
    samples: int = constrained(min=0, default=0)
    rounds: int = constrained(min=0, default=0)


@register
@dataclass(frozen=True)
class ModelRecord(Message):
    """A signed offer of a trained model: what it is, where its file is, what a call costs.

    The envelope's sender publishes the model and serves inference for it.
    `model` and `size` name the model-file blob (fetched and verified by
    digest), `weights` the digest of its weights as canonical safetensors
    (the digest the job's round records use). `price` is RAVEN base units
    per inference call as decimal text ("0": free) on chain `chain_id`,
    paid in the token at `token`.
    """

    TYPE = "model.record"

    name: str = constrained(pattern=NAME_PATTERN)
    job: str = constrained(pattern=DIGEST_PATTERN)
    model: str = constrained(pattern=DIGEST_PATTERN)
    size: int = constrained(min=1, max=MAX_MODEL_BYTES)
    weights: str = constrained(pattern=DIGEST_PATTERN)
    metrics: ModelMetrics = constrained()  # noqa: RUF009 (a frozen message: immutable)
    kind: str = constrained(choices=KINDS)
    task: str = constrained(choices=TASKS)
    input_shape: tuple[int, ...] = constrained(min_len=1, max_len=3)
    input_dtype: str = constrained(choices=INPUT_DTYPES)
    created_ms: int = constrained(min=0)
    num_classes: int | None = constrained(min=2, max=MAX_CLASSES, default=None)
    vocab: str = constrained(max_len=MAX_VOCAB, default="")
    """A text model's characters, token id order: what a caller encodes a prompt with."""
    architecture: str = constrained(max_len=64, pattern=r"[A-Za-z0-9._-]*", default="custom")
    license: str = constrained(max_len=MAX_LICENSE, pattern=LICENSE_PATTERN, default="")
    price: str = constrained(pattern=AMOUNT_PATTERN, default="0")
    chain_id: int = constrained(min=0, default=0)
    token: str = constrained(pattern=f"({ADDRESS_PATTERN})?", default="")
    description: str = constrained(max_len=MAX_DESCRIPTION, pattern=TEXT_PATTERN, default="")

    def __post_init__(self) -> None:
        """Checks across fields, so a record that passes the schema is one a node can use."""
        for i, dim in enumerate(self.input_shape):
            if isinstance(dim, bool) or not isinstance(dim, int) or not 1 <= dim <= MAX_DIM:
                raise WireError(f"body.input_shape[{i}]",
                                f"must be an integer 1..{MAX_DIM}, got {dim!r}")
        try:
            self.data_info()
        except DatasetError as exc:
            reason = str(exc).removeprefix("data info: ")
            named = re.match(r"'(\w+)' ", reason)
            field = f"body.{named.group(1)}" if named else "body"
            raise WireError(field, reason.removeprefix(named.group(0)) if named else reason
                            ) from None
        allowed = DTYPES_FOR_KIND[self.kind]
        if self.input_dtype not in allowed:
            raise WireError("body.input_dtype",
                            f"a {self.kind} model takes {' or '.join(allowed)} inputs, "
                            f"not {self.input_dtype}")
        if self.price_units > 0 and (self.chain_id == 0 or not self.token):
            raise WireError("body.chain_id",
                            "a priced model must name the chain and token it is paid in")

    @property
    def price_units(self) -> int:
        """The price of one call in RAVEN base units."""
        return int(self.price)

    @property
    def price_raven(self) -> str:
        """The price of one call as a decimal string of RAVEN (`"0.01"`)."""
        return format_amount(self.price_units)

    def data_info(self) -> DataInfo:
        """What the model takes, as the training code describes data (transform left out)."""
        return DataInfo(
            kind=self.kind, task=self.task, input_shape=tuple(self.input_shape),
            num_classes=self.num_classes, vocab=self.vocab or None,
        )

    def output_values_per_sample(self, steps: int | None = None) -> int:
        """Numbers the model returns per sample: classes, or steps x vocabulary for text."""
        if self.task == "language":
            return (steps or self.input_shape[0]) * len(self.vocab)
        assert self.num_classes is not None
        return self.num_classes


def input_dtype_of(info: DataInfo) -> str:
    """The dtype a model trained on `info` takes: `uint8` pixels, `int64` tokens or `float32`."""
    return str(np.dtype(info.input_dtype))


@register
@dataclass(frozen=True)
class InferenceRequest(Message):
    """Run the model `name` (whose model file is `model`) on `inputs`.

    `inputs` is canonical safetensors holding one tensor, `input`, of shape
    `[batch, *input_shape]` (`[batch, steps]` for text, steps up to the
    model's sequence length). `payment` is the hash of the caller's RAVEN
    transfer to the publisher for a priced model, empty for a free one.
    """

    TYPE = "model.infer"

    name: str = constrained(pattern=NAME_PATTERN)
    model: str = constrained(pattern=DIGEST_PATTERN)
    inputs: bytes = constrained(min_len=8, max_len=MAX_INPUT_BYTES)
    payment: str = constrained(pattern=f"({TX_HASH_PATTERN})?", default="")


@register
@dataclass(frozen=True)
class InferenceReply(Message):
    """The publisher's answer: the outputs (canonical safetensors, tensor `output`), or why not."""

    TYPE = "model.inference"

    model: str = constrained(pattern=DIGEST_PATTERN)
    ok: bool = constrained()
    reason: str = constrained(max_len=512, default="")
    outputs: bytes = constrained(max_len=MAX_OUTPUT_BYTES, default=b"")
    compute_ms: float = constrained(min=0.0, default=0.0)
    payment: str = constrained(pattern=f"({TX_HASH_PATTERN})?", default="")
    """The transaction accepted as this call's payment ("" for a free call)."""


def metrics_of(raw: dict[str, Any]) -> ModelMetrics:
    """A model file's metrics table as a `ModelMetrics` (missing or unusable values left out)."""
    accuracy = raw.get("accuracy")
    loss = raw.get("loss")
    samples = raw.get("samples")
    rounds = raw.get("rounds")

    def number(value: object) -> float | None:
        if isinstance(value, bool) or not isinstance(value, int | float):
            return None
        return float(value) if math.isfinite(value) else None

    def count(value: object) -> int:
        return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0

    acc = number(accuracy)
    return ModelMetrics(
        accuracy=acc if acc is not None and 0.0 <= acc <= 1.0 else None,
        loss=number(loss), samples=count(samples), rounds=count(rounds),
    )


def record_for(
    model_file: ModelFile,
    *,
    name: str,
    digest: str,
    size: int,
    created_ms: int,
    license: str = "",
    price: int = 0,
    chain_id: int = 0,
    token: str = "",
    description: str = "",
) -> ModelRecord:
    """The record that offers `model_file` (whose bytes have `digest` and `size`).

    Raises `WireError` naming the field when an argument breaks the record's limits.
    """
    info = model_file.info
    if isinstance(price, bool) or not isinstance(price, int) or not 0 <= price <= MAX_AMOUNT_UNITS:
        raise WireError("body.price", f"must be 0..{MAX_AMOUNT_UNITS} base units, got {price!r}")
    record = ModelRecord(
        name=name,
        job=model_file.job_id,
        model=digest,
        size=size,
        weights=weights_digest(model_file),
        metrics=metrics_of(model_file.metrics),
        kind=info.kind,
        task=info.task,
        input_shape=tuple(info.input_shape),
        input_dtype=input_dtype_of(info),
        created_ms=created_ms,
        num_classes=info.num_classes,
        vocab=info.vocab or "",
        architecture=model_file.spec.model.chosen or "custom",
        license=license,
        price=str(price),
        chain_id=chain_id,
        token=token,
        description=description,
    )
    record.validate()
    return record


def weights_digest(model_file: ModelFile) -> str:
    """The digest of a model file's weights as canonical safetensors (a job's weights digest)."""
    from ravenp2p.training.tensors import digest_of

    return digest_of(encode_tensors(model_file.weights))


def open_record(codec: EnvelopeCodec, raw: bytes, key: str | None = None) -> Envelope:
    """Verify a signed model record (from the DHT under `key`, or from the topic or disk).

    Checks everything the codec checks but replay (records are read many
    times), that the message is a `ModelRecord`, and that the context it was
    signed for is the models topic or its own DHT key. Raises `WireError`.
    """
    envelope = codec.open(raw, context=key, check_replay=False)
    record = envelope.message
    if not isinstance(record, ModelRecord):
        raise WireError("type", f"a model record was expected, not {envelope.type}")
    own_key = model_key(envelope.sender, record.name)
    if key is not None and key != own_key:
        raise WireError("sender", f"record for {key} signed by {envelope.sender}")
    if envelope.context not in (MODELS_TOPIC, own_key):
        raise WireError("context", f"a model record is not meant for {envelope.context!r}")
    return envelope
