"""Static check of ``fastp2p.engines.tensorrt`` against the real TensorRT Python bindings, without importing them.

TensorRT cannot be installed without an NVIDIA GPU, but its Python bindings wheel (``tensorrt-cu13-bindings``, 1.3 MB)
ships ``tensorrt_bindings/tensorrt.so``, whose read-only data holds every class, method, property and enum-member name
that pybind11 registers, as NUL-terminated C strings. The linker merges a string that is the tail of another one (so
``Builder`` is stored as the end of ``IExprBuilder``): the names the bindings define are therefore exactly the
identifier-shaped NUL-terminated strings of the file *and their suffixes*. Docstrings are never a whole identifier,
so a name that only occurs inside prose (``BuilderFlag.FP16`` in TensorRT 11) does not count.

The check:

1. every attribute that ``engines/tensorrt.py`` reads from the ``trt`` module (``trt.X``, ``trt.X.Y``) or from a
   variable that holds a TensorRT object (the names in ``TRT_OBJECTS``, bare or as ``self.<name>``) is listed in
   ``TRT_API_USED``, and every listed name is used (so the list cannot drift from the code);
2. every name in ``TRT_API_USED`` exists in the bindings (the ``.so`` plus the wheel's ``__init__.py``, which adds
   ``__version__`` and ``Logger.Severity``).

    python -m fastp2p.engines.trt_api_check [WHEEL_OR_SO] [--download DIR] [--tensorrt latest|10]

exits 1 listing what is missing. Without an argument it looks for the wheel in ``$FASTP2P_TRT_WHEEL`` or downloads it
with ``pip download --no-deps tensorrt-cu13-bindings`` (``--tensorrt 10``: the last TensorRT 10 bindings,
``tensorrt-cu12-bindings<10.14``).
"""

from __future__ import annotations

import argparse
import ast
import glob
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL_PACKAGE = "tensorrt-cu13-bindings"
# The bindings checked in CI: the newest TensorRT, and the last TensorRT 10 (fastp2p supports TensorRT >= 10).
WHEELS = {
    "latest": (WHEEL_PACKAGE, "tensorrt_cu13_bindings-*.whl"),
    "10": ("tensorrt-cu12-bindings>=10.0,<10.14", "tensorrt_cu12_bindings-10.*.whl"),
}
_C_STRING = re.compile(rb"(?<=\x00)[A-Za-z_][A-Za-z0-9_]{0,127}(?=\x00)")
_PY_NAME = re.compile(r"\b[A-Za-z_][A-Za-z0-9_]*\b")


def bindings_files(path: str | Path) -> tuple[bytes, str]:
    """(bytes of tensorrt*.so, text of the bindings' __init__.py) from a wheel, an unpacked folder or a .so file."""
    path = Path(path)
    if path.suffix == ".whl":
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
            sos = [n for n in names if re.search(r"(^|/)tensorrt[^/]*\.so$", n)]
            if not sos:
                raise FileNotFoundError(f"{path}: no tensorrt*.so inside")
            init = next((n for n in names if n.endswith("__init__.py") and n.count("/") == 1), None)
            return zf.read(sos[0]), zf.read(init).decode() if init else ""
    if path.is_dir():
        sos = sorted(path.rglob("tensorrt*.so"))
        if not sos:
            raise FileNotFoundError(f"{path}: no tensorrt*.so below it")
        init = sos[0].parent / "__init__.py"
        return sos[0].read_bytes(), init.read_text() if init.is_file() else ""
    return path.read_bytes(), ""


def binding_names(so: bytes, init_py: str = "") -> set[str]:
    """Every name the bindings can resolve: identifier C strings of the .so, their identifier suffixes, and the
    names of the package's __init__.py."""
    names: set[str] = set()
    for m in _C_STRING.finditer(so):
        s = m.group().decode()
        for i in range(len(s)):
            if s[i].isalpha() or s[i] == "_":
                names.add(s[i:])
    names.update(_PY_NAME.findall(init_py))
    return names


def _trt_attr_chain(node: ast.AST) -> list[str] | None:
    """['X', 'Y'] for ``trt.X.Y``; None if the chain is not rooted at the name ``trt``."""
    chain = []
    while isinstance(node, ast.Attribute):
        chain.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name) and node.id == "trt":
        return chain[::-1]
    return None


def used_names(source: str, objects: set[str]) -> set[str]:
    """TensorRT attribute names used in ``source``: ``trt.X.Y`` chains, and attributes of variables named in
    ``objects`` (``builder.create_network``, ``self.context.set_input_shape``)."""
    tree = ast.parse(source)
    used: set[str] = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute):
            continue
        chain = _trt_attr_chain(node)
        if chain is not None:
            used.update(chain)
            continue
        v = node.value
        if isinstance(v, ast.Name) and v.id in objects:
            used.add(node.attr)
        elif (isinstance(v, ast.Attribute) and v.attr in objects and isinstance(v.value, ast.Name)
              and v.value.id == "self"):
            used.add(node.attr)
    return used


def module_source() -> tuple[str, set[str], set[str]]:
    """(source of engines/tensorrt.py, TRT_API_USED, TRT_OBJECTS), read without importing TensorRT."""
    from . import tensorrt as mod

    return Path(mod.__file__).read_text(), set(mod.TRT_API_USED), set(mod.TRT_OBJECTS)


def check(bindings: str | Path, source: str | None = None) -> list[str]:
    """Problems found (empty: all good). ``source`` replaces engines/tensorrt.py's text (for tests)."""
    text, declared, objects = module_source()
    source = text if source is None else source
    used = used_names(source, objects)
    problems = []
    for name in sorted(used - declared):
        problems.append(f"engines/tensorrt.py uses {name!r} on a TensorRT object but TRT_API_USED does not list it")
    for name in sorted(declared - used):
        problems.append(f"TRT_API_USED lists {name!r} but engines/tensorrt.py never uses it")
    so, init_py = bindings_files(bindings)
    known = binding_names(so, init_py)
    for name in sorted(declared | used):
        if name not in known:
            problems.append(f"{name!r} does not exist in the TensorRT bindings ({Path(bindings).name})")
    return problems


def find_wheel(download_dir: str | Path | None = None, timeout: float = 120, which: str = "latest") -> Path | None:
    """A bindings wheel (``which``: a key of ``WHEELS``): $FASTP2P_TRT_WHEEL (for "latest"), a wheel already in
    ``download_dir``, or ``pip download --no-deps`` into it; None when none can be had."""
    requirement, pattern = WHEELS[which]
    env = os.environ.get("FASTP2P_TRT_WHEEL")
    if which == "latest" and env and Path(env).exists():
        return Path(env)
    d = Path(download_dir) if download_dir else Path(tempfile.mkdtemp(prefix="fastp2p-trt-"))
    found = sorted(glob.glob(str(d / pattern)))
    if found:
        return Path(found[-1])
    try:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(d), requirement],
                       check=True, timeout=timeout, capture_output=True)
    except (OSError, subprocess.SubprocessError):
        return None
    found = sorted(glob.glob(str(d / pattern)))
    return Path(found[-1]) if found else None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bindings", nargs="?", help="tensorrt-cu13-bindings wheel, unpacked folder, or tensorrt.so")
    p.add_argument("--download", default=None, help="folder to find or pip-download the wheel into")
    p.add_argument("--tensorrt", choices=sorted(WHEELS), default="latest", help="which bindings to download")
    args = p.parse_args(argv)
    path = Path(args.bindings) if args.bindings else find_wheel(args.download, which=args.tensorrt)
    if path is None:
        print(f"cannot find or download {WHEEL_PACKAGE}", file=sys.stderr)
        return 2
    problems = check(path)
    for line in problems:
        print(line)
    if not problems:
        _, declared, _ = module_source()
        print(f"ok: all {len(declared)} TensorRT names used by engines/tensorrt.py exist in {path.name}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
