"""Data layer: reference preprocessing, pairing, direction, determinism, bad input, synthetic data, loader."""

from __future__ import annotations

import dataclasses
import logging
import random
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastp2p.config import DataConfig
from fastp2p.data import (
    AlignedDataset,
    SyntheticDataset,
    TwoFolderDataset,
    apply,
    build_dataset,
    collate,
    get_params,
    make_loader,
)
from fastp2p.data.datasets import derive_seed
from fastp2p.data.transforms import to_tensor
from fastp2p.errors import DataError, UserError

FACADES = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "facades"

# Small sizes keep PIL work (and the test run) cheap; the logic does not depend on the size.
SMALL = DataConfig(load_size=40, crop_size=32)


def rand_img(rng: np.random.Generator, w: int, h: int, mode: str = "RGB") -> Image.Image:
    shape = (h, w, 3) if mode == "RGB" else (h, w)
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode)


def ref_tensor(img: Image.Image) -> torch.Tensor:
    """torchvision ToTensor + Normalize(0.5, 0.5), written out as the reference computes it."""
    a = torch.from_numpy(np.array(img))
    a = a.unsqueeze(0) if a.ndim == 2 else a.permute(2, 0, 1).contiguous()
    return a.to(torch.float32).div(255).sub_(torch.tensor(0.5)).div_(torch.tensor(0.5))


def write_aligned(folder: Path, name: str, a: Image.Image, b: Image.Image) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    ab = Image.new("RGB", (a.width + b.width, a.height))
    ab.paste(a, (0, 0))
    ab.paste(b, (a.width, 0))
    path = folder / name
    ab.save(path)
    return path


def cfg_for(root: Path | None, **kw) -> DataConfig:
    return dataclasses.replace(SMALL, data=None if root is None else str(root), **kw)


# ---------------------------------------------------------------------------------------------------- transforms ----


def test_to_tensor_is_bit_exact_for_every_uint8_value():
    img = Image.fromarray(np.arange(256, dtype=np.uint8).reshape(16, 16), "L")
    assert torch.equal(to_tensor(img), ref_tensor(img))
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (7, 9, 3), dtype=np.uint8))
    t = to_tensor(rgb)
    assert t.dtype == torch.float32 and t.shape == (3, 7, 9) and t.is_contiguous()
    assert torch.equal(t, ref_tensor(rgb))


@pytest.mark.parametrize(
    "mode,in_size,out_size",
    [
        ("resize_and_crop", (300, 200), (256, 256)),
        ("resize_and_crop", (256, 256), (256, 256)),
        ("crop", (300, 280), (256, 256)),
        ("crop", (200, 220), (200, 220)),  # smaller than the crop: left alone (reference __crop)
        ("scale_width", (300, 200), (286, 256)),  # h = max(286 * 200 / 300, crop_size)
        ("scale_width", (200, 400), (286, 572)),  # aspect kept
        ("scale_width", (286, 300), (286, 300)),  # already the target width and tall enough: untouched
        ("scale_width_and_crop", (200, 400), (256, 256)),
        ("none", (301, 203), (300, 204)),  # nearest multiples of 4
        ("none", (256, 256), (256, 256)),
    ],
)
def test_preprocess_mode_output_size(mode, in_size, out_size):
    cfg = DataConfig(preprocess=mode)  # load 286, crop 256
    img = rand_img(np.random.default_rng(1), *in_size)
    for seed in range(3):
        t = apply(img, cfg, get_params(cfg, img.size, random.Random(seed)))
        assert t.shape == (3, out_size[1], out_size[0])
        assert t.dtype == torch.float32 and -1 <= t.min() and t.max() <= 1


@pytest.mark.parametrize("flip,no_flip", [(True, False), (False, False), (True, True)])
def test_transform_matches_manual_pil(flip, no_flip):
    cfg = DataConfig(no_flip=no_flip)
    img = rand_img(np.random.default_rng(2), 256, 256)
    params = {"crop_pos": (13, 27), "flip": flip}
    manual = img.resize((286, 286), Image.Resampling.BICUBIC).crop((13, 27, 13 + 256, 27 + 256))
    if flip and not no_flip:
        manual = manual.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    assert torch.equal(apply(img, cfg, params), ref_tensor(manual))
    # grayscale happens first, as in the reference
    gray = ref_tensor(Image.fromarray(np.array(img.convert("L").resize((286, 286), Image.Resampling.BICUBIC)
                                               .crop((13, 27, 269, 283)))))
    if flip and not no_flip:
        gray = gray.flip(-1)
    assert torch.equal(apply(img, cfg, params, grayscale=True), gray)


def test_scale_width_and_none_match_manual_pil():
    img = rand_img(np.random.default_rng(3), 150, 90)
    cfg = DataConfig(preprocess="scale_width_and_crop", load_size=120, crop_size=64)
    p = {"crop_pos": (5, 7), "flip": False}
    manual = img.resize((120, 72), Image.Resampling.BICUBIC).crop((5, 7, 69, 71))  # 72 = int(max(120*90/150, 64))
    assert torch.equal(apply(img, cfg, p), ref_tensor(manual))
    cfg = DataConfig(preprocess="none")
    manual = img.resize((152, 88), Image.Resampling.BICUBIC)
    assert torch.equal(apply(img, cfg, p), ref_tensor(manual))


def _reference_get_params(opt: DataConfig, size):
    """The reference get_params verbatim (global `random`), for comparison."""
    w, h = size
    new_h, new_w = h, w
    if opt.preprocess == "resize_and_crop":
        new_h = new_w = opt.load_size
    elif opt.preprocess == "scale_width_and_crop":
        new_w = opt.load_size
        new_h = opt.load_size * h // w
    x = random.randint(0, np.maximum(0, new_w - opt.crop_size))
    y = random.randint(0, np.maximum(0, new_h - opt.crop_size))
    flip = random.random() > 0.5
    return {"crop_pos": (x, y), "flip": flip}


@pytest.mark.parametrize("mode", ["resize_and_crop", "crop", "scale_width", "scale_width_and_crop", "none"])
def test_get_params_draws_like_the_reference(mode):
    cfg = DataConfig(preprocess=mode)
    state = random.getstate()
    try:
        for s in range(50):
            size = (256 + 7 * s, 300 - s)
            random.seed(s)
            assert get_params(cfg, size, random.Random(s)) == _reference_get_params(cfg, size)
    finally:
        random.setstate(state)
    # numpy Generators are accepted too, and stay within the same bounds
    g = np.random.default_rng(0)
    for _ in range(100):
        p = get_params(DataConfig(), (256, 256), g)
        assert 0 <= p["crop_pos"][0] <= 30 and 0 <= p["crop_pos"][1] <= 30 and isinstance(p["flip"], bool)


def test_bad_preprocess_settings_name_the_flag():
    img = rand_img(np.random.default_rng(0), 64, 64)
    with pytest.raises(UserError, match="--preprocess"):
        apply(img, DataConfig(preprocess="zoom"), {"crop_pos": (0, 0), "flip": False})
    with pytest.raises(UserError, match="--load_size/--crop_size"):
        get_params(DataConfig(load_size=200, crop_size=256), (256, 256), random.Random(0))
    # 'crop' alone never resizes, so load_size does not matter there
    assert get_params(DataConfig(preprocess="crop", load_size=200, crop_size=256), (300, 300), random.Random(0))
    with pytest.raises(UserError, match="--preprocess"):
        build_dataset(DataConfig(preprocess="zoom"))
    with pytest.raises(UserError, match="--direction"):
        build_dataset(DataConfig(direction="sideways"))


# ------------------------------------------------------------------------------------------------------ datasets ----


@pytest.mark.parametrize("mode", ["resize_and_crop", "crop", "scale_width_and_crop", "none"])
def test_aligned_pairs_share_the_jitter_pixel_for_pixel(tmp_path, mode):
    rng = np.random.default_rng(4)
    for i in range(3):
        half = rand_img(rng, 48, 44)
        write_aligned(tmp_path, f"{i}.png", half, half)  # A and B halves identical
    cfg = cfg_for(tmp_path, preprocess=mode)
    ds = build_dataset(cfg, seed=7)
    assert isinstance(ds, AlignedDataset) and len(ds) == 3
    seen = set()
    for epoch in range(12):
        for i in range(len(ds)):
            A, B, _, _ = ds[(epoch, i)]
            assert torch.equal(A, B), (mode, epoch, i)
            seen.add((i, A.sum().item()))
    assert len(seen) > 3 * 2 or mode == "none"  # the jitter really varied (no crop/flip in 'none' except flip)


def test_two_folder_pairs_share_the_jitter_pixel_for_pixel(tmp_path):
    rng = np.random.default_rng(5)
    (tmp_path / "A").mkdir()
    (tmp_path / "B").mkdir()
    for name in ("x", "y"):
        img = rand_img(rng, 50, 46)
        img.save(tmp_path / "A" / f"{name}.png")
        img.save(tmp_path / "B" / f"{name}.PNG")  # extensions are matched case-insensitively
    ds = build_dataset(cfg_for(tmp_path))
    assert isinstance(ds, TwoFolderDataset) and len(ds) == 2
    outs = set()
    for epoch in range(15):
        for i in range(2):
            A, B, path, _ = ds[(epoch, i)]
            assert torch.equal(A, B)
            outs.add(A.sum().item())
    assert len(outs) > 4
    assert ds.paths == [str(tmp_path / "A" / "x.png"), str(tmp_path / "A" / "y.png")]


def test_aligned_split_and_direction(tmp_path):
    rng = np.random.default_rng(6)
    left, right = rand_img(rng, 40, 40), rand_img(rng, 40, 40)
    write_aligned(tmp_path, "p.png", left, right)
    cfg = dataclasses.replace(cfg_for(tmp_path), preprocess="none", no_flip=True)  # no resampling: exact halves
    a2b = build_dataset(cfg)[0]
    b2a = build_dataset(dataclasses.replace(cfg, direction="BtoA"))[0]
    assert torch.equal(a2b.A, ref_tensor(left)) and torch.equal(a2b.B, ref_tensor(right))
    assert torch.equal(b2a.A, ref_tensor(right)) and torch.equal(b2a.B, ref_tensor(left))
    # with jitter: the same params applied to the left (A) and right (B) halves
    cfg = cfg_for(tmp_path)
    ds = build_dataset(cfg, seed=3)
    params = get_params(cfg, (40, 40), random.Random(derive_seed(3, 0, 0)))
    assert torch.equal(ds[0].A, apply(left, cfg, params)) and torch.equal(ds[0].B, apply(right, cfg, params))


def test_two_folder_direction_and_phase_subfolders(tmp_path):
    rng = np.random.default_rng(7)
    a, b = rand_img(rng, 36, 36), rand_img(rng, 36, 36)
    for side, img in (("A", a), ("B", b)):
        (tmp_path / side / "train").mkdir(parents=True)
        img.save(tmp_path / side / "train" / "k.png")
    cfg = dataclasses.replace(cfg_for(tmp_path), preprocess="none", no_flip=True)
    item = build_dataset(dataclasses.replace(cfg, direction="BtoA"))[0]
    assert torch.equal(item.A, ref_tensor(b)) and torch.equal(item.B, ref_tensor(a))
    assert item.path == str(tmp_path / "A" / "train" / "k.png")


def test_phase_folder_and_auto_layout(tmp_path):
    rng = np.random.default_rng(8)
    write_aligned(tmp_path / "train", "1.png", rand_img(rng, 40, 40), rand_img(rng, 40, 40))
    write_aligned(tmp_path / "val", "1.png", rand_img(rng, 40, 40), rand_img(rng, 40, 40))
    write_aligned(tmp_path / "val", "2.jpg", rand_img(rng, 40, 40), rand_img(rng, 40, 40))
    assert len(build_dataset(cfg_for(tmp_path))) == 1
    assert len(build_dataset(cfg_for(tmp_path, phase="val"))) == 2
    flat = tmp_path / "flat"
    write_aligned(flat, "1.png", rand_img(rng, 40, 40), rand_img(rng, 40, 40))
    assert build_dataset(cfg_for(flat)).paths == [str(flat / "1.png")]  # no train/: the folder itself
    # discovery is not recursive: without train/, a data/ holding only val/ must not be swallowed as training data
    only_val = tmp_path / "only_val"
    write_aligned(only_val / "val", "1.png", rand_img(rng, 40, 40), rand_img(rng, 40, 40))
    with pytest.raises(DataError, match="no images"):
        build_dataset(cfg_for(only_val))


@pytest.mark.parametrize("direction", ["AtoB", "BtoA"])
def test_grayscale_channels_follow_source_and_target(tmp_path, direction):
    rng = np.random.default_rng(9)
    left, right = rand_img(rng, 40, 40), rand_img(rng, 40, 40)
    write_aligned(tmp_path, "p.png", left, right)
    cfg = dataclasses.replace(cfg_for(tmp_path), preprocess="none", no_flip=True, direction=direction)
    item = build_dataset(cfg, input_nc=1, output_nc=3)[0]
    src = right if direction == "BtoA" else left
    assert item.A.shape == (1, 40, 40) and item.B.shape == (3, 40, 40)
    assert torch.equal(item.A, ref_tensor(src.convert("L")))
    item = build_dataset(cfg, input_nc=3, output_nc=1)[0]
    assert item.A.shape == (3, 40, 40) and item.B.shape == (1, 40, 40)
    syn = build_dataset(dataclasses.replace(SMALL, synthetic_size=2), input_nc=1, output_nc=1)[0]
    assert syn.A.shape == syn.B.shape == (1, 32, 32)
    with pytest.raises(UserError, match="--input_nc"):
        build_dataset(cfg, input_nc=4)


def test_items_deterministic_given_seed_epoch_index(tmp_path):
    rng = np.random.default_rng(10)
    for i in range(4):
        write_aligned(tmp_path, f"{i}.png", rand_img(rng, 40, 40), rand_img(rng, 40, 40))
    cfg = cfg_for(tmp_path)
    d1, d2, d3 = build_dataset(cfg, seed=1), build_dataset(cfg, seed=1), build_dataset(cfg, seed=2)
    d2.set_epoch(5)
    for i in reversed(range(4)):  # fetch order does not matter
        assert torch.equal(d1[(5, i)].A, d2[i].A)
    epochs = [torch.stack([d1[(e, i)].A for i in range(4)]) for e in range(3)]
    assert not torch.equal(epochs[0], epochs[1]) and not torch.equal(epochs[1], epochs[2])
    assert not torch.equal(epochs[0], torch.stack([d3[(0, i)].A for i in range(4)]))


# ---------------------------------------------------------------------------------------------------- bad input ----


def test_missing_path_names_the_flag(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(UserError, match="--data") as e:
        build_dataset(cfg_for(missing))
    assert str(missing) in str(e.value)


def test_empty_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match="no images") as e:
        build_dataset(cfg_for(tmp_path))
    assert str(tmp_path) in str(e.value)


def _bad_aligned_folder(tmp_path: Path) -> dict[str, Path]:
    """Two good pairs plus one of each bad kind that the aligned layout can have."""
    rng = np.random.default_rng(11)
    good = [write_aligned(tmp_path, f"good{i}.png", rand_img(rng, 40, 40), rand_img(rng, 40, 40)) for i in range(2)]
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(rng.integers(0, 256, 2000, dtype=np.uint8).tobytes())
    odd = tmp_path / "odd.png"
    rand_img(rng, 81, 40).save(odd)
    return {"good0": good[0], "good1": good[1], "corrupt": corrupt, "odd": odd}


def _truncated_jpeg(path: Path, rng: np.random.Generator) -> Path:
    """A JPEG whose header is fine but whose pixel data is cut short: only decoding can tell."""
    write_aligned(path.parent, path.name, rand_img(rng, 40, 40), rand_img(rng, 40, 40))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def test_each_bad_file_is_a_one_line_data_error_naming_it(tmp_path):
    files = _bad_aligned_folder(tmp_path / "x")
    for kind in ("corrupt", "odd"):
        folder = tmp_path / kind
        folder.mkdir()
        (folder / "good0.png").write_bytes(files["good0"].read_bytes())
        (folder / files[kind].name).write_bytes(files[kind].read_bytes())
        with pytest.raises(DataError) as e:
            build_dataset(cfg_for(folder))
        assert files[kind].name in str(e.value) and "\n" not in str(e.value)
        assert e.value.path == str(folder / files[kind].name)
    assert "odd width 81" in str(e.value)
    # truncated pixel data passes the header check and fails when the item is decoded
    folder = tmp_path / "trunc"
    trunc = _truncated_jpeg(folder / "t.jpg", np.random.default_rng(12))
    ds = build_dataset(cfg_for(folder))
    with pytest.raises(DataError) as e:
        ds[0]
    assert e.value.path == str(trunc) and "cannot decode" in str(e.value) and "\n" not in str(e.value)


def test_two_folder_bad_cases(tmp_path):
    rng = np.random.default_rng(13)
    for side in "AB":
        (tmp_path / side).mkdir()
        rand_img(rng, 30, 30).save(tmp_path / side / "ok.png")
    rand_img(rng, 30, 30).save(tmp_path / "A" / "size.png")
    rand_img(rng, 30, 32).save(tmp_path / "B" / "size.png")
    rand_img(rng, 30, 30).save(tmp_path / "A" / "onlyA.png")
    rand_img(rng, 30, 30).save(tmp_path / "B" / "onlyB.jpg")
    cfg = cfg_for(tmp_path, layout="folders")
    with pytest.raises(DataError, match="onlyA.png.*no counterpart"):
        build_dataset(cfg)
    (tmp_path / "A" / "onlyA.png").unlink()
    with pytest.raises(DataError, match="size.png: size 30x30 differs"):
        build_dataset(cfg)
    (tmp_path / "A" / "size.png").unlink()
    with pytest.raises(DataError, match="onlyB.jpg.*no counterpart"):
        build_dataset(cfg)
    (tmp_path / "B" / "onlyB.jpg").unlink()
    (tmp_path / "B" / "size.png").unlink()
    assert len(build_dataset(cfg)) == 1
    # missing B/ with an explicit folders layout
    (tmp_path / "B" / "ok.png").unlink()
    (tmp_path / "B").rmdir()
    with pytest.raises(DataError, match="B: missing"):
        build_dataset(cfg)


def test_skip_bad_skips_and_counts(tmp_path, caplog):
    files = _bad_aligned_folder(tmp_path)
    trunc = _truncated_jpeg(tmp_path / "trunc.jpg", np.random.default_rng(14))
    cfg = cfg_for(tmp_path, skip_bad=True)
    with caplog.at_level(logging.WARNING, logger="fastp2p.data"):
        ds = build_dataset(cfg)
    # found up front (header): dropped from the dataset
    assert sorted(Path(p).name for p, _ in ds.bad_files) == ["corrupt.jpg", "odd.png"]
    assert sum("skipping bad file" in r.message for r in caplog.records) == 2
    assert ds.paths == [str(files["good0"]), str(files["good1"]), str(trunc)]
    # found while decoding: replaced by the next good item, reported in the item and counted
    item = ds[2]
    assert item.path == str(files["good0"]) and item.bad[0][0] == str(trunc)
    assert len(ds.bad_files) == 3 and ds.bad_files[-1][0] == str(trunc)
    # the two-folder layout: a missing counterpart and a size mismatch are skipped and counted
    root = tmp_path / "folders"
    for side in "AB":
        (root / side).mkdir(parents=True)
        rand_img(np.random.default_rng(0), 30, 30).save(root / side / "ok.png")
    rand_img(np.random.default_rng(0), 30, 30).save(root / "A" / "lonely.png")
    rand_img(np.random.default_rng(0), 30, 30).save(root / "A" / "size.png")
    rand_img(np.random.default_rng(0), 34, 30).save(root / "B" / "size.png")
    ds = build_dataset(cfg_for(root, skip_bad=True))
    assert len(ds) == 1 and sorted(Path(p).name for p, _ in ds.bad_files) == ["lonely.png", "size.png"]


def test_lazily_found_bad_files_are_counted_across_workers(tmp_path):
    rng = np.random.default_rng(15)
    for i in range(5):
        write_aligned(tmp_path, f"{i}.png", rand_img(rng, 40, 40), rand_img(rng, 40, 40))
    trunc = _truncated_jpeg(tmp_path / "9.jpg", rng)
    ds = build_dataset(cfg_for(tmp_path, skip_bad=True))
    assert ds.bad_files == [] and len(ds) == 6
    with make_loader(ds, batch_size=4, num_workers=2, seed=0) as loader:
        n = sum(A.shape[0] for A, _ in loader)
    assert n == 6  # the bad item was replaced, so batch sizes are unchanged
    # found in a worker process (the main process never decoded anything), counted in the main process's dataset
    assert [p for p, _ in loader.bad_files] == [str(trunc)]
    assert loader.bad_files is ds.bad_files


@pytest.mark.parametrize("workers", [0, 2])
def test_errors_in_workers_reach_the_main_process_as_one_line_errors(tmp_path, workers):
    rng = np.random.default_rng(16)
    for i in range(3):
        write_aligned(tmp_path, f"{i}.png", rand_img(rng, 40, 40), rand_img(rng, 40, 40))
    trunc = _truncated_jpeg(tmp_path / "9.jpg", rng)
    loader = make_loader(build_dataset(cfg_for(tmp_path)), batch_size=2, num_workers=workers, seed=0)
    with pytest.raises(DataError) as e:
        list(loader)
    assert e.value.path == str(trunc) and "\n" not in str(e.value)
    # a collate error (mixed sizes) too
    (tmp_path / "9.jpg").unlink()
    write_aligned(tmp_path, "big.png", rand_img(rng, 48, 48), rand_img(rng, 48, 48))
    ds = build_dataset(cfg_for(tmp_path, preprocess="none"))
    with pytest.raises(UserError, match="different sizes") as e:
        list(make_loader(ds, batch_size=4, num_workers=workers, seed=0))
    assert "\n" not in str(e.value)


def test_all_files_bad_is_an_error_even_with_skip_bad(tmp_path):
    (tmp_path / "x.png").write_bytes(b"garbage")
    with pytest.raises(DataError, match="no usable images"):
        build_dataset(cfg_for(tmp_path, skip_bad=True))


# --------------------------------------------------------------------------------------------------- synthetic ----


def test_synthetic_dataset_deterministic_and_learnable_pairs():
    cfg = DataConfig(synthetic_size=64)
    # CPU time, not wall time: other processes on a loaded machine do not count. ~0.3 s on one core; 2 s leaves room
    # for a slow CPU.
    t = time.process_time()
    ds = build_dataset(cfg, seed=0)
    assert time.process_time() - t < 2.0
    assert isinstance(ds, SyntheticDataset) and len(ds) == 64 and len(ds.paths) == 64
    again = SyntheticDataset(cfg, seed=0)
    for i in (0, 17, 63):
        a, b = ds.arrays(i)
        a2, b2 = again.arrays(i)
        assert np.array_equal(a, a2) and np.array_equal(b, b2)
        assert a.shape == b.shape == (286, 286, 3) and not np.array_equal(a, b)
        assert torch.equal(ds[i].A, again[i].A) and torch.equal(ds[i].B, again[i].B)
        assert ds[i].A.shape == (3, 256, 256) and not torch.equal(ds[i].A, ds[i].B)
    # A is a flat label map (few colours), B a textured rendering of it
    a, b = ds.arrays(0)
    assert len(np.unique(a.reshape(-1, 3), axis=0)) <= 7 < len(np.unique(b.reshape(-1, 3), axis=0))
    # pairs differ from each other, the training seed changes only the jitter, other phases get other images
    assert not np.array_equal(ds.arrays(0)[0], ds.arrays(1)[0])
    other_seed = SyntheticDataset(cfg, seed=1)
    assert np.array_equal(other_seed.arrays(0)[0], a) and not torch.equal(other_seed[0].A, ds[0].A)
    val = SyntheticDataset(dataclasses.replace(cfg, phase="val"))
    assert not np.array_equal(val.arrays(0)[0], a)
    with pytest.raises(UserError, match="--synthetic_size"):
        build_dataset(dataclasses.replace(cfg, synthetic_size=0))


def test_synthetic_pairs_get_identical_jitter():
    ds = build_dataset(dataclasses.replace(SMALL, synthetic_size=4), seed=3)
    ds_ref = build_dataset(dataclasses.replace(SMALL, synthetic_size=4, preprocess="resize_and_crop"), seed=3)
    item = ds[1]
    a, b = ds_ref.arrays(1)
    params = get_params(SMALL, (40, 40), random.Random(derive_seed(3, 0, 1)))
    assert torch.equal(item.A, apply(Image.fromarray(a), SMALL, params))
    assert torch.equal(item.B, apply(Image.fromarray(b), SMALL, params))


# ------------------------------------------------------------------------------------------------------ loader ----


def test_loader_shapes_coverage_and_last_partial_batch():
    ds = build_dataset(dataclasses.replace(SMALL, synthetic_size=10), seed=0)
    loader = make_loader(ds, batch_size=4, num_workers=0, seed=0)
    assert len(loader) == 3
    orders = []
    for epoch in range(3):
        batches = list(loader.batches(epoch))
        assert [b.A.shape[0] for b in batches] == [4, 4, 2]  # the reference keeps the last partial batch
        for b in batches:
            assert b.A.dtype == b.B.dtype == torch.float32 and b.A.shape[1:] == b.B.shape[1:] == (3, 32, 32)
            assert b.A.min() >= -1 and b.A.max() <= 1 and b.B.min() >= -1 and b.B.max() <= 1
        paths = [p for b in batches for p in b.paths]
        assert sorted(paths) == sorted(ds.paths)  # every pair exactly once
        orders.append(paths)
    assert orders[0] != orders[1] != orders[2]  # reshuffled every epoch
    assert len(make_loader(ds, 4, 0, 0, drop_last=True)) == 2
    assert [A.shape[0] for A, _ in make_loader(ds, 4, 0, 0, drop_last=True)] == [4, 4]
    # plain iteration runs loader.next_epoch and advances it
    assert loader.next_epoch == 0
    first = [A for A, _ in loader]
    assert loader.next_epoch == 1 and all(torch.equal(x, y.A) for x, y in zip(first, loader.batches(0), strict=True))
    # mid-epoch resume: exactly the remaining batches of that epoch
    full = list(loader.epoch(2))
    for start in (1, 2, 3):
        rest = list(loader.epoch(2, start=start))
        assert len(rest) == 3 - start
        assert all(torch.equal(a, b) for (a, _), (b, _) in zip(rest, full[start:], strict=True))
    with pytest.raises(ValueError):
        list(loader.epoch(0, start=4))
    # no shuffle: file order
    assert [p for b in make_loader(ds, 4, 0, 0, shuffle=False).batches(0) for p in b.paths] == ds.paths


def test_loader_is_independent_of_worker_count_and_global_rng():
    ds = build_dataset(dataclasses.replace(SMALL, synthetic_size=7), seed=5)
    runs = []
    for workers in (0, 2):
        with make_loader(ds, batch_size=3, num_workers=workers, seed=5) as loader:
            torch.manual_seed(workers)  # global RNG state must not matter
            state = torch.get_rng_state()
            runs.append([list(loader.epoch(e)) for e in (0, 1)])
            assert torch.equal(torch.get_rng_state(), state)  # and is not consumed by the loader
    for e in (0, 1):
        for (a0, b0), (a2, b2) in zip(runs[0][e], runs[1][e], strict=True):
            assert torch.equal(a0, a2) and torch.equal(b0, b2)
    assert not torch.equal(runs[0][0][0][0], runs[0][1][0][0])


def test_collate_rejects_mixed_sizes_by_name():
    ds = build_dataset(dataclasses.replace(SMALL, synthetic_size=2))
    a, b = ds[0], ds[1]
    small = a._replace(A=a.A[:, :16, :16], B=a.B[:, :16, :16])
    with pytest.raises(UserError, match="different sizes") as e:
        collate([small, b])
    assert a.path in str(e.value)
    batch = collate([a, b])
    assert batch.A.shape == (2, 3, 32, 32) and batch.paths == [a.path, b.path] and batch.bad == ()


# ------------------------------------------------------------------------------------------------- real facades ----


@pytest.fixture
def facades() -> Path:
    if not (FACADES / "train").is_dir():
        pytest.skip(f"CMP Facades not found at {FACADES} (the shared/ folder beside the repo)")
    return FACADES


def test_facades_aligned_split_matches_reference(facades):
    cfg = DataConfig(data=str(facades), direction="BtoA")
    train = build_dataset(cfg, seed=0)
    assert len(train) == 400 and len(build_dataset(dataclasses.replace(cfg, phase="val"))) == 100
    i = train.paths.index(str(facades / "train" / "1.jpg"))
    item = train[(2, i)]
    ab = Image.open(facades / "train" / "1.jpg").convert("RGB")
    photo, label = ab.crop((0, 0, 256, 256)), ab.crop((256, 0, 512, 256))
    params = get_params(cfg, (256, 256), random.Random(derive_seed(0, 2, i)))
    assert item.A.shape == item.B.shape == (3, 256, 256)
    assert torch.equal(item.A, apply(label, cfg, params)) and torch.equal(item.B, apply(photo, cfg, params))
    batch = next(iter(make_loader(train, batch_size=2, num_workers=0, seed=0)))
    assert batch[0].shape == (2, 3, 256, 256)
