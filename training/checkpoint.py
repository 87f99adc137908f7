"""A training run's checkpoint: model, optimiser, scheduler, GradScaler, MixFix state.

Saved by rank 0 from its own device; loaded by every rank onto its own device
(map_location), so a resume never creates tensors on another rank's GPU, and a
checkpoint written on a GPU node loads on a CPU node.
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch

from training.mixfix import MixFixState

CHECKPOINT_FILES = (
    "model.pt",
    "optimizer.pt",
    "scheduler.pt",
    "scaler.pt",
    "state.npz",
    "history.json",
)


def save_checkpoint(
    directory: str, model, optimizer, scheduler, state: MixFixState, history, scaler=None
):
    """Write the checkpoint files into `directory` (scaler.pt only when a GradScaler is used)."""
    module = model.module if hasattr(model, "module") else model
    torch.save(module.state_dict(), os.path.join(directory, "model.pt"))
    torch.save(optimizer.state_dict(), os.path.join(directory, "optimizer.pt"))
    torch.save(scheduler.state_dict(), os.path.join(directory, "scheduler.pt"))
    if scaler is not None:
        torch.save(scaler.state_dict(), os.path.join(directory, "scaler.pt"))
    np.savez(os.path.join(directory, "state.npz"), **state.state_dict())
    with open(os.path.join(directory, "history.json"), "w") as f:
        json.dump(history, f)


def read_states(directory: str, device: torch.device | str) -> dict:
    """The torch states of a checkpoint, their tensors on `device` (whatever they were saved on)."""
    states = {}
    for name in ("model", "optimizer", "scheduler", "scaler"):
        path = os.path.join(directory, f"{name}.pt")
        if os.path.exists(path):
            states[name] = torch.load(path, map_location=device, weights_only=True)
    return states


def load_checkpoint(directory: str, model, optimizer, scheduler, device, scaler=None):
    """Restore a checkpoint onto this rank's device; returns (MixFix state, history)."""
    module = model.module if hasattr(model, "module") else model
    states = read_states(directory, device)
    module.load_state_dict(states["model"])
    optimizer.load_state_dict(states["optimizer"])
    scheduler.load_state_dict(states["scheduler"])
    if scaler is not None and "scaler" in states:
        scaler.load_state_dict(states["scaler"])
    with np.load(os.path.join(directory, "state.npz")) as data:
        state = MixFixState.from_state_dict({k: data[k] for k in data.files})
    with open(os.path.join(directory, "history.json")) as f:
        history = json.load(f)
    return state, history
