"""Wasserstein GAN with weight clipping (Arjovsky, Chintala & Bottou 2017) in PyTorch Lightning + Hydra."""

from wgan_lit.module import WGAN

__all__ = ["WGAN"]
