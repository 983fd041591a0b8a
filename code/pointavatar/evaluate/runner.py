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
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..config import Conf
from ..errors import PointAvatarError
from ..train import checkpoints as ckpt
from ..train.experiment import Experiment, build_model, move_to
from ..train.inputs import FrameInputs
from ..train.schedule import batch_size_for
from . import export, plots

# Frames whose deformed point clouds are exported (hard-coded in the original, spec §2.10).
PLY_FRAMES = (1,)


def to_uint8(image: torch.Tensor, res: int) -> np.ndarray:
    """[P, 3] in [0, 1] (row-major pixels) -> [H, W, 3] uint8, clipped."""
    img = image.detach().reshape(res, res, -1)[..., :3].clamp(0, 1)
    return (img.cpu().numpy() * 255).round().astype(np.uint8)


def render_grids(model, dataset, eval_dir: Path, epoch: int, batch_size: int, device, inputs=None) -> int:
    """Render ``dataset`` and write one grid image per batch (spec §2.10). Returns the number of frames."""
    loader = DataLoader(dataset, batch_size=min(2 * batch_size, 10), shuffle=False, collate_fn=dataset.collate_fn)
    count = 0
    for _, model_input, ground_truth in loader:
        model_input = move_to(model_input, device)
        if inputs is not None:
            model_input = inputs.apply(model_input)
        outputs = model(model_input)
        sub_dir = model_input["sub_dir"][0]
        first = int(model_input["img_name"][0, 0])
        path = Path(eval_dir) / sub_dir / "rendering" / f"epoch_{epoch:04d}_{first}.png"
        plots.save_grid(path, outputs, ground_truth.get("rgb"), dataset.img_res[0])
        count += model_input["idx"].shape[0]
    return count


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
        from ..train.trainer import default_device

        self.conf = conf.override({"dataset.test.subsample": 1, "dataset.test.load_images": False})
        self.exp = Experiment(self.conf, load_path=load_path)
        self.device = torch.device(device) if device is not None else default_device()
        self.only_json = only_json
        self.checkpoint = checkpoint

        train_set = self.exp.train_dataset(only_json=True)  # only for the canonical (mean) expression
        self.test_set = self.exp.test_dataset(only_json=only_json)
        self.model = build_model(self.conf, train_set, self.test_set.shape_params).to(self.device)
        self.store = ckpt.Checkpoints(self.exp.load_dir)
        path = self.store.path(ckpt.MODEL, checkpoint)
        if not path.is_file():
            found = self.store.available()
            hint = f"Checkpoints there: {', '.join(found)}." if found else "Train first (run without --is_eval)."
            raise PointAvatarError(f"--is_eval: no checkpoint {path}. {hint}")
        payload = ckpt.load_file(path)
        self.exp.load_model_payload(self.model, payload, path, strict=True)
        self.epoch = int(payload["epoch"])
        n = self.model.pc.points.shape[0]
        self.batch_size = batch_size_for(n, self.conf.train.max_points_training, self.conf.train.max_batch)
        print(f"Loaded {path}: epoch {self.epoch}, {n} points, radius {self.model.radius:.5f}")

        tc = self.conf.train
        self.inputs = None
        if (tc.optimize_expression or tc.optimize_camera) and tc.test_tracking:
            self.inputs = FrameInputs(
                self.test_set, self.conf.model.deformer_network.num_exp, tc.optimize_expression, tc.optimize_camera
            ).to(self.device)

    def _loader(self) -> DataLoader:
        return DataLoader(self.test_set, batch_size=self.batch_size, shuffle=False, collate_fn=self.test_set.collate_fn)

    # -------------------------------------------------------------------------------------- tracking
    def prepare_inputs(self) -> None:
        """Load cached tracked test inputs, or track them now (spec §2.9 steps 6-7)."""
        if self.inputs is None:
            return
        try:
            self.inputs.load_state(self.store.load(ckpt.TEST_INPUTS, self.checkpoint))
            print(f"Using tracked test inputs from {self.store.path(ckpt.TEST_INPUTS, self.checkpoint)}")
            return
        except (PointAvatarError, ValueError, KeyError) as exc:
            reason = str(exc)
        if self.only_json:
            print(
                f"No tracked test inputs ({reason}); --only_json has no images to track against, so the "
                "JSON expression, pose and camera are used as they are."
            )
            self.inputs = None
            return
        print("Tracking the test frames (expression, pose, camera translation; RGB loss only). "
              "Slow, and only meant for the metrics.")
        self.track()
        state = self.inputs.state()
        self.store.save(ckpt.TEST_INPUTS, state, self.epoch, numbered=True)

    def track(self) -> None:
        from ..train.losses import rgb_only_loss

        self.model.eval()
        frozen = [p for p in self.model.parameters() if p.requires_grad]
        for p in frozen:  # the model is not updated; its gradients are not needed
            p.requires_grad_(False)
        self.inputs.set_trainable(True)
        optimizer = self.inputs.make_optimizer(self.conf.train.learning_rate_cam)
        try:
            for _, model_input, ground_truth in tqdm(self._loader(), desc="tracking", dynamic_ncols=True):
                model_input = move_to(model_input, self.device)
                ground_truth = move_to(ground_truth, self.device)
                for _ in range(self.conf.train.tracking_steps):
                    outputs = self.model(self.inputs.apply(model_input))
                    loss = rgb_only_loss(outputs, ground_truth)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
        finally:
            for p in frozen:
                p.requires_grad_(True)
            self.inputs.set_trainable(False)

    # ------------------------------------------------------------------------------------- rendering
    def run(self) -> dict[str, dict]:
        self.prepare_inputs()
        self.model.eval()
        res = int(self.test_set.img_res[0])
        eval_dir = self.exp.eval_dir
        frames: dict[str, list[np.ndarray]] = defaultdict(list)
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
            gt_rgb = ground_truth.get("rgb")
            sub_dirs = model_input["sub_dir"]
            first = int(model_input["img_name"][0, 0])
            plots.save_grid(
                eval_dir / sub_dirs[0] / "rendering" / f"epoch_{self.epoch:04d}_{first}.png", outputs, gt_rgb, res
            )
            for b, sub_dir in enumerate(sub_dirs):
                name = int(model_input["img_name"][b, 0])
                out_dir = eval_dir / sub_dir / f"epoch_{self.epoch}"
                epoch_dirs[sub_dir] = out_dir
                rgb = to_uint8(outputs["rgb_image"][b], res)
                normal = to_uint8(outputs["normal_image"][b], res)
                plots.write_frame_outputs(out_dir, name, rgb, normal)
                gt = to_uint8(gt_rgb[b], res) if gt_rgb is not None else None
                frames[sub_dir].append(export.side_by_side(rgb, gt) if gt is not None else rgb)
                if name in PLY_FRAMES:
                    self._export_frame_ply(eval_dir / sub_dir, outputs, b, name)
            if batch_index == 0:
                self._export_canonical_ply(eval_dir / sub_dirs[0], outputs)
            n_frames += len(sub_dirs)
        if n_frames:
            print(f"Rendered {n_frames} frames, {(time.time() - start) / n_frames:.3f} s per frame")

        results = {}
        for sub_dir, out_dir in epoch_dirs.items():
            export.write_video(out_dir / "video.mp4", frames[sub_dir])
            if self.only_json:
                continue
            gt_dir = Path(self.conf.dataset.data_folder) / self.conf.dataset.subject_name / self.conf.dataset.subject_name / sub_dir
            lpips = self._lpips()
            for no_cloth in (False, True):
                key = f"{sub_dir}{'_no_cloth' if no_cloth else ''}"
                results[key] = self._metrics(out_dir, gt_dir, no_cloth, lpips, res)
        return results

    def _lpips(self):
        if not hasattr(self, "_lpips_module"):
            from .lpips import load_lpips_alex

            self._lpips_module = load_lpips_alex(self.device)
        return self._lpips_module

    def _metrics(self, out_dir, gt_dir, no_cloth, lpips, res):
        from .metrics import evaluate_folder

        return evaluate_folder(out_dir, gt_dir, pred_file_name="rgb_erode_dilate", no_cloth=no_cloth, lpips=lpips, res=res)

    # ------------------------------------------------------------------------------------------- PLY
    def _export_frame_ply(self, folder: Path, outputs: dict, b: int, name: int) -> None:
        points = outputs["deformed_points"][b]
        normals = outputs["pnts_normal_deformed"][b]
        export.save_ply(folder / f"{self.epoch:04d}_deformed_color_{name}.ply", points, outputs["pnts_color_deformed"][b], normals)
        export.save_ply(folder / f"{self.epoch:04d}_deformed_albedo_{name}.ply", points, outputs["pnts_albedo"], normals)

    def _export_canonical_ply(self, folder: Path, outputs: dict) -> None:
        export.save_ply(folder / f"{self.epoch:04d}_canonical_points_albedo.ply", outputs["canonical_points"], outputs["pnts_albedo"])
        if "unconstrained_canonical_points" in outputs:
            export.save_ply(
                folder / f"{self.epoch:04d}_unconstrained_canonical_points.ply",
                outputs["unconstrained_canonical_points"],
                outputs["pnts_albedo"],
            )
        flame = self.model.FLAMEServer
        colors = export.skinning_weight_colors(flame.lbs_weights)
        export.save_ply(folder / f"{self.epoch:04d}_canonical_verts.ply", flame.canonical_verts, colors)


def summary_line(results: dict[str, dict]) -> str:
    parts = []
    for key, r in results.items():
        lp = r.get("lpips", float("nan"))
        lp_text = "n/a" if lp is None or (isinstance(lp, float) and math.isnan(lp)) else f"{lp:.4f}"
        parts.append(f"{key}: PSNR {r['psnr']:.2f} dB, SSIM {r['ssim']:.4f}, L1 {r['mae']:.4f}, LPIPS {lp_text}")
    return "; ".join(parts)
