"""Classifier networks trained by MixFix (docs/method.md, "Settings").

`build_network(name, num_classes, pretrained_path=...)` returns a freshly initialised
network, optionally warm-started from a local (or s3://, file://) state-dict file:

- "preact_resnet18": pre-activation ResNet-18 for 32px images (CIFAR, Red Mini-ImageNet),
  3x3 stem without max-pool; global average pooling, so larger inputs work too.
- "resnet50": torchvision ResNet-50 (Clothing1M), head sized for num_classes.
- "vgg19_bn": torchvision VGG-19 with batch norm (ANIMAL-10N, 64 px and up).
- "inception_resnet_v2": timm's InceptionResNetV2 ((mini-)WebVision, 299px inputs; it runs
  on inputs as small as 75px).
- "tiny_cnn": a ~100k-parameter CNN for the CPU demo and the tests (32px and up).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

NETWORKS: tuple[str, ...] = (
    "preact_resnet18",
    "resnet50",
    "inception_resnet_v2",
    "vgg19_bn",
    "tiny_cnn",
    "clip_peft",
)

# Keys under which training frameworks commonly nest the model's state dict in a checkpoint.
_NESTED_STATE_KEYS = ("state_dict", "model_state_dict", "model", "net")
# Prefixes added by DDP wrapping and torch.compile.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


# --------------------------------------------------------------------------------------
# PreAct ResNet-18
# --------------------------------------------------------------------------------------


class PreActBlock(nn.Module):
    """Pre-activation basic block (He et al. 2016, "Identity Mappings"): BN-ReLU-conv x2."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        # The projection shortcut takes the pre-activated input, as in the reference design.
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet(nn.Module):
    """Pre-activation ResNet for small images: 3x3 stem, no max-pool, final BN-ReLU."""

    def __init__(self, blocks_per_stage: tuple[int, ...], num_classes: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
        stages: list[nn.Module] = []
        in_planes = 64
        for stage, num_blocks in enumerate(blocks_per_stage):
            planes = 64 * 2**stage
            strides = [1 if stage == 0 else 2] + [1] * (num_blocks - 1)
            blocks = []
            for stride in strides:
                blocks.append(PreActBlock(in_planes, planes, stride))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.bn = nn.BatchNorm2d(in_planes)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(in_planes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x)
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.relu(self.bn(out))
        return self.linear(torch.flatten(self.pool(out), 1))


def preact_resnet18(num_classes: int) -> PreActResNet:
    """PreAct ResNet-18 (about 11.2M parameters) for 32px inputs."""
    return PreActResNet((2, 2, 2, 2), num_classes)


# --------------------------------------------------------------------------------------
# Tiny CNN (CPU demo, tests)
# --------------------------------------------------------------------------------------


class TinyCNN(nn.Module):
    """Three conv-BN-ReLU stages (32, 64, 128 channels) with max-pool, global pool, linear."""

    def __init__(self, num_classes: int, widths: tuple[int, ...] = (32, 64, 128)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_channels = 3
        for index, width in enumerate(widths):
            layers += [
                nn.Conv2d(in_channels, width, 3, padding=1, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(inplace=True),
            ]
            if index < len(widths) - 1:
                layers.append(nn.MaxPool2d(2))
            in_channels = width
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(in_channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(torch.flatten(self.pool(self.features(x)), 1))


# --------------------------------------------------------------------------------------
# Factory
# --------------------------------------------------------------------------------------


def _resnet50(num_classes: int) -> nn.Module:
    from torchvision.models import resnet50

    model = resnet50(weights=None)
    model.fc = nn.Linear(model.fc.in_features, num_classes)
    return model


def _vgg19_bn(num_classes: int) -> nn.Module:
    from torchvision.models import vgg19_bn

    return vgg19_bn(weights=None, num_classes=num_classes)


def _inception_resnet_v2(num_classes: int) -> nn.Module:
    import timm

    return timm.create_model("inception_resnet_v2", pretrained=False, num_classes=num_classes)


_BUILDERS: dict[str, Callable[[int], nn.Module]] = {
    "preact_resnet18": preact_resnet18,
    "resnet50": _resnet50,
    "inception_resnet_v2": _inception_resnet_v2,
    "vgg19_bn": _vgg19_bn,
    "tiny_cnn": TinyCNN,
}


@dataclass
class LoadReport:
    """What loading initial weights did: keys not filled, ignored, or of the wrong shape."""

    path: str
    loaded: int
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)  # present in both, shapes differ

    @property
    def exact(self) -> bool:
        """True when every key matched in name and shape."""
        return not (self.missing or self.unexpected or self.mismatched)


def build_network(
    name: str, num_classes: int, *, pretrained_path: str | None = None, clip=None, data=None
) -> nn.Module:
    """A network from NETWORKS with a num_classes-way head, optionally warm-started.

    pretrained_path: a state-dict file (local path, file:// or s3://). Loading is
    non-strict: a head of another size (e.g. ImageNet's 1000 classes) is left freshly
    initialised; missing, unexpected and shape-mismatched keys are logged.
    clip (a ClipNetworkConfig) and data (the job's data config, for its normalisation):
    clip_peft only (training/clip_network.py).
    """
    if name not in NETWORKS:
        raise ValueError(f"unknown network {name!r}; known networks: {', '.join(NETWORKS)}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if name == "clip_peft":
        if clip is None:
            raise ValueError("network clip_peft needs its clip settings (network.clip)")
        from training.clip_network import ClipPeftClassifier

        normalisation = {} if data is None else {"input_mean": data.mean, "input_std": data.std}
        model = ClipPeftClassifier(
            clip.model,
            num_classes,
            peft=clip.peft,
            rank=clip.lora_rank,
            length=clip.vpt_len,
            **normalisation,
        )
    else:
        model = _BUILDERS[name](num_classes)
    if pretrained_path:
        report = load_initial_weights(model, pretrained_path)
        if report.exact:
            log.info("loaded %d tensors from %s", report.loaded, report.path)
        else:
            log.warning(
                "loaded %d tensors from %s non-strictly; missing: %s; unexpected: %s; "
                "shape mismatch (left initialised): %s",
                report.loaded,
                report.path,
                report.missing,
                report.unexpected,
                report.mismatched,
            )
    return model


def load_initial_weights(model: nn.Module, path: str) -> LoadReport:
    """Load a state-dict file into model non-strictly; keys of another shape are skipped.

    Accepts a bare state dict or a checkpoint dict nesting it under "state_dict", "model",
    "model_state_dict" or "net"; "module." (DDP) and "_orig_mod." (torch.compile) key
    prefixes are removed. s3:// locations are fetched through cleaner.scoring.models.fetch_to_cache
    (cached once per node); file:// and plain paths are read in place.
    """
    if path.startswith("s3://"):
        from cleaner.scoring.models import fetch_to_cache  # imports open_clip: only when needed

        local_path = fetch_to_cache(path)
    else:
        local_path = path.removeprefix("file://")
        if not os.path.isfile(local_path):
            raise FileNotFoundError(f"initial weights not found: {path}")
    checkpoint = torch.load(local_path, map_location="cpu", weights_only=True)
    state = _unwrap_state_dict(checkpoint, path)

    own_state = model.state_dict()
    compatible = {}
    mismatched = []
    for key, tensor in state.items():
        if key in own_state and own_state[key].shape != tensor.shape:
            mismatched.append(key)
        else:
            compatible[key] = tensor
    result = model.load_state_dict(compatible, strict=False)
    loaded = len(compatible) - len(result.unexpected_keys)
    return LoadReport(
        path=path,
        loaded=loaded,
        missing=list(result.missing_keys),
        unexpected=list(result.unexpected_keys),
        mismatched=mismatched,
    )


def _unwrap_state_dict(checkpoint: object, path: str) -> dict[str, torch.Tensor]:
    """The tensor mapping inside a loaded checkpoint, without wrapper prefixes."""
    state = checkpoint
    if isinstance(state, Mapping):
        for key in _NESTED_STATE_KEYS:
            nested = state.get(key)
            if isinstance(nested, Mapping):
                state = nested
                break
    if not isinstance(state, Mapping) or not all(
        isinstance(value, torch.Tensor) for value in state.values()
    ):
        raise ValueError(f"{path} does not hold a state dict (a mapping of names to tensors)")
    unwrapped = {}
    for key, tensor in state.items():
        clean_key = key
        for prefix in _WRAPPER_PREFIXES:
            clean_key = clean_key.removeprefix(prefix)
        unwrapped[clean_key] = tensor
    return unwrapped
