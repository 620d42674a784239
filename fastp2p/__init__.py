"""fastp2p: exact pix2pix (Isola et al., 2017), fast."""

__version__ = "0.1.0"
