"""IMavatar-format dataset (spec §3)."""

from .face_dataset import FaceDataset, collate_fn  # noqa: F401
