"""Normalization layers as the reference builds them (``get_norm_layer``)."""

from __future__ import annotations

from torch import nn

# "sync_batch" builds the same BatchNorm2d as "batch" (same keys, checkpoints interchange); the trainer turns it into
# SyncBatchNorm in a multi-process run (fastp2p.distributed.sync_batch_norm).
NORMS = ("batch", "instance", "none", "sync_batch")


def uses_bias(norm: str) -> bool:
    """Conv bias where the reference puts it: with instance norm (no affine, so the bias is not redundant), not with
    batch norm (its shift makes a bias redundant). With no norm at all the convs keep their bias, as the fastp2p spec
    asks; the reference drops it there, and ``fastp2p.models.keys`` fills those biases with zeros when loading."""
    check_norm(norm)
    return norm not in ("batch", "sync_batch")


def check_norm(norm: str) -> None:
    if norm not in NORMS:
        raise ValueError(f"unknown --norm {norm!r}; choose one of {', '.join(NORMS)}")


def make_norm(norm: str, channels: int) -> nn.Module:
    check_norm(norm)
    if norm in ("batch", "sync_batch"):
        return nn.BatchNorm2d(channels, affine=True, track_running_stats=True)
    if norm == "instance":
        return nn.InstanceNorm2d(channels, affine=False, track_running_stats=False)
    return nn.Identity()
