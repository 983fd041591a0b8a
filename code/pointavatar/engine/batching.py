"""Batching shared by training and evaluation: the frames-per-batch rule and moving batches to a device."""

from __future__ import annotations

import torch


def batch_size_for(n_points: int, max_points_training: int, max_batch: int) -> int:
    """B = min(floor(budget / N), max_batch), at least 1 (spec §2.7)."""
    return max(1, min(max_points_training // max(n_points, 1), max_batch))


def move_to(batch, device):
    if torch.is_tensor(batch):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: move_to(v, device) for k, v in batch.items()}
    if isinstance(batch, list):
        return [move_to(v, device) for v in batch]
    return batch
