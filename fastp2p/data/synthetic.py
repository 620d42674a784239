"""The built-in paired dataset used when ``--data`` is not given: deterministic, generated in memory, learnable.

Each pair is a little "facade": A is a flat-colour label map (background, wall, windows with sills, a door, cornices,
round ornaments; colours in the spirit of the CMP Facades labels), B is a photo-like rendering of it computed from
the label map alone: a per-class base colour plus a texture laid out in each shape's own coordinates (bricks on the
wall, a glass gradient and frame in windows, wood grain on the door, bars on sills, a shaded disc for ornaments), and a
soft shadow under every shape edge. Because texture phase follows the shape, not the canvas, B is (almost) a function
of what a crop of A shows, so pix2pix can learn A -> B (or B -> A with ``--direction BtoA``).

Pairs are generated once from ``(content_seed, phase, index)`` with numpy at ``image_size`` (default: the larger of
load_size and crop_size, rounded up to a multiple of 4 for --preprocess none, so that the resize step of the
preprocessing is a no-op copy) and then go through the
same reference transforms as real data, with the same per-(seed, epoch, index) jitter. Content does not depend on the
training seed, so runs with different seeds see the same images; other phases ('val', 'test') get different images.
64 pairs at 286x286 take about 0.3 s on one core.
"""

from __future__ import annotations

import zlib

import numpy as np
from PIL import Image

from ..config import DataConfig
from ..errors import UserError
from .datasets import PairDataset

# class ids
BACKGROUND, WALL, WINDOW, DOOR, SILL, ORNAMENT, CORNICE = range(7)

LABEL_COLOURS = np.array(
    [
        (0, 0, 170),  # background
        (0, 85, 255),  # wall
        (0, 170, 255),  # window
        (170, 0, 0),  # door
        (255, 255, 0),  # sill / balcony
        (255, 85, 0),  # ornament
        (85, 255, 170),  # cornice
    ],
    dtype=np.uint8,
)

PHOTO_COLOURS = np.array(
    [
        (150, 185, 220),  # sky
        (196, 160, 122),  # sandstone
        (45, 60, 78),  # glass
        (112, 70, 38),  # wood
        (70, 70, 76),  # iron
        (222, 212, 190),  # plaster
        (178, 168, 156),  # stone
    ],
    dtype=np.float32,
)

# Keep pre-generated pairs in memory up to this many bytes; bigger synthetic sets are generated on demand.
_CACHE_BYTES = 512 << 20


class _Canvas:
    """Label map plus, per pixel, the position inside (and size of) the shape that painted it."""

    def __init__(self, size: int):
        self.size = size
        self.label = np.zeros((size, size), np.uint8)
        self.u = np.tile(np.arange(size, dtype=np.float32), (size, 1))  # x within the shape
        self.v = self.u.T.copy()  # y within the shape
        self.w = np.full((size, size), size, np.float32)  # shape width
        self.h = np.full((size, size), size, np.float32)  # shape height

    def rect(self, cls: int, x0: int, y0: int, x1: int, y1: int) -> None:
        s = self.size
        x0, y0, x1, y1 = max(0, x0), max(0, y0), min(s, x1), min(s, y1)
        if x1 <= x0 or y1 <= y0:
            return
        win = (slice(y0, y1), slice(x0, x1))
        self.label[win] = cls
        self.u[win] = np.arange(x1 - x0, dtype=np.float32)[None, :]
        self.v[win] = np.arange(y1 - y0, dtype=np.float32)[:, None]
        self.w[win] = x1 - x0
        self.h[win] = y1 - y0

    def disc(self, cls: int, cx: int, cy: int, r: int) -> None:
        s = self.size
        x0, y0, x1, y1 = max(0, cx - r), max(0, cy - r), min(s, cx + r + 1), min(s, cy + r + 1)
        if x1 <= x0 or y1 <= y0:
            return
        yy, xx = np.ogrid[y0:y1, x0:x1]
        m = (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
        win = (slice(y0, y1), slice(x0, x1))
        self.label[win][m] = cls
        # u, v relative to the disc's bounding box; w = h = diameter
        self.u[win][m] = np.broadcast_to(xx - (cx - r), m.shape)[m]
        self.v[win][m] = np.broadcast_to(yy - (cy - r), m.shape)[m]
        self.w[win][m] = 2 * r + 1
        self.h[win][m] = 2 * r + 1


def _layout(rng: np.random.Generator, s: int) -> _Canvas:
    c = _Canvas(s)
    f = lambda a, b: int(rng.uniform(a, b) * s)  # a random fraction of the side, in pixels
    wx0, wx1, wy0 = f(0.02, 0.15), f(0.85, 0.98), f(0.05, 0.30)
    c.rect(WALL, wx0, wy0, wx1, s)
    ww = wx1 - wx0
    # cornices: a ledge under the roof line and sometimes between storeys
    c.rect(CORNICE, wx0 - f(0, 0.03), wy0, wx1 + f(0, 0.03), wy0 + f(0.02, 0.05))
    rows, cols = int(rng.integers(2, 5)), int(rng.integers(2, 6))
    door_w = f(0.10, 0.18)
    top = wy0 + f(0.06, 0.10)
    storey = (s - top - f(0.15, 0.25)) / rows
    cell = ww / cols
    win_w = cell * rng.uniform(0.35, 0.7)
    win_h = storey * rng.uniform(0.45, 0.75)
    sills = rng.random() < 0.6
    for r in range(rows):
        y0 = int(top + r * storey + (storey - win_h) / 2)
        if r and rng.random() < 0.5:
            c.rect(CORNICE, wx0, int(top + r * storey) - 3, wx1, int(top + r * storey) + 3)
        for k in range(cols):
            x0 = int(wx0 + k * cell + (cell - win_w) / 2)
            c.rect(WINDOW, x0, y0, x0 + int(win_w), y0 + int(win_h))
            if sills:
                c.rect(SILL, x0 - 3, y0 + int(win_h), x0 + int(win_w) + 3, y0 + int(win_h) + max(3, s // 40))
    dx = int(rng.uniform(wx0 + 0.1 * ww, wx1 - 0.1 * ww - door_w))
    c.rect(DOOR, dx, s - f(0.14, 0.22), dx + door_w, s)
    for _ in range(int(rng.integers(0, 4))):
        c.disc(ORNAMENT, int(rng.uniform(wx0, wx1)), int(rng.uniform(wy0, s * 0.8)), f(0.02, 0.05))
    return c


def _render(c: _Canvas) -> np.ndarray:
    """The photo-like B for a canvas: a deterministic function of the shapes (never of the random generator)."""
    L, u, v, w, h = c.label, c.u, c.v, c.w, c.h
    shade = np.zeros(L.shape, np.float32)  # brightness offset added to all channels

    m = L == BACKGROUND  # sky: lighter towards the horizon
    shade[m] = 35 * (v[m] / h[m]) - 10
    m = L == WALL  # running-bond bricks: 6 px courses, 14 px bricks, dark mortar
    course = np.floor(v[m] / 6)
    mortar = (v[m] % 6 < 1) | ((u[m] + 7 * (course % 2)) % 14 < 1)
    shade[m] = np.where(mortar, -45.0, 6 * np.sin(course * 1.7))  # a slight per-course tint
    m = L == WINDOW  # glass: a reflection gradient, a light frame 2 px wide
    frame = (u[m] < 2) | (v[m] < 2) | (u[m] >= w[m] - 2) | (v[m] >= h[m] - 2)
    shade[m] = np.where(frame, 180.0, 70 * (1 - v[m] / h[m]) - 10)
    m = L == DOOR  # wood grain, darker towards the bottom
    shade[m] = 14 * np.sin(u[m] * 0.9) - 25 * v[m] / h[m]
    m = L == SILL  # wrought-iron bars
    shade[m] = np.where(u[m] % 5 < 2, -30.0, 25.0)
    m = L == ORNAMENT  # a lit disc: bright centre, dark rim
    rr = np.hypot(u[m] - (w[m] - 1) / 2, v[m] - (h[m] - 1) / 2) / (w[m] / 2)
    shade[m] = 30 - 70 * rr
    m = L == CORNICE  # bevel: lit top, shaded bottom
    shade[m] = 40 - 80 * v[m] / np.maximum(h[m] - 1, 1)

    # a soft shadow for 4 px under every horizontal edge between different classes
    edge = np.zeros(L.shape, bool)
    edge[1:] = L[1:] != L[:-1]
    shadow = np.zeros(L.shape, np.float32)
    for d in range(4):
        shadow[d:] = np.maximum(shadow[d:], edge[: L.shape[0] - d] * (28 - 6 * d))
    shade -= shadow - 0.5  # +0.5: round to nearest in the uint8 cast below
    img = np.take(PHOTO_COLOURS, L, axis=0)  # (s, s, 3) float32; np.take is ~4x faster than PHOTO_COLOURS[L]
    img += shade[..., None]
    np.clip(img, 0, 255, out=img)
    return img.astype(np.uint8)


def generate_pair(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(A label map, B photo), uint8 HWC arrays of ``size`` x ``size``."""
    c = _layout(rng, size)
    return np.take(LABEL_COLOURS, c.label, axis=0), _render(c)


class SyntheticDataset(PairDataset):
    """``cfg.synthetic_size`` synthetic pairs (A = labels, B = photo; ``direction`` swaps as for real data)."""

    def __init__(self, cfg: DataConfig, input_nc: int = 3, output_nc: int = 3, seed: int = 0,
                 content_seed: int = 0, image_size: int | None = None):
        super().__init__(cfg, input_nc, output_nc, seed)
        n = int(cfg.synthetic_size)
        if n < 1:
            raise UserError(f"--synthetic_size must be >= 1 (got {n})")
        size = int(image_size or max(cfg.load_size, cfg.crop_size))
        if image_size is None and cfg.preprocess == "none":
            size = -(-size // 4) * 4  # already a multiple of 4: no resampling by the 'none' step
        self.image_size = size
        self.content_seed = int(content_seed)
        self._phase_key = zlib.crc32(cfg.phase.encode())  # a stable (unlike hash()) per-phase stream
        self.paths = [f"synthetic:{cfg.phase}/{i:05d}" for i in range(n)]
        self._cache: list[tuple[np.ndarray, np.ndarray]] | None = None
        if 2 * n * self.image_size**2 * 3 <= _CACHE_BYTES:
            self._cache = [self._generate(i) for i in range(n)]

    def _generate(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.content_seed, self._phase_key, i])
        return generate_pair(rng, self.image_size)

    def arrays(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """The untransformed (A, B) uint8 arrays of pair ``i`` (file order: A = labels)."""
        return self._cache[i] if self._cache is not None else self._generate(i)

    def _load(self, j: int) -> tuple[Image.Image, Image.Image]:
        a, b = self.arrays(j)
        return Image.fromarray(a), Image.fromarray(b)
