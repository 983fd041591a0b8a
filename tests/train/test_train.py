"""End-to-end training, resume and evaluation on a tiny synthetic subject (CPU).

Every shipped conf is reduced to tiny sizes (32x32 images, 100 points, 2 frames per video) and
trained for two epochs, then evaluated; resume, kill-and-resume, the original's checkpoint layout and
the bad-input messages are checked on the same data.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from run_fixtures import ROOT, load_model_ckpt, tiny
from tolerances import assert_close

from pointavatar.engine import checkpoints as ckpt
from pointavatar.engine.experiment import Experiment
from pointavatar.errors import PointAvatarError
from pointavatar.evaluate.runner import Evaluator
from pointavatar.train.trainer import Trainer

CONFS = sorted((ROOT / "confs").glob("*.conf"))
SUBJECT1 = ROOT / "confs" / "subject1.conf"


@pytest.mark.slow
@pytest.mark.parametrize("conf_path", CONFS, ids=[p.stem for p in CONFS])
def test_every_conf_trains_and_evaluates(conf_path, subject, tmp_path):
    conf = tiny(conf_path, subject, tmp_path)
    trainer = Trainer(conf, nepoch=1, device="cpu")
    trainer.run()
    train_dir = trainer.exp.train_dir
    for family in (ckpt.MODEL, ckpt.OPTIMIZER, ckpt.SCHEDULER):
        assert (train_dir / "checkpoints" / family / "latest.pth").is_file()
        assert (train_dir / "checkpoints" / family / "2.pth").is_file()  # nepoch + 1
    assert (train_dir / "runconf.conf").is_file()
    assert load_model_ckpt(train_dir)["epoch"] == 2
    # Upsampled once at epoch 1 (upsample_freq 1): at most 2 x the pruned cloud, radius x 0.75.
    state = load_model_ckpt(train_dir)
    assert state["radius"] == pytest.approx(trainer.model.pc.radius)
    assert state["radius"] < 0.3 * 0.75**0  # initial radius of 100 points is 0.3

    results = Evaluator(conf, device="cpu").run()
    sub = "test"
    epoch_dir = trainer.exp.eval_dir / sub / "epoch_2"
    for kind in ("rgb", "rgb_erode_dilate", "normal"):
        assert sorted(p.name for p in (epoch_dir / kind).glob("*.png")) == ["1.png", "2.png"]
    assert (epoch_dir / "results_rgb_erode_dilate.npz").is_file()
    assert (epoch_dir / "results_no_cloth_rgb_erode_dilate.csv").is_file()
    assert (epoch_dir / "video.mp4").stat().st_size > 0
    assert list((trainer.exp.eval_dir / sub / "rendering").glob("epoch_0002_1.png"))
    assert (trainer.exp.eval_dir / sub / "0002_canonical_verts.ply").is_file()
    assert (trainer.exp.eval_dir / sub / "0002_deformed_color_1.ply").is_file()
    assert np.isfinite(results[sub]["psnr"]) and results[sub]["psnr"] > 0
    if conf.train.optimize_expression or conf.train.optimize_camera:
        assert (train_dir / "checkpoints" / ckpt.TEST_INPUTS / "latest.pth").is_file()


def test_resume_restores_state(subject, tmp_path):
    conf = tiny(SUBJECT1, subject, tmp_path)
    first = Trainer(conf, nepoch=1, device="cpu")
    first.run()
    # Perturb the embeddings so that restoring them is visible.
    saved_model = load_model_ckpt(first.exp.train_dir)
    saved_inputs = torch.load(first.exp.train_dir / "checkpoints" / ckpt.INPUTS / "latest.pth")

    resumed = Trainer(conf, nepoch=3, is_continue=True, device="cpu")
    assert resumed.start_epoch == 2
    assert torch.equal(resumed.model.pc.points.detach().cpu(), saved_model["model_state_dict"]["pc.points"])
    assert resumed.model.pc.radius == pytest.approx(saved_model["radius"])
    assert torch.equal(
        resumed.inputs.expression.weight.detach().cpu(), saved_inputs["expression_state_dict"]["weight"]
    )
    assert torch.equal(
        resumed.inputs.camera_pose.weight.detach().cpu(), saved_inputs["camera_pose_state_dict"]["weight"]
    )
    # lbs_weight replays the decay of milestones up to the start epoch (none up to 2 here).
    assert resumed.schedule.epoch_values(2, resumed.model.pc.n_points).lbs_weight == pytest.approx(
        conf.loss.lbs_weight
    )
    assert resumed.scheduler.last_epoch == 2
    resumed.run()
    assert load_model_ckpt(first.exp.train_dir)["epoch"] == 4


def test_lbs_weight_replayed_on_resume(subject, tmp_path):
    from pointavatar.train.schedule import PointSchedule

    conf = tiny(SUBJECT1, subject, tmp_path)
    schedule = PointSchedule(conf)  # the one function for a fresh start and a resume: weight in epoch e

    def weight(epoch):
        return schedule.epoch_values(epoch, 100).lbs_weight

    assert weight(0) == 10.0
    assert weight(9) == 10.0 and weight(10) == 5.0  # the epoch-10 decay applies from epoch 10 on
    assert weight(11) == 5.0
    assert weight(41) == 0.625


def test_killed_mid_epoch_resumes_from_last_checkpoint(subject, tmp_path, monkeypatch):
    conf = tiny(SUBJECT1, subject, tmp_path, **{"train.max_points_training": 100})  # batch 1: 4 steps/epoch
    trainer = Trainer(conf, nepoch=3, device="cpu")
    calls = {"n": 0}
    original = trainer.loss.forward

    def dying(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 6:  # second step of epoch 1
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(trainer.loss, "forward", dying)
    with pytest.raises(KeyboardInterrupt):
        trainer.run()
    state = load_model_ckpt(trainer.exp.train_dir)
    assert state["epoch"] == 1  # written at the start of the interrupted epoch
    leftovers = [p for p in (trainer.exp.train_dir / "checkpoints").rglob("*") if p.name.endswith(".tmp")]
    assert not leftovers

    resumed = Trainer(conf, nepoch=3, is_continue=True, device="cpu")
    assert resumed.start_epoch == 1
    assert resumed.model.pc.points.shape[0] == state["model_state_dict"]["pc.points"].shape[0]
    resumed.run()
    assert load_model_ckpt(trainer.exp.train_dir)["epoch"] == 4


def test_is_continue_with_nothing_to_resume_starts_fresh(subject, tmp_path, capsys):
    conf = tiny(SUBJECT1, subject, tmp_path)
    trainer = Trainer(conf, nepoch=0, is_continue=True, device="cpu")
    assert trainer.start_epoch == 0
    assert "nothing to resume" in capsys.readouterr().out


def test_checkpoint_from_another_conf_is_refused(subject, tmp_path):
    conf = tiny(SUBJECT1, subject, tmp_path)
    Trainer(conf, nepoch=0, device="cpu").run()
    other = conf.override({"model.deformer_network.dims": [64, 64, 64, 64]})
    with pytest.raises(PointAvatarError, match="does not fit the model of this conf"):
        Evaluator(other, device="cpu")


def test_original_checkpoint_layout_evaluates(subject, tmp_path):
    """A ModelParameters file in the original's key layout (weight_g / weight_v) loads for --is_eval."""
    conf = tiny(SUBJECT1, subject, tmp_path, **{"train.test_tracking": False})
    trainer = Trainer(conf, nepoch=0, device="cpu")
    ours = trainer.model.state_dict()
    original = {}
    for key, value in ours.items():
        key = key.replace("parametrizations.weight.original0", "weight_g")
        key = key.replace("parametrizations.weight.original1", "weight_v")
        original[key] = value.clone()
    assert any(k.endswith("weight_g") for k in original)
    path = trainer.exp.train_dir / "checkpoints" / ckpt.MODEL / "60.pth"
    ckpt.atomic_save({"epoch": 60, "radius": 0.01, "model_state_dict": original}, path)
    evaluator = Evaluator(conf, checkpoint="60", device="cpu")
    assert evaluator.epoch == 60 and evaluator.model.pc.radius == pytest.approx(0.01)
    for key, value in ours.items():
        assert torch.equal(evaluator.model.state_dict()[key].cpu(), value.cpu()), key
    evaluator.run()
    assert (trainer.exp.eval_dir / "test" / "epoch_60" / "rgb" / "1.png").is_file()


def test_missing_dataset_and_flame_messages(subject, tmp_path):
    conf = tiny(SUBJECT1, subject, tmp_path, **{"dataset.data_folder": str(tmp_path / "nowhere")})
    with pytest.raises(PointAvatarError, match="nowhere"):
        Trainer(conf, nepoch=0, device="cpu")
    conf = tiny(
        SUBJECT1, subject, tmp_path, **{"model.flame_model_path": str(tmp_path / "generic_model.pkl")}
    )
    with pytest.raises(PointAvatarError, match="generic_model.pkl"):
        Trainer(conf, nepoch=0, device="cpu")


def test_missing_vgg_weights_stop_before_training(subject, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    conf = tiny(SUBJECT1, subject, tmp_path, **{"loss.vgg_feature_weight": 0.1})
    with pytest.raises(PointAvatarError, match="vgg_feature_weight = 0"):
        Trainer(conf, nepoch=0, device="cpu")


def test_empty_point_cloud_after_pruning_is_explained(subject, tmp_path):
    conf = tiny(SUBJECT1, subject, tmp_path)
    trainer = Trainer(conf, nepoch=1, device="cpu")
    # Cameras that look away from the head: nothing is visible during epoch 0.
    trainer.train_set.data["world_mats"][:, 2, 3] = -100.0
    with torch.no_grad():
        trainer.inputs.camera_pose.weight[:, 2] = -100.0
    with pytest.raises(PointAvatarError, match="wrong camera|masks"):
        trainer.run()


def test_non_finite_loss_stops_before_the_update(subject, tmp_path):
    conf = tiny(SUBJECT1, subject, tmp_path)
    trainer = Trainer(conf, nepoch=1, device="cpu")
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    real_forward = trainer.loss.forward

    def nan_loss(outputs, ground_truth, **kwargs):
        out = real_forward(outputs, ground_truth, **kwargs)
        out["mask_loss"] = out["mask_loss"] * float("nan")
        out["loss"] = out["loss"] + out["mask_loss"]
        return out

    trainer.loss.forward = nan_loss
    with pytest.raises(PointAvatarError, match=r"not finite at epoch 0, step 0 \(terms: mask_loss, loss\)"):
        trainer.run()
    after = trainer.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_exp_runner_cli_reports_errors(tmp_path):
    import subprocess
    import sys

    bad = tmp_path / "bad.conf"
    bad.write_text("train { learning_rat = 1.0 }\n")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "exp_runner.py"), "--conf", str(bad)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT / "code")},
    )
    assert proc.returncode == 1
    assert "learning_rate" in proc.stderr and "Traceback" not in proc.stderr


def test_only_json_renders_without_ground_truth(subject, tmp_path):
    conf = tiny(SUBJECT1, subject, tmp_path)
    Trainer(conf, nepoch=0, device="cpu").run()
    evaluator = Evaluator(conf, only_json=True, device="cpu")
    results = evaluator.run()  # no cached tracked inputs and no images: the JSON inputs drive it
    assert results == {}
    epoch_dir = evaluator.exp.eval_dir / "test" / "epoch_1"
    assert sorted(p.name for p in (epoch_dir / "rgb").glob("*.png")) == ["1.png", "2.png"]
    assert not list(epoch_dir.glob("results_*"))


def test_fix_lr_schedule_applies_the_decay(subject, tmp_path):
    base = {"train.sched_milestones": [1], "train.sched_factor": 0.5}
    faithful = Trainer(tiny(SUBJECT1, subject, tmp_path / "a", **base), nepoch=1, device="cpu")
    faithful.run()
    fixed = Trainer(
        tiny(SUBJECT1, subject, tmp_path / "b", **base, **{"train.fix_lr_schedule": True}),
        nepoch=1,
        device="cpu",
    )
    fixed.run()
    lr = faithful.conf.train.learning_rate
    # The original: Adam is re-created at the epoch-1 prune, so the decay never reaches it (spec §10.1).
    assert faithful.optimizer.param_groups[0]["lr"] == pytest.approx(lr)
    assert fixed.optimizer.param_groups[0]["lr"] == pytest.approx(lr * 0.5)  # halved once, at milestone 1


def test_keep_optimizer_state_carries_moments(subject, tmp_path):
    conf = tiny(SUBJECT1, subject, tmp_path, **{"train.keep_optimizer_state": True})
    trainer = Trainer(conf, nepoch=1, device="cpu")
    trainer.run()  # epoch 1 prunes and upsamples
    # 4 frames in one batch: one step per epoch. The networks' moments have seen both steps.
    assert max(int(s["step"]) for s in trainer.optimizer.state.values()) == 2
    points = trainer.model.pc.points
    state = trainer.optimizer.state[points]
    assert state["exp_avg"].shape == points.shape
    assert int(state["step"]) == 2  # the point moments were pruned and extended, not reset
    fresh = Trainer(tiny(SUBJECT1, subject, tmp_path / "f"), nepoch=1, device="cpu")
    fresh.run()
    assert max(int(s["step"]) for s in fresh.optimizer.state.values()) == 1  # Adam re-created at epoch 1


def test_prune_on_resume_saves_visibility(subject, tmp_path, capsys):
    conf = tiny(SUBJECT1, subject, tmp_path, **{"train.prune_on_resume": True})
    Trainer(conf, nepoch=0, device="cpu").run()
    assert load_model_ckpt(Experiment(conf).train_dir)["visible_points"].dtype == torch.bool
    capsys.readouterr()
    resumed = Trainer(conf, nepoch=1, is_continue=True, device="cpu")
    assert resumed.schedule.resumed_visibility
    resumed.run()
    assert "Pruning points" in capsys.readouterr().out


@pytest.mark.parametrize("tf32", [True, False])
def test_trainer_and_evaluator_apply_model_tf32(subject, tmp_path, tf32):
    """``model.tf32`` (default on, as the original's PyTorch 1.11) sets the process-wide TF32 flags
    before any work; the conftest restores them after the test."""
    conf = tiny(SUBJECT1, subject, tmp_path)
    assert conf.model.tf32 is True  # the default
    conf.model.tf32 = tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = not tf32
    trainer = Trainer(conf, nepoch=0, device="cpu")
    assert torch.backends.cuda.matmul.allow_tf32 is tf32 and torch.backends.cudnn.allow_tf32 is tf32
    trainer.run()  # one epoch, for the evaluator's checkpoint
    torch.backends.cuda.matmul.allow_tf32 = not tf32
    Evaluator(conf, device="cpu")
    assert torch.backends.cuda.matmul.allow_tf32 is tf32


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_training_on_gpu(subject, tmp_path):
    """train.cuda_graph on CUDA with the Triton rasterizer: steps are captured and replayed across the
    schedule's resizes and the input optimisation, without overflow, and the run trains (rgb loss falls)."""
    conf = tiny(
        SUBJECT1,
        subject,
        tmp_path,
        **{
            "train.cuda_graph": True,
            "train.upsample_freq": 3,
            "train.input_optimization_start": 2,
            "train.max_points_training": 100,  # one frame a step: four steps an epoch
            "model.render_backend": "auto",
        },
    )
    trainer = Trainer(conf, nepoch=6, device="cuda")
    first = []
    trainer._log = lambda epoch, idx, means, w: first.append(means["rgb_loss"])
    trainer.run()
    graphed = trainer.graphed_step
    assert graphed is not None
    assert graphed.captures >= 2 and graphed.overflows == 0
    assert all(np.isfinite(first)) and first[-1] < first[0]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_out_of_memory_on_gpu_names_the_memory_keys(subject, tmp_path):
    """A real CUDA out-of-memory in a step stops the run with the memory keys, not a traceback of the
    allocator. The allocator is capped at what it holds when the first step begins (after the epoch's
    checkpoint and plots, which must not be the ones to fail), and the step then asks for a block
    larger than all of that: the tiny step alone can fit in the cache's free blocks (it did, and the
    next checkpoint failed instead), so the step's own first block cannot be relied on to fail."""
    conf = tiny(SUBJECT1, subject, tmp_path, **{"train.cuda_graph": True, "model.render_backend": "auto"})
    trainer = Trainer(conf, nepoch=1, device="cuda")
    step = trainer._step

    def capped_step(*args, **kwargs):
        torch.cuda.empty_cache()
        total = torch.cuda.get_device_properties(0).total_memory
        reserved = torch.cuda.memory_reserved()
        torch.cuda.set_per_process_memory_fraction(reserved / total)
        torch.empty(reserved + 2**20, dtype=torch.uint8, device="cuda")  # raises the allocator's error
        return step(*args, **kwargs)

    trainer._step = capped_step
    try:
        with pytest.raises(PointAvatarError, match="the GPU ran out of memory in a training step of epoch 0"):
            trainer.run()
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()
    # What --is_continue resumes from: the checkpoint written at the start of the epoch.
    assert (trainer.exp.train_dir / "checkpoints" / ckpt.MODEL / "latest.pth").is_file()


@pytest.mark.slow
def test_fused_backwards_train_as_the_reference(subject, tmp_path, capsys):
    """The fast path with the memory options (fused geometry with the sweep recomputed, fused deformer,
    recomputation chunks, the FLAME prior's query recomputed) trains the reference run's model: after two
    epochs, with upsampling and pruning, the same points and parameters within float32's default
    tolerance (the paths sum the same products in other orders; geometry_bf16 off, as it rounds on
    purpose). The inverse skinning uses the reference's LU here: the fast path's closed form differs from
    it by float32 rounding (1e-7), which Adam, normalising each element's gradient, can turn into a
    different step where a gradient is near zero (tried: 1 of 33,408 blendshape weights 1.9e-5 off, beyond
    the 1e-5 tolerance); the closed form has its own tests (tests/model/test_deform_explicit.py)."""
    runs = {}
    for name, keys in {
        "reference": {"model.implementation": "reference"},
        "lean": {
            "model.implementation": "fast",
            "model.inverse_skinning": "lu",
            "model.geometry_backward": "fused_recompute",
            "model.deformer_backward": "fused",
            "model.geometry_bf16": False,
            "model.recompute_chunk": 37,
        },
    }.items():
        conf = tiny(SUBJECT1, subject, tmp_path / name, **keys)
        trainer = Trainer(conf, nepoch=1, device="cpu")
        trainer.run()
        runs[name] = load_model_ckpt(trainer.exp.train_dir)["model_state_dict"]
        # The fast path says which backwards it trains with; the reference path has none to say.
        said = [line for line in capsys.readouterr().out.splitlines() if line.startswith("Fast path:")]
        expected = [
            "Fast path: geometry backward fused_recompute, deformer backward fused, prior query by chunks of 65536"
            " points, deformer products in fp32 (model.deformer_bf16 applies to deformer backward autograd only)"
        ]
        assert said == (expected if name == "lean" else []), name
    reference, lean = runs["reference"], runs["lean"]
    assert reference.keys() == lean.keys()
    for key, value in reference.items():  # float32's default tolerance holds
        if value.is_floating_point():
            assert_close(lean[key], value, msg=key)
        else:
            assert torch.equal(lean[key], value), key
