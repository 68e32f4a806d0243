"""`export_onnx`: the ONNX graph computes what the torch module does, inputs taken the same way."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch
from market_models import DIGITS, TABULAR, TEXT, make_model

from ravenp2p.training.datasets import DataInfo
from ravenp2p.training.model_file import export_onnx, load_model


def sample_inputs(info: DataInfo, batch: int) -> np.ndarray:
    rng = np.random.default_rng(7)
    shape = (batch, *info.input_shape)
    if info.kind == "text":
        assert info.vocab_size is not None
        return rng.integers(0, info.vocab_size, size=shape, dtype=np.int64)
    if info.kind == "image":
        return rng.integers(0, 17, size=shape, dtype=np.uint8)  # raw digits pixels, 0..16
    return rng.standard_normal(shape).astype(np.float32)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")  # the text model's fixed length
@pytest.mark.parametrize("info", [DIGITS, TABULAR, TEXT], ids=["image", "tabular", "text"])
def test_the_onnx_export_matches_the_torch_module(tmp_path: Path, info: DataInfo) -> None:
    model = load_model(make_model(tmp_path / "model.safetensors", info, seed=3))
    onnx_path = export_onnx(model, tmp_path / "model.onnx")
    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    (graph_input,) = session.get_inputs()
    assert graph_input.name == "input"
    for batch in (1, 5):  # the batch axis is free
        inputs = sample_inputs(info, batch)
        with torch.no_grad():
            expected = model(torch.from_numpy(inputs)).numpy()
        (got,) = session.run(["output"], {"input": inputs})
        assert got.shape == expected.shape
        assert np.abs(got - expected).max() <= 1e-5, np.abs(got - expected).max()
        assert np.abs(expected).max() > 1e-3  # not two graphs of zeros
