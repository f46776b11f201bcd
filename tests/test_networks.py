"""networks.py: the DCGAN generator and critic follow the image size; the paper's noBN, extra-layer and MLP options."""

from __future__ import annotations

import pytest
import torch

from wgan_lit.networks import Critic, Generator, MLPCritic, MLPGenerator, pyramid

has_bn = lambda net: any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())
n_convs = lambda net: sum(isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)) for m in net.modules())


@pytest.mark.parametrize("size,channels,base,steps", [(28, 1, 7, 2), (32, 1, 4, 3), (64, 3, 4, 4), (56, 3, 7, 3)])
def test_shapes_and_depth_follow_the_image_size(size, channels, base, steps):
    g, d = Generator(16, channels, size, 8), Critic(channels, size, 8, True)
    images = g(torch.randn(3, 16))
    assert images.shape == (3, channels, size, size) and images.min() >= -1 and images.max() <= 1  # tanh out
    assert d(images).shape == (3,) and n_convs(g) == n_convs(d) == steps + 1 and pyramid(size) == (base, steps)


def test_batchnorm_is_a_switch_and_extra_layers_add_size_keeping_convolutions_to_both_networks():
    assert has_bn(Critic(1, 28, 8, batchnorm=True)) and not has_bn(Critic(1, 28, 8, batchnorm=False))
    assert has_bn(Generator(16, 1, 28, 8)) and not has_bn(Generator(16, 1, 28, 8, batchnorm=False))
    g, d = Generator(16, 1, 28, 8, extra_layers=2), Critic(1, 28, 8, True, extra_layers=2)
    assert n_convs(g) == n_convs(Generator(16, 1, 28, 8)) + 2 and n_convs(d) == n_convs(Critic(1, 28, 8, True)) + 2
    assert d(g(torch.randn(3, 16))).shape == (3,)


def test_the_critic_has_no_sigmoid_and_its_scores_are_unbounded():
    critic = Critic(1, 28, 8, False)
    torch.nn.utils.vector_to_parameters(torch.full((sum(p.numel() for p in critic.parameters()),), 0.5),
                                        critic.parameters())
    assert critic(torch.ones(2, 1, 28, 28)).abs().max() > 1.0


def test_the_mlp_networks_have_the_papers_shape():
    g, d = MLPGenerator(16, 1, 28, width=32, layers=4), MLPCritic(1, 28, width=32, layers=4)
    linears = [m for m in g.modules() if isinstance(m, torch.nn.Linear)]
    assert [m.out_features for m in linears] == [32, 32, 32, 32, 28 * 28]  # 4 hidden ReLU layers, then pixels
    assert sum(isinstance(m, torch.nn.ReLU) for m in g.modules()) == 4
    images = g(torch.randn(3, 16))
    assert images.shape == (3, 1, 28, 28) and images.abs().max() <= 1
    assert d(images).shape == (3,) and not has_bn(g) and not has_bn(d)


@pytest.mark.parametrize("size", [30, 8, 100])
def test_unsupported_sizes_are_refused_with_the_supported_ones_named(size):
    with pytest.raises(ValueError, match=r"image_size=\d+ is not supported.*28, 32"):
        Generator(16, 1, size, 8)
