"""CPU-side image transforms the training data pipeline runs on its workers: uint8 NHWC
batches to normalised float32 NCHW tensors, with the paper's crop-and-flip augmentation."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

# Per-channel RGB statistics for normalising inputs in [0, 1].
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
CIFAR10_MEAN: tuple[float, float, float] = (0.4914, 0.4822, 0.4465)
CIFAR10_STD: tuple[float, float, float] = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN: tuple[float, float, float] = (0.5071, 0.4865, 0.4409)
CIFAR100_STD: tuple[float, float, float] = (0.2673, 0.2564, 0.2762)


def _check_images(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"images must be NHWC, got shape {images.shape}")
    if images.dtype != np.uint8:
        raise ValueError(f"images must be uint8, got {images.dtype}")
    return images


def to_tensor_batch(
    images: np.ndarray,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> torch.Tensor:
    """uint8 NHWC images -> float32 NCHW tensor, scaled to [0, 1] and normalised."""
    images = _check_images(images)
    channels = images.shape[3]
    mean_arr = np.asarray(mean, dtype=np.float32).reshape(1, 1, 1, -1)
    std_arr = np.asarray(std, dtype=np.float32).reshape(1, 1, 1, -1)
    if mean_arr.size != channels or std_arr.size != channels:
        raise ValueError(f"mean/std need {channels} entries, got {mean_arr.size}/{std_arr.size}")
    normalised = (images.astype(np.float32) / 255.0 - mean_arr) / std_arr
    return torch.from_numpy(np.ascontiguousarray(normalised.transpose(0, 3, 1, 2)))


def random_crop_flip(
    images: np.ndarray, rng: np.random.Generator, crop_padding: int = 4, flip: bool = True
) -> np.ndarray:
    """Random crop after zero padding and random horizontal flip, uint8 in and out.

    images: uint8 [N, H, W, C]. Each image gets its own crop offset in
    [0, 2 * crop_padding] per axis and a flip with probability 1/2; vectorised with one
    gather. Staying uint8 keeps the batch 4x smaller on its way to the trainer.
    """
    images = _check_images(images)
    n, height, width, _ = images.shape
    if crop_padding < 0:
        raise ValueError(f"crop_padding must be >= 0, got {crop_padding}")
    if crop_padding:
        pad = crop_padding
        padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    else:
        padded = images
    offset_y = rng.integers(0, 2 * crop_padding + 1, n)
    offset_x = rng.integers(0, 2 * crop_padding + 1, n)
    rows = offset_y[:, None] + np.arange(height)  # [N, H]
    cols = offset_x[:, None] + np.arange(width)  # [N, W]
    if flip:
        flipped = rng.random(n) < 0.5
        cols = np.where(flipped[:, None], cols[:, ::-1], cols)
    return padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]


def augment_batch(
    images: np.ndarray,
    rng: np.random.Generator,
    crop_padding: int = 4,
    flip: bool = True,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> torch.Tensor:
    """Training transform: random_crop_flip, then normalise to float32 [N, C, H, W]."""
    return to_tensor_batch(random_crop_flip(images, rng, crop_padding, flip), mean, std)


__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "augment_batch",
    "random_crop_flip",
    "to_tensor_batch",
]
