"""Image-quality metrics for paired translation: L1, PSNR, SSIM per image, and the Fréchet distance behind FID.

Conventions (``fastp2p eval`` and the trainer's ``--eval_every`` use them; ``metrics.json`` repeats them):

- Images are float tensors ``N,C,H,W`` in **[0, 1]** (``from_uint8`` maps 8-bit images there), compared per image.
- ``L1``: mean absolute difference over pixels and channels, on [0, 1] (half the L1 of the same images on the
  trainer's [-1, 1] scale; a constant shift by ``c`` gives ``c``).
- ``PSNR``: ``10 log10(1 / MSE)`` in dB, data range 1. Identical images have infinite PSNR; it is capped at
  ``PSNR_MAX`` (100 dB) so that means stay finite and JSON stays valid. (One 8-bit step in one pixel of a 256 x 256
  RGB image is ~101 dB, so the cap changes nothing a real comparison can show.)
- ``SSIM``: Wang et al. 2004 with an 11 x 11 Gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03, data range 1,
  population (not sample) statistics, averaged over the valid window positions (no padding: the map is
  ``H - 10`` x ``W - 10``) and then over channels. This is ``skimage.metrics.structural_similarity(...,
  gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1, channel_axis=...)`` (the tests check it
  against scikit-image) and the reference MATLAB ``ssim.m``.
- ``frechet_distance``: ``||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2))`` between Gaussians fitted to two feature
  sets (FID when the features are Inception pool3 activations).

Everything is computed in float64.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .errors import UserError

PSNR_MAX = 100.0
SSIM_WIN, SSIM_SIGMA, SSIM_K1, SSIM_K2 = 11, 1.5, 0.01, 0.03


def from_uint8(img: torch.Tensor | np.ndarray) -> torch.Tensor:
    """uint8 ``(N,)H,W,C`` -> float64 ``N,C,H,W`` in [0, 1]."""
    x = torch.as_tensor(img)
    if x.dim() == 3:
        x = x[None]
    return x.permute(0, 3, 1, 2).to(torch.float64) / 255.0


def _check(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if x.shape != y.shape or x.dim() != 4:
        raise ValueError(f"metrics compare two N,C,H,W batches of one shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    return x.to(torch.float64), y.to(torch.float64)


def l1(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-image mean absolute error, shape (N,)."""
    x, y = _check(x, y)
    return (x - y).abs().flatten(1).mean(1)


def mse(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    x, y = _check(x, y)
    return (x - y).square().flatten(1).mean(1)


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0, cap: float | None = PSNR_MAX) -> torch.Tensor:
    """Per-image PSNR in dB, shape (N,); ``cap`` (None: none, identical images give inf) bounds it."""
    p = 10.0 * torch.log10(data_range**2 / mse(x, y))  # mse 0 -> inf, then capped
    return p.clamp(max=cap) if cap is not None else p


def gaussian_window(size: int = SSIM_WIN, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """The normalized, sampled 1-D Gaussian (MATLAB's fspecial('gaussian'), scipy's gaussian_filter weights)."""
    r = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(r**2) / (2 * sigma**2))
    return g / g.sum()


def _filter(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Separable 'valid' Gaussian filter of every channel of N,C,H,W."""
    c = x.shape[1]
    k = g.numel()
    x = F.conv2d(x, g.view(1, 1, k, 1).expand(c, 1, k, 1), groups=c)
    return F.conv2d(x, g.view(1, 1, 1, k).expand(c, 1, 1, k), groups=c)


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0, win: int = SSIM_WIN,
         sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """Per-image SSIM (the module doc's definition), shape (N,)."""
    x, y = _check(x, y)
    if min(x.shape[2:]) < win:
        raise ValueError(f"SSIM needs images of at least {win}x{win}, got {x.shape[2]}x{x.shape[3]}")
    g = gaussian_window(win, sigma).to(x.device)
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    mx, my = _filter(x, g), _filter(y, g)
    sxx = _filter(x * x, g) - mx * mx
    syy = _filter(y * y, g) - my * my
    sxy = _filter(x * y, g) - mx * my
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return s.mean(dim=(2, 3)).mean(1)


def image_metrics(output: torch.Tensor, target: torch.Tensor) -> dict[str, list[float]]:
    """{"L1", "PSNR", "SSIM"} -> per-image lists, for [0, 1] N,C,H,W batches."""
    return {"L1": l1(output, target).tolist(), "PSNR": psnr(output, target).tolist(),
            "SSIM": ssim(output, target).tolist()}


# ---------------------------------------------------------------------------------------------------------------------
# Fréchet distance
# ---------------------------------------------------------------------------------------------------------------------
def feature_stats(features: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(mean, covariance) of an N x D feature matrix, float64; ``np.cov`` with N - 1, as pytorch-fid / clean-fid."""
    f = np.asarray(torch.as_tensor(features).detach().cpu().to(torch.float64))
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"need an N x D feature matrix with N >= 2, got shape {f.shape}")
    return f.mean(0), np.cov(f, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2):
    ``||mu1 - mu2||^2 + Tr(sigma1) + Tr(sigma2) - 2 Tr((sigma1 sigma2)^(1/2))``.

    ``scipy.linalg.sqrtm`` of the (non-symmetric) product, as pytorch-fid and clean-fid do. When the product is
    near-singular (fewer samples than dimensions, the usual case for a 100-image validation split and 2048-d
    features) sqrtm may return non-finite values: ``eps`` is then added to both diagonals. Round-off leaves a tiny
    imaginary part in the square root; it is dropped when small against the trace, and an error otherwise."""
    try:
        from scipy import linalg
    except ImportError:
        raise UserError("FID needs SciPy (scipy.linalg.sqrtm): pip install scipy") from None
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"mismatched shapes: mu {mu1.shape} / {mu2.shape}, sigma {s1.shape} / {s2.shape}")
    diff = mu1 - mu2
    covmean = linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        offset = np.eye(s1.shape[0]) * eps
        covmean = linalg.sqrtm((s1 + offset) @ (s2 + offset))
    if np.iscomplexobj(covmean):
        imag = np.abs(covmean.imag).max()
        scale = max(1.0, abs(np.trace(covmean.real)))
        if imag > 1e-3 * scale:
            raise ValueError(f"Fréchet distance: sqrtm has a large imaginary component ({imag:.3g}); the covariances "
                             "are not positive semi-definite")
        covmean = covmean.real
    fd = float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))
    # The exact value is >= 0; round-off on (near-)identical sets can leave -1e-10.
    return max(fd, 0.0) if fd > -1e-6 * max(1.0, float(np.trace(s1) + np.trace(s2))) else fd


def fid_from_features(a, b) -> float:
    """FID between two N x D feature sets (e.g. Inception pool3 of outputs and of targets)."""
    return frechet_distance(*feature_stats(a), *feature_stats(b))


