"""VGG16 perceptual loss (spec §6) without torchvision.

We define VGG16's convolutional trunk ourselves, with torchvision's module indices, so that torchvision's
ImageNet weight file `vgg16-397923af.pth` loads into it unchanged (keys `features.<i>.weight/bias`; the
`classifier.*` keys of that file are ignored). Nothing is downloaded at run time: the weight file must be
present in the torch hub checkpoint folder (`download_data.bash` puts it there), and a missing file
stops the program with a message that says where we looked and how to get it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from pointavatar.engine.weights import find_weight_file
from pointavatar.errors import PointAvatarError

VGG16_FILE = "vgg16-397923af.pth"
VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"

# torchvision's VGG16 configuration "D": output channels of each 3x3 conv, "M" = 2x2 max pool.
_VGG16_CFG: tuple[int | str, ...] = (
    64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"
)  # fmt: skip

# The perceptual loss taps the trunk after relu1_2, relu2_2, relu3_3 and relu4_3 (original code, spec §6).
VGG_SLICES: tuple[tuple[int, int], ...] = ((0, 4), (4, 9), (9, 16), (16, 23))

# ImageNet statistics that torchvision's weights expect (RGB, inputs in [0, 1]).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def find_vgg16_file() -> Path:
    """The VGG16 weight file, or a PointAvatarError saying where we looked and how to get it."""
    return find_weight_file(
        VGG16_FILE,
        url=VGG16_URL,
        disable_hint="set `loss.vgg_feature_weight = 0` in the conf to train without the VGG perceptual loss",
    )


def make_vgg16_features() -> nn.Sequential:
    """VGG16 `features` with torchvision's module indices (conv at 0, 2, 5, 7, 10, ..., 28).

    ReLUs are not in-place so that intermediate slices can be reused freely.
    """
    layers: list[nn.Module] = []
    in_ch = 3
    for v in _VGG16_CFG:
        if v == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(in_ch, int(v), kernel_size=3, padding=1), nn.ReLU()]
            in_ch = int(v)
    return nn.Sequential(*layers)


def load_vgg16_features(path: str | Path | None = None) -> nn.Sequential:
    """VGG16 `features` with torchvision's ImageNet weights loaded from `path` (found if None)."""
    path = find_vgg16_file() if path is None else Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated download or a wrong file: say which file
        raise PointAvatarError(
            f"Could not read the VGG16 weight file {path} ({exc}). Delete it and fetch it again from "
            f"{VGG16_URL}, or set `loss.vgg_feature_weight = 0`."
        ) from exc
    features = make_vgg16_features()
    load_features_state(features, state, path)
    return features


def load_features_state(features: nn.Module, state: dict, path: str | Path = "<state dict>") -> None:
    """Load the `features.*` entries of a torchvision-style state dict into `features` (strict)."""
    sub = {k[len("features.") :]: v for k, v in state.items() if k.startswith("features.")}
    expected = set(features.state_dict().keys())
    missing = sorted(expected - set(sub))
    if missing:
        raise PointAvatarError(
            f"Weight file {path} lacks the keys {['features.' + k for k in missing]}; it is not a "
            "torchvision-format file for this network. Fetch the original file again."
        )
    features.load_state_dict({k: sub[k] for k in expected}, strict=True)


class VGGPerceptualLoss(nn.Module):
    """Sum over the VGG16 slices of the mean absolute feature difference (spec §6).

    Inputs are images [B, 3, H, W] in [0, 1] (RGB). They are normalised with the ImageNet mean/std and
    then bilinearly resized to 224x224 (align_corners=False), in that order, as the original. The network
    is frozen and stays in eval mode; gradients flow to the inputs only.
    """

    def __init__(
        self,
        features: nn.Sequential | None = None,
        weight_path: str | Path | None = None,
        slices: Sequence[tuple[int, int]] = VGG_SLICES,
        resize: bool = True,
    ) -> None:
        super().__init__()
        if features is None:
            features = load_vgg16_features(weight_path)
        self.blocks = nn.ModuleList([features[a:b] for a, b in slices])
        for p in self.blocks.parameters():
            p.requires_grad_(False)
        self.resize = resize
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.eval()

    def train(self, mode: bool = True) -> VGGPerceptualLoss:
        # Frozen feature extractor: stays in eval mode even when the owning Loss is put in train mode.
        return super().train(False)

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """pred, target: [B, 3, H, W] in [0, 1] -> scalar loss."""
        mean = self.mean.to(pred)
        std = self.std.to(pred)
        x = (pred - mean) / std
        y = (target - mean) / std
        if self.resize:
            x = F.interpolate(x, size=(224, 224), mode="bilinear", align_corners=False)
            y = F.interpolate(y, size=(224, 224), mode="bilinear", align_corners=False)
        loss = pred.new_zeros(())
        for block in self.blocks:
            x = block(x)
            y = block(y)
            loss = loss + (x - y).abs().mean()
        return loss
