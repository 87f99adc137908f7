"""Which device a stage computes on, and in which precision: torch only (no open_clip), so
training workers and tests import it cheaply."""

from __future__ import annotations

import torch

__all__ = ["autocast_dtype", "native_bf16", "select_device"]


def select_device(prefer: str | None = None, gpu_ids: list | None = None) -> torch.device:
    """The device a stage may use: as asked, else the GPU it was granted, else CPU.

    gpu_ids are the GPUs the stage reserved (ray.get_gpu_ids() in a Ray actor or task;
    None outside Ray). A stage that reserved no GPU runs on CPU even where CUDA is
    visible: Ray does not hide GPUs from workers that asked for none.
    """
    if prefer:
        return torch.device(prefer)
    if gpu_ids is None:
        gpu_ids = _granted_gpu_ids()
    if gpu_ids is not None and len(gpu_ids) == 0:
        return torch.device("cpu")
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _granted_gpu_ids() -> list | None:
    """ray.get_gpu_ids() inside a Ray worker; None outside Ray (no reservation to follow)."""
    try:
        import ray
    except ImportError:  # pragma: no cover - ray is a dependency
        return None
    if not ray.is_initialized():
        return None
    try:
        if ray.get_runtime_context().worker.mode != ray.WORKER_MODE:
            return None  # the driver reserves nothing; it follows what it sees
    except AttributeError:  # pragma: no cover - older/newer runtime context
        return None
    return list(ray.get_gpu_ids())


def native_bf16(capability: tuple[int, int] | None) -> bool:
    """True where the GPU computes bf16 natively (compute capability 8.0+: A100, H100, L4...).

    torch.cuda.is_bf16_supported() also counts emulation (T4, V100), where bf16 is slow
    and fp16 with a GradScaler is the right choice.
    """
    return capability is not None and tuple(capability) >= (8, 0)


def autocast_dtype(
    device: torch.device, precision: str = "auto", capability: tuple[int, int] | None = None
) -> torch.dtype | None:
    """The autocast dtype for a precision setting: None (fp32) on CPU or for 'fp32'.

    'auto' is bf16 where the GPU has native bf16 (capability >= 8.0), else fp16.
    capability defaults to the device's own (torch.cuda.get_device_capability).
    """
    if precision == "fp32" or device.type != "cuda":
        return None
    if precision == "fp16":
        return torch.float16
    if precision == "bf16":
        return torch.bfloat16
    if capability is None:
        capability = torch.cuda.get_device_capability(device)
    return torch.bfloat16 if native_bf16(capability) else torch.float16
