"""``gpu-cache`` loader: decode the whole dataset once, keep it as uint8 on the device, and do the reference
preprocessing per batch there, batched and vectorized (no per-epoch decode at all). On a CPU the same code runs on host
tensors (that is how it is tested here).

Memory: every pair, decoded, as uint8 HWC on the device: facades (400 pairs of 256x256x3, both halves) is 157 MB.
Decoding is PIL's (``load_rgb``) once at construction, grayscale is PIL's ``convert('L')`` (so those pixels are
exactly the torch loader's); then per batch: gather the batch's images, bicubic resize with ``F.interpolate(mode=
'bicubic', antialias=True)`` (the same a=-0.5 separable filter as PIL, in float; rounded back to uint8 levels like
PIL's output), crop + flip as one index gather (a window past the border reads zeros, as PIL's crop), normalize with
the reference's float ops ``(v / 255 - 0.5) / 0.5``. Pairs of one size are processed as one batched call; a batch
mixing sizes (``--preprocess`` scale_width/none/crop on varied images) is processed per size.

Order, jitter, epochs, sharding and bad files follow the torch loader exactly (see backends.py): the same (seed,
epoch) gives the same pairs, crops and flips, batch for batch; pixels differ from PIL only by the resampler (a few
uint8 levels, see tests/test_dali.py). ``len(loader)`` = ``ceil(pairs / batch_size)`` with a partial last batch, or
``floor`` with ``drop_last``. Files that fail to decode are found at construction: ``DataError`` naming the file, or
with ``skip_bad`` recorded in ``bad_files`` and replaced by the next good pair. Batches are fresh tensors (valid
indefinitely).

No host syncs per batch. Everything that depends on the batch's numbers (which cache rows, crop windows, flips, the
border mask's need) is planned on the host with numpy from the same ``get_params`` draws, packed into one int64
buffer (pinned when the cache is on CUDA) and sent with a single ``non_blocking`` copy; the device only gathers,
resizes and normalizes, and no device value is ever read back. (The previous version made ~7 synchronizing calls a
batch: ``torch.tensor(list, device=cuda)`` is a pageable blocking copy, ``int(p[0, 2])`` a read-back.) A pinned
staging tensor is freed right after its copy is queued: torch's pinned-memory caching allocator records an event on
the copy's stream and reuses the block only once the copy has run, so one fresh buffer per batch is safe. The
device work is the same op for op as before, so batches are bit-identical (tests/test_loaders_sync_free.py).
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import DataError, UserError
from .datasets import BadFile, PairDataset, derive_seed
from .loader import Batch, EpochLoader
from .plan import batches_per_epoch, epoch_slice, item_plan, next_good
from .transforms import get_params


def _to_uint8(img) -> torch.Tensor:
    arr = np.asarray(img)
    return torch.from_numpy((arr[..., None] if arr.ndim == 2 else arr).copy())  # HWC uint8


def _crop_index(plans: list[tuple]) -> tuple[np.ndarray, np.ndarray]:
    """Source rows (b, ch) and columns (b, cw) of each image's crop window (``item_plan`` numbers, one crop size per
    call), the horizontal flip folded into the column order; may point past the border (the caller clamps and masks)."""
    p = np.asarray([pl[2:] for pl in plans], dtype=np.int64)  # (b, 5): y, x, h, w, flip
    ch, cw = int(p[0, 2]), int(p[0, 3])
    ar_h, ar_w = np.arange(ch, dtype=np.int64), np.arange(cw, dtype=np.int64)
    rows = p[:, 0:1] + ar_h
    cols = p[:, 1:2] + np.where(p[:, 4:5].astype(bool), cw - 1 - ar_w, ar_w)
    return rows, cols


class GpuCacheLoader(EpochLoader):
    """Loader over a device-resident uint8 copy of ``dataset`` (module docstring), ``PairLoader`` contract."""

    def __init__(self, dataset: PairDataset, batch_size: int, seed: int, *, device: str | torch.device = "cpu",
                 shard_id: int = 0, num_shards: int = 1, drop_last: bool = False, shuffle: bool = True,
                 dtype: torch.dtype = torch.float32, channels_last: bool = True):
        if batch_size < 1:
            raise UserError(f"--batch_size must be >= 1 (got {batch_size})")
        if not 0 <= shard_id < num_shards:
            raise ValueError(f"shard_id {shard_id} outside 0..{num_shards - 1}")
        self.dataset, self.cfg = dataset, dataset.cfg
        self.batch_size, self.seed = batch_size, int(seed)
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise UserError("--device cuda: no CUDA device is available here; use --device cpu")
        self.shard_id, self.num_shards = shard_id, num_shards
        self.drop_last, self.shuffle = drop_last, shuffle
        self.dtype, self.channels_last = dtype, channels_last
        self.next_epoch = 0
        self._bad: dict[int, BadFile] = {}
        self.src: list[torch.Tensor | None] = []  # per pair, uint8 HWC on the device (None: bad file)
        self.tgt: list[torch.Tensor | None] = []
        self._decode_all()
        self._per_shard = len(epoch_slice(len(dataset), 0, 0, False, shard_id, num_shards))

    def _decode_all(self) -> None:
        ds, cfg = self.dataset, self.cfg
        for j in range(len(ds)):
            try:
                a, b = ds._load(j)  # PIL halves in file order; DataError names the file
            except DataError as e:
                if not cfg.skip_bad:
                    raise
                self._bad[j] = (e.path, e.problem)
                ds.record_bad(e.path, e.problem)
                self.src.append(None)
                self.tgt.append(None)
                continue
            s, t = (b, a) if cfg.direction == "BtoA" else (a, b)
            if ds.input_nc == 1:
                s = s.convert("L")
            if ds.output_nc == 1:
                t = t.convert("L")
            self.src.append(_to_uint8(s).to(self.device))
            self.tgt.append(_to_uint8(t).to(self.device))
        if len(self._bad) == len(ds):
            raise DataError(ds.paths[0], "no readable image left in the dataset: every file failed to decode")
        # One stacked tensor when every pair has the same size (the usual case): a batch is then one gather.
        sizes = {tuple(x.shape) for x in self.src if x is not None}
        self._stacked = None
        if len(sizes) == 1:
            keep = [j for j in range(len(ds)) if j not in self._bad]
            pos = np.full(len(ds), -1, dtype=np.int64)  # dataset index -> row of the stack; host-side (planning)
            pos[keep] = np.arange(len(keep))
            self._stacked = (torch.stack([self.src[j] for j in keep]), torch.stack([self.tgt[j] for j in keep]), pos)
            self.src = [None] * len(ds)  # the stacked copies replace the per-pair tensors
            self.tgt = [None] * len(ds)
            self._size = (next(iter(sizes))[1], next(iter(sizes))[0])  # (w, h)

    # -- contract ------------------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return batches_per_epoch(self._per_shard, self.batch_size, self.drop_last)

    def set_epoch(self, epoch: int) -> None:
        self.next_epoch = int(epoch)

    @property
    def nbytes(self) -> int:
        """Device memory the cache holds."""
        if self._stacked is not None:
            return self._stacked[0].nbytes + self._stacked[1].nbytes
        return sum(x.nbytes for x in self.src + self.tgt if x is not None)

    def close(self) -> None:
        """Nothing runs in the background; the cache is freed with the loader."""

    def batches(self, epoch: int | None = None, start: int = 0) -> Iterator[Batch]:
        epoch = self.next_epoch if epoch is None else int(epoch)
        nb = len(self)
        if not 0 <= start <= nb:
            raise ValueError(f"start batch {start} outside 0..{nb} (batches per epoch)")
        n = len(self.dataset)
        idx = epoch_slice(n, self.seed, epoch, self.shuffle, self.shard_id, self.num_shards)
        for k in range(start, nb):
            chunk = idx[k * self.batch_size:(k + 1) * self.batch_size]
            files = [next_good(i, self._bad, n) if self._bad else i for i in chunk]
            A, B = self.make_batch(epoch, chunk, files)
            yield Batch(A, B, [self.dataset.paths[j] for j in files], ())

    # -- the batched transform -----------------------------------------------------------------------------------------
    def _pair_size(self, j: int) -> tuple[int, int]:
        if self._stacked is not None:
            return self._size
        h, w = self.src[j].shape[:2]
        return w, h

    def make_batch(self, epoch: int, indices: list[int], files: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) for dataset ``indices`` (jitter drawn per index) read from ``files`` (the index or its substitute)."""
        plans = []
        for i, j in zip(indices, files, strict=True):
            size = self._pair_size(j)
            params = get_params(self.cfg, size, random.Random(derive_seed(self.seed, epoch, i)))
            plans.append(item_plan(self.cfg, size, params))
        if self._stacked is not None:
            src, tgt, pos = self._stacked
            rows, *idx = self._upload([pos[np.asarray(files, dtype=np.int64)], *_crop_index(plans)])
            outs = [self._transform(x[rows], plans, idx) for x in (src, tgt)]  # A and B share the crop indices
        else:  # mixed sizes: one call per pair (sizes differ, so a single batched resize cannot cover them)
            flat = self._upload([a for p in plans for a in _crop_index([p])])
            idx = [flat[2 * k:2 * k + 2] for k in range(len(plans))]
            outs = [[self._transform(store[j][None], [p], ix) for j, p, ix in zip(files, plans, idx, strict=True)]
                    for store in (self.src, self.tgt)]
            if any(len({tuple(t.shape) for t in o}) > 1 for o in outs):
                listing = ", ".join(f"{self.dataset.paths[j]} {tuple(t.shape[2:])}"
                                    for j, t in zip(files, outs[0], strict=True))
                raise UserError(f"--batch_size: pairs in one batch have different sizes after preprocessing "
                                f"({listing}); use a fixed-size --preprocess (e.g. resize_and_crop) or --batch_size 1")
            outs = [torch.cat(o) for o in outs]
        return outs[0], outs[1]

    def _upload(self, arrays: list[np.ndarray]) -> list[torch.Tensor]:
        """Host int64 arrays -> device tensors of the same shapes, in ONE copy that never blocks the host: packed into
        one buffer, pinned on CUDA (a pageable source would make the copy synchronous), sent ``non_blocking``."""
        host = torch.from_numpy(np.concatenate([a.ravel() for a in arrays]).astype(np.int64, copy=False))
        if self.device.type == "cuda":
            host = host.pin_memory()
        flat = host.to(self.device, non_blocking=True)
        out, at = [], 0
        for a in arrays:
            out.append(flat[at:at + a.size].view(a.shape))
            at += a.size
        return out

    def _transform(self, x: torch.Tensor, plans: list[tuple], idx: list[torch.Tensor]) -> torch.Tensor:
        """uint8 (b, H, W, C) images of one size + per-image plans + their device crop indices (``_crop_index``) ->
        float (b, C, h, w) in [-1, 1]."""
        rh, rw = plans[0][:2]  # same source size -> same resize target for every image here
        b, H, W, C = x.shape
        if (rh, rw) != (H, W):
            # Plain NCHW for the resampler: its channels-last CPU path measured 3x slower (33 vs 11.5 ms, batch 4,
            # 256 -> 286, one thread).
            y = F.interpolate(x.permute(0, 3, 1, 2).contiguous().float(), size=(rh, rw), mode="bicubic",
                              align_corners=False, antialias=True)
            # PIL writes uint8: round and clamp to its levels before normalizing
            x = y.round_().clamp_(0, 255).permute(0, 2, 3, 1)  # NHWC view
        rows, cols = idx  # (b, ch), (b, cw): crop windows with the flip folded in, planned on the host
        bi = torch.arange(b, device=x.device)[:, None, None]
        out = x[bi, rows.clamp(0, rh - 1)[:, :, None], cols.clamp(0, rw - 1)[:, None, :]]  # (b, ch, cw, C)
        out = out.float()
        ch, cw = plans[0][4:6]
        if any(py < 0 or px < 0 or py + ch > rh or px + cw > rw for py, px, *_ in (pl[2:] for pl in plans)):
            inside = ((rows >= 0) & (rows < rh))[:, :, None] & ((cols >= 0) & (cols < rw))[:, None, :]
            out = out * inside[..., None]  # PIL's crop past the border reads zeros
        out = out.div_(255).sub_(0.5).div_(0.5).to(self.dtype)  # the reference's ToTensor + Normalize, in float32
        out = out.permute(0, 3, 1, 2)  # channels-last NCHW view
        return out if self.channels_last else out.contiguous()
