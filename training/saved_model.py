"""The trained classifier as users take it away: `<run>/model/`, and `load_model` to use it.

A model folder (local, file:// or s3://) holds:

- model.safetensors: the network's weights (its state dict, without DDP wrappers);
- model.json: the network (name, number of classes), the preprocessing (image size,
  resize, mean and std: what the training job fed the network), the class names, and what
  the run reported (mode, epochs, final test accuracy);
- classes.yaml: the class spec whose order the labels follow.

`load_model(path)` needs neither Ray nor the training config: it rebuilds the network from
model.json, loads the weights, and returns a `TrainedModel` whose `predict` takes images
(encoded bytes, file paths, PIL images or uint8 arrays) and gives labels, class names,
confidence and the top-k.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

from cleaner.classes import ClassSpec
from cleaner.reading import uri as uri_lib
from cleaner.reading.shards import decode_image, resize_image
from training.devices import normalise, to_device
from training.networks import build_network

MODEL_FORMAT = "clipcleaner-classifier"
FORMAT_VERSION = 1
MODEL_DIR = "model"
WEIGHTS_FILE = "model.safetensors"
INFO_FILE = "model.json"
CLASSES_FILE = "classes.yaml"


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes the network's input: decoded to RGB, resized to
    image_size x image_size (`resize_mode`, as the shard reader does), scaled to [0, 1],
    normalised with mean and std."""

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize_mode: str = "shortest"
    interpolation: str = "bicubic"

    def image_array(self, image) -> np.ndarray:
        """uint8 [S, S, 3] from encoded bytes, a file path (local or s3://), a PIL image or
        a uint8 HxWx3 array of any size."""
        if isinstance(image, (bytes, bytearray, memoryview)):
            return decode_image(bytes(image), self.image_size, self.resize_mode, self.interpolation)
        if isinstance(image, (str, Path)):
            return self.image_array(uri_lib.read_bytes(str(image)))
        if isinstance(image, np.ndarray):
            if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
                raise ValueError(
                    f"an image array must be uint8 HxWx3, got {image.dtype} {image.shape}"
                )
            image = Image.fromarray(image)
        if isinstance(image, Image.Image):
            return resize_image(
                image.convert("RGB"), self.image_size, self.resize_mode, self.interpolation
            )
        raise TypeError(f"cannot read an image from {type(image).__name__}")

    def batch(self, images) -> np.ndarray:
        """uint8 [N, S, S, 3]: a batch already at the model's size passes as it is; anything
        else (a sequence of images of the kinds `image_array` takes) is decoded and resized."""
        if isinstance(images, np.ndarray) and images.ndim == 4:
            size = self.image_size
            if images.dtype != np.uint8 or images.shape[1:] != (size, size, 3):
                raise ValueError(
                    f"an image batch must be uint8 [N, {size}, {size}, 3], "
                    f"got {images.dtype} {images.shape}"
                )
            return images
        arrays = [self.image_array(image) for image in images]
        if not arrays:
            return np.zeros((0, self.image_size, self.image_size, 3), dtype=np.uint8)
        return np.stack(arrays)


@dataclass
class Predictions:
    """What `TrainedModel.predict` gives for N images."""

    labels: np.ndarray  # int64 [N]: the most probable class
    names: list[str]  # its class name
    confidence: np.ndarray  # float32 [N]: its probability
    top_labels: np.ndarray  # int64 [N, k], most probable first
    top_probs: np.ndarray  # float32 [N, k]


class TrainedModel:
    """A trained classifier with its class names and preprocessing (see `load_model`)."""

    def __init__(
        self,
        network: torch.nn.Module,
        class_names: list[str],
        preprocessing: Preprocessing,
        info: dict,
        device: str | torch.device = "cpu",
    ) -> None:
        self.network = network.eval()
        self.class_names = list(class_names)
        self.preprocessing = preprocessing
        self.info = info
        self.device = torch.device("cpu")
        self.to(device)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def to(self, device: str | torch.device) -> TrainedModel:
        self.device = torch.device(device)
        self.network.to(self.device)
        self._mean = torch.tensor(self.preprocessing.mean, device=self.device).reshape(1, 3, 1, 1)
        self._std = torch.tensor(self.preprocessing.std, device=self.device).reshape(1, 3, 1, 1)
        return self

    @torch.no_grad()
    def probabilities(
        self, images, batch_size: int = 256, amp_dtype: torch.dtype | None = None
    ) -> np.ndarray:
        """float32 [N, K] softmax probabilities (see `Preprocessing.batch` for `images`)."""
        pixels = self.preprocessing.batch(images)
        out = []
        for start in range(0, len(pixels), batch_size):
            inputs = normalise(
                to_device(pixels[start : start + batch_size], self.device), self._mean, self._std
            )
            with torch.autocast(self.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                logits = self.network(inputs)
            out.append(torch.softmax(logits.float(), dim=1))
        if not out:
            return np.zeros((0, self.num_classes), dtype=np.float32)
        return torch.cat(out).cpu().numpy()

    def predict(
        self,
        images,
        top_k: int = 5,
        batch_size: int = 256,
        amp_dtype: torch.dtype | None = None,
    ) -> Predictions:
        """The most probable class of each image, its probability, and the top_k classes."""
        probs = self.probabilities(images, batch_size, amp_dtype)
        k = max(1, min(top_k, self.num_classes))
        top = np.argsort(-probs, axis=1, kind="stable")[:, :k]
        top_probs = np.take_along_axis(probs, top, axis=1).astype(np.float32)
        labels = top[:, 0].astype(np.int64) if len(top) else np.zeros(0, dtype=np.int64)
        return Predictions(
            labels=labels,
            names=[self.class_names[i] for i in labels],
            confidence=top_probs[:, 0] if len(top) else np.zeros(0, dtype=np.float32),
            top_labels=top.astype(np.int64),
            top_probs=top_probs,
        )

    __call__ = predict


def write_model(
    target: str,
    state_dict: dict[str, torch.Tensor],
    *,
    network: str,
    class_spec: ClassSpec,
    preprocessing: Preprocessing,
    run: dict | None = None,
    network_settings: dict | None = None,
) -> str:
    """Write a model folder at `target` (local, file:// or s3://); returns `target`.

    run: what the training run reported (mode, epochs, test accuracy...), kept in model.json.
    network_settings: what rebuilding the network needs beyond its name (clip_peft: its
    network.clip section), kept in model.json.
    The weights go first and model.json last: a folder with model.json is complete.
    """
    from safetensors.torch import save

    tensors, aliases = unaliased(state_dict)
    info = {
        "format": MODEL_FORMAT,
        "format_version": FORMAT_VERSION,
        "network": {
            "name": network,
            "num_classes": class_spec.num_classes,
            **({"settings": network_settings} if network_settings else {}),
        },
        "aliases": aliases,
        "preprocessing": {**asdict(preprocessing)},
        "class_names": class_spec.names,
        "run": run or {},
    }
    uri_lib.write_bytes(uri_lib.join(target, WEIGHTS_FILE), save(tensors))
    uri_lib.write_text(
        uri_lib.join(target, CLASSES_FILE), yaml.safe_dump(class_spec.to_dict(), sort_keys=False)
    )
    uri_lib.write_text(uri_lib.join(target, INFO_FILE), json.dumps(info, indent=2) + "\n")
    return target


def unaliased(state_dict: dict[str, torch.Tensor]) -> tuple[dict, dict[str, str]]:
    """(tensors to save, {dropped name: kept name}): a tensor held under several names (a
    parametrised layer's tuner is also registered as a module of its own) is saved once,
    under its first name; safetensors refuses shared storage."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, tensor in state_dict.items():
        identity = (tensor.device, tensor.untyped_storage().data_ptr(), tensor.storage_offset(),
                    tuple(tensor.shape), tuple(tensor.stride()), tensor.dtype)  # fmt: skip
        if tensor.numel() and identity in seen:
            aliases[name] = seen[identity]
            continue
        seen[identity] = name
        tensors[name] = tensor.detach().cpu().contiguous()
    return tensors, aliases


def model_folder(path: str) -> str:
    """The model folder at `path`: the folder itself, or `<path>/model` for a training run's
    output folder. FileNotFoundError when neither holds a model."""
    for folder in (path, uri_lib.join(path, MODEL_DIR)):
        if uri_lib.exists(uri_lib.join(folder, INFO_FILE)):
            return folder
    raise FileNotFoundError(
        f"no trained model at {path} (expected {INFO_FILE} there or in {MODEL_DIR}/)"
    )


def read_model_info(path: str) -> dict:
    """model.json of a model folder (or of a run's `model/`), checked: no weights loaded."""
    folder = model_folder(path)
    info = json.loads(uri_lib.read_text(uri_lib.join(folder, INFO_FILE)))
    if info.get("format") != MODEL_FORMAT:
        raise ValueError(f"{folder}/{INFO_FILE} is not a {MODEL_FORMAT} model description")
    if int(info.get("format_version", 0)) > FORMAT_VERSION:
        raise ValueError(
            f"{folder} was written in model format {info['format_version']}; this version "
            f"reads up to {FORMAT_VERSION}"
        )
    return {**info, "folder": folder}


def preprocessing_of(info: dict) -> Preprocessing:
    pre = info["preprocessing"]
    return Preprocessing(
        image_size=int(pre["image_size"]),
        mean=tuple(pre["mean"]),
        std=tuple(pre["std"]),
        resize_mode=pre.get("resize_mode", "shortest"),
        interpolation=pre.get("interpolation", "bicubic"),
    )


def network_arguments(settings: dict) -> dict:
    """build_network's keyword arguments from model.json's network settings (clip_peft: its
    CLIP section; its input normalisation is a buffer of the saved weights)."""
    if "clip" not in settings:
        return {}
    from training.config import ClipNetworkConfig

    return {"clip": ClipNetworkConfig.model_validate(settings["clip"])}


def load_model(path: str, device: str | torch.device = "cpu") -> TrainedModel:
    """The trained model at `path` (its model folder or the training run's output folder;
    local, file:// or s3://), on `device`, ready for `predict`."""
    from safetensors.torch import load

    info = read_model_info(path)
    folder = info.pop("folder")
    spec = ClassSpec.from_yaml_text(uri_lib.read_text(uri_lib.join(folder, CLASSES_FILE)))
    if spec.names != info["class_names"]:
        raise ValueError(f"{folder}: {CLASSES_FILE} and {INFO_FILE} name different classes")
    network = build_network(
        info["network"]["name"],
        int(info["network"]["num_classes"]),
        **network_arguments(info["network"].get("settings") or {}),
    )
    tensors = load(uri_lib.read_bytes(uri_lib.join(folder, WEIGHTS_FILE)))
    for alias, kept in (info.get("aliases") or {}).items():
        tensors[alias] = tensors[kept]
    network.load_state_dict(tensors)
    return TrainedModel(network, spec.names, preprocessing_of(info), info, device)


def write_run_model(
    cfg, spec: ClassSpec, state_dict: dict, history: list[dict], engine: str
) -> str:
    """`<run.storage>/<run.name>/model/` for a finished training run (cfg: TrainJobConfig):
    its weights, the data config's preprocessing, its class spec and final metrics."""
    final = history[-1] if history else {}
    return write_model(
        uri_lib.join(cfg.run.storage, cfg.run.name, MODEL_DIR),
        state_dict,
        network=cfg.network.name,
        network_settings=(
            {"clip": cfg.network.clip.model_dump()} if cfg.network.clip is not None else None
        ),
        class_spec=spec,
        preprocessing=Preprocessing(
            image_size=cfg.data.image_size, mean=tuple(cfg.data.mean), std=tuple(cfg.data.std)
        ),
        run={
            "name": cfg.run.name,
            "engine": engine,
            "mode": cfg.mixfix.mode,
            "epochs": len(history),
            "test_accuracy": final.get("test_accuracy"),
            "seed": cfg.seed,
        },
    )
