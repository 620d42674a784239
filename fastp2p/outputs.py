"""Output paths: what every subcommand checks before it writes, and the markers that say a file is its own.

Rules (one place for translate, eval, export, convert, build-engine, video and train):

- An output never replaces an input (the same file, or an input folder given as the output folder), not even with
  ``--overwrite``.
- An existing file is replaced only if it is an earlier output of the same kind, told by a marker fastp2p writes into
  it (``marker(kind)`` = ``"fastp2p <kind>"``), or with ``--overwrite``:

  ======================  ===============================================================================
  PNG (translate, eval)   a ``tEXt`` chunk ``Software: fastp2p translate`` / ``fastp2p eval``
  eval folder             its ``metrics.json`` is an earlier eval's (or ``images/`` holds marked PNGs)
  .safetensors (convert)  the ``fastp2p`` header metadata (format + ``source_sha256``); ``.json`` sidecar alike
  .pth (convert)          the zip archive's comment ``fastp2p convert`` (``torch.load`` ignores it)
  .onnx (export, build)   the ``fastp2p.format`` entry of ``metadata_props``
  .plan (build-engine)    its ``.plan.json`` sidecar's ``format``
  video (translate)       the container's ``comment`` tag (mp4, mov, mkv, webm, avi; .ts / .mpg have no tags)
  ======================  ===============================================================================

- A path of the wrong type (a file where a folder is expected, a folder where a file is, a parent that is a file)
  or a place that cannot be written is one ``UserError`` naming the flag and the path, raised before anything is
  written. "Cannot be written" is probed with a temporary file in the nearest existing folder (``os.access`` says
  yes to root almost everywhere); failures at the write itself go through ``writing``.

The readers here use the standard library only (PNG chunks, JSON, zip comments); the formats' own libraries read
the rest (``safe_open`` for safetensors headers, ``onnx.load`` for ONNX metadata), and callers combine them with their
own format constants into ``ours(path) -> bool``.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import struct
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from .errors import UserError, first_line

OVERWRITE_HINT = "pass --overwrite to replace it, or choose another path"


def marker(kind: str) -> str:
    """The text fastp2p writes into (or beside) an output of ``kind``: ``"fastp2p translate"``."""
    return f"fastp2p {kind}"


# ---------------------------------------------------------------------------------------------------------------------
# path checks
# ---------------------------------------------------------------------------------------------------------------------
def _real(p: str | Path) -> str:
    return os.path.normcase(os.path.realpath(os.fspath(p)))


def _resolved(inputs: Iterable[str | Path | None]) -> dict[str, Path]:
    return {_real(p): Path(p) for p in inputs if p is not None and str(p) != ""}


def _writable_location(path: Path, flag: str, shown: Path) -> None:
    """``path`` (a folder to create or reuse) can be made: no ancestor is a file, the nearest existing one is
    writable (probed with a temporary file that is removed at once)."""
    anc = path
    while not os.path.lexists(anc):
        if anc.parent == anc:
            break
        anc = anc.parent
    if os.path.lexists(anc) and not anc.is_dir():
        if anc == shown:
            raise UserError(f"{flag} {shown}: is a file, not a folder; give a folder path (or remove the file)")
        raise UserError(f"{flag} {shown}: {anc} is a file, not a folder, so nothing can be written under it; "
                        "choose another path")
    try:
        fd, probe = tempfile.mkstemp(prefix=".fastp2p-probe-", dir=anc)
    except OSError as e:
        raise UserError(f"{flag} {shown}: cannot write in {anc} ({e.strerror or e}); choose a writable "
                        "location") from None
    os.close(fd)
    os.unlink(probe)


def output_dir(path: str | Path, flag: str, *, inputs: Iterable[str | Path | None] = ()) -> Path:
    """Check a folder the command will create or write into; refuse an input folder (``inputs``: the input files and
    folders). Nothing is created."""
    path = Path(path)
    _writable_location(path, flag, path)
    here = _real(path)
    for real, p in _resolved(inputs).items():
        if real == here and Path(real).is_dir():
            raise UserError(f"{flag} {path}: is an input folder ({p}); its files would be replaced by their outputs; "
                            "choose another output folder")
    return path


def _check_existing(path: Path, flag: str, *, kind: str, ours: Callable[[Path], bool], inputs: dict[str, Path],
                    overwrite: bool) -> None:
    real = _real(path)
    if real in inputs:
        raise UserError(f"{flag} {path}: would overwrite the input {inputs[real]}; choose another output path")
    if not os.path.lexists(path):
        return
    if path.is_dir():
        raise UserError(f"{flag} {path}: is a folder, where a file is to be written; give a file path (or remove the "
                        "folder)")
    if not os.access(path, os.W_OK):
        raise UserError(f"{flag} {path}: the existing file is not writable; choose another path")
    if not overwrite and not ours(path):
        raise UserError(f"{flag} {path}: exists and is not an earlier {marker(kind)} output; {OVERWRITE_HINT}")


def output_file(path: str | Path, flag: str, *, kind: str, ours: Callable[[Path], bool],
                inputs: Iterable[str | Path | None] = (), overwrite: bool = False) -> Path:
    """Check one output file: its folder can be made and written, it is no input, and an existing file there is a
    folder of no one (refused), an earlier output of ``kind`` (``ours(path)``), or ``overwrite`` allows it."""
    path = Path(path)
    _writable_location(path.parent if str(path.parent) else Path("."), flag, path)
    _check_existing(path, flag, kind=kind, ours=ours, inputs=_resolved(inputs), overwrite=overwrite)
    return path


def output_files(folder: str | Path, names: Iterable[str], flag: str, *, kind: str, ours: Callable[[Path], bool],
                 inputs: Iterable[str | Path | None] = (), overwrite: bool = False) -> list[Path]:
    """``output_file`` for each ``folder / name`` (``folder`` already checked by ``output_dir``); a sub-folder on
    the way (``images/`` of eval) that exists as a file is refused too."""
    folder = Path(folder)
    resolved = _resolved(inputs)
    paths, parents = [], set()
    for name in names:
        p = folder / name
        if p.parent != folder and p.parent not in parents:
            parents.add(p.parent)
            output_dir(p.parent, flag, inputs=resolved.values())
        _check_existing(p, flag, kind=kind, ours=ours, inputs=resolved, overwrite=overwrite)
        paths.append(p)
    return paths


@contextlib.contextmanager
def writing(path: str | Path, flag: str) -> Iterator[None]:
    """Turn an OS error of the write inside (no space, a read-only mount, a permission) into one ``UserError``."""
    try:
        yield
    except OSError as e:
        what = e.strerror or errno.errorcode.get(e.errno or 0) or str(e)
        where = f" ({e.filename})" if getattr(e, "filename", None) and str(e.filename) != str(path) else ""
        raise UserError(f"{flag} {path}: cannot write{where}: {what}; choose a writable location") from None
    except RuntimeError as e:  # torch.save's zip writer: "[enforce fail at inline_container.cc] ... "
        if "inline_container" not in str(e) and "PytorchStreamWriter" not in str(e):
            raise
        raise UserError(f"{flag} {path}: cannot write ({first_line(e)}); choose a writable "
                        "location") from None


# ---------------------------------------------------------------------------------------------------------------------
# markers: writers and readers (standard library only)
# ---------------------------------------------------------------------------------------------------------------------
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_KEY = "Software"


def png_text(kind: str) -> dict[str, str]:
    """The PNG text chunks an output of ``kind`` carries (give them to PIL's ``PngInfo.add_text``)."""
    return {PNG_KEY: marker(kind)}


def read_png_text(path: str | Path) -> dict[str, str]:
    """The ``tEXt`` chunks before the image data of a PNG file; {} for anything else."""
    out: dict[str, str] = {}
    try:
        with open(path, "rb") as f:
            if f.read(8) != PNG_SIGNATURE:
                return {}
            for _ in range(256):
                head = f.read(8)
                if len(head) < 8:
                    break
                n, typ = struct.unpack(">I4s", head)
                if typ in (b"IDAT", b"IEND"):
                    break
                if typ == b"tEXt" and n < 1 << 16:
                    key, _, value = f.read(n).partition(b"\0")
                    out[key.decode("latin-1")] = value.decode("latin-1")
                    f.seek(4, os.SEEK_CUR)
                else:
                    f.seek(n + 4, os.SEEK_CUR)
    except OSError:
        return {}
    return out


def png_marked(path: str | Path, kind: str) -> bool:
    return read_png_text(path).get(PNG_KEY) == marker(kind)


def json_object(path: str | Path, limit: int = 64 << 20) -> dict | None:
    """A JSON file holding an object, else None."""
    try:
        p = Path(path)
        if p.stat().st_size > limit:
            return None
        d = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return d if isinstance(d, dict) else None


ZIP_END = b"PK\x05\x06"


def mark_zip(path: str | Path, kind: str) -> None:
    """Set the comment of the zip archive ``path`` (a ``torch.save`` file, which has none) to ``marker(kind)``, in
    place: only the end-of-archive record changes, every entry keeps its bytes and alignment."""
    comment = marker(kind).encode()
    with open(path, "r+b") as f:
        f.seek(-22, os.SEEK_END)
        end = f.read(22)
        if end[:4] != ZIP_END or end[20:22] != b"\0\0":
            raise ValueError(f"{path}: not a zip archive without a comment")
        f.seek(-2, os.SEEK_END)
        f.write(struct.pack("<H", len(comment)) + comment)


def zip_marked(path: str | Path, kind: str) -> bool:
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            return z.comment == marker(kind).encode()
    except (OSError, zipfile.BadZipFile, ValueError):
        return False
