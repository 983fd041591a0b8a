"""A synthetic FLAME-format head model and an IMavatar-format subject rendered from it.

The real FLAME model and the captured videos are licensed, so the demo, the tests and the benchmarks
use this stand-in. It uses exactly the real file formats (spec §3, §4.2), so the same loaders serve
both:

- `make_synthetic_flame` writes `generic_model.pkl` (same keys, shape pattern and types as FLAME 2020:
  v_template (V, 3) in metres, f (F, 3), shapedirs (V, 3, 400) = 300 identity + 100 expression
  components as a chumpy object, posedirs (V, 3, 36), J_regressor (5, V) scipy.sparse csc, weights
  (V, 5), kintree_table (2, 5) with the root parent 4294967295) and `landmark_embedding.npy` (51 static,
  79 x 17 dynamic contour and 68 full landmarks, as face indices + barycentric coordinates).
  The head has a cranium, a jaw that opens along the mouth line, a neck, ears, hair volume and two
  separate eyeball meshes, skinned to FLAME's five joints (0 root, 1 neck, 2 jaw, 3 left eye,
  4 right eye) with smooth weights.
- `make_synthetic_subject` poses that model with our own `pointavatar.flame.FLAME` layer (so the data
  and the layer agree, scale x4, spec §4.3), adds a static torso that is not part of FLAME (the ghost
  bone's job, spec §4.4), and renders RGB, soft masks and BiSeNet-style label maps with the small mesh
  renderer of `mesh_render.py` for two training videos and one test video, all three drawn from
  one "talking head" motion distribution (expressions, jaw, neck and gaze move together, as in a
  real capture), so the test frames are new combinations from the distribution training saw.

Frames: metres in the model file; world units = 4 x metres (the FLAME layer's scale). y up, the face
looks toward +z, +x is the subject's left (image right). Deterministic for a seed: the same arguments
write the same bytes.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import torch
from tqdm import tqdm

from pointavatar.errors import PointAvatarError
from pointavatar.flame import FLAME, write_flame_pickle, write_landmark_embedding
from pointavatar.synthetic import mesh_render

__all__ = [
    "CAPTURE_INTRINSICS",
    "make_synthetic_flame",
    "make_synthetic_subject",
    "ensure_synthetic_subject",
    "synthetic_template",
]

# Capture intrinsics of IMavatar's preprocessing at 512 x 512 (spec §3.2): fx, fy, cx, cy in pixels.
CAPTURE_INTRINSICS = (1539.67, 1508.93, 261.44, 253.23)
_REF_RES = 512
_FLAME_SCALE = 4.0  # the FLAME layer scales the model by 4 (spec §4.3)
_MANIFEST = "synthetic_manifest.json"
_FORMAT_VERSION = 5  # bump when the generated data changes, so ensure_synthetic_subject regenerates

# BiSeNet / CelebAMask-HQ label ids (spec §3.2 step 6).
BG, SKIN, L_BROW, R_BROW, L_EYE, R_EYE = 0, 1, 2, 3, 4, 5
L_EAR, R_EAR, NOSE, MOUTH, U_LIP, L_LIP, NECK, CLOTH, HAIR = 7, 8, 10, 11, 12, 13, 14, 16, 17

# Mesh parts (per vertex / per face).
PART_HEAD, PART_LEYE, PART_REYE, PART_TORSO = 0, 1, 2, 3

# Facial layout in frontal coordinates (metres, x = subject's left, y up).
_EYE_X, _EYE_Y, _EYE_R = 0.031, 0.020, 0.0125  # eyeball centre |x|, height, radius
_MOUTH_Y = -0.050  # mouth line at the front
_MOUTH_HALF_W = 0.026  # mouth corners at +-this x
_NOSE_TIP_Y = -0.016
_NECK_BOTTOM_Y = -0.17


def _smoothstep(e0: float, e1: float, x: np.ndarray) -> np.ndarray:
    """Cubic smoothstep from 0 at e0 to 1 at e1 (e0 > e1 gives the reversed ramp)."""
    t = np.clip((x - e0) / (e1 - e0), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _gauss(x: np.ndarray, y: np.ndarray, cx: float, cy: float, sx: float, sy: float) -> np.ndarray:
    return np.exp(-0.5 * (((x - cx) / sx) ** 2 + ((y - cy) / sy) ** 2))


# ------------------------------------------------------------------------------------ head geometry


def _head_radius(theta: np.ndarray, phi: np.ndarray) -> np.ndarray:
    """Radius of the undisplaced head + neck surface from the origin along (theta, phi).

    theta: polar angle from +y (0 = top of the head); phi: azimuth, 0 = +z (front), +pi/2 = +x.
    The head is an ellipsoid narrowing toward the jaw, smoothly united with an elliptic neck cylinder.
    """
    d = np.stack([np.sin(theta) * np.sin(phi), np.cos(theta), np.sin(theta) * np.cos(phi)], -1)
    ax = 0.078 - 0.012 * _smoothstep(np.deg2rad(100), np.deg2rad(150), theta)
    ay = np.where(d[..., 1] > 0, 0.118, 0.114)
    az = np.where(d[..., 2] > 0, 0.097 - 0.008 * _smoothstep(np.deg2rad(100), np.deg2rad(150), theta), 0.104)
    r_head = 1.0 / np.sqrt((d[..., 0] / ax) ** 2 + (d[..., 1] / ay) ** 2 + (d[..., 2] / az) ** 2)
    # Elliptic neck cylinder (semi-axes 4.6 cm x 5 cm) whose axis sits 1.5 cm behind the origin, so the
    # chin and jaw stand out in front of it: solve |(R dx, R dz - z0)|_ellipse = 1 for R.
    rx, rz, z0 = 0.046, 0.050, -0.015
    qa = (d[..., 0] / rx) ** 2 + (d[..., 2] / rz) ** 2
    qb = -2.0 * d[..., 2] * z0 / rz**2
    qc = (z0 / rz) ** 2 - 1.0
    r_cyl = (-qb + np.sqrt(qb**2 - 4.0 * qa * qc)) / (2.0 * np.maximum(qa, 1e-12))
    down = np.maximum(-np.cos(theta), 1e-6)
    r_neck = np.where(d[..., 1] < 0, np.minimum(r_cyl, -_NECK_BOTTOM_Y / down), 0.0)
    p = 8.0  # smooth union: the jaw-neck junction is rounded over about a centimetre
    return (r_head**p + r_neck**p) ** (1.0 / p)


def _base_point(theta: np.ndarray, phi: np.ndarray) -> np.ndarray:
    r = _head_radius(theta, phi)
    d = np.stack([np.sin(theta) * np.sin(phi), np.cos(theta), np.sin(theta) * np.cos(phi)], -1)
    return d * r[..., None]


def _mouth_theta() -> float:
    """Polar angle of the mouth line at the front (phi = 0), where the base surface has y = _MOUTH_Y."""
    thetas = np.linspace(np.deg2rad(90), np.deg2rad(150), 6001)
    y = _base_point(thetas, np.zeros_like(thetas))[:, 1]
    return float(thetas[np.argmin(np.abs(y - _MOUTH_Y))])


def _grid_angles() -> tuple[np.ndarray, np.ndarray, float, float]:
    """Rows (polar angles, top pole excluded) and columns (azimuths) of the head grid.

    Rows are dense over the face (brow to chin) and columns dense at the front, so the facial features
    get about 3 mm edges while the vertex count stays near FLAME's. Two rows 0.6 mm apart straddle the
    mouth line: the thin strip between them is the mouth interior that opens with the jaw.
    """
    theta_m = _mouth_theta()
    gap = 0.0003 / 0.09  # half-gap of the mouth rows in radians (0.3 mm at a 9 cm radius)
    rows = np.concatenate(
        [
            np.deg2rad(np.linspace(7.0, 40.0, 7, endpoint=False)),
            np.deg2rad(np.linspace(40.0, 150.0, 64, endpoint=False)),
            np.deg2rad(np.linspace(150.0, 164.0, 6)),
        ]
    )
    rows = rows[np.abs(rows - theta_m) > np.deg2rad(0.9)]
    rows = np.sort(np.concatenate([rows, [theta_m - gap, theta_m + gap]]))
    n_cols = 96
    t = (np.arange(n_cols) + 0.5) / n_cols * 2.0 - 1.0  # uniform in (-1, 1)
    a = 0.55  # phi'(0) = a * pi: columns 1.8x denser at the front than at the back
    cols = np.pi * (a * t + (1.0 - a) * t**3)
    return rows, cols, theta_m, gap


def _eye_socket(x: np.ndarray, y: np.ndarray, side: float) -> np.ndarray:
    """Almond-shaped socket profile in [0, 1] for the eye at x = side * _EYE_X (1 = fully recessed)."""
    ex = (x - side * _EYE_X) / 0.0128
    ey = (y - _EYE_Y + 0.0006 - 0.0015 * (1.0 - ex**2)) / 0.0048
    return _smoothstep(1.15, 0.75, np.sqrt(ex**2 + ey**2))


def _hairline(phi: np.ndarray) -> np.ndarray:
    """Height (m) of the hairline as a function of azimuth: high on the forehead, low at the nape."""
    deg = np.abs(np.rad2deg(phi))
    return np.interp(
        deg, [0, 30, 55, 75, 100, 118, 140, 180], [0.080, 0.076, 0.058, 0.040, 0.038, -0.02, -0.06, -0.07]
    )


def _hair_mask(p: np.ndarray, phi: np.ndarray) -> np.ndarray:
    return _smoothstep(-0.002, 0.003, p[..., 1] - _hairline(phi))


def _face_displacement(p: np.ndarray, phi: np.ndarray) -> np.ndarray:
    """Radial displacement (m) of the base surface: nose, brows, sockets, cheeks, lips, chin, ears, hair."""
    x, y, z = p[..., 0], p[..., 1], p[..., 2]
    front = _smoothstep(0.0, 0.045, z)
    # Nose: a ridge growing from the bridge to the tip, then the underside; alae beside the tip.
    t = np.clip((0.028 - y) / (0.028 - _NOSE_TIP_Y), 0.0, 1.0)
    height = np.where(
        y > _NOSE_TIP_Y, 0.004 + 0.017 * t**1.6, 0.021 * np.exp(-(((y - _NOSE_TIP_Y) / 0.0065) ** 2))
    )
    sigma = 0.0055 + 0.0045 * t
    nose = height * np.exp(-0.5 * (x / sigma) ** 2) * (y < 0.036)
    nose += 0.006 * (_gauss(x, y, 0.013, -0.021, 0.005, 0.005) + _gauss(x, y, -0.013, -0.021, 0.005, 0.005))
    brow = 0.005 * np.exp(-(((y - 0.041) / 0.008) ** 2)) * np.exp(-((x / 0.048) ** 4))
    sockets = 0.0105 * (_eye_socket(x, y, 1.0) + _eye_socket(x, y, -1.0))
    sockets += 0.003 * (
        _gauss(x, y, _EYE_X, _EYE_Y, 0.016, 0.011) + _gauss(x, y, -_EYE_X, _EYE_Y, 0.016, 0.011)
    )
    cheeks = 0.005 * (_gauss(x, y, 0.043, -0.01, 0.015, 0.013) + _gauss(x, y, -0.043, -0.01, 0.015, 0.013))
    lip_w = np.exp(-((x / 0.024) ** 4))
    lips = 0.0045 * lip_w * np.exp(-(((y - _MOUTH_Y - 0.0045) / 0.0042) ** 2))
    lips += 0.0055 * np.exp(-((x / 0.021) ** 4)) * np.exp(-(((y - _MOUTH_Y + 0.0065) / 0.005) ** 2))
    lips -= 0.0015 * lip_w * np.exp(-(((y - _MOUTH_Y) / 0.0012) ** 2))
    chin = 0.006 * _gauss(x, y, 0.0, -0.083, 0.016, 0.011)
    disp = front * (nose + brow - sockets + cheeks + lips + chin)
    # Ears on the sides (|phi| ~ 95 deg), a rim with a hollow.
    side = np.abs(x) > 0.04
    ez = (z + 0.01) / 0.014
    ey = (y - 0.0) / 0.03
    er = np.sqrt(ez**2 + ey**2)
    ears = side * (0.013 * _smoothstep(1.1, 0.75, er) - 0.005 * _smoothstep(0.75, 0.35, er))
    hair = 0.010 * _hair_mask(p, phi)
    return disp + ears + hair


@dataclass
class SyntheticTemplate:
    """The synthetic FLAME-format head (metres) and what the renderer needs to texture it."""

    verts: np.ndarray  # [V, 3] template vertices (metres)
    faces: np.ndarray  # [F, 3] int64, counter-clockwise seen from outside
    part: np.ndarray  # [V] PART_* id
    base: np.ndarray  # [V, 3] undisplaced surface point (head) or eyeball-local position (eyes)
    theta: np.ndarray  # [V] polar angle of the head grid row (0 for eyeballs)
    phi: np.ndarray  # [V] azimuth of the head grid column (0 for eyeballs)
    weights: np.ndarray  # [V, 5] LBS weights
    j_regressor: np.ndarray  # [5, V]
    eye_centres: np.ndarray  # [2, 3] left (+x), right (-x)
    eye_front: np.ndarray  # [2] vertex index of each eyeball's front pole (the pupil centre)
    theta_mouth: float
    mouth_gap: float


def _uv_sphere(n_rings: int, n_segments: int) -> tuple[np.ndarray, np.ndarray]:
    """Unit sphere with poles on +z (front) and -z; faces counter-clockwise seen from outside."""
    alpha = np.arange(1, n_rings) * np.pi / n_rings
    beta = np.arange(n_segments) * 2.0 * np.pi / n_segments
    a, b = np.meshgrid(alpha, beta, indexing="ij")
    ring = np.stack([np.sin(a) * np.cos(b), np.sin(a) * np.sin(b), np.cos(a)], -1).reshape(-1, 3)
    verts = np.concatenate([[[0.0, 0.0, 1.0]], ring, [[0.0, 0.0, -1.0]]])
    faces = _grid_faces(n_rings - 1, n_segments, offset=1, wrap=True)
    last = 1 + (n_rings - 2) * n_segments
    j = np.arange(n_segments)
    top = np.stack([np.zeros(n_segments, int), 1 + j, 1 + (j + 1) % n_segments], 1)
    bottom = np.stack([np.full(n_segments, last + n_segments), last + (j + 1) % n_segments, last + j], 1)
    faces = np.concatenate([top, faces, bottom])
    return verts, _orient_outward(verts, faces, np.zeros(3))


def _grid_faces(n_rows: int, n_cols: int, offset: int, wrap: bool) -> np.ndarray:
    i, j = np.meshgrid(np.arange(n_rows - 1), np.arange(n_cols if wrap else n_cols - 1), indexing="ij")
    i, j = i.reshape(-1), j.reshape(-1)
    jn = (j + 1) % n_cols
    a = offset + i * n_cols + j
    b = offset + i * n_cols + jn
    c = offset + (i + 1) * n_cols + jn
    d = offset + (i + 1) * n_cols + j
    return np.concatenate([np.stack([a, d, c], 1), np.stack([a, c, b], 1)])


def _orient_outward(verts: np.ndarray, faces: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """Flip every face whose normal points toward `centre` (star-shaped meshes)."""
    a, b, c = verts[faces[:, 0]], verts[faces[:, 1]], verts[faces[:, 2]]
    n = np.cross(b - a, c - a)
    inward = (n * ((a + b + c) / 3.0 - centre)).sum(1) < 0
    faces = faces.copy()
    faces[inward] = faces[inward][:, [0, 2, 1]]
    return faces


def _nearest(points: np.ndarray, targets: np.ndarray, k: int) -> np.ndarray:
    d = ((points[None, :, :] - targets[:, None, :]) ** 2).sum(-1)
    return np.argsort(d, axis=1, kind="stable")[:, :k]


_TEMPLATE_CACHE: SyntheticTemplate | None = None


def synthetic_template() -> SyntheticTemplate:
    """Build (once per process) the seed-independent template head, eyes, skinning and regressor."""
    global _TEMPLATE_CACHE
    if _TEMPLATE_CACHE is not None:
        return _TEMPLATE_CACHE
    rows, cols, theta_m, gap = _grid_angles()
    th, ph = np.meshgrid(rows, cols, indexing="ij")
    th = np.concatenate([[0.0], th.reshape(-1)])
    ph = np.concatenate([[0.0], ph.reshape(-1)])
    base = _base_point(th, ph)
    radial = base / np.linalg.norm(base, axis=1, keepdims=True)
    head = base + radial * _face_displacement(base, ph)[:, None]
    n_cols = cols.size
    faces = _grid_faces(rows.size, n_cols, offset=1, wrap=True)
    fan = np.stack([np.zeros(n_cols, int), 1 + (np.arange(n_cols) + 1) % n_cols, 1 + np.arange(n_cols)], 1)
    head_faces = _orient_outward(head, np.concatenate([fan, faces]), np.array([0.0, -0.02, 0.0]))

    # Eyeballs: their front sits 1 mm behind the undisplaced skin, inside the recessed almond.
    sphere_v, sphere_f = _uv_sphere(12, 20)
    front_z = []
    for side in (1.0, -1.0):
        # Base surface depth in front of the eye centre (search the fine front grid).
        tt, pp = np.meshgrid(np.linspace(0.9, 1.6, 400), np.linspace(-0.7, 0.7, 400), indexing="ij")
        bp = _base_point(tt, pp).reshape(-1, 3)
        i = np.argmin((bp[:, 0] - side * _EYE_X) ** 2 + (bp[:, 1] - _EYE_Y) ** 2)
        front_z.append(bp[i, 2])
    eye_centres = np.array(
        [[s * _EYE_X, _EYE_Y, z - _EYE_R - 0.001] for s, z in zip((1.0, -1.0), front_z, strict=True)]
    )

    verts = [head]
    all_faces = [head_faces]
    part = [np.full(head.shape[0], PART_HEAD)]
    bases = [base]
    eye_front = []
    for k, centre in enumerate(eye_centres):
        offset = sum(v.shape[0] for v in verts)
        verts.append(centre + _EYE_R * sphere_v)
        all_faces.append(sphere_f + offset)
        part.append(np.full(sphere_v.shape[0], PART_LEYE + k))
        bases.append(sphere_v.copy())
        eye_front.append(offset)  # vertex 0 of the sphere is the +z pole
    verts = np.concatenate(verts)
    faces = np.concatenate(all_faces).astype(np.int64)
    part = np.concatenate(part)
    base_all = np.concatenate(bases)
    n_head = head.shape[0]
    theta = np.concatenate([th, np.zeros(verts.shape[0] - n_head)])
    phi = np.concatenate([ph, np.zeros(verts.shape[0] - n_head)])

    # Skinning (joints 0 root, 1 neck, 2 jaw, 3 left eye, 4 right eye).
    x, y, z = base[:, 0], base[:, 1], base[:, 2]
    to_head = _smoothstep(-0.15, -0.095, y)  # neck: root at the bottom, head at the top
    jaw_region = _smoothstep(0.075, 0.045, np.abs(x)) * _smoothstep(-0.015, 0.035, z)
    jaw_region = jaw_region * _smoothstep(-0.14, -0.1, y)
    # Lens-shaped opening: the lips part most at the centre and not at all past the corners.
    in_mouth = np.clip(1.0 - (np.abs(x) / (_MOUTH_HALF_W + 0.004)) ** 2, 0.0, 1.0)
    # Below the mouth line the jaw region follows the jaw; above it only the cheeks beside the mouth
    # corners do (fading upward), so the lips part along the mouth line and nowhere else.
    above = th < theta_m
    # Fade by grid angle, not height, so the weights stay continuous along the mouth rows all round.
    fade_up = np.exp(-np.maximum(theta_m - gap - th, 0.0) / 0.12)  # exactly 1 on the upper mouth row
    jaw = jaw_region * np.where(above, (1.0 - in_mouth) * fade_up, 1.0)
    weights = np.zeros((verts.shape[0], 5))
    weights[:n_head, 0] = 1.0 - to_head
    weights[:n_head, 2] = to_head * jaw
    weights[:n_head, 1] = to_head * (1.0 - jaw)
    weights[part == PART_LEYE, 3] = 1.0
    weights[part == PART_REYE, 4] = 1.0

    # Joint regressor: joints 0-2 are the midpoints of symmetric surface patches, eyes the sphere means.
    j_reg = np.zeros((5, verts.shape[0]))
    for j, target in enumerate(([0.052, -0.14, 0.0], [0.058, -0.07, -0.012], [0.068, -0.03, -0.012])):
        t = np.array([target, [-target[0], target[1], target[2]]])
        idx = _nearest(head, t, 3).reshape(-1)
        j_reg[j, idx] = 1.0 / idx.size
    for k in range(2):
        mask = part == PART_LEYE + k
        j_reg[3 + k, mask] = 1.0 / mask.sum()

    _TEMPLATE_CACHE = SyntheticTemplate(
        verts=verts,
        faces=faces,
        part=part,
        base=base_all,
        theta=theta,
        phi=phi,
        weights=weights,
        j_regressor=j_reg,
        eye_centres=eye_centres,
        eye_front=np.array(eye_front),
        theta_mouth=theta_m,
        mouth_gap=gap,
    )
    return _TEMPLATE_CACHE


# ------------------------------------------------------------------------------------------ torso


def _torso() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Static shoulders and chest (metres, not part of FLAME): vertices [T, 3], faces, local coords."""
    n_rings, n_seg = 40, 72
    alpha = np.linspace(0.0, np.pi, n_rings + 1)[1:-1]
    beta = np.arange(n_seg) * 2.0 * np.pi / n_seg
    a, b = np.meshgrid(alpha, beta, indexing="ij")

    def spow(w: np.ndarray, e: float) -> np.ndarray:
        return np.sign(w) * np.abs(w) ** e

    x = 0.205 * spow(np.sin(a), 0.55) * spow(np.sin(b), 0.8)
    z = 0.105 * spow(np.sin(a), 0.55) * spow(np.cos(b), 0.8)
    y = 0.16 * spow(np.cos(a), 0.55)
    y = y - 0.9 * x**2  # sloping shoulders
    ring = np.stack([x, y, z], -1).reshape(-1, 3) + np.array([0.0, -0.29, -0.015])
    top = np.array([[0.0, -0.13, -0.015]])
    bottom = np.array([[0.0, -0.45, -0.015]])
    verts = np.concatenate([top, ring, bottom])
    faces = _grid_faces(n_rings - 1, n_seg, offset=1, wrap=True)
    last = 1 + (n_rings - 2) * n_seg
    j = np.arange(n_seg)
    fan_top = np.stack([np.zeros(n_seg, int), 1 + j, 1 + (j + 1) % n_seg], 1)
    fan_bot = np.stack([np.full(n_seg, last + n_seg), last + (j + 1) % n_seg, last + j], 1)
    faces = np.concatenate([fan_top, faces, fan_bot])
    faces = _orient_outward(verts, faces, np.array([0.0, -0.29, -0.015]))
    return verts, faces.astype(np.int64), verts.copy()


# --------------------------------------------------------------------------------------- shading

_LIGHT = np.array([-0.35, 0.45, 0.82]) / np.linalg.norm([-0.35, 0.45, 0.82])  # world frame, from upper left
_AMBIENT, _DIFFUSE = 0.38, 0.72


def _head_albedo(base: np.ndarray, theta: np.ndarray, t: SyntheticTemplate) -> tuple[np.ndarray, np.ndarray]:
    """Albedo [M, 3] and label [M] of head-skin samples from their interpolated template coordinates."""
    x, y, z = base[:, 0], base[:, 1], base[:, 2]
    phi = np.arctan2(x, z)
    m = x.shape[0]
    skin = np.array([0.86, 0.66, 0.55])
    col = np.tile(skin, (m, 1))
    # Subtle blush on the cheeks, darker skin under the jaw and on the neck.
    blush = 0.35 * (_gauss(x, y, 0.045, -0.02, 0.014, 0.012) + _gauss(x, y, -0.045, -0.02, 0.014, 0.012))
    col = col * (1 - blush[:, None]) + np.array([0.85, 0.52, 0.48]) * blush[:, None]
    label = np.full(m, SKIN, dtype=np.uint8)
    front = z > 0.0
    neck = (y < -0.088 - 0.01 * _smoothstep(0.04, 0.09, z)) | ((z < 0.02) & (y < -0.06) & (np.abs(x) < 0.06))
    neck &= theta > t.theta_mouth + 0.2
    col[neck] *= 0.93
    label[neck] = NECK
    nose_zone = (
        front & (np.abs(x) < 0.019) & (y > -0.03) & (y < 0.026) & (np.abs(x) < 0.006 + 0.5 * (0.026 - y))
    )
    label[nose_zone] = NOSE
    # Nostrils: small dark ellipses under the tip.
    nostril = (((np.abs(x) - 0.0075) / 0.0042) ** 2 + ((y + 0.0255) / 0.0022) ** 2 < 1.0) & front
    col[nostril] = [0.35, 0.18, 0.15]
    # Ears.
    ear = (np.abs(x) > 0.05) & ((((z + 0.01) / 0.016) ** 2 + (y / 0.033) ** 2) < 1.0)
    col[ear] *= 0.95
    label[ear] = np.where(x[ear] > 0, L_EAR, R_EAR)
    # Brows: arcs above the eyes.
    for side, lab in ((1.0, L_BROW), (-1.0, R_BROW)):
        u = (x * side - _EYE_X + 0.002) / 0.021
        centre = 0.039 + 0.0045 * (1 - u**2) - 0.002 * u
        thick = 0.0033 * (1 - 0.45 * np.clip(u, -1, 1))
        brow = front & (np.abs(u) < 1.0) & (np.abs(y - centre) < thick)
        col[brow] = [0.27, 0.17, 0.11]
        label[brow] = lab
    # Lips and the mouth strip between the two mouth rows.
    lip_u = (x / 0.027) ** 2 + ((y - _MOUTH_Y - 0.0035) / 0.0068) ** 2 < 1.0
    lip_l = (x / 0.024) ** 2 + ((y - _MOUTH_Y + 0.0045) / 0.0085) ** 2 < 1.0
    lip_u &= front & (theta < t.theta_mouth)
    lip_l &= front & (theta > t.theta_mouth)
    col[lip_u] = [0.72, 0.38, 0.38]
    col[lip_l] = [0.76, 0.42, 0.41]
    label[lip_u] = U_LIP
    label[lip_l] = L_LIP
    s = (theta - t.theta_mouth) / t.mouth_gap  # -1 (upper row) .. 1 (lower row)
    mouth = front & (np.abs(s) < 1.0) & (np.abs(x) < _MOUTH_HALF_W)
    teeth = mouth & (s < -0.8) & (np.abs(x) < 0.017)
    col[mouth] = [0.18, 0.06, 0.07]
    col[teeth] = [0.88, 0.86, 0.80]
    label[mouth] = MOUTH
    # Hair: streaky dark brown, on top and at the back.
    hair = _hair_mask(base, phi) > 0.5
    streak = 0.85 + 0.15 * np.sin(phi * 60.0 + 40.0 * y)
    col[hair] = np.array([0.24, 0.15, 0.09]) * streak[hair, None]
    label[hair] = HAIR
    return col, label


def _eye_albedo(local: np.ndarray) -> np.ndarray:
    """Albedo [M, 3] of eyeball samples from their eyeball-local direction (front pole = +z)."""
    n = local / np.maximum(np.linalg.norm(local, axis=1, keepdims=True), 1e-12)
    ang = np.arccos(np.clip(n[:, 2], -1.0, 1.0))
    col = np.tile(np.array([0.93, 0.91, 0.88]), (n.shape[0], 1))
    iris = ang < 0.46
    swirl = 0.9 + 0.1 * np.sin(np.arctan2(n[:, 1], n[:, 0]) * 18.0)
    col[iris] = np.array([0.30, 0.42, 0.50]) * swirl[iris, None]
    col[(ang > 0.40) & iris] *= 0.6  # limbal ring
    col[ang < 0.19] = [0.04, 0.04, 0.05]  # pupil
    return col


def _torso_albedo(local: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x, y, z = local[:, 0], local[:, 1], local[:, 2]
    col = np.tile(np.array([0.22, 0.36, 0.52]), (x.shape[0], 1))
    label = np.full(x.shape[0], CLOTH, dtype=np.uint8)
    skin = (z > 0.0) & (y > -0.215 + 1.4 * np.abs(x))  # V-neck
    col[skin] = np.array([0.86, 0.66, 0.55]) * 0.93
    label[skin] = NECK
    seam = (z > 0.0) & ~skin & (np.abs(y - (-0.215 + 1.4 * np.abs(x))) < 0.006)
    col[seam] *= 0.75
    return col, label


@dataclass
class _Scene:
    """Everything that is constant across the frames of a subject: meshes and texture coordinates."""

    template: SyntheticTemplate
    faces: np.ndarray  # [F, 3] head + eyes + torso
    face_part: np.ndarray  # [F] PART_* id
    tex: np.ndarray  # [V_all, 4] base xyz + grid theta
    torso_world: np.ndarray  # [T, 3] torso in world units (static)
    torso_normals: np.ndarray  # [T, 3]


def _make_scene() -> _Scene:
    t = synthetic_template()
    tv, tf, tlocal = _torso()
    n = t.verts.shape[0]
    faces = np.concatenate([t.faces, tf + n])
    part = np.concatenate([t.part, np.full(tv.shape[0], PART_TORSO)])
    tex = np.concatenate(
        [
            np.concatenate([t.base, t.theta[:, None]], 1),
            np.concatenate([tlocal, np.zeros((tv.shape[0], 1))], 1),
        ]
    )
    torso_world = tv * _FLAME_SCALE
    return _Scene(
        template=t,
        faces=faces,
        face_part=part[faces[:, 0]],
        tex=tex,
        torso_world=torso_world,
        torso_normals=mesh_render.vertex_normals(torso_world, tf),
    )


def render_frame(
    scene: _Scene, head_world: np.ndarray, cam_t: np.ndarray, res: int, supersample: int = 2
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Render one frame: posed head + eyes [V, 3] (world units) and the static torso.

    Returns rgb [res, res, 3] float in [0, 1] over the background, soft mask [res, res] in [0, 1] and
    labels [res, res] uint8 (BiSeNet ids, taken at the centre sample of each pixel).
    """
    t = scene.template
    ss = supersample
    n_head = t.verts.shape[0]
    verts = np.concatenate([head_world, scene.torso_world])
    normals = np.concatenate([mesh_render.vertex_normals(head_world, t.faces)[:n_head], scene.torso_normals])
    fx, fy, cx, cy = (v * res / _REF_RES * ss for v in CAPTURE_INTRINSICS)
    screen = mesh_render.project_opengl(verts, fx, fy, cx, cy, cam_t)
    size = res * ss
    face_idx, bary = mesh_render.rasterize(screen, scene.faces, size, size)
    flat, vals = mesh_render.interpolate(face_idx, bary, scene.faces, np.concatenate([scene.tex, normals], 1))
    part = scene.face_part[face_idx.reshape(-1)[flat]]
    base, theta, nrm = vals[:, :3], vals[:, 3], vals[:, 4:7]
    nrm = nrm / np.maximum(np.linalg.norm(nrm, axis=1, keepdims=True), 1e-12)
    albedo = np.zeros((flat.size, 3))
    label = np.zeros(flat.size, dtype=np.uint8)
    sel = part == PART_HEAD
    albedo[sel], label[sel] = _head_albedo(base[sel], theta[sel], t)
    for k, lab in ((PART_LEYE, L_EYE), (PART_REYE, R_EYE)):
        sel = part == k
        albedo[sel] = _eye_albedo(base[sel])
        label[sel] = lab
    sel = part == PART_TORSO
    albedo[sel], label[sel] = _torso_albedo(base[sel])
    lambert = np.clip(nrm @ _LIGHT, 0.0, None)
    shade = _AMBIENT + _DIFFUSE * lambert
    # A faint specular glint keeps the eyes alive; the view direction is about +z.
    half = _LIGHT + np.array([0.0, 0.0, 1.0])
    half /= np.linalg.norm(half)
    gloss = np.select([part == PART_TORSO, part == PART_HEAD], [0.0, 0.05], 0.65)  # eyes are glossy
    spec = (gloss * np.clip(nrm @ half, 0.0, None) ** 40)[:, None]
    colour = np.clip(albedo * shade[:, None] + spec, 0.0, 1.0)

    rows = (np.arange(size) + 0.5) / size
    background = np.empty((size, size, 3))
    background[:] = (
        np.array([0.78, 0.80, 0.83]) * (1 - rows[:, None]) + np.array([0.58, 0.61, 0.66]) * rows[:, None]
    )[:, None, :]
    image = background.reshape(-1, 3)
    image[flat] = colour
    cover = np.zeros(size * size)
    cover[flat] = 1.0
    labels = np.zeros(size * size, dtype=np.uint8)
    labels[flat] = label
    rgb = mesh_render.box_downsample(image.reshape(size, size, 3), ss)
    mask = mesh_render.box_downsample(cover.reshape(size, size), ss)
    labels = labels.reshape(size, size)[ss // 2 :: ss, ss // 2 :: ss]
    return rgb, mask, labels


# ------------------------------------------------------------------------------- blendshape bases


def _rigid_eyes(t: SyntheticTemplate, field: np.ndarray, centre_field: np.ndarray) -> np.ndarray:
    """Replace the eyeball rows of a displacement field [V, 3, K] by the field at their centres
    [2, 3, K], so identity changes move the eyeballs rigidly and they stay spheres."""
    out = field.copy()
    for k in range(2):
        out[t.part == PART_LEYE + k] = centre_field[k]
    return out


def _identity_bases(t: SyntheticTemplate, rng: np.random.Generator, n: int = 300) -> np.ndarray:
    """[V, 3, n] smooth, low-frequency identity displacement fields (metres per unit coefficient).

    Each component is a sum of three random Fourier features of the template position; frequency grows
    and amplitude shrinks with the component index, like a PCA basis.
    """
    pts = np.concatenate([t.base[t.part == PART_HEAD], t.eye_centres])  # undisplaced positions
    k = np.arange(n)
    freq = 2.0 * np.pi * (1.0 + 5.0 * k / n) / 0.3  # 1 to 6 cycles over a 30 cm head
    amp = 0.004 / np.sqrt(1.0 + k / 6.0)
    omega = rng.standard_normal((n, 3, 3)) / np.sqrt(3.0) * freq[:, None, None]  # [n, term, xyz]
    phase = rng.uniform(0.0, 2.0 * np.pi, (n, 3))
    vec = rng.standard_normal((n, 3, 3)) / 3.0 * amp[:, None, None]  # [n, term, xyz]
    waves = np.sin(np.einsum("pd,ntd->pnt", pts, omega) + phase[None])  # [P, n, term]
    field = np.einsum("pnt,ntd->pdn", waves, vec)  # [P, 3, n]
    out = np.zeros((t.verts.shape[0], 3, n))
    out[t.part == PART_HEAD] = field[:-2]
    return _rigid_eyes(t, out, field[-2:])


def _expression_bases(t: SyntheticTemplate, rng: np.random.Generator, n: int = 100) -> np.ndarray:
    """[V, 3, n] expression displacement fields (metres per unit coefficient), zero on the eyeballs.

    Components 0-9 are designed, localized facial actions; the rest are small random localized bumps.
    """
    head = t.part == PART_HEAD
    x, y, z = (t.base[head, i] for i in range(3))
    below = t.theta[head] > t.theta_mouth  # lower-lip side of the mouth line
    front = _smoothstep(0.0, 0.045, z)
    sx = np.sign(x)
    ones = np.ones_like(x)
    f = np.zeros((x.size, 3, n))

    def put(k: int, weight: np.ndarray, vec: tuple) -> None:
        f[:, :, k] += (weight * front)[:, None] * np.stack([np.broadcast_to(c, x.shape) for c in vec], 1)

    corners = _gauss(np.abs(x), y, _MOUTH_HALF_W, _MOUTH_Y, 0.012, 0.011)
    cheek = _gauss(np.abs(x), y, 0.038, -0.018, 0.015, 0.013)
    brows = _gauss(np.abs(x), y, 0.027, 0.042, 0.022, 0.012)
    lips = _gauss(x, y, 0.0, _MOUTH_Y, 0.02, 0.011)
    # Lip parting splits along the mouth rows: zero past the corners keeps the skin closed there.
    lens = np.clip(1.0 - (x / _MOUTH_HALF_W) ** 2, 0.0, 1.0)
    put(0, corners, (0.004 * sx, 0.006 * ones, -0.003 * ones))  # smile
    put(0, cheek, (0.0 * ones, 0.003 * ones, 0.002 * ones))
    put(1, brows, (0.0 * ones, 0.005 * ones, 0.001 * ones))  # brow raise
    put(2, lips, (-0.25 * x, 0.0 * ones, 0.006 * ones))  # pucker: lips forward and narrower
    puff = _gauss(np.abs(x), y, 0.042, -0.035, 0.016, 0.016)
    put(3, puff, (0.006 * sx, 0.0 * ones, 0.003 * ones))  # cheek puff
    # Eye close: the lids slide over the eyeball, filling the socket (1 = closed).
    sock = _eye_socket(x, y, 1.0) + _eye_socket(x, y, -1.0)
    put(4, sock, (0.0 * ones, -0.0015 * ones, 0.0105 * ones))
    put(5, brows, (-0.003 * sx, -0.004 * ones, 0.001 * ones))  # frown
    put(
        6,
        lips * lens * np.exp(-(((y - _MOUTH_Y) / 0.006) ** 2)),
        (0.0 * ones, np.where(below, -0.003, 0.003), 0.0 * ones),
    )
    put(7, corners * (x > 0), (0.003 * ones, 0.006 * ones, -0.002 * ones))  # left smirk
    put(8, corners, (0.006 * sx, -0.002 * ones, -0.002 * ones))  # mouth stretch
    sneer = _gauss(np.abs(x), y, 0.012, -0.01, 0.008, 0.01)
    put(9, sneer, (0.0 * ones, 0.004 * ones, 0.001 * ones))
    # Random localized bumps on the face for the remaining components.
    k = np.arange(10, n)
    cxy = np.stack([rng.uniform(-0.05, 0.05, k.size), rng.uniform(-0.09, 0.05, k.size)], 1)
    sig = rng.uniform(0.012, 0.025, k.size)
    vec = rng.standard_normal((k.size, 3)) * (0.002 / (1.0 + (k - 10) / 20.0))[:, None]
    bump = np.exp(-0.5 * ((x[:, None] - cxy[:, 0]) ** 2 + (y[:, None] - cxy[:, 1]) ** 2) / sig**2)  # [P, K]
    f[:, :, 10:] = (bump * front[:, None])[:, None, :] * vec.T[None]
    out = np.zeros((t.verts.shape[0], 3, n))
    out[head] = f
    return out


def _pose_correctives(t: SyntheticTemplate, rng: np.random.Generator) -> np.ndarray:
    """[V, 3, 36] small pose correctives: neck features bend the neck skin, jaw features the chin and
    the skin under it; eye features are zero (rigid eyeballs)."""
    head = t.part == PART_HEAD
    x, y, z = (t.base[head, i] for i in range(3))
    neck = _gauss(0.0 * x, y, 0.0, -0.11, 1.0, 0.025)
    jaw = t.weights[head, 2] * _smoothstep(-0.06, -0.1, y) + 0.3 * t.weights[head, 2]
    out = np.zeros((t.verts.shape[0], 3, 36))
    for i in range(18):
        region = neck if i < 9 else jaw
        a = rng.standard_normal(3) * 0.003
        w = rng.standard_normal(3) * 2.0 * np.pi / 0.2
        wave = np.cos(x * w[0] + y * w[1] + z * w[2])
        out[head, :, i] = (region * wave)[:, None] * a[None]
    return out


# -------------------------------------------------------------------------------------- landmarks


def _ray_hits(
    verts: np.ndarray, faces: np.ndarray, origins: np.ndarray, dirs: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """First hit of each ray [R, 3] on the mesh (Moller-Trumbore): face index [R] and barycentrics [R, 3]."""
    a, b, c = verts[faces[:, 0]], verts[faces[:, 1]], verts[faces[:, 2]]
    e1, e2 = b - a, c - a
    out_f = np.full(origins.shape[0], -1, dtype=np.int64)
    out_b = np.zeros((origins.shape[0], 3))
    for s in range(0, origins.shape[0], 64):
        o, d = origins[s : s + 64, None, :], dirs[s : s + 64, None, :]  # [r, 1, 3]
        p = np.cross(d, e2[None])
        det = (e1[None] * p).sum(-1)
        inv = 1.0 / np.where(np.abs(det) < 1e-15, np.inf, det)
        tv = o - a[None]
        u = (tv * p).sum(-1) * inv
        q = np.cross(tv, e1[None])
        v = (d * q).sum(-1) * inv
        dist = (e2[None] * q).sum(-1) * inv
        ok = (u >= 0) & (v >= 0) & (u + v <= 1) & (dist > 0)
        dist = np.where(ok, dist, np.inf)
        best = np.argmin(dist, axis=1)
        rows = np.arange(best.size)
        if not np.isfinite(dist[rows, best]).all():
            raise RuntimeError("synthetic landmark ray missed the head mesh")
        out_f[s : s + 64] = best
        out_b[s : s + 64] = np.stack([1 - u[rows, best] - v[rows, best], u[rows, best], v[rows, best]], 1)
    return out_f, out_b


def _static_landmark_xy() -> np.ndarray:
    """Frontal (x, y) targets (m) of the 51 static landmarks, iBUG order 17..67 (image left = -x)."""
    pts = []
    for xs in ((-0.050, -0.042, -0.033, -0.024, -0.015), (0.015, 0.024, 0.033, 0.042, 0.050)):  # brows
        for x in xs:
            u = (abs(x) - _EYE_X + 0.002) / 0.021
            pts.append((x, 0.039 + 0.0045 * (1 - u**2) - 0.002 * u))
    pts += [(0.0, 0.022), (0.0, 0.010), (0.0, -0.002), (0.0, _NOSE_TIP_Y)]  # nose bridge
    pts += [(-0.012, -0.024), (-0.006, -0.026), (0.0, -0.027), (0.006, -0.026), (0.012, -0.024)]  # nostrils
    hw, hh, dx = 0.0125, 0.0048, 0.0045
    ye = _EYE_Y - 0.0006
    # Right eye 36 outer corner, 37-38 upper lid, 39 inner, 40-41 lower lid; left eye 42 inner
    # corner, 43-44 upper lid, 45 outer, 46-47 lower lid: both listed from image left to right.
    for xe in (-_EYE_X, _EYE_X):
        pts += [
            (xe - hw, ye),
            (xe - dx, ye + hh),
            (xe + dx, ye + hh),
            (xe + hw, ye),
            (xe + dx, ye - hh),
            (xe - dx, ye - hh),
        ]
    ym, w = _MOUTH_Y, _MOUTH_HALF_W
    pts += [(-w, ym), (-0.017, ym + 0.008), (-0.007, ym + 0.0105), (0.0, ym + 0.0095), (0.007, ym + 0.0105)]
    pts += [(0.017, ym + 0.008), (w, ym), (0.017, ym - 0.009), (0.007, ym - 0.0125), (0.0, ym - 0.013)]
    pts += [(-0.007, ym - 0.0125), (-0.017, ym - 0.009)]
    pts += [(-0.021, ym), (-0.008, ym + 0.0015), (0.0, ym + 0.0015), (0.008, ym + 0.0015)]
    pts += [(0.021, ym), (0.008, ym - 0.0015), (0.0, ym - 0.0015), (-0.008, ym - 0.0015)]
    return np.array(pts)


def _contour_rays(angle_deg: float) -> tuple[np.ndarray, np.ndarray]:
    """17 rays (origins, directions) hitting the jaw contour for a head yaw (degrees, + toward +x).

    The contour runs from the subject's right (-x, iBUG point 0) under the chin to the left. On the
    side turning away from the camera it follows the silhouette inward (DECA's dynamic contour).
    """
    s = np.linspace(-1.0, 1.0, 17)
    lim_left = min(78.0, 86.0 - max(angle_deg, 0.0))
    lim_right = min(78.0, 86.0 + min(angle_deg, 0.0))
    phi = np.deg2rad(np.where(s > 0, s * lim_left, s * lim_right))
    beta = np.deg2rad(20.0 + 28.0 * (1.0 - np.abs(s) ** 1.3))  # below the horizontal
    dirs = np.stack([np.sin(phi) * np.cos(beta), -np.sin(beta), np.cos(phi) * np.cos(beta)], 1)
    origins = np.tile([0.0, -0.02, -0.03], (17, 1))
    return origins, dirs


def _landmark_embedding(t: SyntheticTemplate) -> dict[str, np.ndarray]:
    centroid = t.verts[t.faces].mean(1)  # [F, 3]
    is_head = t.part[t.faces[:, 0]] == PART_HEAD
    # Candidate faces only (faster ray casting): the front for the static points, the lower front
    # half for the contour; both regions contain every first hit of their rays.
    front_faces = np.nonzero(is_head & (centroid[:, 2] > 0.0))[0]
    lower_faces = np.nonzero(is_head & (centroid[:, 1] < 0.04) & (centroid[:, 2] > -0.05))[0]
    xy = _static_landmark_xy()
    o = np.stack([xy[:, 0], xy[:, 1], np.full(len(xy), 0.5)], 1)
    d = np.tile([0.0, 0.0, -1.0], (len(xy), 1))
    f_static, b_static = _ray_hits(t.verts, t.faces[front_faces], o, d)
    # Rows 0..39: yaw 0..39 deg; rows 40..78: yaw -1..-39 deg (DECA's table layout).
    angles = [float(a) for a in range(40)] + [float(-a) for a in range(1, 40)]
    dyn_f, dyn_b = [], []
    cache: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}
    for a in angles:
        origins, dirs = _contour_rays(a)
        key = dirs.tobytes()
        if key not in cache:
            fo, bo = _ray_hits(t.verts, t.faces[lower_faces], origins, dirs)
            cache[key] = (lower_faces[fo], bo)
        dyn_f.append(cache[key][0])
        dyn_b.append(cache[key][1])
    static_f = front_faces[f_static]
    return {
        "static_lmk_faces_idx": static_f,
        "static_lmk_bary_coords": b_static,
        "dynamic_lmk_faces_idx": np.stack(dyn_f),
        "dynamic_lmk_bary_coords": np.stack(dyn_b),
        "full_lmk_faces_idx": np.concatenate([dyn_f[0], static_f])[None],
        "full_lmk_bary_coords": np.concatenate([dyn_b[0], b_static])[None],
    }


# ------------------------------------------------------------------------------------ model files


def make_synthetic_flame(out_dir: str | os.PathLike, seed: int = 0) -> tuple[Path, Path]:
    """Write the synthetic FLAME model and landmark embedding into out_dir.

    Returns (generic_model.pkl path, landmark_embedding.npy path). The geometry is fixed; the identity,
    expression and pose-corrective bases are drawn from `seed`.
    """
    t = synthetic_template()
    rng = np.random.default_rng([seed, 1])
    shapedirs = np.concatenate([_identity_bases(t, rng), _expression_bases(t, rng)], axis=2)
    arrays = {
        "f": t.faces.astype(np.uint32),
        "J_regressor": t.j_regressor,
        "kintree_table": np.array([[-1, 0, 1, 1, 1], [0, 1, 2, 3, 4]], dtype=np.int64),
        "J": t.j_regressor @ t.verts,
        "weights": t.weights,
        "posedirs": _pose_correctives(t, rng),
        "bs_style": "lbs",
        "v_template": t.verts,
        "shapedirs": shapedirs,
        "bs_type": "lrotmin",
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model_path = out / "generic_model.pkl"
    lmk_path = out / "landmark_embedding.npy"
    write_flame_pickle(model_path, arrays)
    write_landmark_embedding(lmk_path, _landmark_embedding(t))
    return model_path, lmk_path


# ----------------------------------------------------------------------------------------- videos

_VIDEOS = (
    # name, camera translation t of world_mat = [I | t] (OpenGL convention, spec §3.3)
    ("train0", (0.0, 0.10, -4.0)),
    ("train1", (0.025, 0.09, -4.06)),
    ("test", (-0.02, 0.11, -3.95)),
)


def _smooth_signals(rng: np.random.Generator, n_frames: int, n: int, cycles: float = 2.0) -> np.ndarray:
    """[n_frames, n] smooth signals in about [-1, 1]: sums of three slow sinusoids with random phases."""
    t = np.arange(n_frames)[:, None, None] / max(n_frames, 1)
    freq = rng.uniform(0.3, cycles, (1, n, 3))
    phase = rng.uniform(0.0, 2.0 * np.pi, (1, n, 3))
    amp = rng.uniform(0.5, 1.0, (1, n, 3))
    return (amp * np.sin(2.0 * np.pi * freq * t + phase)).sum(-1) / amp.sum(-1)


def _trajectory(n_frames: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Expressions [F, 50] and poses [F, 15] of one video: a "talking head".

    As in a real capture, every video moves everything at once: designed expressions and blinks,
    the jaw (0 to 0.25 rad), the neck (pitch up to 0.2, yaw up to 0.35, roll up to 0.08 rad) and the
    gaze, each a smooth random signal of up to 16 cycles per video. The few hundred frames stand for
    a subsampled real capture of thousands, whose many distinct expressions determine every
    blendshape direction (with up to 2 cycles per video, most of the 50 expression directions were
    barely sampled). The videos differ only in their random draws (and camera), so the test video's
    frames are new (expression, pose) combinations from the same motion distribution as training,
    like a held-out video of the same person.
    """
    sig = _smooth_signals(rng, n_frames, 64, cycles=16.0)
    expr = np.zeros((n_frames, 50))
    designed = 0.45 + 0.75 * sig[:, :10]  # designed actions in about [-0.3, 1.2]
    designed[:, 4] = 0.9 * np.clip(sig[:, 4], 0.0, None) ** 3  # eye closing: occasional blinks
    expr[:, :10] = designed
    expr[:, 10:50] = 0.35 * sig[:, 10:50]
    pose = np.zeros((n_frames, 15))
    gaze = 0.12 * sig[:, 50:52]
    pose[:, 9:11] = gaze  # both eyes look the same way
    pose[:, 12:14] = gaze
    pose[:, 6] = 0.25 * 0.5 * (sig[:, 52] + 1.0)  # jaw opening in [0, 0.25]
    pose[:, 3] = 0.20 * sig[:, 56]  # neck pitch
    pose[:, 4] = 0.35 * sig[:, 57]  # yaw
    pose[:, 5] = 0.08 * sig[:, 58]  # roll
    return expr, pose


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.round(x * 255.0), 0, 255).astype(np.uint8)


_WORKER_SCENE = None  # the scene of the running generation, shared with forked workers


def _write_frame(job: tuple) -> None:
    """Render one posed frame and write its image, mask and semantic PNGs (runs in a worker)."""
    verts, t, res, supersample, video, n = job
    rgb, mask, labels = render_frame(_WORKER_SCENE, verts, t, res, supersample)
    iio.imwrite(video / "image" / f"{n}.png", _to_uint8(rgb))
    iio.imwrite(video / "mask" / f"{n}.png", np.repeat(_to_uint8(mask)[..., None], 3, axis=2))
    iio.imwrite(video / "semantic" / f"{n}.png", labels)


def default_workers() -> int:
    return max(1, min(16, os.cpu_count() or 1))


def make_synthetic_subject(
    data_folder: str | os.PathLike,
    subject_name: str = "synthetic",
    res: int = 512,
    train_frames: int = 100,
    test_frames: int = 40,
    seed: int = 0,
    workers: int | None = None,
) -> Path:
    """Generate the synthetic subject in IMavatar format (spec §3.1, §3.3) and return its root.

    Frames are rendered by ``workers`` forked processes (default: the CPU count, at most 16); the files
    do not depend on it.

    Writes data_folder/<subject>/flame/{generic_model.pkl, landmark_embedding.npy} and the videos
    data_folder/<subject>/<subject>/{train0, train1, test}/ (image/, mask/, semantic/ as 1-based PNGs
    and flame_params.json); train0 and train1 have `train_frames` frames each, test `test_frames`.
    Returns data_folder/<subject>. Deterministic for a seed.
    """
    if res < 16 or train_frames < 1 or test_frames < 1:
        raise PointAvatarError(
            f"make_synthetic_subject: res must be >= 16 and the frame counts >= 1 "
            f"(got res={res}, train_frames={train_frames}, test_frames={test_frames})."
        )
    root = Path(data_folder) / subject_name
    (root / _MANIFEST).unlink(missing_ok=True)  # invalid until this run completes
    model_path, lmk_path = make_synthetic_flame(root / "flame", seed=seed)
    rng = np.random.default_rng([seed, 2])
    shape = 0.8 * rng.standard_normal(100)
    flame = FLAME(model_path, lmk_path, shape_params=shape[None], ghostbone=False).double()
    scene = _make_scene()
    supersample = 2 if res >= 256 else 3
    fx, fy, cx, cy = (v * res / _REF_RES for v in CAPTURE_INTRINSICS)
    intrinsics = [-CAPTURE_INTRINSICS[0] / _REF_RES, CAPTURE_INTRINSICS[1] / _REF_RES]
    intrinsics += [CAPTURE_INTRINSICS[2] / _REF_RES, CAPTURE_INTRINSICS[3] / _REF_RES]
    counts = {"train0": train_frames, "train1": train_frames, "test": test_frames}
    global _WORKER_SCENE
    _WORKER_SCENE = scene
    workers = default_workers() if workers is None else max(1, int(workers))
    pool = multiprocessing.get_context("fork").Pool(workers) if workers > 1 else None
    jobs = []
    bar = tqdm(total=sum(counts.values()), desc=f"synthetic subject {subject_name} ({res}px)", unit="frame")
    for v_idx, (name, cam_t) in enumerate(_VIDEOS):
        n_frames = counts[name]
        video = root / subject_name / name
        if video.exists():
            shutil.rmtree(video)  # stale frames of an earlier, longer run
        for sub in ("image", "mask", "semantic"):
            (video / sub).mkdir(parents=True)
        expr, pose = _trajectory(n_frames, np.random.default_rng([seed, 3, v_idx]))
        t = np.array(cam_t)
        frames = []
        for start in range(0, n_frames, 16):
            e = torch.from_numpy(expr[start : start + 16])
            p = torch.from_numpy(pose[start : start + 16])
            with torch.no_grad():
                verts, _, _ = flame(e, p)
                lmk = flame.find_landmarks(verts, p)
            verts_np = verts.numpy()
            iris = verts_np[:, scene.template.eye_front]  # pupil centres = eye centres in the image
            kp3 = np.concatenate([lmk.numpy(), iris], axis=1)  # [B, 70, 3]
            for b in range(verts_np.shape[0]):
                n = start + b + 1
                jobs.append((verts_np[b], t, res, supersample, video, n))
                uvd = mesh_render.project_opengl(kp3[b], fx, fy, cx, cy, t)
                kp = np.stack([2.0 * uvd[:, 0] / res - 1.0, 2.0 * uvd[:, 1] / res - 1.0], 1)
                bbox = [*kp[:68].min(0), *kp[:68].max(0)]
                frames.append(
                    {
                        "file_path": f"./image/{n}",
                        "world_mat": [[1.0, 0.0, 0.0, t[0]], [0.0, 1.0, 0.0, t[1]], [0.0, 0.0, 1.0, t[2]]],
                        "expression": [float(x) for x in expr[n - 1]],
                        "pose": [float(x) for x in pose[n - 1]],
                        "bbox": [float(x) for x in bbox],
                        "flame_keypoints": [[float(a), float(c)] for a, c in kp],
                    }
                )
        params = {"intrinsics": intrinsics, "shape_params": [float(x) for x in shape], "frames": frames}
        (video / "flame_params.json").write_text(json.dumps(params, indent=1))
    try:
        results = pool.imap_unordered(_write_frame, jobs) if pool is not None else map(_write_frame, jobs)
        for _ in results:
            bar.update(1)
    finally:
        if pool is not None:
            pool.close()
            pool.join()
        _WORKER_SCENE = None
    bar.close()
    manifest = _manifest_dict(subject_name, res, train_frames, test_frames, seed)
    (root / _MANIFEST).write_text(json.dumps(manifest, indent=1))
    return root


def _manifest_dict(subject_name: str, res: int, train_frames: int, test_frames: int, seed: int) -> dict:
    return {
        # The module's old name, kept so that subjects generated before the move stay valid.
        "generator": "pointavatar.data.synthetic",
        "version": _FORMAT_VERSION,
        "subject_name": subject_name,
        "res": int(res),
        "train_frames": int(train_frames),
        "test_frames": int(test_frames),
        "seed": int(seed),
    }


def ensure_synthetic_subject(
    data_folder: str | os.PathLike,
    subject_name: str = "synthetic",
    res: int = 512,
    train_frames: int = 100,
    test_frames: int = 40,
    seed: int = 0,
) -> Path:
    """Generate the synthetic subject unless an identical one (same arguments) is already there.

    The subject folder's `synthetic_manifest.json` records the arguments of the last complete run; a
    missing manifest (interrupted run) or different arguments regenerate. A folder of that name that
    was not written by this generator is never overwritten.
    """
    root = Path(data_folder) / subject_name
    wanted = _manifest_dict(subject_name, res, train_frames, test_frames, seed)
    manifest = root / _MANIFEST
    if manifest.is_file():
        try:
            if json.loads(manifest.read_text()) == wanted:
                return root
        except json.JSONDecodeError:
            pass
    elif (root / subject_name).is_dir() and not (root / "flame" / "generic_model.pkl").is_file():
        raise PointAvatarError(
            f"{root} exists but was not written by the synthetic generator (no {_MANIFEST}); refusing to "
            f"overwrite it. Rename dataset.subject_name or move that folder away."
        )
    return make_synthetic_subject(data_folder, subject_name, res, train_frames, test_frames, seed)
