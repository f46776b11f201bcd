"""The WGAN paper's networks (its code, main.py): DCGAN generator and critic (``--noBN``, ``--n_extra_layers``) and
the MLPs (``--mlp_G``, ``--mlp_D``). A DCGAN size is a 4x4 or 7x7 base doubled k times: 28 = 7 * 2^2, 64 = 4 * 2^4."""

from __future__ import annotations

from torch import Tensor, nn


def pyramid(image_size: int) -> tuple[int, int]:
    """(base, steps) with base * 2**steps == image_size, base in {4, 7}, steps >= 2."""
    for base in (4, 7):
        steps = (image_size // base).bit_length() - 1
        if steps >= 2 and base << steps == image_size:
            return base, steps
    raise ValueError(f"image_size={image_size} is not supported: expected 4*2^k or 7*2^k with k >= 2 "
                     "(e.g. 28, 32, 56, 64, 128)")


def init_dcgan_weights(module: nn.Module) -> None:
    """DCGAN init, as in the paper's code: conv weights ~ N(0, 0.02), BatchNorm scale ~ N(1, 0.02)."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def _block(conv: nn.Module, batchnorm: bool, act: nn.Module) -> list[nn.Module]:
    return [conv, *([nn.BatchNorm2d(conv.out_channels)] if batchnorm else []), act]


class Generator(nn.Module):
    """z (N, latent_dim) -> images (N, channels, image_size, image_size) in [-1, 1]; extra layers at the last width."""

    def __init__(self, latent_dim: int, channels: int, image_size: int, features: int, batchnorm: bool = True,
                 extra_layers: int = 0) -> None:
        super().__init__()
        base, steps = pyramid(image_size)
        relu = lambda conv: _block(conv, batchnorm, nn.ReLU(True))
        layers = relu(nn.ConvTranspose2d(latent_dim, features * 2 ** (steps - 1), base, 1, 0, bias=False))
        for i in reversed(range(steps - 1)):  # each doubling of the size halves the width, down to ``features``
            layers += relu(nn.ConvTranspose2d(features * 2 ** (i + 1), features * 2**i, 4, 2, 1, bias=False))
        for _ in range(extra_layers):
            layers += relu(nn.Conv2d(features, features, 3, 1, 1, bias=False))
        self.net = nn.Sequential(*layers, nn.ConvTranspose2d(features, channels, 4, 2, 1, bias=False), nn.Tanh())
        self.apply(init_dcgan_weights)

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z.view(z.shape[0], self.net[0].in_channels, 1, 1))


class Critic(nn.Module):
    """images -> one unbounded score per image (no sigmoid: the critic estimates a Wasserstein distance)."""

    def __init__(self, channels: int, image_size: int, features: int, batchnorm: bool, extra_layers: int = 0) -> None:
        super().__init__()
        base, steps = pyramid(image_size)
        layers: list[nn.Module] = [nn.Conv2d(channels, features, 4, 2, 1, bias=False), nn.LeakyReLU(0.2, True)]
        for _ in range(extra_layers):  # the paper's code puts them after the first layer
            layers += _block(nn.Conv2d(features, features, 3, 1, 1, bias=False), batchnorm, nn.LeakyReLU(0.2, True))
        for i in range(steps - 1):  # each halving of the size doubles the width
            layers += _block(nn.Conv2d(features * 2**i, features * 2 ** (i + 1), 4, 2, 1, bias=False), batchnorm,
                             nn.LeakyReLU(0.2, True))
        self.net = nn.Sequential(*layers, nn.Conv2d(features * 2 ** (steps - 1), 1, base, 1, 0, bias=False))
        self.apply(init_dcgan_weights)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x).view(-1)


def _mlp(sizes: list[int]) -> list[nn.Module]:  # Linear layers with a ReLU between each two
    return [m for a, b in zip(sizes[:-1], sizes[1:], strict=True) for m in (nn.Linear(a, b), nn.ReLU(True))][:-1]


class MLPGenerator(nn.Module):
    """The paper's ``--mlp_G``: ``layers`` ReLU layers of ``width`` units, the pixels, and a Tanh (the paper: none)."""

    def __init__(self, latent_dim: int, channels: int, image_size: int, width: int, layers: int) -> None:
        super().__init__()
        self.shape = (channels, image_size, image_size)
        self.net = nn.Sequential(*_mlp([latent_dim, *[width] * layers, channels * image_size**2]), nn.Tanh())

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z.flatten(1)).view(z.shape[0], *self.shape)


class MLPCritic(nn.Module):
    """The paper's ``--mlp_D``: ``layers`` ReLU layers of ``width`` units, then one unbounded score."""

    def __init__(self, channels: int, image_size: int, width: int, layers: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), *_mlp([channels * image_size**2, *[width] * layers, 1]))

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x).view(-1)
