"""FLAME-format fixtures shared by the tests: spec Appendix A shapes and a random landmark embedding."""

import numpy as np


def flame_state_shapes(v: int, n_faces: int) -> dict[str, tuple[int, ...]]:
    """Keys in registration order -> shapes, for a FLAME-format model with v vertices and n_faces faces."""
    return {
        "eye_pose": (1, 6),
        "neck_pose": (1, 3),
        "parents": (5,),
        "lmk_faces_idx": (51,),
        "lmk_bary_coords": (51, 3),
        "dynamic_lmk_faces_idx": (79, 17),
        "dynamic_lmk_bary_coords": (79, 17, 3),
        "full_lmk_faces_idx": (1, 68),
        "full_lmk_bary_coords": (1, 68, 3),
        "neck_kin_chain": (2,),
        "faces_tensor": (n_faces, 3),
        "v_template": (v, 3),
        "shapedirs": (v, 3, 150),
        "posedirs": (36, 3 * v),
        "J_regressor": (5, v),
        "lbs_weights": (v, 5),
    }


def make_landmarks(n_faces: int, seed: int = 1) -> dict[str, np.ndarray]:
    """A random landmark embedding with the real file's keys, shapes and dtypes (spec §4.1)."""
    rng = np.random.default_rng(seed)

    def bary(*shape: int) -> np.ndarray:
        b = rng.uniform(0.1, 1.0, size=(*shape, 3))
        return b / b.sum(-1, keepdims=True)

    return {
        "static_lmk_faces_idx": rng.integers(0, n_faces, size=51),
        "static_lmk_bary_coords": bary(51),
        "dynamic_lmk_faces_idx": rng.integers(0, n_faces, size=(79, 17)),
        "dynamic_lmk_bary_coords": bary(79, 17).astype(np.float32),
        "full_lmk_faces_idx": rng.integers(0, n_faces, size=(1, 68)),
        "full_lmk_bary_coords": bary(1, 68).astype(np.float32),
    }
