"""What training and evaluation share: experiment folders, datasets, model construction and loading.

Folder layout (spec §2.2)::

    <exps_folder>/<subject_name>/<methodname>/<train sub_dirs joined by '+'>/{train,eval}/
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import Conf
from ..data import FaceDataset
from ..errors import PointAvatarError
from ..model import PointAvatar
from ..model.compat import convert_original_state_dict
from . import checkpoints as ckpt


@dataclass
class TrainedModel:
    """A run's model as `Experiment.load_trained_model` loads it."""

    model: PointAvatar
    """The model at the checkpoint, on the requested device, in training mode (``.eval()`` is the caller's)."""
    epoch: int
    """The epoch the checkpoint was written at."""
    path: Path
    """The ModelParameters file it was read from."""
    test_set: FaceDataset
    """The conf's test split (all frames, loaded lazily), whose JSON gave the identity."""


class Experiment:
    """Paths and builders of one conf. ``load_path`` replaces the conf-derived train dir for loading.

    ``generate``: whether a missing synthetic subject may be generated (training only; evaluation
    never writes data).
    """

    def __init__(self, conf: Conf, load_path: str = "", generate: bool = True):
        self.conf = conf
        self.generate = generate
        split = "+".join(str(s) for s in conf.dataset.train.sub_dir)
        self.expdir = Path(conf.train.exps_folder) / conf.dataset.subject_name / conf.train.methodname
        self.run_dir = self.expdir / split
        self.train_dir = self.run_dir / "train"
        self.eval_dir = self.run_dir / "eval"
        if load_path and not Path(load_path).is_dir():
            raise PointAvatarError(
                f"--load_path {load_path}: no such folder (working directory {os.getcwd()}). Give the "
                "train/ folder of a run, the one that holds checkpoints/."
            )
        self.load_dir = Path(load_path) if load_path else self.train_dir

    def check_writable(self) -> None:
        """Stop with a message naming train.exps_folder if the run folder cannot be created there.

        Checked before anything is written: the nearest existing ancestor of the run folder must be a
        writable folder.
        """
        folder = self.run_dir
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        key = f"train.exps_folder = {self.conf.train.exps_folder}"
        if not folder.is_dir():
            raise PointAvatarError(
                f"{key}: cannot create the run folder {self.run_dir}, because {folder} is a file, not a "
                "folder. Point train.exps_folder at a folder."
            )
        if not os.access(folder, os.W_OK | os.X_OK):
            raise PointAvatarError(
                f"{key}: cannot create the run folder {self.run_dir}: {folder} is not writable. Point "
                "train.exps_folder at a folder you can write to."
            )

    def has_checkpoints(self) -> bool:
        """Whether the conf's train folder holds any checkpoint file (of any family)."""
        root = self.train_dir / "checkpoints"
        return root.is_dir() and any(root.glob("*/*.pth"))

    def move_run_aside(self) -> Path:
        """Rename the run folder to ``<run>.old-<YYYYmmdd-HHMMSS>`` (nothing is deleted); return the new path."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        target = self.run_dir.with_name(f"{self.run_dir.name}.old-{stamp}")
        n = 1
        while target.exists():
            target = self.run_dir.with_name(f"{self.run_dir.name}.old-{stamp}-{n}")
            n += 1
        os.replace(self.run_dir, target)
        return target

    # -------------------------------------------------------------------------------------- datasets
    def ensure_data(self) -> None:
        """Generate the synthetic subject when the conf asks for it and it is missing (demo)."""
        ds = self.conf.dataset
        if not ds.synthetic.generate or not self.generate:
            return
        from ..synthetic import ensure_synthetic_subject

        ensure_synthetic_subject(
            ds.data_folder,
            ds.subject_name,
            res=int(ds.train.img_res[0]),
            train_frames=ds.synthetic.train_frames,
            test_frames=ds.synthetic.test_frames,
            seed=ds.synthetic.seed,
        )

    def _dataset(self, split_conf, **overrides):
        self.ensure_data()
        ds = self.conf.dataset
        kwargs = dict(
            data_folder=ds.data_folder,
            subject_name=ds.subject_name,
            json_name=ds.json_name,
            sub_dir=list(split_conf.sub_dir),
            img_res=list(split_conf.img_res),
            subsample=split_conf.subsample,
            hard_mask=split_conf.hard_mask,
            use_background=ds.use_background,
            load_images=split_conf.load_images,
        )
        kwargs.update(overrides)
        return FaceDataset(**kwargs)

    def train_dataset(self, only_json: bool = False):
        ds = self.conf.dataset
        return self._dataset(
            ds.train,
            only_json=only_json,
            use_mean_expression=ds.use_mean_expression,
            use_var_expression=ds.use_var_expression,
            load_images=ds.train.load_images and not only_json,
        )

    def plot_dataset(self):
        """The test split as the training-time plots use it (its own subsample, JSON inputs)."""
        return self._dataset(self.conf.dataset.test)

    def test_dataset(self, only_json: bool = False):
        """All test frames, loaded lazily (spec §2.9 step 1)."""
        return self._dataset(self.conf.dataset.test, subsample=1, load_images=False, only_json=only_json)

    # ---------------------------------------------------------------------------------------- model
    def load_trained_model(
        self,
        store: ckpt.Checkpoints,
        checkpoint: str | int,
        device: torch.device,
        only_json: bool = True,
        flag: str = "--is_eval",
    ) -> TrainedModel:
        """The trained model of ``store`` (the run's checkpoints) at ``checkpoint`` ("latest" or an epoch),
        built from this conf with the identity of the test split and the mean training expression.

        The checkpoint is checked first (without one there is nothing to load, whatever the data); a
        missing one is a PointAvatarError starting with ``flag`` (the command asking) that lists the
        checkpoints there. ``only_json``: build the test split without its images.
        """
        path = store.path(ckpt.MODEL, checkpoint)
        if not path.is_file():
            found = store.available()
            how = (
                "run without --is_eval" if flag == "--is_eval" else f"pointavatar --conf <conf> before {flag}"
            )
            hint = (
                f"Checkpoints there: {', '.join(found)}; pass one with --checkpoint."
                if found
                else f"No run there (working directory {Path.cwd()}): train first ({how}), "
                "or point --load_path at the train/ folder of a run."
            )
            raise PointAvatarError(f"{flag}: no checkpoint {path}. {hint}")
        payload = store.load(ckpt.MODEL, checkpoint)
        train_set = self.train_dataset(only_json=True)  # only for the canonical (mean) expression
        test_set = self.test_dataset(only_json=only_json)
        model = build_model(self.conf, train_set, test_set.shape_params).to(device)
        self.load_model_payload(model, payload, path, strict=True)
        return TrainedModel(model=model, epoch=int(payload["epoch"]), path=path, test_set=test_set)

    def load_model_payload(self, model: PointAvatar, payload: dict, path: Path, strict: bool) -> None:
        """Load a ModelParameters dict (ours or the original's layout) into ``model``.

        The point tensor is re-created at the stored size first, because N changes during training;
        ``model.pc.radius`` is set from the payload's "radius" (kept when a payload has none).
        """
        state = payload.get("model_state_dict")
        if state is None:
            raise PointAvatarError(f"{path} is not a ModelParameters checkpoint (no 'model_state_dict').")
        state = convert_original_state_dict(state)
        if "pc.points" not in state:
            raise PointAvatarError(f"{path} has no 'pc.points' entry: not a PointAvatar checkpoint.")
        device = next(model.buffers()).device
        model.pc.init(state["pc.points"].shape[0])
        model.pc.to(device)
        try:
            result = model.load_state_dict(state, strict=strict)
        except RuntimeError as exc:
            raise PointAvatarError(
                f"{path} does not fit the model of this conf: {first_line(exc)}. It was probably written "
                "with another conf (network sizes, num_exp, ghostbone, use_background) or another FLAME "
                "model; use the conf it was trained with."
            ) from exc
        if not strict and result.missing_keys:
            print(f"warning: keys missing from {path}: {', '.join(result.missing_keys[:8])}")
        # The raster radius lives beside the state dict (it is not a tensor of the model).
        model.pc.radius = float(payload.get("radius", model.pc.radius))


def build_model(conf: Conf, train_set: FaceDataset, shape_params: torch.Tensor) -> PointAvatar:
    """PointAvatar with the subject's identity, the mean training expression and the canonical jaw."""
    return PointAvatar(
        conf.model,
        shape_params=shape_params,
        canonical_expression=train_set.mean_expression,
        canonical_pose=conf.dataset.canonical_pose,
        img_res=int(conf.dataset.train.img_res[0]),
        use_background=conf.dataset.use_background,
    )


def first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return " ".join(lines[:3])
