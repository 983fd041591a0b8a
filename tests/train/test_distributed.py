"""Training on several processes (engine/distributed.py) on the CPU with gloo and 2 ranks.

The two-rank runs are started as a user starts them, with torchrun (``python -m
torch.distributed.run``): tests/train/dist_worker.py through the Trainer API, and
scripts/exp_runner.py for the command line. The tiny subject has 4 training frames; with a batch of 1
per rank a step of 2 ranks sees the 2 frames that a single process with batch 2 sees.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch
from dist_worker import poison, record_epochs
from run_fixtures import ROOT, SUBJECT1, load_model_ckpt, tiny
from tolerances import assert_close
from torch.utils.data import DataLoader

from pointavatar.config import save_conf
from pointavatar.engine.distributed import Ranks, ShardedBatches, init_ranks, rank_device
from pointavatar.errors import PointAvatarError
from pointavatar.train.schedule import rank_lr_factor
from pointavatar.train.trainer import Trainer

WORKER = ROOT / "tests" / "train" / "dist_worker.py"

# Small networks: the tests are about what the ranks exchange, not about the networks' size, and a
# step of the shipped networks costs seconds on a CPU.
SMALL = {
    "model.geometry_network.dims": [32, 32, 32, 32],
    "model.geometry_network.skip_in": [2],
    "model.geometry_network.multires": 2,
    "model.deformer_network.dims": [32, 32],
    "model.rendering_network.dims": [16],
}
# One frame per rank and step (the budget never limits the batch); the per-frame inputs train from
# epoch 0 (sparse gradients); Adam moments survive the resizes and the visibility is saved, so both
# are compared and resumed. Plots at every epoch draw random numbers on rank 0 only.
SETTINGS = {
    **SMALL,
    "train.max_batch": 1,
    "train.max_points_training": 10**6,
    "train.input_optimization_start": 0,
    "train.keep_optimizer_state": True,
    "train.prune_on_resume": True,
}
NEPOCH = 2  # epochs 0, 1, 2: prune and upsample at epochs 1 and 2 (upsample_freq 1)


def torchrun(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --standalone --nproc_per_node 2 ARGS`` from the repository root."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "code"), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    proc.output = proc.stdout + proc.stderr
    return proc


def tensors(tree, path=""):
    """(path, leaf) of the nested dicts of a snapshot, in a fixed order."""
    if isinstance(tree, dict):
        for key in sorted(tree, key=str):
            yield from tensors(tree[key], f"{path}/{key}")
    else:
        yield path, tree


def run_two_ranks(subject, out, settings: dict):
    """A 2-rank run (batch 1 per rank) of epochs 0..NEPOCH in ``out``; rank 1's first backward has an
    infinite gradient. -> (conf, [rank 0's, rank 1's recorded states], the run's output)."""
    conf = tiny(SUBJECT1, subject, out / "exps", **settings)
    conf_path = out / "two.conf"
    save_conf(conf, conf_path)
    proc = torchrun(
        str(WORKER), "--conf", str(conf_path), "--nepoch", str(NEPOCH), "--out", str(out / "result"),
        "--poison_rank", "1", "--poison_step", "0",
    )  # fmt: skip
    assert proc.returncode == 0, proc.output[-4000:]
    results = [torch.load(out / "result" / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    return conf, results, proc.output


@pytest.fixture(scope="module")
def two_ranks(subject, tmp_path_factory):
    """The reference engine on 2 ranks (``run_two_ranks`` with SETTINGS)."""
    return run_two_ranks(subject, tmp_path_factory.mktemp("two_ranks"), SETTINGS)


@pytest.fixture(scope="module")
def one_process(subject, tmp_path_factory):
    """The same run in a single process with batch 2 and twice the learning rate (the 2 ranks' rate:
    train.lr_rank_scaling "linear"), its first backward poisoned the same way."""
    out = tmp_path_factory.mktemp("one_process")
    lr = tiny(SUBJECT1, subject, out).train.learning_rate
    conf = tiny(
        SUBJECT1, subject, out / "exps", **{**SETTINGS, "train.max_batch": 2, "train.learning_rate": 2 * lr}
    )
    trainer = Trainer(conf, nepoch=NEPOCH, device="cpu")
    epochs = record_epochs(trainer)
    poison(trainer, 0)
    trainer.run()
    return epochs


@pytest.mark.slow
def test_ranks_hold_identical_state_through_prune_and_upsample(two_ranks):
    conf, (rank0, rank1), output = two_ranks
    assert len(rank0["epochs"]) == len(rank1["epochs"]) == NEPOCH + 1
    for epoch, (a, b) in enumerate(zip(rank0["epochs"], rank1["epochs"], strict=True)):
        leaves_a, leaves_b = list(tensors(a)), list(tensors(b))
        assert [p for p, _ in leaves_a] == [p for p, _ in leaves_b], epoch
        for (path, x), (_, y) in zip(leaves_a, leaves_b, strict=True):
            # Exactly equal: every rank applies the same averaged gradients to the same state.
            same = torch.equal(x, y) if torch.is_tensor(x) else x == y
            assert same, f"epoch {epoch}: ranks differ at {path}"
    n_points = [e["n_points"] for e in rank0["epochs"]]
    radii = [e["radius"] for e in rank0["epochs"]]
    # Epochs 1 and 2 each pruned (the doubled count is below 2x the previous) and upsampled (radius x 0.75).
    assert n_points[0] == 100 and all(n % 2 == 0 for n in n_points[1:])
    assert n_points[1] < 2 * n_points[0] and n_points[2] < 2 * n_points[1]
    assert radii[1] == pytest.approx(0.75 * radii[0]) and radii[2] == pytest.approx(0.75 * radii[1])
    last = rank0["epochs"][-1]
    assert "pc.points" in last["adam"] and last["adam"]["pc.points"]["exp_avg"].shape == (n_points[2], 3)
    assert set(last["sparse_adam"]) == {"inputs.expression.weight", "inputs.flame_pose.weight",
                                        "inputs.camera_pose.weight"}  # fmt: skip
    # The infinite gradient on rank 1 made both ranks skip the step, and only that one.
    assert rank0["epochs"][0]["skipped"] == rank1["epochs"][0]["skipped"] == 1
    assert last["skipped"] == 1
    assert "batch 1 per rank x 2 ranks" in output
    # train.lr_rank_scaling "linear" (the default): twice the rate on 2 ranks, in every Adam.
    assert all(e["lr"] == 2 * conf.train.learning_rate for e in rank0["epochs"])


@pytest.mark.slow
def test_two_ranks_match_one_process_with_twice_the_batch(two_ranks, one_process):
    _, (rank0, _), _ = two_ranks
    for epoch, (dist, single) in enumerate(zip(rank0["epochs"], one_process, strict=True)):
        assert dist["n_points"] == single["n_points"], epoch  # the same prune and upsample decisions
        assert dist["skipped"] == single["skipped"] == 1
        assert torch.equal(dist["visible"], single["visible"]), epoch
        leaves_d, leaves_s = list(tensors(dist)), list(tensors(single))
        assert [p for p, _ in leaves_d] == [p for p, _ in leaves_s], epoch
        for (path, x), (_, y) in zip(leaves_d, leaves_s, strict=True):
            if torch.is_tensor(x) and x.is_floating_point():
                # Default float32 tolerances: the runs differ only in how the mean over a step's two
                # frames is summed (two means of one frame averaged vs one mean of two).
                assert_close(x, y, msg=lambda m, p=path, e=epoch: f"epoch {e}, {p}: {m}")
            elif torch.is_tensor(x):
                assert torch.equal(x, y), f"epoch {epoch}: {path}"
            elif isinstance(x, float):
                assert x == pytest.approx(y), f"epoch {epoch}: {path}"  # rel 1e-6: the radius
            else:
                assert x == y, f"epoch {epoch}: {path}"


@pytest.mark.slow
def test_fast_engine_on_two_ranks(two_ranks, subject, tmp_path):
    """The fast engine (the default on CUDA, so on every GPU rank) with recomputation chunks, on 2
    ranks: the ranks stay bit-identical, and the run is the reference run's within float32's default
    tolerance (the engines sum the same products in another order: 7e-8 apart at most after 3 epochs).
    On the CPU the fast engine runs eagerly; torch.compile under torchrun is not covered here."""
    _, (reference, _), _ = two_ranks
    # The bf16 products off (geometry and deformer): the comparison with the reference is at float32's
    # tolerance.
    fast = {
        **SETTINGS,
        "model.implementation": "fast",
        "model.recompute_chunk": 37,
        "model.geometry_bf16": False,
        "model.deformer_bf16": False,
    }
    _, (rank0, rank1), _ = run_two_ranks(subject, tmp_path, fast)
    for epoch, (a, b, ref) in enumerate(
        zip(rank0["epochs"], rank1["epochs"], reference["epochs"], strict=True)
    ):
        for (path, x), (_, y), (_, r) in zip(tensors(a), tensors(b), tensors(ref), strict=True):
            assert torch.equal(x, y) if torch.is_tensor(x) else x == y, (
                f"epoch {epoch}: ranks differ at {path}"
            )
            if torch.is_tensor(x) and x.is_floating_point():
                assert_close(x, r, msg=lambda m, p=path, e=epoch: f"{e} {p}: {m}")
            elif torch.is_tensor(x):
                assert torch.equal(x, r), f"epoch {epoch}: {path}"  # visibility: same prune decisions
            elif isinstance(x, float):
                assert x == pytest.approx(r), f"epoch {epoch}: {path}"
            else:
                assert x == r, f"epoch {epoch}: {path}"


@pytest.mark.slow
def test_only_rank_zero_writes(two_ranks):
    conf, (rank0, rank1), _ = two_ranks
    assert rank0["saves"] == NEPOCH + 2  # epochs 0..2 (save_freq 1) and the final checkpoint
    assert rank1["saves"] == 0
    from pointavatar.engine.experiment import Experiment

    train_dir = Experiment(conf).train_dir
    assert load_model_ckpt(train_dir)["epoch"] == NEPOCH + 1
    assert len(list((train_dir / "tensorboard").glob("events.out.tfevents.*"))) == 1
    assert len(list(train_dir.glob("runconf*.conf"))) == 1


@pytest.mark.slow
def test_two_rank_run_resumes_in_one_process(two_ranks, tmp_path):
    conf, (rank0, _), _ = two_ranks
    from pointavatar.engine.experiment import Experiment

    moved = conf.override({"train.exps_folder": str(tmp_path / "exps")})
    shutil.copytree(Experiment(conf).run_dir, Experiment(moved).run_dir)
    resumed = Trainer(moved, nepoch=NEPOCH + 1, is_continue=True, device="cpu")
    assert resumed.start_epoch == NEPOCH + 1
    # The 2 ranks' doubled rate (train.lr_rank_scaling) is back to the conf's on one process.
    lr = conf.train.learning_rate
    assert resumed.scheduler.base_lrs == [lr] and resumed.optimizer.param_groups[0]["lr"] == lr
    last = rank0["epochs"][-1]
    for key, value in resumed.model.state_dict().items():
        assert torch.equal(value, last["model"][key]), key
    points = resumed.model.pc.points
    assert torch.equal(resumed.optimizer.state[points]["exp_avg"], last["adam"]["pc.points"]["exp_avg"])
    assert torch.equal(resumed.inputs.expression.weight.detach(), last["inputs"]["expression.weight"])
    assert resumed.schedule.resumed_visibility and torch.equal(resumed.schedule.visible, last["visible"])
    resumed.run()
    assert load_model_ckpt(Experiment(moved).train_dir)["epoch"] == NEPOCH + 2


@pytest.mark.slow
def test_one_process_run_resumes_on_two_ranks_from_the_command_line(subject, tmp_path):
    conf = tiny(SUBJECT1, subject, tmp_path / "exps", **SETTINGS)
    Trainer(conf, nepoch=0, device="cpu").run()
    conf_path = tmp_path / "tiny.conf"
    save_conf(conf, conf_path)
    proc = torchrun(
        str(ROOT / "scripts" / "exp_runner.py"), "--conf", str(conf_path), "--is_continue", "--nepoch", "1",
        "--device", "cpu",
    )  # fmt: skip
    assert proc.returncode == 0, proc.output[-4000:]
    assert "Resumed from" in proc.stdout and "at epoch 1 with 100 points" in proc.stdout
    assert "batch 1 per rank x 2 ranks" in proc.stdout
    from pointavatar.engine.experiment import Experiment

    exp = Experiment(conf)
    assert load_model_ckpt(exp.train_dir)["epoch"] == 2
    # The rate doubled on 2 ranks (train.lr_rank_scaling "linear"), and the checkpoint says so.
    checkpoints = exp.train_dir / "checkpoints"
    scheduler = torch.load(checkpoints / "SchedulerParameters" / "latest.pth")
    optimizer = torch.load(checkpoints / "OptimizerParameters" / "latest.pth")
    assert scheduler["lr_rank_factor"] == 2.0
    assert scheduler["scheduler_state_dict"]["base_lrs"] == [2 * conf.train.learning_rate]
    assert optimizer["optimizer_state_dict"]["param_groups"][0]["lr"] == 2 * conf.train.learning_rate
    # Rank 0 evaluated the new checkpoint (the other ranks print nothing and left after training).
    assert proc.stdout.count("Outputs in") == 1
    epoch_dir = exp.eval_dir / "test" / "epoch_2"
    assert sorted(p.name for p in (epoch_dir / "rgb").glob("*.png")) == ["1.png", "2.png"]
    assert (epoch_dir / "results_rgb_erode_dilate.csv").is_file()


@pytest.mark.slow
def test_ranks_that_disagree_stop_with_a_message(subject, tmp_path):
    conf = tiny(SUBJECT1, subject, tmp_path / "exps", **{**SETTINGS, "train.save_freq": 5})
    conf_path = tmp_path / "tiny.conf"
    save_conf(conf, conf_path)
    proc = torchrun(
        str(WORKER), "--conf", str(conf_path), "--nepoch", "1", "--out", str(tmp_path / "result"),
        "--diverge_rank", "1",
    )  # fmt: skip
    assert proc.returncode != 0
    assert "the 2 ranks hold different versions of the point cloud after pruning at epoch 1" in proc.output


# ------------------------------------------------------------------------------ without processes


class Frames(torch.utils.data.Dataset):
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return i


def batches(loader: DataLoader, seed: int) -> list[list[int]]:
    torch.manual_seed(seed)
    return [b.tolist() for b in loader]


def test_sharded_batches_of_one_rank_are_the_shuffled_loader():
    """With one rank the permutation and batches are DataLoader(shuffle=True)'s (same RNG draws)."""
    data = Frames(10)
    for seed in range(3):
        expected = batches(DataLoader(data, batch_size=3, shuffle=True), seed)
        assert batches(DataLoader(data, batch_sampler=ShardedBatches(10, 3)), seed) == expected


def test_sharded_batches_cut_the_global_batches():
    data, n, k, b = Frames(10), 10, 3, 2
    global_batches = batches(DataLoader(data, batch_sampler=ShardedBatches(n, k * b)), 7)
    per_rank = [batches(DataLoader(data, batch_sampler=ShardedBatches(n, b, r, k)), 7) for r in range(k)]
    assert len({len(r) for r in per_rank}) == 1 == len({len(r) for r in per_rank} | {len(global_batches)})
    # The permutation is padded to 12 = 4 x 3 frames with its first 2 frames, so every rank has 4
    # frames; step s of rank r is the r-th slice of the padded permutation's global batch s.
    padded = [i for batch in global_batches for i in batch]
    padded += padded[: 12 - n]
    for s in range(len(global_batches)):
        chunk = padded[s * k * b : (s + 1) * k * b]
        share = len(chunk) // k
        for r in range(k):
            assert per_rank[r][s] == chunk[r * share : (r + 1) * share]
    assert sorted({i for r in per_rank for batch in r for i in batch}) == list(range(n))


def test_learning_rate_factor_of_the_ranks(subject, tmp_path):
    train = tiny(SUBJECT1, subject, tmp_path).train
    assert train.lr_rank_scaling == "linear"  # the default
    assert rank_lr_factor(train, 1) == 1.0 and rank_lr_factor(train, 4) == 4.0
    sqrt = tiny(SUBJECT1, subject, tmp_path, **{"train.lr_rank_scaling": "sqrt"}).train
    assert rank_lr_factor(sqrt, 1) == 1.0 and rank_lr_factor(sqrt, 4) == 2.0
    none = tiny(SUBJECT1, subject, tmp_path, **{"train.lr_rank_scaling": "none"}).train
    assert rank_lr_factor(none, 4) == 1.0
    with pytest.raises(PointAvatarError, match="lr_rank_scaling"):
        tiny(SUBJECT1, subject, tmp_path, **{"train.lr_rank_scaling": "quadratic"})


def test_a_single_process_takes_no_distributed_path(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    ranks = init_ranks("cpu")
    assert not ranks.distributed and ranks.is_main and ranks.device == torch.device("cpu")
    mask = torch.tensor([True, False])
    assert Ranks().any(mask) is mask  # no collective, no copy
    assert rank_device("cpu", 1) == torch.device("cpu")
    with pytest.raises(PointAvatarError, match="--device cuda:1"):
        rank_device("cuda:1", 0)
