"""fastp2p: exact pix2pix (Isola et al., 2017), fast."""

__version__ = "0.1.0"


def _source_tree_subpackages() -> None:
    """``kernels/``, ``engines/`` and ``bench/`` sit beside this folder in the repository and install as
    ``fastp2p.kernels`` / ``.engines`` / ``.bench`` (pyproject's package-dir). An editable install maps them with its
    own finder; but a ``python -m fastp2p`` (or torchrun's ``-m fastp2p``) started in the repository root imports this
    folder from the working directory first, where no finder maps them. Imported from a source tree, the package
    therefore also looks for its subpackages in the folder above it (the ``__path__`` mechanism a package spread over
    several folders uses), so it is the same package from any directory and in any install mode. An installed copy
    holds the subpackages itself and is left as it is."""
    import os

    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(here)
    subpackages = ("kernels", "engines", "bench")
    if not os.path.isdir(os.path.join(here, "kernels")) and all(
            os.path.isfile(os.path.join(root, name, "__init__.py")) for name in subpackages):
        __path__.append(root)


_source_tree_subpackages()


def __getattr__(name):
    # Lazy: importing fastp2p stays cheap (no onnxruntime/PyAV imports) until the Translator is asked for.
    if name == "Translator":
        from .translator import Translator

        return Translator
    raise AttributeError(f"module 'fastp2p' has no attribute {name!r}")
