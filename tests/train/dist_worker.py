"""One rank of the multi-process training tests (tests/train/test_distributed.py), started by torchrun:

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/train/dist_worker.py \\
        --conf CONF --nepoch N --out DIR [--is_continue] [--poison_rank R --poison_step S] [--diverge_rank R]

It trains through the Trainer API on the CPU (gloo) and writes DIR/rank<r>.pt with what the tests
compare: the state after every epoch (`record_epochs`), how many checkpoint saves this rank made and
the epoch it started at. ``--poison_rank R --poison_step S``: on rank R only, the S-th backward (from 0)
gives one parameter an infinite gradient while the loss stays finite. ``--diverge_rank R``: rank R
moves its points by 1e-6 after epoch 0, as a rank with a bug would.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

from pointavatar.config import load_conf
from pointavatar.engine.distributed import init_ranks
from pointavatar.train.trainer import Trainer


def snapshot(trainer: Trainer) -> dict:
    """Copies of everything the ranks must agree on, keyed by name (CPU tensors)."""
    names = {p: n for n, p in trainer.model.named_parameters()}
    names.update({p: f"inputs.{n}" for n, p in trainer.inputs.named_parameters()})

    def opt_state(opt):
        if opt is None:
            return {}
        return {
            names[p]: {k: v.detach().cpu().clone() if torch.is_tensor(v) else v for k, v in state.items()}
            for p, state in opt.state.items()
        }

    visible = trainer.schedule.visible
    return {
        "model": {k: v.detach().cpu().clone() for k, v in trainer.model.state_dict().items()},
        "inputs": {k: v.detach().cpu().clone() for k, v in trainer.inputs.state_dict().items()},
        "adam": opt_state(trainer.optimizer),
        "sparse_adam": opt_state(trainer.optimizer_cam),
        "visible": None if visible is None else visible.cpu().clone(),
        "n_points": trainer.model.pc.n_points,
        "radius": trainer.model.pc.radius,
        "lr": trainer.optimizer.param_groups[0]["lr"],
        "skipped": trainer.skipped_steps,
    }


def record_epochs(trainer: Trainer) -> list[dict]:
    """A list that receives a `snapshot` at the end of every epoch (after the visibility is merged)."""
    epochs: list[dict] = []
    finish = trainer.schedule.finish_epoch

    def finish_and_record():
        finish()
        epochs.append(snapshot(trainer))

    trainer.schedule.finish_epoch = finish_and_record
    return epochs


def poison(trainer: Trainer, step: int) -> None:
    """Make the ``step``-th backward's gradient of one rendering weight infinite (the loss stays finite)."""
    calls = {"n": 0}

    def hook(grad):
        calls["n"] += 1
        return grad * float("inf") if calls["n"] == step + 1 else grad

    next(trainer.model.rendering_network.parameters()).register_hook(hook)


def diverge(trainer: Trainer) -> None:
    """Shift this rank's points by 1e-6 at the end of epoch 0 (the other ranks do not)."""
    finish = trainer.schedule.finish_epoch

    def finish_and_shift():
        finish()
        if len(epochs_done) == 0:
            with torch.no_grad():
                trainer.model.pc.points.add_(1e-6)
        epochs_done.append(True)

    epochs_done: list[bool] = []
    trainer.schedule.finish_epoch = finish_and_shift


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--conf", required=True)
    p.add_argument("--nepoch", type=int, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--is_continue", action="store_true")
    p.add_argument("--poison_rank", type=int, default=-1)
    p.add_argument("--poison_step", type=int, default=0)
    p.add_argument("--diverge_rank", type=int, default=-1)
    args = p.parse_args()
    ranks = init_ranks("cpu")
    if not ranks.is_main:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - as exp_runner: rank 0 prints
    try:
        trainer = Trainer(load_conf(args.conf), nepoch=args.nepoch, is_continue=args.is_continue, ranks=ranks)
        epochs = record_epochs(trainer)
        saves = {"n": 0}
        save_epoch = trainer.ckpt.save_epoch

        def counted(*a, **k):
            saves["n"] += 1
            return save_epoch(*a, **k)

        trainer.ckpt.save_epoch = counted
        if ranks.rank == args.poison_rank:
            poison(trainer, args.poison_step)
        if ranks.rank == args.diverge_rank:
            diverge(trainer)
        trainer.run()
    finally:
        ranks.close()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {
        "rank": ranks.rank,
        "world_size": ranks.world_size,
        "start_epoch": trainer.start_epoch,
        "saves": saves["n"],
        "epochs": epochs,
    }
    torch.save(result, out / f"rank{ranks.rank}.pt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
