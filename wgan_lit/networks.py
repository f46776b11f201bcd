"""DCGAN generator and critic whose depth follows the image size (Radford et al. 2015, as in the WGAN paper).

Sizes are a 4x4 or 7x7 base doubled ``k`` times: 28 (Fashion-MNIST) = 7 * 2^2, 32 = 4 * 2^3, 64 = 4 * 2^4.
Both networks are built from plain scalars so a checkpoint's hyperparameters are enough to rebuild them.
"""

from __future__ import annotations

import torch
from torch import nn


def pyramid(image_size: int) -> tuple[int, int]:
    """(base size, number of 2x steps) such that base * 2**steps == image_size, base in {4, 7}."""
    for base in (4, 7):
        steps, size = 0, image_size
        while size > base and size % 2 == 0:
            size //= 2
            steps += 1
        if size == base and steps >= 2:
            return base, steps
    raise ValueError(
        f"image_size={image_size} is not supported: expected 4*2^k or 7*2^k with k >= 2 "
        "(e.g. 28, 32, 56, 64, 128)"
    )


def init_dcgan_weights(module: nn.Module) -> None:
    """DCGAN init, as in the paper's code: conv weights ~ N(0, 0.02), BatchNorm scale ~ N(1, 0.02)."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


class Generator(nn.Module):
    """z (N, latent_dim) -> images (N, channels, image_size, image_size) in [-1, 1]."""

    def __init__(self, latent_dim: int, channels: int, image_size: int, features: int) -> None:
        super().__init__()
        base, steps = pyramid(image_size)
        width = features * 2 ** (steps - 1)
        layers: list[nn.Module] = [
            nn.ConvTranspose2d(latent_dim, width, base, 1, 0, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(True),
        ]
        for _ in range(steps - 1):
            layers += [
                nn.ConvTranspose2d(width, width // 2, 4, 2, 1, bias=False),
                nn.BatchNorm2d(width // 2),
                nn.ReLU(True),
            ]
            width //= 2
        layers += [nn.ConvTranspose2d(width, channels, 4, 2, 1, bias=False), nn.Tanh()]
        self.net = nn.Sequential(*layers)
        self.latent_dim = latent_dim
        self.apply(init_dcgan_weights)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z.view(z.shape[0], self.latent_dim, 1, 1))


class Critic(nn.Module):
    """images -> one unbounded score per image (no sigmoid: the critic estimates a Wasserstein distance)."""

    def __init__(self, channels: int, image_size: int, features: int, batchnorm: bool) -> None:
        super().__init__()
        base, steps = pyramid(image_size)
        width = features
        layers: list[nn.Module] = [nn.Conv2d(channels, width, 4, 2, 1, bias=False), nn.LeakyReLU(0.2, True)]
        for _ in range(steps - 1):
            layers.append(nn.Conv2d(width, width * 2, 4, 2, 1, bias=False))
            if batchnorm:
                layers.append(nn.BatchNorm2d(width * 2))
            layers.append(nn.LeakyReLU(0.2, True))
            width *= 2
        layers.append(nn.Conv2d(width, 1, base, 1, 0, bias=False))
        self.net = nn.Sequential(*layers)
        self.apply(init_dcgan_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).view(-1)
