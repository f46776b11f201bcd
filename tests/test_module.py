"""The algorithm of the paper, checked on the real LightningModule driven by a real Trainer."""

from __future__ import annotations

import lightning as L
import pytest
import torch

import wgan_lit.module as module_mod
from tests.conftest import TINY, RandomImages, tiny_trainer
from wgan_lit.module import WGAN, critic_loss, generator_loss


def snapshot(net: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in net.parameters()]


def identical(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


class ClipWatcher(L.Callback):
    """After every batch (= one critic step, maybe one generator step) check the clip on the critic."""

    def __init__(self, c: float) -> None:
        self.c, self.batches, self.max_abs, self.at_bound = c, 0, 0.0, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        flat = torch.cat([p.detach().flatten() for p in pl_module.critic.parameters()])
        assert flat.abs().max() <= self.c, f"critic weight {flat.abs().max()} outside [-{self.c}, {self.c}]"
        self.batches += 1
        self.max_abs = float(flat.abs().max())
        self.at_bound = int((flat.abs() == self.c).sum())


def test_every_critic_parameter_is_inside_the_clip_after_each_critic_step_and_the_clip_bites():
    c = 0.01
    model = WGAN(clip_value=c, lr_d=5e-2, n_critic=2, **TINY)  # a large lr pushes weights past c
    watcher = ClipWatcher(c)
    tiny_trainer(8, [watcher]).fit(model, RandomImages())
    assert watcher.batches == 8
    assert watcher.max_abs == pytest.approx(c)
    assert watcher.at_bound > 10, "with lr 0.05 many critic weights should sit at the clip bound"


def test_clamp_is_elementwise_and_covers_every_tensor():
    params = [torch.tensor([-1.0, 0.005, 2.0]), torch.tensor([[0.3], [-0.002]])]
    module_mod.clamp_(params, 0.01)
    assert params[0].tolist() == pytest.approx([-0.01, 0.005, 0.01])
    assert params[1].flatten().tolist() == pytest.approx([0.01, -0.002])


@pytest.mark.parametrize("k,n_critic", [(3, 4), (2, 5)])
def test_k_times_n_critic_batches_give_n_critic_k_critic_steps_and_k_generator_steps(k, n_critic):
    model = WGAN(n_critic=n_critic, **TINY)
    tiny_trainer(k * n_critic).fit(model, RandomImages())
    opt_g, opt_d = (o.optimizer if hasattr(o, "optimizer") else o for o in model.optimizers())
    assert {int(s["step"]) for s in opt_d.state.values()} == {k * n_critic}
    assert {int(s["step"]) for s in opt_g.state.values()} == {k}
    assert model.gen_step == k


def test_paper_schedule_gives_the_critic_100_steps_early_and_every_500th():
    model = WGAN(n_critic=5, paper_critic_schedule=True, **TINY)
    assert [model.critic_iters(g) for g in (0, 24, 25, 499, 500, 501, 1000)] == [100, 100, 5, 5, 100, 5, 100]
    assert WGAN(n_critic=5, **TINY).critic_iters(0) == 5
    model = WGAN(n_critic=5, paper_critic_schedule=True, **TINY)
    tiny_trainer(201).fit(model, RandomImages(n=201 * 16))
    assert model.gen_step == 2 and model.critic_step_in_iter == 1


def test_a_critic_step_leaves_the_generator_and_a_generator_step_leaves_the_critic_bit_identical(monkeypatch):
    model = WGAN(n_critic=2, lr_g=1e-2, lr_d=1e-2, **TINY)
    record: dict[str, list] = {"g_changed": [], "d_changed_by_g_step": [], "g_changed_by_d_step": []}
    state: dict[str, list[torch.Tensor]] = {}
    original_clamp = module_mod.clamp_

    def clamp_and_snapshot(params, clip_value):
        original_clamp(params, clip_value)  # end of the critic update
        state["d_after_critic_step"] = snapshot(model.critic)
        record["g_changed_by_d_step"].append(not identical(state["g_before"], snapshot(model.generator)))

    monkeypatch.setattr(module_mod, "clamp_", clamp_and_snapshot)

    class Watch(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            state["g_before"] = snapshot(pl_module.generator)
            state["gen_step_before"] = pl_module.gen_step

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if pl_module.gen_step > state["gen_step_before"]:  # this batch had a generator update
                record["g_changed"].append(not identical(state["g_before"], snapshot(pl_module.generator)))
                record["d_changed_by_g_step"].append(
                    not identical(state["d_after_critic_step"], snapshot(pl_module.critic)))

    tiny_trainer(8, [Watch()]).fit(model, RandomImages())
    assert len(record["g_changed_by_d_step"]) == 8 and not any(record["g_changed_by_d_step"])
    assert len(record["d_changed_by_g_step"]) == 4 and not any(record["d_changed_by_g_step"])
    assert all(record["g_changed"]), "the generator update must change the generator"


def test_losses_have_the_papers_signs():
    real, fake = torch.full((8,), 2.0), torch.full((8,), -1.0)  # a critic that tells them apart
    assert critic_loss(real, fake).item() == pytest.approx(-3.0)  # negative: W estimate = 3
    assert critic_loss(fake, real).item() == pytest.approx(3.0)
    assert generator_loss(torch.full((8,), 2.0)).item() == pytest.approx(-2.0)  # fakes scored high: low loss


def test_critic_has_no_sigmoid_and_scores_are_unbounded():
    model = WGAN(**TINY)
    with torch.no_grad():
        for p in model.critic.parameters():
            p.fill_(0.5)
        scores = model.critic(torch.ones(2, 1, 28, 28))
    assert scores.shape == (2,) and scores.abs().max() > 1.0


def test_defaults_are_the_papers():
    hp = WGAN().hparams
    assert (hp.optimizer, hp.lr_g, hp.lr_d, hp.clip_value, hp.n_critic, hp.latent_dim) == (
        "rmsprop", 5e-5, 5e-5, 0.01, 5, 100)
    opt_g, opt_d = WGAN().configure_optimizers()
    assert isinstance(opt_g, torch.optim.RMSprop) and isinstance(opt_d, torch.optim.RMSprop)
    assert opt_g.param_groups[0]["lr"] == 5e-5 and opt_d.param_groups[0]["lr"] == 5e-5


def test_sampling_changes_no_state_and_is_seeded():
    model = WGAN(**TINY)
    bn = next(m for m in model.generator.modules() if isinstance(m, torch.nn.BatchNorm2d))
    before = bn.running_mean.clone()
    a, b = model.sample(5, seed=3), model.sample(5, seed=3)
    assert torch.equal(a, b) and a.shape == (5, 1, 28, 28)
    assert a.min() >= -1 and a.max() <= 1
    assert torch.equal(bn.running_mean, before) and model.generator.training
