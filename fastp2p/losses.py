"""pix2pix objectives: the reference's ``GANLoss`` (vanilla = BCE with logits, lsgan = MSE) and the L1 term."""

from __future__ import annotations

import torch
import torch.nn.functional as F

GAN_MODES = ("vanilla", "lsgan")


def gan_loss(logits: torch.Tensor, target_is_real: bool, mode: str = "vanilla") -> torch.Tensor:
    """Mean loss of D's patch logits against an all-real (1.0) or all-fake (0.0) target, computed in fp32."""
    logits = logits.float()
    target = torch.full_like(logits, 1.0 if target_is_real else 0.0)
    if mode == "vanilla":
        return F.binary_cross_entropy_with_logits(logits, target)
    if mode == "lsgan":
        return F.mse_loss(logits, target)
    raise ValueError(f"unknown --gan_mode {mode!r}; choose one of {', '.join(GAN_MODES)}")


def lr_factor(policy: str, epoch: int, n_epochs: int, n_epochs_decay: int, lr_decay_iters: int = 50) -> float:
    """Multiplier of the base lr during 0-based ``epoch``, as the reference's schedulers give it.

    linear: constant for ``n_epochs``, then linear towards zero over ``n_epochs_decay`` (the reference's
    ``1 - max(0, epoch + epoch_count - n_epochs) / (n_epochs_decay + 1)`` with epoch_count = 1);
    step: x0.1 every ``lr_decay_iters`` epochs; cosine: CosineAnnealingLR(T_max=n_epochs, eta_min=0)."""
    if policy == "linear":  # past the schedule (--max_steps longer than it) zero, not a negative lr (gradient ascent)
        return max(0.0, 1.0 - max(0, epoch + 1 - n_epochs) / float(n_epochs_decay + 1))
    if policy == "step":
        return 0.1 ** (epoch // lr_decay_iters)
    if policy == "cosine":
        import math

        return 0.5 * (1.0 + math.cos(math.pi * epoch / n_epochs))
    raise ValueError(f"unknown --lr_policy {policy!r}; choose one of linear, step, cosine")
