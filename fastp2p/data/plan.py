"""What every loader backend shares: the epoch's order and shard (the torch loader's ``EpochSampler``), batch counts,
the bad-file substitution rule and the reference transform as numbers (see backends.py for the contract)."""

from __future__ import annotations

import math

from ..errors import UserError
from .datasets import AlignedDataset, PairDataset, TwoFolderDataset
from .loader import EpochSampler


def file_backed(dataset: PairDataset) -> bool:
    """Whether the dataset reads image files (aligned A|B or two folders), which the DALI reader needs."""
    return isinstance(dataset, (AlignedDataset, TwoFolderDataset))


def epoch_slice(n: int, seed: int, epoch: int, shuffle: bool, shard_id: int, num_shards: int) -> list[int]:
    """Dataset indices this shard reads in ``epoch``, in order: the torch loader's (loader.py ``EpochSampler``).

    The epoch's order is ``EpochSampler(n, seed, shuffle).order(epoch)``. With ``num_shards > 1`` it is padded
    cyclically to ``num_shards * ceil(n / num_shards)`` (``DistributedSampler``'s semantics, as the torch loader), so
    every shard gets the same number of pairs (ranks run the same number of steps), and shard ``s`` takes positions
    ``s, s + k, s + 2k, ...``: every pair once per epoch across shards, plus ``num_shards * ceil(n / num_shards) - n``
    repeats when ``num_shards`` does not divide ``n``."""
    order = EpochSampler(n, seed, shuffle).order(epoch)
    if num_shards == 1:
        return order
    total = math.ceil(n / num_shards) * num_shards
    padded = (order * math.ceil(total / n))[:total]
    return padded[shard_id::num_shards]


def batches_per_epoch(items: int, batch_size: int, drop_last: bool) -> int:
    return items // batch_size if drop_last else math.ceil(items / batch_size)


def next_good(j: int, bad: set[int] | dict, n: int) -> int:
    """The first index from ``j`` on (wrapping around) that is not known bad: the torch dataset's substitution rule."""
    for step in range(n):
        k = (j + step) % n
        if k not in bad:
            return k
    raise UserError("--skip_bad: every file in the dataset failed to decode")


def item_plan(cfg, size: tuple[int, int], params) -> tuple[int, int, int, int, int, int, bool]:
    """The reference transform (transforms.transform_pil) for an image of PIL ``size`` (w, h) and one ``get_params``
    draw, as numbers a batched backend can apply: ``(resize_h, resize_w, crop_y, crop_x, crop_h, crop_w, flip)``.
    A resize to the image's own size is the identity (PIL copies; DALI's and torch's resamplers give the input back);
    a crop window reaching past the image is zero-padded there (PIL's ``crop`` beyond the border)."""
    ow, oh = size
    mode, load, crop = cfg.preprocess, cfg.load_size, cfg.crop_size
    w, h = ow, oh
    if "resize" in mode:
        w = h = load
    elif "scale_width" in mode and not (ow == load and oh >= crop):
        w, h = load, int(max(load * oh / ow, crop))
    elif mode == "none":  # __make_power_2 (nearest multiple of 4, round half to even like the reference)
        w, h = int(round(ow / 4) * 4), int(round(oh / 4) * 4)
    cy, cx, ch, cw = 0, 0, h, w
    if "crop" in mode and (w > crop or h > crop):
        cx, cy = params["crop_pos"]
        ch = cw = crop
    return h, w, cy, cx, ch, cw, bool(params["flip"]) and not cfg.no_flip
