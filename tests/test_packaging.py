"""The package is the same from every directory and in every install mode: ``python -m fastp2p`` (what ``fastp2p
train --nproc`` runs under torchrun) started in the repository root, next to a non-editable install, imports the
source folder first and must still find ``fastp2p.kernels`` / ``.engines`` / ``.bench``, which live beside it."""

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Drops the editable install's finder (so only a plain, non-editable install in TARGET is visible), then runs
# ``python -m fastp2p ARGS`` the way the interpreter does: the working directory first on sys.path.
RUN_AS_M = textwrap.dedent("""
    import os, runpy, sys
    sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in type(f).__module__.lower()
                        and "editable" not in getattr(f, "__name__", "").lower()]
    sys.path_hooks[:] = [h for h in sys.path_hooks if "editable" not in getattr(h, "__module__", "").lower()]
    sys.path[:] = [p for p in sys.path if "__editable__" not in p]
    sys.path.insert(0, os.environ["TARGET"])
    sys.path.insert(0, os.getcwd())  # `python -m` puts the working directory first
    sys.argv = ["fastp2p", *sys.argv[1:]]
    import fastp2p, fastp2p.bench, fastp2p.engines, fastp2p.kernels
    print("PACKAGE", fastp2p.__file__)
    print("BENCH", fastp2p.bench.__file__)
    runpy.run_module("fastp2p", run_name="__main__", alter_sys=True)
""")


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A plain (non-editable) install of this checkout into a folder of its own, as `pip install .` makes it."""
    target = tmp_path_factory.mktemp("site")
    # From a copy of what the build reads: setuptools writes build/ and *.egg-info into the source tree it builds.
    src = tmp_path_factory.mktemp("src")
    for name in ("fastp2p", "kernels", "engines", "bench"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    p = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-compile",
                        "--quiet", "--target", str(target), str(src)],
                       capture_output=True, text=True, timeout=300, cwd=src)
    if p.returncode != 0:
        pytest.skip(f"pip could not build a wheel of the checkout here: {p.stderr.strip().splitlines()[-1:]}")
    assert (target / "fastp2p" / "bench" / "__init__.py").is_file()  # installed as subpackages
    assert not (target / "kernels").exists() and not (target / "engines").exists()  # no generic top-level names
    return target


@pytest.mark.slow
@pytest.mark.parametrize("where", ["repo_root", "elsewhere"])
def test_python_m_fastp2p_from_any_directory(installed, tmp_path, where):
    cwd = REPO if where == "repo_root" else tmp_path
    p = subprocess.run([sys.executable, "-c", RUN_AS_M, "bench", "--help"], capture_output=True, text=True,
                       timeout=120, cwd=cwd, env={**_env(), "TARGET": str(installed)})
    assert p.returncode == 0, p.stderr[-3000:]
    assert "ModuleNotFoundError" not in p.stderr
    package = p.stdout.split("PACKAGE ", 1)[1].split()[0]
    bench = p.stdout.split("BENCH ", 1)[1].split()[0]
    # From the repository root the source folder wins (as Python always does), with its subpackages beside it;
    # elsewhere the installed copy, whole.
    root = REPO if where == "repo_root" else installed
    assert Path(package).resolve().is_relative_to(root) and Path(bench).resolve().is_relative_to(root), p.stdout
    assert "usage:" in p.stdout


def test_source_tree_maps_the_subpackages_beside_it():
    import fastp2p.bench
    import fastp2p.engines
    import fastp2p.kernels

    import fastp2p

    if (Path(fastp2p.__file__).parent / "kernels").is_dir():
        pytest.skip("running from an installed copy: the subpackages are inside it")
    for mod, folder in ((fastp2p.kernels, "kernels"), (fastp2p.engines, "engines"), (fastp2p.bench, "bench")):
        assert Path(mod.__file__).resolve().parent == REPO / folder


def _env() -> dict:
    import os

    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    return env
