"""GraphedStep's decisions that need no GPU (the capture itself is tested on the GPU: tests/model/
test_graphed_step.py)."""

from __future__ import annotations

import pytest
import torch

from pointavatar.train.graphed_step import GraphedStep


def test_no_capture_after_a_compile_fallback(monkeypatch):
    """Once a torch.compile of the fast path has failed (the model's ``compile_fell_back``: its pieces, or
    the fused passes; tests/model/test_fast_path.py), the steps stay eager: a capture would fail on the
    failed trace's leftover autograd state."""
    model = torch.nn.Linear(2, 2)
    model.compile_fell_back = True
    step = GraphedStep(model, loss_fn=None)
    calls = []
    monkeypatch.setattr(step, "_eager", lambda *args: calls.append("eager"))
    monkeypatch.setattr(step, "_capture", lambda *args: pytest.fail("captured after a compile fallback"))
    model_input, ground_truth = {"x": torch.zeros(2, 3)}, {"rgb": torch.zeros(2, 3)}
    with pytest.warns(UserWarning, match="run eagerly from now on"):
        for _ in range(3):  # the same configuration: the second and third steps would capture and replay
            step(model_input, ground_truth, 1.0)
    assert calls == ["eager"] * 3


def test_capture_after_the_first_step_of_a_configuration(monkeypatch):
    """Without a fallback: the first step of a configuration is eager, the second captures."""
    model = torch.nn.Linear(2, 2)
    model.compile_fell_back = False
    step = GraphedStep(model, loss_fn=None)
    calls = []
    monkeypatch.setattr(step, "_eager", lambda *args: calls.append("eager"))
    monkeypatch.setattr(step, "_capture", lambda *args: calls.append("capture") or "captured")
    monkeypatch.setattr(step, "_replay", lambda *args: calls.append("replay"))
    model_input, ground_truth = {"x": torch.zeros(2, 3)}, {"rgb": torch.zeros(2, 3)}
    for _ in range(3):
        step(model_input, ground_truth, 1.0)
    assert calls == ["eager", "capture", "replay", "replay"]


def test_out_of_memory_in_the_capture_is_passed_on_as_such(monkeypatch):
    """A capture that runs out of memory is not the graph's failure (whose message says to turn the graph
    off): the out-of-memory error goes up, for the trainer to name the memory keys; other capture errors
    stay a PointAvatarError with the graph's fix."""
    from pointavatar.errors import PointAvatarError

    model = torch.nn.Linear(2, 2)
    model.compile_fell_back = False
    model_input, ground_truth = {"x": torch.zeros(2, 3)}, {"rgb": torch.zeros(2, 3)}

    def capture_failing(error):
        def capture(*args):
            try:
                raise error
            except Exception as inner:  # as a capture's end does: another error raised while handling it
                raise RuntimeError("CUDA graph capture invalidated") from inner

        return capture

    for error, expected in ((torch.cuda.OutOfMemoryError("CUDA out of memory"), torch.cuda.OutOfMemoryError),
                            (RuntimeError("operation not permitted when stream is capturing"), PointAvatarError)):  # fmt: skip
        step = GraphedStep(model, loss_fn=None)
        monkeypatch.setattr(step, "_eager", lambda *args: None)
        monkeypatch.setattr(step, "_capture", capture_failing(error))
        step(model_input, ground_truth, 1.0)  # eager: the first step of the configuration
        with pytest.raises(expected) as info:
            step(model_input, ground_truth, 1.0)
        assert str(error) in str(info.value)
        if expected is PointAvatarError:
            assert "train.cuda_graph = false" in str(info.value)


def test_epoch_summary_gives_the_graph_counts_and_seconds_of_the_epoch():
    """The trainer's epoch line: this epoch's captures and eager steps with the seconds they took
    (GraphedStep's cumulative counters minus those at the epoch's start)."""
    from types import SimpleNamespace

    from pointavatar.train.trainer import Trainer

    step = GraphedStep(torch.nn.Linear(2, 2), loss_fn=None)
    trainer = SimpleNamespace(graphed_step=step)
    trainer._graph_counts = lambda: Trainer._graph_counts(trainer)
    step.eager_steps, step.captures, step.eager_seconds, step.capture_seconds = 3, 2, 1.0, 0.5
    before = trainer._graph_counts()
    step.eager_steps, step.captures, step.overflows = 5, 3, 1
    step.eager_seconds, step.capture_seconds = 1.84, 0.81
    assert Trainer._graph_summary(trainer, before) == (
        "; CUDA graph: 1 captured (0.31 s), 2 eager steps (0.84 s), 1 rerun (rasterizer budget)"
    )
    trainer.graphed_step = None
    assert Trainer._graph_summary(trainer, before) == ""
