"""Spec Appendix A: the FLAME layer's state-dict entries and their shapes, shared by the tests."""


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
