"""Reading and writing FLAME model files without chumpy (spec §4.1, §4.2, §10.15).

The licensed FLAME 2020 `generic_model.pkl` is a Python-2 pickle holding numpy arrays, a
`scipy.sparse.csc_matrix` (`J_regressor`) and chumpy `Ch` objects (`shapedirs`). Unpickling it the
usual way needs chumpy, which no longer imports on current NumPy/Python, and a pickle may name any
callable, so loading an untrusted one runs code. We load it with a restricted unpickler instead:
numpy arrays are rebuilt by numpy, chumpy and scipy.sparse objects become inert stubs that only keep
their pickled state, and any other global is refused before anything is called.

`landmark_embedding.npy` is an `np.save`d object array holding a dict whose `dynamic_*` entries are
pickled torch tensors; it is read with the same kind of restricted unpickler (numpy + torch tensor
rebuild functions only).

The writers produce the real formats, so the synthetic subject exercises the same loaders as the real
files (and the real chumpy/torch could read what we write).

After reading, the arrays' shapes, joint and face indices are checked, so a damaged or foreign file
stops with one message naming the file, the array, the shape found and the one expected, instead of an
indexing error deep inside the FLAME layer.
"""

from __future__ import annotations

import copyreg
import importlib
import io
import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from pointavatar.errors import PointAvatarError

__all__ = [
    "read_flame_file",
    "write_flame_pickle",
    "read_landmark_embedding",
    "write_landmark_embedding",
    "KINTREE_ROOT_PARENT",
]

# The root's parent in the real kintree_table: max uint32 (the layer maps it to -1, spec §4.2).
KINTREE_ROOT_PARENT = 4294967295

_MISSING_MODEL_HELP = (
    "The FLAME 2020 model is licensed and cannot ship with this code: register at "
    "https://flame.is.tue.mpg.de, download FLAME 2020 and put generic_model.pkl (and "
    "landmark_embedding.npy) in code/flame/FLAME2020/ (the README and download_data.bash explain the "
    "steps). To try the code without it, use confs/demo.conf, which generates a synthetic FLAME-format "
    "model."
)

# Python 2 names that pickle's fix_imports would map; our find_class sees the raw names.
_PY2_MODULES = {"__builtin__": "builtins", "copy_reg": "copyreg"}


def _numpy_global(module: str, name: str) -> Any:
    """numpy's array-rebuild helpers, from numpy._core on NumPy 2 and numpy.core on NumPy 1."""
    if name in ("ndarray", "dtype") and module == "numpy":
        return getattr(np, name)
    for candidate in ("numpy._core.multiarray", "numpy.core.multiarray"):
        try:
            return getattr(importlib.import_module(candidate), name)
        except (ImportError, AttributeError):
            continue
    raise pickle.UnpicklingError(f"numpy has no {module}.{name}")


_NUMPY_NAMES = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
}

# Harmless builtins that appear in chumpy's pickled state (`_dirty_vars` is a set) or in
# protocol-2 pickles written by Python 3 (bytes are stored as _codecs.encode(str, "latin1")).
_SAFE_BUILTINS = {
    ("builtins", "object"): object,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("copyreg", "_reconstructor"): copyreg._reconstructor,
    ("_codecs", "encode"): __import__("codecs").encode,
}

_SPARSE_NAMES = {"csc_matrix", "csr_matrix", "coo_matrix", "csc_array", "csr_array", "coo_array"}


class _PickledState:
    """An inert stand-in for a pickled object: keeps its constructor arguments and state only."""

    _module = ""
    _name = ""
    # Defaults for objects made by copyreg._reconstructor (protocol 0/1), which skips __new__.
    args: tuple = ()
    state: Any = None

    def __new__(cls, *args: Any, **kwargs: Any) -> _PickledState:
        obj = object.__new__(cls)
        obj.args = args
        obj.state = None
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # copyreg._reconstructor may call base.__init__; nothing to do.
        pass

    def __setstate__(self, state: Any) -> None:
        self.state = state

    @classmethod
    def named(cls, module: str, name: str) -> type:
        return type(name, (cls,), {"_module": module, "_name": name})


class _ChumpyStub(_PickledState):
    """A chumpy object: chumpy's Ch.__getstate__ is a copy of __dict__, the value lives in 'x'."""


class _SparseStub(_PickledState):
    """A scipy.sparse matrix: its pickled state is its __dict__ (data, indices, indptr, _shape)."""


def _refuse(path: Path, module: str, name: str, what: str) -> PointAvatarError:
    return PointAvatarError(
        f"refusing to load {path}: it references {module}.{name}, which {what} never contains "
        "(a pickle can run arbitrary code when loaded, so only numpy arrays, scipy.sparse matrices "
        "and chumpy arrays are allowed). Use an unmodified file from the official source."
    )


class _FlameUnpickler(pickle.Unpickler):
    """Unpickler that allows numpy, scipy.sparse and chumpy globals only (see module docstring)."""

    def __init__(self, file: Any, path: Path) -> None:
        super().__init__(file, encoding="latin1")
        self._path = path

    @staticmethod
    def _common_global(module: str, name: str) -> Any:
        """numpy array rebuilding and the harmless builtins both file kinds may use, else None."""
        if (module, name) in _NUMPY_NAMES:
            return _numpy_global(module, name)
        return _SAFE_BUILTINS.get((module, name))

    def find_class(self, module: str, name: str) -> Any:
        module = _PY2_MODULES.get(module, module)
        found = self._common_global(module, name)
        if found is not None:
            return found
        if (module == "scipy.sparse" or module.startswith("scipy.sparse.")) and name in _SPARSE_NAMES:
            return _SparseStub.named(module, name)
        if module == "chumpy" or module.startswith("chumpy."):
            return _ChumpyStub.named(module, name)
        raise _refuse(self._path, module, name, "a FLAME model file")

    def persistent_load(self, pid: Any) -> Any:
        raise PointAvatarError(
            f"refusing to load {self._path}: it uses pickle persistent ids, which a FLAME model file "
            "never contains. Use an unmodified generic_model.pkl from flame.is.tue.mpg.de."
        )


def _sparse_to_dense(stub: _SparseStub, path: Path, key: str) -> np.ndarray:
    import scipy.sparse as sp

    state = stub.state if isinstance(stub.state, dict) else {}
    shape = state.get("_shape", state.get("shape"))
    fmt = stub._name[:3]
    try:
        shape = tuple(int(s) for s in shape)
        if fmt in ("csc", "csr"):
            cls = sp.csc_matrix if fmt == "csc" else sp.csr_matrix
            mat = cls((state["data"], state["indices"], state["indptr"]), shape=shape)
        else:
            if "coords" in state:
                row, col = state["coords"]
            else:
                row, col = state["row"], state["col"]
            mat = sp.coo_matrix((state["data"], (row, col)), shape=shape)
    except (KeyError, TypeError, ValueError) as exc:
        raise PointAvatarError(
            f"{path}: key '{key}' is a scipy.sparse {stub._name} whose pickled state cannot be read "
            f"({exc!r}); the file may be damaged, download it again."
        ) from exc
    return np.asarray(mat.toarray())


def _chumpy_to_array(stub: _ChumpyStub, path: Path, key: str) -> np.ndarray:
    state = stub.state
    if not isinstance(state, dict) or "x" not in state:
        raise PointAvatarError(
            f"{path}: key '{key}' is a chumpy {stub._module}.{stub._name} object without a stored "
            "value 'x' (only plain chumpy arrays are supported); convert the file to .npz with the "
            "real chumpy (np.savez(out, **{k: np.array(v) for k, v in model.items()}))."
        )
    return np.array(_to_plain(state["x"], path, key), dtype=np.float64)


def _to_plain(value: Any, path: Path, key: str) -> Any:
    if isinstance(value, _ChumpyStub):
        return _chumpy_to_array(value, path, key)
    if isinstance(value, _SparseStub):
        return _sparse_to_dense(value, path, key)
    if isinstance(value, _PickledState):
        raise PointAvatarError(f"{path}: key '{key}' holds an unsupported object {value._name}.")
    return value


def _missing(path: Path, what: str) -> PointAvatarError:
    return PointAvatarError(f"{what} not found: looked for {path.resolve()}. {_MISSING_MODEL_HELP}")


def _shape(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(str(n) for n in shape) + ")"


def _bad_array(path: Path, key: str, array: np.ndarray, expected: str, meaning: str = "") -> PointAvatarError:
    """The error for a FLAME array of the wrong shape: file, key, found and expected shapes."""
    meaning = f" ({meaning})" if meaning else ""
    return PointAvatarError(
        f"{path}: FLAME model array '{key}' has shape {_shape(array.shape)}, expected {expected}{meaning}. "
        "The file is damaged or not a FLAME 2020 model; download it again."
    )


def _validate_model(model: dict[str, np.ndarray], path: Path) -> None:
    """Check the shapes and indices of the FLAME arrays present in `model` (spec §4.2).

    V (vertices) comes from v_template and J (joints) from kintree_table; the FLAME layer reports
    missing keys itself, so an absent array is skipped here (and so are the checks that need it).
    """
    v_template, kintree = model.get("v_template"), model.get("kintree_table")
    n_verts = n_joints = None
    if v_template is not None:
        if v_template.ndim != 2 or v_template.shape[1] != 3 or v_template.shape[0] < 1:
            raise _bad_array(path, "v_template", v_template, "(V, 3)", "one xyz row per vertex")
        n_verts = v_template.shape[0]
    if kintree is not None:
        if kintree.ndim != 2 or kintree.shape[0] != 2 or kintree.shape[1] < 1:
            raise _bad_array(path, "kintree_table", kintree, "(2, J)", "parent and joint ids of J joints")
        n_joints = kintree.shape[1]
        if kintree.dtype.kind not in "iu":
            raise PointAvatarError(
                f"{path}: FLAME model array 'kintree_table' holds {kintree.dtype} values, expected "
                "integer joint ids. The file is damaged or not a FLAME 2020 model; download it again."
            )
        # The kinematic chain is built in joint order, so each joint's parent must come before it.
        parents = kintree[0, 1:].astype(np.int64)
        bad = np.nonzero((parents < 0) | (parents >= np.arange(1, n_joints)))[0]
        if bad.size:
            j = int(bad[0]) + 1
            raise PointAvatarError(
                f"{path}: FLAME model array 'kintree_table' gives joint {j} the parent {int(parents[j - 1])}; "
                f"a parent must be a joint before it, in [0, {j - 1}]. The file is damaged; download it again."
            )
    V = "V" if n_verts is None else f"V = {n_verts}"
    J = "J" if n_joints is None else f"J = {n_joints}"

    def need(key: str, rank: int, fixed: dict[int, int | None], expected: str, meaning: str) -> None:
        """Array `key` (if present) has `rank` dims, dims in `fixed` equal their value (None: any)."""
        array = model.get(key)
        if array is None:
            return
        ok = array.ndim == rank and all(n is None or array.shape[d] == n for d, n in fixed.items())
        if not ok or 0 in array.shape:
            raise _bad_array(path, key, array, expected, meaning)

    need("shapedirs", 3, {0: n_verts, 1: 3}, f"(V, 3, S) with {V}, S >= 1", "shape/expression bases")
    n_pose = None if n_joints is None else 9 * (n_joints - 1)
    need(
        "posedirs",
        3,
        {0: n_verts, 1: 3, 2: n_pose},
        f"(V, 3, P) with {V}, P = 9 * (J - 1)" + ("" if n_pose is None else f" = {n_pose}"),
        "pose correctives: one 3x3 rotation feature per non-root joint",
    )
    need("J_regressor", 2, {0: n_joints, 1: n_verts}, f"(J, V) with {J}, {V}", "joints from vertices")
    need("weights", 2, {0: n_verts, 1: n_joints}, f"(V, J) with {V}, {J}", "skinning weight per joint")
    need("f", 2, {1: 3}, "(F, 3)", "three vertex ids per triangle")
    faces = model.get("f")
    if faces is not None:
        if faces.dtype.kind not in "iu":
            raise PointAvatarError(
                f"{path}: FLAME model array 'f' holds {faces.dtype} values, expected integer vertex ids. "
                "The file is damaged or not a FLAME 2020 model; download it again."
            )
        if n_verts is not None and (faces.min() < 0 or faces.max() >= n_verts):
            bad = int(faces.max()) if faces.max() >= n_verts else int(faces.min())
            raise PointAvatarError(
                f"{path}: FLAME model array 'f' has vertex index {bad}, expected indices in [0, {n_verts}) "
                f"(V = {n_verts} vertices in v_template). The file is damaged; download it again."
            )
    for key in ("v_template", "shapedirs", "posedirs", "J_regressor", "weights"):
        array = model.get(key)
        if array is not None and array.dtype.kind == "f" and not np.isfinite(array).all():
            raise PointAvatarError(
                f"{path}: FLAME model array '{key}' contains NaN or infinite values. The file is damaged; "
                "download it again."
            )


def read_flame_file(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a FLAME model (`generic_model.pkl` or a `.npz` with the same keys) without chumpy.

    Returns every key as a numpy array, unconverted: v_template (V, 3), f (F, 3), shapedirs
    (V, 3, 400) float64 (from the chumpy object), posedirs (V, 3, 36), J_regressor (5, V) dense
    (from scipy.sparse), weights (V, 5), kintree_table (2, 5) whose root parent stays the raw
    4294967295 (the layer maps it to -1), plus any other keys (strings become 0-d str arrays).
    Raises PointAvatarError naming the array when a shape or an index does not fit (`_validate_model`).
    """
    path = Path(path)
    if not path.is_file():
        raise _missing(path, "FLAME model file")
    if path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as data:
                model = {k: np.asarray(data[k]) for k in data.files}
        except (OSError, ValueError) as exc:
            raise PointAvatarError(f"cannot read FLAME model {path}: {exc}") from exc
        _validate_model(model, path)
        return model
    try:
        with open(path, "rb") as f:
            raw = _FlameUnpickler(f, path).load()
    except PointAvatarError:
        raise
    except Exception as exc:  # any unpickling failure is a damaged or foreign file
        raise PointAvatarError(
            f"cannot read FLAME model {path}: {type(exc).__name__}: {exc}. Expected the FLAME 2020 "
            "generic_model.pkl (a pickle) or a .npz with the same keys."
        ) from exc
    if not isinstance(raw, dict):
        raise PointAvatarError(f"{path} is not a FLAME model: it holds a {type(raw).__name__}, not a dict.")
    model = {str(k): np.asarray(_to_plain(v, path, str(k))) for k, v in raw.items()}
    _validate_model(model, path)
    return model


# ----------------------------------------------------------------------------------------- writing


class _ChumpyCh:
    """What a chumpy `Ch` array pickles as: the global chumpy.ch.Ch, NEWOBJ, then its __dict__ state.

    The state mirrors chumpy's Ch.__getstate__ (its __dict__ without _parents and _cache), so the
    real chumpy's __setstate__ can restore it.
    """

    def __init__(self, x: np.ndarray) -> None:
        self.x = np.asarray(x, dtype=np.float64)

    def __reduce__(self) -> tuple:
        state = {
            "_dirty_vars": {"x"},
            "_itr": None,
            "_depends_on_deps": {},
            "_make_dense": False,
            "_make_sparse": False,
            "x": self.x,
        }
        return (copyreg.__newobj__, (_ChumpyCh,), state)


class _FlamePickler(pickle._Pickler):
    """Pure-Python pickler that writes _ChumpyCh's class as the global `chumpy.ch.Ch`.

    The C pickler would import chumpy to check the global; the Python one lets us emit the opcode
    ourselves, so chumpy need not be installed to write the real format.
    """

    def save_global(self, obj: Any, name: str | None = None) -> None:
        if obj is _ChumpyCh:
            self.write(pickle.GLOBAL + b"chumpy.ch\nCh\n")
            self.memoize(obj)
            return
        module = getattr(obj, "__module__", None)
        if module == "numpy._core.multiarray" and obj.__name__ in ("_reconstruct", "scalar"):
            # NumPy 2 names its private module numpy._core; NumPy 1 (the real chumpy's world) only
            # knows numpy.core, which NumPy 2 still resolves when unpickling.
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\n" + obj.__name__.encode() + b"\n")
            self.memoize(obj)
            return
        if module is not None and module.startswith("scipy.sparse._") and obj.__name__ == "csc_matrix":
            # The real file names scipy.sparse.csc.csc_matrix (the module path of SciPy < 1.8);
            # every SciPy before 2.0 still resolves it.
            self.write(pickle.GLOBAL + b"scipy.sparse.csc\ncsc_matrix\n")
            self.memoize(obj)
            return
        super().save_global(obj, name)


def write_flame_pickle(path: str | os.PathLike, arrays: dict[str, Any]) -> None:
    """Write a FLAME model in the real generic_model.pkl format (pickle protocol 2).

    `shapedirs` is stored as a chumpy Ch object (float64), `J_regressor` as a scipy.sparse
    csc_matrix, `kintree_table` as int64 with the root parent 4294967295 (pass it that way, or with
    -1, which is written as 4294967295); every other value is stored as a plain numpy array (strings
    stay strings, as `bs_style`/`bs_type` in the real file).
    """
    import scipy.sparse as sp

    out: dict[str, Any] = {}
    for key, value in arrays.items():
        if isinstance(value, str):
            out[key] = value
        elif key == "shapedirs":
            out[key] = _ChumpyCh(np.asarray(value))
        elif key == "J_regressor":
            out[key] = sp.csc_matrix(np.asarray(value, dtype=np.float64))
        elif key == "kintree_table":
            table = np.asarray(value).astype(np.int64)
            table[table < 0] = KINTREE_ROOT_PARENT
            out[key] = table
        else:
            out[key] = np.asarray(value)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    _FlamePickler(buf, protocol=2).dump(out)
    path.write_bytes(buf.getvalue())


# ------------------------------------------------------------------------------ landmark embedding


def _load_storage_from_bytes(data: bytes) -> Any:
    """Replacement for torch.storage._load_from_bytes, which calls torch.load without restriction."""
    import torch

    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


class _LandmarkUnpickler(_FlameUnpickler):
    """numpy + torch tensor rebuild functions only (the dynamic_* entries are torch tensors)."""

    def find_class(self, module: str, name: str) -> Any:
        module = _PY2_MODULES.get(module, module)
        found = self._common_global(module, name)
        if found is not None:
            return found
        if (module, name) == ("collections", "OrderedDict"):
            import collections

            return collections.OrderedDict
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            import torch._utils

            return getattr(torch._utils, name)
        if (module, name) == ("torch.storage", "_load_from_bytes"):
            return _load_storage_from_bytes
        raise _refuse(self._path, module, name, "a FLAME landmark embedding")


_LANDMARK_DTYPES = {
    "static_lmk_faces_idx": np.int64,
    "static_lmk_bary_coords": np.float64,
    "dynamic_lmk_faces_idx": np.int64,
    "dynamic_lmk_bary_coords": np.float32,
    "full_lmk_faces_idx": np.int64,
    "full_lmk_bary_coords": np.float32,
}


# Rows of the dynamic contour table: one per integer head yaw in [-39, 39] degrees (DECA's layout, read
# by FLAME._dynamic_contour_rows).
_CONTOUR_ROWS = 79


def _validate_landmarks(lmk: dict[str, np.ndarray], path: Path, n_faces: int | None) -> None:
    """Shapes of the landmark arrays (spec §4.1) and face indices in [0, n_faces) when n_faces is known."""

    def last_dim(key: str) -> int | None:
        return lmk[key].shape[-1] if lmk[key].ndim else None

    idx_keys = ("static_lmk_faces_idx", "dynamic_lmk_faces_idx", "full_lmk_faces_idx")
    n_static, n_contour, n_full = (last_dim(k) for k in idx_keys)
    expected = {
        "static_lmk_faces_idx": ((n_static,), "(L,)"),
        "static_lmk_bary_coords": ((n_static, 3), f"(L, 3) with L = {n_static}"),
        "dynamic_lmk_faces_idx": ((_CONTOUR_ROWS, n_contour), f"({_CONTOUR_ROWS}, K)"),
        "dynamic_lmk_bary_coords": (
            (_CONTOUR_ROWS, n_contour, 3),
            f"({_CONTOUR_ROWS}, K, 3) with K = {n_contour}",
        ),
        "full_lmk_faces_idx": ((1, n_full), "(1, M)"),
        "full_lmk_bary_coords": ((1, n_full, 3), f"(1, M, 3) with M = {n_full}"),
    }
    for key, (shape, text) in expected.items():
        if lmk[key].shape != shape:
            raise PointAvatarError(
                f"{path}: landmark embedding array '{key}' has shape {_shape(lmk[key].shape)}, expected "
                f"{text}. The file is damaged or not the FLAME landmark_embedding.npy; download it again."
            )
    allowed = ">= 0" if n_faces is None else f"in [0, {n_faces}) (F = {n_faces} faces in the FLAME model)"
    for key in idx_keys:
        faces = lmk[key]
        if faces.dtype.kind not in "iu":
            raise PointAvatarError(
                f"{path}: landmark embedding array '{key}' holds {faces.dtype} values, expected integer "
                "face ids. The file is damaged; download it again."
            )
        too_low = faces.size > 0 and faces.min() < 0
        too_high = faces.size > 0 and n_faces is not None and faces.max() >= n_faces
        if too_low or too_high:
            bad = int(faces.min()) if too_low else int(faces.max())
            raise PointAvatarError(
                f"{path}: landmark embedding array '{key}' has face index {bad}, expected indices {allowed}. "
                "The file is damaged or belongs to another FLAME model; use the landmark_embedding.npy "
                "that comes with the model."
            )


def read_landmark_embedding(path: str | os.PathLike, n_faces: int | None = None) -> dict[str, np.ndarray]:
    """Read landmark_embedding.npy (spec §4.1) with a restricted unpickler; returns numpy arrays.

    Keys: static_lmk_faces_idx (51,) int64, static_lmk_bary_coords (51, 3), dynamic_lmk_faces_idx
    (79, 17) int64, dynamic_lmk_bary_coords (79, 17, 3), full_lmk_faces_idx (1, 68) int64,
    full_lmk_bary_coords (1, 68, 3). Torch tensors in the file are rebuilt through
    `torch.load(weights_only=True)` instead of the unrestricted loader pickle would call. The shapes
    are checked, and the face indices against `n_faces` (the FLAME model's F) when it is given.
    """
    path = Path(path)
    if not path.is_file():
        raise _missing(path, "FLAME landmark embedding")
    from numpy.lib import format as npy_format

    try:
        with open(path, "rb") as f:
            version = npy_format.read_magic(f)
            if version == (1, 0):
                _, _, dtype = npy_format.read_array_header_1_0(f)
            else:
                _, _, dtype = npy_format.read_array_header_2_0(f)
            if dtype != np.dtype(object):
                raise PointAvatarError(
                    f"{path} is not a FLAME landmark embedding: it holds a {dtype} array, not a dict."
                )
            arr = _LandmarkUnpickler(f, path).load()
    except PointAvatarError:
        raise
    except Exception as exc:
        raise PointAvatarError(
            f"cannot read FLAME landmark embedding {path}: {type(exc).__name__}: {exc}."
        ) from exc
    obj = arr.item() if isinstance(arr, np.ndarray) and arr.size == 1 else arr
    if not isinstance(obj, dict):
        raise PointAvatarError(f"{path} is not a FLAME landmark embedding: it does not hold a dict.")
    result: dict[str, np.ndarray] = {}
    for key, value in obj.items():
        if hasattr(value, "detach"):  # torch tensor
            value = value.detach().cpu().numpy()
        result[str(key)] = np.asarray(value)
    missing = [k for k in _LANDMARK_DTYPES if k not in result]
    if missing:
        raise PointAvatarError(f"{path}: landmark embedding lacks the keys {missing}.")
    _validate_landmarks(result, path, n_faces)
    return result


def write_landmark_embedding(path: str | os.PathLike, d: dict[str, Any]) -> None:
    """Write a landmark embedding in the real format: np.save of a 0-d object array holding a dict.

    dynamic_lmk_faces_idx / dynamic_lmk_bary_coords are stored as torch Long / Float tensors (as in
    the real file); the others as numpy arrays with the dtypes of `read_landmark_embedding`.
    """
    import torch

    out: dict[str, Any] = {}
    for key, dtype in _LANDMARK_DTYPES.items():
        if key not in d:
            raise PointAvatarError(f"write_landmark_embedding: missing key '{key}'.")
        value = np.asarray(d[key]).astype(dtype)
        out[key] = torch.from_numpy(value.copy()) if key.startswith("dynamic_") else value
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    holder = np.empty((), dtype=object)
    holder[()] = out
    np.save(path, holder, allow_pickle=True)
