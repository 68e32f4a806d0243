"""A trained model as one self-describing file, and the torch module it rebuilds.

A model file is safetensors: the weights, plus string metadata that holds the
job's spec (with the model the job ran), the data description the model was
trained on, and its holdout metrics. Nothing in it is code: `load_model`
builds the module from the declarative spec, exactly as every peer of the job
did, and copies the weights in after checking names and shapes.

The module a requester gets back, `TrainedModel`, takes inputs the way the
job's shards held them: pixel values for images (uint8 MNIST or digits
images are scaled and normalised inside the module, as training did), token
ids for text, float features for tabular data.
"""

from __future__ import annotations

import io
import json
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

from ravenp2p.training.compute import ModelRuntime
from ravenp2p.training.datasets import DataInfo
from ravenp2p.training.spec import JobSpec

FORMAT = "ravenp2p-model/1"
ONNX_OPSET = 17


class ModelFileError(ValueError):
    """A file is not a usable ravenp2p model; the message says which file and why."""


@dataclass(frozen=True)
class ModelFile:
    """What a model file holds."""

    weights: dict[str, np.ndarray]
    spec: JobSpec
    info: DataInfo
    job_id: str
    metrics: dict[str, Any]
    """Holdout metrics when the job ended: `accuracy` (or None), `loss`, `samples`, `rounds`."""

    def module(self) -> TrainedModel:
        """The torch module with these weights, in eval mode."""
        runtime = ModelRuntime(self.spec.model, self.info, self.spec.loss)
        network = runtime.new_module()
        runtime.load_into(network, self.weights)
        model = TrainedModel(network, self.info)
        model.eval()
        return model


class TrainedModel(torch.nn.Module):
    """A trained network plus the input transform its job trained with."""

    def __init__(self, network: torch.nn.Module, info: DataInfo) -> None:
        super().__init__()
        self.network = network
        self.info = info
        self.scales_inputs = info.kind == "image" and not info.identity_transform
        self.register_buffer("scale", torch.tensor(info.scale, dtype=torch.float32))
        self.register_buffer("mean", torch.tensor(info.mean, dtype=torch.float32))
        self.register_buffer("std", torch.tensor(info.std, dtype=torch.float32))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if self.info.kind == "text":
            return self.network(inputs.long())
        if self.scales_inputs:
            return self.network((inputs.float() * self.scale - self.mean) / self.std)
        return self.network(inputs.float())

    def example_input(self, batch: int = 1) -> torch.Tensor:
        """Zeros of the shape and dtype the module takes (for tracing and exports)."""
        shape = (batch, *self.info.input_shape)
        if self.info.kind == "text":
            return torch.zeros(shape, dtype=torch.long)
        return torch.zeros(shape, dtype=torch.uint8 if self.scales_inputs else torch.float32)


def save_model(
    path: str | Path,
    weights: Mapping[str, np.ndarray],
    spec: JobSpec,
    info: DataInfo,
    *,
    job_id: str,
    metrics: Mapping[str, Any],
) -> Path:
    """Write a model file (safetensors with the spec and data description as metadata)."""
    path = Path(path)
    metadata = {
        "format": FORMAT,
        "job": job_id,
        "spec": json.dumps(spec.to_dict(), sort_keys=True),
        "data": json.dumps(info.to_dict(), sort_keys=True),
        "metrics": json.dumps(dict(metrics), sort_keys=True),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {name: np.ascontiguousarray(array) for name, array in weights.items()}
    save_file(arrays, str(path), metadata=metadata)
    return path


def read_model(path: str | Path) -> ModelFile:
    """Read and check a model file; `ModelFileError` names the file and the problem."""
    path = Path(path)
    try:
        with path.open("rb") as handle:
            header_len = int.from_bytes(handle.read(8), "little")
            if not 0 < header_len <= 16 * 1024 * 1024:
                raise ModelFileError(f"{path}: not a safetensors file")
            header = json.loads(handle.read(header_len))
        weights = load_file(str(path))
    except FileNotFoundError:
        raise ModelFileError(f"{path}: no such file") from None
    except (OSError, ValueError, SafetensorError) as exc:
        raise ModelFileError(f"{path}: not a readable safetensors file ({exc})") from None
    metadata = header.get("__metadata__") or {}
    if metadata.get("format") != FORMAT:
        raise ModelFileError(f"{path}: not a ravenp2p model file (format "
                             f"{metadata.get('format')!r}, expected {FORMAT!r})")
    try:
        spec = JobSpec.from_dict(json.loads(metadata["spec"]))
        info = DataInfo.from_dict(json.loads(metadata["data"]))
        metrics = json.loads(metadata.get("metrics", "{}"))
        job_id = str(metadata["job"])
    except (KeyError, ValueError) as exc:
        raise ModelFileError(f"{path}: its metadata is incomplete or invalid ({exc})") from None
    if not isinstance(metrics, dict):
        raise ModelFileError(f"{path}: its metrics are not a table")
    return ModelFile(weights, spec, info, job_id, metrics)


def load_model(path: str | Path) -> TrainedModel:
    """The torch module saved in a model file, ready for inference.

    >>> model = load_model("digits.safetensors")           # doctest: +SKIP
    >>> model(images).argmax(dim=1)                        # doctest: +SKIP
    """
    model_file = read_model(path)
    try:
        return model_file.module()
    except ValueError as exc:
        raise ModelFileError(f"{path}: the weights do not fit the model ({exc})") from None


def copy_model(source: str | Path, target: str | Path) -> Path:
    """Copy a model file (checked first) to `target`, with its spec as TOML beside it.

    The spec goes to the same name ending in `.toml`: what a person reads and edits.
    """
    import tomli_w

    source, target = Path(source), Path(target)
    saved = read_model(source)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    target.with_suffix(".toml").write_text(tomli_w.dumps(saved.spec.to_dict()), encoding="utf-8")
    return target


def onnx_bytes(model: TrainedModel) -> bytes:
    """The module as an ONNX graph (batch size free), inputs as the module takes them."""
    buffer = io.BytesIO()
    torch.onnx.export(
        model, (model.example_input(),), buffer, dynamo=False, opset_version=ONNX_OPSET,
        input_names=["input"], output_names=["output"],
        dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
    )
    return buffer.getvalue()


def export_onnx(model: TrainedModel, path: str | Path) -> Path:
    """Write the module as an ONNX file (see `onnx_bytes`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(onnx_bytes(model))
    return path
