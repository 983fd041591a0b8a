"""The checkpoint store: safe loading, all-or-nothing epochs across a real SIGKILL, corrupt and
non-finite files, and the listing helpers (CPU, tiny tensors)."""

from __future__ import annotations

import collections
import json
import os
import pickle
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from pointavatar.engine import checkpoints as ckpt
from pointavatar.errors import PointAvatarError

ROOT = Path(__file__).resolve().parents[2]
TRAINING_FAMILIES = (ckpt.MODEL, ckpt.OPTIMIZER, ckpt.SCHEDULER, ckpt.OPTIMIZER_INPUTS, ckpt.INPUTS)


def epoch_payloads(epoch: int) -> dict[str, dict]:
    """One small payload per training family whose tensors carry the epoch, to tell saves apart."""
    full = torch.full((3,), float(epoch))
    return {
        ckpt.MODEL: {"radius": 0.01, "model_state_dict": {"pc.points": full.clone()}},
        ckpt.OPTIMIZER: {
            "optimizer_state_dict": {"state": {0: {"exp_avg": full.clone()}}, "param_groups": []}
        },
        ckpt.SCHEDULER: {
            "scheduler_state_dict": {"last_epoch": epoch, "milestones": collections.Counter([5])}
        },
        ckpt.OPTIMIZER_INPUTS: {"optimizer_cam_state_dict": {"state": {}, "param_groups": []}},
        ckpt.INPUTS: ckpt.inputs_state(None, None, torch.nn.Embedding(2, 3)),
    }


def leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.endswith((".tmp", ".staged")) or p.name == ".commit.json"]


class Evil:
    """Unpickling this runs ``touch <marker>``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


# ------------------------------------------------------------------------------------ safe loading
def test_evil_payload_runs_code_without_weights_only(tmp_path):
    """The attack below is live: a plain pickle load would run it."""
    marker = tmp_path / "MARKER"
    torch.save({"epoch": 1, "x": Evil(marker)}, tmp_path / "evil.pth")
    torch.load(tmp_path / "evil.pth", weights_only=False)
    assert marker.exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # the plain pickle.dump file
@pytest.mark.parametrize("family", [ckpt.MODEL, ckpt.SCHEDULER, ckpt.TEST_INPUTS])
@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path, family, writer):
    marker = tmp_path / "MARKER"
    store = ckpt.Checkpoints(tmp_path / "train")
    path = store.path(family, "latest")
    path.parent.mkdir(parents=True)
    payload = {"epoch": 1, "model_state_dict": Evil(marker)}
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(payload, f)
    for load in (lambda: store.load(family, "latest"), lambda: ckpt.load_file(path)):
        with pytest.raises(ckpt.UnsafeCheckpointError) as info:
            load()
        msg = str(info.value)
        assert str(path) in msg
        assert "other than tensors and plain containers" in msg
        assert "refused" in msg and "none of its code ran" in msg
        assert "delete it" in msg  # what to do
    ckpt.atomic_save({"epoch": 5}, store.path(ckpt.MODEL, 5))
    store.path(family, 5).write_bytes(path.read_bytes())
    assert store.intact_epochs() == []  # judged without running it either
    assert not marker.exists()


def test_optimizer_and_scheduler_states_load_with_weights_only(tmp_path):
    dense = torch.nn.Parameter(torch.randn(4, 3, generator=torch.Generator().manual_seed(0)))
    adam = torch.optim.Adam([dense], lr=1e-3)
    embedding = torch.nn.Embedding(5, 2, sparse=True)
    sparse_adam = torch.optim.SparseAdam(embedding.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(adam, [2, 4, 4], gamma=0.5)
    for _ in range(3):
        adam.zero_grad()
        sparse_adam.zero_grad()
        (dense.square().sum() + embedding(torch.tensor([1, 3])).sum()).backward()
        adam.step()
        sparse_adam.step()
        scheduler.step()
    store = ckpt.Checkpoints(tmp_path)
    store.save_epoch(
        {
            ckpt.OPTIMIZER: {"optimizer_state_dict": adam.state_dict()},
            ckpt.OPTIMIZER_INPUTS: {"optimizer_cam_state_dict": sparse_adam.state_dict()},
            ckpt.SCHEDULER: {"scheduler_state_dict": scheduler.state_dict()},
        },
        epoch=3,
        numbered=True,
    )
    for family in (ckpt.OPTIMIZER, ckpt.OPTIMIZER_INPUTS, ckpt.SCHEDULER):
        for name in ("latest", 3):
            torch.load(store.path(family, name), map_location="cpu", weights_only=True)
    # On disk the milestones are a plain dict (loads on every torch); the store gives the Counter back.
    raw = torch.load(store.path(ckpt.SCHEDULER, "latest"), weights_only=True)["scheduler_state_dict"]
    assert type(raw["milestones"]) is dict
    state = store.load(ckpt.SCHEDULER, "latest")["scheduler_state_dict"]
    assert state["milestones"] == scheduler.state_dict()["milestones"]
    assert isinstance(state["milestones"], collections.Counter)

    fresh_adam = torch.optim.Adam([torch.nn.Parameter(dense.detach().clone())], lr=1e-3)
    fresh = torch.optim.lr_scheduler.MultiStepLR(fresh_adam, [1], gamma=0.5)
    fresh_adam.load_state_dict(store.load(ckpt.OPTIMIZER, 3)["optimizer_state_dict"])
    fresh.load_state_dict(state)
    for _ in range(3):  # the learning rates go on exactly as in the run that saved them
        scheduler.step()
        fresh.step()
        assert fresh.get_last_lr() == scheduler.get_last_lr()
    sparse_state = store.load(ckpt.OPTIMIZER_INPUTS, 3)["optimizer_cam_state_dict"]
    torch.optim.SparseAdam(torch.nn.Embedding(5, 2, sparse=True).parameters()).load_state_dict(sparse_state)


def test_scheduler_file_with_a_counter_still_loads(tmp_path):
    """Files of the original and of older versions hold the Counter itself (torch >= 2.4 accepts it)."""
    adam = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))])
    scheduler = torch.optim.lr_scheduler.MultiStepLR(adam, [3, 6])
    store = ckpt.Checkpoints(tmp_path)
    ckpt.atomic_save(
        {"epoch": 2, "scheduler_state_dict": scheduler.state_dict()}, store.path(ckpt.SCHEDULER, 2)
    )
    state = store.load(ckpt.SCHEDULER, 2)["scheduler_state_dict"]
    assert state["milestones"] == collections.Counter([3, 6])


def test_original_model_parameters_layout_loads(tmp_path):
    generator = torch.Generator().manual_seed(0)
    state = collections.OrderedDict(
        (key, torch.randn(4, 3, generator=generator))
        for key in ("geometry_network.lin0.weight_g", "geometry_network.lin0.weight_v", "pc.points")
    )
    store = ckpt.Checkpoints(tmp_path)
    path = store.path(ckpt.MODEL, 60)
    path.parent.mkdir(parents=True)
    torch.save({"epoch": 60, "model_state_dict": state, "radius": 0.01, "note": ["a", 1, (2.0, None)]}, path)
    payload = store.load(ckpt.MODEL, 60)
    assert payload["epoch"] == 60 and payload["note"] == ["a", 1, (2.0, None)]
    assert list(payload["model_state_dict"]) == list(state)
    for key, value in state.items():
        assert torch.equal(payload["model_state_dict"][key], value), key
    assert store.epoch_of(ckpt.MODEL, 60) == 60


def test_save_refuses_objects_weights_only_would_refuse(tmp_path):
    store = ckpt.Checkpoints(tmp_path)
    store.save_epoch(epoch_payloads(1), 1, numbered=True)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    payloads = epoch_payloads(2)
    payloads[ckpt.MODEL]["radius"] = np.float64(0.01)
    with pytest.raises(PointAvatarError, match=r"ModelParameters holds radius \(numpy.float64\)"):
        store.save_epoch(payloads, 2, numbered=True)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


# --------------------------------------------------------------------------------- commit protocol
KILL_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    sys.path.insert(0, {code!r})
    sys.path.insert(0, {tests!r})
    from test_checkpoints import epoch_payloads
    from pointavatar.engine import checkpoints as ckpt

    store = ckpt.Checkpoints({train_dir!r})
    store.save_epoch(epoch_payloads(1), 1, numbered=True)
    original, calls = getattr(os, {function!r}), [0]

    def dying(*args, **kwargs):
        calls[0] += 1
        if calls[0] == {k}:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(*args, **kwargs)

    setattr(os, {function!r}, dying)
    store.save_epoch(epoch_payloads(2), 2, numbered=True)
    print("survived")
    """
)

# Saving epoch 2 of the 5 families, numbered: 10 staged files. os.replace call 1 commits the marker,
# calls 2..11 rename the staged files; os.fsync calls 1..10 sync the staged files; os.unlink call 1
# removes the marker after all renames.
KILLS = [
    ("os.fsync", 1, 1),  # while staging the first file
    ("os.fsync", 7, 1),  # in the middle of staging
    ("os.replace", 1, 1),  # everything staged, marker not committed
    ("os.replace", 2, 2),  # right after the commit, before any rename
    ("os.replace", 6, 2),  # in the middle of the renames
    ("os.replace", 11, 2),  # before the last rename
    ("os.unlink", 1, 2),  # all renamed, marker not removed
]


@pytest.mark.parametrize(("function", "k", "expected"), KILLS, ids=[f"{f}-{k}" for f, k, _ in KILLS])
def test_sigkill_while_saving_leaves_one_consistent_epoch(tmp_path, function, k, expected):
    script = KILL_SCRIPT.format(
        code=str(ROOT / "code"),
        tests=str(ROOT / "tests" / "engine"),
        train_dir=str(tmp_path),
        function=function.removeprefix("os."),
        k=k,
    )
    child = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert child.returncode == -signal.SIGKILL, child.stdout + child.stderr  # it really died mid-save

    store = ckpt.Checkpoints(tmp_path)
    message = store.recover()
    assert message is not None
    assert (f"interrupted save of epoch {expected} " in message) == (expected == 2)
    assert store.recover() is None  # idempotent
    assert not leftovers(store.root)
    for family in TRAINING_FAMILIES:
        assert store.epoch_of(family, "latest") == expected, family
        assert store.exists(family, 2) == (expected == 2), family
        store.load(family, 1)
        store.load(family, "latest")
    points = store.load(ckpt.MODEL, "latest")["model_state_dict"]["pc.points"]
    assert torch.equal(points, torch.full((3,), float(expected)))
    assert store.intact_epochs() == list(range(expected, 0, -1))


def test_reads_repair_an_interrupted_save_themselves(tmp_path, capsys):
    """A store that is only read (the evaluator) completes a committed save before reading."""
    store = ckpt.Checkpoints(tmp_path)
    store.save_epoch(epoch_payloads(1), 1, numbered=False)
    real_replace, calls = os.replace, []

    def interrupted(src, dst):
        calls.append(dst)
        if len(calls) == 3:  # the marker and one family are done
            raise KeyboardInterrupt
        real_replace(src, dst)

    os.replace = interrupted
    try:
        with pytest.raises(KeyboardInterrupt):
            store.save_epoch(epoch_payloads(2), 2, numbered=False)
    finally:
        os.replace = real_replace
    assert (store.root / ".commit.json").is_file()
    reader = ckpt.Checkpoints(tmp_path)
    assert reader.load(ckpt.MODEL, "latest")["epoch"] == 2
    assert "completed the interrupted save of epoch 2" in capsys.readouterr().out
    assert {reader.epoch_of(f, "latest") for f in TRAINING_FAMILIES} == {2}


def test_uncommitted_leftovers_are_removed(tmp_path):
    store = ckpt.Checkpoints(tmp_path)
    store.save_epoch(epoch_payloads(1), 1, numbered=False)
    stale = [
        store.root / ckpt.MODEL / ".latest.pth.staged",
        store.root / ckpt.OPTIMIZER / ".latest.pth.x1y2.tmp",  # the previous version's atomic_save
        store.root / ".commit.json.abc.tmp",
    ]
    for path in stale:
        path.write_bytes(b"partial")
    message = ckpt.Checkpoints(tmp_path).recover()
    assert "removed the unfinished files" in message and "ModelParameters/.latest.pth.staged" in message
    assert not any(p.exists() for p in stale)
    assert ckpt.Checkpoints(tmp_path).recover() is None
    assert ckpt.Checkpoints(tmp_path).epoch_of(ckpt.MODEL, "latest") == 1


@pytest.mark.parametrize(
    "files",
    [
        [["../outside.staged", "ModelParameters/latest.pth"]],
        [["ModelParameters/.latest.pth.staged", "/tmp/latest.pth"]],
        [["ModelParameters/../../x/.a.pth.staged", "ModelParameters/../../x/a.pth"]],
        [["Elsewhere/.latest.pth.staged", "Elsewhere/latest.pth"]],
        [["ModelParameters/.latest.pth.staged", "OptimizerParameters/latest.pth"]],
        [["ModelParameters/.latest.pth.staged"]],
        "not a list",
    ],
)
def test_a_marker_pointing_elsewhere_is_not_followed(tmp_path, files):
    outside = tmp_path / "outside.staged"
    outside.write_bytes(b"victim")
    store = ckpt.Checkpoints(tmp_path / "train")
    store.save_epoch(epoch_payloads(1), 1, numbered=False)
    staged = store.root / ckpt.MODEL / ".latest.pth.staged"
    staged.write_bytes(b"x")
    (store.root / ".commit.json").write_text(json.dumps({"epoch": 2, "files": files}))
    with pytest.raises(PointAvatarError, match="commit marker .* nothing was renamed or deleted"):
        store.recover()
    assert outside.read_bytes() == b"victim" and staged.exists()
    assert torch.load(store.path(ckpt.MODEL, "latest"), weights_only=True)["epoch"] == 1


def test_single_family_save_goes_through_the_commit(tmp_path, monkeypatch):
    store = ckpt.Checkpoints(tmp_path)
    renamed = []
    real_replace = os.replace
    monkeypatch.setattr(
        os, "replace", lambda src, dst: (renamed.append(Path(dst).name), real_replace(src, dst))
    )
    store.save(ckpt.TEST_INPUTS, ckpt.inputs_state(torch.nn.Embedding(2, 4), None, None), 7, numbered=True)
    assert renamed == [".commit.json", "7.pth", "latest.pth"]
    assert not leftovers(store.root)
    assert store.load(ckpt.TEST_INPUTS, 7)["expression_state_dict"]["weight"].shape == (2, 4)
    assert store.epoch_of(ckpt.TEST_INPUTS, "latest") == 7


def test_atomic_save_syncs_the_folder(tmp_path, monkeypatch):
    synced = []
    monkeypatch.setattr(ckpt, "fsync_dir", lambda folder: synced.append(Path(folder)))
    ckpt.atomic_save({"epoch": 1}, tmp_path / "a" / "b.pth")
    assert synced == [tmp_path / "a"]
    assert not leftovers(tmp_path)


# ------------------------------------------------------------------------- corrupt and non-finite
def saved_run(tmp_path) -> ckpt.Checkpoints:
    """Numbered checkpoints 5, 10 and 15, then latest at 17."""
    store = ckpt.Checkpoints(tmp_path)
    for epoch in (5, 10, 15):
        store.save_epoch(epoch_payloads(epoch), epoch, numbered=True)
    store.save_epoch(epoch_payloads(17), 17, numbered=False)
    return store


def test_truncated_latest_names_the_intact_checkpoints(tmp_path):
    store = saved_run(tmp_path)
    path = store.path(ckpt.MODEL, "latest")
    path.write_bytes(path.read_bytes()[:100])
    broken = store.path(ckpt.OPTIMIZER, 15)  # epoch 15 is not intact in every family
    broken.write_bytes(broken.read_bytes()[:-50])
    assert store.intact_epochs() == [10, 5]
    with pytest.raises(ckpt.CorruptCheckpointError) as info:
        store.load(ckpt.MODEL, "latest")
    msg = str(info.value)
    assert str(path) in msg and "truncated" in msg
    assert "newest first: 10, 5" in msg and "--checkpoint N" in msg


def test_first_non_finite_paths():
    assert ckpt.first_non_finite({"a": [torch.zeros(2), (1, "x", torch.arange(3))], "b": None}) is None
    nested = {"state": {0: {"exp_avg": torch.tensor([1.0, float("nan")])}}}
    assert (
        ckpt.first_non_finite({"optimizer_state_dict": nested})
        == "optimizer_state_dict['state'][0]['exp_avg']"
    )
    assert ckpt.first_non_finite([torch.ones(1), {"w": torch.tensor([float("-inf")])}]) == "[1]['w']"
    sparse = torch.sparse_coo_tensor(torch.tensor([[0, 2]]), torch.tensor([1.0, float("inf")]), (4,))
    assert ckpt.first_non_finite({"grad": sparse}) == "grad"
    assert ckpt.first_non_finite({"csr": torch.eye(2).to_sparse_csr()}) is None
    assert ckpt.first_non_finite({"half": torch.tensor([65504.0]).half() * 2}) == "half"


def test_first_non_finite_by_chunks(monkeypatch):
    """Large tensors are tested a chunk at a time (a bounded buffer beside a large CUDA tensor): a single
    NaN is found in the last chunk of a contiguous tensor, of a transposed one, and of one whose rows are
    larger than a chunk; and an out-of-memory error is raised, not taken for a dtype without a kernel."""
    monkeypatch.setattr(ckpt, "_FINITE_CHUNK", 7)
    seen = []
    real_isfinite = torch.isfinite
    monkeypatch.setattr(torch, "isfinite", lambda t: seen.append(t.numel()) or real_isfinite(t))
    for make in (
        lambda: torch.zeros(10, 6),
        lambda: torch.zeros(6, 10).t(),
        lambda: torch.zeros(3, 9, 2)[:, :, 0],
    ):
        t = make()
        assert ckpt.first_non_finite({"w": t}) is None
        assert max(seen) <= 7 and sum(seen) == t.numel()
        seen.clear()
        t[-1, -1] = float("nan")
        assert ckpt.first_non_finite({"w": t}) == "w"
        seen.clear()

    def out_of_memory(t):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(torch, "isfinite", out_of_memory)
    with pytest.raises(torch.OutOfMemoryError):
        ckpt.first_non_finite({"w": torch.zeros(3)})


def test_non_finite_payload_is_refused_before_writing(tmp_path):
    store = saved_run(tmp_path)
    before = {p: p.read_bytes() for p in store.root.rglob("*") if p.is_file()}
    payloads = epoch_payloads(18)
    payloads[ckpt.INPUTS]["camera_pose_state_dict"]["weight"][1, 2] = float("nan")
    with pytest.raises(PointAvatarError) as info:
        store.save_epoch(payloads, 18, numbered=True)
    msg = str(info.value)
    assert "InputParameters" in msg and "camera_pose_state_dict['weight']" in msg
    assert "Nothing was written" in msg
    assert {p: p.read_bytes() for p in store.root.rglob("*") if p.is_file()} == before


def test_non_finite_file_names_the_key_and_the_newest_intact_epoch(tmp_path):
    store = saved_run(tmp_path)
    payload = epoch_payloads(17)[ckpt.MODEL]
    payload["model_state_dict"]["pc.points"][0] = float("inf")
    ckpt.atomic_save({"epoch": 17, **payload}, store.path(ckpt.MODEL, "latest"))
    with pytest.raises(ckpt.CorruptCheckpointError) as info:
        store.load(ckpt.MODEL, "latest")
    msg = str(info.value)
    assert str(store.path(ckpt.MODEL, "latest")) in msg and "model_state_dict['pc.points']" in msg
    assert "--checkpoint 15" in msg


# ------------------------------------------------------------------------------------------ listing
def test_available_sorts_numbers_as_numbers(tmp_path):
    store = ckpt.Checkpoints(tmp_path)
    assert store.available() == []
    for epoch in (42, 5, 10, 100, 15):
        store.save(ckpt.MODEL, {"model_state_dict": {}}, epoch, numbered=True)
    ckpt.atomic_save({"epoch": 1}, store.path(ckpt.MODEL, "best"))
    assert store.available() == ["5", "10", "15", "42", "100", "best", "latest"]
    assert store.intact_epochs() == [100, 42, 15, 10, 5]
    assert store.epoch_of(ckpt.MODEL, "latest") == 15  # the last save of the loop
    assert store.epoch_of(ckpt.MODEL, 3) is None
