"""The test runner of spec §2.9-§2.10: tracking, renders, PLY exports, MP4, metrics.

Outputs, under ``<run>/eval/<test sub_dir>/``::

    rendering/epoch_XXXX_<first frame>.png          grid images (pred + landmarks, GT, normal, shading, albedo)
    epoch_<E>/rgb/<n>.png, rgb_erode_dilate/<n>.png, normal/<n>.png
    epoch_<E>/results_rgb_erode_dilate.{npz,csv}, results_no_cloth_rgb_erode_dilate.{npz,csv}
    epoch_<E>/video.mp4                             prediction | ground truth, 25 fps
    EEEE_deformed_color_1.ply, EEEE_deformed_albedo_1.ply, EEEE_canonical_points_albedo.ply,
    EEEE_unconstrained_canonical_points.ply, EEEE_canonical_verts.ply
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..config import Conf
from ..engine import checkpoints as ckpt
from ..engine import plots
from ..engine.batching import batch_size_for, move_to
from ..engine.device import apply_matmul_precision, resolve_device
from ..engine.experiment import Experiment
from ..engine.inputs import FrameInputs
from ..errors import PointAvatarError
from ..model import PointAvatarOutputs
from . import export, tracking
from .lpips import load_lpips_alex
from .metrics import evaluate_folder

# Frames whose deformed point clouds are exported (hard-coded in the original, spec §2.10).
PLY_FRAMES = (1,)


def frame_image(image: torch.Tensor, res: int) -> np.ndarray:
    """[P, 3] in [0, 1] (row-major pixels) -> [H, W, 3] uint8, clipped."""
    return plots.to_uint8(plots.lin2img(image[None, :, :3], res)[0].permute(1, 2, 0))


class VideoFrames(Sequence):
    """Prediction | ground-truth video frames, read from the written PNGs and the dataset on demand."""

    def __init__(self, items: list[tuple[Path, int]], dataset, res: int):
        self.items, self.dataset, self.res = items, dataset, res

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> np.ndarray:
        path, index = self.items[i]
        pred = imageio.imread(path)[..., :3]
        gt = self.dataset[index][2].get("rgb")
        return export.side_by_side(pred, frame_image(gt, self.res) if gt is not None else None)


class Evaluator:
    """Loads a checkpoint and renders and scores the test split of the conf."""

    def __init__(
        self,
        conf: Conf,
        checkpoint: str = "latest",
        load_path: str = "",
        only_json: bool = False,
        device: torch.device | str | None = None,
    ):
        self.conf = conf  # the test split is read whole and lazily by Experiment.test_dataset (spec §2.9)
        # Evaluation never writes data: a missing synthetic subject is an error, not generated.
        self.exp = Experiment(self.conf, load_path=load_path, generate=False)
        self.device = resolve_device(device)
        apply_matmul_precision(self.conf.model.tf32)
        self.only_json = only_json
        self.checkpoint = checkpoint

        self.store = ckpt.Checkpoints(self.exp.load_dir)
        loaded = self.exp.load_trained_model(self.store, checkpoint, self.device, only_json=only_json)
        self.model, self.epoch, self.test_set = loaded.model, loaded.epoch, loaded.test_set
        n = self.model.pc.points.shape[0]
        self.batch_size = batch_size_for(n, self.conf.train.max_points_training, self.conf.train.max_batch)
        print(f"Loaded {loaded.path}: epoch {self.epoch}, {n} points, radius {self.model.pc.radius:.5f}")

        tc = self.conf.train
        self.inputs = None
        if (tc.optimize_expression or tc.optimize_camera) and tc.test_tracking:
            self.inputs = FrameInputs(
                self.test_set,
                self.conf.model.deformer_network.num_exp,
                tc.optimize_expression,
                tc.optimize_camera,
            ).to(self.device)

    def _loader(self) -> DataLoader:
        return DataLoader(
            self.test_set, batch_size=self.batch_size, shuffle=False, collate_fn=self.test_set.collate_fn
        )

    # -------------------------------------------------------------------------------------- tracking
    def prepare_inputs(self) -> None:
        """Load cached tracked test inputs, or track them now (spec §2.9 steps 6-7)."""
        if self.inputs is None:
            return
        # A file that is refused as unsafe stops here (UnsafeCheckpointError propagates); a missing,
        # damaged or stale one is tracked anew.
        try:
            if not self.store.exists(ckpt.TEST_INPUTS, self.checkpoint):
                raise ValueError("none cached")
            cached = self.store.load(ckpt.TEST_INPUTS, self.checkpoint)
            if int(cached.get("epoch", -1)) != self.epoch:
                # E.g. after --is_continue training: latest.pth of the model moved on, the inputs did not.
                raise ValueError(
                    f"they were tracked for the model of epoch {cached.get('epoch')}, this model is epoch "
                    f"{self.epoch}"
                )
            self.inputs.load_state(cached)
            print(f"Using tracked test inputs from {self.store.path(ckpt.TEST_INPUTS, self.checkpoint)}")
            return
        except (ckpt.CorruptCheckpointError, ValueError, KeyError) as exc:
            reason = str(exc)
        if self.only_json:
            print(
                f"No tracked test inputs ({reason}); --only_json has no images to track against, so the "
                "JSON expression, pose and camera are used as they are."
            )
            self.inputs = None
            return
        print(
            f"No usable tracked test inputs ({reason}). Tracking the test frames (expression, pose, "
            "camera translation; RGB loss only). Slow, and only meant for the metrics."
        )
        self.track()
        state = self.inputs.state()
        self.store.save(ckpt.TEST_INPUTS, state, self.epoch, numbered=True)

    def track(self) -> None:
        tracking.track(
            self.model,
            self.inputs,
            self._loader(),
            self.device,
            self.conf.train.learning_rate_cam,
            self.conf.train.tracking_steps,
        )

    # ------------------------------------------------------------------------------------- rendering
    def run(self) -> dict[str, dict]:
        self.prepare_inputs()
        self.model.eval()
        res = int(self.test_set.img_res[0])
        eval_dir = self.exp.eval_dir
        frames: dict[str, list[tuple[Path, int]]] = defaultdict(list)
        epoch_dirs: dict[str, Path] = {}
        start = time.time()
        n_frames = 0
        for batch_index, (_, model_input, ground_truth) in enumerate(
            tqdm(self._loader(), desc="rendering", dynamic_ncols=True)
        ):
            model_input = move_to(model_input, self.device)
            if self.inputs is not None:
                model_input = self.inputs.apply(model_input)
            outputs = self.model(model_input)
            sub_dirs = model_input["sub_dir"]
            names = [int(v) for v in model_input["img_name"].reshape(-1).tolist()]
            plots.plot_grid(outputs, ground_truth, eval_dir / sub_dirs[0], self.epoch, names[0])
            batch = len(names)
            for sub_dir in dict.fromkeys(sub_dirs):  # a batch may span two test videos
                rows = [b for b in range(batch) if sub_dirs[b] == sub_dir]
                epoch_dirs[sub_dir] = plots.write_frame_outputs(
                    outputs.select(rows), [names[b] for b in rows], eval_dir / sub_dir, self.epoch
                )
            for b, sub_dir in enumerate(sub_dirs):
                # Frames are read back from disk when the video is written, so memory stays flat.
                frames[sub_dir].append(
                    (epoch_dirs[sub_dir] / "rgb" / f"{names[b]}.png", int(model_input["idx"][b, 0]))
                )
                if names[b] in PLY_FRAMES:
                    self._export_frame_ply(eval_dir / sub_dir, outputs, b, names[b])
            if batch_index == 0:
                self._export_canonical_ply(eval_dir / sub_dirs[0], outputs)
            n_frames += len(sub_dirs)
        if n_frames:
            print(f"Rendered {n_frames} frames, {(time.time() - start) / n_frames:.3f} s per frame")

        results = {}
        for sub_dir, out_dir in epoch_dirs.items():
            try:
                export.write_video(out_dir / "video.mp4", VideoFrames(frames[sub_dir], self.test_set, res))
            except PointAvatarError as exc:  # the video is a convenience: the frames are on disk already
                print(f"warning: video not written: {exc}")
            if self.only_json:
                continue
            gt_dir = (
                Path(self.conf.dataset.data_folder)
                / self.conf.dataset.subject_name
                / self.conf.dataset.subject_name
                / sub_dir
            )
            lpips = self._lpips()
            for no_cloth in (False, True):
                key = f"{sub_dir}{'_no_cloth' if no_cloth else ''}"
                results[key] = self._metrics(out_dir, gt_dir, no_cloth, lpips, res)
        return results

    def _lpips(self):
        if not hasattr(self, "_lpips_module"):
            self._lpips_module = load_lpips_alex(self.device)
        return self._lpips_module

    def _metrics(self, out_dir, gt_dir, no_cloth, lpips, res):
        return evaluate_folder(
            out_dir, gt_dir, pred_file_name="rgb_erode_dilate", no_cloth=no_cloth, lpips=lpips, res=res
        )

    # ------------------------------------------------------------------------------------------- PLY
    def _export_frame_ply(self, folder: Path, outputs: PointAvatarOutputs, b: int, name: int) -> None:
        ev = outputs.eval
        points = ev.deformed_points[b]
        normals = ev.pnts_normal_deformed[b]
        export.save_ply(
            folder / f"{self.epoch:04d}_deformed_color_{name}.ply", points, ev.pnts_color_deformed[b], normals
        )
        export.save_ply(
            folder / f"{self.epoch:04d}_deformed_albedo_{name}.ply", points, ev.pnts_albedo, normals
        )

    def _export_canonical_ply(self, folder: Path, outputs: PointAvatarOutputs) -> None:
        ev = outputs.eval
        export.save_ply(
            folder / f"{self.epoch:04d}_canonical_points_albedo.ply", outputs.canonical_points, ev.pnts_albedo
        )
        export.save_ply(
            folder / f"{self.epoch:04d}_unconstrained_canonical_points.ply",
            ev.unconstrained_canonical_points,
            ev.pnts_albedo,
        )
        flame = self.model.FLAMEServer
        colors = export.skinning_weight_colors(flame.lbs_weights)
        export.save_ply(folder / f"{self.epoch:04d}_canonical_verts.ply", flame.canonical_verts, colors)


def summary_line(results: dict[str, dict]) -> str:
    parts = []
    for key, r in results.items():
        lp = r.get("lpips", float("nan"))
        lp_text = "n/a" if lp is None or (isinstance(lp, float) and math.isnan(lp)) else f"{lp:.4f}"
        parts.append(
            f"{key}: PSNR {r['psnr']:.2f} dB, SSIM {r['ssim']:.4f}, L1 {r['mae']:.4f}, LPIPS {lp_text}"
        )
    return "; ".join(parts)
