"""Where and in which precision a training worker computes, and getting batches there.

One place for the GPU-only decisions of the loop, each a plain function testable on CPU:
the autocast dtype (native bf16 or fp16 with a GradScaler), SyncBatchNorm across GPU
workers, BatchNorm buffers made equal before predicting, and host-to-device copies that
neither block nor send ids and labels on a round trip through the GPU.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torch import nn

from cleaner.scoring.devices import autocast_dtype


def amp_dtype_for(
    device: torch.device, amp: str, capability: tuple[int, int] | None = None
) -> torch.dtype | None:
    """Autocast dtype: None on CPU or for fp32; 'auto' is bf16 only where the GPU has it
    natively (compute capability >= 8.0), else fp16 (trained with a GradScaler)."""
    return autocast_dtype(device, amp, capability)


def make_scaler(amp_dtype: torch.dtype | None, device: torch.device) -> torch.amp.GradScaler | None:
    """A GradScaler for fp16 (its range needs one); None for bf16 and fp32."""
    if amp_dtype != torch.float16:
        return None
    return torch.amp.GradScaler(device.type)


def maybe_sync_batchnorm(model: nn.Module, world: int, device: torch.device, enabled: bool):
    """BatchNorm layers as SyncBatchNorm when training on several GPUs (NCCL).

    With 8 workers a per-GPU batch of 8-16 samples gives noisy BatchNorm statistics; the
    paper trains on one GPU with the whole batch. SyncBatchNorm needs CUDA, so CPU (gloo)
    runs keep plain BatchNorm.
    """
    if enabled and world > 1 and device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model


def broadcast_buffers(module: nn.Module, world: int, src: int = 0) -> None:
    """Give every rank rank `src`'s buffers (BatchNorm running statistics), in place.

    DDP keeps parameters equal, but each rank's running statistics come from its own
    batches; predicting with them would make the absorb/relabel decision depend on the
    worker count. Broadcasting before the prediction pass makes all ranks predict with
    one model.
    """
    if world <= 1:
        return
    for buffer in module.buffers():
        torch.distributed.broadcast(buffer.data, src=src)


def to_device(array: np.ndarray | torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host array on `device`: from pinned memory without blocking when it is a GPU."""
    if isinstance(array, torch.Tensor):
        tensor = array
    else:
        with warnings.catch_warnings():  # Ray's batches may be read-only; they are only read
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            tensor = torch.from_numpy(np.ascontiguousarray(array))
    if device.type != "cuda":
        return tensor
    return tensor.pin_memory().to(device, non_blocking=True)


def normalise(images: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 NHWC on device -> normalised float NCHW."""
    return images.permute(0, 3, 1, 2).float().div_(255.0).sub_(mean).div_(std)


def configure_backends(device: torch.device) -> None:
    """cuDNN picks its fastest kernels for the (fixed) training shapes on GPU."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
