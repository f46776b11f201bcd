"""The objectives the module can train, in one table: the paper's Wasserstein critic and the standard GAN.

Each entry gives the critic's loss of (real scores, fake scores), the generator's loss of the fake scores, and
the divergence estimate the critic's loss stands for, which is what the curves show. The gradient penalty of
Gulrajani et al. (2017) is a term added to any critic loss (``model.gp_weight``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def critic_loss(real_scores: torch.Tensor, fake_scores: torch.Tensor) -> torch.Tensor:
    """E[D(G(z))] - E[D(x)]: minimising it maximises the Wasserstein estimate E[D(x)] - E[D(G(z))].

    Reduced in float32: under bf16 autocast the scores are bf16, whose 3 digits would blur the estimate."""
    return fake_scores.float().mean() - real_scores.float().mean()


def generator_loss(fake_scores: torch.Tensor) -> torch.Tensor:
    """-E[D(G(z))]: the generator moves its samples towards where the critic scores real data (float32)."""
    return -fake_scores.float().mean()


def gan_discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """The standard GAN's: binary cross-entropy of sigmoid(D) with real = 1, fake = 0 (float32)."""
    return F.softplus(-real_logits.float()).mean() + F.softplus(fake_logits.float()).mean()


def gan_generator_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """The non-saturating generator loss -log sigmoid(D(G(z))) of Goodfellow et al. (2014), as DCGAN trains."""
    return F.softplus(-fake_logits.float()).mean()


def gradient_penalty(critic: torch.nn.Module, real: torch.Tensor, fake: torch.Tensor,
                     eps: torch.Tensor | None = None) -> torch.Tensor:
    """E[(||grad D(x_hat)||_2 - 1)^2] at x_hat = eps * real + (1 - eps) * fake, eps ~ U[0, 1] per image
    (Gulrajani et al. 2017, Algorithm 1). Differentiable in the critic's weights (create_graph)."""
    if eps is None:
        eps = torch.rand(real.shape[0], 1, 1, 1, device=real.device)
    x_hat = (eps * real + (1 - eps) * fake).detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(critic(x_hat).float().sum(), x_hat, create_graph=True)
    return ((grad.float().flatten(1).norm(dim=1) - 1) ** 2).mean()


@dataclass(frozen=True)
class Objective:
    critic: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (real scores, fake scores) -> loss
    generator: Callable[[torch.Tensor], torch.Tensor]  # fake scores -> loss
    curve: str  # the logged estimate, a function of the critic's loss (without the penalty)
    estimate: Callable[[float], float]
    short: str  # its name on the progress bar
    needs_lipschitz: bool  # a critic without clipping or a penalty makes the estimate meaningless


LOSSES: dict[str, Objective] = {
    "wasserstein": Objective(critic_loss, generator_loss, "critic/wasserstein", lambda d: -d, "W", True),
    # The JS divergence estimate the paper plots for the GAN (Fig. 4): log 2 - loss / 2.
    "gan": Objective(gan_discriminator_loss, gan_generator_loss, "critic/js_estimate",
                     lambda d: math.log(2) - d / 2, "JS", False),
}
