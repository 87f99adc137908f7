"""Training the classifier users keep: MixFix on the cleaned set (Ray Train DDP, or in
process), and the trained model it writes to `<run>/model/`.

    from training import load_model
    model = load_model("runs/train/demo-mixfix")      # or .../model, or s3://...
    predictions = model.predict(["cat.jpg", "dog.png"])

Importing this package stays light (no torch): `load_model` imports the model code when
it is called.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from training.saved_model import TrainedModel

__all__ = ["load_model"]


def load_model(path: str, device: str | torch.device = "cpu") -> TrainedModel:
    """The trained model at `path` (a training run's output folder or its `model/` folder;
    local, file:// or s3://), ready for `.predict(images)`. Needs neither Ray nor the
    training config (see training.saved_model)."""
    from training.saved_model import load_model as load

    return load(path, device)
