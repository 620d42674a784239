"""The DALI and gpu-cache loaders (fastp2p/data/dali.py, gpu_cache.py, backends.py) on a CPU, against PIL and the
torch loader. Small synthetic JPEGs keep the whole file to a few seconds.

Resize tolerance. The torch loader resizes with PIL (bicubic, a=-0.5, 8-bit fixed-point weights, rounded to uint8
between the horizontal and the vertical pass); DALI's cubic resampler and torch's ``F.interpolate(bicubic,
antialias=True)`` use the same filter in float and round once. Those rounding differences reach a few uint8 levels
at sharp edges (on facades: at most 5 levels, mean 0.1), so outputs must agree within ``MAX_LEVELS`` levels anywhere
and ``MEAN_LEVELS`` on average (one level is 2/255 in [-1, 1]); everything that is not a resampler (decode, split,
crop, flip, grayscale, normalize) is exact, checked on pixels with no resize.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastp2p.config import Config, DataConfig, override, preset
from fastp2p.data import backends, build_dataset, make_loader, make_train_loader
from fastp2p.data.gpu_cache import GpuCacheLoader
from fastp2p.errors import DataError, UserError

dali = pytest.importorskip("nvidia.dali", reason="NVIDIA DALI not installed (pip install -e '.[dali]')")
from fastp2p.data.dali import DaliLoader, decode  # noqa: E402

LEVEL = 2 / 255
MAX_LEVELS, MEAN_LEVELS = 6, 0.5


def _smooth(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A JPEG-friendly image with structure in both directions (so crops and flips are visible)."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    f = rng.uniform(0.05, 0.3, size=(3, 2))
    img = np.stack([127 + 100 * np.sin(f[c, 0] * x + 0.7 * c) * np.cos(f[c, 1] * y) + x for c in range(3)], -1)
    return np.clip(img, 0, 255).astype(np.uint8)


def _aligned(root: Path, n: int = 7, h: int = 40, w: int = 48, same_halves: bool = False, seed: int = 0) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        a = _smooth(rng, h, w)
        b = a if same_halves else _smooth(rng, h, w)
        # 4:4:4 for identical halves: with chroma subsampling the decoder's upsampling blends across the seam
        Image.fromarray(np.concatenate([a, b], 1)).save(root / f"{i:03d}.jpg", quality=92,
                                                         subsampling=0 if same_halves else -1)
    return root


def _cfg(root: Path, **kw) -> DataConfig:
    base = {"data": str(root), "load_size": 36, "crop_size": 32, "num_workers": 0}
    base.update(kw)
    return DataConfig(**base)


def _levels(x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    d = (x.float() - y.float()).abs() / LEVEL
    return d.max().item(), d.mean().item()


def _epoch(loader, epoch: int = 0, start: int = 0):
    return [(b.A.clone(), b.B.clone(), list(b.paths)) for b in loader.batches(epoch, start)]


# -- decode and exact steps -------------------------------------------------------------------------------------------
def test_dali_cpu_decode_bit_identical_to_pil(tmp_path):
    root = _aligned(tmp_path / "d", n=3, h=37, w=50)  # odd height: chroma upsampling at the border
    Image.fromarray(_smooth(np.random.default_rng(5), 64, 80)).save(tmp_path / "d" / "q75.jpg", quality=75,
                                                                     subsampling=2)
    paths = sorted(str(p) for p in root.iterdir())
    for path, arr in zip(paths, decode(paths), strict=True):
        assert np.array_equal(arr, np.asarray(Image.open(path).convert("RGB"))), path


def _assert_backends_equal_torch(ds, seed):
    """DALI and gpu-cache give the torch loader's batches (same pairs, float rounding) when nothing is resized."""
    for loader in (DaliLoader(ds, 2, seed, num_threads=1), GpuCacheLoader(ds, 2, seed)):
        for (a, b, p), (ta, tb, tp) in zip(_epoch(loader), _epoch(make_loader(ds, 2, 0, seed)), strict=True):
            assert p == tp
            torch.testing.assert_close(a, ta, rtol=0, atol=1e-6)
            torch.testing.assert_close(b, tb, rtol=0, atol=1e-6)


@pytest.mark.parametrize("direction", ["AtoB", "BtoA"])
def test_split_crop_flip_normalize_exact_without_resize(tmp_path, direction):
    # preprocess 'crop' never resizes: every step left is exact, so DALI == torch loader to float rounding.
    root = _aligned(tmp_path / "d", n=4)
    ds = build_dataset(_cfg(root, preprocess="crop", crop_size=24, direction=direction), seed=3)
    _assert_backends_equal_torch(ds, seed=3)


# -- agreement with the torch loader ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["dali", "gpu-cache"])
@pytest.mark.parametrize("preprocess,kw", [
    ("resize_and_crop", {}),
    ("resize_and_crop", {"direction": "BtoA", "nc": (1, 3)}),  # grayscale source
    ("scale_width_and_crop", {"load_size": 40}),
    ("scale_width", {"load_size": 32}),
    ("none", {}),  # 40x48 halves are multiples of 4: identity
    ("resize_and_crop", {"load_size": 20, "crop_size": 16}),  # downscaling: antialiased filters
    ("crop", {"crop_size": 44}),  # crop taller than the image: zero padding, as PIL
])
def test_matches_torch_loader_within_resize_tolerance(tmp_path, kind, preprocess, kw):
    root = _aligned(tmp_path / "d", n=5)
    nc = kw.pop("nc", (3, 3))
    ds = build_dataset(_cfg(root, preprocess=preprocess, **kw), *nc, seed=1)
    loader = DaliLoader(ds, 2, 1, num_threads=1) if kind == "dali" else GpuCacheLoader(ds, 2, 1)
    ref = _epoch(make_loader(ds, 2, 0, 1), epoch=1)
    got = _epoch(loader, epoch=1)
    assert len(got) == len(ref) == 3
    for (a, b, p), (ta, tb, tp) in zip(got, ref, strict=True):
        assert p == tp and a.shape == ta.shape and b.shape == tb.shape and a.shape[1] == nc[0]
        for x, y in ((a, ta), (b, tb)):
            mx, mean = _levels(x, y)
            assert mx <= MAX_LEVELS and mean <= MEAN_LEVELS, (mx, mean)


def test_two_folder_layout(tmp_path):
    rng = np.random.default_rng(2)
    for side in "AB":
        (tmp_path / side).mkdir()
    for i in range(3):
        for side in "AB":
            Image.fromarray(_smooth(rng, 40, 48)).save(tmp_path / side / f"{i}.jpg")
    ds = build_dataset(_cfg(tmp_path, preprocess="crop", crop_size=24, direction="BtoA"), seed=0)
    _assert_backends_equal_torch(ds, seed=0)


@pytest.mark.parametrize("kind", ["dali", "gpu-cache"])
def test_halves_share_crop_and_flip(tmp_path, kind):
    # A and B halves hold the same pixels: one crop/flip draw for both means A == B exactly after augmentation.
    root = _aligned(tmp_path / "d", n=8, same_halves=True)
    ds = build_dataset(_cfg(root, load_size=44, crop_size=24), seed=0)
    loader = DaliLoader(ds, 4, 0, num_threads=1) if kind == "dali" else GpuCacheLoader(ds, 4, 0)
    crops = set()
    for a, b, _ in _epoch(loader) + _epoch(loader, epoch=1):
        # 4:4:4 JPEG, halves 48 wide (a multiple of 8): the halves are separate blocks and decode identically.
        assert torch.equal(a, b)
        crops |= {x.sum().item() for x in a}
    assert len(crops) > 8  # the crops really moved (16 pairs, distinct windows)


def test_output_dtypes_and_memory_format(tmp_path):
    root = _aligned(tmp_path / "d", n=2)
    ds = build_dataset(_cfg(root), seed=0)
    ref = _epoch(DaliLoader(ds, 2, 0, num_threads=1))[0][0]
    assert ref.is_contiguous(memory_format=torch.channels_last) and ref.shape == (2, 3, 32, 32)
    for dtype in (torch.float16, torch.bfloat16):
        for loader in (DaliLoader(ds, 2, 0, num_threads=1, dtype=dtype), GpuCacheLoader(ds, 2, 0, dtype=dtype)):
            a = _epoch(loader)[0][0]
            assert a.dtype == dtype and a.is_contiguous(memory_format=torch.channels_last)
            assert _levels(a, ref)[0] <= MAX_LEVELS
    for loader in (DaliLoader(ds, 2, 0, num_threads=1, channels_last=False), GpuCacheLoader(ds, 2, 0,
                                                                                              channels_last=False)):
        a = _epoch(loader)[0][0]
        assert a.is_contiguous() and _levels(a, ref)[0] <= MAX_LEVELS


# -- epochs and shards ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["dali", "gpu-cache"])
def test_epoch_boundaries_and_last_partial_batch(tmp_path, kind):
    root = _aligned(tmp_path / "d", n=7)
    ds = build_dataset(_cfg(root), seed=0)

    def mk(**kw):
        return DaliLoader(ds, 3, 0, num_threads=1, **kw) if kind == "dali" else GpuCacheLoader(ds, 3, 0, **kw)

    loader = mk()
    assert len(loader) == 3
    e0 = _epoch(loader)
    assert [len(p) for _, _, p in e0] == [3, 3, 1]  # the last batch is partial: every pair once per epoch
    assert sorted(p for _, _, ps in e0 for p in ps) == sorted(ds.paths)
    again = _epoch(loader)
    assert all(torch.equal(x[0], y[0]) for x, y in zip(e0, again, strict=True))  # a pure function of (seed, epoch)
    e1 = _epoch(loader, epoch=1)
    assert [p for _, _, ps in e1 for p in ps] != [p for _, _, ps in e0 for p in ps]  # reshuffled
    tail = _epoch(loader, start=1)  # resume mid-epoch: exactly batches 1, 2
    assert len(tail) == 2 and all(torch.equal(x[0], y[0]) and x[2] == y[2] for x, y in zip(tail, e0[1:], strict=True))
    assert list(loader.epoch(0, start=3)) == []
    with pytest.raises(ValueError):
        list(loader.epoch(0, start=4))
    batches = list(iter(loader))  # plain iteration runs next_epoch and advances it at the end
    assert len(batches) == 3 and loader.next_epoch == 1
    dropped = mk(drop_last=True)
    assert len(dropped) == 2 and [len(p) for _, _, p in _epoch(dropped)] == [3, 3]
    loader.close()


@pytest.mark.parametrize("kind", ["dali", "gpu-cache"])
@pytest.mark.parametrize("n,shards", [(6, 2), (6, 3), (7, 3)])
def test_sharding_covers_every_file(tmp_path, kind, n, shards):
    root = _aligned(tmp_path / "d", n=n)
    ds = build_dataset(_cfg(root), seed=0)
    seen: list[str] = []
    for s in range(shards):
        loader = (DaliLoader(ds, 2, 4, num_threads=1, shard_id=s, num_shards=shards) if kind == "dali"
                  else GpuCacheLoader(ds, 2, 4, shard_id=s, num_shards=shards))
        mine = [p for _, _, ps in _epoch(loader, epoch=2) for p in ps]
        assert len(mine) == -(-n // shards)  # every shard runs the same number of pairs
        if n % shards == 0:  # with the torch loader's sharding (same ranks, same order) when it has one
            try:
                ref = make_loader(ds, 2, 0, 4, shard_id=s, num_shards=shards)
            except TypeError:
                ref = None
            if ref is not None:
                assert mine == [p for _, _, ps in _epoch(ref, epoch=2) for p in ps]
        seen += mine
    assert set(seen) == set(ds.paths)
    if n % shards == 0:
        assert sorted(seen) == sorted(ds.paths)  # exactly once across shards
    else:  # padded by repeating the first pairs of the epoch's order (DistributedSampler)
        assert len(seen) - len(set(seen)) == shards * -(-n // shards) - n


# -- bad input ------------------------------------------------------------------------------------------------------
def _with_truncated(root: Path, index: int = 3) -> Path:
    bad = root / f"{index:03d}.jpg"
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 2])  # the header still reads: only decoding finds it
    return bad


@pytest.mark.parametrize("kind", ["dali", "gpu-cache"])
def test_corrupt_jpeg_names_the_file(tmp_path, kind):
    root = _aligned(tmp_path / "d", n=5)
    bad = _with_truncated(root)
    ds = build_dataset(_cfg(root), seed=0)
    with pytest.raises(DataError) as e:
        loader = DaliLoader(ds, 2, 0, num_threads=1) if kind == "dali" else GpuCacheLoader(ds, 2, 0)
        _epoch(loader)
    assert e.value.path == str(bad) and "\n" not in str(e.value)


@pytest.mark.parametrize("kind", ["dali", "gpu-cache"])
def test_corrupt_jpeg_skipped_and_counted(tmp_path, kind):
    root = _aligned(tmp_path / "d", n=5)
    bad = _with_truncated(root)
    ds = build_dataset(_cfg(root, skip_bad=True), seed=0)
    loader = DaliLoader(ds, 2, 0, num_threads=1) if kind == "dali" else GpuCacheLoader(ds, 2, 0)
    for epoch in (0, 1):
        got = _epoch(loader, epoch)
        paths = [p for _, _, ps in got for p in ps]
        assert len(paths) == 5 and str(bad) not in paths  # replaced by the next good pair, as the torch dataset does
    assert [p for p, _ in loader.bad_files] == [str(bad)]


# -- selection and the trainer ----------------------------------------------------------------------------------------
def test_loader_selection(tmp_path, monkeypatch):
    cpu = torch.device("cpu")
    assert backends.resolve_loader(None, cpu) == "torch"
    assert backends.resolve_loader(None, torch.device("cuda")) == "dali"
    with pytest.raises(UserError, match="--loader"):
        backends.resolve_loader("fast", cpu)
    monkeypatch.setattr(backends, "dali_available", lambda: False)
    assert backends.resolve_loader(None, torch.device("cuda")) == "torch"
    with pytest.raises(UserError, match=r"--loader dali: .*pip install"):
        backends.resolve_loader("dali", cpu)
    monkeypatch.undo()
    synthetic = build_dataset(DataConfig(synthetic_size=4, load_size=36, crop_size=32), seed=0)
    with pytest.raises(UserError, match="--loader dali"):
        make_train_loader(override(Config(), loader="dali"), synthetic, cpu)
    assert isinstance(make_train_loader(override(Config(), loader="gpu-cache", batch_size=2), synthetic, cpu),
                      GpuCacheLoader)


@pytest.mark.parametrize("loader", ["dali", "gpu-cache"])
def test_trainer_runs_with_loader(tmp_path, loader):
    from fastp2p.train import fit

    root = _aligned(tmp_path / "d", n=4, h=32, w=32)
    cfg = override(preset("debug"), data=str(root), loader=loader, max_steps=2, batch_size=2, out=str(tmp_path / "r"),
                   name=loader, num_workers=1, log_every=1, sample_every=1000, save_every=1000)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, ngf=4, ndf=4))
    summary = fit(cfg, progress=False)
    assert summary["steps"] == 2 and np.isfinite(summary["loss_G_L1"])
