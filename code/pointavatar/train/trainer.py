"""The training loop of spec §2.5: epochs, checkpoints, plots, pruning, upsampling, resume.

The trainer knows the loop; the model knows the forward pass (pointavatar.model); the loss knows the
loss (pointavatar.train.losses). Defaults reproduce the released code; the quirk fixes of spec §10 are
the ``train.*`` keys documented in the README.

Several ranks (torchrun, engine/distributed.py): every rank runs this loop on its slice of each global
batch; the gradients are averaged after the backward, so all ranks apply the same updates. Rank 0 alone
writes the run folder (conf record, code backup, TensorBoard, checkpoints, plots) and prints; a single
process (``ranks`` left out) runs exactly the single-process loop.
"""

from __future__ import annotations

import shutil
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..config import Conf, dump_conf, save_conf
from ..engine import checkpoints as ckpt
from ..engine.batching import move_to
from ..engine.device import apply_matmul_precision, resolve_device
from ..engine.distributed import Ranks, ShardedBatches
from ..engine.experiment import Experiment, build_model
from ..engine.inputs import FrameInputs
from ..engine.plots import render_grids
from ..errors import PointAvatarError
from ..model.point_avatar import BUDGET_BELOW_LEAN, GEOMETRY_CHUNK, HINT_OVERRIDE, gpu_memory_gib
from .graphed_step import GraphedStep, forward_loss_backward
from .losses import Loss
from .profiling import StepProfiler, first_profiled_step
from .schedule import PointSchedule, make_optimizer, uses_fused_adam

# train.ground_truth_on_device "auto": at most this share of the GPU's memory for the training images.
# With it, the largest step of model.*_backward "auto" still fits: 37.3 GiB + 4.8 on a 48 GB card
# (47.5 GiB), 10.3 GiB + 2.4 on a 24 GB one (benchmarks/RESULTS.md, steps 6 and 8).
GROUND_TRUTH_DEVICE_SHARE = 0.10


def ground_truth_fits(device: torch.device, nbytes: int) -> bool:
    """train.ground_truth_on_device "auto": whether ``nbytes`` of training images and masks go on
    ``device`` (a CUDA device, at most GROUND_TRUTH_DEVICE_SHARE of its memory)."""
    return device.type == "cuda" and nbytes <= GROUND_TRUTH_DEVICE_SHARE * gpu_memory_gib(device) * 2**30


def _timed_iteration(iterable, seconds: list[float]):
    """The items of ``iterable``, adding the time each ``next`` takes to ``seconds[0]``."""
    iterator = iter(iterable)
    while True:
        start = time.perf_counter()
        try:
            item = next(iterator)
        except StopIteration:
            return
        seconds[0] += time.perf_counter() - start
        yield item


def backwards_line(model, device: torch.device) -> str:
    """The fast path's backward choices on ``device``, and why where "auto" chose them."""
    geometry, deformer = model.backwards(device)
    chunk = model.prior_chunk(device)
    prior = f"by chunks of {chunk} points" if chunk else "in one pass"
    line = f"Fast path: geometry backward {geometry}, deformer backward {deformer}, prior query {prior}"
    geometry_chunk = model.geometry_chunk(device)
    if geometry_chunk:
        line += f", geometry recomputed by chunks of {geometry_chunk} points"
    budget = model.memory_budget(device)
    if budget < 1.0:
        line += f", activation memory budget {budget:g}"
    if model.deformer_bf16 and deformer == "autograd":
        line += ", deformer products in bf16"
    elif model.deformer_bf16 and deformer == "fused":  # fused_bf16 says bf16 in its name
        line += ", deformer products in fp32 (model.deformer_bf16 applies to deformer backward autograd only)"
    if "auto" in (model.geometry_backward, model.deformer_backward) and device.type == "cuda":
        line += f" (auto: {model.auto_backwards(device)[1]})"
    hint = model.size_hint()
    if hint and device.type == "cuda" and model.compile_scope != "none":
        line += f"; compiled for {hint} points" + (
            "" if HINT_OVERRIDE else " (not on this torch: the first step's)"
        )
    return line


class Trainer:
    """Trains one PointAvatar for the conf, resuming from a checkpoint when asked."""

    def __init__(
        self,
        conf: Conf,
        nepoch: int | None = None,
        is_continue: bool = False,
        checkpoint: str = "latest",
        load_path: str = "",
        device: torch.device | str | None = None,
        move_old_run: bool = False,
        ranks: Ranks | None = None,
        profile_epoch: int | None = None,
        profile_steps: int = 10,
    ):
        """``ranks``: this process's place in a run on several processes (`init_ranks`); its device
        replaces ``device``. Default: a single process on ``device``. ``profile_epoch``: profile
        ``profile_steps`` steps of that epoch (``--profile_epoch``; train/profiling.py)."""
        self.conf = conf
        self.exp = Experiment(conf, load_path=load_path)
        self.ranks = ranks if ranks is not None else Ranks()
        self.device = self.ranks.device if ranks is not None else resolve_device(device)
        apply_matmul_precision(conf.model.tf32)
        self.nepoch = conf.train.nepoch if nepoch is None else nepoch
        if self.nepoch < 0:
            raise PointAvatarError(f"--nepoch {self.nepoch}: the last epoch must be >= 0.")
        tc = conf.train
        # Nothing is written before the run is known to start: every check and every load comes first.
        self.exp.check_writable()
        if self.ranks.distributed:
            # Rank 0 alone repairs an interrupted save and generates a missing synthetic subject; the
            # others read after it.
            if self.ranks.is_main:
                ckpt.Checkpoints(self.exp.load_dir).recover()
                self.exp.ensure_data()
            self.ranks.barrier()
        move_aside = self._check_fresh_start(is_continue, load_path, move_old_run)
        torch.manual_seed(tc.seed)

        self.train_set = self.exp.train_dataset()
        self.plot_set = self.exp.plot_dataset()
        print("Canonical expression:", fmt_vector(self.train_set.mean_expression))
        if self.train_set.var_expression is not None:
            print("Expression variance:", fmt_vector(self.train_set.var_expression))

        self.ground_truth = self._ground_truth_on_device()  # {} unless train.ground_truth_on_device
        self.model = build_model(conf, self.train_set, self.train_set.shape_params).to(self.device)
        self.loss = Loss(conf.loss, var_expression=self.train_set.var_expression).to(self.device)
        if self.model.uses_fast_path(self.device) and self.ranks.is_main:
            print(backwards_line(self.model, self.device))
        self.schedule = PointSchedule(conf, self.ranks)
        # train.cuda_graph: the step's forward, loss and backward replayed from a CUDA graph (CUDA only).
        self.graphed_step = (
            GraphedStep(self.model, self.loss) if tc.cuda_graph and self.device.type == "cuda" else None
        )
        self.optimizer = self._new_optimizer()
        # Bound to the first Adam, as in the original: after the first resize it no longer drives the
        # learning rate unless train.fix_lr_schedule is set (spec §10.1).
        self.scheduler = torch.optim.lr_scheduler.MultiStepLR(
            self.optimizer, list(tc.sched_milestones), gamma=tc.sched_factor
        )
        self.inputs = FrameInputs(
            self.train_set, conf.model.deformer_network.num_exp, tc.optimize_expression, tc.optimize_camera
        ).to(self.device)
        self.optimizer_cam = self.inputs.make_optimizer(tc.learning_rate_cam) if self.inputs.enabled else None

        self.start_epoch = 0
        self.skipped_steps = 0
        self.ckpt = ckpt.Checkpoints(self.exp.train_dir)
        if is_continue:
            self._resume(checkpoint, explicit_source=bool(load_path))
        if self.nepoch < self.start_epoch - 1:
            raise PointAvatarError(
                f"--nepoch {self.nepoch} is below the resumed checkpoint: it was written at epoch "
                f"{self.start_epoch}, i.e. after training epochs 0..{self.start_epoch - 1}. Pass --nepoch "
                f"{self.start_epoch} or more to train further (nothing was written)."
            )
        if profile_epoch is not None and not self.start_epoch <= profile_epoch <= self.nepoch:
            raise PointAvatarError(
                f"--profile_epoch {profile_epoch}: this run trains epochs {self.start_epoch}..{self.nepoch}; "
                "pick one of them (nothing was written)."
            )
        if profile_steps < 1:
            raise PointAvatarError(f"--profile_steps {profile_steps}: profile at least 1 step.")
        self.profile_epoch, self.profile_steps = profile_epoch, int(profile_steps)
        self.batch_size = self.schedule.epoch_values(self.start_epoch, self.model.pc.n_points).batch_size
        self._check_ranks_agree("the model, per-frame inputs and optimizer state at the start")

        self.writer = None
        if self.start_epoch > self.nepoch:
            return  # nothing to train (run() says so): nothing is written
        # Every rank has read what it needs before rank 0 writes (or moves the old run aside).
        self.ranks.barrier()
        if not self.ranks.is_main:
            return
        # The run starts: now the folders, the conf record, the code backup and the logger.
        if move_aside:
            print(f"The previous run was moved to {self.exp.move_run_aside()} (nothing was deleted).")
        self.exp.train_dir.mkdir(parents=True, exist_ok=True)
        self.exp.eval_dir.mkdir(parents=True, exist_ok=True)
        self._record_conf()
        if not (self.exp.train_dir / "recording").exists():
            self._backup_code()
        self.writer = self._tensorboard()

    def _check_fresh_start(self, is_continue: bool, load_path: str, move_old_run: bool) -> bool:
        """A run that would write over checkpoints it did not load stops here, unless asked to move them.

        Fresh start: the conf's train folder must hold no checkpoint. Resume from --load_path (another
        folder): the same, since the resumed run writes into the conf's train folder. Returns whether
        the old run folder is to be moved aside (``--move_old_run``) once the run is known to start.
        """
        writes_over = not is_continue or (
            load_path and Path(load_path).resolve() != self.exp.train_dir.resolve()
        )
        if not writes_over or not self.exp.has_checkpoints():
            return False
        if move_old_run:
            return True
        found = ckpt.Checkpoints(self.exp.train_dir).available()
        raise PointAvatarError(
            f"{self.exp.train_dir} already holds a run (checkpoints: {', '.join(found) or 'partial files'}). "
            "Nothing was written. To continue it, add --is_continue; to start over, add --move_old_run "
            f"(the old run is renamed to {self.exp.run_dir.name}.old-<date>-<time>, nothing is deleted), "
            "or change train.exps_folder, train.methodname or dataset.train.sub_dir."
        )

    def _record_conf(self) -> None:
        """Write runconf.conf; on resume, a conf that differs from the recorded one is kept beside it."""
        target = self.exp.train_dir / "runconf.conf"
        text = dump_conf(self.conf)
        if target.is_file():
            if target.read_text(encoding="utf-8") == text:
                return
            target = (
                self.exp.train_dir
                / f"runconf.resume-{self.start_epoch}-{time.strftime('%Y%m%d-%H%M%S')}.conf"
            )
            print(f"The conf differs from the recorded runconf.conf; this run's conf is kept in {target}")
        save_conf(self.conf, target)

    # ------------------------------------------------------------------------------------------ setup
    def _backup_code(self) -> None:
        """Copy the package's .py files into train/recording/ (spec §2.2)."""
        src = Path(__file__).resolve().parents[1]
        dst = self.exp.train_dir / "recording"
        for path in src.rglob("*.py"):
            target = dst / path.relative_to(src.parent)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)

    def _tensorboard(self):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is a dependency, but logging must never stop training
            print("tensorboard is not installed: scalars are printed only")
            return None
        return SummaryWriter(str(self.exp.train_dir / "tensorboard"))

    def _resume(self, checkpoint: str, explicit_source: bool) -> None:
        source = self.exp.load_dir
        store = ckpt.Checkpoints(source)
        if not store.exists(ckpt.MODEL, checkpoint):
            found = store.available()
            if not found and not explicit_source:
                print(f"--is_continue: nothing to resume in {source / 'checkpoints'}; starting a fresh run.")
                return
            raise PointAvatarError(
                f"--is_continue: {store.path(ckpt.MODEL, checkpoint)} does not exist. Checkpoints there: "
                f"{', '.join(found) or 'none'}." + (" Pass one of them with --checkpoint." if found else "")
            )
        payload = store.load(ckpt.MODEL, checkpoint)
        self.exp.load_model_payload(self.model, payload, store.path(ckpt.MODEL, checkpoint), strict=False)
        self.start_epoch = int(payload["epoch"])
        tc = self.conf.train
        if tc.prune_on_resume:
            self.schedule.load_state_dict(payload, self.model.pc.points)
        self.optimizer = self._new_optimizer()
        self.scheduler = torch.optim.lr_scheduler.MultiStepLR(
            self.optimizer, list(tc.sched_milestones), gamma=tc.sched_factor
        )
        # The learning rates stored below are those of the run's rank count: rescaled to this one's.
        lr_ratio = 1.0
        if store.exists(ckpt.SCHEDULER, checkpoint):
            scheduler_payload = store.load(ckpt.SCHEDULER, checkpoint)
            self.scheduler.load_state_dict(scheduler_payload["scheduler_state_dict"])
            lr_ratio = self.schedule.lr_factor / float(scheduler_payload.get("lr_rank_factor", 1.0))
        if lr_ratio != 1.0:
            self.scheduler.base_lrs = [lr * lr_ratio for lr in self.scheduler.base_lrs]
            self.scheduler._last_lr = [lr * lr_ratio for lr in self.scheduler.get_last_lr()]
        if tc.keep_optimizer_state and store.exists(ckpt.OPTIMIZER, checkpoint):
            # Only with the fix: the original saves the Adam state but never loads it (spec §10.2).
            try:
                self.optimizer.load_state_dict(store.load(ckpt.OPTIMIZER, checkpoint)["optimizer_state_dict"])
                if lr_ratio != 1.0:
                    for group in self.optimizer.param_groups:
                        group["lr"] *= lr_ratio
                        group["initial_lr"] = self.scheduler.base_lrs[0]
            except (ValueError, KeyError, RuntimeError) as exc:
                print(f"Adam state not restored ({exc}); starting with fresh moments.")
        if tc.fix_lr_schedule:
            # The resumed run continues at the scheduled (decayed) rate, as the stopped one was.
            self._apply_scheduled_lr()
        if self.inputs.enabled:
            try:
                self.inputs.load_state(store.load(ckpt.INPUTS, checkpoint))
                self.optimizer_cam.load_state_dict(
                    store.load(ckpt.OPTIMIZER_INPUTS, checkpoint)["optimizer_cam_state_dict"]
                )
            except (PointAvatarError, ValueError, KeyError, RuntimeError) as exc:
                # The original only prints such mismatches (spec §2.4 step 6).
                print(f"per-frame inputs not restored: {exc}")
        print(
            f"Resumed from {store.path(ckpt.MODEL, checkpoint)} at epoch {self.start_epoch} "
            f"with {self.model.pc.n_points} points, radius {self.model.pc.radius:.6f}"
        )

    # ----------------------------------------------------------------------------------- checkpoints
    def save_checkpoints(self, epoch: int, numbered: bool) -> None:
        """Write every family of this epoch; they become current together (see checkpoints.py)."""
        model_payload = {"radius": float(self.model.pc.radius), "model_state_dict": self.model.state_dict()}
        if self.conf.train.prune_on_resume:
            model_payload.update(self.schedule.state_dict())
        payloads = {
            ckpt.MODEL: model_payload,
            ckpt.OPTIMIZER: {"optimizer_state_dict": self.optimizer.state_dict()},
            ckpt.SCHEDULER: {"scheduler_state_dict": self.scheduler.state_dict()},
        }
        if self.schedule.lr_factor != 1.0:
            # The rates stored are scaled for this run's rank count; a resume on another count rescales.
            payloads[ckpt.SCHEDULER]["lr_rank_factor"] = self.schedule.lr_factor
        if self.inputs.enabled:
            payloads[ckpt.OPTIMIZER_INPUTS] = {"optimizer_cam_state_dict": self.optimizer_cam.state_dict()}
            payloads[ckpt.INPUTS] = self.inputs.state()
        self.ckpt.save_epoch(payloads, epoch, numbered)

    # ---------------------------------------------------------------------------------------- epochs
    def _loader(self) -> DataLoader:
        if self.ranks.distributed:
            # This rank's slices of the global batches (ShardedBatches: one permutation on all ranks).
            shards = ShardedBatches(
                len(self.train_set), self.batch_size, self.ranks.rank, self.ranks.world_size
            )
            batching = {"batch_sampler": shards}
        else:
            batching = {"batch_size": self.batch_size, "shuffle": True}
        return DataLoader(
            self.train_set,
            **batching,
            collate_fn=self.train_set.collate_fn,
            num_workers=self.conf.train.num_workers,
            # Workers live across epochs (the loader is rebuilt only when the batch size changes).
            persistent_workers=self.conf.train.num_workers > 0,
            pin_memory=self.device.type == "cuda",
        )

    def _apply_scheduled_lr(self) -> None:
        lr = self.scheduler.get_last_lr()[0]
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def run(self) -> None:
        tc = self.conf.train
        if self.start_epoch > self.nepoch:
            print(
                f"Nothing to train: the run is already trained through epoch {self.start_epoch - 1} "
                f"(--nepoch {self.nepoch}). Pass a larger --nepoch to train further."
            )
            self._close()
            return
        loader = self._loader()
        run_start = time.time()
        for epoch in range(self.start_epoch, self.nepoch + 1):
            # Every epoch draws from its own seed, so a resumed run repeats the random draws (shuffle,
            # eikonal samples, upsample jitter) of the run it continues.
            torch.manual_seed(epoch_seed(tc.seed, epoch))
            self._checkpoint_and_plot(epoch)
            self.ranks.sync_rng()  # the plots drew on rank 0 only

            change, self.optimizer = self.schedule.begin_epoch(
                epoch, self.start_epoch, self.model, self.optimizer
            )
            if change.resized and tc.fix_lr_schedule:
                self._apply_scheduled_lr()  # the schedule's new Adam starts at the base rate
            values = self.schedule.epoch_values(epoch, self.model.pc.n_points)
            # The batch follows the cloud size after upsampling only (spec §2.7).
            if change.upsampled and values.batch_size != self.batch_size:
                self.batch_size = values.batch_size
                loader = self._loader()

            self.train_epoch(epoch, loader, values.lbs_weight)
            self.schedule.finish_epoch()
            self.scheduler.step()
            if tc.fix_lr_schedule:
                self._apply_scheduled_lr()
            done = epoch - self.start_epoch + 1
            left = self.nepoch - epoch
            eta = (time.time() - run_start) / done * left
            print(f"  {done}/{done + left} epochs of this run done; about {fmt_duration(eta)} left")

        self._check_ranks_agree(f"the state saved at epoch {self.nepoch + 1}")
        if self.ranks.is_main:
            self.save_checkpoints(self.nepoch + 1, numbered=True)
        self.ranks.barrier()  # every rank returns with the final checkpoint on disk
        self._close()

    def _close(self) -> None:
        if self.writer is not None:
            self.writer.close()

    def _checkpoint_and_plot(self, epoch: int) -> None:
        """The start-of-epoch outputs (spec §2.5): checkpoints of the state so far, then the plots."""
        tc = self.conf.train
        numbered = epoch % tc.checkpoint_freq == 0 and epoch != self.start_epoch
        if epoch % tc.save_freq == 0 and (numbered or epoch != self.start_epoch or self.start_epoch == 0):
            self._check_ranks_agree(f"the state saved at epoch {epoch}")
            if self.ranks.is_main:
                self.save_checkpoints(epoch, numbered)
        if (
            (epoch % tc.plot_freq == 0 and epoch < 5) or epoch % (2 * tc.plot_freq) == 0
        ) and self.ranks.is_main:
            self.plot(epoch)

    def _check_ranks_agree(self, what: str) -> None:
        """On several ranks: stop unless every rank holds the same model, optimizer states, per-frame
        inputs and visibility (what rank 0 saves for all). No-op for a single process."""
        if not self.ranks.distributed:
            return
        tensors = list(self.model.state_dict().values())
        for opt in (self.optimizer, self.optimizer_cam):
            if opt is not None:
                for state in opt.state.values():
                    tensors += [v for v in state.values() if torch.is_tensor(v)]
        tensors += [p.detach() for p in self.inputs.parameters()]
        if self.schedule.visible is not None:
            tensors.append(self.schedule.visible)
        values = (self.model.pc.radius, self.start_epoch, self.batch_size, len(self.train_set))
        self.ranks.check_agreement(what, tensors, values)

    def train_epoch(self, epoch: int, loader: DataLoader, lbs_weight: float) -> None:
        tc = self.conf.train
        self.model.train()
        inputs_active = self.inputs.enabled and epoch >= tc.input_optimization_start
        self.inputs.set_trainable(inputs_active)
        sums: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros((), device=self.device))
        count = 0
        skipped = 0
        steps = 0
        graph_counts = self._graph_counts()
        start = time.time()
        data_wait = [0.0]  # seconds this epoch spent waiting for the DataLoader's next batch
        bar = tqdm(
            _timed_iteration(loader, data_wait),
            total=len(loader),
            desc=f"epoch {epoch}/{self.nepoch}",
            leave=False,
            dynamic_ncols=True,
            disable=not self.ranks.is_main,
        )
        profiler, first_profiled = self._profiler(epoch, len(loader))
        for data_index, (indices, model_input, ground_truth) in enumerate(bar):
            if profiler is not None and data_index == first_profiled:
                profiler.start()
            model_input = move_to(model_input, self.device)
            ground_truth = self.batch_ground_truth(indices, ground_truth)
            if self.inputs.enabled:
                model_input = self.inputs.apply(model_input)
            self.optimizer.zero_grad(set_to_none=True)
            if inputs_active:
                self.optimizer_cam.zero_grad(set_to_none=True)
            # With a CUDA graph the last step's outputs belong to the graph's memory: let go of them
            # before a new configuration releases that graph.
            losses = fragment_idx = fragment_weights = None
            try:
                losses, fragment_idx, fragment_weights = self._step(model_input, ground_truth, lbs_weight)
            except torch.cuda.OutOfMemoryError as exc:
                raise PointAvatarError(self._out_of_memory_message(epoch)) from exc
            self.schedule.observe(
                fragment_idx, fragment_weights, self.model.pc.n_points, self.model.render_backend
            )
            bad_ranks: list[int] = []
            if self.ranks.distributed:
                # Every rank ends with the same averaged gradients and the same two flags.
                loss_ok, grads_ok, bad_ranks = self.ranks.reduce_gradients(
                    [p for p in self.model.parameters() if p.requires_grad],
                    list(self.inputs.parameters()) if inputs_active else [],
                    losses["loss"],
                )
            else:
                # One device sync per step for both checks (the rasterizer synchronises anyway).
                loss_ok, grads_ok = finite_flags(losses["loss"], self._trainable_parameters(inputs_active))
            if not loss_ok:
                self._stop_non_finite_loss(epoch, data_index, losses, bad_ranks)
            steps += 1
            if not grads_ok:
                # No update from this batch: a non-finite gradient would poison the weights and Adam's
                # moments for good. Counted and reported; see the README.
                skipped += 1
                self.skipped_steps += 1
                frames = f"frames {batch_frames(model_input)}"
                if self.ranks.distributed:
                    frames = f"on one or more of the {self.ranks.world_size} ranks; rank 0's {frames}"
                tqdm.write(
                    f"warning: epoch {epoch}, step {data_index}: non-finite gradients; step skipped ({frames})"
                )
                if profiler is not None:
                    profiler.step_done()
                continue
            self.optimizer.step()
            if inputs_active:
                self.optimizer_cam.step()

            for k, v in losses.items():
                sums[k] += v.detach()
            count += 1
            if data_index % tc.log_freq == 0:
                # .item() only here, so the GPU is not synchronised at every step. On several ranks
                # the logged values are those of the global batch: means over the ranks, and the
                # visibility of all ranks.
                keys = list(sums)
                totals = self.ranks.mean(torch.stack([sums[k] for k in keys])).tolist()
                means = {k: v / count for k, v in zip(keys, totals, strict=True)}
                means["visible_percentage"] = float(self.ranks.any(self.schedule.visible).float().mean())
                self._log(epoch, data_index, means, lbs_weight)
                bar.set_postfix(loss=f"{means['loss']:.4f}", rgb=f"{means['rgb_loss']:.4f}")
                sums.clear()
                count = 0
            if profiler is not None:
                profiler.step_done()
        if profiler is not None:
            profiler.stop()  # an epoch with fewer steps than asked
        bar.close()
        elapsed = time.time() - start
        batch = f"batch {self.batch_size}"
        if self.ranks.distributed:
            batch += f" per rank x {self.ranks.world_size} ranks"
        print(
            f"epoch {epoch}/{self.nepoch} done in {elapsed:.1f} s ({self.model.pc.n_points} points, "
            f"radius {self.model.pc.radius:.5f}, {batch}; data wait {data_wait[0]:.2f} s)"
            + (f"; {skipped} of {steps} steps skipped (non-finite gradients)" if skipped else "")
            + self._graph_summary(graph_counts)
        )
        if self.writer is not None:
            self.writer.add_scalar("train/timing_epoch_ms", elapsed * 1000, epoch)
            self.writer.add_scalar("train/skipped_steps", skipped, epoch)
        if steps and skipped * 2 > steps:
            raise PointAvatarError(
                f"epoch {epoch}: {skipped} of {steps} steps had non-finite gradients and were skipped, so "
                "training is not progressing. The weights were not updated by those steps. Check the "
                "frames named above (expression, pose and camera values in flame_params.json), and the "
                f"learning rate. Resume from {self.ckpt.path(ckpt.MODEL, 'latest')} with --is_continue."
            )

    def _profiler(self, epoch: int, steps_in_epoch: int) -> tuple[StepProfiler | None, int]:
        """``--profile_epoch``: the profiler for this epoch (rank 0 only) and its first step, or None."""
        if epoch != self.profile_epoch or not self.ranks.is_main:
            return None, 0
        path = self.exp.train_dir / f"profile_epoch{epoch}.txt"
        steps = min(self.profile_steps, steps_in_epoch)
        return StepProfiler(epoch, steps, self.device, path), first_profiled_step(steps_in_epoch, steps)

    def _step(self, model_input: dict, ground_truth: dict, lbs_weight: float):
        """Forward, loss and backward of one batch: replayed from a CUDA graph with train.cuda_graph on
        CUDA, else run eagerly. -> (losses, fragment_idx, fragment_weights)."""
        if self.graphed_step is not None:
            return self.graphed_step(model_input, ground_truth, lbs_weight)
        return forward_loss_backward(self.model, self.loss, model_input, ground_truth, lbs_weight)

    def _new_optimizer(self) -> torch.optim.Adam:
        """The model's Adam at the base rate: fused on CUDA with the fast path (``uses_fused_adam``)."""
        return make_optimizer(
            self.model, self.schedule.learning_rate, fused=uses_fused_adam(self.model, self.device)
        )

    def batch_ground_truth(self, indices: torch.Tensor, ground_truth: dict) -> dict[str, torch.Tensor]:
        """A batch's images and masks on the training device: gathered by the frames' dataset
        ``indices`` from the device copy (train.ground_truth_on_device), else the DataLoader's moved."""
        if self.ground_truth:
            rows = indices.to(self.device, non_blocking=True)
            return {k: v.index_select(0, rows) for k, v in self.ground_truth.items()}
        return move_to(ground_truth, self.device)

    def _ground_truth_on_device(self) -> dict[str, torch.Tensor]:
        """train.ground_truth_on_device: the training images and masks stacked on the training device
        (the dataset's items then carry none), or {} for the DataLoader path."""
        mode, ds = self.conf.train.ground_truth_on_device, self.train_set
        if mode == "off":
            return {}
        if "rgb" not in ds.data:
            if mode == "on":
                raise PointAvatarError(
                    'train.ground_truth_on_device = "on" needs the training images loaded at start: set '
                    'dataset.train.load_images = true, or train.ground_truth_on_device = "off".'
                )
            return {}
        nbytes = sum(t.numel() * t.element_size() for key in ("rgb", "object_mask") for t in ds.data[key])
        if mode == "auto" and not ground_truth_fits(self.device, nbytes):
            return {}
        store = {key: torch.stack(ds.data[key]).to(self.device) for key in ("rgb", "object_mask")}
        ds.ground_truth_elsewhere = True
        for key in ("rgb", "object_mask"):
            del ds.data[key]  # the host copies (the DataLoader's workers no longer read them)
        if self.ranks.is_main:
            where = f"{self.device}: {nbytes / 2**30:.2f} GiB"
            print(f"Training images and masks on {where} (train.ground_truth_on_device)")
        return store

    def _out_of_memory_message(self, epoch: int) -> str:
        """What to change when a training step runs out of GPU memory (the keys not yet at their leanest)."""
        gpu = ""
        if self.device.type == "cuda":
            gpu = f" on {torch.cuda.get_device_name(self.device)} ({gpu_memory_gib(self.device):.1f} GiB)"
        fixes = []
        if self.model.uses_fast_path(self.device):
            backwards = self.model.backwards(self.device)
            if backwards == ("autograd", "autograd"):
                # "auto"'s leanest tier, unless already there
                budget = self.model.memory_budget(self.device)
                if budget > BUDGET_BELOW_LEAN or self.model.geometry_chunk(self.device) == 0:
                    fixes.append(
                        f"model.activation_memory_budget = {BUDGET_BELOW_LEAN:g} with "
                        f"model.geometry_recompute_chunk = {GEOMETRY_CHUNK} (5.5 GiB at 409,600 points on an H200)"
                    )
            elif backwards != ("fused_recompute", "fused_bf16"):
                fixes.append(
                    'model.geometry_backward = "fused_recompute" with model.deformer_backward = "fused_bf16" '
                    "(10.4 GiB at 409,600 points on an H200)"
                )
            if self.model.recompute_chunk == 0:
                fixes.append("model.recompute_chunk = 65536 (the per-point work recomputed by chunks)")
        elif self.device.type == "cuda":
            fixes.append(
                'model.implementation = "auto" (the fast engine, and with it the keys above that save memory)'
            )
        fixes.append(
            f"a smaller train.max_points_training ({self.conf.train.max_points_training}: fewer frames a step) "
            f"or model.point_cloud.max_points ({self.conf.model.point_cloud.max_points})"
        )
        return (
            f"the GPU ran out of memory in a training step of epoch {epoch} ({self.model.pc.n_points} points, "
            f"batch {self.batch_size}){gpu}. Set in the conf: " + "; or ".join(fixes) + ". Then resume "
            "with --is_continue: the run goes on from its last checkpoint."
        )

    def _graph_counts(self) -> tuple[float, ...]:
        """(eager steps, captures, reruns, seconds in eager steps, seconds in captures) so far."""
        g = self.graphed_step
        if g is None:
            return (0, 0, 0, 0.0, 0.0)
        return (g.eager_steps, g.captures, g.overflows, g.eager_seconds, g.capture_seconds)

    def _graph_summary(self, before: tuple[float, ...]) -> str:
        """The epoch's CUDA-graph bookkeeping for its summary line ('' without train.cuda_graph)."""
        if self.graphed_step is None:
            return ""
        eager, captures, overflows, eager_s, capture_s = (
            a - b for a, b in zip(self._graph_counts(), before, strict=True)
        )
        text = f"; CUDA graph: {captures} captured ({capture_s:.2f} s), {eager} eager steps ({eager_s:.2f} s)"
        return text + (f", {overflows} rerun (rasterizer budget)" if overflows else "")

    def _trainable_parameters(self, inputs_active: bool) -> list[torch.Tensor]:
        params = [p for p in self.model.parameters() if p.requires_grad]
        if inputs_active:
            params += list(self.inputs.parameters())
        return params

    def _stop_non_finite_loss(
        self, epoch: int, data_index: int, losses: dict, bad_ranks: list[int] | None = None
    ) -> None:
        """Stop before a NaN or infinite loss reaches the weights. The last checkpoint stays the one to
        resume from. On several ranks every rank stops; ``bad_ranks``: those whose loss is not finite."""
        bad = [k for k, v in losses.items() if not bool(torch.isfinite(v))]
        latest = self.ckpt.path(ckpt.MODEL, "latest")
        where = f"terms: {', '.join(bad)}"
        if self.ranks.distributed:
            if bad:
                where = f"on rank {self.ranks.rank}, " + where
            else:
                where = f"on rank(s) {', '.join(map(str, bad_ranks or []))}; their messages name the terms"
        raise PointAvatarError(
            f"The training loss is not finite at epoch {epoch}, step {data_index} ({where}). "
            "Nothing was updated with it. Usual causes: a learning rate too high for the schedule, a "
            "loss weight of the wrong scale, or NaN/inf in the dataset's expression, pose or camera "
            f"values. The last checkpoint is {latest} (resume with --is_continue after fixing the cause)."
        )

    def _log(self, epoch: int, data_index: int, means: dict, lbs_weight: float) -> None:
        text = ", ".join(f"{k} = {v:.6f}" for k, v in means.items())
        seen = data_index * self.batch_size * self.ranks.world_size  # frames of the epoch before this step
        tqdm.write(f"[{epoch}/{self.nepoch}] {seen}/{len(self.train_set)}: {text}")
        if self.writer is None:
            return
        step = epoch * len(self.train_set) + seen
        for k, v in means.items():
            self.writer.add_scalar(f"train/{k}", v, step)
        self.writer.add_scalar("train/num_points", self.model.pc.n_points, step)
        self.writer.add_scalar("train/radius", self.model.pc.radius, step)
        self.writer.add_scalar("train/lr", self.optimizer.param_groups[0]["lr"], step)
        self.writer.add_scalar("train/lbs_weight", lbs_weight, step)

    # ------------------------------------------------------------------------------------------ plots
    def plot(self, epoch: int) -> None:
        """Render the plot split with its JSON inputs (no tracking) into grid images (spec §2.5 step 3)."""
        self.model.eval()
        start = time.time()
        n = render_grids(self.model, self.plot_set, self.exp.eval_dir, epoch, self.batch_size, self.device)
        if n:
            print(f"Plot time per image: {(time.time() - start) / n:.3f} s")
        self.model.train()


def fmt_vector(t: torch.Tensor, n: int = 8) -> str:
    """The first n entries of a [1, D] tensor on one line."""
    values = ", ".join(f"{v:.3f}" for v in t.reshape(-1)[:n].tolist())
    return f"[{values}{', ...' if t.numel() > n else ''}] ({t.numel()} values)"


def epoch_seed(seed: int, epoch: int) -> int:
    """The torch seed of one epoch: distinct per (seed, epoch), the same for a fresh and a resumed run."""
    return seed * 1_000_003 + epoch


def finite_flags(loss: torch.Tensor, params: list[torch.Tensor]) -> tuple[bool, bool]:
    """(loss finite, every gradient of ``params`` finite), with a single host sync.

    A gradient's norm is non-finite exactly when one of its entries is (or when it overflows float32,
    which is no usable update either). Sparse gradients (per-frame embeddings) are checked on their
    values.
    """
    grads = [p.grad for p in params if p.grad is not None]
    grads = [g.coalesce().values() if g.is_sparse else g for g in grads]
    flags = [torch.isfinite(loss.detach()).reshape(1)]
    if grads:
        norms = torch._foreach_norm(grads)
        flags.append(torch.isfinite(torch.stack(norms).sum()).reshape(1))
    values = torch.cat(flags).tolist()
    return bool(values[0]), all(values[1:])


def batch_frames(model_input: dict) -> str:
    """'<video>/<frame>' of every frame of a collated batch, for messages."""
    names = [int(v) for v in model_input["img_name"].reshape(-1).tolist()]
    return ", ".join(f"{d}/{n}" for d, n in zip(model_input["sub_dir"], names, strict=False))


def fmt_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
