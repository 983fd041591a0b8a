"""What `pointavatar-render` and `pointavatar-viewer` share: the flags that pick a trained run and its
device, and loading that run's model."""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import torch

from pointavatar.config import Conf, load_conf
from pointavatar.engine import checkpoints as ckpt
from pointavatar.engine.device import apply_matmul_precision, resolve_device
from pointavatar.engine.experiment import Experiment, TrainedModel


def add_run_arguments(p: argparse.ArgumentParser, verb: str) -> None:
    """--conf, --checkpoint, --load_path and --device; ``verb`` says what the command does with the run."""
    p.add_argument(
        "--conf", required=True, help="the conf the avatar was trained with, e.g. ./confs/subject1.conf"
    )
    p.add_argument(
        "--checkpoint", default="latest", help=f"checkpoint to {verb}: latest (default) or an epoch number"
    )
    p.add_argument("--load_path", default="", help="another train/ directory to load checkpoints from")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda or cuda:N")


@dataclass
class TrainedRun:
    conf: Conf
    exp: Experiment
    device: torch.device
    loaded: TrainedModel


def load_trained_run(args: argparse.Namespace, command: str) -> TrainedRun:
    """The run the flags of `add_run_arguments` pick, its model loaded on their device (errors name
    ``command``). Nothing is written: a missing synthetic subject is an error, not generated."""
    conf = load_conf(args.conf)
    device = resolve_device(None if args.device == "auto" else args.device)
    apply_matmul_precision(conf.model.tf32)
    exp = Experiment(conf, load_path=args.load_path, generate=False)
    loaded = exp.load_trained_model(ckpt.Checkpoints(exp.load_dir), args.checkpoint, device, flag=command)
    return TrainedRun(conf, exp, device, loaded)
