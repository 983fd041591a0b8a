"""Checkpoint families, names and contents of the original (spec §2.3), saved crash-safely.

Layout under ``<train_dir>/checkpoints/``::

    ModelParameters/      {"epoch", "radius", "model_state_dict"}        latest.pth, 5.pth, 10.pth, ...
    OptimizerParameters/  {"epoch", "optimizer_state_dict"}
    SchedulerParameters/  {"epoch", "scheduler_state_dict"}
    OptimizerInputs/      {"epoch", "optimizer_cam_state_dict"}          (input optimisation only)
    InputParameters/      {"epoch", "expression_state_dict", "flame_pose_state_dict",
                           "camera_pose_state_dict"}                    (input optimisation only)
    TestInputParameters/  same layout as InputParameters, written by the test runner
    .commit.json          present only while a save is being committed (see below)
    .lock                 serialises savers and repairers (``flock``; POSIX only)

Commit protocol of :meth:`Checkpoints.save_epoch` (all families of one epoch become current together):

1. Refuse, before touching the disk, a payload holding a NaN/inf tensor or an object that
   ``torch.load(weights_only=True)`` would refuse.
2. Write every file of the epoch to a staging name beside its final name (``<Family>/.latest.pth.staged``,
   ``<Family>/.<epoch>.pth.staged``), fsync each file and each folder.
3. Atomically write ``.commit.json`` = ``{"epoch": E, "files": [[staged, final], ...]}`` (paths relative
   to ``checkpoints/``). Its rename is the commit point.
4. ``os.replace`` each staged file onto its final name (ModelParameters last), fsync the folders, remove
   the marker.

:meth:`Checkpoints.recover` runs before the first read of a store (and before every save): with a marker
it rolls the save forward (step 4 again, skipping files already renamed); without one it deletes staged
and ``.tmp`` leftovers, which belong to a save that never committed. So after a kill at any point every
family's ``latest.pth`` is at the same epoch: the old one before the commit point, the new one after.
The marker is parsed with ``json`` only and each of its paths must be ``<Family>/<name>.pth`` (or its
staged twin) inside ``checkpoints/``.

Reading uses ``torch.load(weights_only=True)``: a file holding anything other than tensors and plain
containers is refused without running any of its code. A file that is truncated, unreadable or holds
NaN/inf is reported with the numbered checkpoints that are intact, to resume from with ``--checkpoint N``.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import pickle
import shutil
import tempfile
from pathlib import Path, PurePosixPath
from typing import Any

import torch

from ..errors import PointAvatarError

try:  # POSIX; without it (Windows) saves and repairs in one folder must not run concurrently
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None

MODEL = "ModelParameters"
OPTIMIZER = "OptimizerParameters"
SCHEDULER = "SchedulerParameters"
OPTIMIZER_INPUTS = "OptimizerInputs"
INPUTS = "InputParameters"
TEST_INPUTS = "TestInputParameters"
FAMILIES = (MODEL, OPTIMIZER, SCHEDULER, OPTIMIZER_INPUTS, INPUTS, TEST_INPUTS)

COMMIT_MARKER = ".commit.json"
LOCK_FILE = ".lock"
STAGED_SUFFIX = ".staged"
TMP_SUFFIX = ".tmp"

# Exactly the types that torch.load(weights_only=True) accepts on every torch >= 2.1 we support.
_SAFE_LEAVES = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device)
_SAFE_MAPPINGS = (dict, collections.OrderedDict)
_SAFE_SEQUENCES = (list, tuple, torch.Size)


class UnsafeCheckpointError(PointAvatarError):
    """``torch.load(weights_only=True)`` refused the file: it holds more than tensors and containers."""


class CorruptCheckpointError(PointAvatarError):
    """The file is truncated, not a PyTorch checkpoint, or holds NaN/inf."""


# ------------------------------------------------------------------------------------ file primitives
def fsync_dir(folder: str | os.PathLike) -> None:
    """Make the renames, creations and removals inside ``folder`` durable (no-op on Windows)."""
    if os.name == "nt":  # pragma: no cover - folders cannot be opened there
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durably(path: Path, write) -> None:
    """Create ``path``, fill it with ``write(file)``, flush and fsync it."""
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def _atomic_write(path: Path, write) -> None:
    """Write through a temporary file in the same folder, rename it over ``path``, fsync the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    fsync_dir(path.parent)


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to ``path`` through a temporary file, an atomic rename and a folder fsync."""
    _atomic_write(Path(path), lambda f: torch.save(obj, f))


def _refusal_reason(exc: BaseException) -> str:
    """The line of torch's weights-only message that names what was refused."""
    for line in str(exc).splitlines():
        line = line.strip()
        if "GLOBAL" in line or "Unsupported" in line or "Can only" in line:
            return f" (torch: {line})"
    return ""


def load_file(path: str | os.PathLike) -> dict:
    """Load a checkpoint dict on the CPU with ``weights_only=True``, with a readable error.

    Raises ``UnsafeCheckpointError`` when the file holds objects other than tensors and plain
    containers (nothing in it was run) and ``CorruptCheckpointError`` for a truncated or foreign file.
    A scheduler state saved in plain form gets its ``milestones`` Counter back.
    """
    path = Path(path)
    if not path.is_file():
        raise PointAvatarError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights only load failed" not in str(exc).lower():
            raise CorruptCheckpointError(f"cannot read checkpoint {path}: {exc}") from exc
        hint = ""
        if "Counter" in str(exc):
            hint = (
                " A MultiStepLR state of an older run needs torch >= 2.4, which accepts collections.Counter."
            )
        raise UnsafeCheckpointError(
            f"refused to load checkpoint {path}: it contains objects other than tensors and plain containers"
            f"{_refusal_reason(exc)}, so it was loaded with weights_only=True and refused; none of its code "
            f"ran.{hint} If the file is not yours, delete it. If you made it and trust it, convert it once in "
            "a separate Python session: torch.load(path, weights_only=False), keep only the tensors and "
            "state dicts, and torch.save them again."
        ) from None
    except Exception as exc:  # a truncated or foreign file: zip, EOF or key errors depending on the damage
        raise CorruptCheckpointError(
            f"cannot read checkpoint {path}: it is truncated or not a PyTorch checkpoint "
            f"({type(exc).__name__}: {exc})."
        ) from exc
    if not isinstance(payload, dict):
        raise CorruptCheckpointError(f"checkpoint {path} holds a {type(payload).__name__}, not a dict.")
    if isinstance(payload.get("scheduler_state_dict"), dict):
        payload["scheduler_state_dict"] = scheduler_state_from_payload(payload["scheduler_state_dict"])
    return payload


# ----------------------------------------------------------------------------------- payload checks
def scheduler_state_to_payload(state: dict) -> dict:
    """A scheduler ``state_dict`` with ``milestones`` (a Counter in MultiStepLR) as a plain dict.

    torch < 2.4 refuses ``collections.Counter`` under ``weights_only=True``; a plain dict loads
    everywhere, and the original's code still steps with it (``last_epoch in milestones``).
    """
    if isinstance(state.get("milestones"), collections.Counter):
        state = {**state, "milestones": dict(state["milestones"])}
    return state


def scheduler_state_from_payload(state: dict) -> dict:
    """Inverse of :func:`scheduler_state_to_payload`: MultiStepLR needs a Counter (``elements()``)."""
    milestones = state.get("milestones")
    if type(milestones) is dict:
        state = {**state, "milestones": collections.Counter(milestones)}
    return state


def _key_path(prefix: str, key: Any) -> str:
    if not prefix and isinstance(key, str):
        return key
    return f"{prefix}[{key!r}]"


def _children(obj: Any, prefix: str):
    if isinstance(obj, dict):
        for key, value in obj.items():
            yield _key_path(prefix, key), value
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            yield f"{prefix}[{i}]", value


# Elements tested at once: the test's boolean buffer stays at 4 MiB whatever the tensor's size, so that the
# check of a large CUDA tensor does not itself run the GPU out of memory.
_FINITE_CHUNK = 1 << 22


def _chunks(t: torch.Tensor):
    if t.dim() == 0 or t.numel() <= _FINITE_CHUNK:
        yield t
    elif t.is_contiguous():
        yield from t.view(-1).split(_FINITE_CHUNK)
    elif t[0].numel() > _FINITE_CHUNK:  # not contiguous, with rows larger than a chunk: row by row
        for row in t.unbind(0):
            yield from _chunks(row)
    else:  # not contiguous: views of whole rows
        yield from t.split(_FINITE_CHUNK // max(1, t[0].numel()))


def _all_finite(t: torch.Tensor) -> bool:
    if t.is_sparse:
        t = t.coalesce().values()
    elif t.layout in (torch.sparse_csr, torch.sparse_csc, torch.sparse_bsr, torch.sparse_bsc):
        t = t.values()
    if not (t.is_floating_point() or t.is_complex()):
        return True
    for part in _chunks(t):
        try:
            ok = bool(torch.isfinite(part).all())
        except torch.OutOfMemoryError:
            raise  # a RuntimeError too: not a dtype without a kernel
        except (RuntimeError, NotImplementedError):  # float8 and other dtypes without an isfinite kernel
            ok = bool(torch.isfinite(part.float()).all())
        if not ok:
            return False
    return True


def first_non_finite(obj: Any, _prefix: str = "") -> str | None:
    """Key path (``optimizer_state_dict['state'][0]['exp_avg']``) of the first floating tensor, dense
    or sparse, in nested dicts/lists/tuples that holds NaN or inf; None when all are finite."""
    if isinstance(obj, torch.Tensor):
        return None if _all_finite(obj) else (_prefix or "<top level>")
    for path, value in _children(obj, _prefix):
        found = first_non_finite(value, path)
        if found is not None:
            return found
    return None


def first_unsafe(obj: Any, _prefix: str = "") -> str | None:
    """Key path and type of the first object in ``obj`` that ``torch.load(weights_only=True)`` would
    refuse (numpy values, dataclasses, functions, ...), or None when it holds only tensors, numbers,
    strings and plain containers of them."""
    where = _prefix or "<top level>"
    kind = type(obj)
    if isinstance(obj, torch.Tensor):
        return None if kind in (torch.Tensor, torch.nn.Parameter) else f"{where} ({kind.__qualname__})"
    if kind in _SAFE_LEAVES:
        return None
    if kind in _SAFE_MAPPINGS:
        for key in obj:
            if type(key) not in _SAFE_LEAVES:
                return f"{where}, key {key!r} ({type(key).__module__}.{type(key).__qualname__})"
    elif kind is set:
        for value in obj:
            if type(value) not in _SAFE_LEAVES:
                return f"{where}, element {value!r} ({type(value).__module__}.{type(value).__qualname__})"
        return None
    elif kind not in _SAFE_SEQUENCES:
        return f"{where} ({kind.__module__}.{kind.__qualname__})"
    for path, value in _children(obj, _prefix):
        found = first_unsafe(value, path)
        if found is not None:
            return found
    return None


def inputs_state(expression, flame_pose, camera_pose) -> dict:
    """The state-dict layout of (Test)InputParameters for three embeddings (any may be None)."""

    def sd(emb):
        return None if emb is None else {"weight": emb.weight.detach().cpu().clone()}

    return {
        "expression_state_dict": sd(expression),
        "flame_pose_state_dict": sd(flame_pose),
        "camera_pose_state_dict": sd(camera_pose),
    }


def _staged(final: Path) -> Path:
    return final.with_name(f".{final.name}{STAGED_SUFFIX}")


def _is_number(name: str) -> bool:
    return name.isascii() and name.isdigit()


# ------------------------------------------------------------------------------------------ store
class Checkpoints:
    """Reads and writes the checkpoint families of one ``train`` directory (module docstring: protocol)."""

    def __init__(self, train_dir: str | os.PathLike):
        self.root = Path(train_dir) / "checkpoints"
        self._recovered = False

    def path(self, family: str, name: str | int) -> Path:
        return self.root / family / f"{name}.pth"

    def exists(self, family: str, name: str | int) -> bool:
        self._ensure_recovered()
        return self.path(family, name).is_file()

    # ------------------------------------------------------------------------------------ writing
    def save(self, family: str, payload: dict, epoch: int, numbered: bool) -> None:
        """Write ``latest.pth`` and, when ``numbered``, ``<epoch>.pth`` of one family (a one-family
        :meth:`save_epoch`)."""
        self.save_epoch({family: payload}, epoch, numbered)

    def save_epoch(self, payloads: dict[str, dict], epoch: int, numbered: bool) -> None:
        """Write the families of one epoch so that they become current together.

        ``payloads`` maps a family name to its dict; each file gets ``{"epoch": epoch, **payload}``.
        ``latest.pth`` is always written, ``<epoch>.pth`` too when ``numbered``. Raises
        ``PointAvatarError`` before writing anything if a payload holds NaN/inf or an object that
        ``weights_only`` loading would refuse.
        """
        if not payloads:
            raise ValueError("save_epoch needs at least one family")
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be a non-negative int, not {epoch!r}")
        files = {}
        for family, payload in payloads.items():
            if family not in FAMILIES:
                raise ValueError(f"unknown checkpoint family {family!r}; one of {', '.join(FAMILIES)}")
            payload = {"epoch": epoch, **payload}
            if isinstance(payload.get("scheduler_state_dict"), dict):
                payload["scheduler_state_dict"] = scheduler_state_to_payload(payload["scheduler_state_dict"])
            bad = first_non_finite(payload)
            if bad is not None:
                raise PointAvatarError(
                    f"not saving the checkpoints of epoch {epoch}: {family} holds a non-finite value (NaN "
                    f"or inf) at {bad}. Nothing was written; {self.root} keeps the last complete save."
                )
            bad = first_unsafe(payload)
            if bad is not None:
                raise PointAvatarError(
                    f"not saving the checkpoints of epoch {epoch}: {family} holds {bad}, which "
                    "torch.load(weights_only=True) refuses; store tensors, numbers, strings and "
                    f"dicts/lists of them. Nothing was written; {self.root} keeps the last complete save."
                )
            files[family] = payload
        # ModelParameters renamed last: a reader that skips recover() and sees the new model file
        # also sees the other new families.
        order = sorted(files, key=lambda family: family == MODEL)
        names: list[str | int] = [epoch, "latest"] if numbered else ["latest"]
        with self._lock():
            message = self._recover_locked()
            if message:
                print(f"checkpoints: {message}")
            plan: list[tuple[Path, Path]] = []
            try:
                for family in order:
                    (self.root / family).mkdir(parents=True, exist_ok=True)
                    first = None
                    for name in names:
                        final = self.path(family, name)
                        staged = _staged(final)
                        plan.append((staged, final))
                        if first is None:
                            _write_durably(staged, lambda f, p=files[family]: torch.save(p, f))
                            first = staged
                        else:
                            with open(first, "rb") as src:
                                _write_durably(staged, lambda f, s=src: shutil.copyfileobj(s, f))
                    fsync_dir(self.root / family)
                marker = {
                    "epoch": epoch,
                    "files": [[self._relative(s), self._relative(f)] for s, f in plan],
                }
                _atomic_write(self.root / COMMIT_MARKER, lambda f: f.write(json.dumps(marker).encode()))
            except BaseException as exc:
                committed = (self.root / COMMIT_MARKER).exists()  # only a failed folder fsync gets here
                if not committed:  # the old epoch stays current
                    for staged, _ in plan:
                        with contextlib.suppress(OSError):
                            os.remove(staged)
                if isinstance(exc, OSError):
                    state = (
                        f"the save is committed and the next read completes it (epoch {epoch})"
                        if committed
                        else "the files there are those of the last complete save"
                    )
                    raise PointAvatarError(
                        f"cannot write the checkpoints of epoch {epoch} to {self.root}: {exc}; {state}."
                    ) from exc
                raise
            self._apply(plan)

    def _relative(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    def _apply(self, plan: list[tuple[Path, Path]], missing_ok: bool = False) -> None:
        """Rename the staged files of a committed save onto their final names, then drop the marker."""
        for staged, final in plan:
            if missing_ok and not staged.exists():  # renamed before an interruption
                continue
            os.replace(staged, final)
        for folder in dict.fromkeys(final.parent for _, final in plan):
            fsync_dir(folder)
        os.unlink(self.root / COMMIT_MARKER)
        fsync_dir(self.root)

    # ----------------------------------------------------------------------------------- recovery
    @contextlib.contextmanager
    def _lock(self):
        """Exclusive ``flock`` on ``checkpoints/.lock``: one saver or repairer at a time, across
        processes (the kernel drops it when its holder dies)."""
        self.root.mkdir(parents=True, exist_ok=True)
        if fcntl is None:  # pragma: no cover
            yield
            return
        fd = os.open(self.root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            with contextlib.suppress(OSError):  # a file system without locks: run unserialised
                fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _stale_files(self) -> list[Path]:
        """Staged and temporary files of saves that never committed (valid only without a marker)."""
        found = [p for p in self.root.glob(f".*{TMP_SUFFIX}") if p.is_file()]
        for family in FAMILIES:
            folder = self.root / family
            if folder.is_dir():
                for pattern in (f".*{TMP_SUFFIX}", f".*{STAGED_SUFFIX}"):
                    found.extend(p for p in folder.glob(pattern) if p.is_file())
        return sorted(found)

    def _bad_marker(self, marker: Path, what: str) -> PointAvatarError:
        return PointAvatarError(
            f"the commit marker {marker} {what}. It was not written by this code: nothing was renamed or "
            "deleted. Inspect the folder, then delete the marker."
        )

    def _marker_path(self, marker: Path, text: Any) -> Path:
        """A path of the marker, accepted only as ``<Family>/[.]<name>.pth[.staged]`` inside root."""
        bad = self._bad_marker(marker, f"names {text!r}, which is not a checkpoint file inside {self.root}")
        if not isinstance(text, str) or "\\" in text or "\0" in text:
            raise bad
        rel = PurePosixPath(text)
        if rel.is_absolute() or len(rel.parts) != 2 or ".." in rel.parts or rel.parts[0] not in FAMILIES:
            raise bad
        name = rel.name
        if not (name.endswith(".pth") or (name.startswith(".") and name.endswith(f".pth{STAGED_SUFFIX}"))):
            raise bad
        return self.root / rel.parts[0] / rel.parts[1]

    def _read_marker(self, marker: Path) -> tuple[int, list[tuple[Path, Path]]]:
        """The epoch and (staged, final) pairs of a commit marker, parsed with json and validated."""
        try:
            data = json.loads(marker.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise self._bad_marker(marker, f"cannot be read ({exc})") from exc
        epoch = data.get("epoch") if isinstance(data, dict) else None
        files = data.get("files") if isinstance(data, dict) else None
        if isinstance(epoch, bool) or not isinstance(epoch, int) or not isinstance(files, list):
            raise self._bad_marker(marker, "lacks an int 'epoch' and a 'files' list")
        plan = []
        for entry in files:
            if not isinstance(entry, list) or len(entry) != 2:
                raise self._bad_marker(marker, f"has the entry {entry!r}, not a [staged, final] pair")
            staged, final = (self._marker_path(marker, text) for text in entry)
            if staged != _staged(final):
                raise self._bad_marker(marker, f"pairs {entry[0]!r} with {entry[1]!r}")
            plan.append((staged, final))
        return epoch, plan

    def _recover_locked(self) -> str | None:
        messages = []
        marker = self.root / COMMIT_MARKER
        if marker.is_file():
            epoch, plan = self._read_marker(marker)
            self._apply(plan, missing_ok=True)
            families = ", ".join(dict.fromkeys(final.parent.name for _, final in plan))
            messages.append(
                f"completed the interrupted save of epoch {epoch} in {self.root} ({families} are now at "
                f"epoch {epoch})."
            )
        stale = self._stale_files()
        for path in stale:
            os.remove(path)
        for folder in dict.fromkeys(path.parent for path in stale):
            fsync_dir(folder)
        if stale:
            listed = ", ".join(self._relative(p) for p in stale)
            messages.append(
                f"removed the unfinished files of a save that was interrupted before it committed "
                f"({listed}); the checkpoints there are those of the last complete save."
            )
        return " ".join(messages) or None

    def recover(self) -> str | None:
        """Finish or undo a save that was interrupted; idempotent.

        Returns a message saying what was done (the interrupted save of epoch E was completed, or the
        leftovers of an uncommitted one were removed), or None when there was nothing to do. Writes
        nothing and takes no lock when there is nothing to do, so read-only folders stay readable.
        """
        message = None
        if self.root.is_dir() and ((self.root / COMMIT_MARKER).exists() or self._stale_files()):
            try:
                with self._lock():  # waits for a save in progress in another process
                    message = self._recover_locked()
            except OSError as exc:
                raise PointAvatarError(
                    f"cannot repair the interrupted save in {self.root}: {exc}. Make the folder writable."
                ) from exc
        self._recovered = True  # not on failure: the next read tries again
        return message

    def _ensure_recovered(self) -> None:
        if not self._recovered:
            message = self.recover()
            if message:
                print(f"checkpoints: {message}")

    # ------------------------------------------------------------------------------------ reading
    def load(self, family: str, name: str | int) -> dict:
        """The payload of ``<family>/<name>.pth`` on the CPU, checked to hold only finite tensors."""
        self._ensure_recovered()
        path = self.path(family, name)
        if not path.is_file():
            found = ", ".join(self.available()) or "none"
            raise PointAvatarError(f"checkpoint not found: {path}. Model checkpoints there: {found}.")
        try:
            payload = load_file(path)
        except CorruptCheckpointError as exc:
            raise CorruptCheckpointError(f"{exc} {self._intact_hint()}") from exc
        bad = first_non_finite(payload)
        if bad is not None:
            raise CorruptCheckpointError(
                f"checkpoint {path} holds a non-finite value (NaN or inf) at {bad}. "
                f"{self._intact_hint(newest_only=True)}"
            )
        return payload

    def epoch_of(self, family: str, name: str | int) -> int | None:
        """The ``epoch`` stored in ``<family>/<name>.pth``; None if the file or its entry is missing."""
        self._ensure_recovered()
        path = self.path(family, name)
        if not path.is_file():
            return None
        epoch = load_file(path).get("epoch")
        return None if epoch is None else int(epoch)

    def available(self) -> list[str]:
        """Names of the model checkpoints present: numbers ascending, then other names, ``latest`` last."""
        self._ensure_recovered()
        folder = self.root / MODEL
        if not folder.is_dir():
            return []
        names = {p.stem for p in folder.glob("*.pth") if not p.name.startswith(".") and p.is_file()}
        numbers = sorted((n for n in names if _is_number(n)), key=int)
        others = sorted(n for n in names if not _is_number(n) and n != "latest")
        return numbers + others + (["latest"] if "latest" in names else [])

    def _intact(self, path: Path) -> bool:
        try:
            return first_non_finite(load_file(path)) is None
        except PointAvatarError:
            return False

    def intact_epochs(self, limit: int | None = None) -> list[int]:
        """Numbered checkpoints, newest first, whose files load and are finite in every family that
        has that number (ModelParameters must). Loads each file: meant for error messages."""
        self._ensure_recovered()
        found: list[int] = []
        for name in reversed(self.available()):
            if not _is_number(name):
                continue
            paths = [self.path(family, name) for family in FAMILIES]
            if all(self._intact(p) for p in paths if p.is_file()):
                found.append(int(name))
                if limit is not None and len(found) >= limit:
                    break
        return found

    def _intact_hint(self, newest_only: bool = False) -> str:
        epochs = self.intact_epochs(limit=1 if newest_only else None)
        if not epochs:
            return "No numbered checkpoint there is intact: start a fresh run (without --is_continue)."
        if newest_only:
            return f"The newest intact checkpoint is epoch {epochs[0]}: use it with --checkpoint {epochs[0]}."
        listed = ", ".join(str(e) for e in epochs)
        return (
            f"Intact numbered checkpoints, newest first: {listed}. Resume from one with --checkpoint N "
            f"(e.g. --checkpoint {epochs[0]})."
        )
