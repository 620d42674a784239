"""fastp2p: exact pix2pix (Isola et al., 2017), fast."""

__version__ = "0.1.0"


def __getattr__(name):
    # Lazy: importing fastp2p stays cheap (no onnxruntime/PyAV imports) until the Translator is asked for.
    if name == "Translator":
        from .translator import Translator

        return Translator
    raise AttributeError(f"module 'fastp2p' has no attribute {name!r}")
