"""``--profile_epoch``: torch.profiler over steps of one epoch of a real (tiny, CPU) run."""

from __future__ import annotations

import pytest
from run_fixtures import ROOT, tiny

from pointavatar.cli.exp_runner import main
from pointavatar.errors import PointAvatarError
from pointavatar.train.profiling import SKIP_STEPS, first_profiled_step
from pointavatar.train.trainer import Trainer

SUBJECT1 = ROOT / "confs" / "subject1.conf"


def test_first_profiled_step_skips_the_epochs_first_steps_where_it_can():
    assert SKIP_STEPS == 3
    assert first_profiled_step(67, 10) == 3  # a long epoch: after its eager steps and capture
    assert first_profiled_step(12, 10) == 2  # as late as the 10 steps still fit
    assert first_profiled_step(4, 4) == 0  # every step of a short epoch


def test_profile_epoch_profiles_the_trainers_steps_of_that_epoch(subject, tmp_path, capsys):
    # One frame a batch: 4 steps an epoch, so steps 2 and 3 of epoch 1 are the profiled ones.
    conf = tiny(SUBJECT1, subject, tmp_path, **{"train.max_batch": 1})
    trainer = Trainer(conf, nepoch=1, device="cpu", profile_epoch=1, profile_steps=2)
    trainer.run()
    train_dir = trainer.exp.train_dir
    assert not (train_dir / "profile_epoch0.txt").exists()
    text = (train_dir / "profile_epoch1.txt").read_text()
    assert text.startswith("epoch 1, training steps profiled: 2 (torch.profiler, cpu)\n")
    assert "wall time per step: " in text and "CPU time per step in operators: " in text
    # The trainer's whole step is inside: the forward's products and the optimizer's step.
    assert "aten::addmm" in text and "Optimizer.step#Adam.step" in text
    assert f"Profile of 2 steps of epoch 1: {train_dir / 'profile_epoch1.txt'}" in capsys.readouterr().out


def test_profile_epoch_outside_the_run_is_refused_before_anything_is_written(subject, tmp_path):
    conf = tiny(SUBJECT1, subject, tmp_path)
    with pytest.raises(PointAvatarError, match=r"--profile_epoch 5: this run trains epochs 0\.\.1; pick one"):
        Trainer(conf, nepoch=1, device="cpu", profile_epoch=5)
    with pytest.raises(PointAvatarError, match="--profile_steps 0: profile at least 1 step"):
        Trainer(conf, nepoch=1, device="cpu", profile_epoch=1, profile_steps=0)
    assert not (tmp_path / "synthetic").exists() and not any(tmp_path.iterdir())


def test_profile_epoch_with_is_eval_is_one_error_line(tmp_path, capsys):
    conf = tmp_path / "a.conf"
    conf.write_text("train { }\n")
    assert main(["--conf", str(conf), "--is_eval", "--profile_epoch", "3"]) == 1
    assert "error: --profile_epoch profiles training steps" in capsys.readouterr().err
