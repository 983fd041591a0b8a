"""Loss terms (spec §6) against hand computations, and the VGG16 perceptual loss module."""

from __future__ import annotations

import dataclasses
import types

import pytest
import torch
from tolerances import assert_close
from torch import nn

from pointavatar.config import LossConf
from pointavatar.errors import PointAvatarError
from pointavatar.model import PointAvatarOutputs
from pointavatar.train import vgg as vgg_mod
from pointavatar.train.losses import LOSS_KEYS, Loss, flame_prior_targets
from pointavatar.train.vgg import VGG16_FILE, VGGPerceptualLoss, load_features_state, make_vgg16_features

# float64 inputs: every comparison below is exact up to summation order, hence the 1e-12 tolerances.
TOL = dict(rtol=1e-12, atol=1e-12)


def conf(mask=1.0, lbs=10.0, eik=0.1, sdf=1.0, vgg=0.0):
    return LossConf(
        mask_weight=mask,
        lbs_weight=lbs,
        eikonal_weight=eik,
        sdf_consistency_weight=sdf,
        vgg_feature_weight=vgg,
    )


def make_batch(j=6, b=2, res=4, n=5, v=7, seed=0):
    """(training outputs, ground truth, FLAME buffers) of random float64 values."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.rand(*shape, generator=g, dtype=torch.float64)

    p = res * res
    rgb, mask, sdf, grads = r(b, p, 3), r(b, p), r(n) - 0.5, r(2 * n, 3) * 2 - 1
    lbs, posedirs, shapedirs = r(n, j), r(n, 36, 3) * 0.1, r(n, 3, 50) * 0.1
    index_batch = torch.randint(0, v, (n,), generator=g)
    flame = types.SimpleNamespace(
        lbs_weights=r(v, 5), posedirs=r(36, 3 * v) * 0.1, shapedirs=r(v, 3, 150) * 0.1
    )
    outputs = PointAvatarOutputs(
        img_res=res,
        rgb_image=rgb,
        predicted_mask=mask,
        canonical_points=r(n, 3),
        posedirs=posedirs,
        shapedirs=shapedirs,
        lbs_weights=lbs,
        sdf_values=sdf,
        grad_thetas=grads,
        index_batch=index_batch,
    )
    gt = {"rgb": r(b, p, 3), "object_mask": r(b, p)}
    return outputs, gt, flame


def test_flame_prior_targets_by_hand():
    outputs, _, flame = make_batch(j=6)
    idx = outputs.index_batch
    w, p, e = flame_prior_targets(idx, flame.lbs_weights, flame.posedirs, flame.shapedirs, 6)
    for i, vi in enumerate(idx.tolist()):
        assert w[i, 0] == 0  # ghost bone column
        assert_close(w[i, 1:], flame.lbs_weights[vi], **TOL)
        for k in range(36):
            for c in range(3):
                # FLAME layout: posedirs row k holds (vertex, xyz) flattened vertex-major.
                assert p[i, k, c] == flame.posedirs[k, 3 * vi + c]
        assert_close(e[i], flame.shapedirs[vi, :, 100:150], **TOL)
    w5, _, _ = flame_prior_targets(idx, flame.lbs_weights, flame.posedirs, flame.shapedirs, 5)
    assert_close(w5, flame.lbs_weights[idx], **TOL)


@pytest.mark.parametrize("ghost", [True, False])
@pytest.mark.parametrize("use_var", [True, False])
def test_each_term_and_total_by_hand(ghost, use_var):
    j = 6 if ghost else 5
    outputs, gt, flame = make_batch(j=j)
    var = torch.rand(1, 50, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) + 0.5
    c = conf(mask=0.7, lbs=3.0, eik=0.2, sdf=1.5)
    loss = Loss(c, var_expression=var if use_var else None)
    out = loss(outputs, gt, flame=flame, lbs_weight=c.lbs_weight)

    rgb = (outputs.rgb_image - gt["rgb"]).abs().sum() / outputs.rgb_image.numel()
    mask = (outputs.predicted_mask - gt["object_mask"]).abs().sum() / gt["object_mask"].numel()
    sdf = (outputs.sdf_values**2).sum() / outputs.sdf_values.numel()
    norms = torch.sqrt((outputs.grad_thetas**2).sum(dim=1))
    eik = ((norms - 1) ** 2).sum() / norms.numel()

    idx = outputs.index_batch
    n = idx.shape[0]
    lbs_sum = pp_sum = e_sum = 0.0
    for i in range(n):
        vi = int(idx[i])
        w_gt = flame.lbs_weights[vi]
        if ghost:
            w_gt = torch.cat([torch.zeros(1, dtype=torch.float64), w_gt])
        lbs_sum += ((outputs.lbs_weights[i] - w_gt) ** 2).sum()
        for k in range(36):
            for cc in range(3):
                d = 10 * outputs.posedirs[i, k, cc] - 10 * flame.posedirs[k, 3 * vi + cc]
                pp_sum += d**2
        for cc in range(3):
            for k in range(50):
                d = 10 * outputs.shapedirs[i, cc, k] - 10 * flame.shapedirs[vi, cc, 100 + k]
                e_sum += d**2 / (50 * var[0, k]) if use_var else d**2
    lbs = lbs_sum / (n * j)
    pp = pp_sum / (n * 108)
    ee = e_sum / (n * 150)

    assert_close(out["rgb_loss"], rgb, **TOL)
    assert_close(out["mask_loss"], mask, **TOL)
    assert_close(out["sdf_consistency"], sdf, **TOL)
    assert_close(out["eikonal"], eik, **TOL)
    assert_close(out["lbs_loss"], lbs, **TOL)
    assert_close(out["posedirs_loss"], pp, **TOL)
    assert_close(out["shapedirs_loss"], ee, **TOL)
    assert float(out["vgg_loss"]) == 0.0  # disabled (weight 0)
    total = rgb + 0.7 * mask + 1.5 * sdf + 0.2 * eik + 3.0 * (0.1 * lbs + 10 * pp + 10 * ee)
    assert_close(out["loss"], total, **TOL)
    assert set(out) == set(LOSS_KEYS) | {"loss"}


def test_lbs_weight_is_given_per_call_and_used():
    outputs, gt, flame = make_batch()
    loss = Loss(conf(lbs=10.0))
    a = loss(outputs, gt, flame=flame, lbs_weight=10.0)
    b = loss(outputs, gt, flame=flame, lbs_weight=10.0 * 0.5)  # the weight after a milestone
    prior = 0.1 * a["lbs_loss"] + 10 * a["posedirs_loss"] + 10 * a["shapedirs_loss"]
    assert_close(a["loss"] - b["loss"], 5.0 * prior, rtol=1e-10, atol=1e-12)
    c = loss(outputs, gt, flame=None, lbs_weight=0.0)  # no FLAME needed without the prior
    assert float(c["lbs_loss"]) == 0.0
    assert_close(c["loss"], a["loss"] - 10.0 * prior, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="FLAME"):
        loss(outputs, gt, flame=None, lbs_weight=1.0)
    eval_like = dataclasses.replace(outputs, index_batch=None)  # eval forwards skip the 1-NN
    with pytest.raises(ValueError, match="training mode"):
        loss(eval_like, gt, flame=flame, lbs_weight=1.0)


def test_gradients_flow():
    outputs, gt, flame = make_batch()
    outputs.rgb_image.requires_grad_(True)
    outputs.lbs_weights.requires_grad_(True)
    out = Loss(conf())(outputs, gt, flame=flame, lbs_weight=10.0)
    out["loss"].backward()
    assert outputs.rgb_image.grad is not None and outputs.lbs_weights.grad is not None


class _MeanAbs(nn.Module):
    def forward(self, x, y):
        self.last_shapes = (tuple(x.shape), tuple(y.shape))
        return (x - y).abs().mean()


def test_vgg_term_injected_module_and_weighting():
    outputs, gt, _ = make_batch(res=4, b=2)
    fake = _MeanAbs()
    loss = Loss(conf(vgg=0.1, lbs=0.0, sdf=0.0, eik=0.0, mask=0.0), vgg=fake)
    out = loss(outputs, gt, flame=None, lbs_weight=0.0)
    assert fake.last_shapes == ((2, 3, 4, 4), (2, 3, 4, 4))
    assert_close(out["vgg_loss"], out["rgb_loss"], **TOL)  # same pixels, same mean
    assert_close(out["loss"], out["rgb_loss"] * 1.1, **TOL)


def random_torchvision_vgg16_state(seed=0):
    """A state dict with the key names and shapes of torchvision's vgg16-397923af.pth."""
    g = torch.Generator().manual_seed(seed)
    cfg = [(0, 3, 64), (2, 64, 64), (5, 64, 128), (7, 128, 128), (10, 128, 256), (12, 256, 256),
           (14, 256, 256), (17, 256, 512), (19, 512, 512), (21, 512, 512), (24, 512, 512), (26, 512, 512),
           (28, 512, 512)]  # fmt: skip
    state = {}
    for i, cin, cout in cfg:
        state[f"features.{i}.weight"] = torch.randn(cout, cin, 3, 3, generator=g) * (2.0 / (9 * cin)) ** 0.5
        state[f"features.{i}.bias"] = torch.zeros(cout)
    # The classifier head is in the real file; we ignore it. Small stand-ins keep the test light.
    state["classifier.0.weight"] = torch.zeros(2, 2)
    state["classifier.0.bias"] = torch.zeros(2)
    return state


def test_vgg_loads_torchvision_state_dict_and_behaves(tmp_path):
    torch.manual_seed(0)
    state = random_torchvision_vgg16_state()
    path = tmp_path / VGG16_FILE
    torch.save(state, path)
    feats = vgg_mod.load_vgg16_features(path)
    assert_close(feats[28].weight, state["features.28.weight"], rtol=0, atol=0)
    assert [i for i, m in enumerate(feats) if isinstance(m, nn.Conv2d)] == [
        0,
        2,
        5,
        7,
        10,
        12,
        14,
        17,
        19,
        21,
        24,
        26,
        28,
    ]

    ploss = VGGPerceptualLoss(features=feats)
    ploss.train()
    assert not ploss.training  # frozen extractor stays in eval mode
    assert all(not p.requires_grad for p in ploss.parameters())
    x = torch.rand(1, 3, 32, 32)
    y = torch.rand(1, 3, 32, 32)
    assert float(ploss(x, x.clone())) == 0.0
    xg = x.clone().requires_grad_(True)
    d = ploss(xg, y)
    assert float(d.detach()) > 0
    d.backward()
    assert xg.grad is not None and xg.grad.abs().sum() > 0


def test_vgg_slices_match_manual_forward():
    torch.manual_seed(1)
    feats = make_vgg16_features()
    load_features_state(feats, random_torchvision_vgg16_state(1))
    ploss = VGGPerceptualLoss(features=feats)
    x, y = torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 16)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    a = nn.functional.interpolate((x - mean) / std, size=(224, 224), mode="bilinear", align_corners=False)
    b = nn.functional.interpolate((y - mean) / std, size=(224, 224), mode="bilinear", align_corners=False)
    expected = 0.0
    for lo, hi in ((0, 4), (4, 9), (9, 16), (16, 23)):
        for k in range(lo, hi):
            a, b = feats[k](a), feats[k](b)
        expected = expected + (a - b).abs().mean()
    # float32 conv stacks evaluated in the same order: only summation-order noise (observed: exact).
    assert_close(ploss(x, y), expected, atol=1e-7)


def test_missing_vgg_file_message(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    with pytest.raises(PointAvatarError) as err:
        Loss(conf(vgg=0.1))
    msg = str(err.value)
    assert VGG16_FILE in msg
    assert "loss.vgg_feature_weight = 0" in msg
    assert "download_data.bash" in msg and "https://download.pytorch.org/models/vgg16-397923af.pth" in msg
    assert str(tmp_path / "hub" / "checkpoints") in msg and str(tmp_path / "th" / "checkpoints") in msg
    # Weight 0: no file needed.
    assert Loss(conf(vgg=0.0)).vgg is None


def test_vgg_file_found_in_hub_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.delenv("TORCH_HOME", raising=False)
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(random_torchvision_vgg16_state(), tmp_path / "hub" / "checkpoints" / VGG16_FILE)
    loss = Loss(conf(vgg=0.1))
    assert isinstance(loss.vgg, VGGPerceptualLoss)
    outputs, gt, flame = make_batch(res=8, b=1)
    outputs32 = dataclasses.replace(
        outputs,
        **{
            f.name: getattr(outputs, f.name).float()
            for f in dataclasses.fields(outputs)
            if torch.is_tensor(getattr(outputs, f.name)) and getattr(outputs, f.name).is_floating_point()
        },
    )
    flame32 = types.SimpleNamespace(**{k: v.float() for k, v in vars(flame).items()})
    out = loss(outputs32, {k: v.float() for k, v in gt.items()}, flame=flame32, lbs_weight=10.0)
    assert float(out["vgg_loss"]) > 0


def test_accepts_the_config_dataclass():
    loss = Loss(LossConf(vgg_feature_weight=0.0))
    lc = loss.conf
    assert (lc.mask_weight, lc.lbs_weight, lc.eikonal_weight, lc.sdf_consistency_weight) == (
        1.0,
        10.0,
        0.1,
        1.0,
    )
    outputs, gt, flame = make_batch()
    assert torch.isfinite(loss(outputs, gt, flame=flame, lbs_weight=lc.lbs_weight)["loss"])


def test_constant_expression_dimension_keeps_the_prior_finite():
    outputs, gt, flame = make_batch()
    var = torch.rand(1, 50, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) + 0.5
    var[0, 4] = 0.0  # e.g. a blink that never happens in the training frames
    with pytest.warns(UserWarning, match=r"\[4\].*use_var_expression = False"):
        loss = Loss(conf(), var_expression=var)
    out = loss(outputs, gt, flame=flame, lbs_weight=10.0)
    assert torch.isfinite(out["shapedirs_loss"]) and torch.isfinite(out["loss"])
    # The constant dimension is weighted like the least-varying of the others.
    assert float(loss.var_expression[0, 4]) == pytest.approx(float(var[0, torch.arange(50) != 4].min()))
    assert torch.equal(loss.var_expression[0, 5:], var[0, 5:])
