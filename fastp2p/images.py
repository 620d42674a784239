"""Opening untrusted image files: PIL's ``Image.open`` with one pixel limit (``--max_pixels``) checked on the header,
before any pixel is decoded, so a few-KB PNG claiming 30000 x 30000 is a one-line ``DataError`` naming the file, not a
``DecompressionBombError`` traceback or 2.7 GB of memory.

PIL has its own guard (``Image.MAX_IMAGE_PIXELS``, default 89,478,485): it *warns* above that size and raises above
twice that. Here both zones are errors, with the same message as this module's own check:

- ``max_pixels`` defaults to PIL's default (``fastp2p.config.DEFAULT_MAX_PIXELS``); a header over it is refused;
- the ``fastp2p`` command turns PIL's ``DecompressionBombWarning`` into an exception (``cli.main``), which lands here;
- a ``max_pixels`` above PIL's current limit raises PIL's limit to it (process-wide: PIL has no per-call limit), so
  the flag, not PIL's default, decides.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from pathlib import Path

from PIL import Image

from .config import DEFAULT_MAX_PIXELS
from .errors import DataError, UserError

BOMBS = (Image.DecompressionBombError, Image.DecompressionBombWarning)


def limit_of(max_pixels: int | None) -> int:
    """The limit ``max_pixels`` means (None: the default); ``UserError`` naming --max_pixels when it is not >= 1."""
    if max_pixels is None:
        return DEFAULT_MAX_PIXELS
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1:
        raise UserError(f"--max_pixels {max_pixels!r}: must be a whole number >= 1 (default {DEFAULT_MAX_PIXELS:,})")
    return max_pixels


def too_many(path, w: int, h: int, limit: int) -> DataError:
    return DataError(path, f"{w}x{h} is {w * h:,} pixels, more than --max_pixels {limit:,}; if the image is genuine, "
                           "raise --max_pixels")


def _follow_pil(limit: int) -> None:
    # PIL warns above Image.MAX_IMAGE_PIXELS and refuses above twice that: keep it from refusing below our limit.
    current = Image.MAX_IMAGE_PIXELS
    if current is not None and current < limit:
        Image.MAX_IMAGE_PIXELS = limit


@contextlib.contextmanager
def open_image(path: str | Path, max_pixels: int | None = None) -> Iterator[Image.Image]:
    """``with open_image(p) as im:`` PIL's lazy ``Image.open`` (header read, nothing decoded) whose size is at most
    ``max_pixels``; otherwise a ``DataError`` naming ``path``. Other open errors (unidentified, truncated header)
    propagate as PIL raises them, for the caller's own message."""
    limit = limit_of(max_pixels)
    _follow_pil(limit)
    try:
        im = Image.open(path)
    except BOMBS as e:
        m = re.search(r"\((\d+) pixels\)", str(e))
        claimed = f"{int(m.group(1)):,} pixels" if m else "more pixels than PIL allows"
        raise DataError(path, f"claims {claimed}, more than --max_pixels {limit:,}; if the image is genuine, raise "
                              "--max_pixels") from None
    with im:
        w, h = im.size
        if w * h > limit:
            raise too_many(path, w, h, limit)
        yield im


def check_frame_size(w: int, h: int, limit: int | None, what: str) -> None:
    """``UserError`` naming ``what`` (a flag or a file) when a w x h frame is over the pixel limit."""
    lim = limit_of(limit)
    if w * h > lim:
        raise UserError(f"{what}: {w}x{h} is {w * h:,} pixels a frame, more than --max_pixels {lim:,}; raise "
                        "--max_pixels if that is really the size")
