"""Paired image datasets: the reference aligned layout (A|B side by side in one file), a two-folder layout (``A/`` and
``B/`` with matching file names) and, via ``build_dataset``, the built-in synthetic set.

Item contract (every dataset here): ``dataset[i]`` is a ``Pair(A, B, path, bad)`` named tuple

- ``A``: the network *input* (source), ``B``: the *target*, float32 CHW tensors in [-1, 1]. ``direction='BtoA'`` is
  resolved here, so consumers never look at it. ``A`` has ``input_nc`` channels, ``B`` has ``output_nc`` (1 ->
  grayscale). The reference swaps ``input_nc``/``output_nc`` by direction inside its dataset and the source by direction
  in the model; the net effect there is the same as here: the source image gets ``input_nc``, the target ``output_nc``.
- ``path``: the file the pair came from (for the two-folder layout, the file in ``A/``; ``dataset.pairs`` has both).
- ``bad``: ``(path, problem)`` for each file that failed to decode while producing this item (only with
  ``skip_bad``; normally empty). This is how bad files found lazily inside DataLoader worker processes reach the main
  process: the collate function gathers them and the loader merges them into the main process's ``dataset.bad_files``.

One ``get_params`` draw per pair drives both halves (same crop, same flip), as in the reference. The draw comes from
``random.Random(derive_seed(seed, epoch, index))``, so an item is a pure function of (files, config, seed, epoch,
index): independent of worker count, of the order items are fetched in and of global RNG state. ``dataset[i]`` uses
``dataset.epoch`` (``set_epoch``); ``dataset[(epoch, i)]`` names the epoch explicitly, which is what the loader's
sampler sends, so persistent workers need no epoch broadcast.

Bad input. Cheap checks run up front when the dataset is built: each file's header is opened (format, size: no pixel
decoding), giving an error for unreadable files, odd-width aligned pairs, A/B size mismatches and missing counterparts.
Decoding errors (truncated or corrupt pixel data) can only be seen when the pixels are decoded, in ``__getitem__``.
Without ``cfg.skip_bad`` each problem raises a one-line ``DataError`` naming the file. With ``skip_bad`` the file is
logged (warning, logger ``fastp2p.data``), recorded in ``dataset.bad_files`` and skipped: up front it is dropped from
the dataset; found lazily, the item is replaced by the next good index (wrapping around) and the bad file is reported
in ``Pair.bad``, so that epoch holds one duplicate pair. Known bad indices are remembered per process, not re-decoded.
"""

from __future__ import annotations

import logging
import random
import struct
import zlib
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from ..config import DataConfig
from ..errors import DataError, UserError
from ..images import open_image
from .transforms import apply, check_preprocess, get_params

log = logging.getLogger("fastp2p.data")

IMG_EXTENSIONS = (".png", ".jpg", ".jpeg")
LAYOUTS = ("auto", "aligned", "folders")
DIRECTIONS = ("AtoB", "BtoA")

# What PIL raises on bad files: OSError (incl. UnidentifiedImageError, "image file is truncated"), SyntaxError (broken
# PNG chunks), ValueError/EOFError/IndexError/struct.error/zlib.error from decoders on malformed data, and
# DecompressionBombError for absurd sizes (``open_image`` turns those into a DataError naming --max_pixels first).
# Anything else is a bug and propagates.
DECODE_ERRORS: tuple[type[BaseException], ...] = (
    OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error, zlib.error, Image.DecompressionBombError,
)

BadFile = tuple[str, str]  # (path, problem)


class Pair(NamedTuple):
    A: torch.Tensor  # source (network input), float32 (input_nc, H, W) in [-1, 1]
    B: torch.Tensor  # target, float32 (output_nc, H, W) in [-1, 1]
    path: str
    bad: tuple[BadFile, ...] = ()  # files skipped (skip_bad) while producing this item


def derive_seed(*keys: int) -> int:
    """A 63-bit seed mixed from integer keys (e.g. seed, epoch, index) with numpy's SeedSequence hash, so nearby keys
    give unrelated streams. Negative keys are mapped into the unsigned range SeedSequence accepts."""
    entropy = [int(k) % (1 << 64) for k in keys]
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0] >> np.uint64(1))


def _one_line(e: BaseException) -> str:
    return " ".join(f"{type(e).__name__}: {e}".split())


def find_images(folder: Path) -> list[Path]:
    """PNG/JPEG files directly in ``folder``, sorted by path string (the reference's order).

    Not recursive, unlike the reference's make_dataset: every official pix2pix dataset is flat, and when
    ``data/<phase>`` is missing we fall back to ``data/`` itself, where recursing would silently swallow ``val/`` and
    ``test/`` as training data."""
    files = [p for p in folder.iterdir() if p.suffix.lower() in IMG_EXTENSIONS and p.is_file()]
    return sorted(files, key=str)


def probe_size(path: Path, max_pixels: int | None = None) -> tuple[int, int]:
    """(w, h) from the image header only (no pixel decoding); ``DataError`` when PIL cannot identify the file or it
    claims more than ``max_pixels`` (default ``DEFAULT_MAX_PIXELS``, see ``fastp2p.images``)."""
    try:
        with open_image(path, max_pixels) as im:
            w, h = im.size
    except DataError:
        raise
    except DECODE_ERRORS as e:
        raise DataError(path, f"not a readable image ({_one_line(e)})") from e
    if w < 1 or h < 1:
        raise DataError(path, f"empty image ({w}x{h})")
    return w, h


def load_rgb(path: str | Path, max_pixels: int | None = None) -> Image.Image:
    """Decode fully and convert to RGB (the reference's ``Image.open(p).convert('RGB')``); ``DataError`` on any
    decoding problem or a size over ``max_pixels``. ``load()`` forces the decode here so truncation is caught here,
    not inside a later transform."""
    try:
        with open_image(path, max_pixels) as im:
            im.load()
            return im.convert("RGB")
    except DataError:
        raise
    except DECODE_ERRORS as e:
        raise DataError(path, f"cannot decode image ({_one_line(e)})") from e


def check_data_config(cfg: DataConfig, input_nc: int, output_nc: int) -> None:
    """Everything about the config that can be checked before touching files (``UserError`` naming the flag)."""
    check_preprocess(cfg)
    if cfg.direction not in DIRECTIONS:
        raise UserError(f"--direction: unknown direction {cfg.direction!r}; choose AtoB or BtoA")
    if cfg.layout not in LAYOUTS:
        raise UserError(f"--layout: unknown layout {cfg.layout!r}; choose one of {', '.join(LAYOUTS)}")
    for flag, nc in (("--input_nc", input_nc), ("--output_nc", output_nc)):
        if nc not in (1, 3):
            raise UserError(f"{flag}: {nc} channels not supported for images; use 3 (RGB) or 1 (grayscale)")


class PairDataset(Dataset):
    """Common machinery: item RNG, direction, transforms, bad-file bookkeeping. Subclasses fill ``self.paths`` and
    implement ``_load(j)`` -> (A image, B image) in *file* order (before the direction swap)."""

    def __init__(self, cfg: DataConfig, input_nc: int = 3, output_nc: int = 3, seed: int = 0):
        check_data_config(cfg, input_nc, output_nc)
        self.cfg = cfg
        self.input_nc = input_nc
        self.output_nc = output_nc
        self.seed = int(seed)
        self.epoch = 0
        self.paths: list[str] = []
        self.bad_files: list[BadFile] = []
        self._bad_paths: set[str] = set()
        self._bad_index: dict[int, BadFile] = {}  # lazily found bad items, per process

    # -- bookkeeping -------------------------------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Epoch used by ``dataset[i]`` (``dataset[(epoch, i)]`` overrides it)."""
        self.epoch = int(epoch)

    def record_bad(self, path: str | Path, problem: str, warn: bool = True) -> bool:
        """Add a bad file once (by path); returns whether it was new."""
        path = str(path)
        if path in self._bad_paths:
            return False
        self._bad_paths.add(path)
        self.bad_files.append((path, problem))
        if warn:
            log.warning("skipping bad file %s: %s", path, problem)
        return True

    def _bad(self, err: DataError) -> None:
        """Raise ``err`` unless skip_bad, in which case it is recorded (used while building the file list)."""
        if not self.cfg.skip_bad:
            raise err
        self.record_bad(err.path, err.problem)

    def _require_items(self, where: Path) -> None:
        if not self.paths:
            first = f" (first: {self.bad_files[0][0]}: {self.bad_files[0][1]})" if self.bad_files else ""
            raise DataError(where, f"no usable images: all {len(self.bad_files)} candidate file(s) were bad{first}")

    # -- items -------------------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.paths)

    def _load(self, j: int) -> tuple[Image.Image, Image.Image]:
        raise NotImplementedError

    def _transform(self, a: Image.Image, b: Image.Image, rng: random.Random) -> tuple[torch.Tensor, torch.Tensor]:
        src, tgt = (b, a) if self.cfg.direction == "BtoA" else (a, b)
        params = get_params(self.cfg, src.size, rng)  # one draw for both halves: identical crop and flip
        return (apply(src, self.cfg, params, grayscale=self.input_nc == 1),
                apply(tgt, self.cfg, params, grayscale=self.output_nc == 1))

    def __getitem__(self, key: int | tuple[int, int]) -> Pair:
        epoch, index = key if isinstance(key, tuple) else (self.epoch, key)
        n = len(self)
        index = int(index)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for a dataset of {n} pairs")
        index %= n
        # Only draws after a successful decode consume the rng, so a skipped file does not shift the jitter.
        rng = random.Random(derive_seed(self.seed, epoch, index))
        bad: list[BadFile] = []
        for step in range(n):
            j = (index + step) % n
            if j in self._bad_index:
                bad.append(self._bad_index[j])
                continue
            try:
                a, b = self._load(j)
            except DataError as e:
                if not self.cfg.skip_bad:
                    raise
                entry = (e.path, e.problem)
                self._bad_index[j] = entry
                self.record_bad(*entry)
                bad.append(entry)
                continue
            A, B = self._transform(a, b, rng)
            return Pair(A, B, self.paths[j], tuple(bad))
        raise DataError(self.paths[index], "no readable image left in the dataset: every file failed to decode")


class AlignedDataset(PairDataset):
    """The reference layout: each file holds A | B side by side; A is the left half ``[0, w2)``, B the right half
    ``[w2, w)`` with ``w2 = int(w / 2)``. ``root`` is the folder holding the images (``build_dataset`` resolves the
    phase sub-folder). An odd width is an error here (the reference silently drops a column from A)."""

    def __init__(self, root: str | Path, cfg: DataConfig, input_nc: int = 3, output_nc: int = 3, seed: int = 0):
        super().__init__(cfg, input_nc, output_nc, seed)
        self.root = _existing_dir(root)
        files = find_images(self.root)
        if not files:
            raise DataError(self.root, f"no images ({', '.join(IMG_EXTENSIONS)}) found")
        for p in files:
            try:
                w, _ = probe_size(p, cfg.max_pixels)
                if w % 2:
                    raise DataError(p, f"odd width {w}: an aligned pair must be two equal halves (A|B) side by side")
            except DataError as e:
                self._bad(e)
                continue
            self.paths.append(str(p))
        self._require_items(self.root)

    def _load(self, j: int) -> tuple[Image.Image, Image.Image]:
        path = self.paths[j]
        ab = load_rgb(path, self.cfg.max_pixels)
        w, h = ab.size
        if w % 2:  # the file changed since it was probed
            raise DataError(path, f"odd width {w}: an aligned pair must be two equal halves (A|B) side by side")
        w2 = int(w / 2)
        return ab.crop((0, 0, w2, h)), ab.crop((w2, 0, w, h))


class TwoFolderDataset(PairDataset):
    """``root/A/<name>.<ext>`` paired with ``root/B/<name>.<ext>``: matched by file name without the extension (so
    ``A/x.png`` pairs with ``B/x.jpg``). When ``root/A/<phase>`` and ``root/B/<phase>`` exist (the layout
    the reference's ``combine_A_and_B.py`` reads) those are used. Each file needs a same-size counterpart."""

    def __init__(self, root: str | Path, cfg: DataConfig, input_nc: int = 3, output_nc: int = 3, seed: int = 0):
        super().__init__(cfg, input_nc, output_nc, seed)
        self.root = _existing_dir(root)
        dir_a, dir_b = self.root / "A", self.root / "B"
        for d in (dir_a, dir_b):
            if not d.is_dir():
                raise DataError(d, "missing: the two-folder layout needs A/ and B/ sub-folders")
        if (dir_a / cfg.phase).is_dir() and (dir_b / cfg.phase).is_dir():
            dir_a, dir_b = dir_a / cfg.phase, dir_b / cfg.phase
        self.dir_a, self.dir_b = dir_a, dir_b
        index_a, index_b = self._index(dir_a), self._index(dir_b)
        self.pairs: list[tuple[str, str]] = []
        for key, pa in index_a.items():
            pb = index_b.get(key)
            try:
                if pb is None:
                    raise DataError(pa, f"no counterpart in {dir_b} (expected {key}{{{','.join(IMG_EXTENSIONS)}}})")
                sa, sb = probe_size(pa, cfg.max_pixels), probe_size(pb, cfg.max_pixels)
                if sa != sb:
                    raise DataError(pa, f"size {sa[0]}x{sa[1]} differs from its counterpart {pb} ({sb[0]}x{sb[1]})")
            except DataError as e:
                self._bad(e)
                continue
            self.pairs.append((str(pa), str(pb)))
        for key, pb in index_b.items():
            if key not in index_a:
                self._bad(DataError(pb, f"no counterpart in {dir_a} (expected {key}{{{','.join(IMG_EXTENSIONS)}}})"))
        self.paths = [pa for pa, _ in self.pairs]
        self._require_items(self.root)

    def _index(self, folder: Path) -> dict[str, Path]:
        files = find_images(folder)
        if not files:
            raise DataError(folder, f"no images ({', '.join(IMG_EXTENSIONS)}) found")
        index: dict[str, Path] = {}
        for p in files:  # sorted, so the dict (and the dataset) is in path order
            key = p.stem
            if key in index:
                self._bad(DataError(p, f"ambiguous: {index[key].name} has the same name; keep one of them"))
                continue
            index[key] = p
        return index

    def _load(self, j: int) -> tuple[Image.Image, Image.Image]:
        pa, pb = self.pairs[j]
        a, b = load_rgb(pa, self.cfg.max_pixels), load_rgb(pb, self.cfg.max_pixels)
        if a.size != b.size:
            raise DataError(pa, f"size {a.size[0]}x{a.size[1]} differs from its counterpart {pb} "
                                f"({b.size[0]}x{b.size[1]})")
        return a, b


def _existing_dir(root: str | Path) -> Path:
    root = Path(root).expanduser()
    if not root.exists():
        raise UserError(f"--data: {root} does not exist")
    if not root.is_dir():
        raise UserError(f"--data: {root} is not a folder (give the dataset folder, not a file)")
    return root


def resolve_root(cfg: DataConfig) -> tuple[Path, str]:
    """(folder, layout) for ``cfg.data``: ``data/<phase>`` when it exists, else ``data`` itself; layout 'auto' is
    'folders' when that folder has both A/ and B/ sub-folders, else 'aligned'."""
    if cfg.data is None:
        raise UserError("--data: no dataset folder given")
    root = _existing_dir(cfg.data)
    if (root / cfg.phase).is_dir():
        root = root / cfg.phase
    layout = cfg.layout
    if layout == "auto":
        layout = "folders" if (root / "A").is_dir() and (root / "B").is_dir() else "aligned"
    return root, layout
