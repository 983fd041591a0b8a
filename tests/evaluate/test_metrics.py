"""Metrics of spec §8: per-frame values, the folder protocol, and our LPIPS(alex) module."""

from __future__ import annotations

import csv
import json
import math
import warnings

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from scipy.signal import convolve2d
from tolerances import assert_close

from pointavatar.evaluate import lpips as lp
from pointavatar.evaluate.metrics import RESULT_KEYS, compute_metrics, evaluate_folder, ssim


def ssim_reference(a: np.ndarray, b: np.ndarray) -> float:
    """Independent float64 SSIM: 11x11 Gaussian (sigma 1.5), 'valid' filtering, L = 1; a, b [C, H, W]."""
    x = np.arange(11) - 5
    g = np.exp(-(x**2) / (2 * 1.5**2))
    g /= g.sum()
    win = np.outer(g, g)  # symmetric, so convolution == correlation
    c1, c2 = 0.01**2, 0.03**2
    maps = []
    for ch in range(a.shape[0]):
        p, q = a[ch], b[ch]

        def f(img):
            return convolve2d(img, win, mode="valid")

        mu1, mu2 = f(p), f(q)
        s1 = f(p * p) - mu1**2
        s2 = f(q * q) - mu2**2
        s12 = f(p * q) - mu1 * mu2
        maps.append(((2 * mu1 * mu2 + c1) * (2 * s12 + c2)) / ((mu1**2 + mu2**2 + c1) * (s1 + s2 + c2)))
    return float(np.mean(maps))


def test_ssim_identical_is_one_and_matches_reference():
    rng = np.random.default_rng(0)
    a = rng.random((3, 24, 20))
    b = np.clip(a + 0.1 * rng.standard_normal(a.shape), 0, 1)
    ta, tb = torch.from_numpy(a)[None], torch.from_numpy(b)[None]
    # float64 end to end: agreement to rounding.
    assert float(ssim(ta, ta)[0]) == pytest.approx(1.0, abs=1e-12)
    assert float(ssim(ta, tb)[0]) == pytest.approx(ssim_reference(a, b), abs=1e-10)
    # float32 (what evaluate_folder uses): rounding of the E[x^2] - mu^2 variances, ~1e-5.
    assert float(ssim(ta.float(), tb.float())[0]) == pytest.approx(ssim_reference(a, b), abs=1e-4)


def test_plain_metrics_by_hand():
    pred = torch.zeros(1, 3, 12, 12, dtype=torch.float64)
    gt = torch.zeros_like(pred)
    gt[..., :6, :] = 0.5  # half the pixels differ by 0.5
    m = compute_metrics(pred, gt)
    # float64 on values exact in binary: equal up to rounding.
    assert m["mse"] == pytest.approx(0.125, abs=1e-15)
    assert m["mae"] == pytest.approx(0.25, abs=1e-15)
    assert m["rmse"] == pytest.approx(math.sqrt(0.125), abs=1e-15)
    assert m["psnr"] == pytest.approx(20 * math.log10(1 / (math.sqrt(0.125) + 1e-8)), abs=1e-12)
    assert math.isnan(m["lpips"])
    same = compute_metrics(gt, gt)
    assert same["mse"] == 0 and same["ssim"] == pytest.approx(1.0, abs=1e-12)
    assert same["psnr"] == pytest.approx(160.0, abs=1e-9)  # 20 log10(1 / 1e-8)


def test_masked_metrics_divide_by_full_count():
    rng = np.random.default_rng(1)
    pred = torch.from_numpy(rng.random((1, 3, 16, 16)))
    gt = torch.from_numpy(rng.random((1, 3, 16, 16)))
    mask = torch.zeros(1, 1, 16, 16, dtype=torch.float64)
    mask[..., 4:12, 2:10] = 0.75  # soft, 64 of 256 pixels
    m = compute_metrics(pred, gt, mask=mask)
    d = (pred - gt).numpy()
    mk = mask.numpy()
    mse = float((mk * d**2).sum() / (3 * 256))
    # float64, the same sums in another order.
    assert m["mse"] == pytest.approx(mse, rel=1e-12)
    assert m["mae"] == pytest.approx(float((mk * np.abs(d)).sum() / (3 * 256)), rel=1e-12)
    assert m["psnr"] == pytest.approx(20 * math.log10(1 / (math.sqrt(mse) + 1e-8)), rel=1e-12)
    keep = (mk[0] != 0).repeat(3, 0)
    ref = ssim_reference(np.where(keep, pred.numpy()[0], 0), np.where(keep, gt.numpy()[0], 0))
    assert m["ssim"] == pytest.approx(ref, abs=1e-10)


def random_alexnet_state(seed=0):
    """Key names / shapes of torchvision's alexnet-owt-7be5be79.pth (classifier stand-ins are ignored)."""
    g = torch.Generator().manual_seed(seed)
    shapes = {
        0: (64, 3, 11, 11),
        3: (192, 64, 5, 5),
        6: (384, 192, 3, 3),
        8: (256, 384, 3, 3),
        10: (256, 256, 3, 3),
    }
    state = {}
    for i, s in shapes.items():
        fan_in = s[1] * s[2] * s[3]
        state[f"features.{i}.weight"] = torch.randn(*s, generator=g) * (2.0 / fan_in) ** 0.5
        state[f"features.{i}.bias"] = torch.rand(s[0], generator=g) * 0.1
    state["classifier.1.weight"] = torch.zeros(3, 3)
    return state


def random_lpips_head_state(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1, generator=g) * 0.1
        for i, c in enumerate(lp.LPIPS_CHANNELS)
    }


def install_lpips_weights(hub_dir):
    ck = hub_dir / "checkpoints"
    ck.mkdir(parents=True, exist_ok=True)
    torch.save(random_alexnet_state(), ck / lp.ALEXNET_FILE)
    torch.save(random_lpips_head_state(), ck / lp.LPIPS_HEAD_FILE)


@pytest.fixture
def empty_hub(tmp_path, monkeypatch):
    hub = tmp_path / "hub"
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(hub))
    monkeypatch.delenv("TORCH_HOME", raising=False)
    monkeypatch.setattr(lp, "lpips_head_candidates", lambda: [])  # ignore any installed lpips package
    return hub


def test_lpips_module_loads_and_matches_definition(empty_hub):
    install_lpips_weights(empty_hub)
    net = lp.load_lpips_alex("cpu")
    assert isinstance(net, lp.LPIPSAlex)
    assert_close(net.features[10].weight, random_alexnet_state()["features.10.weight"], rtol=0, atol=0)
    assert_close(net.lin4.model[1].weight, random_lpips_head_state()["lin4.model.1.weight"], rtol=0, atol=0)
    torch.manual_seed(0)
    x, y = torch.rand(2, 3, 64, 64), torch.rand(2, 3, 64, 64)
    assert torch.all(net(x, x, normalize=True) == 0)
    d = net(x, y, normalize=True)
    assert d.shape == (2, 1, 1, 1) and torch.all(d > 0)

    # Hand-written LPIPS: [0,1] -> [-1,1], scaling layer, relu1..5 taps, unit-normalise, 1x1, mean, sum.
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)
    a, b = ((2 * x - 1) - shift) / scale, ((2 * y - 1) - shift) / scale
    heads = random_lpips_head_state()
    expected = torch.zeros(2)
    taps = [1, 4, 7, 9, 11]
    k = 0
    for layer, tap in enumerate(taps):
        while k <= tap:
            a, b = net.features[k](a), net.features[k](b)
            k += 1
        na = a / (a.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        nb = b / (b.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        w = heads[f"lin{layer}.model.1.weight"].view(1, -1, 1, 1)
        expected = expected + ((na - nb) ** 2 * w).sum(1).mean(dim=(1, 2))
    # Same float32 operations in a different grouping: summation-order noise only (observed: exact).
    assert_close(d.view(-1), expected, atol=1e-7)


def test_lpips_missing_returns_none_with_one_short_warning_line(empty_hub, capsys):
    assert lp.load_lpips_alex("cpu") is None
    assert lp.load_lpips_alex("cpu") is None  # asked again (runner, then metrics): no second warning
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: LPIPS")
    msg = lines[0]
    assert lp.ALEXNET_FILE in msg and lp.LPIPS_HEAD_FILE in msg and "download_data.bash" in msg
    assert len(msg) < 250  # one readable line, not the paths of every folder searched


# -- evaluate_folder ------------------------------------------------------------------------------


def make_folder(tmp_path, res=32):
    """Two test frames: predictions 3.png/4.png (remapped to GT frames 1 and 2)."""
    rng = np.random.default_rng(5)
    gt_dir, out_dir = tmp_path / "data" / "MVI_test", tmp_path / "eval" / "epoch_7"
    for d in ("image", "mask", "semantic"):
        (gt_dir / d).mkdir(parents=True)
    (out_dir / "rgb_erode_dilate").mkdir(parents=True)
    frames = []
    raw = {}
    for m, n in ((1, 3), (2, 4)):
        img = rng.integers(0, 256, (res, res, 3), dtype=np.uint8)
        pred = rng.integers(0, 256, (res, res, 3), dtype=np.uint8)
        mask = np.zeros((res, res), np.uint8)
        mask[4:28, 6:26] = 255
        mask[10:12, 10:20] = 128  # soft values
        sem = np.zeros((res, res), np.uint8)
        sem[20:28, :] = 16
        sem[24:30, 0:8] = 15
        sem[2:6, 2:6] = 7
        iio.imwrite(gt_dir / "image" / f"{m}.png", img)
        # Frame 1 has a 1-channel mask, frame 2 a 3-channel one: both must work.
        iio.imwrite(gt_dir / "mask" / f"{m}.png", mask if m == 1 else np.repeat(mask[:, :, None], 3, 2))
        iio.imwrite(gt_dir / "semantic" / f"{m}.png", sem)
        iio.imwrite(out_dir / "rgb_erode_dilate" / f"{n}.png", pred)
        frames.append({"file_path": f"./image/{m}", "expression": [0.0] * 50})
        raw[m] = (pred, img, mask, sem)
    with open(gt_dir / "flame_params.json", "w") as f:
        json.dump({"frames": frames}, f)
    return out_dir, gt_dir, raw


def expected_values(raw, no_cloth):
    out = {}
    for m, (pred, img, mask, sem) in raw.items():
        p = pred.astype(np.float64).transpose(2, 0, 1) / 255
        g = img.astype(np.float64).transpose(2, 0, 1) / 255
        mk = mask.astype(np.float64)[None] / 255
        g = g * mk + (1 - mk)
        d = p - g
        if no_cloth:
            mk = np.where((sem == 15) | (sem == 16), 0.0, mk)
            mse = (mk * d**2).sum() / d.size
            mae = (mk * np.abs(d)).sum() / d.size
            keep = np.repeat(mk != 0, 3, 0)
            s = ssim_reference(np.where(keep, p, 0), np.where(keep, g, 0))
        else:
            mse, mae, s = (d**2).mean(), np.abs(d).mean(), ssim_reference(p, g)
        out[f"{m}.png"] = dict(mse=mse, mae=mae, ssim=s, psnr=20 * math.log10(1 / (math.sqrt(mse) + 1e-8)))
    return out


@pytest.mark.parametrize("no_cloth", [False, True])
def test_evaluate_folder_end_to_end(tmp_path, empty_hub, capsys, no_cloth):
    out_dir, gt_dir, raw = make_folder(tmp_path)
    means = evaluate_folder(out_dir, gt_dir, no_cloth=no_cloth, res=32)
    captured = capsys.readouterr()
    assert len([line for line in captured.err.splitlines() if "LPIPS" in line]) == 1  # once per folder
    printed = captured.out.strip().splitlines()
    assert len(printed) == 1 and "L1 (MAE)" in printed[0] and "LPIPS n/a" in printed[0]

    base = "results_no_cloth_rgb_erode_dilate" if no_cloth else "results_rgb_erode_dilate"
    npz = np.load(out_dir / f"{base}.npz")
    assert set(npz.files) == set(RESULT_KEYS)
    assert list(npz["filenames"]) == ["1.png", "2.png"]
    assert np.isnan(npz["perceptual_l"]).all() and math.isnan(means["lpips"])
    exp = expected_values(raw, no_cloth)
    # float32 pipeline vs float64 reference: ~1e-7 relative on errors, ~1e-5 on SSIM (variance rounding).
    for i, name in enumerate(["1.png", "2.png"]):
        assert npz["mse_l"][i] == pytest.approx(exp[name]["mse"], rel=1e-5)
        assert npz["rmse_l"][i] == pytest.approx(math.sqrt(exp[name]["mse"]), rel=1e-5)
        assert npz["mae_l"][i] == pytest.approx(exp[name]["mae"], rel=1e-5)
        assert npz["l1_l"][i] == npz["mae_l"][i]  # our l1 is the true L1 (the original's was MSE)
        assert npz["psnr_l"][i] == pytest.approx(exp[name]["psnr"], abs=1e-4)
        assert npz["ssim_l"][i] == pytest.approx(exp[name]["ssim"], abs=1e-4)
    assert means["mae"] == pytest.approx(np.mean(npz["mae_l"]), rel=1e-12)
    assert means["num_frames"] == 2

    with open(out_dir / f"{base}.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["", *RESULT_KEYS]
    assert len(rows) == 3 and rows[1][2] == "1.png"
    assert float(rows[2][RESULT_KEYS.index("mae_l") + 1]) == pytest.approx(npz["mae_l"][1], rel=1e-12)


def test_evaluate_folder_with_lpips_module(tmp_path, empty_hub):
    out_dir, gt_dir, raw = make_folder(tmp_path, res=64)
    install_lpips_weights(empty_hub)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # weights present: no warning
        means = evaluate_folder(out_dir, gt_dir, res=64)
    assert np.isfinite(means["lpips"]) and means["lpips"] > 0
    skipped = evaluate_folder(out_dir, gt_dir, res=64, lpips=False)
    assert math.isnan(skipped["lpips"])
    assert skipped["mae"] == pytest.approx(means["mae"], rel=1e-12)


def test_evaluate_folder_resizes_and_checks_json(tmp_path, empty_hub):
    out_dir, gt_dir, _ = make_folder(tmp_path, res=32)
    means = evaluate_folder(out_dir, gt_dir, res=48, lpips=False)  # every image resized to 48x48
    assert np.isfinite(means["ssim"])
    from pointavatar.errors import PointAvatarError

    iio.imwrite(
        out_dir / "rgb_erode_dilate" / "9.png", np.zeros((32, 32, 3), np.uint8)
    )  # frame 7: not in JSON
    with pytest.raises(PointAvatarError, match="not in"):
        evaluate_folder(out_dir, gt_dir, res=32, lpips=False)
