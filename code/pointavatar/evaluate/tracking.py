"""Test-time tracking (spec §2.9): fit per-frame expression, pose and camera translation to the test
images with the model frozen, so that the metrics measure the avatar rather than the tracker's JSON.
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..engine.batching import move_to
from ..engine.inputs import FrameInputs
from ..model import PointAvatar, PointAvatarOutputs


def tracking_loss(outputs: PointAvatarOutputs, ground_truth: dict) -> torch.Tensor:
    """The tracking objective: mean |pred - gt| over B*P*3 of the RGB images alone, as a scalar tensor.

    outputs.rgb_image and ground_truth["rgb"] are [B, P, 3], composited over the same background.
    """
    if "rgb" not in ground_truth:
        raise KeyError("tracking_loss: `ground_truth` has no entry 'rgb' (tracking needs the test images)")
    return (outputs.rgb_image.reshape(-1, 3) - ground_truth["rgb"].reshape(-1, 3)).abs().mean()


def track(
    model: PointAvatar,
    inputs: FrameInputs,
    loader: DataLoader,
    device: torch.device,
    learning_rate: float,
    steps: int,
) -> None:
    """Optimise ``inputs`` (SparseAdam at ``learning_rate``) for ``steps`` iterations per batch of
    ``loader``; the model runs in eval mode and its parameters get no gradient. ``inputs`` is left
    frozen afterwards; the model's ``requires_grad`` flags are restored.
    """
    model.eval()
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:  # the model is not updated; its gradients are not needed
        p.requires_grad_(False)
    inputs.set_trainable(True)
    optimizer = inputs.make_optimizer(learning_rate)
    try:
        for _, model_input, ground_truth in tqdm(loader, desc="tracking", dynamic_ncols=True):
            model_input = move_to(model_input, device)
            ground_truth = move_to(ground_truth, device)
            for _ in range(steps):
                outputs = model(inputs.apply(model_input))
                loss = tracking_loss(outputs, ground_truth)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
    finally:
        for p in frozen:
            p.requires_grad_(True)
        inputs.set_trainable(False)
