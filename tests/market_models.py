"""Small model files for the marketplace tests: made by `save_model`, trained by nothing.

Each is a zoo model with its initial weights (seeded), written exactly as a
requester writes a finished job's model, so every path a real model takes is
taken; predictions are arbitrary but deterministic.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

import msgpack

from ravenp2p.devnet import devnet_spec
from ravenp2p.identity import NodeIdentity
from ravenp2p.training.compute import ModelRuntime
from ravenp2p.training.datasets import DataInfo
from ravenp2p.training.model_file import save_model
from ravenp2p.training.selector import resolve_model
from ravenp2p.training.spec import JobSpec
from ravenp2p.wire.envelope import _pack_envelope, _signing_digest

DIGITS = DataInfo(kind="image", task="classification", input_shape=(1, 8, 8), num_classes=10,
                  scale=1.0 / 16.0)
TABULAR = DataInfo(kind="tabular", task="classification", input_shape=(5,), num_classes=3)
TEXT = DataInfo(kind="text", task="language", input_shape=(12,), vocab=" abcdehlorw")


def job_id_for(label: str) -> str:
    return hashlib.sha256(label.encode()).hexdigest()


def make_model(path: Path, info: DataInfo = DIGITS, *, name: str = "digits-test", seed: int = 0,
               accuracy: float | None = 0.5) -> Path:
    """Write a model file for `info`'s kind of data with the zoo's model and seeded weights."""
    data = devnet_spec().to_dict()
    data["name"] = name
    spec = JobSpec.from_dict(data)
    spec = resolve_model(spec, info.kind, info.input_shape, num_classes=info.num_classes,
                         vocab_size=info.vocab_size)
    weights = ModelRuntime(spec.model, info, spec.loss).initial_weights(seed)
    metrics = {"accuracy": accuracy if info.task == "classification" else None, "loss": 1.25,
               "samples": 180, "rounds": 7}
    return save_model(path, weights, spec, info, job_id=job_id_for(f"{name}/{seed}"),
                      metrics=metrics)


def forge(identity: NodeIdentity, type_: str, context: str, body: dict[str, Any]) -> bytes:
    """A correctly signed envelope around any body: what a modified peer could send."""
    packed = msgpack.packb(body, use_bin_type=True)
    ts, nonce = int(time.time() * 1000), hashlib.sha256(packed).digest()[:16]
    digest = _signing_digest(1, type_, context, identity.peer_id, ts, nonce, packed)
    return _pack_envelope(1, type_, context, identity.peer_id, ts, nonce, packed,
                          identity.sign_digest(digest))
