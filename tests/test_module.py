"""The algorithm of the paper, checked on the real LightningModule driven by a real Trainer."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import lightning as L
import pytest
import torch

import wgan_lit.module as module_mod
from tests.conftest import TINY, RandomImages, compose_train, tiny_trainer, write_fake_fashion_mnist
from wgan_lit import losses
from wgan_lit.config import ConfigError, DataConfig, validate
from wgan_lit.data import FashionMNISTDataModule, build_datamodule
from wgan_lit.losses import LOSSES, critic_loss, generator_loss
from wgan_lit.module import WGAN


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


def changed(before: dict[str, torch.Tensor], net: torch.nn.Module) -> set[str]:
    return {k for k, v in net.state_dict().items() if not torch.equal(before[k], v)}


def state(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


BN_STATS = ("running_mean", "running_var", "num_batches_tracked")


def test_each_step_changes_its_own_network_and_of_the_other_only_the_batchnorm_statistics(monkeypatch):
    """A critic step leaves the generator's weights bit-identical and a generator step the critic's; the other
    network's BatchNorm running statistics move, because it runs forward in train mode (as in the paper's code)."""
    model = WGAN(n_critic=2, lr_g=1e-2, lr_d=1e-2, **TINY)
    record: dict[str, list] = {"d_step": [], "g_step": []}
    snap: dict[str, dict] = {}
    original_clamp = module_mod.clamp_

    def clamp_and_snapshot(params, clip_value):
        original_clamp(params, clip_value)  # end of the critic update
        record["d_step"].append((changed(snap["d"], model.critic), changed(snap["g"], model.generator)))
        snap["d"], snap["g"] = state(model.critic), state(model.generator)

    monkeypatch.setattr(module_mod, "clamp_", clamp_and_snapshot)

    class Watch(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            snap["d"], snap["g"] = state(pl_module.critic), state(pl_module.generator)
            snap["gen_step"] = pl_module.gen_step

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if pl_module.gen_step > snap["gen_step"]:  # this batch had a generator update
                record["g_step"].append((changed(snap["g"], pl_module.generator),
                                         changed(snap["d"], pl_module.critic)))

    tiny_trainer(8, [Watch()]).fit(model, RandomImages())
    weights = lambda net: {k for k, _ in net.named_parameters()}  # noqa: E731
    bn_stats = lambda net: {k for k in net.state_dict() if k.endswith(BN_STATS)}  # noqa: E731
    assert len(record["d_step"]) == 8 and len(record["g_step"]) == 4
    for own, other in record["d_step"]:
        assert own & weights(model.critic), "a critic step must change the critic's weights"
        assert other and other <= bn_stats(model.generator), other
    for own, other in record["g_step"]:
        assert weights(model.generator) <= own, "a generator step must change every generator weight"
        assert other and other <= bn_stats(model.critic), other


def test_losses_have_the_papers_signs():
    real, fake = torch.full((8,), 2.0), torch.full((8,), -1.0)  # a critic that tells them apart
    assert critic_loss(real, fake).item() == pytest.approx(-3.0)  # negative: W estimate = 3
    assert critic_loss(fake, real).item() == pytest.approx(3.0)
    assert generator_loss(torch.full((8,), 2.0)).item() == pytest.approx(-2.0)  # fakes scored high: low loss


def test_in_the_training_step_the_critic_raises_the_w_estimate_and_the_generator_the_fakes_scores(monkeypatch):
    """The losses' signs where they are used: measured on fixed real images and noise before and after each step.
    Swapping the critic's arguments or flipping the generator's sign makes the steps go the other way."""
    model = WGAN(n_critic=2, lr_g=1e-3, lr_d=1e-3, clip_value=1.0, critic_batchnorm=False, g_batchnorm=False,
                 **TINY)
    real = RandomImages(n=64).images.float().div(127.5).sub(1)
    z = torch.randn(64, TINY["latent_dim"], generator=torch.Generator().manual_seed(1))

    @torch.no_grad()
    def scores() -> tuple[float, float]:
        fake_scores = model.critic(model.generator(z)).mean()
        return float(model.critic(real).mean() - fake_scores), float(fake_scores)

    moves: dict[str, list[float]] = {"w": [], "fake": []}
    snap: dict[str, tuple[float, float]] = {}
    original_clamp = module_mod.clamp_

    def clamp_and_measure(params, clip_value):
        original_clamp(params, clip_value)  # end of the critic update
        snap["after_d"] = scores()
        moves["w"].append(snap["after_d"][0] - snap["before"][0])

    monkeypatch.setattr(module_mod, "clamp_", clamp_and_measure)

    class Measure(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            snap["before"], snap["gen_step"] = scores(), pl_module.gen_step

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if pl_module.gen_step > snap["gen_step"]:
                moves["fake"].append(scores()[1] - snap["after_d"][1])

    tiny_trainer(12, [Measure()]).fit(model, RandomImages(n=512))
    assert len(moves["w"]) == 12 and len(moves["fake"]) == 6
    assert sum(m > 0 for m in moves["w"]) >= 10 and sum(moves["w"]) > 0, moves["w"]
    assert sum(m > 0 for m in moves["fake"]) >= 5 and sum(moves["fake"]) > 0, moves["fake"]


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
    a, b = (torch.cat(list(model.sample(model.latents(5, 3), batch_size=2))) for _ in range(2))
    assert torch.equal(a, b) and a.shape == (5, 1, 28, 28)
    assert a.min() >= -1 and a.max() <= 1
    assert torch.equal(bn.running_mean, before) and model.generator.training


# ---- the fast-path switches change speed, never the algorithm ---------------------------------------------


def train_tiny(n_batches: int = 6, callbacks: list | None = None, precision: str = "32-true", **switches
               ) -> WGAN:
    L.seed_everything(0, verbose=False)
    model = WGAN(n_critic=2, lr_d=5e-2, **TINY, **switches)  # a large lr makes the clip bite
    tiny_trainer(n_batches, callbacks, precision=precision).fit(model, RandomImages(n=256))
    return model


def critic_within_clip(model: WGAN) -> bool:
    return all(p.abs().max() <= model.hparams.clip_value for p in model.critic.parameters())


def test_python_loop_clamp_gives_bit_identical_training_to_the_fused_clamp():
    fused, loop = train_tiny(fused_clamp=True), train_tiny(fused_clamp=False)
    assert fused.gen_step == loop.gen_step == 3
    for a, b in zip(fused.state_dict().values(), loop.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert critic_within_clip(loop)
    at_bound = sum(int((p.abs() == loop.hparams.clip_value).sum()) for p in loop.critic.parameters())
    assert at_bound > 10, "the loop must actually clamp"


def test_channels_last_puts_both_networks_in_nhwc_computes_the_same_and_trains():
    model = WGAN(channels_last=True, **TINY)
    convs = [p for p in model.parameters() if p.dim() == 4 and p.shape[-1] > 1]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    assert not all(p.is_contiguous() for p in convs)
    assert_same_functions(model, WGAN(channels_last=False, **TINY))
    nhwc = train_tiny(channels_last=True)
    assert critic_within_clip(nhwc) and nhwc.gen_step == 3


def assert_same_functions(a: WGAN, b: WGAN) -> None:
    """Same weights (same seed) compute the same images and scores, up to summation order.

    (Trained weights are not compared: RMSprop's first steps are ~10 x lr whatever the gradient's size, so
    rounding-level gradient differences near zero become visible weight differences.)"""
    b.load_state_dict(a.state_dict())
    z, x = torch.randn(8, TINY["latent_dim"]), torch.rand(8, 1, 28, 28) * 2 - 1
    with torch.no_grad():
        assert torch.allclose(a.generator(z), b.generator(z), atol=1e-5)
        assert torch.allclose(a.critic(x), b.critic(x), atol=1e-5)


def test_compile_keeps_checkpoint_keys_of_the_plain_networks():
    compiled, plain = WGAN(compile=True, **TINY), WGAN(**TINY)
    assert compiled.generator._compiled_call_impl is not None and compiled.critic._compiled_call_impl is not None
    assert plain.generator._compiled_call_impl is None
    assert list(compiled.state_dict()) == list(plain.state_dict())


@pytest.mark.slow
def test_compiled_networks_train_and_compute_what_the_eager_ones_do():
    compiled = train_tiny(compile=True)
    assert compiled.gen_step == 3 and critic_within_clip(compiled)
    assert_same_functions(compiled, WGAN(compile=False, **TINY))


@pytest.mark.parametrize("precision,dtype", [("bf16-mixed", torch.bfloat16), ("32-true", torch.float32)])
def test_bf16_mixed_runs_the_step_in_bf16_with_float32_weights_losses_and_clip(monkeypatch, precision, dtype):
    """What training_step computes is seen inside it: the critic's scores, and the loss reduced from them.
    The 32-true case is the control: the same check then sees float32 scores."""
    seen: list[tuple[torch.dtype, torch.dtype]] = []
    wasserstein = LOSSES["wasserstein"]

    def recording_loss(real_scores, fake_scores):
        loss = wasserstein.critic(real_scores, fake_scores)
        seen.append((real_scores.dtype, loss.dtype))
        return loss

    monkeypatch.setitem(LOSSES, "wasserstein", dataclasses.replace(wasserstein, critic=recording_loss))

    class Clip(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            assert critic_within_clip(pl_module)

    model = train_tiny(callbacks=[Clip()], precision=precision)
    assert model.gen_step == 3 and len(seen) == 6
    assert {s for s, _ in seen} == {dtype}  # the critic ran in this precision inside training_step
    assert {loss for _, loss in seen} == {torch.float32}  # losses (and W) are reduced in float32
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_device_resident_moves_the_images_to_the_trainers_device_and_batches_stay_there(fake_fmnist):
    dm = FashionMNISTDataModule(DataConfig(root=str(fake_fmnist), batch_size=8, device_resident=True))
    stand_in_gpu = SimpleNamespace(root_device=torch.device("meta"))
    dm.trainer = SimpleNamespace(world_size=1, strategy=stand_in_gpu, distributed_sampler_kwargs=None)
    dm.setup("fit")
    assert dm.images.device.type == "meta"
    loader = dm.train_dataloader()
    assert not loader.pin_memory  # device tensors cannot be pinned
    batch = next(iter(loader))
    assert batch.device.type == "meta" and batch.shape == (8, 1, 28, 28) and batch.dtype == torch.uint8


def test_device_resident_is_a_no_op_on_cpu(fake_fmnist):
    dm = FashionMNISTDataModule(DataConfig(root=str(fake_fmnist), batch_size=8, device_resident=True))
    dm.trainer = SimpleNamespace(world_size=1, strategy=SimpleNamespace(root_device=torch.device("cpu")))
    dm.setup("fit")
    assert dm.images.device.type == "cpu"


def test_device_resident_refuses_worker_processes():
    with pytest.raises(ConfigError, match="data.num_workers=2.*device_resident"):
        validate(compose_train(["data.device_resident=true", "data.num_workers=2"]))
    validate(compose_train(["data.device_resident=true"]))
    validate(compose_train(["data.num_workers=2"]))


def test_fast_path_defaults_are_the_measured_choice():
    cfg = validate(compose_train([]))
    assert cfg.runtime.fused_clamp and cfg.runtime.channels_last and not cfg.runtime.compile
    assert not cfg.data.device_resident and cfg.cpu_threads == 0


def test_cpu_threads_must_not_be_negative():
    with pytest.raises(ConfigError, match="cpu_threads=-1"):
        validate(compose_train(["cpu_threads=-1"]))


def test_fast_path_data_module_still_used_by_train_with_the_switch(tmp_path):
    root = write_fake_fashion_mnist(tmp_path / "d")
    dm = build_datamodule(validate(compose_train([f"data.root={root}", "data.device_resident=true"])).data)
    assert isinstance(dm, FashionMNISTDataModule) and dm.cfg.device_resident


def test_every_rank_decides_on_a_divergence_with_the_others():
    """A rank whose own losses are finite still stops when another rank saw a NaN (the reduce over ranks)."""
    model = WGAN(**TINY)
    model._watch(torch.tensor(1.0))  # this rank: finite
    assert not [name for name, _ in model.named_buffers() if "bad" in name]  # per rank: DDP broadcasts buffers
    other_rank_bad_at = torch.tensor(4.0)
    model._trainer = SimpleNamespace(world_size=2, strategy=SimpleNamespace(
        reduce=lambda t, reduce_op: torch.minimum(t, other_rank_bad_at) if reduce_op == "min" else t))
    with pytest.raises(module_mod.DivergenceError, match="at generator step 4"):
        model.check_finite()
    model._trainer = SimpleNamespace(world_size=1)  # control: alone, this rank sees nothing wrong
    model.check_finite()


# ---- the paper's comparisons: gradient penalty, the standard GAN, the averaged generator -------------------


class Linear(torch.nn.Module):
    """D(x) = <w, x>: its input gradient is w at every x, so the penalty is (||w|| - 1)^2 exactly."""

    def __init__(self, w: torch.Tensor) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(w)
        self.inputs: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.inputs.append(x.detach().clone())
        return (x.flatten(1) * self.w).sum(1)


def test_the_gradient_penalty_targets_a_gradient_norm_of_one():
    real, fake = torch.randn(4, 1, 2, 2), torch.randn(4, 1, 2, 2)
    for norm in (1.0, 3.0, 0.25):
        w = torch.randn(4)
        w = w / w.norm() * norm
        assert float(losses.gradient_penalty(Linear(w), real, fake)) == pytest.approx((norm - 1) ** 2, abs=1e-6)


def test_the_gradient_penalty_is_taken_at_random_interpolates_of_real_and_fake_and_trains_the_critic():
    real, fake = torch.zeros(3, 1, 2, 2), torch.ones(3, 1, 2, 2)
    eps = torch.tensor([0.0, 0.3, 1.0]).view(3, 1, 1, 1)
    critic = Linear(torch.full((4,), 2.0))
    penalty = losses.gradient_penalty(critic, real, fake, eps)
    (x_hat,) = critic.inputs
    assert torch.allclose(x_hat, eps * real + (1 - eps) * fake)  # 1 - eps of the fake: 1.0, 0.7, 0.0
    penalty.backward()  # create_graph: the penalty has a gradient in the critic's weights
    assert critic.w.grad is not None and critic.w.grad.abs().sum() > 0
    torch.manual_seed(0)
    losses.gradient_penalty(critic, real, fake)  # eps drawn per image: interpolates, not the endpoints
    drawn = critic.inputs[-1].flatten(1)[:, 0]
    assert ((drawn > 0) & (drawn < 1)).all() and len(set(drawn.tolist())) == 3


def test_with_the_penalty_and_no_clip_the_critic_leaves_the_clip_range_and_the_penalty_changes_its_step():
    def critic_after_one_step(gp_weight: float) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = WGAN(clip_value=0, gp_weight=gp_weight, critic_batchnorm=False, optimizer="adam", lr_d=1e-2,
                     n_critic=5, **TINY)
        tiny_trainer(1).fit(model, RandomImages())
        return snapshot(model.critic)

    with_penalty, without = critic_after_one_step(10.0), critic_after_one_step(0.0)
    assert max(float(p.abs().max()) for p in with_penalty) > 0.01  # no clipping
    assert not identical(with_penalty, without)  # control: the penalty term reaches the update


def test_the_standard_gan_losses_are_binary_cross_entropy_with_the_non_saturating_generator_loss():
    real, fake = torch.tensor([2.0, -1.0]), torch.tensor([0.5, -3.0])
    bce = torch.nn.functional.binary_cross_entropy_with_logits
    assert float(losses.gan_discriminator_loss(real, fake)) == pytest.approx(
        float(bce(real, torch.ones(2)) + bce(fake, torch.zeros(2))))
    assert float(losses.gan_generator_loss(fake)) == pytest.approx(float(bce(fake, torch.ones(2))))
    # Signs: D's loss falls as real logits rise; G's falls as the fakes' logits rise.
    assert losses.gan_discriminator_loss(real + 1, fake) < losses.gan_discriminator_loss(real, fake)
    assert losses.gan_generator_loss(fake + 1) < losses.gan_generator_loss(fake)


def test_the_gan_model_trains_one_d_step_per_g_step_without_clipping(tmp_path):
    cfg = validate(compose_train(["model=gan"]))
    hp = {k: getattr(cfg.model, k) for k in ("loss", "optimizer", "n_critic", "clip_value")}
    assert hp == {"loss": "gan", "optimizer": "adam", "n_critic": 1, "clip_value": 0}
    model = WGAN(**{**hp, "lr_d": 5e-2, **TINY})
    tiny_trainer(4).fit(model, RandomImages())
    assert model.gen_step == 4
    assert max(float(p.abs().max()) for p in model.critic.parameters()) > 0.01


def test_the_averaged_generator_is_the_exponential_average_of_the_generators_weights():
    decay = 0.9
    model = WGAN(ema_decay=decay, n_critic=1, lr_g=1e-2, **TINY)
    seen: list[list[torch.Tensor]] = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append(snapshot(pl_module.generator))

    tiny_trainer(3, [Record()]).fit(model, RandomImages())
    expected = seen[0]  # the first update copies the weights
    for weights in seen[1:]:
        expected = [decay * e + (1 - decay) * w for e, w in zip(expected, weights, strict=True)]
    for e, a in zip(expected, model.generator_ema.module.parameters(), strict=True):
        assert torch.allclose(e, a, atol=1e-6)
    assert not identical(snapshot(model.generator_ema.module), seen[-1])  # control: not the raw weights
    assert not any(p.requires_grad for p in model.generator_ema.parameters())


def test_samples_come_from_the_averaged_generator_when_there_is_one():
    model = WGAN(ema_decay=0.5, n_critic=1, lr_g=1e-1, **TINY)
    tiny_trainer(3).fit(model, RandomImages())
    z = torch.randn(4, TINY["latent_dim"])
    ema, raw = model.generate(z), model.generate(z, ema=False)
    assert not torch.equal(ema, raw)
    assert torch.equal(ema, model.generator_ema.module.eval()(z))
    assert WGAN(**TINY).generator_ema is None  # off by default: the paper's generator


def test_the_averaged_generators_samples_spread_like_the_live_generators_early_in_a_run():
    # Averaged BatchNorm statistics would still be far from the weights' own after 150 steps at decay 0.99
    # (running_var near its initial 1 against the live generator's ~1e-3), and eval-mode samples near blank.
    L.seed_everything(0, verbose=False)
    model = WGAN(ema_decay=0.99, n_critic=1, lr_g=2e-4, lr_d=2e-4, **TINY)
    tiny_trainer(150).fit(model, RandomImages(n=150 * 16))
    z = torch.randn(256, TINY["latent_dim"], generator=torch.Generator().manual_seed(0))
    live, averaged = model.generate(z, ema=False).std(), model.generate(z).std()
    assert live > 0.02, "control: the live generator's samples are not blank"
    assert 0.5 < averaged / live < 2, (float(averaged), float(live))
    # The statistics are the averaged weights' own: recomputed, not the live generator's copied over.
    ema_bn = next(m for m in model.generator_ema.module.modules() if isinstance(m, torch.nn.BatchNorm2d))
    live_bn = next(m for m in model.generator.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert not torch.equal(ema_bn.running_var, live_bn.running_var)


def test_a_checkpoint_holds_batchnorm_statistics_that_fit_its_averaged_weights(tmp_path):
    model = WGAN(ema_decay=0.999, n_critic=1, **TINY)
    trainer = tiny_trainer(20)
    trainer.fit(model, RandomImages())
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    saved = torch.load(tmp_path / "m.ckpt", weights_only=True)["state_dict"]
    fresh = WGAN(ema_decay=0.999, n_critic=1, **TINY)
    fresh.generator_ema.load_state_dict({k.removeprefix("generator_ema."): v for k, v in saved.items()
                                         if k.startswith("generator_ema.")})
    fresh.gen_step = model.gen_step
    stats = {k: v.clone() for k, v in fresh.generator_ema.state_dict().items() if "running" in k}
    fresh._ema_bn_step = None
    fresh.refresh_ema_batchnorm()  # recomputing from the saved weights gives the saved statistics
    for k, v in fresh.generator_ema.state_dict().items():
        if "running" in k:
            assert torch.allclose(v, stats[k], rtol=1e-5, atol=1e-7), k
