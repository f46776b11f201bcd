"""The objectives in one table, LOSSES: the only place that knows a loss name (config checks model.loss against it),
and the gradient penalty of Gulrajani et al. (2017), a term added to any critic loss (``model.gp_weight``)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def gradient_penalty(critic: torch.nn.Module, real: torch.Tensor, fake: torch.Tensor,
                     eps: torch.Tensor | None = None) -> torch.Tensor:
    """E[(||grad D(x_hat)||_2 - 1)^2] at x_hat = eps * real + (1 - eps) * fake, eps ~ U[0, 1] per image
    (Gulrajani et al. 2017, Algorithm 1). Differentiable in the critic's weights (create_graph)."""
    eps = torch.rand(real.shape[0], 1, 1, 1, device=real.device) if eps is None else eps
    x_hat = (eps * real + (1 - eps) * fake).detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(critic(x_hat).float().sum(), x_hat, create_graph=True)
    return ((grad.float().flatten(1).norm(dim=1) - 1) ** 2).mean()


@dataclass(frozen=True)
class Objective:
    """Losses reduced in float32: under bf16 autocast the scores are bf16, whose 3 digits would blur the estimate."""
    critic: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (real scores, fake scores) -> loss
    generator: Callable[[torch.Tensor], torch.Tensor]  # fake scores -> loss
    curve: str  # the logged estimate, ``estimate`` of the critic's loss (without the penalty)
    estimate: Callable[[float], float]
    short: str  # its name on the progress bar
    needs_lipschitz: bool  # a critic without clipping or a penalty makes the estimate meaningless


LOSSES: dict[str, Objective] = {
    # The paper's: the critic minimises E[D(G(z))] - E[D(x)] (minus its W estimate), the generator -E[D(G(z))].
    "wasserstein": Objective(lambda real, fake: fake.float().mean() - real.float().mean(),
                             lambda fake: -fake.float().mean(), "critic/wasserstein", lambda d: -d, "W", True),
    # The standard GAN: cross-entropy of sigmoid(D) with real = 1, fake = 0, and the non-saturating generator loss
    # -log sigmoid(D(G(z))) of Goodfellow et al. (2014); the paper plots the JS estimate log 2 - loss / 2 (Fig. 4).
    "gan": Objective(lambda real, fake: F.softplus(-real.float()).mean() + F.softplus(fake.float()).mean(),
                     lambda fake: F.softplus(-fake.float()).mean(), "critic/js_estimate",
                     lambda d: math.log(2) - d / 2, "JS", False),
}
critic_loss, generator_loss = LOSSES["wasserstein"].critic, LOSSES["wasserstein"].generator
