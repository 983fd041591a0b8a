"""LPIPS v0.1 with the AlexNet backbone (Zhang et al., CVPR 2018), without torchvision or the lpips package.

The paper's metric (spec §8) is `lpips.LPIPS(net='alex')` (version 0.1) called with `normalize=True`.
We rebuild it from its definition:
    d(x, y) = sum_l mean_{h,w} w_l . (f_l(x)/|f_l(x)| - f_l(y)/|f_l(y)|)^2
where f_l are AlexNet's relu1..relu5 activations of the inputs after the LPIPS scaling layer, the
normalisation is per pixel over channels (eps 1e-10), and w_l are the learned non-negative 1x1 conv
weights of the v0.1 "lin" heads.

Two weight files are needed, both in torch's formats, and nothing is downloaded at run time:
- `alexnet-owt-7be5be79.pth` (torchvision's ImageNet AlexNet; keys features.{0,3,6,8,10}.{weight,bias});
- the v0.1 linear heads (`lpips/weights/v0.1/alex.pth` of the lpips package; keys
  lin{0..4}.model.1.weight of shapes [1, C, 1, 1], C = 64, 192, 384, 256, 256), which we look for as
  `lpips_v0.1_alex.pth` in the torch hub checkpoint folder, or inside an installed lpips package.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch
from torch import nn

from pointavatar.engine.weights import locate_weight_file

ALEXNET_FILE = "alexnet-owt-7be5be79.pth"
ALEXNET_URL = "https://download.pytorch.org/models/alexnet-owt-7be5be79.pth"
LPIPS_HEAD_FILE = "lpips_v0.1_alex.pth"
LPIPS_HEAD_URL = "https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1/alex.pth"

LPIPS_CHANNELS = (64, 192, 384, 256, 256)
# The relu1..relu5 taps: AlexNet features are split after modules 1, 4, 7, 9 and 11.
_ALEX_SLICES = ((0, 2), (2, 5), (5, 8), (8, 10), (10, 12))


def make_alexnet_features() -> nn.Sequential:
    """torchvision's AlexNet `features` (conv modules at indices 0, 3, 6, 8, 10)."""
    return nn.Sequential(
        nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(64, 192, kernel_size=5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(kernel_size=3, stride=2),
        nn.Conv2d(192, 384, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.Conv2d(384, 256, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.Conv2d(256, 256, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(kernel_size=3, stride=2),
    )


class _LinHead(nn.Module):
    """1x1 conv C -> 1 without bias; `model.1.weight` as in lpips (index 0 is its dropout, inactive in eval)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Dropout(), nn.Conv2d(channels, 1, kernel_size=1, bias=False))


def _unit_normalize(feat: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Divide each pixel's feature vector by its L2 norm over channels (feat [B, C, H, W])."""
    return feat / (torch.sqrt((feat * feat).sum(dim=1, keepdim=True)) + eps)


class LPIPSAlex(nn.Module):
    """LPIPS v0.1 distance with the AlexNet backbone; frozen, always in eval mode.

    Attribute names mirror the weight files: `features.*` loads torchvision's AlexNet features and
    `lin{0..4}.model.1.weight` load the lpips v0.1 heads.
    """

    def __init__(self) -> None:
        super().__init__()
        self.features = make_alexnet_features()
        for i, c in enumerate(LPIPS_CHANNELS):
            self.add_module(f"lin{i}", _LinHead(c))
        self.register_buffer(
            "shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1), persistent=False
        )
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1), persistent=False)
        for p in self.parameters():
            p.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> LPIPSAlex:
        return super().train(False)

    def load_backbone_state(self, state: dict) -> None:
        """Load torchvision's AlexNet state dict (its `classifier.*` keys are ignored)."""
        sub = {k[len("features.") :]: v for k, v in state.items() if k.startswith("features.")}
        self.features.load_state_dict(sub, strict=True)

    def load_head_state(self, state: dict) -> None:
        """Load the lpips v0.1 head state dict (keys lin{i}.model.1.weight; other keys are ignored)."""
        heads = {k: v for k, v in state.items() if k.startswith("lin")}
        expected = {f"lin{i}.model.1.weight" for i in range(len(LPIPS_CHANNELS))}
        missing = expected - set(heads)
        if missing:
            raise KeyError(f"LPIPS head state dict lacks {sorted(missing)}")
        for i in range(len(LPIPS_CHANNELS)):
            getattr(self, f"lin{i}").load_state_dict({"model.1.weight": heads[f"lin{i}.model.1.weight"]})

    def forward(self, x: torch.Tensor, y: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """x, y: [B, 3, H, W] in [-1, 1] (or [0, 1] with normalize=True) -> distance [B, 1, 1, 1]."""
        if normalize:
            x = 2 * x - 1
            y = 2 * y - 1
        shift, scale = self.shift.to(x), self.scale.to(x)
        hx = (x - shift) / scale
        hy = (y - shift) / scale
        total = x.new_zeros(x.shape[0], 1, 1, 1)
        for i, (a, b) in enumerate(_ALEX_SLICES):
            block = self.features[a:b]
            hx = block(hx)
            hy = block(hy)
            diff = (_unit_normalize(hx) - _unit_normalize(hy)) ** 2
            lin = getattr(self, f"lin{i}").model
            total = total + lin(diff).mean(dim=(2, 3), keepdim=True)
        return total


def lpips_head_candidates() -> list[Path]:
    """Extra places for the v0.1 head file: inside an installed lpips package (found, not imported)."""
    try:
        spec = importlib.util.find_spec("lpips")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        return []
    return [Path(loc) / "weights" / "v0.1" / "alex.pth" for loc in spec.submodule_search_locations]


def missing_lpips_message() -> str | None:
    """None when both LPIPS weight files are found, else one short line naming the missing files and the fix."""
    missing = []
    alex, alex_checked = locate_weight_file(ALEXNET_FILE)
    if alex is None:
        missing.append(ALEXNET_FILE)
    head, _ = locate_weight_file(LPIPS_HEAD_FILE, lpips_head_candidates())
    if head is None:
        missing.append(LPIPS_HEAD_FILE)
    if not missing:
        return None
    return (
        f"LPIPS weights not found ({', '.join(missing)} in {alex_checked[0].parent}): "
        "get them with `bash download_data.bash weights`."
    )


_WARNED: set[str] = set()


def load_lpips_alex(device: torch.device | str = "cpu", warn: bool = True) -> LPIPSAlex | None:
    """The LPIPS(alex, v0.1) module with both weight files loaded, on `device`; None if a file is missing.

    When a file is missing and `warn` is True, ONE warning (per process and set of missing files) names
    the missing files and how to get them; the caller then reports LPIPS as NaN.
    """
    message = missing_lpips_message()
    if message is not None:
        # Once per process and message: the test runner and evaluate_folder may both ask.
        if warn and message not in _WARNED:
            _WARNED.add(message)
            # One short line on stderr, not a UserWarning with a source line (read on every eval run).
            print(f"warning: {message} LPIPS is reported as NaN.", file=sys.stderr)
        return None
    alex, _ = locate_weight_file(ALEXNET_FILE)
    head, _ = locate_weight_file(LPIPS_HEAD_FILE, lpips_head_candidates())
    assert alex is not None and head is not None
    net = LPIPSAlex()
    net.load_backbone_state(torch.load(alex, map_location="cpu", weights_only=True))
    net.load_head_state(torch.load(head, map_location="cpu", weights_only=True))
    return net.to(device)
