"""Training on several processes (GPUs, hosts) with torch.distributed, started by torchrun.

One process per GPU: ``torchrun --nproc_per_node K scripts/exp_runner.py --conf ...`` starts K
processes ("ranks") that meet through torchrun's environment (``env://``: RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT). A process started without torchrun (or with one rank) is a
single process and takes none of the paths below: every method of :class:`Ranks` is then a no-op and
training is exactly the single-process code.

How a step is shared (README "Training on several GPUs"):

- frames: :class:`ShardedBatches` draws one permutation per epoch, the same on every rank, cuts it into
  global batches of K x B frames and gives rank r the r-th slice of B frames of each (B is the conf's
  batch, per rank);
- every rank holds the whole model, point cloud, optimizer and per-frame input tables, and applies the
  same update: :meth:`Ranks.reduce_gradients` averages the gradients with one ``all_reduce`` of one
  flat buffer after the backward (not DistributedDataParallel: see that method);
- random draws: every rank seeds its generators as a single process does, and after the work only
  rank 0 does (plots) takes rank 0's generator states (:meth:`Ranks.sync_rng`), so shuffles, eikonal
  samples and upsample jitter are those of a single process with the global batch;
- agreement: :meth:`Ranks.check_agreement` compares a digest of the state across ranks (at the start,
  after every resize of the point cloud, before every checkpoint) and stops the run on every rank
  with a message if they differ.

Rank 0 alone writes (checkpoints, TensorBoard, plots, evaluation); the others wait for it at the next
collective.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Iterable, Iterator, Sequence

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from ..errors import PointAvatarError
from .device import resolve_device

# torchrun's environment (torch.distributed.run): global rank, number of ranks, rank on this host.
ENV_RANK = "RANK"
ENV_WORLD_SIZE = "WORLD_SIZE"
ENV_LOCAL_RANK = "LOCAL_RANK"


def env_world_size() -> int:
    """Number of ranks torchrun started (1 without torchrun)."""
    return int(os.environ.get(ENV_WORLD_SIZE, "1") or 1)


def env_rank() -> int:
    """This process's global rank under torchrun (0 without torchrun)."""
    return int(os.environ.get(ENV_RANK, "0") or 0)


class RanksDisagreeError(PointAvatarError):
    """The ranks of one run hold different states where they must hold the same one."""


class Ranks:
    """This process's place among the ranks of one run (rank 0 of 1 for a single process).

    ``device`` is where this rank trains: ``cuda:LOCAL_RANK`` on GPUs, the CPU otherwise. Collective
    methods must be called by every rank in the same order (they are, since all ranks run the same
    loop); with one rank they do nothing and cost nothing.
    """

    def __init__(self, rank: int = 0, world_size: int = 1, local_rank: int = 0, device=None):
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.local_rank = int(local_rank)
        self.device = torch.device("cpu") if device is None else torch.device(device)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes files and prints."""
        return self.rank == 0

    def __repr__(self) -> str:
        return f"Ranks(rank={self.rank}, world_size={self.world_size}, device={self.device})"

    # ------------------------------------------------------------------------------ process group
    def close(self) -> None:
        """Leave the process group (idempotent; no collective, so it is safe after an error)."""
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()

    def barrier(self) -> None:
        if not self.distributed:
            return
        if self.device.type == "cuda":
            dist.barrier(device_ids=[self.device.index])
        else:
            dist.barrier()

    def _on_device(self, t: torch.Tensor) -> torch.Tensor:
        """NCCL reduces CUDA tensors only; gloo takes CPU tensors (and CUDA ones through a copy)."""
        return t.to(self.device)

    # ---------------------------------------------------------------------------------- gradients
    def reduce_gradients(
        self, params: Sequence[torch.Tensor], tables: Sequence[torch.Tensor], loss: torch.Tensor
    ) -> tuple[bool, bool, list[int]]:
        """Average the gradients over the ranks in place; returns (loss finite on every rank, every
        gradient finite on every rank, the ranks whose loss is not finite).

        ``params``: dense parameters (networks, points); ``tables``: the per-frame embedding weights
        [F, D] with sparse gradients (only the rows of this rank's frames). After the call every rank
        holds the same gradients: the dense ones averaged; the tables' as sparse gradients of the rows
        any rank touched, averaged the same way, so SparseAdam updates exactly the rows (and moments)
        that a single process with the global batch would. A gradient that is None on every rank stays
        None (Adam skips it, as a single process would).

        One ``all_reduce`` (sum) of one flat buffer [dense grads | presence flags | densified table
        grads | touched rows | non-finite flags], then a division by K: with equal per-rank batches
        and mean losses, the average of the per-rank gradients is the gradient of the global batch.
        Not DistributedDataParallel: the point tensor is replaced by a tensor of another size at every
        prune and upsample (DDP's buckets are fixed at wrapping), the embeddings' gradients are sparse
        (NCCL reduces dense tensors only), and the reference forward differentiates through
        ``autograd.grad``; the gradients are a few MB, so overlapping their reduction with the
        backward (what DDP adds) would save well under a millisecond a step.

        The non-finite flags are computed per rank before the reduction and summed with it, so the
        decision to skip a step is the same on every rank by construction (sums of 0/1 flags are
        exact in any order).
        """
        k = self.world_size
        dtype = params[0].dtype if params else torch.float32
        device = self.device
        pieces: list[torch.Tensor] = []
        local: list[torch.Tensor] = []
        present = []
        for p in params:
            g = p.grad
            present.append(g is not None)
            if g is None:
                pieces.append(torch.zeros(p.numel(), dtype=dtype, device=device))
            else:
                local.append(g)
                pieces.append(g.detach().reshape(-1).to(dtype))
        pieces.append(torch.tensor(present, dtype=dtype, device=device))
        for table in tables:
            dense = torch.zeros(table.shape, dtype=dtype, device=device)
            touched = torch.zeros(table.shape[0], dtype=dtype, device=device)
            g = table.grad
            if g is not None:
                g = g.detach().coalesce() if g.is_sparse else g.detach().to_sparse()
                rows = g.indices()[0]
                dense[rows] = g.values().to(dtype)
                touched[rows] = 1.0
                local.append(g.values())
            pieces += [dense.reshape(-1), touched]
        if local:
            grads_bad = ~torch.isfinite(torch.stack(torch._foreach_norm(local)).sum())
        else:
            grads_bad = torch.zeros((), dtype=torch.bool, device=device)
        loss_bad = torch.zeros(k, dtype=dtype, device=device)
        loss_bad[self.rank] = (~torch.isfinite(loss.detach())).to(dtype)
        pieces += [grads_bad.to(dtype).reshape(1), loss_bad]
        buffer = torch.cat(pieces)
        dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
        buffer.div_(k)

        offset = 0
        views = []
        for p in params:
            views.append(buffer[offset : offset + p.numel()])
            offset += p.numel()
        counts = buffer[offset : offset + len(params)]
        offset += len(params)
        flags = buffer[-(k + 1) :].tolist()  # the step's one host sync
        for p, view, used in zip(params, views, counts.tolist(), strict=True):
            p.grad = view.view_as(p).to(p.dtype) if used > 0 else None
        for table in tables:
            n, size = table.shape[0], table.numel()
            dense = buffer[offset : offset + size].view(table.shape)
            touched = buffer[offset + size : offset + size + n]
            offset += size + n
            rows = torch.nonzero(touched > 0).squeeze(1)
            if rows.numel() == 0:
                table.grad = None
                continue
            table.grad = torch.sparse_coo_tensor(
                rows.unsqueeze(0), dense[rows].to(table.dtype), table.shape, check_invariants=False
            ).coalesce()  # rows: sorted and unique, from nonzero
        bad_ranks = [r for r in range(k) if flags[1 + r] > 0]
        return not bad_ranks, flags[0] == 0, bad_ranks

    # ------------------------------------------------------------------------------ other reductions
    def any(self, mask: torch.Tensor) -> torch.Tensor:
        """Element-wise OR of a bool tensor over the ranks (a new tensor; ``mask`` on one rank)."""
        if not self.distributed:
            return mask
        flags = self._on_device(mask.to(torch.uint8))
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        return flags.to(device=mask.device, dtype=torch.bool)

    def mean(self, values: torch.Tensor) -> torch.Tensor:
        """Element-wise mean of a float tensor over the ranks (for logged losses)."""
        if not self.distributed:
            return values
        out = self._on_device(values.detach().clone())
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return (out / self.world_size).to(values.device)

    # ------------------------------------------------------------------------------------- random
    def sync_rng(self) -> None:
        """Every rank takes rank 0's CPU generator state (and that of its CUDA device, on GPUs).

        Called after the work that rank 0 does alone (the plots draw eikonal samples), so the draws
        that follow (upsample jitter, the epoch's permutation, eikonal samples) are the same on every
        rank and are those of a single process.
        """
        if not self.distributed:
            return
        state = self._on_device(torch.get_rng_state())
        dist.broadcast(state, src=0)
        torch.set_rng_state(state.cpu())
        if self.device.type == "cuda":
            cuda_state = self._on_device(torch.cuda.get_rng_state(self.device))
            dist.broadcast(cuda_state, src=0)
            torch.cuda.set_rng_state(cuda_state.cpu(), self.device)

    # ---------------------------------------------------------------------------------- agreement
    def check_agreement(self, what: str, tensors: Iterable[torch.Tensor], values: Sequence = ()) -> None:
        """Stop every rank with a RanksDisagreeError unless all ranks hold bit-identical ``tensors``
        (values, shapes, dtypes) and equal ``values`` (plain numbers and strings).

        One ``all_gather`` of a 64-bit digest (SHA-256 of the bytes) per rank. ``what`` names the state
        in the message (e.g. "the point cloud after pruning at epoch 10").
        """
        if not self.distributed:
            return
        digest = state_digest(tensors, values)
        mine = self._on_device(torch.tensor([digest], dtype=torch.int64))
        gathered = [torch.zeros_like(mine) for _ in range(self.world_size)]
        dist.all_gather(gathered, mine)
        found = [int(t.item()) for t in gathered]
        if len(set(found)) == 1:
            return
        groups: dict[int, list[int]] = {}
        for rank, d in enumerate(found):
            groups.setdefault(d, []).append(rank)
        listed = "; ".join(f"ranks {', '.join(map(str, r))}: {d & 0xFFFFFFFF:08x}" for d, r in groups.items())
        raise RanksDisagreeError(
            f"the {self.world_size} ranks hold different versions of {what} ({listed}), where every rank "
            "must hold the same. Every rank must run the same code with the same conf, dataset and (on "
            "resume) checkpoint files: on several hosts, the dataset and the run folder must be the same "
            "on each (a shared file system). If they are, this is a bug: please report it with this "
            "message. Training stopped on every rank; the checkpoints on disk are those of before."
        )


def state_digest(tensors: Iterable[torch.Tensor], values: Sequence = ()) -> int:
    """A signed 64-bit digest of tensors' bytes, shapes and dtypes and of plain values."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach()
        if t.is_sparse:
            t = t.coalesce()
            parts = [t.indices(), t.values()]
        else:
            parts = [t]
        for part in parts:
            h.update(f"{tuple(part.shape)}:{part.dtype};".encode())
            h.update(part.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    h.update(repr(tuple(values)).encode())
    return int.from_bytes(h.digest()[:8], "little", signed=True)


def init_ranks(device: str | None = None) -> Ranks:
    """This process's :class:`Ranks`: a single process, or one of torchrun's ranks.

    Without torchrun (or with WORLD_SIZE 1) the device is ``--device`` as for any run. Under torchrun
    with several ranks, rank r of this host trains on ``cuda:LOCAL_RANK`` (NCCL) when CUDA is there
    and ``--device`` is not ``cpu``, else on the CPU (gloo); the process group is joined here
    (``env://``). Raises a PointAvatarError for a ``--device`` that cannot mean one GPU per rank.
    """
    world_size = env_world_size()
    if world_size <= 1:
        return Ranks(device=resolve_device(device))
    rank, local_rank = env_rank(), int(os.environ.get(ENV_LOCAL_RANK, "0") or 0)
    chosen = rank_device(device, local_rank)
    backend = "nccl" if chosen.type == "cuda" else "gloo"
    if chosen.type == "cuda":
        torch.cuda.set_device(chosen)
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, init_method="env://")
    return Ranks(rank=rank, world_size=world_size, local_rank=local_rank, device=chosen)


def rank_device(device: str | None, local_rank: int) -> torch.device:
    """The device of the rank with ``local_rank`` on its host, from the --device flag (None: a GPU
    when CUDA is available, else the CPU; ``cpu``; ``cuda``: one GPU per rank, ``cuda:LOCAL_RANK``)."""
    if device is not None:
        if str(device).startswith("cuda:"):
            raise PointAvatarError(
                f"--device {device}: under torchrun each rank trains on cuda:LOCAL_RANK (its rank on the "
                "host). Pass --device cuda (or nothing), and choose the GPUs with CUDA_VISIBLE_DEVICES."
            )
        if resolve_device(device).type == "cpu":
            return torch.device("cpu")
    elif not torch.cuda.is_available():
        return torch.device("cpu")
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise PointAvatarError(
            f"torchrun started local rank {local_rank} on a host with {count} visible GPU(s): pass "
            f"--nproc_per_node {count} or fewer (one rank per GPU), or --device cpu."
        )
    return torch.device("cuda", local_rank)


class ShardedBatches(Sampler[list[int]]):
    """Rank ``rank``'s batches of an epoch: slices of the global batches of one shared permutation.

    Each epoch draws a permutation of the ``n`` frames exactly as torch's RandomSampler does (one int64
    from the global CPU generator seeds a private one), so every rank, whose global generator is in the
    same state, draws the same permutation, and with one rank the batches are DataLoader(shuffle=True,
    batch_size=B)'s. When K does not divide n, the permutation is extended by its first frames to a
    multiple of K (as DistributedSampler does), so that every rank takes the same number of steps with
    batches of the same size. Then global batch s is frames [s K B, (s+1) K B) of it and rank r takes
    the r-th of its K equal slices: with K ranks of batch B a step sees the frames that a single
    process with batch K B sees.
    """

    def __init__(self, n: int, batch_size: int, rank: int = 0, world_size: int = 1):
        if n < 1 or batch_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"ShardedBatches: n={n}, batch_size={batch_size}, rank={rank}/{world_size}")
        self.n, self.batch_size, self.rank, self.world_size = n, batch_size, rank, world_size

    def _padded(self) -> int:
        return math.ceil(self.n / self.world_size) * self.world_size

    def __len__(self) -> int:
        return math.ceil(self._padded() / (self.world_size * self.batch_size))

    def __iter__(self) -> Iterator[list[int]]:
        seed = int(torch.empty((), dtype=torch.int64).random_().item())
        generator = torch.Generator()
        generator.manual_seed(seed)
        order = torch.randperm(self.n, generator=generator).tolist()
        padded = self._padded()
        while len(order) < padded:
            order += order[: padded - len(order)]
        step = self.world_size * self.batch_size
        for start in range(0, padded, step):
            chunk = order[start : start + step]
            share = len(chunk) // self.world_size
            yield chunk[self.rank * share : (self.rank + 1) * share]
