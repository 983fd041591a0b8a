"""FLAME layer: model file I/O without chumpy, linear blend skinning, the FLAME module (spec §4)."""

from pointavatar.flame.io import (
    KINTREE_ROOT_PARENT,
    read_flame_file,
    read_landmark_embedding,
    write_flame_pickle,
    write_landmark_embedding,
)

__all__ = [
    "KINTREE_ROOT_PARENT",
    "read_flame_file",
    "read_landmark_embedding",
    "write_flame_pickle",
    "write_landmark_embedding",
]
