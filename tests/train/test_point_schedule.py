"""PointSchedule unit tests: prune, upsample, optimizer-state resizing in both modes, derived values."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from tolerances import assert_close
from torch import nn

from pointavatar.config import Conf, PointCloudConf
from pointavatar.errors import PointAvatarError
from pointavatar.model import PointCloud
from pointavatar.train.schedule import PRUNE_MIN_RADIUS, PointSchedule, make_optimizer, uses_fused_adam


class TinyModel(nn.Module):
    """A point cloud and one network layer: what the schedule touches of a PointAvatar."""

    def __init__(self, n_points: int):
        super().__init__()
        self.pc = PointCloud(dataclasses.replace(PointCloudConf(), n_init_points=n_points, max_points=64))
        self.net = nn.Linear(3, 2)

    def loss(self) -> torch.Tensor:
        return (self.net(self.pc.points) ** 2).sum()


def make(n_points=8, **train):
    torch.manual_seed(0)
    conf = Conf()
    conf = conf.override(
        {
            "model.point_cloud.n_init_points": n_points,
            "model.point_cloud.max_points": 64,
            **{f"train.{k}": v for k, v in train.items()},
        }
    )
    model = TinyModel(n_points)
    schedule = PointSchedule(conf)
    optimizer = torch.optim.Adam(model.parameters(), lr=conf.train.learning_rate)
    return conf, model, schedule, optimizer


def adam_steps(model, optimizer, n=2):
    for _ in range(n):
        optimizer.zero_grad()
        model.loss().backward()
        optimizer.step()


def fragments(visible_rows: list[int], n_points: int):
    """Fragments of one 1x1-pixel-per-point image in which exactly ``visible_rows`` are front-most."""
    idx = torch.full((1, 1, len(visible_rows), 2), -1, dtype=torch.int64)
    idx[0, 0, :, 0] = torch.tensor(visible_rows)
    weights = torch.zeros(idx.shape)
    return idx, weights


def test_observe_marks_front_and_heavy_points():
    _, model, schedule, _ = make(6)
    idx = torch.tensor([[[[1, 4], [-1, -1], [3, 5]]]])  # [B=1, H=1, W=3, K=2], packed b*N+p
    weights = torch.tensor([[[[0.4, 0.6], [0.0, 0.0], [0.9, 0.1]]]])
    schedule.reset_visibility(model.pc.points)
    schedule.observe(idx, weights, 6)
    # Front-most of each pixel: 1 and 3; heavier than prune_thresh 0.5: 4 (0.6) and 3 (0.9); 5 stays out.
    assert schedule.visible.tolist() == [False, True, False, True, True, False]


def test_observe_matches_a_set_reference_on_random_batches():
    """Random packed indices over B = 3 frames (-1 holes, weights either side of the threshold), OR-ed
    over two calls, N = 50: the visible set is the one a plain loop over the slots builds."""
    n = 50
    _, model, schedule, _ = make(n)
    schedule.reset_visibility(model.pc.points)
    g = torch.Generator().manual_seed(3)
    expected = set()
    for _ in range(2):
        idx = torch.randint(-1, 3 * n, (3, 2, 2, 3), generator=g)
        weights = torch.rand(idx.shape, generator=g)
        schedule.observe(idx, weights, n)
        for pix_idx, pix_w in zip(idx.reshape(-1, 3).tolist(), weights.reshape(-1, 3).tolist(), strict=True):
            if pix_idx[0] >= 0:
                expected.add(pix_idx[0] % n)
            expected |= {i % n for i, w in zip(pix_idx, pix_w, strict=True) if i >= 0 and w > 0.5}
    assert set(torch.nonzero(schedule.visible).reshape(-1).tolist()) == expected
    assert 0 < len(expected) < 50  # the draw leaves points on both sides, so the check can fail


def test_prune_keeps_visible_points_and_moves_adam_moments_with_them():
    _, model, schedule, optimizer = make(8, keep_optimizer_state=True)
    adam_steps(model, optimizer)
    old_points = model.pc.points.detach().clone()
    old_state = {k: v.clone() for k, v in optimizer.state[model.pc.points].items()}
    net_state = {k: v.clone() for k, v in optimizer.state[model.net.weight].items()}
    schedule.reset_visibility(model.pc.points)
    schedule.observe(*fragments([1, 5, 6], 8), 8)
    change, optimizer = schedule.begin_epoch(1, 0, model, optimizer)
    assert change.pruned and not change.upsampled
    assert torch.equal(model.pc.points.detach(), old_points[[1, 5, 6]])
    state = optimizer.state[model.pc.points]
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(state[key], old_state[key][[1, 5, 6]])
    assert int(state["step"]) == 2
    for key, value in net_state.items():
        assert torch.equal(optimizer.state[model.net.weight][key], value)  # networks: carried as they are
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-4)  # base rate; the trainer decays on top
    assert schedule.visible.shape == (3,) and not schedule.visible.any()  # reset for the new epoch


def test_faithful_mode_starts_a_fresh_adam_after_a_resize():
    _, model, schedule, optimizer = make(8)
    adam_steps(model, optimizer)
    schedule.reset_visibility(model.pc.points)
    schedule.observe(*fragments([0, 2], 8), 8)
    _, new = schedule.begin_epoch(1, 0, model, optimizer)
    assert new is not optimizer and len(new.state) == 0  # the original: every moment reset (spec §7)


def test_upsample_doubles_points_shrinks_radius_and_extends_moments_with_zeros():
    conf, model, schedule, optimizer = make(8, keep_optimizer_state=True, upsample_freq=5)
    adam_steps(model, optimizer)
    radius = model.pc.radius
    old = model.pc.points.detach().clone()
    old_avg = optimizer.state[model.pc.points]["exp_avg"].clone()
    schedule.reset_visibility(model.pc.points)
    schedule.observe(*fragments(list(range(8)), 8), 8)  # all visible: the prune keeps every point
    torch.manual_seed(3)
    change, optimizer = schedule.begin_epoch(5, 0, model, optimizer)
    assert change.upsampled
    points = model.pc.points.detach()
    assert points.shape == (16, 3)
    assert torch.equal(points[:8], old)
    # Jitter U(-0.5, 0.5) * radius; 1e-7 slack for the float32 rounding of old + jitter (ulp(0.5) = 6e-8).
    assert ((points[8:] - old).abs() <= 0.5 * radius + 1e-7).all()
    assert model.pc.radius == pytest.approx(radius * 0.75)
    avg = optimizer.state[model.pc.points]["exp_avg"]
    assert torch.equal(avg[:8], old_avg) and torch.equal(avg[8:], torch.zeros(8, 3))


def test_upsample_rules():
    _, model, schedule, optimizer = make(8, upsample_freq=5)
    schedule.reset_visibility(model.pc.points)
    schedule.observe(*fragments(list(range(8)), 8), 8)
    change, _ = schedule.begin_epoch(4, 4, model, optimizer)  # resumed epoch: no prune; 4 % 5: no upsample
    assert not change.resized
    change, _ = schedule.begin_epoch(0, 0, model, optimizer)  # epoch 0 never upsamples
    assert not change.upsampled
    model.pc.init(40)  # 40 > max_points / 2 = 32: no more doubling
    schedule.reset_visibility(model.pc.points)
    schedule.observe(*fragments(list(range(40)), 40), 40)
    change, _ = schedule.begin_epoch(10, 10, model, optimizer)
    assert not change.upsampled


def test_prune_stops_below_the_minimum_radius_and_refuses_an_empty_cloud():
    _, model, schedule, optimizer = make(8)
    schedule.reset_visibility(model.pc.points)
    with pytest.raises(PointAvatarError, match="pruning would delete all 8 points"):
        schedule.begin_epoch(1, 0, model, optimizer)
    model.pc.radius = PRUNE_MIN_RADIUS * 0.99
    change, _ = schedule.begin_epoch(1, 0, model, optimizer)
    assert not change.pruned and model.pc.n_points == 8


def test_resumed_visibility_prunes_at_the_resumed_epoch():
    _, model, schedule, optimizer = make(8)
    visible = torch.zeros(8, dtype=torch.bool)
    visible[[2, 3]] = True
    schedule.load_state_dict({"visible_points": visible}, model.pc.points)
    change, _ = schedule.begin_epoch(7, 7, model, optimizer)
    assert change.pruned and model.pc.n_points == 2
    other = PointSchedule(Conf())
    other.load_state_dict({"visible_points": torch.ones(5, dtype=torch.bool)}, model.pc.points)
    assert not other.resumed_visibility  # saved for another cloud size: ignored


def test_epoch_values_are_one_function_of_epoch_and_cloud_size():
    conf = Conf()  # lbs_weight 10, milestones [10, 20, 30, 40], factor 0.5, budget 819200, max_batch 8
    schedule = PointSchedule(conf)
    assert schedule.epoch_values(9, 400).lbs_weight == 10.0
    assert schedule.epoch_values(10, 400).lbs_weight == 5.0  # decayed from the start of epoch 10
    assert schedule.epoch_values(41, 400).lbs_weight == 0.625
    assert schedule.epoch_values(0, 400).batch_size == 8
    assert schedule.epoch_values(0, 409600).batch_size == 2
    assert schedule.epoch_values(0, 10**7).batch_size == 1


def test_fused_adam_takes_the_default_adams_steps_and_survives_a_resize():
    """The fused Adam (fast path on CUDA; its CPU kernel here) updates as torch's default Adam, and a
    resize keeps it fused with its moments moved."""
    _, model, schedule, default = make(8, keep_optimizer_state=True)
    fused_model = copy.deepcopy(model)
    fused = make_optimizer(fused_model, default.param_groups[0]["lr"], fused=True)
    assert fused.defaults["fused"] and not default.defaults["fused"]
    adam_steps(model, default, n=5)
    adam_steps(fused_model, fused, n=5)
    for (name, a), b in zip(model.named_parameters(), fused_model.parameters(), strict=True):
        assert_close(b, a, msg=name)  # the same formulas, possibly in another order: fp32's default tolerance
    schedule.reset_visibility(fused_model.pc.points)
    schedule.observe(*fragments([1, 5, 6], 8), 8)
    old_avg = fused.state[fused_model.pc.points]["exp_avg"].clone()
    change, fused = schedule.begin_epoch(1, 0, fused_model, fused)
    assert change.pruned and fused.defaults["fused"]
    assert torch.equal(fused.state[fused_model.pc.points]["exp_avg"], old_avg[[1, 5, 6]])
    adam_steps(fused_model, fused, n=1)  # the moved state (its step counts) is usable by the fused kernel
    assert int(fused.state[fused_model.pc.points]["step"]) == 6


def test_fused_adam_only_on_cuda_with_the_fast_path():
    class Stub:
        def __init__(self, fast):
            self.fast = fast

        def uses_fast_path(self, device):
            return self.fast

    assert uses_fused_adam(Stub(True), torch.device("cuda", 0))
    assert not uses_fused_adam(Stub(False), torch.device("cuda", 0))  # the reference path: torch's default
    assert not uses_fused_adam(Stub(True), torch.device("cpu"))


def test_adam_state_moves_between_the_fused_and_the_default_adam():
    """A run resumed with the other Adam (trained on CUDA with the fast path, resumed on the CPU or
    with the reference path, or the other way) loads the checkpointed state and steps on alike."""
    _, model, _, default = make(8)
    adam_steps(model, default, n=3)
    twin = copy.deepcopy(model)
    fused = make_optimizer(twin, default.param_groups[0]["lr"], fused=True)
    fused.load_state_dict(copy.deepcopy(default.state_dict()))  # copies: as from a checkpoint file
    back = make_optimizer(model, default.param_groups[0]["lr"])
    back.load_state_dict(copy.deepcopy(fused.state_dict()))
    adam_steps(twin, fused, n=2)
    adam_steps(model, back, n=2)
    for (name, a), b in zip(model.named_parameters(), twin.parameters(), strict=True):
        assert_close(b, a, msg=name)
    assert int(fused.state[twin.pc.points]["step"]) == int(back.state[model.pc.points]["step"]) == 5
