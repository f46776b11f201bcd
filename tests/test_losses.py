"""losses.py: the paper's signs, the standard GAN's cross-entropy, the gradient penalty, a loss added from outside."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from tests.conftest import TINY, RandomImages, compose_train, tiny_trainer
from wgan_lit.config import validate
from wgan_lit.losses import LOSSES, critic_loss, generator_loss, gradient_penalty
from wgan_lit.module import WGAN


def test_the_losses_have_the_papers_signs_the_gan_is_cross_entropy_and_the_estimates_are_the_curves():
    real, fake = torch.full((8,), 2.0), torch.full((8,), -1.0)  # a critic that tells them apart
    assert (critic_loss(real, fake).item(), critic_loss(fake, real).item()) == pytest.approx((-3.0, 3.0))  # W = 3
    assert generator_loss(torch.full((8,), 2.0)).item() == pytest.approx(-2.0)  # fakes scored high: low loss
    w, gan = LOSSES["wasserstein"], LOSSES["gan"]
    assert (w.curve, w.estimate(-3.0), w.short, w.needs_lipschitz) == ("critic/wasserstein", 3.0, "W", True)
    assert (gan.curve, gan.estimate(0.0), gan.short, gan.needs_lipschitz) == (
        "critic/js_estimate", pytest.approx(math.log(2)), "JS", False)
    real, fake, bce = torch.tensor([2.0, -1.0]), torch.tensor([0.5, -3.0]), torch.nn.BCEWithLogitsLoss()
    assert float(gan.critic(real, fake)) == pytest.approx(float(bce(real, torch.ones(2)) + bce(fake, torch.zeros(2))))
    assert float(gan.generator(fake)) == pytest.approx(float(bce(fake, torch.ones(2))))  # non-saturating
    # Signs: D's loss falls as real logits rise; G's falls as the fakes' logits rise.
    assert gan.critic(real + 1, fake) < gan.critic(real, fake) and gan.generator(fake + 1) < gan.generator(fake)


class Linear(torch.nn.Module):
    """D(x) = <w, x>: its input gradient is w at every x, so the penalty is (||w|| - 1)^2 exactly."""

    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        self.w, self.inputs = torch.nn.Parameter(w), []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.inputs.append(x.detach().clone())
        return (x.flatten(1) * self.w).sum(1)


@pytest.mark.parametrize("norm", [1.0, 3.0, 0.25])
def test_the_gradient_penalty_targets_a_gradient_norm_of_one_at_random_interpolates_and_trains_the_critic(norm):
    w = torch.randn(4)
    assert float(gradient_penalty(Linear(w / w.norm() * norm), torch.randn(4, 1, 2, 2), torch.randn(4, 1, 2, 2))
                 ) == pytest.approx((norm - 1) ** 2, abs=1e-6)
    real, fake, eps = torch.zeros(3, 1, 2, 2), torch.ones(3, 1, 2, 2), torch.tensor([0.0, 0.3, 1.0]).view(3, 1, 1, 1)
    critic = Linear(torch.full((4,), norm))
    gradient_penalty(critic, real, fake, eps).backward()  # create_graph: a gradient in the critic's weights
    assert torch.allclose(critic.inputs[0], eps * real + (1 - eps) * fake)  # 1 - eps of the fake: 1.0, 0.7, 0.0
    assert critic.w.grad is not None and critic.w.grad.abs().sum() > 0
    torch.manual_seed(0)
    gradient_penalty(critic, real, fake)  # eps drawn per image: interpolates, not the endpoints
    drawn = critic.inputs[-1].flatten(1)[:, 0]
    assert ((drawn > 0) & (drawn < 1)).all() and len(set(drawn.tolist())) == 3


def test_a_loss_added_to_the_table_from_outside_is_accepted_and_trained(monkeypatch):
    hinge = lambda real, fake: (1 - real).relu().mean() + (1 + fake).relu().mean()  # noqa: E731
    monkeypatch.setitem(LOSSES, "hinge", dataclasses.replace(LOSSES["wasserstein"], critic=hinge, short="H"))
    assert validate(compose_train(["model.loss=hinge"])).model.loss == "hinge"
    model = WGAN(loss="hinge", n_critic=1, log_every_n_gen_steps=1, **TINY)
    tiny_trainer(2).fit(model, RandomImages(n=16, batch_size=8))
    assert model.gen_step == 2 and math.isfinite(model.trainer.callback_metrics["H"])
