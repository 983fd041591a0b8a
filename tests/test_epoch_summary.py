"""benchmarks/epoch_summary.py reads the trainer's epoch lines (with and without the CUDA-graph part)."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from run_fixtures import SUBJECT1, tiny

from pointavatar.train.graphed_step import GraphedStep
from pointavatar.train.trainer import Trainer

sys.path.append(str(Path(__file__).resolve().parents[1] / "benchmarks"))  # after the packages: no shadowing
import epoch_summary  # noqa: E402


def graph_part(captures: int, capture_s: float, eager: int, eager_s: float) -> str:
    """The suffix the trainer writes for an epoch with these counts (Trainer._graph_summary itself)."""
    step = GraphedStep(torch.nn.Linear(2, 2), loss_fn=None)
    trainer = SimpleNamespace(graphed_step=step)
    trainer._graph_counts = lambda: Trainer._graph_counts(trainer)
    before = trainer._graph_counts()
    step.captures, step.capture_seconds, step.eager_steps, step.eager_seconds = (
        captures,
        capture_s,
        eager,
        eager_s,
    )
    return Trainer._graph_summary(trainer, before)


def test_epoch_lines_are_summed_by_point_band():
    log = "\n".join(
        [
            "Canonical expression: ...",
            "epoch 0/2 done in 16.0 s (400 points, radius 0.16875, batch 16; data wait 0.50 s)"
            + graph_part(1, 9.5, 1, 5.25),
            "  1/3 epochs of this run done; about 10 s left",
            "epoch 1/2 done in 1.5 s (327 points, radius 0.16875, batch 16; data wait 0.25 s)"
            + graph_part(1, 0.25, 1, 0.5),
            "epoch 2/2 done in 3.5 s (128674 points, radius 0.00535, batch 6; data wait 0.00 s)"
            + graph_part(1, 0.5, 2, 1.0),
        ]
    )
    rows = epoch_summary.parse(log)
    assert [r["epoch"] for r in rows] == [0, 1, 2] and rows[2]["batch"] == 6
    summary = epoch_summary.summarize(rows)
    approx = pytest.approx
    assert summary[0] == ("327 to 400 points", 2, approx(17.5), approx(0.75), approx(9.75), approx(5.75))
    assert summary[-1] == ("all epochs", 3, approx(21.0), approx(0.75), approx(10.25), approx(6.75))


def test_lines_without_seconds_or_graph_give_epoch_times_only():
    log = "\n".join(
        [
            "epoch 0/1 done in 2.6 s (400 points, radius 0.16875, batch 16)",  # train.cuda_graph off
            "epoch 1/1 done in 1.9 s (327 points, radius 0.16875, batch 16); CUDA graph: 1 captured, 1 eager steps",
        ]
    )
    total = epoch_summary.summarize(epoch_summary.parse(log))[-1]
    assert total == ("all epochs", 2, pytest.approx(4.5), None, None, None)


def test_a_real_epoch_line_of_the_trainer_is_read(subject, tmp_path, capsys):
    """The trainer's own epoch lines (CPU: no CUDA-graph part), data wait included."""
    conf = tiny(SUBJECT1, subject, tmp_path)
    Trainer(conf, nepoch=1, device="cpu").run()
    rows = epoch_summary.parse(capsys.readouterr().out)
    assert [r["epoch"] for r in rows] == [0, 1]
    assert all(r["data_s"] is not None and 0 <= r["data_s"] <= r["seconds"] for r in rows)
    assert all(r["capture_s"] is None for r in rows)
