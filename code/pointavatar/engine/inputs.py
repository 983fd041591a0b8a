"""Per-frame learnable inputs: FLAME expression, FLAME pose and camera translation (spec §2.6, §2.9).

One ``FrameInputs`` holds the three sparse embeddings of a dataset (training frames, or test frames
for test-time tracking) and swaps them into a collated batch in place of the JSON values.
"""

from __future__ import annotations

import torch
from torch import nn

from .checkpoints import inputs_state


class FrameInputs(nn.Module):
    """Learnable per-frame expression [F, E], FLAME pose [F, 15] and camera translation [F, 3].

    The camera translation is the one of the *converted* camera (spec §3.5), i.e. ``cam_pose[:, :, 3]``
    of the dataset; the rotation always stays at the dataset value.
    """

    def __init__(self, dataset, num_exp: int, optimize_expression: bool, optimize_camera: bool):
        super().__init__()
        data = dataset.data
        expression = data["expressions"].float()  # [F, 50]
        if num_exp > expression.shape[1]:
            # The original fills the columns past FLAME's 50 with N(0, 1).
            extra = torch.randn(expression.shape[0], num_exp - expression.shape[1])
            expression = torch.cat([expression, extra], dim=1)
        self.expression = self._embedding(expression[:, :num_exp]) if optimize_expression else None
        self.flame_pose = self._embedding(data["flame_pose"].float()) if optimize_camera else None
        self.camera_pose = self._embedding(data["world_mats"][:, :3, 3].float()) if optimize_camera else None

    @staticmethod
    def _embedding(init: torch.Tensor) -> nn.Embedding:
        emb = nn.Embedding(init.shape[0], init.shape[1], sparse=True)
        with torch.no_grad():
            emb.weight.copy_(init)
        return emb

    @property
    def enabled(self) -> bool:
        return self.expression is not None or self.flame_pose is not None

    def set_trainable(self, flag: bool) -> None:
        """Turn gradients on or off, so that no gradient piles up while the inputs are frozen."""
        for p in self.parameters():
            p.requires_grad_(flag)

    def apply(self, model_input: dict) -> dict:
        """Return a copy of a collated batch with the learnable values swapped in (spec §2.5 step 7.2)."""
        idx = model_input["idx"].reshape(-1)
        out = dict(model_input)
        if self.expression is not None:
            out["expression"] = self.expression(idx)
        if self.flame_pose is not None:
            out["flame_pose"] = self.flame_pose(idx)
        if self.camera_pose is not None:
            cam = model_input["cam_pose"]
            out["cam_pose"] = torch.cat([cam[:, :3, :3], self.camera_pose(idx).unsqueeze(-1)], dim=-1)
        return out

    def make_optimizer(self, lr: float) -> torch.optim.Optimizer:
        return torch.optim.SparseAdam(list(self.parameters()), lr=lr)

    def state(self) -> dict:
        return inputs_state(self.expression, self.flame_pose, self.camera_pose)

    def load_state(self, payload: dict) -> None:
        """Load an (Test)InputParameters payload; raises ValueError on a size mismatch."""
        for key, emb in (
            ("expression_state_dict", self.expression),
            ("flame_pose_state_dict", self.flame_pose),
            ("camera_pose_state_dict", self.camera_pose),
        ):
            if emb is None or payload.get(key) is None:
                continue
            weight = payload[key]["weight"]
            if weight.shape != emb.weight.shape:
                raise ValueError(f"{key}: stored {tuple(weight.shape)}, expected {tuple(emb.weight.shape)}")
            with torch.no_grad():
                emb.weight.copy_(weight)
