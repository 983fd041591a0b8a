"""HOCON configuration -> typed dataclass tree (spec §1).

The original reads its HOCON files with `pyhocon` and `conf.get_*` calls scattered through the code. Here
a conf file is parsed once, at the boundary, into a tree of dataclasses whose field names are the original
HOCON keys and whose defaults are the original's values (the shipped `subject1.conf`, spec §1.2, and the
code defaults of spec §1.3). Keys we added are marked "(ours)". Unknown keys and wrong types stop the
program with a `ConfError` naming the file, the full key path and, for a typo, the closest valid key.
Values out of their allowed range (field metadata `_range` / `_check`, and the cross-field checks of
`_check_conf`) are refused the same way, naming the key and the range, when a file is loaded and after
`override`. `include "other.conf"` statements resolve against the including file's folder; an include of a
missing file is an error (pyhocon alone skips it silently).

Public API:
    load_conf(path) -> Conf             parse and validate a HOCON file
    parse_conf(text, source, base_dir) -> Conf  the same from a string (includes resolve against base_dir)
    override(conf, {"a.b.c": v}) -> Conf  a validated copy with dotted keys replaced (also `Conf.override`)
    dump_conf(conf) -> str              HOCON text that `parse_conf` reads back to an equal Conf
    save_conf(conf, path)               write `dump_conf(conf)` to a file (the run folder's runconf.conf)
    conf_to_dict(conf) -> dict          plain nested dict of the HOCON keys (for loggers)

Path values (exps_folder, data_folder, FLAME files) are relative to the current working directory, which
is the repository root for our scripts (the original ran from `code/` and used `../data/...`).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import glob
import json
import math
import os
import re
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pointavatar.errors import PointAvatarError

__all__ = [
    "ConfError",
    "Conf",
    "TrainConf",
    "LossConf",
    "DatasetConf",
    "SplitConf",
    "SyntheticConf",
    "ModelConf",
    "GeometryNetworkConf",
    "RenderingNetworkConf",
    "DeformerNetworkConf",
    "PointCloudConf",
    "load_conf",
    "parse_conf",
    "override",
    "dump_conf",
    "save_conf",
    "conf_to_dict",
]


class ConfError(PointAvatarError):
    """A conf file (or an override) has an unknown key, a value of the wrong type, or cannot be read."""


def _choices(*values: str) -> dict[str, Any]:
    """Field metadata: the value must be one of `values`."""
    return {"choices": values}


def _num(bound: float) -> str:
    """A bound as written in messages: 1 and 1.0 as "1", 1e-3 as "0.001"."""
    return str(int(bound)) if float(bound).is_integer() else repr(float(bound))


@dataclass(frozen=True)
class _Range:
    """Allowed interval of a number (or of every entry of a list of numbers); None = unbounded."""

    min: float | None = None
    max: float | None = None
    min_exclusive: bool = False
    max_exclusive: bool = False

    def contains(self, value: float) -> bool:
        if self.min is not None and (value <= self.min if self.min_exclusive else value < self.min):
            return False
        if self.max is not None and (value >= self.max if self.max_exclusive else value > self.max):
            return False
        return True

    def describe(self) -> str:
        """ ">= 1", "> 0", "in [0, 1]", ..."""
        if self.min is not None and self.max is not None:
            left = "(" if self.min_exclusive else "["
            right = ")" if self.max_exclusive else "]"
            return f"in {left}{_num(self.min)}, {_num(self.max)}{right}"
        if self.min is not None:
            return f"{'>' if self.min_exclusive else '>='} {_num(self.min)}"
        if self.max is not None:
            return f"{'<' if self.max_exclusive else '<='} {_num(self.max)}"
        return "any number"


def _range(
    min: float | None = None,
    max: float | None = None,
    *,
    min_exclusive: bool = False,
    max_exclusive: bool = False,
) -> dict[str, Any]:
    """Field metadata: the number (for a list field: every entry) must lie in this interval."""
    return {"range": _Range(min, max, min_exclusive, max_exclusive)}


def _check(predicate: Callable[[Any], bool], requirement: str) -> dict[str, Any]:
    """Field metadata: `predicate(value)` must hold; the error says the value "must be <requirement>"."""
    return {"check": (predicate, requirement)}


def _is_square_res(value: list[int]) -> bool:
    return len(value) == 2 and value[0] >= 1 and value[0] == value[1]


def _is_subsample(value: int | list[int]) -> bool:
    if isinstance(value, int):
        return value >= 1
    if not value or any(v < 0 for v in value):
        return False
    # Two entries are the range [first, end) (spec §3.4); an empty range selects no frame.
    return len(value) != 2 or value[0] < value[1]


# Field metadata marking a field that is not a HOCON key (never read from or written to a conf file).
_INTERNAL = {"internal": True}


# ----------------------------------------------------------------------------------------------------
# The tree. Defaults = the original's values (spec §1.2 subject1.conf, spec §1.3 code defaults).
# ----------------------------------------------------------------------------------------------------


@dataclass
class TrainConf:
    """`train { }`: experiment folders, optimizers, schedules, checkpointing (spec §1.2, §2, §7)."""

    exps_folder: str = "./data/experiments/"
    """Root of the experiment outputs; run dir = exps_folder/subject_name/methodname/<train sub_dirs joined
    by '+'>/ (spec §2.2). Relative to the working directory (the original: ../data/experiments/ from code/)."""
    methodname: str = "pointavatar"
    """Third path component of the experiment dir; also part of the logged run name."""
    dataset_class: str = "datasets.real_dataset.FaceDataset"
    """Informational only, kept so the original confs parse: the original resolved this dotted class path
    dynamically; we always use pointavatar.data.FaceDataset."""
    learning_rate: float = field(default=1.0e-4, metadata=_range(min=0, min_exclusive=True))
    """Adam learning rate for all model parameters (networks and point positions) (spec §7)."""
    learning_rate_cam: float = field(default=5.0e-4, metadata=_range(min=0, min_exclusive=True))
    """SparseAdam learning rate for the per-frame expression, FLAME pose and camera translation; used in
    training (from epoch 11) and in test-time tracking (spec §2.6, §2.9)."""
    num_pixels: int = 2048
    """Unused (a leftover of IMavatar's ray sampling): full images are always rendered."""
    max_points_training: int = field(default=819200, metadata=_range(min=1))
    """Budget of frames x points per step: batch size = min(floor(max_points_training / N), max_batch),
    recomputed at init, after each upsampling, at resume and in test (spec §2.7). Lower it if memory is
    short."""
    max_batch: int = field(default=8, metadata=_range(min=1))
    """Upper bound on the number of frames per batch."""
    upsample_freq: int = field(default=5, metadata=_range(min=1))
    """Double the points (and shrink the radius) when epoch % upsample_freq == 0, epoch != 0, and
    N <= point_cloud.max_points / 2 (spec §2.5)."""
    plot_freq: int = field(default=1, metadata=_range(min=1))
    """Plot the test split at epochs where (e % plot_freq == 0 and e < 5) or e is even (spec §2.5)."""
    sched_milestones: list[int] = field(default_factory=lambda: [40, 60], metadata=_range(min=0))
    """MultiStepLR milestones (epochs). A no-op in the original because Adam is re-created at every
    prune/upsample (spec §10.1); see fix_lr_schedule."""
    sched_factor: float = field(default=0.5, metadata=_range(min=0, min_exclusive=True))
    """MultiStepLR gamma (same caveat as sched_milestones)."""
    GT_lbs_milestones: list[int] = field(default_factory=lambda: [10, 20, 30, 40], metadata=_range(min=0))
    """At the start of these epochs loss.lbs_weight is multiplied by GT_lbs_factor (replayed on resume)."""
    GT_lbs_factor: float = field(default=0.5, metadata=_range(min=0, min_exclusive=True))
    """Decay factor of loss.lbs_weight at each GT_lbs_milestone."""
    optimize_expression: bool = True
    """Learn a per-training-frame expression (50-d embedding initialised from the JSON) (spec §2.6)."""
    optimize_camera: bool = True
    """Learn a per-frame FLAME pose (15-d) and camera translation (3-d); the rotation is never optimized."""
    nepoch: int = field(default=62, metadata=_range(min=0))
    """(ours) Last training epoch, inclusive: epochs 0..nepoch, so 63 from scratch (spec §2.1). The
    command-line --nepoch overrides it; the original had only the command-line flag, default 62."""
    save_freq: int = field(default=1, metadata=_range(min=1))
    """Write `latest.pth` checkpoints every save_freq epochs (spec §1.3, code default of the original)."""
    checkpoint_freq: int = field(default=5, metadata=_range(min=1))
    """(ours) Also write a numbered `<epoch>.pth` checkpoint every checkpoint_freq epochs (original:
    hard-coded 5, spec §2.3)."""
    log_freq: int = field(default=50, metadata=_range(min=1))
    """(ours) Print and log the averaged loss terms every log_freq iterations (original: hard-coded 50)."""
    num_workers: int = field(default=4, metadata=_range(min=0))
    """(ours) DataLoader worker processes for the train and plot loaders (original: hard-coded 4); 0 loads
    in the main process."""
    input_optimization_start: int = field(default=11, metadata=_range(min=0))
    """(ours) First epoch at which the per-frame inputs are optimized (original: hard-coded `epoch > 10`,
    spec §2.5); before it they receive no gradient at all (spec §10.3)."""
    cuda_graph: bool = True
    """(ours) On CUDA, replay each step's forward, loss and backward from a CUDA graph, captured again
    whenever the point count, batch, radius or FLAME-prior weight changes (train/graphed_step.py): the
    same kernels, launched at once, so small point counts stop being bound by the host (6,400 points:
    24.5 -> 11.7 ms a step on the H200). Ignored on the CPU. False: every step launched eagerly."""
    ground_truth_on_device: str = field(default="auto", metadata=_choices("auto", "on", "off"))
    """(ours) Where the training images and masks wait for their batch. "on": all of them (float32,
    as loaded) stay on the training device, and each step gathers its frames there by index; the
    DataLoader then moves only the small per-frame inputs (a 16-frame 512 x 512 batch is 64 MB to
    stack, pin and copy every step otherwise). Needs dataset.train.load_images. "off": every batch
    through the DataLoader's workers, as the original. Same batches and results either way. "auto": on
    on a CUDA device when they take at most a tenth of its memory (synthetic512: 1.6 GB), off otherwise
    (a real subject of 3,000 frames at 512 x 512 is 12.6 GB: on for the H200's 141 GB)."""
    keep_optimizer_state: bool = False
    """(ours, quirk fix) True: keep the Adam moments across prune/upsample (resized with the points) and
    restore the optimizer state on resume. False (original, spec §7, §10.2): a fresh Adam each time."""
    fix_lr_schedule: bool = False
    """(ours, quirk fix) True: the MultiStepLR decay (sched_milestones, sched_factor) really applies to the
    model lr. False (original, spec §10.1): the effective lr stays constant at learning_rate."""
    prune_on_resume: bool = False
    """(ours, quirk fix) True: save the visibility flags with the checkpoint so a resumed run prunes at its
    first epoch. False (original, spec §2.4, §10.12): no pruning at the resumed epoch."""
    test_tracking: bool = True
    """(ours) True (original, spec §2.9): before computing test metrics, fit per-frame expression, pose and
    camera translation to the test images (tracking). False: render with the JSON parameters."""
    tracking_steps: int = field(default=20, metadata=_range(min=0))
    """(ours) SparseAdam iterations per test batch in test-time tracking (original: hard-coded 20)."""
    seed: int = field(default=0, metadata=_range(min=0))
    """(ours) Random seed of training: the model initialisation draws from it, and each epoch's random
    draws (shuffle, eikonal samples, upsample jitter) from (seed, epoch), so a resumed run repeats the
    draws of the run it continues. The original was unseeded."""
    lr_rank_scaling: str = field(default="linear", metadata=_choices("linear", "sqrt", "none"))
    """(ours) On K ranks (torchrun) a step sees K times the frames of a one-process step and an epoch has K
    times fewer steps; learning_rate is multiplied by K ("linear"), sqrt(K) ("sqrt") or 1 ("none"), the
    MultiStepLR decay included (README "Training on several GPUs": measured). No effect on one process.
    learning_rate_cam is never scaled: each frame's inputs are still updated once an epoch."""


@dataclass
class LossConf:
    """`loss { }`: weights of the loss terms (spec §6). Passed to `Loss` as keyword arguments."""

    mask_weight: float = field(default=1.0, metadata=_range(min=0))
    """Weight of the mask L1 loss."""
    lbs_weight: float = field(default=10.0, metadata=_range(min=0))
    """Global multiplier of the three FLAME-guided losses (skinning weights, pose correctives, expression
    blendshapes); decayed at train.GT_lbs_milestones."""
    eikonal_weight: float = field(default=0.1, metadata=_range(min=0))
    """Weight of the eikonal loss; must be > 0 when sdf_consistency_weight > 0."""
    sdf_consistency_weight: float = field(default=1.0, metadata=_range(min=0))
    """Weight of mean(sdf(points)^2), which keeps the points on the SDF zero level set."""
    vgg_feature_weight: float = field(default=0.1, metadata=_range(min=0))
    """Weight of the VGG16 perceptual loss; the VGG network (and its weight file) is needed only if > 0."""


@dataclass
class SplitConf:
    """`dataset.train { }` / `dataset.test { }`: which videos of the subject and how to load them (spec
    §3.4). Defaults are the train split of subject1; the test split's defaults differ in sub_dir and
    subsample."""

    sub_dir: list[str] = field(default_factory=lambda: ["MVI_1810", "MVI_1814"])
    """Video folders of the subject, in order; their frames are concatenated. Numeric names are read as
    strings (quote names with leading zeros, e.g. "007", or they lose the zeros in HOCON)."""
    img_res: list[int] = field(
        default_factory=lambda: [512, 512],
        metadata=_check(_is_square_res, "two equal integers [S, S] >= 1 (the renderer draws square images)"),
    )
    """[H, W] images and masks are resized to; must be square (the rasterizer draws img_res[0] x img_res[0]),
    and the test split's must equal the train split's (the model renders at one resolution)."""
    subsample: int | list[int] = field(
        default=1,
        metadata=_check(
            _is_subsample,
            "an int >= 1 or a non-empty list of frame indices >= 0 (two entries [first, end] need first < end)",
        ),
    )
    """Frame subsampling: int s > 1 keeps every s-th frame; [a, b] keeps frames a..b-1; any other list
    keeps those frame indices (spec §3.4)."""
    load_images: bool = True
    """Preload every image and mask into RAM at startup (about 4 MB per frame at 512x512)."""
    hard_mask: bool = False
    """Binarise the mask used for compositing the GT onto the background (spec §3.7); subject3 sets it."""


def _test_split_default() -> SplitConf:
    """subject1's `dataset.test` block: one video, every 200th frame for the training-time plots."""
    return SplitConf(sub_dir=["MVI_1812"], subsample=200)


@dataclass
class SyntheticConf:
    """(ours) `dataset.synthetic { }`: the generated FLAME-format demo subject (pointavatar.synthetic)."""

    generate: bool = False
    """Generate the synthetic subject (FLAME-format model files and an IMavatar-format dataset under
    data_folder/subject_name) if it is not there yet. False for real subjects."""
    seed: int = field(default=0, metadata=_range(min=0))
    """Random seed of the generator; the same seed gives the same files."""
    train_frames: int = field(default=100, metadata=_range(min=1))
    """Frames generated for each sub_dir of the train split."""
    test_frames: int = field(default=40, metadata=_range(min=1))
    """Frames generated for each sub_dir of the test split."""


@dataclass
class DatasetConf:
    """`dataset { }`: the IMavatar-format subject (spec §3)."""

    data_folder: str = "./data/datasets"
    """Dataset root; a subject lives in data_folder/subject_name/subject_name/<sub_dir>/ (spec §3.1).
    Relative to the working directory (the original: ../data/datasets from code/)."""
    subject_name: str = "subject1"
    """Subject folder name (appears twice in the dataset path) and second experiment path component."""
    json_name: str = "flame_params.json"
    """Name of the per-video JSON with cameras and FLAME parameters (spec §3.3)."""
    use_mean_expression: bool = True
    """Canonical expression = mean of the training expressions (else zeros)."""
    use_var_expression: bool = True
    """Scale the expression-blendshape regulariser by the per-dimension variance of the training
    expressions (less regularisation where expressions vary a lot) (spec §6)."""
    canonical_pose: float = 0.2
    """Jaw opening (rad, FLAME pose[6]) of the canonical FLAME state; the rest of the pose is zero. The
    original's code default when the key is absent is 0.2; the shipped confs set 0.4."""
    use_background: bool = False
    """Learn a per-pixel background image instead of compositing on white (spec §1.3, §5.11)."""
    train: SplitConf = field(default_factory=SplitConf)
    """Training videos."""
    test: SplitConf = field(default_factory=_test_split_default)
    """Test videos (training-time plots and the test runner, which forces subsample 1, load_images False)."""
    synthetic: SyntheticConf = field(default_factory=SyntheticConf)
    """(ours) Synthetic demo subject generation."""


@dataclass
class GeometryNetworkConf:
    """`model.geometry_network { }`: IDR-style SDF + albedo MLP on canonical points (spec §5.3)."""

    d_in: int = field(default=3, metadata=_range(min=1))
    """Input dimensions (xyz)."""
    d_out: int = field(default=1, metadata=_range(min=1))
    """SDF output channels."""
    feature_vector_size: int = field(default=3, metadata=_range(min=0))
    """Extra output channels (albedo logits); the output width is d_out + feature_vector_size."""
    dims: list[int] = field(default_factory=lambda: [256] * 9, metadata=_range(min=1))
    """Hidden layer widths."""
    geometric_init: bool = True
    """SAL/IDR initialisation so the initial SDF is a sphere of radius `bias`."""
    bias: float = 0.6
    """Radius of the initial SDF sphere (last-layer bias -bias)."""
    skip_in: list[int] = field(default_factory=lambda: [4], metadata=_range(min=0))
    """Layers at which the (encoded) input is concatenated again."""
    weight_norm: bool = True
    """Weight normalisation on every linear layer."""
    multires: int = field(default=6, metadata=_range(min=0))
    """Frequencies of the NeRF positional encoding of the input (0 = raw xyz); 6 gives 39-d input."""


@dataclass
class RenderingNetworkConf:
    """`model.rendering_network { }`: shading MLP from the deformed normal to RGB shading (spec §5.5)."""

    d_in: int = field(default=3, metadata=_range(min=1))
    """Input dimensions (the deformed normal)."""
    feature_vector_size: int = field(default=0, metadata=_range(min=0))
    """Extra input features (none)."""
    d_out: int = field(default=3, metadata=_range(min=1))
    """RGB shading channels."""
    dims: list[int] = field(default_factory=lambda: [64, 64], metadata=_range(min=1))
    """Hidden layer widths."""
    weight_norm: bool = True
    """Weight normalisation on every linear layer."""
    multires_view: int = field(default=0, metadata=_range(min=0))
    """Positional-encoding frequencies of the view direction (0 = none)."""
    multires_pnts: int = field(default=0, metadata=_range(min=0))
    """Positional-encoding frequencies of the point position (0 = none)."""


@dataclass
class DeformerNetworkConf:
    """`model.deformer_network { }`: per-point offset, blendshapes and skinning weights (spec §5.4)."""

    d_in: int = field(default=3, metadata=_range(min=1))
    """Input dimensions (canonical xyz)."""
    dims: list[int] = field(default_factory=lambda: [128] * 4, metadata=_range(min=1))
    """Hidden layer widths."""
    weight_norm: bool = True
    """Weight normalisation on the hidden layers and skinning_linear (not on the zero-initialised heads)."""
    multires: int = field(default=0, metadata=_range(min=0))
    """Positional-encoding frequencies of the input (0 = raw xyz)."""
    num_exp: int = field(default=50, metadata=_range(min=1))
    """Number of expression blendshapes predicted per point."""
    ghostbone: bool = True
    """Add a sixth bone with an identity transform (torso, shoulders)."""
    deform_c: bool = True
    """Predict a canonical offset o(x), x' = x + o(x)."""


@dataclass
class PointCloudConf:
    """`model.point_cloud { }`: the canonical point cloud and its coarse-to-fine growth (spec §5.1, §5.14)."""

    n_init_points: int = field(default=400, metadata=_range(min=1))
    """Initial number of points (on a sphere)."""
    max_points: int = field(default=409600, metadata=_range(min=1))
    """Upsampling (doubling) is allowed only while N <= max_points / 2. Lower it if memory is short."""
    init_radius: float = field(default=0.5, metadata=_range(min=0, min_exclusive=True))
    """Radius of the initial point sphere (PointCloud constructor default; not settable in the original)."""
    radius_factor: float = field(default=0.3, metadata=_range(min=0, min_exclusive=True))
    """Initial rasterization radius (NDC) = radius_factor * 0.75 ** log2(N / 100) (spec §10.4)."""


@dataclass
class ModelConf:
    """`model { }`: networks, point cloud, FLAME files, renderer (spec §5)."""

    prune_thresh: float = field(default=0.5, metadata=_range(min=0, max=1))
    """A point counts as visible if its compositing weight exceeds this in some pixel (spec §5.12)."""
    flame_model_path: str = "./code/flame/FLAME2020/generic_model.pkl"
    """(ours) FLAME 2020 model file (generic_model.pkl, or .npz); original: hard-coded path (spec §2.1)."""
    flame_landmark_path: str = "./code/flame/FLAME2020/landmark_embedding.npy"
    """(ours) FLAME landmark embedding (for the landmark overlay in plots); original: hard-coded path."""
    render_backend: str = field(default="auto", metadata=_choices("auto", "torch", "cuda"))
    """(ours) Point rasterizer/compositor: "torch" (pure-PyTorch reference, any device), "cuda" (fast GPU
    path), "auto" (cuda on a CUDA device when available, else torch)."""
    implementation: str = field(default="auto", metadata=_choices("auto", "reference", "fast"))
    """(ours) The training-step engine. "reference": the straightforward autograd implementation (SDF
    normals by double backward, deformer Jacobian by forward-mode JVPs, 1-NN by candidate top-k), the
    truth in tests. "fast": explicit first-order SDF gradients and deformer tangents, the per-point work
    compiled with torch.compile on CUDA, the Triton 1-NN and, on CUDA, torch's fused Adam (same values
    and gradients, tested; the synthetic512 pair of runs in benchmarks/RESULTS.md). "auto": fast on a
    CUDA device, reference on the CPU (where the fast path gains nothing)."""
    recompute_chunk: int = field(default=0, metadata=_range(min=0))
    """(ours) Fast path, training only: the per-point work (SDF sweep, deformer, FLAME, shading) runs in
    chunks of this many points whose activations are recomputed in the backward instead of stored
    (torch.utils.checkpoint): far less GPU memory for about one more forward pass (at 409,600 points
    on an H200: 7.3 GiB and 190 ms a step with 65536, against 44 GiB and 136 ms with 0; README
    "Speed"). 0: one pass, all stored. Same values and gradients either way."""
    prior_query_chunk: int | str = field(
        default="auto",
        metadata=_check(lambda v: v == "auto" or (isinstance(v, int) and v >= 0), '"auto" or an int >= 0'),
    )
    """(ours) Fast path, training only: the FLAME prior's second deformer query (on the detached
    canonical points, spec §5.13) runs in chunks of this many points whose activations are recomputed
    in the backward (torch.utils.checkpoint; 5.2 KB a point kept without, 2.0 GiB at 409,600 points).
    0: one pass, all kept (the faster: 80 ms against 84 a step at 409,600 points on an H200,
    benchmarks/RESULTS.md step 8). "auto": 65536 where geometry_backward or deformer_backward resolves to
    a lean backward (by default GPUs below 44 GiB without bf16 tensor cores), else 0. Same values and
    gradients either way."""
    geometry_recompute_chunk: int | str = field(
        default="auto",
        metadata=_check(lambda v: v == "auto" or (isinstance(v, int) and v >= 0), '"auto" or an int >= 0'),
    )
    """(ours) Fast path, training, geometry_backward "autograd": the geometry network's compiled piece
    (forward and SDF-gradient sweep) runs in chunks of this many points whose activations are recomputed
    in the backward (torch.utils.checkpoint) instead of kept (24.5 GiB at 409,600 points in bf16). 0: one
    pass, all kept (the fastest). "auto": 131072 on GPUs below 22 GiB where both backwards resolve to
    "autograd" (with activation_memory_budget "auto": 89.5 ms and 5.5 GiB a step at 409,600 points on an
    H200, against 75.4 ms and 13.7 GiB without, benchmarks/RESULTS.md step 13), else 0. Same values and
    gradients."""
    activation_memory_budget: float | str = field(
        default="auto",
        metadata=_check(
            lambda v: v == "auto" or (isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v <= 1),
            '"auto" or a number in (0, 1]',
        ),
    )
    """(ours) Fast path, training, on CUDA: torch.compile's partitioner keeps at most about this fraction
    of what it would keep for the backward of each compiled piece, and recomputes the rest inside the
    backward (torch._functorch.config.activation_memory_budget; it recomputes the cheapest first, the
    elementwise work, which the backward's fused kernels then redo). 1.0: keep what the partitioner
    chooses (the fastest). At 409,600 points on an H200 (benchmarks/RESULTS.md step 13): 71.1 ms and
    34.2 GiB a step at 1.0, 74.6 ms and 16.1 GiB at 0.5, 75.4 ms and 13.7 GiB at 0.3; at 102,400 points
    28.2 ms and 9.7 GiB at 1.0, 29.4 ms and 3.9 GiB at 0.3. "auto": 0.3 on GPUs below 44 GiB where both
    backwards resolve to "autograd", else 1.0. Same values and gradients."""
    compile_size_hint: int | str = field(
        default="auto",
        metadata=_check(
            lambda v: v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and v >= 0),
            '"auto" or a point count >= 0',
        ),
    )
    """(ours) Fast path, training, on CUDA: the point count torch.compile generates the compiled pieces'
    kernels for (their point dimension stays dynamic: one compile serves every size). Without it
    inductor tunes them for the first step's cloud (400 points), which made a synthetic512 step at
    128,802 points take 39.7 ms of GPU time against 28.6 ms for the same step compiled at that size
    (benchmarks/RESULTS.md step 14): reductions over the points split and blocked for a few hundred rows.
    "auto": half of point_cloud.max_points (the size of the steps that take most of a run). 0: the
    first step's sizes. Same values (torch._dynamo.mark_dynamic's hint_override; ignored, with the
    first step's sizes, on torch builds without it)."""
    inverse_skinning: str = field(default="closed_form", metadata=_choices("closed_form", "lu"))
    """(ours) Fast path: how the inverse skinning inverts each point's blended canonical transform
    (4 x 4, spec §5.13). "closed_form": from cross products of its rows, elementwise, fused by
    torch.compile (2.5 ms less a step at 409,600 points on an H200, benchmarks/RESULTS.md step 8).
    "lu": a batched LU factorisation, as the reference path. Same values up to float32 rounding."""
    compile_prior_query: bool = True
    """(ours) Fast path, training, on CUDA: compile that query (each chunk) with torch.compile, as the
    per-point pieces are (it ran eagerly before: about 9 ms of the 87-ms step at 409,600 points on an
    H200, benchmarks/RESULTS.md step 7). False: eager. Same values and gradients."""
    geometry_backward: str = field(
        default="auto", metadata=_choices("auto", "autograd", "fused", "fused_recompute")
    )
    """(ours) Fast path, training: how the geometry network's forward and explicit SDF-gradient sweep
    are differentiated. "autograd": ordinary differentiable ops, every intermediate kept as autograd
    (or torch.compile's partitioner) chooses; the fastest. "fused": one autograd node with a hand-written
    backward (model/geometry_fused.py) that keeps only each hidden layer's pre-activation and sweep
    vector and recomputes the rest (same values and gradients, tested in float64). "fused_recompute":
    the same keeping the pre-activations only and running the sweep again in the backward. At 409,600
    points on an H200 with geometry_bf16 and deformer_backward "fused_bf16": 10.3 GiB and 111 ms a step,
    against 34.9 GiB and 93 ms with "autograd" for both (benchmarks/RESULTS.md, step 6). "auto":
    "autograd" on GPUs with at least 44 GiB of memory, and on smaller GPUs where the deformer's products
    run in bf16 (there with activation_memory_budget and geometry_recompute_chunk "auto": 13.7 GiB and
    75.4 ms from 22 GiB, 5.5 GiB and 89.5 ms below, benchmarks/RESULTS.md step 13), "fused_recompute" on
    other GPUs, "autograd" off CUDA; the trainer prints what it chose (model/point_avatar.py,
    PointAvatar.auto_backwards)."""
    deformer_backward: str = field(
        default="auto", metadata=_choices("auto", "autograd", "fused", "fused_bf16")
    )
    """(ours) Fast path, training: how the deformer network's layers with their three Jacobian
    tangents are differentiated. "autograd": ordinary differentiable ops (torch.compile chooses what to
    keep); the fastest. "fused": the trunk's and the skinning branch's Softplus layers as one autograd
    node each with a hand-written backward (model/deform_fused.py) keeping only the pre-activations and
    their tangents (same values and gradients, tested in float64). "fused_bf16": the same with the kept
    pre-activations stored in bf16 (float32 runs only; the forward values are unchanged, the gradients
    are computed from the rounded pre-activations). "auto": "autograd" on GPUs with at least 44 GiB and
    on smaller GPUs where its products run in bf16 (deformer_bf16, GPUs with bf16 tensor cores; with the
    geometry's "autograd" there and activation_memory_budget 0.3, 13.7 GiB and 75.4 ms a step at 409,600
    points on an H200, against 10.4 GiB and 103.5 ms for the lean pair, benchmarks/RESULTS.md steps 8
    and 13), "fused_bf16" on other GPUs below 44 GiB, "autograd" off CUDA."""
    geometry_bf16: bool = True
    """(ours) Fast path, training only: the geometry network's matrix products (its forward and the
    explicit gradient sweep) in bfloat16 with fp32 accumulation (torch.autocast; with the fused backward
    its own casts, and the kept activations in bf16 too); outputs back in the points' dtype; float32
    only (float64 is left exact). On an H200 with the CUDA graph at 409,600 points: 88 ms and 36.9 GiB
    a step against 120 ms and 43.6 GiB; canonical normals move by 0.57 degrees on average; synthetic512
    test PSNR 30.22 dB against the reference path's 30.33 dB in the same call (benchmarks/RESULTS.md,
    step 5). False: the geometry in float32 (TF32 products with model.tf32). On GPUs without bf16 tensor
    cores (before Ampere, compute capability 8.0) it stays in float32 either way. Eval, tracking and the
    baked renderer stay in full precision."""
    deformer_bf16: bool = True
    """(ours) Fast path, training, with deformer_backward "autograd": the deformer network's matrix
    products (its hidden layers', the skinning branch's hidden layer's and the blendshape head's, each
    for the point and its three tangents) in bfloat16 with fp32 accumulation, the results back in
    float32; float32 runs only, on GPUs with bf16 tensor cores (as geometry_bf16). The first layer
    (few encoding columns) and the skinning logits (multiplied by the softmax's temperature, which
    would multiply the rounding too) stay in float32. On an H200 with the defaults: 72.2 ms and 34.2 GiB
    a step at 409,600 points against 79.3 ms and 37.3 GiB in fp32 (TF32), 28.1 against 29.5 ms at
    102,400; synthetic512 test PSNR 30.37 dB against 30.39 dB with it off and the reference path's 30.19
    dB in the same call (benchmarks/RESULTS.md, step 10). False: those products in float32."""
    tf32: bool = True
    """Allow TF32 tensor-core matmuls on CUDA (fp32 storage and accumulation, inputs rounded to 10
    mantissa bits). On, as in the original's PyTorch 1.11 (its default on Ampere and later GPUs); canonical
    normals move by about 0.07 degrees on average, test PSNR within run-to-run spread
    (benchmarks/RESULTS.md). False: strict fp32 matmuls. Sets torch.backends.cuda.matmul.allow_tf32 for
    the whole process."""
    geometry_network: GeometryNetworkConf = field(default_factory=GeometryNetworkConf)
    """SDF + albedo network."""
    rendering_network: RenderingNetworkConf = field(default_factory=RenderingNetworkConf)
    """Shading network."""
    deformer_network: DeformerNetworkConf = field(default_factory=DeformerNetworkConf)
    """Deformation network."""
    point_cloud: PointCloudConf = field(default_factory=PointCloudConf)
    """Point cloud size limits and initial geometry."""


@dataclass
class Conf:
    """The whole configuration: the four top-level HOCON blocks."""

    train: TrainConf = field(default_factory=TrainConf)
    """Training loop, optimizers, checkpoints."""
    loss: LossConf = field(default_factory=LossConf)
    """Loss weights."""
    dataset: DatasetConf = field(default_factory=DatasetConf)
    """Subject and splits."""
    model: ModelConf = field(default_factory=ModelConf)
    """Model architecture."""
    source_path: str | None = field(default=None, compare=False, metadata=_INTERNAL)
    """The file this conf was loaded from (None if built in code). Not a HOCON key: never dumped, and
    ignored by ==."""

    def override(self, updates: Mapping[str, Any]) -> Conf:
        """A validated copy with dotted keys replaced; see `override`."""
        return override(self, updates)


# ----------------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------------


def _hocon_fields(cls: type) -> dict[str, dataclasses.Field]:
    """The fields of dataclass `cls` that are HOCON keys, by name, in declaration order."""
    return {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}


_HINTS: dict[type, dict[str, Any]] = {}


def _field_types(cls: type) -> dict[str, Any]:
    """Resolved type hints of `cls` (annotations are strings because of `from __future__`)."""
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _type_name(tp: Any) -> str:
    """Human-readable name of a field type for error messages."""
    origin = typing.get_origin(tp)
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if origin in (types.UnionType, typing.Union):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is bool:
        return "bool (True/False)"
    if dataclasses.is_dataclass(tp):
        return "an object { ... }"
    return getattr(tp, "__name__", str(tp))


def _describe(value: Any) -> str:
    """The found value and its type, for error messages."""
    if value is None or type(value).__name__ == "NoneValue":
        return "null"
    if isinstance(value, Mapping):
        return "an object { ... }"
    if isinstance(value, list):
        return f"{list(value)!r} (list)"
    return f"{value!r} ({type(value).__name__})"


class _Mismatch(Exception):
    """Internal: a value does not match a type (turned into a ConfError by the caller)."""

    def __init__(self, hint: str = ""):
        super().__init__(hint)
        self.hint = hint


def _convert(value: Any, tp: Any) -> Any:
    """Check `value` (as pyhocon parsed it, or as given to `override`) against field type `tp` and return
    the canonical Python value. Raises _Mismatch."""
    origin = typing.get_origin(tp)
    if origin in (types.UnionType, typing.Union):
        for arg in typing.get_args(tp):
            try:
                return _convert(value, arg)
            except _Mismatch:
                continue
        raise _Mismatch()
    if origin is list:
        if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, (list, tuple)):
            raise _Mismatch()
        (item_tp,) = typing.get_args(tp)
        return [_convert(v, item_tp) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch()
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return int(value)
        raise _Mismatch()
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            # Finite only: dump_conf must be able to write it back as a HOCON number.
            if not math.isfinite(value):
                raise _Mismatch("the value must be finite")
            return float(value)
        raise _Mismatch()
    if tp is str:
        if isinstance(value, str):
            return value
        # Unquoted HOCON names that look like integers (subject or video names such as 1810) arrive as
        # int; they are names, so keep them as strings.
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)
        raise _Mismatch('quote the value ("...") to make it a string')
    raise TypeError(f"unsupported conf field type {tp!r}")  # a bug in this module, not user input


def _key_error(source: str, path: str, key: str, valid: list[str]) -> ConfError:
    """ConfError for an unknown key, with the closest valid key (difflib) or the list of valid keys."""
    full = f"{path}.{key}" if path else key
    where = f"'{path}'" if path else "the top level"
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    if close:
        fix = f"did you mean '{path + '.' if path else ''}{close[0]}'?"
    else:
        fix = f"valid keys in {where}: {', '.join(valid)}"
    return ConfError(f"{source}: unknown conf key '{full}' ({fix})")


def _apply(base: Any, tree: Mapping[str, Any], path: str, source: str) -> Any:
    """Return a copy of dataclass instance `base` with the keys of `tree` (nested mappings for nested
    dataclasses) validated and replaced. Absent keys keep the values of `base` (the defaults when loading)."""
    cls = type(base)
    fields = _hocon_fields(cls)
    hints = _field_types(cls)
    updates: dict[str, Any] = {}
    for key, value in tree.items():
        key = str(key)
        if key not in fields:
            raise _key_error(source, path, key, list(fields))
        full = f"{path}.{key}" if path else key
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, Mapping):
                raise ConfError(
                    f"{source}: conf key '{full}' must be an object {{ ... }} of keys, found {_describe(value)}"
                )
            updates[key] = _apply(getattr(base, key), value, full, source)
            continue
        try:
            converted = _convert(value, tp)
        except _Mismatch as err:
            hint = f"; {err.hint}" if err.hint else ""
            raise ConfError(
                f"{source}: conf key '{full}' expects {_type_name(tp)}, found {_describe(value)}{hint}"
            ) from None
        _check_value(fields[key].metadata, converted, full, source)
        updates[key] = converted
    return dataclasses.replace(base, **updates)


def _check_value(meta: Mapping[str, Any], value: Any, full: str, source: str) -> None:
    """Apply a field's metadata checks (`_choices`, `_range`, `_check`) to its converted value."""
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        raise ConfError(
            f"{source}: conf key '{full}' must be one of {', '.join(map(repr, choices))}, found {value!r}"
        )
    allowed = meta.get("range")
    if allowed is not None:
        if isinstance(value, list):
            bad = [i for i, v in enumerate(value) if not allowed.contains(v)]
            if bad:
                raise ConfError(
                    f"{source}: conf key '{full}' entries must be {allowed.describe()}, found {value!r} "
                    f"(entry {bad[0]} is {value[bad[0]]!r})"
                )
        elif not allowed.contains(value):
            raise ConfError(f"{source}: conf key '{full}' must be {allowed.describe()}, found {value!r}")
    check = meta.get("check")
    if check is not None:
        predicate, requirement = check
        if not predicate(value):
            raise ConfError(f"{source}: conf key '{full}' must be {requirement}, found {value!r}")


def _check_conf(conf: Conf, source: str) -> Conf:
    """Checks that involve several keys; run once the whole tree is applied (load and override)."""
    pc = conf.model.point_cloud
    if pc.max_points < pc.n_init_points:
        raise ConfError(
            f"{source}: conf key 'model.point_cloud.max_points' must be >= 'model.point_cloud.n_init_points' "
            f"({pc.n_init_points}), found {pc.max_points} (the cloud starts with n_init_points points; "
            "raise max_points or lower n_init_points)"
        )
    train_res, test_res = conf.dataset.train.img_res, conf.dataset.test.img_res
    if test_res != train_res:
        raise ConfError(
            f"{source}: conf key 'dataset.test.img_res' must equal 'dataset.train.img_res' {train_res} "
            f"(the model renders at the train resolution), found {test_res}; set dataset.test.img_res = "
            f"{train_res} in the dataset.test block"
        )
    return conf


# ----------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------


# An `include` statement as pyhocon reads it (`include "f"`, `include file("f")`, `include required("f")`,
# `include required(file("f"))`, url(...), package(...)). Comments and quoted strings are matched first, as
# whole tokens, so an "include" inside them is skipped.
_INCLUDE_RE = re.compile(
    r'"""[\s\S]*?"""'
    r'|"(?:[^"\\\n]|\\.)*"'
    r"|(?:#|//)[^\n]*"
    r"|(?<![\w.$-])(?i:include)\b\s*(?:required\s*\(\s*)?(?:(file|url|package|classpath)\s*\(\s*)?"
    r'("(?:[^"\\\n]|\\.)*")'
)


def _check_includes(text: str, base_dir: str | None, source: str, chain: tuple[str, ...] = ()) -> None:
    """Raise ConfError for an `include` of a file that does not exist, here or in the included files.

    pyhocon skips a plain `include "f"` of a missing file silently (only `required(...)` raises), which
    would silently drop a block of settings. Paths resolve like pyhocon's: relative to `base_dir` (the
    including file's folder), or to the working directory when it is None. URL and package includes are
    left to pyhocon.
    """
    for match in _INCLUDE_RE.finditer(text):
        kind, quoted = match.group(1), match.group(2)
        if quoted is None or kind in ("url", "package", "classpath"):
            continue
        try:
            name = json.loads(quoted)  # HOCON quoted strings use JSON's escapes
        except ValueError:  # an invalid escape (a Windows path): take the text as written
            name = quoted[1:-1]
        if kind is None and name.startswith(("http://", "https://", "file://")):
            continue
        path = name if base_dir is None else os.path.join(base_dir, name)
        where = "".join(f" (included from {c})" for c in reversed(chain))
        folder = "the working directory" if base_dir is None else f"the folder of {source}"
        if "*" in path or "?" in path:  # pyhocon merges every match of a glob
            found = sorted(glob.glob(path, recursive=True))
            if not found:
                raise ConfError(f"{source}{where}: include \"{name}\" matches no file (looked for '{path}')")
        elif not os.path.isfile(path):
            raise ConfError(
                f"{source}{where}: included conf file not found: \"{name}\" (looked for '{path}'); fix "
                f"the include path (relative paths resolve against {folder}) or remove the include"
            )
        else:
            found = [path]
        for included in found:
            if os.path.realpath(included) in {os.path.realpath(c) for c in (*chain, source)}:
                raise ConfError(f'{source}{where}: include "{name}" includes itself (a cycle)')
            try:
                with open(included, encoding="utf-8") as f:
                    included_text = f.read()
            except (OSError, UnicodeDecodeError) as err:
                raise ConfError(
                    f"{source}{where}: cannot read included conf file '{included}': {err}"
                ) from None
            _check_includes(included_text, os.path.dirname(included), included, (*chain, source))


def parse_conf(text: str, source: str = "<string>", base_dir: str | os.PathLike | None = None) -> Conf:
    """Parse HOCON `text` into a validated Conf (source_path None). `source` names the text in errors;
    relative `include` paths resolve against `base_dir` (None: the working directory)."""
    from pyhocon import ConfigFactory  # imported here so `import pointavatar` stays light

    base = None if base_dir is None else os.fspath(base_dir)
    _check_includes(text, base, source)
    try:
        tree = ConfigFactory.parse_string(text, basedir=base)
    except Exception as err:  # pyparsing / pyhocon raise several unrelated exception types
        raise ConfError(f"{source}: not valid HOCON: {err}") from None
    if not isinstance(tree, Mapping):
        raise ConfError(f"{source}: a conf file must be an object of keys (train {{ ... }}, ...)")
    return _check_conf(_apply(Conf(), tree, "", source), source)


def load_conf(path: str | os.PathLike) -> Conf:
    """Read and validate the HOCON conf file at `path` (e.g. ./confs/subject1.conf).

    Absent keys take the defaults of the dataclasses (the original's values). `include "x.conf"` resolves
    against the folder of `path`. Raises ConfError for a missing or unreadable file (or included file),
    HOCON syntax errors, unknown keys (with the closest valid key), wrong types and values out of range.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ConfError(f"conf file not found: '{path}' (working directory: {os.getcwd()})")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as err:
        raise ConfError(f"cannot read conf file '{path}': {err}") from None
    conf = parse_conf(text, source=path, base_dir=os.path.dirname(path))
    conf.source_path = path
    return conf


def _nest(updates: Mapping[str, Any]) -> dict[str, Any]:
    """{"a.b.c": v} -> {"a": {"b": {"c": v}}}; merges keys that share a prefix."""
    out: dict[str, Any] = {}
    for dotted, value in updates.items():
        parts = str(dotted).split(".")
        if any(not p for p in parts):
            raise ConfError(f"override: malformed conf key '{dotted}'")
        node = out
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfError(f"override: conf key '{dotted}' conflicts with a value given for '{part}'")
            node = child
        last = parts[-1]
        if isinstance(value, Mapping):
            existing = node.setdefault(last, {})
            if not isinstance(existing, dict):
                raise ConfError(f"override: conf key '{dotted}' is given twice")
            existing.update(_nest(value))
        else:
            if last in node:
                raise ConfError(f"override: conf key '{dotted}' is given twice")
            node[last] = value
    return out


def override(conf: Conf, updates: Mapping[str, Any], source: str = "override") -> Conf:
    """A copy of `conf` with values replaced by dotted keys, validated like a conf file.

    Example (the test runner, spec §2.9):
        override(conf, {"dataset.test.subsample": 1, "dataset.test.load_images": False})
    A value for an object key may be a mapping of its sub-keys ({"dataset.test": {"subsample": 1}}).
    Unknown keys, wrong types and values out of range raise ConfError; `conf` itself is not modified.
    """
    out = _check_conf(_apply(copy.deepcopy(conf), _nest(updates), "", source), source)
    out.source_path = conf.source_path
    return out


# ----------------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------------


def _format_value(value: Any) -> str:
    """One value as HOCON text that pyhocon reads back to the same Python value."""
    if isinstance(value, bool):
        return "True" if value else "False"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        # repr is the shortest text that round-trips (e.g. 0.0001, 1e-05), and pyhocon parses both forms
        # as float; integral floats keep their ".0" so they stay floats.
        return repr(value)
    if isinstance(value, str):
        # JSON string syntax is HOCON's quoted-string syntax; quoting keeps paths, names with spaces or
        # '#', and numeric-looking names as strings.
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(_format_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as HOCON")


def _dump_node(node: Any, indent: int, lines: list[str]) -> None:
    """Append the HOCON lines of dataclass instance `node` (its HOCON keys only) to `lines`."""
    pad = "    " * indent
    for name in _hocon_fields(type(node)):
        value = getattr(node, name)
        if dataclasses.is_dataclass(value):
            lines.append(f"{pad}{name} {{")
            _dump_node(value, indent + 1, lines)
            lines.append(f"{pad}}}")
        else:
            lines.append(f"{pad}{name} = {_format_value(value)}")


def dump_conf(conf: Conf) -> str:
    """The resolved conf as HOCON text: every key, defaults included (not `source_path`).

    `parse_conf(dump_conf(conf)) == conf` for every valid conf (strings without control characters other
    than tab and newline, which pyhocon does not unescape).
    """
    lines: list[str] = []
    _dump_node(conf, 0, lines)
    return "\n".join(lines) + "\n"


def save_conf(conf: Conf, path: str | os.PathLike) -> None:
    """Write `dump_conf(conf)` to `path` (parent folders are created), e.g. the run's runconf.conf."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dump_conf(conf), encoding="utf-8")


def conf_to_dict(conf: Any) -> dict[str, Any]:
    """Nested plain dict of the HOCON keys of `conf` (or of a sub-tree), e.g. for a logger's hparams."""
    out: dict[str, Any] = {}
    for name in _hocon_fields(type(conf)):
        value = getattr(conf, name)
        out[name] = conf_to_dict(value) if dataclasses.is_dataclass(value) else copy.deepcopy(value)
    return out
