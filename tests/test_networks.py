"""networks.py: the DCGAN generator and critic follow the image size."""

from __future__ import annotations

import pytest
import torch

from wgan_lit.networks import Critic, Generator, pyramid


@pytest.mark.parametrize("size,channels", [(28, 1), (32, 1), (64, 3), (56, 3)])
def test_generator_and_critic_shapes_follow_the_image_size(size, channels):
    g, d = Generator(16, channels, size, 8), Critic(channels, size, 8, True)
    images = g(torch.randn(3, 16))
    assert images.shape == (3, channels, size, size)
    assert images.min() >= -1 and images.max() <= 1  # tanh out
    assert d(images).shape == (3,)


def test_depth_grows_with_image_size():
    n_convs = lambda net: sum(isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)) for m in net.modules())
    assert n_convs(Critic(3, 64, 8, True)) == 5 and n_convs(Critic(1, 32, 8, True)) == 4
    assert n_convs(Critic(1, 28, 8, True)) == 3
    assert n_convs(Generator(100, 3, 64, 8)) == 5 and n_convs(Generator(100, 1, 28, 8)) == 3
    assert pyramid(28) == (7, 2) and pyramid(64) == (4, 4)


def test_critic_batchnorm_is_a_switch():
    has_bn = lambda net: any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())
    assert has_bn(Critic(1, 28, 8, batchnorm=True)) and not has_bn(Critic(1, 28, 8, batchnorm=False))


@pytest.mark.parametrize("size", [30, 8, 100])
def test_unsupported_sizes_are_refused_with_the_supported_ones_named(size):
    with pytest.raises(ValueError, match=r"image_size=\d+ is not supported.*28, 32"):
        Generator(16, 1, size, 8)
