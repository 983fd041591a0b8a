"""FLAME layer: model file I/O without chumpy, linear blend skinning, the FLAME module (spec §4)."""

from pointavatar.flame.flame import FLAME, FLAME_SCALE
from pointavatar.flame.io import (
    KINTREE_ROOT_PARENT,
    read_flame_file,
    read_landmark_embedding,
    write_flame_pickle,
    write_landmark_embedding,
)
from pointavatar.flame.lbs import (
    batch_rigid_transform,
    batch_rodrigues,
    blend_shapes,
    blend_transforms,
    inverse_skin_points,
    lbs,
    pose_correctives,
    skin_points,
)

__all__ = [
    "FLAME",
    "FLAME_SCALE",
    "KINTREE_ROOT_PARENT",
    "batch_rigid_transform",
    "batch_rodrigues",
    "blend_shapes",
    "blend_transforms",
    "inverse_skin_points",
    "lbs",
    "pose_correctives",
    "read_flame_file",
    "read_landmark_embedding",
    "skin_points",
    "write_flame_pickle",
    "write_landmark_embedding",
]
