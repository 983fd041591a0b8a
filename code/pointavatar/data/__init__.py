"""IMavatar-format dataset (spec §3)."""

from .face_dataset import FaceDataset, FlameParams, collate_fn, read_flame_params  # noqa: F401
