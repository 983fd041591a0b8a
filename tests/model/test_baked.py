"""The baked renderer (model/baked.py) against the model's eval forward: images, points, normals, FLAME.

The model's weights are moved off their init (the deformer's heads start at zero), so blendshapes, pose
correctives, skinning weights and offsets are all non-trivial, and the frames have non-zero
expressions and poses (tests/model/test_model.py's `make_input`).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from test_model import IMG_RES, build, make_input, model_conf, perturb_
from tolerances import assert_close

from pointavatar.errors import PointAvatarError
from pointavatar.model import PointAvatar
from pointavatar.model.baked import BakedAvatar, BakedFrame

B = 3  # frames per comparison
# The baked and the model's fp32 paths sum the same products in different orders (and the joints are
# regressed once in float64): ~1e-6 apart; the bound for the images is 1e-4.
IMAGE_ATOL = 1e-4
IMAGE_WHY = "fp32, different summation order than the eval forward (the issue's bound: 1e-4)"


def trained_like(flame_files, dtype=torch.float32, **kwargs) -> PointAvatar:
    model = build(flame_files, **kwargs).to(dtype)
    perturb_(model, 0.02)
    return model.eval()


def eval_images(model: PointAvatar, inp: dict) -> dict[str, torch.Tensor]:
    """The eval forward's images as [B, H, W, C] ([B, H, W] for the mask)."""
    with torch.no_grad():
        out = model(inp)
    b, res = inp["expression"].shape[0], model.img_res
    return {
        "rgb": out.rgb_image.reshape(b, res, res, 3),
        "mask": out.predicted_mask.reshape(b, res, res),
        "normal": out.eval.normal_image.reshape(b, res, res, 3),
        "shading": out.eval.shading_image.reshape(b, res, res, 3),
        "albedo": out.eval.albedo_image.reshape(b, res, res, 3),
        "points": out.eval.deformed_points,
        "normals": out.eval.pnts_normal_deformed,
    }


def render(baked: BakedAvatar, inp: dict, channels: str = "all") -> BakedFrame:
    return baked.render(inp["expression"], inp["flame_pose"], inp["intrinsics"], inp["cam_pose"], channels)


def assert_images_close(frame: BakedFrame, ref: dict[str, torch.Tensor]) -> None:
    for name in ("rgb", "mask", "normal", "shading", "albedo"):
        assert getattr(frame, name).shape == ref[name].shape, name
        assert_close(getattr(frame, name), ref[name], rtol=0, atol=IMAGE_ATOL, reason=IMAGE_WHY, msg=name)


@pytest.mark.parametrize("use_background", [False, True], ids=["white", "learned_background"])
def test_baked_render_equals_eval_forward_fp32(flame_files, use_background):
    model = trained_like(flame_files, use_background=use_background)
    inp = make_input(B)
    ref = eval_images(model, inp)
    baked = BakedAvatar.from_model(model)
    frame = render(baked, inp)
    assert_images_close(frame, ref)
    # The comparison has teeth: the avatar covers part of each image, and the frames differ.
    assert 0.05 < ref["mask"].mean() < 0.95
    assert (ref["mask"][0] - ref["mask"][1]).abs().max() > 0.1
    # A neutral frame renders differently: expressions and poses reach the image.
    neutral = dict(
        inp, expression=torch.zeros_like(inp["expression"]), flame_pose=torch.zeros_like(inp["flame_pose"])
    )
    assert (render(baked, neutral).rgb - frame.rgb).abs().max() > 0.05


def test_rgb_channels_equal_all_channels(flame_files):
    model = trained_like(flame_files, use_background=True)
    baked = BakedAvatar.from_model(model)
    inp = make_input(2)
    full, rgb_only = render(baked, inp, "all"), render(baked, inp, "rgb")
    # Compositing is per channel: the same sums, bit for bit.
    assert torch.equal(rgb_only.rgb, full.rgb) and torch.equal(rgb_only.mask, full.mask)
    assert rgb_only.normal is None and rgb_only.shading is None and rgb_only.albedo is None
    with pytest.raises(PointAvatarError, match="channels must be one of"):
        render(baked, inp, "depth")


@pytest.mark.parametrize(
    "variant",
    [{}, {"ghostbone": False, "deform_c": False, "num_exp": 20}],
    ids=["subject_conf", "no_ghostbone_no_offset_20_expressions"],
)
def test_baked_points_and_normals_equal_the_model_in_float64(flame_files, variant):
    conf = model_conf(flame_files)
    conf.deformer_network = dataclasses.replace(conf.deformer_network, **variant)
    torch.manual_seed(0)
    model = PointAvatar(
        conf,
        shape_params=torch.randn(1, 100) * 0.3,
        canonical_expression=torch.randn(1, 50) * 0.3,
        canonical_pose=0.4,
        img_res=IMG_RES,
        use_background=False,
    ).double()
    perturb_(model, 0.05)
    model.eval()
    inp = make_input(B, dtype=torch.float64)
    ref = eval_images(model, inp)
    baked = BakedAvatar.from_model(model, chunk_size=37)  # several bake chunks, the last one short
    x_d, n_d = baked.deform(inp["expression"], inp["flame_pose"])
    # float64: only the summation order differs (~1e-15); tighter than float64's defaults.
    tol = {"rtol": 1e-10, "atol": 1e-12}
    assert_close(x_d, ref["points"], **tol)
    assert_close(n_d, ref["normals"], **tol)
    # The normals are not the canonical ones: the Jacobian reaches them.
    assert (n_d - baked.normals_c).abs().max() > 1e-2

    pose_feature, transforms = baked.flame_transforms(inp["expression"], inp["flame_pose"])
    _, ref_pf, ref_tf = model.FLAMEServer(inp["expression"], inp["flame_pose"])
    assert_close(pose_feature, ref_pf, **tol)
    assert_close(transforms, ref_tf, **tol)

    frame = render(baked, inp)
    for name in ("rgb", "mask", "normal", "shading", "albedo"):
        assert_close(getattr(frame, name), ref[name], **tol, msg=name)


def test_bake_chunks_and_memory_report(flame_files):
    model = trained_like(flame_files)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    whole = BakedAvatar.from_model(model)
    chunked = BakedAvatar.from_model(model, chunk_size=16)
    # Baking reads the model and leaves it as it was (weights, and its weight-norm parametrisations).
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert (
        model.rendering_network.lin0.weight.shape
        == before["rendering_network.lin0.parametrizations.weight.original1"].shape
    )
    for name, value in whole.named_buffers():
        # The same per-point computation, on row blocks of another size (BLAS blocking may differ).
        assert_close(getattr(chunked, name), value, msg=name)
    n, d = model.pc.n_points, model.deformer_network.blendshapes.weight.shape[1]
    report = whole.memory_report()
    assert report["hidden"] == n * 4 * d * 4  # fp32: h and its three tangents
    assert report["background"] == 0  # white background
    assert whole.nbytes() == sum(report.values())
    assert whole.n_points == n and whole.img_res == IMG_RES and whole.radius == model.pc.radius


def test_render_checks_and_pads_inputs(flame_files):
    model = trained_like(flame_files)
    baked = BakedAvatar.from_model(model)
    inp = make_input(1)
    narrow = dict(inp, expression=inp["expression"][:, :10])
    padded = dict(inp, expression=torch.cat([inp["expression"][:, :10], torch.zeros(1, 40)], dim=1))
    assert torch.equal(render(baked, narrow).rgb, render(baked, padded).rgb)
    with pytest.raises(PointAvatarError, match=r"flame_pose must be \[1, 15\]"):
        baked.render(inp["expression"], inp["flame_pose"][:, :9], inp["intrinsics"], inp["cam_pose"])
    with pytest.raises(PointAvatarError, match=r"cam_pose must be \[1, 3, 4\]"):
        baked.render(inp["expression"], inp["flame_pose"], inp["intrinsics"], inp["cam_pose"][0])
    # Lists and float64 inputs are converted to the avatar's dtype.
    frame = baked.render(
        inp["expression"].double().tolist(), inp["flame_pose"].double(), inp["intrinsics"], inp["cam_pose"]
    )
    assert frame.rgb.dtype == torch.float32
    assert_close(frame.rgb, render(baked, inp).rgb)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(
    "options",
    [{}, {"compile": True}, {"compile": "reduce-overhead"}, {"cuda_graph": True}],
    ids=["eager", "compiled", "compiled_cuda_graphs", "cuda_graph"],
)
def test_baked_render_equals_eval_forward_on_gpu_in_float32(flame_files, options):
    model = trained_like(flame_files, use_background=True).cuda()
    model.render_backend = "auto"  # the Triton rasterizer and compositor on CUDA, for both
    inputs = [{k: v.cuda() for k, v in make_input(B, seed=s).items()} for s in (3, 4)]
    baked = BakedAvatar.from_model(model, **options)
    for inp in inputs:  # a second frame set: replays and cached graphs see new inputs
        ref = eval_images(model, inp)
        for channels in ("all", "rgb"):
            frame = render(baked, inp, channels)
            assert not baked._compile_failed and not baked._graph_failed
            if channels == "all":
                assert_images_close(frame, ref)
            else:
                assert_close(frame.rgb, ref["rgb"], rtol=0, atol=IMAGE_ATOL, reason=IMAGE_WHY)
        assert 0.05 < ref["mask"].mean() < 0.95
    if options.get("cuda_graph"):
        assert len(baked._graphs) == 2  # one capture per channel set, replayed for the second frames
    if not options.get("compile"):  # (compiled, the move would compile the CPU graph: slow)
        # Moved to the CPU (captured graphs dropped) it renders the same images.
        cpu_frame = render(baked.cpu(), {k: v.cpu() for k, v in inputs[1].items()})
        assert_close(cpu_frame.rgb, ref["rgb"].cpu(), rtol=0, atol=IMAGE_ATOL, reason=IMAGE_WHY)


def test_a_failing_compile_falls_back_to_eager(flame_files, monkeypatch):
    model = trained_like(flame_files)
    eager = BakedAvatar.from_model(model)
    inp = make_input(1)

    def broken_compile(fn, **kwargs):
        def compiled(*args):
            raise RuntimeError("no compiler here")

        return compiled

    monkeypatch.setattr(torch, "compile", broken_compile)
    baked = BakedAvatar.from_model(model, compile="reduce-overhead")
    with pytest.warns(UserWarning, match="no compiler here.*rendering eagerly"):
        frame = render(baked, inp)
    assert torch.equal(frame.rgb, render(eager, inp).rgb)
    assert torch.equal(render(baked, inp).rgb, frame.rgb)  # eager from then on, without a new warning
