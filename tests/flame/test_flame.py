"""FLAME layer: file formats (restricted unpickling), LBS, the FLAME module (spec §4)."""

from __future__ import annotations

import math
import os
import pickle
import re
import sys

import numpy as np
import pytest
import torch
from flame_fixtures import flame_state_shapes, make_landmarks
from tolerances import assert_close

from pointavatar.errors import PointAvatarError
from pointavatar.flame import (
    FLAME,
    FLAME_SCALE,
    lbs,
    read_flame_file,
    read_landmark_embedding,
    write_flame_pickle,
    write_landmark_embedding,
)

V = 200  # vertices of the tiny model
N_FACES = 300
# Vertex ranges by skinning: [0, 80) root only, [80, 120) root+neck, [120, 180) neck+jaw,
# [180, 190) left eye, [190, 200) right eye. Vertices below 120 carry no jaw/eye weight.
NO_JAW = 120


def make_model(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    v_template = rng.normal(scale=0.05, size=(V, 3))
    faces = rng.integers(0, V, size=(N_FACES, 3))
    shapedirs = rng.normal(scale=0.002, size=(V, 3, 400))
    posedirs = rng.normal(scale=0.002, size=(V, 3, 36))
    # Jaw/eye pose correctives only on jaw/eye vertices, as in FLAME, so a jaw rotation leaves the rest.
    posedirs[:NO_JAW, :, 9:] = 0.0
    weights = np.zeros((V, 5))
    weights[:80, 0] = 1.0
    w = rng.uniform(0.2, 0.8, size=40)
    weights[80:120, 0], weights[80:120, 1] = w, 1 - w
    w = rng.uniform(0.2, 0.8, size=60)
    weights[120:180, 1], weights[120:180, 2] = w, 1 - w
    weights[180:190, 3] = 1.0
    weights[190:200, 4] = 1.0
    regressor = np.zeros((5, V))
    for j, (lo, hi) in enumerate([(0, 80), (80, 120), (120, 180), (180, 190), (190, 200)]):
        cols = rng.choice(np.arange(lo, hi), size=5, replace=False)
        regressor[j, cols] = 0.2
    kintree = np.array([[4294967295, 0, 1, 1, 1], [0, 1, 2, 3, 4]], dtype=np.int64)
    return {
        "v_template": v_template,
        "f": faces,
        "shapedirs": shapedirs,
        "posedirs": posedirs,
        "J_regressor": regressor,
        "weights": weights,
        "kintree_table": kintree,
        "bs_style": "lbs",
    }


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("flame")
    model = make_model()
    write_flame_pickle(root / "generic_model.pkl", model)
    write_landmark_embedding(root / "landmark_embedding.npy", make_landmarks(N_FACES))
    return model, root / "generic_model.pkl", root / "landmark_embedding.npy"


@pytest.fixture(scope="module")
def flame(files):
    torch.manual_seed(0)
    _, pkl, lmk = files
    return FLAME(
        pkl,
        lmk,
        shape_params=torch.randn(1, 100) * 0.5,
        canonical_expression=torch.randn(1, 50) * 0.5,
        canonical_pose=0.4,
        ghostbone=True,
    )


@pytest.fixture(scope="module")
def flame64(flame):
    import copy

    return copy.deepcopy(flame).double()


def random_pose(batch: int, generator: torch.Generator, dtype=torch.float32) -> torch.Tensor:
    return (torch.rand(batch, 15, generator=generator, dtype=dtype) - 0.5) * 0.6


# ------------------------------------------------------------------------------------ file formats


# Plain pickle resolves the file's scipy.sparse.csc path (the real file's) through SciPy's shim.
@pytest.mark.filterwarnings("ignore:Please import `csc_matrix`:DeprecationWarning")
def test_pickle_with_chumpy_and_sparse_loads_without_chumpy(files):
    model, pkl, _ = files
    raw = pkl.read_bytes()
    # The file names the real chumpy class and a scipy.sparse matrix, like generic_model.pkl.
    assert b"chumpy.ch\nCh\n" in raw and b"csc_matrix" in raw
    loaded = read_flame_file(pkl)
    assert "chumpy" not in sys.modules
    for key in ("v_template", "f", "shapedirs", "posedirs", "J_regressor", "weights", "kintree_table"):
        np.testing.assert_array_equal(loaded[key], model[key], err_msg=key)
    assert loaded["kintree_table"][0, 0] == 4294967295  # raw root parent, mapped to -1 by the layer
    assert str(loaded["bs_style"]) == "lbs"
    # Plain pickle (what the original does, given chumpy) sees the same structure: a chumpy Ch whose
    # state carries the array under 'x'.
    stub = type("Ch", (), {"__setstate__": lambda self, d: setattr(self, "d", d)})
    fake = type(sys)("chumpy.ch")
    fake.Ch = stub
    saved = {k: sys.modules.get(k) for k in ("chumpy", "chumpy.ch")}
    sys.modules["chumpy"], sys.modules["chumpy.ch"] = type(sys)("chumpy"), fake
    try:
        plain = pickle.loads(raw, encoding="latin1")
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    np.testing.assert_array_equal(plain["shapedirs"].d["x"], model["shapedirs"])
    np.testing.assert_array_equal(plain["J_regressor"].toarray(), model["J_regressor"])


class _Evil:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"echo hi > {self.marker}",))


def test_pickle_referencing_os_system_is_refused_and_not_run(tmp_path):
    marker = tmp_path / "executed"
    path = tmp_path / "generic_model.pkl"
    with open(path, "wb") as f:
        pickle.dump({"v_template": np.zeros((3, 3)), "evil": _Evil(str(marker))}, f, protocol=2)
    with pytest.raises(PointAvatarError, match=r"refusing to load .*system.*never contains"):
        read_flame_file(path)
    assert not marker.exists()


def test_landmark_file_with_foreign_global_is_refused(tmp_path):
    marker = tmp_path / "executed"
    holder = np.empty((), dtype=object)
    holder[()] = {"x": _Evil(str(marker))}
    np.save(tmp_path / "lmk.npy", holder, allow_pickle=True)
    with pytest.raises(PointAvatarError, match="refusing to load"):
        read_landmark_embedding(tmp_path / "lmk.npy")
    assert not marker.exists()


def test_npz_reads_like_pickle(files, tmp_path):
    model, pkl, _ = files
    arrays = read_flame_file(pkl)
    npz = tmp_path / "generic_model.npz"
    np.savez(npz, **arrays)
    loaded = read_flame_file(npz)
    for key, value in arrays.items():
        np.testing.assert_array_equal(loaded[key], value, err_msg=key)
    a, b = FLAME(pkl, None), FLAME(npz, None)
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key


def test_missing_model_file_says_where_and_how(tmp_path):
    with pytest.raises(PointAvatarError) as err:
        read_flame_file(tmp_path / "generic_model.pkl")
    msg = str(err.value)
    for needle in (
        str(tmp_path),
        "flame.is.tue.mpg.de",
        "code/flame/FLAME2020",
        "download_data.bash",
        "demo.conf",
    ):
        assert needle in msg
    with pytest.raises(PointAvatarError, match="code/flame/FLAME2020"):
        FLAME(tmp_path / "generic_model.pkl", None)


def test_landmark_embedding_round_trip(files):
    _, _, lmk = files
    expected = make_landmarks(N_FACES)
    loaded = read_landmark_embedding(lmk)
    for key, value in expected.items():
        np.testing.assert_allclose(loaded[key], value, rtol=0, atol=1e-7, err_msg=key)  # float32 storage
    assert loaded["static_lmk_faces_idx"].dtype == np.int64
    # The real format: dynamic_* are torch tensors inside the pickled dict.
    raw = np.load(lmk, allow_pickle=True).item()
    assert torch.is_tensor(raw["dynamic_lmk_faces_idx"]) and raw["dynamic_lmk_faces_idx"].dtype == torch.int64
    assert isinstance(raw["static_lmk_faces_idx"], np.ndarray)


def _broken(key: str, value) -> dict[str, np.ndarray]:
    model = make_model()
    model[key] = value
    return model


# (key, replacement array, parts of the message: the key, the shape found and the one expected)
_BROKEN_MODELS = [
    ("v_template", np.zeros((V, 2)), ["'v_template'", "(200, 2)", "expected (V, 3)"]),
    ("weights", np.full((V, 4), 0.25), ["'weights'", "(200, 4)", "expected (V, J) with V = 200, J = 5"]),
    ("shapedirs", np.zeros((V + 1, 3, 400)), ["'shapedirs'", "(201, 3, 400)", "(V, 3, S) with V = 200"]),
    ("posedirs", np.zeros((V, 3, 35)), ["'posedirs'", "(200, 3, 35)", "P = 9 * (J - 1) = 36"]),
    ("posedirs", np.zeros((3 * V, 36)), ["'posedirs'", "(600, 36)", "(V, 3, P)"]),
    (
        "J_regressor",
        make_model()["J_regressor"][:, :-1],
        ["'J_regressor'", "(5, 199)", "(J, V) with J = 5, V = 200"],
    ),
    (
        "J_regressor",
        make_model()["J_regressor"][:4],
        ["'J_regressor'", "(4, 200)", "(J, V) with J = 5, V = 200"],
    ),
    ("f", np.zeros((N_FACES, 4), np.int64), ["'f'", "(300, 4)", "expected (F, 3)"]),
    ("kintree_table", np.zeros((3, 5), np.int64), ["'kintree_table'", "(3, 5)", "expected (2, J)"]),
]


@pytest.mark.parametrize(
    ("key", "value", "parts"), _BROKEN_MODELS, ids=[f"{k}{v.shape}" for k, v, _ in _BROKEN_MODELS]
)
def test_model_with_wrong_shape_is_refused(tmp_path, key, value, parts):
    pkl = tmp_path / "generic_model.pkl"
    write_flame_pickle(pkl, _broken(key, value))
    with pytest.raises(PointAvatarError) as err:
        read_flame_file(pkl)
    msg = str(err.value)
    assert msg.startswith(f"{pkl}: FLAME model array {parts[0]} has shape {parts[1]}"), msg
    for part in parts[2:]:
        assert part in msg, msg
    # The FLAME layer gets the same message (the reader checks before the layer indexes anything).
    with pytest.raises(PointAvatarError, match=re.escape(parts[1])):
        FLAME(pkl, None)


def test_npz_model_with_wrong_shape_is_refused(tmp_path):
    npz = tmp_path / "generic_model.npz"
    np.savez(npz, **_broken("weights", np.full((V, 4), 0.25)))
    with pytest.raises(PointAvatarError) as err:
        read_flame_file(npz)
    msg = str(err.value)
    assert msg.startswith(f"{npz}: FLAME model array 'weights' has shape (200, 4)")
    assert "expected (V, J) with V = 200, J = 5" in msg
    # No shape/expression basis at all (as .npz: the restricted unpickler refuses the bytes() call that
    # a pickle uses for the data of an empty array).
    np.savez(npz, **_broken("shapedirs", np.zeros((V, 3, 0))))
    with pytest.raises(PointAvatarError, match=r"'shapedirs' has shape \(200, 3, 0\), expected \(V, 3, S\)"):
        read_flame_file(npz)


@pytest.mark.parametrize(("bad", "index"), [(V, "200"), (-1, "-1")])
def test_model_with_face_index_out_of_range_is_refused(tmp_path, bad, index):
    faces = make_model()["f"].copy()
    faces[7, 1] = bad
    pkl = tmp_path / "generic_model.pkl"
    write_flame_pickle(pkl, _broken("f", faces))
    with pytest.raises(PointAvatarError) as err:
        read_flame_file(pkl)
    msg = str(err.value)
    assert str(pkl) in msg and "'f'" in msg and f"vertex index {index}" in msg
    assert "expected indices in [0, 200)" in msg


def test_model_with_float_faces_or_bad_kinematic_tree_is_refused(tmp_path):
    pkl = tmp_path / "generic_model.pkl"
    write_flame_pickle(pkl, _broken("f", make_model()["f"].astype(np.float64)))
    with pytest.raises(PointAvatarError, match=r"'f' holds float64 values, expected integer vertex ids"):
        read_flame_file(pkl)
    # Joint 2's parent is joint 3, which comes after it: the kinematic chain cannot be built in order.
    kintree = np.array([[-1, 0, 3, 1, 1], [0, 1, 2, 3, 4]], dtype=np.int64)
    write_flame_pickle(pkl, _broken("kintree_table", kintree))
    with pytest.raises(PointAvatarError) as err:
        read_flame_file(pkl)
    msg = str(err.value)
    assert str(pkl) in msg and "'kintree_table' gives joint 2 the parent 3" in msg and "[0, 1]" in msg


def test_model_with_nan_is_refused(tmp_path):
    v_template = make_model()["v_template"].copy()
    v_template[3, 0] = np.nan
    pkl = tmp_path / "generic_model.pkl"
    write_flame_pickle(pkl, _broken("v_template", v_template))
    with pytest.raises(PointAvatarError, match=r"'v_template' contains NaN or infinite values") as err:
        read_flame_file(pkl)
    assert str(pkl) in str(err.value)


def test_landmark_face_index_beyond_the_model_is_refused(files, tmp_path):
    _, pkl, _ = files
    landmarks = make_landmarks(N_FACES)
    landmarks["static_lmk_faces_idx"][5] = N_FACES  # one past the last face of the model
    lmk = tmp_path / "landmark_embedding.npy"
    write_landmark_embedding(lmk, landmarks)
    read_landmark_embedding(lmk)  # alone, the face count is unknown: only the shapes are checked
    with pytest.raises(PointAvatarError) as err:
        read_landmark_embedding(lmk, n_faces=N_FACES)
    msg = str(err.value)
    assert str(lmk) in msg and "'static_lmk_faces_idx'" in msg and "face index 300" in msg
    assert "expected indices in [0, 300)" in msg
    with pytest.raises(PointAvatarError, match=r"'static_lmk_faces_idx' has face index 300"):
        FLAME(pkl, lmk)


def test_landmark_embedding_with_wrong_shape_or_negative_index_is_refused(tmp_path):
    lmk = tmp_path / "landmark_embedding.npy"
    landmarks = make_landmarks(N_FACES)
    landmarks["dynamic_lmk_faces_idx"] = landmarks["dynamic_lmk_faces_idx"][:78]  # one yaw row short
    write_landmark_embedding(lmk, landmarks)
    with pytest.raises(PointAvatarError) as err:
        read_landmark_embedding(lmk)
    msg = str(err.value)
    assert str(lmk) in msg and "'dynamic_lmk_faces_idx' has shape (78, 17), expected (79, K)" in msg
    landmarks = make_landmarks(N_FACES)
    landmarks["full_lmk_faces_idx"][0, 3] = -2
    write_landmark_embedding(lmk, landmarks)
    with pytest.raises(
        PointAvatarError, match=r"'full_lmk_faces_idx' has face index -2, expected indices >= 0"
    ):
        read_landmark_embedding(lmk)


# ---------------------------------------------------------------------------------------- LBS


def test_lbs_gradcheck_float64(files):
    model, _, _ = files
    g = torch.Generator().manual_seed(1)
    d = torch.float64
    v_template = torch.from_numpy(model["v_template"][:40]).to(d).requires_grad_()
    shapedirs = torch.from_numpy(model["shapedirs"][:40, :, :6]).to(d)
    posedirs = torch.from_numpy(model["posedirs"][:40].reshape(-1, 36).T.copy()).to(d)
    regressor = torch.from_numpy(model["J_regressor"][:, :40]).to(d)
    regressor = regressor + 0.01  # every joint depends on the kept vertices
    weights = torch.from_numpy(model["weights"][:40]).to(d)
    weights = (weights + 0.1) / (weights + 0.1).sum(1, keepdim=True)
    betas = torch.randn(2, 6, generator=g, dtype=d, requires_grad=True)
    pose = random_pose(2, g, d).requires_grad_()
    parents = torch.tensor([-1, 0, 1, 1, 1])

    def fn(b, p, vt):
        return lbs(b, p, vt, shapedirs, posedirs, regressor, parents, weights)

    # gradcheck's default tolerances (atol 1e-5, rtol 1e-3) in float64.
    assert torch.autograd.gradcheck(fn, (betas, pose, v_template))


def test_forward_pts_gradcheck_float64(flame64):
    g = torch.Generator().manual_seed(2)
    d = torch.float64
    idx = torch.arange(100, 200, 10)
    weights, exp_dirs, posedirs = flame64.get_pseudo_gt(idx)
    weights = weights + 0.05  # include the ghost bone
    weights = weights / weights.sum(1, keepdim=True)
    _, pose_feature, transforms = flame64(torch.randn(2, 50, generator=g, dtype=d), random_pose(2, g, d))
    pnts = (flame64.canonical_verts[idx] + 0.01 * torch.randn(10, 3, generator=g, dtype=d)).requires_grad_()
    betas = torch.randn(2, 50, generator=g, dtype=d)

    def fn(x):
        return flame64.forward_pts(x, betas, transforms, pose_feature, exp_dirs, posedirs, weights)

    # gradcheck's default tolerances (atol 1e-5, rtol 1e-3) in float64.
    assert torch.autograd.gradcheck(fn, (pnts,))


# ----------------------------------------------------------------------------------- FLAME module


def test_state_dict_names_and_shapes(flame, files):
    model, _, _ = files
    sd = flame.state_dict()
    expected = flame_state_shapes(V, N_FACES)
    assert list(sd) == list(expected)  # spec Appendix A order
    for key, shape in expected.items():
        assert tuple(sd[key].shape) == shape, key
    assert flame.parents.tolist() == [-1, 0, 1, 1, 1]
    assert flame.neck_kin_chain.tolist() == [1, 0]
    assert not flame.eye_pose.requires_grad and not flame.neck_pose.requires_grad
    assert flame.canonical_transformations.shape == (1, 6, 4, 4)
    assert flame.canonical_verts.shape == (V, 3) and flame.canonical_pose_feature.shape == (1, 36)
    # Scale 4 on shapedirs/posedirs (spec §4.3); expression columns are 300:350. rtol 1e-6: the buffer
    # is float32, the file float64.
    np.testing.assert_allclose(
        flame.shapedirs[:, :, 100:].numpy(), 4 * model["shapedirs"][:, :, 300:350], rtol=1e-6
    )
    no_lmk = FLAME(files[1], None)
    assert "lmk_faces_idx" not in no_lmk.state_dict()
    with pytest.raises(PointAvatarError, match="landmark"):
        no_lmk.find_landmarks(no_lmk.canonical_verts[None], torch.zeros(1, 15))


def test_canonical_state_follows_dtype_and_device(flame64):
    assert flame64.canonical_verts.dtype == torch.float64
    assert flame64.canonical_transformations.dtype == torch.float64
    assert flame64.canonical_exp.dtype == torch.float64


def test_zero_expression_and_pose_gives_template(flame):
    verts, pose_feature, transforms = flame(torch.zeros(2, 50), torch.zeros(2, 15))
    # Rodrigues' 1e-8 angle offset leaves rotations at I up to ~1e-8.
    assert_close(verts, flame.v_template.expand(2, -1, -1), rtol=0, atol=1e-6)
    assert pose_feature.abs().max() < 1e-6
    assert_close(transforms, torch.eye(4).expand(2, 6, 4, 4), rtol=0, atol=1e-6)


def test_jaw_rotation_moves_only_jaw_weighted_vertices(flame):
    pose = torch.zeros(1, 15)
    rest, _, _ = flame(torch.zeros(1, 50), pose)
    pose[0, 6] = 0.5  # jaw about x
    opened, _, _ = flame(torch.zeros(1, 50), pose)
    moved = (opened - rest).norm(dim=-1)[0]
    assert moved[:NO_JAW].max() < 1e-6  # float32 round-off only
    assert (moved[120:180] > 1e-4).all()


def test_forward_pts_on_flame_vertices_reproduces_forward(flame):
    g = torch.Generator().manual_seed(3)
    expression = torch.randn(3, 50, generator=g)
    pose = random_pose(3, g)
    verts, pose_feature, transforms = flame(expression, pose)
    weights, exp_dirs, posedirs = flame.get_pseudo_gt(torch.arange(V))
    pts = flame.forward_pts(
        flame.canonical_verts, expression, transforms, pose_feature, exp_dirs, posedirs, weights
    )
    # float32: the canonical 4x4 inverse and the round trip lose a few ulps of coordinates ~0.5.
    assert_close(pts, verts, rtol=0)


def test_pseudo_gt_matches_buffers(flame, files):
    model, _, _ = files
    idx = torch.tensor([0, 150, 199])
    weights, exp_dirs, posedirs = flame.get_pseudo_gt(idx)
    assert weights.shape == (3, 6) and exp_dirs.shape == (3, 3, 50) and posedirs.shape == (3, 36, 3)
    assert torch.all(weights[:, 0] == 0)
    np.testing.assert_allclose(weights[:, 1:].numpy(), model["weights"][idx.numpy()], rtol=0, atol=1e-7)
    np.testing.assert_allclose(
        posedirs.numpy(), 4 * model["posedirs"][idx.numpy()].transpose(0, 2, 1), rtol=1e-6, atol=1e-9
    )
    assert FLAME_SCALE == 4.0


def test_vmap_jacfwd_through_forward_pts(flame):
    g = torch.Generator().manual_seed(4)
    expression = torch.randn(2, 50, generator=g)
    _, pose_feature, transforms = flame(expression, random_pose(2, g))
    idx = torch.arange(0, V, 25)
    weights, exp_dirs, posedirs = flame.get_pseudo_gt(idx)
    pts = flame.canonical_verts[idx]

    def one(x, e, p, w):  # a single point -> [B, 3]
        return flame.forward_pts(x[None], expression, transforms, pose_feature, e[None], p[None], w[None])[
            :, 0
        ]

    jac = torch.func.vmap(torch.func.jacfwd(one))(pts, exp_dirs, posedirs, weights)  # [N, B, 3, 3]
    assert jac.shape == (len(idx), 2, 3, 3)
    ref = torch.autograd.functional.jacobian(lambda x: one(x, exp_dirs[3], posedirs[3], weights[3]), pts[3])
    assert_close(jac[3], ref, atol=1e-6)  # same float32 ops, two AD modes (observed: exact)


def test_find_landmarks(flame):
    g = torch.Generator().manual_seed(5)
    pose = random_pose(2, g)
    verts, _, _ = flame(torch.randn(2, 50, generator=g), pose)
    lmk = flame.find_landmarks(verts, pose)
    assert lmk.shape == (2, 68, 3)
    # The 51 static landmarks are the barycentric mix of their face's corners.
    face = flame.faces_tensor[flame.lmk_faces_idx[0]]
    expected = (flame.lmk_bary_coords[0, :, None] * verts[1, face]).sum(0)
    assert_close(lmk[1, 17], expected)
    assert flame.find_full_landmarks(verts).shape == (2, 68, 3)


@pytest.mark.parametrize("yaw_deg,row", [(10.0, 10), (-10.0, 49), (50.0, 39), (-50.0, 78), (0.0, 0)])
def test_dynamic_contour_row_follows_head_yaw(flame, yaw_deg, row):
    pose = torch.zeros(1, 15)
    pose[0, 1] = math.radians(yaw_deg)  # root rotation about y
    assert flame._dynamic_contour_rows(pose).tolist() == [row]
