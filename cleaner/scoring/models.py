"""CLIP loading through open_clip's factory: names + tags, local files, s3:// checkpoints.

The bundled demo model (cleaner/assets/tiny-clip-shapes.*) is registered like any other
open_clip model config, so tests exercise the same path as ViT-B/32 in production.
"""

from __future__ import annotations

import hashlib
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import open_clip
import torch
from filelock import FileLock

from cleaner.config import ConfigError, ModelConfig
from cleaner.reading import uri as uri_lib
from cleaner.scoring.devices import autocast_dtype, select_device

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


def stored_quick_gelu(path: str) -> bool | None:
    """The `quick_gelu` flag stored with a checkpoint file, or None where it has none.

    Torch checkpoints carry it as a top-level key beside `state_dict`
    ({"state_dict": ..., "quick_gelu": true}, which open_clip loads as is); safetensors
    files carry it in their metadata ("quick_gelu": "true"). Reading it maps the file
    (mmap), it does not load the weights.
    """
    if path.endswith(".safetensors"):
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            value = (f.metadata() or {}).get("quick_gelu")
        return None if value is None else str(value).lower() in ("1", "true", "yes")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, ValueError, OSError):  # a TorchScript archive or an old format
        return None
    if isinstance(checkpoint, dict) and "quick_gelu" in checkpoint:
        return bool(checkpoint["quick_gelu"])
    return None


def resolve_quick_gelu(
    setting: bool | str, name: str, pretrained: str | None, checkpoint: str | None
) -> tuple[bool | None, str]:
    """(QuickGELU on/off, or None to keep the model config's own; why) for a model config.

    'auto' follows open_clip's pretrained config for a tag (OpenAI's weights were trained
    with QuickGELU; open_clip would build plain GELU and only warn), and for a checkpoint
    file the flag stored with it (see stored_quick_gelu).
    """
    if isinstance(setting, bool):
        return setting, "model.quick_gelu"
    if checkpoint is not None:
        flag = stored_quick_gelu(checkpoint)
        if flag is not None:
            return flag, f"the quick_gelu flag stored with {pretrained}"
        warn_if_openai_architecture(name, pretrained)
        return None, "the model config (no quick_gelu flag stored with the checkpoint)"
    if pretrained:
        tag_cfg = open_clip.get_pretrained_cfg(name, pretrained)
        if tag_cfg and "quick_gelu" in tag_cfg:
            return bool(tag_cfg["quick_gelu"]), f"open_clip's config of tag {pretrained!r}"
        if tag_cfg:  # a tag that says nothing keeps the model config's own (roberta-ViT-B-32)
            return None, f"the model config (open_clip's tag {pretrained!r} sets no quick_gelu)"
    return None, "the model config"


def warn_if_openai_architecture(name: str, pretrained: str | None) -> None:
    """Warn that a checkpoint without a stored flag gets GELU where OpenAI's weights for the
    same architecture were trained with QuickGELU (the scores would be quietly worse)."""
    builds_quick_gelu = (open_clip.get_model_config(name) or {}).get("quick_gelu", False)
    if builds_quick_gelu or "openai" not in open_clip.list_pretrained_tags_by_model(name):
        return
    log.warning(
        "model %s from %s: no quick_gelu flag is stored with the checkpoint, so it gets the "
        "model config's GELU; OpenAI's %s weights were trained with QuickGELU. If these are "
        "OpenAI's weights set model.quick_gelu=true (or store the flag with the checkpoint)",
        name,
        pretrained,
        name,
    )


def uses_quick_gelu(model: torch.nn.Module) -> bool:
    """True if the model's activations are QuickGELU (what the built module really has)."""
    return any(isinstance(m, open_clip.transformer.QuickGELU) for m in model.modules())


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
    resize_mode: str = "shortest"
    interpolation: str = "bicubic"
    fill_color: int = 0
    quick_gelu: bool = False

    @property
    def embed_dim(self) -> int:
        return (
            int(self.model.text_projection.shape[1])
            if hasattr(self.model, "text_projection") and self.model.text_projection is not None
            else int(self.model.visual.output_dim)
        )

    @property
    def resize(self) -> dict:
        """How the decoder resizes to image_size for this model (read_shard's keywords)."""
        return {
            "resize_mode": self.resize_mode,
            "interpolation": self.interpolation,
            "fill_color": self.fill_color,
        }


def check_model_config(config: ModelConfig) -> None:
    """The cheap checks of load_clip (name known, weights given), without loading weights."""
    register_bundled_configs()
    if config.config_file:
        open_clip.add_model_config(fetch_to_cache(config.config_file, config.cache_dir))
    name = config.name
    if not name.startswith(("hf-hub:", "local-dir:")) and name not in open_clip.list_models():
        raise ConfigError(
            f"unknown open_clip model name {name!r}: not a registered config "
            "(give model.config_file, or one of open_clip.list_models())"
        )
    bundled = name.startswith("tiny-clip") and (ASSETS_DIR / f"{name}.pt").exists()
    schema_weights = name.startswith(("hf-hub:", "local-dir:"))  # weights come with the model
    if config.pretrained is None and not (bundled or schema_weights or config.random_weights):
        raise ConfigError(
            f"no pretrained weights for model {name!r}: give model.pretrained (an open_clip "
            "tag, a local path or an s3:// checkpoint), or model.random_weights=true for "
            "speed measurements"
        )


def load_clip(config: ModelConfig, device: str | torch.device | None = None) -> LoadedClip:
    """Create a CLIP with open_clip's factory from a model config; errors name the problem.

    The activation (QuickGELU or GELU) follows model.quick_gelu (see resolve_quick_gelu);
    the preprocessing (size, mean, std, resize mode, interpolation) follows the model's
    final preprocess_cfg, which open_clip merges from the tag's config.
    """
    check_model_config(config)  # name known, weights given
    name = config.name
    pretrained = config.pretrained
    checkpoint = None
    if pretrained and _looks_like_path(pretrained):
        pretrained = checkpoint = fetch_to_cache(pretrained, config.cache_dir)
    elif pretrained is None and name.startswith("tiny-clip"):
        bundled = ASSETS_DIR / f"{name}.pt"
        pretrained = str(bundled) if bundled.exists() else None
    quick_gelu, why = resolve_quick_gelu(config.quick_gelu, name, config.pretrained, checkpoint)
    base_cfg = open_clip.get_model_config(name) or {}
    activation: dict = {}
    if quick_gelu is True:
        activation["force_quick_gelu"] = True
    elif quick_gelu is False and base_cfg.get("quick_gelu", False):
        activation["quick_gelu"] = False  # a model kwarg: overrides the config's True
    target = select_device(str(device) if device is not None else None)
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        # open_clip warns about a QuickGELU mismatch only when we chose it on purpose
        warnings.filterwarnings("ignore", message="QuickGELU mismatch")
        torch.manual_seed(0)  # random weights, when asked for, are the same in every actor
        try:
            model = open_clip.create_model(
                name, pretrained=pretrained, device=target, cache_dir=config.cache_dir, **activation
            )
        except RuntimeError as err:
            if "not a known tag" not in str(err):
                raise
            raise ConfigError(f"model {name!r}: {err}") from None
    model.eval().requires_grad_(False)
    has_quick_gelu = uses_quick_gelu(model)
    log.info(
        "model %s: %s activations, from %s", name, "QuickGELU" if has_quick_gelu else "GELU", why
    )
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
        resize_mode=str(pp.get("resize_mode", "shortest")),
        interpolation=str(pp.get("interpolation", "bicubic")),
        fill_color=int(pp.get("fill_color", 0)),
        quick_gelu=has_quick_gelu,
    )
