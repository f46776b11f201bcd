"""The WGAN paper's networks (its code, main.py): DCGAN generator and critic, with or without BatchNorm and
with ``n_extra_layers``, and the MLP generator and critic (``--mlp_G`` / ``--mlp_D``).

DCGAN sizes are a 4x4 or 7x7 base doubled ``k`` times: 28 (Fashion-MNIST) = 7 * 2^2, 32 = 4 * 2^3, 64 = 4 * 2^4.
Every network is built from plain scalars so a checkpoint's hyperparameters are enough to rebuild it.
"""

from __future__ import annotations

import itertools

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


def _norm(width: int, batchnorm: bool) -> list[nn.Module]:
    return [nn.BatchNorm2d(width)] if batchnorm else []


class Generator(nn.Module):
    """z (N, latent_dim) -> images (N, channels, image_size, image_size) in [-1, 1].

    ``batchnorm=False`` is the paper's ``--noBN`` generator; ``extra_layers`` adds 3x3 convolutions at the last
    hidden width (``--n_extra_layers``)."""

    def __init__(self, latent_dim: int, channels: int, image_size: int, features: int, batchnorm: bool = True,
                 extra_layers: int = 0) -> None:
        super().__init__()
        base, steps = pyramid(image_size)
        width = features * 2 ** (steps - 1)
        layers: list[nn.Module] = [
            nn.ConvTranspose2d(latent_dim, width, base, 1, 0, bias=False), *_norm(width, batchnorm), nn.ReLU(True)
        ]
        for _ in range(steps - 1):
            layers += [nn.ConvTranspose2d(width, width // 2, 4, 2, 1, bias=False), *_norm(width // 2, batchnorm),
                       nn.ReLU(True)]
            width //= 2
        for _ in range(extra_layers):
            layers += [nn.Conv2d(width, width, 3, 1, 1, bias=False), *_norm(width, batchnorm), nn.ReLU(True)]
        layers += [nn.ConvTranspose2d(width, channels, 4, 2, 1, bias=False), nn.Tanh()]
        self.net = nn.Sequential(*layers)
        self.latent_dim = latent_dim
        self.apply(init_dcgan_weights)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z.view(z.shape[0], self.latent_dim, 1, 1))


class Critic(nn.Module):
    """images -> one unbounded score per image (no sigmoid: the critic estimates a Wasserstein distance)."""

    def __init__(self, channels: int, image_size: int, features: int, batchnorm: bool, extra_layers: int = 0
                 ) -> None:
        super().__init__()
        base, steps = pyramid(image_size)
        width = features
        layers: list[nn.Module] = [nn.Conv2d(channels, width, 4, 2, 1, bias=False), nn.LeakyReLU(0.2, True)]
        for _ in range(extra_layers):  # the paper's code puts them after the first layer
            layers += [nn.Conv2d(width, width, 3, 1, 1, bias=False), *_norm(width, batchnorm), nn.LeakyReLU(0.2, True)]
        for _ in range(steps - 1):
            layers += [nn.Conv2d(width, width * 2, 4, 2, 1, bias=False), *_norm(width * 2, batchnorm),
                       nn.LeakyReLU(0.2, True)]
            width *= 2
        layers.append(nn.Conv2d(width, 1, base, 1, 0, bias=False))
        self.net = nn.Sequential(*layers)
        self.apply(init_dcgan_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).view(-1)


def _mlp(sizes: list[int]) -> list[nn.Module]:
    layers: list[nn.Module] = []
    for a, b in itertools.pairwise(sizes):
        layers += [nn.Linear(a, b), nn.ReLU(True)]
    return layers[:-1]  # no ReLU after the output layer


class MLPGenerator(nn.Module):
    """The paper's ``--mlp_G``: ``layers`` ReLU layers of ``width`` units, then a linear map to the pixels.
    A Tanh keeps the images in [-1, 1] like the data (the paper's code leaves the output unbounded)."""

    def __init__(self, latent_dim: int, channels: int, image_size: int, width: int, layers: int) -> None:
        super().__init__()
        self.shape = (channels, image_size, image_size)
        self.net = nn.Sequential(*_mlp([latent_dim, *[width] * layers, channels * image_size**2]), nn.Tanh())
        self.latent_dim = latent_dim

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z.view(z.shape[0], self.latent_dim)).view(z.shape[0], *self.shape)


class MLPCritic(nn.Module):
    """The paper's ``--mlp_D``: ``layers`` ReLU layers of ``width`` units, then one unbounded score."""

    def __init__(self, channels: int, image_size: int, width: int, layers: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), *_mlp([channels * image_size**2, *[width] * layers, 1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).view(-1)
