"""Tests of the HOCON conf layer (pointavatar.config; spec §1)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from pointavatar.config import (
    Conf,
    ConfError,
    SplitConf,
    conf_to_dict,
    dump_conf,
    load_conf,
    override,
    parse_conf,
    save_conf,
)
from pointavatar.errors import PointAvatarError

CONFS = Path(__file__).resolve().parents[1] / "confs"
SUBJECTS = ["subject1", "subject2", "subject3"]
ALL_CONFS = [*SUBJECTS, "demo"]


def _write(tmp_path: Path, text: str, name: str = "test.conf") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------------
# The shipped confs hold the original values (spec §1.2, §1.4)
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL_CONFS)
def test_shipped_conf_common_values(name: str) -> None:
    """Values every shipped conf shares with subject1.conf (the demo keeps the original architecture)."""
    c = load_conf(CONFS / f"{name}.conf")
    t = c.train
    assert t.exps_folder == "./data/experiments/"  # trailing comment stripped
    assert t.methodname == "pointavatar"
    assert t.dataset_class == "datasets.real_dataset.FaceDataset"
    assert t.learning_rate_cam == 5.0e-4
    assert t.num_pixels == 2048
    assert t.max_batch == 8
    assert t.plot_freq == 1
    assert t.sched_factor == 0.5
    assert t.GT_lbs_factor == 0.5
    assert t.optimize_expression is True and t.optimize_camera is True
    assert t.save_freq == 1 and t.checkpoint_freq == 5 and t.log_freq == 50
    assert t.keep_optimizer_state is False and t.prune_on_resume is False
    assert t.test_tracking is True and t.tracking_steps == 20
    if name != "demo":  # the demo compresses the schedule (test_demo_conf)
        assert t.learning_rate == 1.0e-4 and isinstance(t.learning_rate, float)
        assert t.upsample_freq == 5 and t.nepoch == 62 and t.input_optimization_start == 11
        assert t.sched_milestones == [40, 60] and t.fix_lr_schedule is False
        assert t.GT_lbs_milestones == [10, 20, 30, 40]

    lo = c.loss
    assert (lo.mask_weight, lo.lbs_weight, lo.eikonal_weight, lo.sdf_consistency_weight) == (
        1.0,
        10.0,
        0.1,
        1.0,
    )

    d = c.dataset
    assert d.data_folder == "./data/datasets"
    assert d.json_name == "flame_params.json"
    assert d.use_mean_expression is True and d.use_var_expression is True
    assert d.canonical_pose == 0.4
    assert d.use_background is False
    assert d.train.subsample == 1 and d.test.subsample == 200  # `subsample=  200` (odd spacing)
    assert d.train.load_images is True

    m = c.model
    assert m.prune_thresh == 0.5
    assert m.render_backend == "auto"
    g = m.geometry_network
    assert (g.d_in, g.d_out, g.feature_vector_size) == (3, 1, 3)
    assert g.dims == [256] * 9
    assert g.geometric_init is True and g.bias == 0.6 and g.skip_in == [4]
    assert g.weight_norm is True and g.multires == 6
    r = m.rendering_network
    assert (r.d_in, r.feature_vector_size, r.d_out, r.dims) == (3, 0, 3, [64, 64])
    assert r.weight_norm is True and (r.multires_view, r.multires_pnts) == (0, 0)
    df = m.deformer_network
    assert df.d_in == 3 and df.dims == [128] * 4 and df.weight_norm is True and df.multires == 0
    # The tab-indented lines of the original.
    assert df.num_exp == 50 and df.ghostbone is True and df.deform_c is True
    p = m.point_cloud
    assert p.n_init_points == 400 and p.init_radius == 0.5 and p.radius_factor == 0.3


@pytest.mark.parametrize("name", SUBJECTS)
def test_subject_confs_sizes_and_paths(name: str) -> None:
    c = load_conf(CONFS / f"{name}.conf")
    assert c.train.max_points_training == 819200
    assert c.train.num_workers == 4
    assert c.loss.vgg_feature_weight == 0.1
    assert c.model.point_cloud.max_points == 409600
    assert c.dataset.subject_name == name
    assert c.dataset.train.img_res == [512, 512] and c.dataset.test.img_res == [512, 512]
    assert c.dataset.synthetic.generate is False
    assert c.model.flame_model_path == "./code/flame/FLAME2020/generic_model.pkl"
    assert c.model.flame_landmark_path == "./code/flame/FLAME2020/landmark_embedding.npy"
    assert c.source_path == str(CONFS / f"{name}.conf")


@pytest.mark.parametrize(
    ("name", "train", "test", "hard_mask", "test_load"),
    [
        ("subject1", ["MVI_1810", "MVI_1814"], ["MVI_1812"], False, True),
        ("subject2", ["MVI_1797", "MVI_1801"], ["MVI_1802"], False, True),
        ("subject3", ["train"], ["test"], True, False),
        ("demo", ["train0", "train1"], ["test"], False, True),
    ],
)
def test_subject_differences(name, train, test, hard_mask, test_load) -> None:
    """spec §1.4: only these keys differ between the subjects."""
    d = load_conf(CONFS / f"{name}.conf").dataset
    assert d.train.sub_dir == train and d.test.sub_dir == test
    assert all(isinstance(s, str) for s in d.train.sub_dir + d.test.sub_dir)
    assert d.train.hard_mask is hard_mask and d.test.hard_mask is hard_mask
    assert d.test.load_images is test_load


def test_demo_conf() -> None:
    c = load_conf(CONFS / "demo.conf")
    assert c.dataset.subject_name == "synthetic"
    assert c.dataset.train.img_res == [128, 128] and c.dataset.test.img_res == [128, 128]
    assert c.dataset.synthetic.generate is True
    assert c.model.flame_model_path == "./data/datasets/synthetic/flame/generic_model.pkl"
    assert c.model.flame_landmark_path == "./data/datasets/synthetic/flame/landmark_embedding.npy"
    assert c.loss.vgg_feature_weight == 0.0 and isinstance(c.loss.vgg_feature_weight, float)
    assert c.train.num_workers == 0
    assert c.model.point_cloud.max_points == 6400
    assert c.train.max_points_training == 102400
    # Batch stays at max_batch up to the largest point cloud.
    assert c.train.max_points_training // c.model.point_cloud.max_points >= c.train.max_batch
    # The compressed schedule: 40 epochs, points doubled every 4, lr 1e-3 with the decay applied.
    t = c.train
    assert (t.nepoch, t.upsample_freq, t.learning_rate, t.fix_lr_schedule) == (39, 4, 1.0e-3, True)
    assert t.sched_milestones == [28, 34] and t.GT_lbs_milestones == [8, 16, 24, 32]
    assert t.input_optimization_start == 17
    assert (c.dataset.synthetic.train_frames, c.dataset.synthetic.test_frames) == (100, 20)


def test_subject1_equals_defaults() -> None:
    """The dataclass defaults are subject1's values, except canonical_pose (code default 0.2, spec §1.3)."""
    c = load_conf(CONFS / "subject1.conf")
    assert Conf().dataset.canonical_pose == 0.2
    assert override(Conf(), {"dataset.canonical_pose": 0.4}) == c


# ---------------------------------------------------------------------------------------------------
# Round trip
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL_CONFS)
def test_round_trip(name: str, tmp_path: Path) -> None:
    c = load_conf(CONFS / f"{name}.conf")
    text = dump_conf(c)
    assert "source_path" not in text
    assert parse_conf(text) == c
    save_conf(c, tmp_path / "run" / "runconf.conf")
    c2 = load_conf(tmp_path / "run" / "runconf.conf")
    assert c2 == c
    assert c2.source_path == str(tmp_path / "run" / "runconf.conf")


def test_round_trip_odd_values() -> None:
    c = override(
        Conf(),
        {
            "dataset.subject_name": "007",  # numeric-looking name with leading zeros stays a string
            "dataset.data_folder": "/data/my subject # 1/ü",
            "dataset.train.subsample": [0, 50],
            "dataset.test.sub_dir": ["1810", "a b"],
            "dataset.test.subsample": [3, 7, 11],
            "train.learning_rate": 1e-5,
            "loss.mask_weight": 0,
            "model.geometry_network.dims": [],
        },
    )
    assert c.loss.mask_weight == 0.0 and isinstance(c.loss.mask_weight, float)
    assert parse_conf(dump_conf(c)) == c


def test_conf_to_dict() -> None:
    d = conf_to_dict(Conf())
    assert set(d) == {"train", "loss", "dataset", "model"}
    assert d["dataset"]["test"]["subsample"] == 200
    assert d["model"]["point_cloud"]["max_points"] == 409600


# ---------------------------------------------------------------------------------------------------
# HOCON features of spec §1.1
# ---------------------------------------------------------------------------------------------------


def test_hocon_features(tmp_path: Path) -> None:
    text = (
        "train{\n"
        "    exps_folder = ../data/experiments/ # trailing comment after an unquoted value\n"
        "    optimize_camera=false # lower case\n"
        "}\n"
        "loss {\n"
        "\tlbs_weight    =5 # tab indentation, int for a float field\n"
        "\tsdf_consistency_weight =1.0e-2\n"
        "}\n"
        "dataset{\n"
        "    subject_name = 1234 # numeric-looking subject name\n"
        "    train{\n"
        "        sub_dir = [MVI_1810, 1814]\n"
        "        subsample=  [0, 10]\n"
        "        hard_mask = TRUE\n"
        "    }\n"
        "}\n"
        "model{\n"
        "    geometry_network\n"
        "    {\n"
        "        multires = 4\n"
        "    }\n"
        "}\n"
        "model.point_cloud.n_init_points = 100\n"  # dotted key path outside the block
    )
    c = load_conf(_write(tmp_path, text))
    assert c.train.exps_folder == "../data/experiments/"
    assert c.train.optimize_camera is False
    assert c.loss.lbs_weight == 5.0 and isinstance(c.loss.lbs_weight, float)
    assert c.loss.sdf_consistency_weight == 0.01  # float("1.0e-2") is exactly 0.01
    assert c.dataset.subject_name == "1234"
    assert c.dataset.train.sub_dir == ["MVI_1810", "1814"]
    assert c.dataset.train.subsample == [0, 10]
    assert c.dataset.train.hard_mask is True
    assert c.model.geometry_network.multires == 4
    assert c.model.point_cloud.n_init_points == 100
    # Absent keys keep their defaults; an absent test block keeps the test split's own defaults.
    assert c.model.geometry_network.dims == [256] * 9
    assert c.dataset.train.img_res == [512, 512]
    assert c.dataset.test.sub_dir == ["MVI_1812"] and c.dataset.test.subsample == 200
    assert c.dataset.canonical_pose == 0.2


def test_partial_test_block_keeps_test_defaults(tmp_path: Path) -> None:
    c = load_conf(_write(tmp_path, "dataset { test { load_images = False } }\n"))
    assert c.dataset.test == SplitConf(sub_dir=["MVI_1812"], subsample=200, load_images=False)


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    assert load_conf(_write(tmp_path, "# nothing\n")) == Conf()


# ---------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------


def test_misspelled_key(tmp_path: Path) -> None:
    path = _write(tmp_path, "model {\n    geometry_network\n    {\n        multiress = 6\n    }\n}\n")
    with pytest.raises(ConfError) as exc:
        load_conf(path)
    msg = str(exc.value)
    assert str(path) in msg
    assert "'model.geometry_network.multiress'" in msg
    assert "did you mean 'model.geometry_network.multires'" in msg
    assert isinstance(exc.value, PointAvatarError)


def test_unknown_top_level_block(tmp_path: Path) -> None:
    path = _write(tmp_path, "trian { learning_rate = 1.0e-4 }\n")
    with pytest.raises(ConfError, match=r"unknown conf key 'trian' \(did you mean 'train'\?\)") as exc:
        load_conf(path)
    assert str(path) in str(exc.value)

    path = _write(tmp_path, "wandb { project = x }\n", "other.conf")
    with pytest.raises(ConfError, match="valid keys in the top level: train, loss, dataset, model"):
        load_conf(path)


def test_source_path_is_not_a_key(tmp_path: Path) -> None:
    with pytest.raises(ConfError, match="unknown conf key 'source_path'"):
        load_conf(_write(tmp_path, "source_path = x\n"))


@pytest.mark.parametrize(
    ("text", "key", "expected", "found"),
    [
        ("train { max_batch = eight }", "train.max_batch", "expects int", "'eight' (str)"),
        ("train { max_batch = 8.5 }", "train.max_batch", "expects int", "8.5 (float)"),
        ("train { max_batch = True }", "train.max_batch", "expects int", "True (bool)"),
        ("loss { mask_weight = heavy }", "loss.mask_weight", "expects float", "'heavy' (str)"),
        ("train { optimize_camera = 1 }", "train.optimize_camera", "expects bool", "1 (int)"),
        ("dataset { train { img_res = 512 } }", "dataset.train.img_res", "expects list of int", "512 (int)"),
        (
            "dataset { train { img_res = [512, x] } }",
            "dataset.train.img_res",
            "expects list of int",
            "[512, 'x'] (list)",
        ),
        (
            "dataset { test { subsample = all } }",
            "dataset.test.subsample",
            "expects int or list of int",
            "'all' (str)",
        ),
        ("dataset { subject_name = [a, b] }", "dataset.subject_name", "expects str", "['a', 'b'] (list)"),
        ("dataset { subject_name = 1.5 }", "dataset.subject_name", "expects str", "1.5 (float)"),
        ("dataset { json_name = null }", "dataset.json_name", "expects str", "null"),
        ("model { geometry_network = 3 }", "model.geometry_network", "must be an object", "3 (int)"),
    ],
)
def test_wrong_type(tmp_path: Path, text: str, key: str, expected: str, found: str) -> None:
    path = _write(tmp_path, text + "\n")
    with pytest.raises(ConfError) as exc:
        load_conf(path)
    msg = str(exc.value)
    assert str(path) in msg and f"'{key}'" in msg and expected in msg and found in msg, msg


def test_bad_choice(tmp_path: Path) -> None:
    with pytest.raises(ConfError, match="'model.render_backend' must be one of 'auto', 'torch', 'cuda'"):
        load_conf(_write(tmp_path, "model { render_backend = triton }\n"))


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.conf"
    with pytest.raises(ConfError, match="conf file not found") as exc:
        load_conf(path)
    assert str(path) in str(exc.value)


def test_syntax_error(tmp_path: Path) -> None:
    path = _write(tmp_path, "train { max_batch = [8 }\n")
    with pytest.raises(ConfError, match="not valid HOCON") as exc:
        load_conf(path)
    assert str(path) in str(exc.value)


# ---------------------------------------------------------------------------------------------------
# override (the test runner's conf.put, spec §2.9)
# ---------------------------------------------------------------------------------------------------


def test_override() -> None:
    c = load_conf(CONFS / "subject1.conf")
    c2 = override(c, {"dataset.test.subsample": 1, "dataset.test.load_images": False})
    assert c2.dataset.test.subsample == 1 and c2.dataset.test.load_images is False
    # The input is untouched, the rest is equal, and source_path is carried over.
    assert c.dataset.test.subsample == 200 and c.dataset.test.load_images is True
    assert dataclasses.replace(c2.dataset, test=c.dataset.test) == c.dataset
    assert c2.source_path == c.source_path
    # Lists are copied, not shared.
    c2.dataset.train.sub_dir.append("x")
    assert c.dataset.train.sub_dir == ["MVI_1810", "MVI_1814"]
    # A mapping value for an object key, the method form, and type conversion.
    c3 = c.override({"dataset.train": {"subsample": [0, 5]}, "loss.lbs_weight": 1})
    assert c3.dataset.train.subsample == [0, 5] and c3.loss.lbs_weight == 1.0


def test_override_rejects_unknown_and_wrong_type() -> None:
    c = Conf()
    with pytest.raises(
        ConfError, match=r"override: unknown conf key 'dataset.test.subsampel' \(did you mean "
    ):
        override(c, {"dataset.test.subsampel": 1})
    with pytest.raises(ConfError, match="unknown conf key 'datset'"):
        override(c, {"datset.test.subsample": 1})
    with pytest.raises(ConfError, match="'dataset.test.load_images' expects bool"):
        override(c, {"dataset.test.load_images": "no"})
    with pytest.raises(ConfError, match="'dataset.test' must be an object"):
        override(c, {"dataset.test": 1})
    with pytest.raises(ConfError, match="malformed conf key"):
        override(c, {"dataset..test": 1})


# ---------------------------------------------------------------------------------------------------
# Value ranges: checked at load and after override, naming the file, the key and the allowed range
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "key", "allowed", "found"),
    [
        ("train { checkpoint_freq = 0 }", "train.checkpoint_freq", ">= 1", "found 0"),
        ("train { plot_freq = 0 }", "train.plot_freq", ">= 1", "found 0"),
        ("train { upsample_freq = -5 }", "train.upsample_freq", ">= 1", "found -5"),
        ("train { save_freq = 0 }", "train.save_freq", ">= 1", "found 0"),
        ("train { log_freq = 0 }", "train.log_freq", ">= 1", "found 0"),
        ("train { learning_rate = 0 }", "train.learning_rate", "> 0", "found 0.0"),
        ("train { learning_rate_cam = -1e-4 }", "train.learning_rate_cam", "> 0", "found -0.0001"),
        ("train { num_workers = -1 }", "train.num_workers", ">= 0", "found -1"),
        ("train { nepoch = -1 }", "train.nepoch", ">= 0", "found -1"),
        ("train { max_batch = 0 }", "train.max_batch", ">= 1", "found 0"),
        ("train { max_points_training = 0 }", "train.max_points_training", ">= 1", "found 0"),
        ("train { tracking_steps = -1 }", "train.tracking_steps", ">= 0", "found -1"),
        ("train { input_optimization_start = -2 }", "train.input_optimization_start", ">= 0", "found -2"),
        ("train { sched_factor = 0 }", "train.sched_factor", "> 0", "found 0.0"),
        ("train { GT_lbs_factor = -0.5 }", "train.GT_lbs_factor", "> 0", "found -0.5"),
        (
            "train { sched_milestones = [40, -60] }",
            "train.sched_milestones",
            "entries must be >= 0",
            "entry 1",
        ),
        ("train { GT_lbs_milestones = [-1] }", "train.GT_lbs_milestones", "entries must be >= 0", "entry 0"),
        ("loss { mask_weight = -1 }", "loss.mask_weight", ">= 0", "found -1.0"),
        ("loss { vgg_feature_weight = -0.1 }", "loss.vgg_feature_weight", ">= 0", "found -0.1"),
        ("model { prune_thresh = 1.5 }", "model.prune_thresh", "in [0, 1]", "found 1.5"),
        ("model { prune_thresh = -0.1 }", "model.prune_thresh", "in [0, 1]", "found -0.1"),
        ("model { point_cloud { n_init_points = 0 } }", "model.point_cloud.n_init_points", ">= 1", "found 0"),
        ("model { point_cloud { max_points = 0 } }", "model.point_cloud.max_points", ">= 1", "found 0"),
        ("model { point_cloud { init_radius = 0 } }", "model.point_cloud.init_radius", "> 0", "found 0.0"),
        (
            "model { point_cloud { radius_factor = -1 } }",
            "model.point_cloud.radius_factor",
            "> 0",
            "found -1.0",
        ),
        ("model { geometry_network { dims = [256, 0] } }", "model.geometry_network.dims", ">= 1", "entry 1"),
        ("model { rendering_network { dims = [-64] } }", "model.rendering_network.dims", ">= 1", "entry 0"),
        ("model { deformer_network { dims = [128, 0] } }", "model.deformer_network.dims", ">= 1", "entry 1"),
        (
            "model { geometry_network { multires = -1 } }",
            "model.geometry_network.multires",
            ">= 0",
            "found -1",
        ),
        ("model { deformer_network { num_exp = 0 } }", "model.deformer_network.num_exp", ">= 1", "found 0"),
        ("dataset { synthetic { train_frames = 0 } }", "dataset.synthetic.train_frames", ">= 1", "found 0"),
        ("dataset { synthetic { test_frames = 0 } }", "dataset.synthetic.test_frames", ">= 1", "found 0"),
        (
            "dataset { train { img_res = [512] }, test { img_res = [512] } }",
            "dataset.train.img_res",
            "two equal integers [S, S] >= 1",
            "found [512]",
        ),
        (
            "dataset { train { img_res = [512, 256] }, test { img_res = [512, 256] } }",
            "dataset.train.img_res",
            "two equal integers [S, S] >= 1",
            "found [512, 256]",
        ),
        (
            "dataset { train { img_res = [0, 0] }, test { img_res = [0, 0] } }",
            "dataset.train.img_res",
            "two equal integers [S, S] >= 1",
            "found [0, 0]",
        ),
        ("dataset { test { subsample = 0 } }", "dataset.test.subsample", "an int >= 1", "found 0"),
        ("dataset { test { subsample = [] } }", "dataset.test.subsample", "non-empty list", "found []"),
        (
            "dataset { test { subsample = [3, -1, 7] } }",
            "dataset.test.subsample",
            "indices >= 0",
            "[3, -1, 7]",
        ),
        ("dataset { train { subsample = [50, 10] } }", "dataset.train.subsample", "first < end", "[50, 10]"),
        ("model { prior_query_chunk = -1 }", "model.prior_query_chunk", '"auto" or an int >= 0', "found -1"),
        ("model { prior_query_chunk = half }", "model.prior_query_chunk", '"auto" or an int >= 0', "'half'"),
        (
            "model { activation_memory_budget = 0 }",
            "model.activation_memory_budget",
            '"auto" or a number in (0, 1]',
            "found 0",
        ),
        (
            "model { activation_memory_budget = 1.5 }",
            "model.activation_memory_budget",
            '"auto" or a number in (0, 1]',
            "found 1.5",
        ),
        (
            "model { activation_memory_budget = half }",
            "model.activation_memory_budget",
            '"auto" or a number in (0, 1]',
            "'half'",
        ),
        (
            "model { compile_size_hint = -1 }",
            "model.compile_size_hint",
            '"auto" or a point count >= 0',
            "found -1",
        ),
        (
            "model { compile_size_hint = 1.5 }",
            "model.compile_size_hint",
            "expects int or str",
            "found 1.5 (float)",
        ),
        (
            "model { compile_size_hint = big }",
            "model.compile_size_hint",
            '"auto" or a point count >= 0',
            "'big'",
        ),
    ],
)
def test_value_out_of_range(tmp_path: Path, text: str, key: str, allowed: str, found: str) -> None:
    path = _write(tmp_path, text + "\n")
    with pytest.raises(ConfError) as exc:
        load_conf(path)
    msg = str(exc.value)
    assert msg.startswith(f"{path}: conf key '{key}' ") and allowed in msg and found in msg, msg


def test_range_message_format(tmp_path: Path) -> None:
    path = _write(tmp_path, "train { checkpoint_freq = 0 }\n")
    with pytest.raises(ConfError) as exc:
        load_conf(path)
    assert str(exc.value) == f"{path}: conf key 'train.checkpoint_freq' must be >= 1, found 0"


def test_range_bounds_are_inclusive_where_stated() -> None:
    c = parse_conf(
        "train { nepoch = 0, num_workers = 0, tracking_steps = 0, input_optimization_start = 0 }\n"
        "loss { mask_weight = 0, lbs_weight = 0 }\n"
        "model { prune_thresh = 1.0, point_cloud { n_init_points = 1, max_points = 1 } }\n"
        "dataset { train { subsample = [0, 1], img_res = [1, 1] }, test { subsample = [0], img_res = [1, 1] } }\n"
    )
    assert c.train.nepoch == 0 and c.model.prune_thresh == 1.0 and c.model.point_cloud.max_points == 1
    assert c.dataset.test.subsample == [0] and c.dataset.train.img_res == [1, 1]
    # model.prior_query_chunk: "auto" (the default) or any int >= 0, 0 included.
    assert parse_conf("").model.prior_query_chunk == "auto"
    assert parse_conf("model { prior_query_chunk = 0 }").model.prior_query_chunk == 0
    assert parse_conf("model { prior_query_chunk = 4096 }").model.prior_query_chunk == 4096
    # model.activation_memory_budget: "auto" (the default) or a number in (0, 1], 1 included.
    assert parse_conf("").model.activation_memory_budget == "auto"
    assert parse_conf("model { activation_memory_budget = 1 }").model.activation_memory_budget == 1.0
    assert parse_conf("model { activation_memory_budget = 0.3 }").model.activation_memory_budget == 0.3
    # model.compile_size_hint: "auto" (the default) or a point count, 0 included (the first step's sizes).
    assert parse_conf("").model.compile_size_hint == "auto"
    assert parse_conf("model { compile_size_hint = 0 }").model.compile_size_hint == 0
    assert parse_conf("model { compile_size_hint = 204800 }").model.compile_size_hint == 204800
    assert parse_conf("").model.inverse_skinning == "closed_form"
    assert parse_conf('model { inverse_skinning = "lu" }').model.inverse_skinning == "lu"
    assert parse_conf("").model.deformer_bf16 is True
    assert parse_conf("model { deformer_bf16 = false }").model.deformer_bf16 is False


def test_max_points_below_n_init_points(tmp_path: Path) -> None:
    path = _write(tmp_path, "model { point_cloud { n_init_points = 400, max_points = 100 } }\n")
    with pytest.raises(ConfError) as exc:
        load_conf(path)
    msg = str(exc.value)
    assert str(path) in msg
    assert "'model.point_cloud.max_points' must be >= 'model.point_cloud.n_init_points' (400)" in msg
    assert "found 100" in msg


def test_test_img_res_must_equal_train_img_res(tmp_path: Path) -> None:
    # The test block is absent: its default [512, 512] differs from the train split's.
    path = _write(tmp_path, "dataset { train { img_res = [128, 128] } }\n")
    with pytest.raises(ConfError) as exc:
        load_conf(path)
    msg = str(exc.value)
    assert str(path) in msg
    assert "'dataset.test.img_res' must equal 'dataset.train.img_res' [128, 128]" in msg
    assert "found [512, 512]" in msg and "set dataset.test.img_res = [128, 128]" in msg


def test_override_checks_ranges_and_cross_fields() -> None:
    c = load_conf(CONFS / "subject1.conf")
    with pytest.raises(ConfError, match=r"^override: conf key 'train.max_batch' must be >= 1, found 0$"):
        override(c, {"train.max_batch": 0})
    with pytest.raises(ConfError, match=r"^override: conf key 'model.point_cloud.max_points' must be >= "):
        override(c, {"model.point_cloud.max_points": 399})  # n_init_points is 400
    with pytest.raises(
        ConfError, match=r"'dataset.test.img_res' must equal 'dataset.train.img_res' \[64, 64\]"
    ):
        override(c, {"dataset.train.img_res": [64, 64]})
    # Both changed together: the cross-field checks see the whole updated tree.
    c2 = override(c, {"dataset.train.img_res": [64, 64], "dataset.test.img_res": [64, 64]})
    assert c2.dataset.test.img_res == [64, 64]
    c3 = override(c, {"model.point_cloud.n_init_points": 100, "model.point_cloud.max_points": 100})
    assert c3.model.point_cloud.max_points == 100


@pytest.mark.parametrize(
    "path", [*(CONFS / f"{n}.conf" for n in ALL_CONFS), CONFS.parent / "benchmarks" / "synthetic512.conf"]
)
def test_every_shipped_conf_passes_the_checks(path: Path) -> None:
    c = load_conf(path)
    assert parse_conf(dump_conf(c)) == c


# ---------------------------------------------------------------------------------------------------
# include
# ---------------------------------------------------------------------------------------------------


def test_include_resolves_against_the_conf_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "confs"
    folder.mkdir()
    _write(folder, "train { max_batch = 3, nepoch = 7 }\n", "base.conf")
    (folder / "parts").mkdir()
    _write(folder / "parts", "loss { lbs_weight = 2 }\n", "loss.conf")
    main = _write(
        folder,
        'include "base.conf"\ninclude required("parts/loss.conf")\ntrain { nepoch = 9 }\n',
        "main.conf",
    )
    monkeypatch.chdir(tmp_path)  # the includes must not resolve against the working directory
    c = load_conf(main)
    assert c.train.max_batch == 3 and c.train.nepoch == 9 and c.loss.lbs_weight == 2.0


@pytest.mark.parametrize(
    "statement",
    ['include "missing.conf"', 'include required("missing.conf")', 'include file("missing.conf")'],
)
def test_include_of_missing_file(tmp_path: Path, statement: str) -> None:
    path = _write(tmp_path, f"{statement}\ntrain {{ max_batch = 3 }}\n")
    with pytest.raises(ConfError) as exc:
        load_conf(path)
    msg = str(exc.value)
    assert msg.startswith(f'{path}: included conf file not found: "missing.conf"')
    assert str(tmp_path / "missing.conf") in msg


def test_nested_include_of_missing_file(tmp_path: Path) -> None:
    inner = _write(tmp_path, 'include "gone.conf"\n', "inner.conf")
    outer = _write(tmp_path, 'include "inner.conf"\n', "outer.conf")
    with pytest.raises(ConfError) as exc:
        load_conf(outer)
    msg = str(exc.value)
    assert f'{inner} (included from {outer}): included conf file not found: "gone.conf"' in msg


def test_include_words_in_comments_and_strings_are_not_includes(tmp_path: Path) -> None:
    text = (
        '# include "nothing.conf"\n// include "nothing.conf"\ntrain { methodname = "include \\"x.conf\\"" }\n'
    )
    assert load_conf(_write(tmp_path, text)).train.methodname == 'include "x.conf"'


def test_include_cycle(tmp_path: Path) -> None:
    a = _write(tmp_path, 'include "b.conf"\n', "a.conf")
    _write(tmp_path, 'include "a.conf"\n', "b.conf")
    with pytest.raises(ConfError, match="cycle") as exc:
        load_conf(a)
    assert str(a) in str(exc.value)
