"""Safety of runs: nothing loaded runs code, no run is overwritten by mistake, non-finite updates never
reach disk, resumed runs continue exactly, and bad values or flags get one clear message.

Each test reproduces a fault found by trying the tools as a new user would (tiny CPU runs on the
synthetic subject). File hashes prove that a trained run survives; marker files prove that nothing ran.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from run_fixtures import ROOT, SUBJECT1, load_model_ckpt, tiny
from tolerances import assert_close

from pointavatar.engine import checkpoints as ckpt
from pointavatar.engine.device import resolve_device
from pointavatar.engine.experiment import Experiment
from pointavatar.errors import PointAvatarError
from pointavatar.evaluate.runner import Evaluator
from pointavatar.train import trainer as trainer_module
from pointavatar.train.trainer import Trainer


def tree_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder``, by relative path."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


class _RunsCode:
    """A pickle payload that, if unpickled without restriction, creates a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def write_malicious(path: Path, marker: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump({"epoch": 3, "model_state_dict": _RunsCode(marker)}, f)


@pytest.fixture(scope="module")
def trained(subject, tmp_path_factory):
    """A finished tiny run (epochs 0..1, final checkpoint 2); tests copy it before changing it."""
    out = tmp_path_factory.mktemp("trained")
    conf = tiny(SUBJECT1, subject, out, **{"train.checkpoint_freq": 1})
    Trainer(conf, nepoch=1, device="cpu").run()
    return conf, out


def copy_run(trained, tmp_path):
    import shutil

    conf, out = trained
    shutil.copytree(out, tmp_path / "exps")
    return conf.override({"train.exps_folder": str(tmp_path / "exps")})


# --------------------------------------------------------------------------- 1. checkpoints run no code


@pytest.mark.parametrize("mode", ["is_continue", "is_eval"])
def test_malicious_checkpoint_is_refused_and_runs_nothing(trained, tmp_path, mode):
    conf = copy_run(trained, tmp_path)
    train_dir = Experiment(conf).train_dir
    marker = tmp_path / "MARKER"
    write_malicious(train_dir / "checkpoints" / ckpt.MODEL / "latest.pth", marker)
    with pytest.raises(PointAvatarError, match="latest.pth") as err:
        if mode == "is_continue":
            Trainer(conf, nepoch=3, is_continue=True, device="cpu")
        else:
            Evaluator(conf, device="cpu")
    assert "refused" in str(err.value)
    assert not marker.exists()


def test_malicious_tracked_inputs_are_refused_and_run_nothing(trained, tmp_path):
    conf = copy_run(trained, tmp_path)
    train_dir = Experiment(conf).train_dir
    marker = tmp_path / "MARKER"
    write_malicious(train_dir / "checkpoints" / ckpt.TEST_INPUTS / "latest.pth", marker)
    evaluator = Evaluator(conf, device="cpu")
    with pytest.raises(PointAvatarError, match=ckpt.TEST_INPUTS):
        evaluator.prepare_inputs()
    assert not marker.exists()


# ---------------------------------------------------------------- 2. non-finite updates never reach disk


def test_non_finite_gradients_skip_the_step(subject, tmp_path, capsys):
    conf = tiny(SUBJECT1, subject, tmp_path, **{"train.max_points_training": 100})  # 4 steps an epoch
    trainer = Trainer(conf, nepoch=1, device="cpu")
    calls = {"n": 0}

    def poison(grad):
        # The loss stays finite; one parameter's gradient is not (as a 1e30 pose made 41 of them).
        calls["n"] += 1
        return grad * float("inf") if calls["n"] == 1 else grad

    weight = next(trainer.model.rendering_network.parameters())
    weight.register_hook(poison)
    trainer.run()
    out = capsys.readouterr().out
    assert "non-finite gradients; step skipped (frames train" in out
    assert "1 of 4 steps skipped (non-finite gradients)" in out
    assert trainer.skipped_steps == 1
    for name in ("latest", "2"):
        state = load_model_ckpt(trainer.exp.train_dir, name)["model_state_dict"]
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point()), name


def test_training_stops_when_most_steps_are_skipped(subject, tmp_path):
    conf = tiny(SUBJECT1, subject, tmp_path)
    trainer = Trainer(conf, nepoch=1, device="cpu")
    weight = next(trainer.model.rendering_network.parameters())
    weight.register_hook(lambda grad: grad * float("nan"))
    with pytest.raises(PointAvatarError, match=r"steps had non-finite gradients and were skipped"):
        trainer.run()
    state = load_model_ckpt(trainer.exp.train_dir)["model_state_dict"]
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_resume_refuses_a_non_finite_checkpoint_and_names_the_last_finite_one(trained, tmp_path):
    conf = copy_run(trained, tmp_path)
    train_dir = Experiment(conf).train_dir
    path = train_dir / "checkpoints" / ckpt.MODEL / "latest.pth"
    payload = torch.load(path, weights_only=True)
    payload["model_state_dict"]["pc.points"][0, 0] = float("nan")
    ckpt.atomic_save(payload, path)
    with pytest.raises(PointAvatarError, match=r"pc\.points") as err:
        Trainer(conf, nepoch=3, is_continue=True, device="cpu")
    assert "--checkpoint 2" in str(err.value)


# ------------------------------------------------------------------ 3. runs are never overwritten


def test_fresh_start_over_a_trained_run_stops_and_changes_nothing(trained, tmp_path):
    conf = copy_run(trained, tmp_path)
    run_dir = Experiment(conf).run_dir
    before = tree_hashes(run_dir)
    with pytest.raises(PointAvatarError, match="--is_continue") as err:
        Trainer(conf, nepoch=1, device="cpu")
    assert "--move_old_run" in str(err.value)
    assert tree_hashes(run_dir) == before


def test_move_old_run_keeps_the_old_run_under_a_timestamped_name(trained, tmp_path):
    conf = copy_run(trained, tmp_path)
    run_dir = Experiment(conf).run_dir
    before = tree_hashes(run_dir)
    trainer = Trainer(conf, nepoch=0, device="cpu", move_old_run=True)
    moved = [p for p in run_dir.parent.iterdir() if p.name.startswith(run_dir.name + ".old-")]
    assert len(moved) == 1 and tree_hashes(moved[0]) == before
    trainer.run()
    assert load_model_ckpt(trainer.exp.train_dir)["epoch"] == 1


def test_mistyped_load_path_is_an_error(trained, tmp_path):
    conf = copy_run(trained, tmp_path)
    run_dir = Experiment(conf).run_dir
    before = tree_hashes(run_dir)
    with pytest.raises(PointAvatarError, match="--load_path .*no such folder"):
        Trainer(conf, nepoch=3, is_continue=True, load_path=str(tmp_path / "typo"), device="cpu")
    assert tree_hashes(run_dir) == before


def test_runconf_is_written_only_when_the_run_starts(trained, tmp_path):
    conf = copy_run(trained, tmp_path)
    train_dir = Experiment(conf).train_dir
    recorded = (train_dir / "runconf.conf").read_text()
    changed = conf.override({"train.learning_rate": 2e-4})
    # A failed resume (nepoch below the checkpoint) records nothing.
    with pytest.raises(PointAvatarError, match="--nepoch 0 is below"):
        Trainer(changed, nepoch=0, is_continue=True, device="cpu")
    assert sorted(p.name for p in train_dir.glob("runconf*")) == ["runconf.conf"]
    # A resume with a changed conf keeps the old record and writes the new conf beside it.
    Trainer(changed, nepoch=3, is_continue=True, device="cpu")
    assert (train_dir / "runconf.conf").read_text() == recorded
    extra = [p for p in train_dir.glob("runconf.resume-2-*.conf")]
    assert len(extra) == 1 and "0.0002" in extra[0].read_text()


# ---------------------------------------------------------------- 4. stale or mislabelled results


def test_nepoch_below_the_resumed_epoch_writes_nothing(trained, tmp_path):
    conf = copy_run(trained, tmp_path)
    run_dir = Experiment(conf).run_dir
    before = tree_hashes(run_dir)
    with pytest.raises(PointAvatarError, match="--nepoch 0 is below the resumed checkpoint"):
        Trainer(conf, nepoch=0, is_continue=True, device="cpu")
    # --nepoch equal to the trained epochs: nothing to train, nothing written.
    trainer = Trainer(conf, nepoch=1, is_continue=True, device="cpu")
    trainer.run()
    after = tree_hashes(run_dir)
    assert {k: v for k, v in after.items() if "tensorboard" not in k} == {
        k: v for k, v in before.items() if "tensorboard" not in k
    }


def test_tracked_test_inputs_are_used_only_for_their_model_epoch(trained, tmp_path, capsys):
    conf = copy_run(trained, tmp_path)
    first = Evaluator(conf, device="cpu")
    first.prepare_inputs()  # tracks, and caches TestInputParameters/latest.pth for epoch 2
    assert "Tracking the test frames" in capsys.readouterr().out
    Trainer(conf, nepoch=2, is_continue=True, device="cpu").run()  # latest is epoch 3 now
    second = Evaluator(conf, device="cpu")
    assert second.epoch == 3
    second.prepare_inputs()
    out = capsys.readouterr().out
    assert "tracked for the model of epoch 2, this model is epoch 3" in out
    assert "Tracking the test frames" in out
    third = Evaluator(conf, device="cpu")
    third.prepare_inputs()
    assert "Using tracked test inputs" in capsys.readouterr().out


# ------------------------------------------------------------------------------- 6. corrupted latest


def test_truncated_latest_names_the_intact_checkpoints(trained, tmp_path):
    conf = copy_run(trained, tmp_path)
    path = Experiment(conf).train_dir / "checkpoints" / ckpt.MODEL / "latest.pth"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(PointAvatarError, match="--checkpoint 2") as err:
        Trainer(conf, nepoch=3, is_continue=True, device="cpu")
    assert "latest.pth" in str(err.value)
    resumed = Trainer(conf, nepoch=3, is_continue=True, checkpoint="2", device="cpu")
    assert resumed.start_epoch == 2


# ---------------------------------------------------------------------------- 8. environment errors


def test_exps_folder_that_is_a_file_is_named(subject, tmp_path):
    blocker = tmp_path / "exps"
    blocker.write_text("not a folder")
    conf = tiny(SUBJECT1, subject, blocker)
    with pytest.raises(PointAvatarError, match="train.exps_folder .* is a file"):
        Trainer(conf, nepoch=0, device="cpu")


def test_unwritable_exps_folder_is_named(subject, tmp_path, monkeypatch):
    conf = tiny(SUBJECT1, subject, tmp_path / "exps")
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if Path(p) == tmp_path else real_access(p, mode))
    with pytest.raises(PointAvatarError, match="train.exps_folder .* not writable"):
        Trainer(conf, nepoch=0, device="cpu")
    assert not (tmp_path / "exps").exists()


@pytest.mark.parametrize("name", ["gpu", "tpu", "cuda:x"])
def test_unknown_device_names_the_flag(name):
    with pytest.raises(PointAvatarError, match=f"--device {name}"):
        resolve_device(name)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_cuda_device_without_cuda_says_what_to_do():
    with pytest.raises(PointAvatarError, match="--device cuda: CUDA is not available.*--device cpu"):
        resolve_device("cuda")


# ------------------------------------------------------------------------- 9. as a new user runs it


def test_resumed_run_continues_exactly_where_the_stopped_one_was(subject, tmp_path):
    """E epochs in one go == k epochs, then --is_continue to E (lr schedule, Adam, inputs, RNG)."""
    fixes = {
        "train.fix_lr_schedule": True,
        "train.keep_optimizer_state": True,
        "train.prune_on_resume": True,
        "train.sched_milestones": [1, 2],
        "train.input_optimization_start": 1,
        "train.max_points_training": 200,  # 2 frames a batch: 2 steps an epoch, shuffled
    }
    whole = Trainer(tiny(SUBJECT1, subject, tmp_path / "whole", **fixes), nepoch=3, device="cpu")
    whole.run()
    parts_conf = tiny(SUBJECT1, subject, tmp_path / "parts", **fixes)
    Trainer(parts_conf, nepoch=1, device="cpu").run()
    resumed = Trainer(parts_conf, nepoch=3, is_continue=True, device="cpu")
    # The lr continues decayed (milestones 1 and 2 passed): the bug reset it to train.learning_rate.
    lr = parts_conf.train.learning_rate
    assert resumed.optimizer.param_groups[0]["lr"] == pytest.approx(lr * 0.25)
    resumed.run()
    # Same operations in the same order on CPU (observed: exact), but a resumed process may sum
    # in another order: a few float32 ulps, which the remaining steps may grow.
    resumed_order = "a resumed process's float32 summation order may differ: a few ulps"
    a = load_model_ckpt(whole.exp.train_dir)
    b = load_model_ckpt(resumed.exp.train_dir)
    assert a["epoch"] == b["epoch"] == 4
    for key, value in a["model_state_dict"].items():
        assert_close(b["model_state_dict"][key], value, rtol=1e-5, atol=1e-6, reason=resumed_order, msg=key)
    ia = torch.load(whole.exp.train_dir / "checkpoints" / ckpt.INPUTS / "latest.pth", weights_only=True)
    ib = torch.load(resumed.exp.train_dir / "checkpoints" / ckpt.INPUTS / "latest.pth", weights_only=True)
    assert_close(
        ib["expression_state_dict"], ia["expression_state_dict"], rtol=1e-5, atol=1e-6, reason=resumed_order
    )


def test_eval_from_another_folder_generates_nothing_and_names_the_run(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "exp_runner.py"), "--conf", str(ROOT / "confs" / "demo.conf")]
        + ["--is_eval"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT / "code")},
        timeout=300,
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert "no checkpoint data/experiments/synthetic/pointavatar/train0+train1/train" in proc.stderr
    assert "train first" in proc.stderr
    assert not (tmp_path / "data").exists()  # no synthetic subject generated


def test_help_names_no_spec_and_the_conf_default(capsys):
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import exp_runner
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    with pytest.raises(SystemExit):
        exp_runner.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "spec" not in text and "62" not in text
    assert "train.nepoch of the conf" in text and "--move_old_run" in text


def test_epoch_progress_shows_the_total_and_an_eta(subject, tmp_path, capsys):
    Trainer(tiny(SUBJECT1, subject, tmp_path), nepoch=1, device="cpu").run()
    out = capsys.readouterr().out
    assert "epoch 0/1 done in" in out and "epoch 1/1 done in" in out
    assert "1/2 epochs of this run done; about" in out


def test_out_of_memory_names_the_keys_that_save_memory(subject, tmp_path, monkeypatch):
    """A step that runs out of GPU memory stops the run with the conf keys to change, leanest first
    where they are not set yet, and the epochs done stay resumable."""
    conf = tiny(SUBJECT1, subject, tmp_path, **{"model.implementation": "fast"})
    trainer = Trainer(conf, nepoch=2, device="cpu")
    real_step = trainer._step
    calls = {"n": 0}

    def step_then_oom(*args):
        calls["n"] += 1
        if calls["n"] == 2:  # epoch 1's first step (one step an epoch here)
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_step(*args)

    monkeypatch.setattr(trainer, "_step", step_then_oom)
    with pytest.raises(PointAvatarError) as info:
        trainer.run()
    message = str(info.value)
    assert message.startswith("the GPU ran out of memory in a training step of epoch 1 (")
    # Both backwards autograd (the CPU's "auto"): the partitioner's budget with the geometry's chunks.
    assert "model.activation_memory_budget = 0.3 with model.geometry_recompute_chunk = 131072" in message
    assert "geometry_backward" not in message
    assert "model.recompute_chunk = 65536" in message
    assert "train.max_points_training (800" in message and "--is_continue" in message
    assert isinstance(info.value.__cause__, torch.cuda.OutOfMemoryError)
    assert load_model_ckpt(trainer.exp.train_dir, "latest") is not None  # epoch 0's checkpoint

    # Already at that budget and those chunks: the per-point chunks and the sizes are left.
    trainer.model.activation_memory_budget, trainer.model.geometry_recompute_chunk = 0.3, 131072
    message = trainer._out_of_memory_message(3)
    assert "activation_memory_budget" not in message and "model.recompute_chunk = 65536" in message
    # A mixed explicit choice of backwards is told the lean pair.
    trainer.model.deformer_backward = "fused"
    message = trainer._out_of_memory_message(3)
    assert (
        'model.geometry_backward = "fused_recompute" with model.deformer_backward = "fused_bf16"' in message
    )
    # Already at the leanest backwards and chunks: only the sizes are left to suggest.
    trainer.model.geometry_backward, trainer.model.deformer_backward = "fused_recompute", "fused_bf16"
    trainer.model.recompute_chunk = 65536
    message = trainer._out_of_memory_message(3)
    assert "geometry_backward" not in message and "recompute_chunk" not in message
    assert "activation_memory_budget" not in message
    assert "model.point_cloud.max_points" in message
    # The reference path on a GPU is told about the fast engine first.
    trainer.model.implementation, trainer.device = "reference", torch.device("cuda", 0)
    monkeypatch.setattr(trainer_module, "gpu_memory_gib", lambda device: 23.6)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "a 24 GB card")
    message = trainer._out_of_memory_message(3)
    assert 'model.implementation = "auto"' in message and "on a 24 GB card (23.6 GiB)" in message


def test_ground_truth_on_device_trains_the_same_run(subject, tmp_path):
    """train.ground_truth_on_device "on" (here on the CPU, the same code as on a GPU): the frames' images
    gathered from one stacked tensor give the run of the DataLoader path bit for bit; the dataset's
    items then carry no images and its host copies are gone."""
    states = {}
    for mode in ("off", "on"):
        conf = tiny(SUBJECT1, subject, tmp_path / mode, **{"train.ground_truth_on_device": mode})
        trainer = Trainer(conf, nepoch=2, device="cpu")
        if mode == "on":
            assert set(trainer.ground_truth) == {"rgb", "object_mask"}
            assert trainer.ground_truth["rgb"].shape[0] == len(trainer.train_set)
            assert trainer.train_set[0][2] == {} and "rgb" not in trainer.train_set.data
        else:
            assert trainer.ground_truth == {} and set(trainer.train_set[0][2]) == {"rgb", "object_mask"}
        trainer.run()
        states[mode] = load_model_ckpt(trainer.exp.train_dir)["model_state_dict"]
    for key, value in states["off"].items():
        assert torch.equal(states["on"][key], value), key


def test_ground_truth_on_device_auto_and_its_errors(subject, tmp_path, monkeypatch):
    # "auto": off the GPU never; on a GPU up to a tenth of its memory.
    conf = tiny(SUBJECT1, subject, tmp_path / "auto")
    assert conf.train.ground_truth_on_device == "auto"
    assert Trainer(conf, nepoch=1, device="cpu").ground_truth == {}
    cuda = torch.device("cuda", 0)
    for gib, fits, too_big in ((24.0, 1.6, 2.5), (139.8, 12.6, 14.0)):  # synthetic512; a 3,000-frame subject
        monkeypatch.setattr(trainer_module, "gpu_memory_gib", lambda device, g=gib: g)
        assert trainer_module.ground_truth_fits(cuda, int(fits * 2**30)), gib
        assert not trainer_module.ground_truth_fits(cuda, int(too_big * 2**30)), gib
    assert not trainer_module.ground_truth_fits(torch.device("cpu"), 1)
    # "on" without the images loaded at start: one message naming both keys, and nothing written.
    conf = tiny(SUBJECT1, subject, tmp_path / "on",
                **{"train.ground_truth_on_device": "on", "dataset.train.load_images": False})  # fmt: skip
    with pytest.raises(PointAvatarError, match=r"dataset\.train\.load_images = true.*ground_truth_on_device"):
        Trainer(conf, nepoch=1, device="cpu")
    assert not (tmp_path / "on").exists()  # checked before anything is written
