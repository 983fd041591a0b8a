"""Per-point deformation fields: blendshapes, pose correctives, skinning weights, offset (spec §5.4)."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils.parametrizations import weight_norm as _weight_norm

from pointavatar.config import DeformerNetworkConf
from pointavatar.model.embedder import PositionalEncoding

N_POSE_FEATURES = 36  # (R_j - I) of FLAME joints 1..4, flattened (spec §4.4)
SKINNING_TEMPERATURE = 20.0  # W = softmax(20 * logits), hard-coded in the original (spec §10.4)


class ForwardDeformer(nn.Module):
    """D(x) -> (E [N, 3, num_exp], P [N, 36, 3], W [N, J], x' = x + o(x)).

    Holds a reference to the FLAME module ``flame`` as ``FLAMEServer`` (registered first, as in the
    original), so its buffers appear a second time in the state dict under
    ``deformer_network.FLAMEServer.*`` (spec Appendix A, §10.14); ``flame=None`` (tests) leaves it out.
    ``conf`` is the ``model.deformer_network`` block.

    Trunk ``lin0..`` with Softplus(beta=100) after each layer; zero-initialised ``blendshapes`` head
    (no weight norm) whose 108 + 3*num_exp (+3) outputs are sliced into P, E and o; skinning branch
    ``skinning_linear`` (weight norm, Softplus) then a zero-initialised ``skinning`` head. At init
    E = P = o = 0 and W is uniform.
    """

    def __init__(self, conf: DeformerNetworkConf, flame: nn.Module | None):
        super().__init__()
        if flame is not None:
            self.FLAMEServer = flame
        self.num_exp = int(conf.num_exp)
        self.deform_c = bool(conf.deform_c)
        self.ghostbone = bool(conf.ghostbone)
        self.num_bones = 6 if self.ghostbone else 5
        weight_norm = conf.weight_norm
        self.embed = PositionalEncoding(conf.multires, conf.d_in)
        dims = [self.embed.out_dim] + list(conf.dims)
        self.num_layers = len(dims)
        for l in range(self.num_layers - 1):
            lin = nn.Linear(dims[l], dims[l + 1])
            with torch.no_grad():
                nn.init.constant_(lin.bias, 0.0)
                nn.init.normal_(lin.weight, 0.0, math.sqrt(2) / math.sqrt(dims[l + 1]))
            if weight_norm:
                lin = _weight_norm(lin, name="weight", dim=0)
            setattr(self, f"lin{l}", lin)
        self.softplus = nn.Softplus(beta=100)

        self.n_posedirs = N_POSE_FEATURES * 3
        self.n_shapedirs = 3 * self.num_exp
        d_out = self.n_posedirs + self.n_shapedirs + (3 if self.deform_c else 0)
        self.blendshapes = nn.Linear(dims[-1], d_out)
        nn.init.zeros_(self.blendshapes.weight)
        nn.init.zeros_(self.blendshapes.bias)

        self.skinning_linear = nn.Linear(dims[-1], dims[-1])
        with torch.no_grad():
            nn.init.constant_(self.skinning_linear.bias, 0.0)
            nn.init.normal_(self.skinning_linear.weight, 0.0, math.sqrt(2) / math.sqrt(dims[-1]))
        if weight_norm:
            self.skinning_linear = _weight_norm(self.skinning_linear, name="weight", dim=0)
        self.skinning = nn.Linear(dims[-1], self.num_bones)
        nn.init.zeros_(self.skinning.weight)
        nn.init.zeros_(self.skinning.bias)

    def query_weights(
        self, pnts_c: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """pnts_c [N, 3] canonical points (x_c space) ->

        shapedirs E [N, 3, num_exp] (row xyz, column expression), posedirs P [N, 36, 3] (row pose
        feature, column xyz), lbs_weights W [N, J] summing to 1, pnts_c_flame x' [N, 3] (= x + o(x)
        with deform_c, else x) in FLAME canonical space.
        """
        h = self.embed(pnts_c)
        for l in range(self.num_layers - 1):
            h = self.softplus(getattr(self, f"lin{l}")(h))
        blend = self.blendshapes(h)  # [N, 108 + 3 E (+3)]
        posedirs = blend[:, : self.n_posedirs].reshape(-1, N_POSE_FEATURES, 3)
        shapedirs = blend[:, self.n_posedirs : self.n_posedirs + self.n_shapedirs].reshape(
            -1, 3, self.num_exp
        )
        logits = self.skinning(self.softplus(self.skinning_linear(h)))
        # The original computes exp(20 z) / sum exp(20 z) without max subtraction; softmax gives the
        # same values without overflow (spec §10.18).
        lbs_weights = torch.softmax(SKINNING_TEMPERATURE * logits, dim=-1)
        pnts_c_flame = pnts_c + blend[:, -3:] if self.deform_c else pnts_c
        return shapedirs, posedirs, lbs_weights, pnts_c_flame

    def forward(self, pnts_c: torch.Tensor):
        """Same as :meth:`query_weights`."""
        return self.query_weights(pnts_c)
