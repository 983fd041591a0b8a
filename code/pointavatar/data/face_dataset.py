"""The IMavatar-format face dataset (spec §3).

On disk (spec §3.1), one folder per video, with the subject name repeated in the path:

    <data_folder>/<subject>/<subject>/<video>/
        image/<n>.png      RGB frames, n = 1-based frame number
        mask/<n>.png       soft foreground matte, 1- or 3-channel
        semantic/<n>.png   optional face-parsing labels (metrics only)
        <json_name>        flame_params.json (spec §3.3)

`FaceDataset` concatenates the frames of the listed videos in order, subsamples them, converts the
cameras to the pytorch3d NDC convention the renderer uses (spec §3.5) and yields
`(idx, sample, ground_truth)` triples (spec §3.6) that `collate_fn` batches.

Pixels are flattened row-major from the image's top row: pixel (row r, col c) is entry r * W + c.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any, NamedTuple

import cv2
import imageio.v3 as iio
import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm import tqdm

from pointavatar.errors import PointAvatarError

N_SHAPE = 100  # FLAME identity coefficients in the JSON
N_EXPRESSION = 50  # FLAME expression coefficients per frame
N_POSE = 15  # axis-angle: global, neck, jaw, left eye, right eye

# Plausibility bounds of the JSON values, checked at load like the NaN check: wide enough that no real
# tracker output reaches them, tight enough to stop garbage (1e30, uninitialised memory) before it
# becomes a NaN loss hours into training.
# FLAME pose entries are axis-angle components in radians: a rotation needs an angle of at most pi, and
# a tracker that does not wrap angles still stays within a turn or so; 4 pi (two full turns) is far out.
MAX_ABS_POSE = 4 * np.pi
# FLAME shape and expression coefficients are in units of the PCA standard deviation: real faces and
# trackers (DECA, IMavatar's) stay within about +-3, strong expressions within +-10; 100 is far out.
MAX_ABS_COEFFICIENT = 100.0
# The camera translation is in FLAME's (metric) world units and the head sits near the origin, a few
# units from the camera; 1e3 (a kilometre) is no real capture.
MAX_CAMERA_DISTANCE = 1e3
# Aspect-ratio tolerance of the frames against img_res: a relative difference of W/H below 1% is
# the rounding of a crop to a near-square size (512x510 differs by 0.4%) and is resized away; real
# mismatches (4:3 or 16:9 video frames: 33% and 78%) would be visibly stretched, so they are refused.
ASPECT_TOLERANCE = 0.01


# The per-frame lists that parsing fills (`_parse_frame`).
_FRAME_KEYS = (
    "image_paths",
    "mask_paths",
    "semantic_paths",
    "img_name",
    "sub_dir",
    "world_mats",
    "expressions",
    "flame_pose",
    "keypoints",
    "bbox",
)


class FrameInfo(NamedTuple):
    """Where one dataset frame comes from, for metrics and plots (not part of the training sample)."""

    sub_dir: str
    img_name: int
    image_path: str
    mask_path: str
    semantic_path: str  # may not exist: semantic maps are optional (spec §3.8)
    keypoints: torch.Tensor | None  # [K, 2] projected FLAME landmarks in [-1, 1], K = 70 usually
    bbox: torch.Tensor | None  # [4] xmin, ymin, xmax, ymax in [-1, 1]


def collate_fn(batch: list[tuple]) -> tuple:
    """Batch (idx, sample, ground_truth) triples (spec §3.6).

    Dict entries: each key is torch.stack-ed, or kept as a list where it cannot be (sub_dir -> list of
    str). Other entries (the indices) become a LongTensor [B].
    """
    parsed = []
    for entry in zip(*batch, strict=True):
        if isinstance(entry[0], dict):
            out = {}
            for key in entry[0]:
                values = [obj[key] for obj in entry]
                try:
                    out[key] = torch.stack(values)
                except (TypeError, RuntimeError):
                    out[key] = values
            parsed.append(out)
        else:
            parsed.append(torch.LongTensor(entry))
    return tuple(parsed)


class FlameParams(NamedTuple):
    """The model inputs of every frame of one IMavatar-format JSON (`read_flame_params`)."""

    json_path: str
    img_name: list[int]  # frame numbers, from each frame's file_path ("./image/<n>")
    expression: torch.Tensor  # [F, 50] FLAME expression
    flame_pose: torch.Tensor  # [F, 15] axis-angle: global, neck, jaw, left eye, right eye (radians)
    cam_pose: torch.Tensor  # [F, 3, 4] converted cameras (spec §3.5)
    intrinsics: torch.Tensor  # [4, 4] NDC intrinsics (spec §3.5), shared by the frames
    shape_params: torch.Tensor  # [1, 100] FLAME identity of the tracked subject


def read_flame_params(json_path: str | os.PathLike) -> FlameParams:
    """Read one IMavatar-format flame_params.json on its own, from any folder (no images are read).

    The same parser, checks and camera conversion as `FaceDataset` (spec §3.3-§3.5), e.g. to drive an
    avatar with another video's expressions, poses and cameras. Raises a PointAvatarError naming the
    file (and frame and field) for a missing or malformed file.
    """
    json_path = os.fspath(json_path)
    if not os.path.isfile(json_path):
        raise PointAvatarError(f"{json_path}: no such file (working directory {os.getcwd()}).")
    video_dir = os.path.dirname(os.path.abspath(json_path))
    data: dict[str, list[Any]] = {k: [] for k in _FRAME_KEYS}
    intrinsics, shape_params = _read_video(
        json_path, os.path.basename(json_path), os.path.basename(video_dir), video_dir, data
    )
    world_mats = torch.from_numpy(np.stack(data["world_mats"]))  # [F, 3, 4] float32
    K, cam_pose = ndc_cameras(intrinsics, world_mats, json_path)
    return FlameParams(
        json_path=json_path,
        img_name=list(data["img_name"]),
        expression=torch.from_numpy(np.stack(data["expressions"])),
        flame_pose=torch.from_numpy(np.stack(data["flame_pose"])),
        cam_pose=cam_pose,
        intrinsics=K,
        shape_params=torch.from_numpy(shape_params).float().unsqueeze(0),
    )


def ndc_cameras(
    intrinsics: np.ndarray, world_mats: torch.Tensor, json_path: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """IMavatar cameras -> the renderer's (spec §3.5): intrinsics [4] = [-fx/W, fy/H, cx/W, cy/H] and
    world_mats [F, 3, 4] -> (NDC intrinsics K [4, 4] float32, converted cameras [F, 3, 4]).

    ``world_mats`` is converted in place and returned.
    """
    # NDC intrinsics, built in float64 like the original and cast once.
    K = np.zeros((4, 4))
    K[0, 0] = intrinsics[0] * 2
    K[1, 1] = intrinsics[1] * 2
    K[0, 2] = -(intrinsics[2] * 2 - 1.0)
    K[1, 2] = -(intrinsics[3] * 2 - 1.0)
    K[3, 2] = 1.0
    K[2, 3] = 1.0
    if K[0, 0] == 0 or K[1, 1] <= 0:
        raise PointAvatarError(
            f"{json_path}: field 'intrinsics' {intrinsics.tolist()} needs a focal length fx/W != 0 "
            "(its sign is IMavatar's x-axis convention) and fy/H > 0; expected [-fx/W, fy/H, cx/W, cy/H]."
        )
    # IMavatar stores -fx/W: flipping the x axis of both K and the cameras keeps the projection
    # and makes K00 positive. Then OpenGL (looks along -z) -> pytorch3d (looks along +z): negate
    # the rotation's third column and t_z. Exact only for diagonal R (IMavatar writes R = I).
    if K[0, 0] < 0:
        K[:, 0] *= -1
        world_mats[:, 0, :] *= -1
    world_mats[:, :3, 2] *= -1
    world_mats[:, 2, 3] *= -1
    return torch.from_numpy(K).float(), world_mats


class FaceDataset(Dataset):
    """IMavatar-format videos of one subject (spec §3.4).

    Args:
        data_folder: root of the datasets, e.g. "./data/datasets".
        subject_name: the subject folder name; the videos live in data_folder/subject/subject/.
        json_name: the per-video parameter file, e.g. "flame_params.json".
        sub_dir: video folder names, concatenated in this order.
        img_res: [W, H] the images and masks are resized to (OpenCV dsize order; square in practice).
        is_eval: accepted for compatibility and ignored, as in the original (spec §10.9).
        subsample: int s (every s-th frame), [a, b] (frames a..b-1) or any other list of frame indices,
            applied to the concatenated frame list.
        hard_mask: composite the ground-truth RGB with the matte binarised at 0.5 (object_mask stays soft).
        only_json: no ground truth; images and masks are never read.
        use_mean_expression: mean_expression = mean over frames, else zeros.
        use_var_expression: var_expression = unbiased variance over frames, else None.
        use_background: ground-truth RGB is the raw frame instead of the frame over white.
        load_images: read every image and mask once at construction (tqdm bar) instead of per item.

    Attributes:
        shape_params: [1, 100] FLAME identity from the last video's JSON.
        intrinsics: [4, 4] pytorch3d NDC intrinsics from the last video's JSON (spec §3.5).
        mean_expression: [1, 50]; var_expression: [1, 50] or None.
        gt_dir: folder of the last video.
        img_res: [W, H].
        data: per-frame lists (image_paths, mask_paths, semantic_paths, img_name, sub_dir) and tensors
            world_mats [F, 3, 4] (converted cameras), expressions [F, 50], flame_pose [F, 15],
            keypoints [F, K, 2] and bbox [F, 4] (None when some frame lacks them); with load_images
            also rgb and object_mask (lists of the ground-truth tensors).
    """

    def __init__(
        self,
        data_folder: str,
        subject_name: str,
        json_name: str,
        sub_dir: Sequence[str],
        img_res: Sequence[int],
        is_eval: bool = False,
        subsample: int | Sequence[int] = 1,
        hard_mask: bool = False,
        only_json: bool = False,
        use_mean_expression: bool = False,
        use_var_expression: bool = False,
        use_background: bool = False,
        load_images: bool = False,
    ) -> None:
        if isinstance(sub_dir, str):
            sub_dir = [sub_dir]
        if len(sub_dir) == 0:
            raise PointAvatarError(
                "dataset sub_dir is empty: list at least one video folder of subject "
                f"'{subject_name}' (e.g. sub_dir = [MVI_1810])."
            )
        if isinstance(img_res, int):
            img_res = [img_res, img_res]
        if len(img_res) != 2 or any(int(r) <= 0 for r in img_res):
            raise PointAvatarError(f"dataset img_res must be two positive integers [W, H], got {img_res}.")
        self.img_res = [int(img_res[0]), int(img_res[1])]
        self.num_pixels = self.img_res[0] * self.img_res[1]
        self.hard_mask = hard_mask
        self.only_json = only_json
        # Set by the trainer when it holds the ground truth itself (train.ground_truth_on_device):
        # items then carry no images.
        self.ground_truth_elsewhere = False
        self.use_background = use_background
        self.load_images = load_images

        subject_dir = os.path.join(data_folder, subject_name, subject_name)
        if not os.path.isdir(subject_dir):
            raise PointAvatarError(
                f"Subject folder not found: {subject_dir}. The dataset layout is "
                "<data_folder>/<subject>/<subject>/<video>/ (the subject name is repeated), with "
                f"<video>/image/, <video>/mask/ and <video>/{json_name}. Download the data "
                "(download_data.bash) or fix dataset.data_folder / dataset.subject_name; "
                "the demo conf (confs/demo.conf, dataset.synthetic.generate = true) generates a "
                "synthetic subject instead."
            )

        data: dict[str, list[Any]] = {k: [] for k in _FRAME_KEYS}
        intrinsics = shape_params = None
        for video in sub_dir:
            video_dir = os.path.join(subject_dir, video)
            if not os.path.isdir(video_dir):
                available = sorted(
                    d for d in os.listdir(subject_dir) if os.path.isdir(os.path.join(subject_dir, d))
                )
                raise PointAvatarError(
                    f"Video folder not found: {video_dir}. Videos present in {subject_dir}: "
                    f"{available or 'none'}. Fix dataset.train.sub_dir / dataset.test.sub_dir."
                )
            json_path = os.path.join(video_dir, json_name)
            intrinsics, shape_params = _read_video(json_path, json_name, video, video_dir, data)
        # shape_params, intrinsics and gt_dir come from the last video only (spec §3.4, §10.9).
        self.gt_dir = video_dir

        data = _subsample(data, subsample, list(sub_dir))

        world_mats = torch.from_numpy(np.stack(data["world_mats"]))  # [F, 3, 4] float32
        data["expressions"] = torch.from_numpy(np.stack(data["expressions"]))  # [F, 50]
        data["flame_pose"] = torch.from_numpy(np.stack(data["flame_pose"]))  # [F, 15]
        data["keypoints"] = _stack_optional(data["keypoints"])  # [F, K, 2] or None
        data["bbox"] = _stack_optional(data["bbox"])  # [F, 4] or None

        self.intrinsics, data["world_mats"] = ndc_cameras(intrinsics, world_mats, json_path)  # [4, 4]
        self.shape_params = torch.from_numpy(shape_params).float().unsqueeze(0)  # [1, 100] float32
        self.data = data

        expressions = data["expressions"]
        if use_mean_expression:
            self.mean_expression = expressions.mean(0, keepdim=True)  # [1, 50]
        else:
            self.mean_expression = torch.zeros(1, N_EXPRESSION)
        if use_var_expression:
            if expressions.shape[0] < 2:
                raise PointAvatarError(
                    "use_var_expression needs at least 2 frames for the expression variance; the "
                    f"dataset {list(sub_dir)} has {expressions.shape[0]} after subsampling."
                )
            self.var_expression = expressions.var(0, unbiased=True, keepdim=True)  # [1, 50]
        else:
            self.var_expression = None

        if load_images and not only_json:
            rgbs, masks = [], []
            for idx in tqdm(range(len(self)), desc="Loading images", unit="frame"):
                rgb, mask = self._load_ground_truth(idx)
                rgbs.append(rgb)
                masks.append(mask)
            self.data["rgb"] = rgbs
            self.data["object_mask"] = masks

    def __len__(self) -> int:
        return len(self.data["img_name"])

    def __getitem__(self, idx: int) -> tuple[int, dict[str, Any], dict[str, torch.Tensor]]:
        """Return (idx, sample, ground_truth) (spec §3.6); ground_truth is {} with only_json (or
        ground_truth_elsewhere)."""
        sample = {
            "idx": torch.LongTensor([idx]),
            "img_name": torch.LongTensor([self.data["img_name"][idx]]),
            "sub_dir": self.data["sub_dir"][idx],
            "intrinsics": self.intrinsics,  # [4, 4]
            "expression": self.data["expressions"][idx],  # [50]
            "flame_pose": self.data["flame_pose"][idx],  # [15]
            "cam_pose": self.data["world_mats"][idx],  # [3, 4] converted (spec §3.5)
        }
        ground_truth: dict[str, torch.Tensor] = {}
        if not (self.only_json or self.ground_truth_elsewhere):
            if "rgb" in self.data:
                rgb, mask = self.data["rgb"][idx], self.data["object_mask"][idx]
            else:
                rgb, mask = self._load_ground_truth(idx)
            ground_truth = {"rgb": rgb, "object_mask": mask}
        return idx, sample, ground_truth

    collate_fn = staticmethod(collate_fn)

    def frame_info(self, idx: int) -> FrameInfo:
        """Source files, name and landmarks of frame `idx` (for metrics and plots)."""
        keypoints, bbox = self.data["keypoints"], self.data["bbox"]
        return FrameInfo(
            sub_dir=self.data["sub_dir"][idx],
            img_name=self.data["img_name"][idx],
            image_path=self.data["image_paths"][idx],
            mask_path=self.data["mask_paths"][idx],
            semantic_path=self.data["semantic_paths"][idx],
            keypoints=None if keypoints is None else keypoints[idx],
            bbox=None if bbox is None else bbox[idx],
        )

    def _load_ground_truth(self, idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Ground truth of frame idx: rgb [P, 3] (over white unless use_background), object_mask [P] soft."""
        where = f"frame {self.data['img_name'][idx]} of video {self.data['sub_dir'][idx]}"
        rgb = load_rgb(self.data["image_paths"][idx], self.img_res, where)  # [H, W, 3]
        mask = load_mask(self.data["mask_paths"][idx], self.img_res, where)  # [H, W]
        rgb = torch.from_numpy(rgb).reshape(-1, 3)  # [P, 3] row-major from the top row
        mask = torch.from_numpy(mask).reshape(-1)  # [P]
        if not self.use_background:
            if self.hard_mask:
                alpha = (mask > 0.5).float()[:, None]
            else:
                alpha = mask[:, None]
            rgb = rgb * alpha + (1 - alpha)
        return rgb, mask


def load_rgb(path: str, img_res: Sequence[int], where: str = "") -> np.ndarray:
    """RGB image as float32 [H, W, 3] in [0, 1], resized bilinearly to img_res = [W, H].

    Matches the original: imageio.imread, scaled to [0, 1], cv2.resize(INTER_LINEAR). An alpha channel
    is dropped; a grey image is an error.
    """
    image = _imread(path, "Image", where)
    if image.ndim == 3 and image.shape[2] == 4:
        image = image[..., :3]
    if image.ndim != 3 or image.shape[2] != 3:
        channels = 1 if image.ndim == 2 else image.shape[2]
        raise PointAvatarError(
            f"Image {path} ({where}) has {channels} channel(s) (shape {image.shape}); the dataset needs "
            "RGB (3-channel) frames. Re-export the frame as RGB PNG."
        )
    image = _to_float(image, path, where)
    return _resize(image, img_res, path, "Image", where)


def load_mask(path: str, img_res: Sequence[int], where: str = "") -> np.ndarray:
    """Soft mask as float32 [H, W] in [0, 1], resized bilinearly to img_res = [W, H].

    1- or 3-channel PNGs are read as grey luminance exactly like the original's
    imageio.imread(as_gray=True): PIL's "F" conversion, 0.299 R + 0.587 G + 0.114 B in 0..255.
    """
    mask = _imread(path, "Mask", where, mode="F")
    return _resize(mask, img_res, path, "Mask", where) / np.float32(255.0)


def _imread(path: str, kind: str, where: str, **kwargs: Any) -> np.ndarray:
    if not os.path.isfile(path):
        hint = (
            "The mask of image/<n>.png is expected at mask/<n>.png in the same video folder."
            if kind == "Mask"
            else "Each frame's file_path in the JSON must name an existing image/<n>.png."
        )
        raise PointAvatarError(
            f"{kind} file not found: {path} ({where}). {hint} Set only_json to run without ground truth."
        )
    try:
        return iio.imread(path, plugin="pillow", **kwargs)
    except Exception as err:  # any decoder failure means an unreadable file
        raise PointAvatarError(
            f"Cannot read {kind.lower()} {path} ({where}): {err}. Re-export it as PNG."
        ) from err


def _to_float(image: np.ndarray, path: str, where: str) -> np.ndarray:
    # Integer images map to [0, 1] by their type's maximum, like skimage.img_as_float32.
    if image.dtype == np.uint8:
        return image.astype(np.float32) / np.float32(255.0)
    if image.dtype == np.uint16:
        return image.astype(np.float32) / np.float32(65535.0)
    if image.dtype.kind == "f":
        return image.astype(np.float32)
    raise PointAvatarError(f"Image {path} ({where}) has unsupported pixel type {image.dtype}; use 8-bit PNG.")


def _resize(image: np.ndarray, img_res: Sequence[int], path: str, kind: str, where: str) -> np.ndarray:
    """Resize to img_res = [W, H]; a frame of another aspect ratio (beyond ASPECT_TOLERANCE) is refused
    instead of being stretched."""
    width, height = int(img_res[0]), int(img_res[1])
    if image.shape[0] == height and image.shape[1] == width:
        return np.ascontiguousarray(image)
    found_h, found_w = image.shape[:2]
    if abs((found_w / found_h) / (width / height) - 1.0) >= ASPECT_TOLERANCE:
        raise PointAvatarError(
            f"{kind} {path} ({where}) is {found_w}x{found_h} (W x H), whose aspect ratio differs from "
            f"dataset img_res {list(img_res)} ({width}x{height}); resizing would stretch it. Crop or pad "
            "the frames to that aspect ratio (PointAvatar renders square images) or fix img_res."
        )
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)


def _read_json(json_path: str, json_name: str) -> dict[str, Any]:
    if not os.path.isfile(json_path):
        folder = os.path.dirname(json_path)
        present = sorted(f for f in os.listdir(folder) if f.endswith(".json"))
        raise PointAvatarError(
            f"Parameter file not found: {json_path}. JSON files in {folder}: {present or 'none'}. "
            f"Fix dataset.json_name (now '{json_name}') or run the IMavatar preprocessing for this video."
        )
    try:
        with open(json_path, encoding="utf-8") as f:
            params = json.load(f)
    except json.JSONDecodeError as err:
        raise PointAvatarError(
            f"{json_path} is not valid JSON: {err.msg} at line {err.lineno}, column {err.colno}. "
            "Fix or regenerate the file."
        ) from err
    except UnicodeDecodeError as err:
        raise PointAvatarError(f"{json_path} is not a UTF-8 text JSON file ({err}).") from err
    if not isinstance(params, dict):
        raise PointAvatarError(
            f"{json_path}: expected a JSON object with intrinsics, shape_params and frames."
        )
    missing = [key for key in ("intrinsics", "shape_params", "frames") if key not in params]
    if missing:
        raise PointAvatarError(
            f"{json_path} lacks the field(s) {missing}; an IMavatar flame_params.json has "
            "intrinsics, shape_params and frames (spec §3.3)."
        )
    return params


def _read_video(
    json_path: str, json_name: str, video: str, video_dir: str, data: dict
) -> tuple[np.ndarray, np.ndarray]:
    """Parse one video's JSON into ``data`` (per-frame lists); returns its (intrinsics [4], shape_params [100])."""
    params = _read_json(json_path, json_name)
    intrinsics = _numbers(params["intrinsics"], (4,), json_path, "intrinsics")
    shape_params = _numbers(params["shape_params"], (N_SHAPE,), json_path, "shape_params")
    _check_bound(
        shape_params,
        MAX_ABS_COEFFICIENT,
        json_path,
        "field shape_params",
        "FLAME coefficients, in standard deviations",
    )
    frames = params["frames"]
    if not isinstance(frames, list) or len(frames) == 0:
        raise PointAvatarError(f"{json_path}: field 'frames' must be a non-empty list of frames.")
    for i, frame in enumerate(frames):
        _parse_frame(frame, i, json_path, video, video_dir, data)
    return intrinsics, shape_params


def _numbers(value: Any, shape: tuple[int, ...], json_path: str, field: str) -> np.ndarray:
    """value as a finite float64 array of the given shape, else a PointAvatarError naming the field."""
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise PointAvatarError(
            f"{json_path}: {field} must be numbers of shape {list(shape)} ({err})."
        ) from err
    if array.shape != shape:
        got = f"{array.size} values" if array.ndim == 1 else f"shape {list(array.shape)}"
        raise PointAvatarError(f"{json_path}: {field} has {got}, expected shape {list(shape)}.")
    if not np.isfinite(array).all():
        raise PointAvatarError(f"{json_path}: {field} contains NaN or infinite values.")
    return array


def _check_bound(array: np.ndarray, limit: float, json_path: str, field: str, units: str) -> None:
    """Refuse values with |v| > limit, naming the file, the field and the first bad entry."""
    bad = np.nonzero(np.abs(array) > limit)[0]
    if bad.size:
        i = int(bad[0])
        raise PointAvatarError(
            f"{json_path}: {field} entry {i} is {array[i]:.6g}, outside the plausible range "
            f"[-{limit:.6g}, {limit:.6g}] ({units}). The tracking output is corrupt: re-run the tracking "
            "or fix this frame."
        )


def _parse_frame(frame: Any, i: int, json_path: str, video: str, video_dir: str, data: dict) -> None:
    # frames[i] is the position in the JSON list; "./image/<n>" names the frame when present.
    where = f"frames[{i}]"
    if isinstance(frame, dict) and isinstance(frame.get("file_path"), str):
        where += f" ({frame['file_path']})"
    if not isinstance(frame, dict):
        raise PointAvatarError(f"{json_path}: {where} of 'frames' is not a JSON object.")
    missing = [key for key in ("file_path", "world_mat", "expression", "pose") if key not in frame]
    if missing:
        raise PointAvatarError(f"{json_path}: {where} lacks the field(s) {missing}.")
    file_path = frame["file_path"]
    if not isinstance(file_path, str):
        raise PointAvatarError(f"{json_path}: {where} field file_path must be a string like './image/12'.")
    name = str(file_path).replace("\\", "/").rstrip("/").split("/")[-1]
    try:
        img_name = int(name)
    except ValueError:
        raise PointAvatarError(
            f"{json_path}: {where} file_path '{file_path}' must end in the frame number, like './image/12'."
        ) from None
    world_mat = frame["world_mat"]
    # A 4x4 [R | t; 0 0 0 1] is accepted too: its first three rows are the 3x4 matrix.
    if isinstance(world_mat, list) and len(world_mat) == 4:
        world_mat = world_mat[:3]
    world_mat = _numbers(world_mat, (3, 4), json_path, f"{where} field world_mat")
    distance = float(np.linalg.norm(world_mat[:, 3]))
    if distance > MAX_CAMERA_DISTANCE:
        raise PointAvatarError(
            f"{json_path}: {where} field world_mat has a camera translation of length {distance:.6g}, "
            f"outside the plausible range |t| <= {MAX_CAMERA_DISTANCE:g} (FLAME world units). The tracking "
            "output is corrupt: re-run the tracking or fix this frame."
        )
    expression = _numbers(frame["expression"], (N_EXPRESSION,), json_path, f"{where} field expression")
    _check_bound(
        expression,
        MAX_ABS_COEFFICIENT,
        json_path,
        f"{where} field expression",
        "FLAME coefficients, in standard deviations",
    )
    pose = _numbers(frame["pose"], (N_POSE,), json_path, f"{where} field pose")
    _check_bound(
        pose, MAX_ABS_POSE, json_path, f"{where} field pose", "axis-angle radians; 4 pi is two full turns"
    )
    # JSON doubles -> float32 per frame like the original; the intrinsics stay float64 until K is built.
    data["world_mats"].append(world_mat.astype(np.float32))
    data["expressions"].append(expression.astype(np.float32))
    data["flame_pose"].append(pose.astype(np.float32))
    # Landmarks and bbox are not needed for training (the original never reads them); keep them for
    # the metrics and plots when present.
    keypoints = frame.get("flame_keypoints")
    if keypoints is not None:
        n = len(keypoints) if isinstance(keypoints, list) else 0
        keypoints = _numbers(keypoints, (n, 2), json_path, f"{where} field flame_keypoints").astype(
            np.float32
        )
    data["keypoints"].append(keypoints)
    bbox = frame.get("bbox")
    if bbox is not None:
        bbox = _numbers(bbox, (4,), json_path, f"{where} field bbox").astype(np.float32)
    data["bbox"].append(bbox)

    image_path = os.path.normpath(os.path.join(video_dir, file_path + ".png"))
    data["image_paths"].append(image_path)
    # Deliberate fix of spec §10.9: the original replaces every "image" in the whole image path by
    # "mask", which breaks when the data folder itself contains "image". The mask sits in the video
    # folder's mask/ directory under the same frame number, so we build that path directly.
    data["mask_paths"].append(os.path.join(video_dir, "mask", f"{name}.png"))
    data["semantic_paths"].append(os.path.join(video_dir, "semantic", f"{name}.png"))
    data["img_name"].append(img_name)
    data["sub_dir"].append(video)


def _subsample(data: dict[str, list], subsample: Any, sub_dir: list[str]) -> dict[str, list]:
    """Apply dataset.subsample to every per-frame list (spec §3.4 step 3)."""
    n_frames = len(data["img_name"])
    if isinstance(subsample, bool) or not isinstance(subsample, int | list | tuple):
        raise PointAvatarError(
            f"dataset subsample must be an int, [first, end] or a list of frame indices, got {subsample!r}."
        )
    if isinstance(subsample, int):
        if subsample < 1:
            raise PointAvatarError(f"dataset subsample must be >= 1 (1 = every frame), got {subsample}.")
        indices = list(range(0, n_frames, subsample))
    else:
        if not all(isinstance(s, int) and not isinstance(s, bool) for s in subsample):
            raise PointAvatarError(f"dataset subsample list must hold integers, got {list(subsample)}.")
        # Exactly two entries mean the range [a, b), as in the original; other lengths are indices.
        indices = list(range(subsample[0], subsample[1])) if len(subsample) == 2 else list(subsample)
        bad = [s for s in indices if not -n_frames <= s < n_frames]
        if bad:
            raise PointAvatarError(
                f"dataset subsample {list(subsample)} asks for frame(s) {bad[:5]} but {sub_dir} has "
                f"{n_frames} frames (indices 0..{n_frames - 1})."
            )
    if not indices:
        raise PointAvatarError(f"dataset subsample {subsample!r} selects no frames of {sub_dir}.")
    return {key: [values[i] for i in indices] for key, values in data.items()}


def _stack_optional(values: list[np.ndarray | None]) -> torch.Tensor | None:
    """Stack per-frame arrays into one tensor, or None when some frame lacks the field."""
    if any(v is None for v in values):
        return None
    shapes = {v.shape for v in values}
    if len(shapes) > 1:
        raise PointAvatarError(f"flame_keypoints differ in shape between frames: {sorted(shapes)}.")
    return torch.from_numpy(np.stack(values))
