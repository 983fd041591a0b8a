"""The synthetic FLAME-format model and IMavatar-format subject (pointavatar.synthetic)."""

import filecmp
import json

import imageio.v3 as iio
import numpy as np
import pytest
import scipy.ndimage as ndi
import torch
from tolerances import assert_close

from pointavatar.data import FaceDataset, collate_fn
from pointavatar.flame import FLAME, read_flame_file, read_landmark_embedding
from pointavatar.synthetic import ensure_synthetic_subject, make_synthetic_subject
from pointavatar.synthetic.generator import CLOTH, _trajectory

RES = 64
N_TRAIN, N_TEST = 3, 2
SUBJECT = "synthetic"
VIDEOS = ("train0", "train1", "test")


@pytest.fixture(scope="module")
def subject(tmp_path_factory):
    folder = tmp_path_factory.mktemp("datasets")
    root = make_synthetic_subject(folder, SUBJECT, res=RES, train_frames=N_TRAIN, test_frames=N_TEST, seed=0)
    return folder, root


def _frames(root, video):
    return json.loads((root / SUBJECT / video / "flame_params.json").read_text())


def test_layout_and_json(subject):
    _, root = subject
    for video, n in zip(VIDEOS, (N_TRAIN, N_TRAIN, N_TEST), strict=True):
        d = root / SUBJECT / video
        for k in range(1, n + 1):
            assert iio.imread(d / "image" / f"{k}.png").shape == (RES, RES, 3)
            mask = iio.imread(d / "mask" / f"{k}.png")
            assert mask.shape == (RES, RES, 3) and (mask[..., 0] == mask[..., 2]).all()
            assert iio.imread(d / "semantic" / f"{k}.png").dtype == np.uint8
        js = _frames(root, video)
        assert len(js["intrinsics"]) == 4 and js["intrinsics"][0] < 0
        assert len(js["shape_params"]) == 100
        assert [f["file_path"] for f in js["frames"]] == [f"./image/{k}" for k in range(1, n + 1)]
        for f in js["frames"]:
            assert np.array(f["world_mat"]).shape == (3, 4)
            assert_close(np.array(f["world_mat"])[:, :3], np.eye(3), atol=1e-8)  # written as literals
            assert -4.2 < f["world_mat"][2][3] < -3.8
            assert len(f["expression"]) == 50 and len(f["pose"]) == 15 and len(f["bbox"]) == 4
            kp = np.array(f["flame_keypoints"])
            assert kp.shape == (70, 2) and np.abs(kp).max() < 1.0
    # One camera translation per video, slightly different between videos.
    t = [tuple(_frames(root, v)["frames"][0]["world_mat"][i][3] for i in range(3)) for v in VIDEOS]
    assert len(set(t)) == 3


def test_model_file_reads_back_like_flame(subject):
    _, root = subject
    m = read_flame_file(root / "flame" / "generic_model.pkl")
    V = m["v_template"].shape[0]
    assert m["v_template"].shape == (V, 3)
    assert m["f"].shape[1] == 3 and m["f"].max() < V
    assert m["shapedirs"].shape == (V, 3, 400)
    assert m["posedirs"].shape == (V, 3, 36)
    assert m["J_regressor"].shape == (5, V)
    assert m["weights"].shape == (V, 5)
    np.testing.assert_allclose(m["weights"].sum(1), 1.0, atol=1e-9)  # partition of unity
    assert m["kintree_table"].shape == (2, 5)
    assert list(m["kintree_table"][0, 1:]) == [0, 1, 1, 1]
    width = np.ptp(m["v_template"][:, 0])
    assert 0.13 < width < 0.2  # metres, a head about 16 cm wide like FLAME
    raw = (root / "flame" / "generic_model.pkl").read_bytes()
    assert b"chumpy" in raw and b"csc_matrix" in raw  # the real file's object types
    lmk = read_landmark_embedding(root / "flame" / "landmark_embedding.npy")
    assert lmk["static_lmk_faces_idx"].shape == (51,)
    assert lmk["dynamic_lmk_faces_idx"].shape == (79, 17)
    assert lmk["dynamic_lmk_bary_coords"].shape == (79, 17, 3)
    assert lmk["full_lmk_faces_idx"].shape == (1, 68)
    # float64 barycentrics [1 - u - v, u, v]: they sum to 1 up to rounding.
    np.testing.assert_allclose(lmk["static_lmk_bary_coords"].sum(1), 1.0, atol=1e-9)


def test_camera_projection_matches_keypoints(subject):
    """FLAME landmarks projected with the dataset's converted cameras land on flame_keypoints."""
    from pointavatar.render.camera import project_points

    folder, root = subject
    ds = FaceDataset(str(folder), SUBJECT, "flame_params.json", list(VIDEOS), [RES, RES], only_json=True)
    batch = collate_fn([ds[i] for i in range(len(ds))])[1]
    flame = FLAME(
        root / "flame" / "generic_model.pkl",
        root / "flame" / "landmark_embedding.npy",
        shape_params=ds.shape_params,
        ghostbone=False,
    )
    with torch.no_grad():
        verts, _, _ = flame(batch["expression"], batch["flame_pose"])
        lmk = flame.find_landmarks(verts, batch["flame_pose"])
        ndc = project_points(lmk, batch["intrinsics"], batch["cam_pose"])
    u = (1.0 - ndc[..., 0]) * RES / 2  # pytorch3d NDC: +x left, +y up
    v = (1.0 - ndc[..., 1]) * RES / 2
    kp = torch.cat(
        [torch.tensor([f["flame_keypoints"] for f in _frames(root, vid)["frames"]]) for vid in VIDEOS]
    )
    expected = (kp[:, :68] + 1.0) * RES / 2
    err = torch.stack([u, v], -1) - expected
    assert err.abs().max() < 1.0  # pixels; float32 FLAME here vs float64 at generation: far below 1 px


def test_masks_soft_and_labels_present(subject):
    _, root = subject
    mask = iio.imread(root / SUBJECT / "train0" / "mask" / "1.png")[..., 0] / 255.0
    assert mask.min() == 0.0 and mask.max() == 1.0
    assert ((mask > 0.02) & (mask < 0.98)).sum() > 10  # anti-aliased silhouette
    labels = set(np.unique(iio.imread(root / SUBJECT / "train0" / "semantic" / "1.png")).tolist())
    assert {0, 1, 2, 3, 4, 5, 10, 12, 13, 14, 16, 17} <= labels


def test_torso_static_within_video(subject):
    _, root = subject
    for video in VIDEOS:
        d = root / SUBJECT / video
        ims = [iio.imread(d / "image" / f"{k}.png") for k in (1, 2)]
        cloth = [iio.imread(d / "semantic" / f"{k}.png") == CLOTH for k in (1, 2)]
        # Pixels whose 3x3 neighbourhood is cloth in both frames contain no head sample.
        both = ndi.binary_erosion(cloth[0] & cloth[1], np.ones((3, 3)))
        assert both.sum() > 100
        assert (ims[0][both] == ims[1][both]).all()


def test_files_hold_the_trajectories_and_test_frames_are_new(subject):
    _, root = subject

    def codes(video):
        return np.array([f["expression"] + f["pose"] for f in _frames(root, video)["frames"]])

    train = np.concatenate([codes("train0"), codes("train1")])
    test = codes("test")
    # The generated files hold the trajectories of _trajectory for their seeds.
    for v_idx, video in enumerate(VIDEOS):
        n = len(codes(video))
        expr, pose = _trajectory(n, np.random.default_rng([0, 3, v_idx]))
        # JSON keeps float64 values exactly (shortest repr round trip).
        np.testing.assert_allclose(codes(video), np.concatenate([expr, pose], 1), atol=1e-12)
    # No test frame repeats a training frame.
    assert np.linalg.norm(test[:, None] - train[None], axis=-1).min() > 0.05


def test_trajectories_move_jaw_and_neck_together():
    """Full-length videos: training sees the jaw open while the head turns (as a real capture does),
    and every test frame's (jaw, neck rotation) lies near some training frame."""

    def jaw_neck(v_idx, n):
        _, pose = _trajectory(n, np.random.default_rng([0, 3, v_idx]))
        return np.concatenate([pose[:, 6:7], pose[:, 3:6]], 1)

    train = np.concatenate([jaw_neck(0, 200), jaw_neck(1, 200)])  # as benchmarks/synthetic512.conf
    test = jaw_neck(2, 20)
    for codes in (train, test):
        # 1e-12 slack: the signals are weighted means of sines, in [-1, 1] up to float64 rounding.
        assert codes[:, 0].min() >= 0.0 and codes[:, 0].max() <= 0.25 + 1e-12
        assert (np.abs(codes[:, 1:]) <= np.array([0.2, 0.35, 0.08]) + 1e-12).all()
    # Jaw open by more than 0.12 rad with the head turned by more than 0.15 rad, in training.
    assert ((train[:, 0] > 0.12) & (np.linalg.norm(train[:, 1:], axis=1) > 0.15)).sum() >= 10
    # Coverage: each test frame is within 0.15 rad (jaw and neck together) of a training frame...
    dist = np.linalg.norm(test[:, None] - train[None], axis=-1).min(1)
    assert dist.max() < 0.15
    # ... but is not one of them.
    assert dist.min() > 1e-3


@pytest.mark.slow
def test_deterministic_and_ensure(subject, tmp_path):
    folder, root = subject
    other = make_synthetic_subject(
        tmp_path, SUBJECT, res=RES, train_frames=N_TRAIN, test_frames=N_TEST, seed=0
    )
    files = sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(other) for p in other.rglob("*") if p.is_file())
    for rel in files:
        if rel.name == "landmark_embedding.npy":
            continue  # compared by content below
        assert filecmp.cmp(root / rel, other / rel, shallow=False), rel
    # torch's legacy tensor pickling (the real file's format) names storages by memory address, so
    # the landmark file's bytes differ between writes; its content must not.
    a, b = (read_landmark_embedding(r / "flame" / "landmark_embedding.npy") for r in (root, other))
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    # ensure: same arguments -> untouched; different arguments -> regenerated.
    stamp = (other / SUBJECT / "test" / "image" / "1.png").stat().st_mtime_ns
    ensure_synthetic_subject(tmp_path, SUBJECT, RES, N_TRAIN, N_TEST, 0)
    assert (other / SUBJECT / "test" / "image" / "1.png").stat().st_mtime_ns == stamp
    ensure_synthetic_subject(tmp_path, SUBJECT, RES, N_TRAIN, 1, 0)
    assert not (other / SUBJECT / "test" / "image" / "2.png").exists()
