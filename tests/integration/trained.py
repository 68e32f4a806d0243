"""What the client tests share: the quick digits job and how a returned model is scored."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits

QUICK_SPEC = Path(__file__).parents[2] / "examples" / "jobs" / "digits-quick.toml"


def digits_accuracy(model: torch.nn.Module) -> float:
    """Accuracy of a returned module on all of scikit-learn's digits, fed as raw pixels."""
    digits = load_digits()
    images = torch.from_numpy(np.asarray(digits.images, dtype=np.uint8)[:, None])
    with torch.no_grad():
        predicted = model(images).argmax(dim=1).numpy()
    return float((predicted == digits.target).mean())
