"""Loaders without host syncs (issue 17, part 4): gpu-cache plans on the host and never reads a device value back;
DALI keeps one pipeline for every epoch. The CPU tests guard the Python-level sync points (a read-back or a
list-to-device copy raises inside the batch loop); the ``gpu`` tests check the same under CUDA's own sync detector.
"""

from __future__ import annotations

import contextlib
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from fastp2p.config import DataConfig
from fastp2p.data import build_dataset, gpu_cache
from fastp2p.data.datasets import derive_seed
from fastp2p.data.gpu_cache import GpuCacheLoader
from fastp2p.data.plan import epoch_slice, item_plan
from fastp2p.data.transforms import get_params

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
_SYNCS = ("__int__", "__float__", "__bool__", "__index__", "item", "tolist", "cpu", "numpy")


_HOST_WORK = [False]


@contextlib.contextmanager
def host_work():
    """Lift the guard for work that only ever touches host tensors (the epoch's order: a CPU generator's randperm)."""
    _HOST_WORK[0] = True
    try:
        yield
    finally:
        _HOST_WORK[0] = False


@contextlib.contextmanager
def no_host_sync():
    """Every Python-level way to read a tensor back to the host raises, and so does ``torch.tensor(..., device=)``
    (a pageable, blocking copy of a host list); inside ``host_work()`` they run as usual."""
    def refuse(name, real):
        def f(*args, **kwargs):
            if _HOST_WORK[0]:
                return real(*args, **kwargs)
            raise AssertionError(f"host sync inside the batch loop: {name}")
        return f

    real_tensor = torch.tensor

    def tensor(data, *args, device=None, **kwargs):
        if device is not None and not _HOST_WORK[0]:
            raise AssertionError("host sync inside the batch loop: torch.tensor(..., device=...)")
        return real_tensor(data, *args, device=device, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        for name in _SYNCS:
            mp.setattr(torch.Tensor, name, refuse(f"Tensor.{name}", getattr(torch.Tensor, name)))
        mp.setattr(torch, "tensor", tensor)
        yield


def _images(root: Path, sizes: list[tuple[int, int]], seed: int = 0) -> Path:
    """Aligned A|B JPEGs of (h, w-per-half) ``sizes``, with structure in both directions (crops and flips show)."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i, (h, w) in enumerate(sizes):
        y, x = np.mgrid[0:h, 0:2 * w].astype(np.float32)
        f = rng.uniform(0.05, 0.3, size=(3, 2))
        img = np.stack([127 + 100 * np.sin(f[c, 0] * x + c) * np.cos(f[c, 1] * y) + x for c in range(3)], -1)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(root / f"{i:03d}.jpg", quality=92)
    return root


# (preprocess, config overrides, image sizes, batch size): one stacked cache with resize, crops past the border
# (zero padding), no resize at all, and a mixed-size cache (one resize per pair).
SAME = [(40, 48)] * 5
MIXED = [(40, 48), (36, 56), (44, 40), (40, 48)]
CASES = {
    "resize_and_crop": ("resize_and_crop", {}, SAME, 2),
    "crop_past_border": ("crop", {"crop_size": 44}, SAME, 3),
    "downscale_gray": ("resize_and_crop", {"load_size": 20, "crop_size": 16, "nc": (1, 3)}, SAME, 4),
    "mixed_scale_width": ("scale_width", {"load_size": 32}, MIXED, 1),
    "mixed_crop": ("crop", {"crop_size": 30}, MIXED, 2),
}


def _dataset(tmp_path: Path, case: str):
    preprocess, kw, sizes, bs = CASES[case]
    kw = dict(kw)
    nc = kw.pop("nc", (3, 3))
    cfg = DataConfig(data=str(_images(tmp_path / "d", sizes)), preprocess=preprocess, load_size=kw.pop("load_size", 36),
                     crop_size=kw.pop("crop_size", 32), num_workers=0, **kw)
    return build_dataset(cfg, *nc, seed=0), bs


def _reference_epoch(ds, bs: int, seed: int, epoch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The reference arithmetic, one image at a time with plain slicing: PIL decode, bicubic antialiased resize
    rounded to uint8 levels, crop (zeros past the border), flip, ``(v / 255 - 0.5) / 0.5``."""
    def one(img, plan) -> torch.Tensor:
        x = torch.from_numpy(np.array(img, dtype=np.uint8).reshape(img.size[1], img.size[0], -1)).permute(2, 0, 1)
        rh, rw, cy, cx, ch, cw, flip = plan
        if (rh, rw) != tuple(x.shape[1:]):
            x = F.interpolate(x[None].float(), size=(rh, rw), mode="bicubic", align_corners=False,
                              antialias=True)[0].round().clamp(0, 255)
        pad = torch.zeros(x.shape[0], rh + 2 * ch, rw + 2 * cw, dtype=x.dtype)
        pad[:, ch:ch + rh, cw:cw + rw] = x
        out = pad[:, ch + cy:2 * ch + cy, cw + cx:2 * cw + cx].float()
        out = out.flip(2) if flip else out
        return out.div(255).sub(0.5).div(0.5)

    order = epoch_slice(len(ds), seed, epoch, True, 0, 1)
    batches = []
    for k in range(0, len(order), bs):
        pairs = []
        for i in order[k:k + bs]:
            a, b = ds._load(i)
            a = a.convert("L") if ds.input_nc == 1 else a
            size = a.size
            plan = item_plan(ds.cfg, size, get_params(ds.cfg, size, random.Random(derive_seed(seed, epoch, i))))
            pairs.append((one(a, plan), one(b, plan)))
        batches.append((torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])))
    return batches


# -- gpu-cache ------------------------------------------------------------------------------------------------------
def test_sync_guard_catches_each_host_sync():
    t = torch.ones(2)
    with no_host_sync():
        for read_back in (lambda: int(t[0]), lambda: float(t[0]), lambda: bool(t[0]), lambda: t[0].item(),
                          lambda: t.tolist(), lambda: [0, 1][t[0].long()], lambda: t.cpu(), lambda: t.numpy(),
                          lambda: torch.tensor([1, 2], device="cpu")):
            with pytest.raises(AssertionError, match="host sync"):
                read_back()
        torch.tensor([1, 2])  # a host tensor from a list is fine (no device involved)
        with host_work():
            assert t.tolist() == [1.0, 1.0]
    assert int(t[0]) == 1  # and everything is restored afterwards


@pytest.mark.parametrize("case", sorted(CASES))
def test_gpu_cache_batch_loop_makes_no_host_sync_and_one_nonblocking_copy(tmp_path, case, monkeypatch):
    ds, bs = _dataset(tmp_path, case)
    loader = GpuCacheLoader(ds, bs, 7)  # construction decodes and uploads the cache: syncs are fine there
    copies: list[bool] = []
    real_to = torch.Tensor.to

    def to(self, *args, **kwargs):
        if args and isinstance(args[0], (torch.device, str)):  # a device move (not a dtype cast)
            copies.append(bool(kwargs.get("non_blocking")))
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", to)
    order = gpu_cache.epoch_slice

    def epoch_slice(*args):  # once per epoch, on the host: a CPU torch.Generator's permutation
        with host_work():
            return order(*args)

    monkeypatch.setattr(gpu_cache, "epoch_slice", epoch_slice)
    with no_host_sync():
        n = sum(1 for _ in loader.batches(1))
    assert n == len(loader) > 1
    assert len(copies) == n and all(copies)  # one packed index upload per batch, never blocking


@pytest.mark.parametrize("case", sorted(CASES))
def test_gpu_cache_bit_identical_to_reference_arithmetic(tmp_path, case):
    ds, bs = _dataset(tmp_path, case)
    for channels_last in (True, False):
        loader = GpuCacheLoader(ds, bs, 7, channels_last=channels_last)
        for epoch in (0, 1):
            got = [(b.A.clone(), b.B.clone()) for b in loader.batches(epoch)]
            ref = _reference_epoch(ds, bs, 7, epoch)
            assert len(got) == len(ref) == len(loader)
            for (a, b), (ra, rb) in zip(got, ref, strict=True):
                assert torch.equal(a, ra) and torch.equal(b, rb)
                assert a.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


@cuda
@pytest.mark.gpu
def test_gpu_cache_on_cuda_never_syncs_and_matches_cpu(tmp_path):
    ds, bs = _dataset(tmp_path, "crop_past_border")  # no resize: CUDA and CPU agree exactly
    cpu = [(b.A, b.B) for b in GpuCacheLoader(ds, bs, 7).batches(1)]
    loader = GpuCacheLoader(ds, bs, 7, device="cuda")
    next(iter(loader.batches(0)))  # warm the pinned-memory and device caching allocators
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = [(b.A, b.B) for b in loader.batches(1)]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for (a, b), (ca, cb) in zip(got, cpu, strict=True):
        assert torch.equal(a.cpu(), ca) and torch.equal(b.cpu(), cb)


# -- DALI -----------------------------------------------------------------------------------------------------------
def _dali_loader(tmp_path: Path, monkeypatch, **kw):
    """A DaliLoader over 7 pairs in batches of 3 (the last partial), and a counter of DALI pipeline constructions."""
    pytest.importorskip("nvidia.dali", reason="NVIDIA DALI not installed (pip install -e '.[dali]')")
    import nvidia.dali.pipeline as dali_pipeline

    from fastp2p.data.dali import DaliLoader

    built: list[int] = []

    class Counted(dali_pipeline.Pipeline):
        def __init__(self, *args, **kwargs):
            built.append(1)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(dali_pipeline, "Pipeline", Counted)
    root = _images(tmp_path / "d", SAME + [(40, 48)] * 2)
    ds = build_dataset(DataConfig(data=str(root), load_size=44, crop_size=32, num_workers=0), seed=0)

    def make():
        return DaliLoader(ds, 3, 5, num_threads=1, **kw)
    return make, built


def _batches(loader, epoch: int, start: int = 0):
    return [(b.A.clone(), b.B.clone(), list(b.paths)) for b in loader.batches(epoch, start)]


def _same(got, want) -> bool:
    return len(got) == len(want) and all(torch.equal(a, x) and torch.equal(b, y) and p == q
                                         for (a, b, p), (x, y, q) in zip(got, want, strict=True))


def test_dali_one_pipeline_for_every_epoch(tmp_path, monkeypatch):
    make, built = _dali_loader(tmp_path, monkeypatch)
    loader = make()
    epochs = {e: _batches(loader, e) for e in (0, 1, 2)}
    epochs[1, "again"] = _batches(loader, 1)
    assert len(built) == 1  # built once, reset between epochs
    assert [len(p) for _, _, p in epochs[0]] == [3, 3, 1]
    assert [p for *_, ps in epochs[1] for p in ps] != [p for *_, ps in epochs[2] for p in ps]  # reshuffled
    assert _same(epochs[1, "again"], epochs[1])
    for e in (0, 1, 2):  # each epoch equals what a freshly built pipeline gives for it
        assert _same(_batches(make(), e), epochs[e])
    assert len(built) == 4


@pytest.mark.parametrize("prefetch", [1, 2, 3])
def test_dali_abandoned_epoch_and_resume_keep_the_pipeline(tmp_path, monkeypatch, prefetch):
    make, built = _dali_loader(tmp_path, monkeypatch, prefetch=prefetch)
    fresh = make()
    want = {e: _batches(fresh, e) for e in (0, 1)}
    built.clear()
    loader = make()
    it = loader.batches(0)
    first = next(it)  # DALI has scheduled up to `prefetch` batches of epoch 0 by now
    assert torch.equal(first.A, want[0][0][0])
    it.close()  # abandoned midway (max_steps): the next epoch drains what was in flight
    assert _same(_batches(loader, 1, start=1), want[1][1:])  # resume mid-epoch
    assert _same(_batches(loader, 0), want[0])
    assert list(loader.epoch(1, start=3)) == []
    assert _same(_batches(loader, 1, start=2), want[1][2:])
    assert len(built) == 1


@cuda
@pytest.mark.gpu
def test_dali_mixed_batches_stay_valid_and_match_cpu(tmp_path, monkeypatch):
    make, _ = _dali_loader(tmp_path, monkeypatch)
    from fastp2p.data.dali import DaliLoader

    cpu = _batches(make(), 1)
    gpu = DaliLoader(make().dataset, 3, 5, num_threads=1, device="cuda")
    next(iter(gpu.batches(0)))  # warm up (nvJPEG init, allocators)
    torch.cuda.set_sync_debug_mode("error")  # torch's side of the handover (empty + copy on its stream) never syncs
    try:
        kept = [(b.A, b.B) for b in gpu.batches(1)]  # no clone: copies in torch memory outlive the next batch
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for (a, b), (ca, cb, _) in zip(kept, cpu, strict=True):
        assert a.is_cuda and a.is_contiguous(memory_format=torch.channels_last)
        # nvJPEG vs libjpeg-turbo decode: a few levels apart at most (tests/test_dali.py's resize tolerance)
        assert (a.cpu() - ca).abs().max() <= 6 * 2 / 255 and (b.cpu() - cb).abs().max() <= 6 * 2 / 255
