"""CLIP loading through open_clip's factory: names + tags, local files, s3:// checkpoints.

The bundled demo model (cleaner/assets/tiny-clip-shapes.*) is registered like any other
open_clip model config, so tests exercise the same path as ViT-B/32 in production.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import open_clip
import torch
from filelock import FileLock

from cleaner.config import ConfigError, ModelConfig
from cleaner.reading import uri as uri_lib

ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")
log = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    return Path(os.environ.get("CLIPCLEANER_CACHE", Path.home() / ".cache" / "clipcleaner"))


def register_bundled_configs() -> None:
    """Make the model configs shipped in cleaner/assets known to open_clip (idempotent)."""
    names = {p.stem for p in ASSETS_DIR.glob("*.json") if not p.stem.endswith(".metrics")}
    if names and not names.issubset(set(open_clip.list_models())):
        open_clip.add_model_config(ASSETS_DIR)


def fetch_to_cache(location: str, cache_dir: str | Path | None = None) -> str:
    """A local path for a local, file:// or s3:// file; remote files are fetched once per node."""
    if not uri_lib.is_s3(location):
        path = location[len("file://") :] if location.startswith("file://") else location
        if not os.path.isfile(path):
            raise FileNotFoundError(f"model file not found: {location}")
        return path
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    digest = hashlib.sha256(location.encode()).hexdigest()[:16]
    target = cache / "models" / digest / uri_lib.basename(location)
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if not target.exists():
            log.info("fetching %s into %s", location, target)
            try:
                data = uri_lib.read_bytes(location)
            except FileNotFoundError:
                raise FileNotFoundError(f"model file not found: {location}") from None
            tmp = target.with_suffix(target.suffix + ".part")
            tmp.write_bytes(data)
            tmp.replace(target)
    return str(target)


def _looks_like_path(pretrained: str) -> bool:
    return (
        "/" in pretrained
        or pretrained.startswith(("s3://", "file://"))
        or pretrained.endswith(CHECKPOINT_SUFFIXES)
    )


def select_device(prefer: str | None = None) -> torch.device:
    """CUDA when present (or as asked), else CPU."""
    if prefer:
        return torch.device(prefer)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast_dtype(device: torch.device, precision: str = "auto") -> torch.dtype | None:
    """bf16 (or fp16 where bf16 is unsupported) on GPU for 'auto'; None (fp32) on CPU."""
    if precision == "fp32" or device.type != "cuda":
        return None
    if precision == "fp16":
        return torch.float16
    if precision == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


@dataclass
class LoadedClip:
    """A frozen CLIP ready to score: model in eval mode, its tokenizer and preprocessing."""

    model: torch.nn.Module
    tokenizer: object
    device: torch.device
    image_size: int
    mean: np.ndarray
    std: np.ndarray
    amp_dtype: torch.dtype | None
    name: str

    @property
    def embed_dim(self) -> int:
        return (
            int(self.model.text_projection.shape[1])
            if hasattr(self.model, "text_projection") and self.model.text_projection is not None
            else int(self.model.visual.output_dim)
        )


def load_clip(config: ModelConfig, device: str | torch.device | None = None) -> LoadedClip:
    """Create a CLIP with open_clip's factory from a model config; errors name the problem."""
    register_bundled_configs()
    if config.config_file:
        open_clip.add_model_config(fetch_to_cache(config.config_file, config.cache_dir))
    name = config.name
    if not name.startswith(("hf-hub:", "local-dir:")) and name not in open_clip.list_models():
        raise ConfigError(
            f"unknown open_clip model name {name!r}: not a registered config "
            "(give model.config_file, or one of open_clip.list_models())"
        )
    pretrained = config.pretrained
    if pretrained and _looks_like_path(pretrained):
        pretrained = fetch_to_cache(pretrained, config.cache_dir)
    elif pretrained is None and name.startswith("tiny-clip"):
        bundled = ASSETS_DIR / f"{name}.pt"
        pretrained = str(bundled) if bundled.exists() else None
    if pretrained is None and not config.random_weights:
        raise ConfigError(
            f"no pretrained weights for model {name!r}: give model.pretrained (an open_clip "
            "tag, a local path or an s3:// checkpoint), or model.random_weights=true for "
            "speed measurements"
        )
    target = select_device(str(device) if device is not None else None)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # random weights, when asked for, are the same in every actor
        try:
            model = open_clip.create_model(
                name, pretrained=pretrained, device=target, cache_dir=config.cache_dir
            )
        except RuntimeError as err:
            if "not a known tag" not in str(err):
                raise
            raise ConfigError(f"model {name!r}: {err}") from None
    model.eval().requires_grad_(False)
    tokenizer = open_clip.get_tokenizer(name)
    pp = getattr(model.visual, "preprocess_cfg", {})
    size = pp.get("size", model.visual.image_size)
    size = int(size[0] if isinstance(size, (tuple, list)) else size)
    return LoadedClip(
        model=model,
        tokenizer=tokenizer,
        device=target,
        image_size=size,
        mean=np.asarray(pp.get("mean", open_clip.OPENAI_DATASET_MEAN), dtype=np.float32),
        std=np.asarray(pp.get("std", open_clip.OPENAI_DATASET_STD), dtype=np.float32),
        amp_dtype=autocast_dtype(target, config.precision),
        name=name,
    )
