"""Train a PointAvatar and evaluate it (the original PointAvatar's command line).

    python scripts/exp_runner.py --conf ./confs/subject1.conf [--is_continue]
    python scripts/exp_runner.py --conf ./confs/subject1.conf --is_eval [--checkpoint 60] [--load_path DIR]

`pointavatar` (installed with the package) is the same command: pointavatar --conf ./confs/subject1.conf

On K GPUs of one host: torchrun --nproc_per_node K scripts/exp_runner.py --conf ./confs/subject1.conf
(one process per GPU; the conf's batch is per GPU; rank 0 writes the run folder and evaluates).

Run from the repository root: the confs' relative paths (./data/..., ./code/flame/...) are resolved
against the working directory. Training ends with an evaluation of the last checkpoint.
"""

from __future__ import annotations

import argparse
import os
import sys

from pointavatar.cli import exit_code
from pointavatar.errors import PointAvatarError


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--conf", required=True, help="HOCON conf file, e.g. ./confs/subject1.conf")
    p.add_argument("--is_eval", action="store_true", help="skip training; render and score the test split")
    p.add_argument(
        "--nepoch",
        type=int,
        default=None,
        help="last training epoch, inclusive (default: train.nepoch of the conf)",
    )
    p.add_argument(
        "--is_continue", action="store_true", help="resume from <train dir>/checkpoints/<checkpoint>"
    )
    p.add_argument(
        "--move_old_run",
        action="store_true",
        help="start a fresh run even though the run folder holds one: the old run folder is renamed to "
        "<name>.old-<date>-<time> first (nothing is deleted)",
    )
    p.add_argument(
        "--only_json",
        action="store_true",
        help="test: build the test set from the JSON only (no images, no metrics); drives the avatar "
        "with another sequence's expressions and poses",
    )
    p.add_argument(
        "--checkpoint",
        default="latest",
        help="checkpoint to resume or evaluate: latest (default) or an epoch number such as 60",
    )
    p.add_argument("--load_path", default="", help="another train/ directory to load checkpoints from")
    p.add_argument(
        "--profile_epoch",
        type=int,
        default=None,
        help="profile a few training steps of this epoch with torch.profiler: the wall and GPU time per "
        "step and the costliest operators and kernels, written to <run>/train/profile_epoch<E>.txt",
    )
    p.add_argument(
        "--profile_steps", type=int, default=10, help="steps profiled with --profile_epoch (default 10)"
    )
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda when available)")
    p.add_argument(
        "--wandb_workspace", default=None, help="accepted for compatibility; logging goes to TensorBoard"
    )
    p.add_argument("--wandb_tags", nargs="*", default=[], help="accepted for compatibility; unused")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> int:
    """Train (unless --is_eval), then evaluate; errors propagate to `main`."""
    from pointavatar.config import load_conf
    from pointavatar.engine.distributed import env_rank, env_world_size, init_ranks
    from pointavatar.evaluate.runner import Evaluator, summary_line

    torch_threads = os.environ.get("POINTAVATAR_THREADS")
    if torch_threads:
        import torch

        torch.set_num_threads(int(torch_threads))
    if args.wandb_workspace:
        print("note: wandb is not used; scalars go to TensorBoard under <run>/train/tensorboard")

    if args.is_eval and args.profile_epoch is not None:
        raise PointAvatarError("--profile_epoch profiles training steps; it does nothing with --is_eval.")
    conf = load_conf(args.conf)
    device = args.device
    if env_world_size() > 1:
        # Started by torchrun with several ranks: rank 0 prints, writes and evaluates; the others
        # train silently (their errors still go to stderr) and leave after training.
        if env_rank() != 0:
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the life of the process
        if args.is_eval:
            if env_rank() != 0:
                return 0
            print("note: evaluation runs on rank 0 only; the other ranks have left")
    if not args.is_eval:
        from pointavatar.train.trainer import Trainer

        ranks = init_ranks(args.device)
        try:
            trainer = Trainer(
                conf,
                nepoch=args.nepoch,
                is_continue=args.is_continue,
                checkpoint=args.checkpoint,
                load_path=args.load_path,
                move_old_run=args.move_old_run,
                ranks=ranks,
                profile_epoch=args.profile_epoch,
                profile_steps=args.profile_steps,
            )
            trainer.run()
        finally:
            ranks.close()
        if not ranks.is_main:
            return 0
        device = ranks.device
        # After training, evaluate the checkpoint just written (spec §2.1). The original passed
        # --load_path on to the test runner, which then scored the run it had resumed from rather than
        # the one it had just trained; we score the new one.
        args.checkpoint = "latest"
        args.load_path = ""
    evaluator = Evaluator(
        conf,
        checkpoint=args.checkpoint,
        load_path=args.load_path,
        only_json=args.only_json,
        device=device,
    )
    results = evaluator.run()
    if results:
        print(summary_line(results))
    print(f"Outputs in {evaluator.exp.eval_dir}")
    return 0


def main(argv=None) -> int:
    """The `pointavatar` console script; returns the exit code (0, 1 on an error, 130 on Ctrl-C)."""
    return exit_code(run, parse_args(argv), "resume with --is_continue (the last checkpoint is kept)")


if __name__ == "__main__":
    sys.exit(main())
