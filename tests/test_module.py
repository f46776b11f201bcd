"""The algorithm of the paper on the real LightningModule driven by a real Trainer; sampling; checkpoints."""

from __future__ import annotations

import copy
import dataclasses
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from torch.optim.swa_utils import update_bn

import wgan_lit.module as module_mod
from tests.conftest import LEGACY_CKPT, LEGACY_EMA_CKPT, TINY, RandomImages, compose_train, load, tiny_trainer
from wgan_lit.config import RuntimeConfig, validate
from wgan_lit.losses import LOSSES
from wgan_lit.module import WGAN, model_hparams


def state(net: torch.nn.Module, params: bool = False) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in (net.named_parameters() if params else net.state_dict().items())}


def changed(before: dict[str, torch.Tensor], net: torch.nn.Module) -> set[str]:
    return {k for k, v in net.state_dict().items() if not torch.equal(before[k], v)}


def within_clip(model: WGAN) -> bool:
    return all(p.abs().max() <= model.hparams.clip_value for p in model.critic.parameters())


def test_clamp_is_elementwise_and_covers_every_tensor():
    params = [torch.tensor([-1.0, 0.005, 2.0]), torch.tensor([[0.3], [-0.002]])]
    module_mod.clamp_(params, 0.01)
    assert torch.cat([p.flatten() for p in params]).tolist() == pytest.approx([-0.01, 0.005, 0.01, 0.01, -0.002])


def test_algorithm_1_clip_ratio_what_each_step_changes_and_which_way(tiny_model, monkeypatch):
    """12 batches, n_critic=2: after each critic step all its weights are in [-c, c] (the init's N(0, 0.02) exceeds c);
    12 critic and 6 generator steps; each step leaves the other network's weights alone (BatchNorm statistics move:
    it runs in train mode, as in the paper's code); on fixed data W rises with critic steps, fakes' scores with G's."""
    model, c = tiny_model, tiny_model.hparams.clip_value
    real, z = RandomImages(n=64).images.float().div(127.5).sub(1), model.latents(64, 1)
    rec: dict[str, list] = {"d": [], "g": [], "bound": [], "w": [], "fake": []}
    snap, clamp_ = {}, module_mod.clamp_

    @torch.no_grad()
    def scores() -> tuple[float, float]:
        fake_scores = model.critic(model.generator(z)).mean()
        return float(model.critic(real).mean() - fake_scores), float(fake_scores)

    def clamp_and_record(params, clip_value):
        clamp_(params, clip_value)  # the end of a critic update
        flat = torch.cat([p.detach().flatten() for p in model.critic.parameters()])
        assert flat.abs().max() == pytest.approx(c) and flat.abs().max() <= c
        rec["bound"].append(int((flat.abs() == c).sum()))
        rec["d"].append((changed(snap["d"], model.critic), changed(snap["g"], model.generator)))
        snap["after_d"] = scores()
        rec["w"].append(snap["after_d"][0] - snap["before"][0])
        snap.update(d=state(model.critic), g=state(model.generator))

    monkeypatch.setattr(module_mod, "clamp_", clamp_and_record)

    class Watch(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            snap.update(d=state(model.critic), g=state(model.generator), gen_step=model.gen_step, before=scores())

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if model.gen_step > snap["gen_step"]:  # this batch had a generator update
                rec["g"].append((changed(snap["g"], model.generator), changed(snap["d"], model.critic)))
                rec["fake"].append(scores()[1] - snap["after_d"][1])

    tiny_trainer(12, [Watch()]).fit(model, RandomImages(n=48, batch_size=4))
    steps = lambda opt: {int(s["step"]) for s in opt.optimizer.state.values()}  # noqa: E731
    assert [steps(opt) for opt in model.optimizers()] == [{6}, {12}] and model.gen_step == 6
    assert len(rec["d"]) == 12 and len(rec["g"]) == 6 and min(rec["bound"]) > 10
    bn_stats = lambda net: {k for k in net.state_dict() if k.endswith(("_mean", "_var", "_tracked"))}  # noqa: E731
    for own, other in rec["d"]:
        assert own & set(state(model.critic, params=True)), "a critic step must change the critic's weights"
        assert other and other <= bn_stats(model.generator), other
    for own, other in rec["g"]:
        assert set(state(model.generator, params=True)) <= own, "a generator step changes every generator weight"
        assert other and other <= bn_stats(model.critic), other
    w = rec["w"][1:]  # the first clamp projects the initial weights: W jumps either way
    assert sum(m > 0 for m in w) >= 10 and sum(w) > 0, w
    assert sum(m > 0 for m in rec["fake"]) >= 5 and sum(rec["fake"]) > 0, rec["fake"]


def test_paper_schedule_gives_the_critic_100_steps_early_and_every_500th():
    mlp = dict(generator="mlp", critic="mlp", g_features=4, d_features=4, mlp_layers=1, latent_dim=2, image_size=16)
    model = WGAN(n_critic=5, paper_critic_schedule=True, **mlp)
    assert [model.critic_iters(g) for g in (0, 24, 25, 499, 500, 501, 1000)] == [100, 100, 5, 5, 100, 5, 100]
    assert WGAN(n_critic=5, **mlp).critic_iters(0) == 5
    tiny_trainer(201).fit(model, RandomImages(n=201, batch_size=1, image_size=16))
    assert model.gen_step == 2 and model.critic_step_in_iter == 1


def test_defaults_are_the_papers_and_the_measured_runtime(tiny_model):
    hp, (opt_g, opt_d) = WGAN().hparams, WGAN().configure_optimizers()
    assert (hp.optimizer, hp.lr_g, hp.lr_d, hp.clip_value, hp.n_critic, hp.latent_dim) == (
        "rmsprop", 5e-5, 5e-5, 0.01, 5, 100)
    assert {type(opt_g), type(opt_d)} == {torch.optim.RMSprop} and opt_g.defaults["lr"] == opt_d.defaults["lr"] == 5e-5
    adam = WGAN(optimizer="adam", **TINY).configure_optimizers()[1]
    assert isinstance(adam, torch.optim.Adam) and adam.defaults["betas"] == (0.5, 0.999)
    cfg = validate(compose_train([]))
    assert cfg.runtime == tiny_model.runtime == RuntimeConfig(fused_clamp=True, channels_last=True, compile=False)
    assert not cfg.data.device_resident and cfg.cpu_threads == 0


def test_latents_are_seeded_cpu_draws_and_sample_batches_images_in_range_without_changing_state(tiny_model):
    z = tiny_model.latents(5, 3)
    assert torch.equal(z, torch.randn(5, 16, generator=torch.Generator().manual_seed(3))) and z.device.type == "cpu"
    assert torch.equal(WGAN(**TINY).fixed_noise, tiny_model.latents(TINY["n_fixed_samples"], 1234))
    rng, bn = torch.random.get_rng_state(), tiny_model.generator.net[1]
    stats = bn.running_mean.clone()
    for training in (True, False):
        tiny_model.generator.train(training)
        batches = list(tiny_model.sample(z, batch_size=2))
        assert [len(b) for b in batches] == [2, 2, 1] and {b.dtype for b in batches} == {torch.float32}
        assert tiny_model.generator.training is training  # the mode is restored
    images = torch.cat(batches)
    assert images.shape == (5, 1, 28, 28) and images.min() >= -1 and images.max() <= 1
    assert torch.allclose(images, tiny_model.generator.eval()(z), atol=1e-6)  # in eval mode
    assert torch.equal(bn.running_mean, stats) and torch.equal(torch.random.get_rng_state(), rng)
    assert not torch.equal(z, tiny_model.latents(5, 4)) and torch.equal(tiny_model.to("meta").latents(5, 3), z)


def train_tiny(precision: str = "32-true", **switches) -> WGAN:
    class Clip(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, *_):
            assert within_clip(pl_module)

    L.seed_everything(0, verbose=False)
    model = WGAN(n_critic=2, lr_d=5e-2, **TINY, **switches)
    tiny_trainer(6, [Clip()], precision=precision).fit(model, RandomImages(n=48, batch_size=8))
    assert model.gen_step == 3 and within_clip(model)
    return model


def assert_same_functions(a: WGAN, b: WGAN) -> None:
    """Same weights, same images and scores up to summation order (RMSprop's ~10 x lr first steps would magnify
    rounding in trained weights)."""
    b.load_state_dict(a.state_dict())
    z, x = torch.randn(8, TINY["latent_dim"]), torch.rand(8, 1, 28, 28) * 2 - 1
    with torch.no_grad():
        assert torch.allclose(a.generator(z), b.generator(z), atol=1e-5)
        assert torch.allclose(a.critic(x), b.critic(x), atol=1e-5)


def test_loop_clamp_nhwc_and_bf16_train_like_the_fused_clamp_in_float32(tiny_model, monkeypatch):
    convs = [p for p in tiny_model.parameters() if p.dim() == 4 and p.shape[-1] > 1]  # channels_last: the default
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    assert not all(p.is_contiguous() for p in convs)
    assert_same_functions(tiny_model, WGAN(channels_last=False, **TINY))
    seen, wasserstein = [], LOSSES["wasserstein"]

    def recording_loss(real_scores, fake_scores):  # inside training_step: the critic's scores, the loss from them
        seen.append((real_scores.dtype, (loss := wasserstein.critic(real_scores, fake_scores)).dtype))
        return loss

    monkeypatch.setitem(LOSSES, "wasserstein", dataclasses.replace(wasserstein, critic=recording_loss))
    fused, loop = train_tiny(), train_tiny(fused_clamp=False)
    assert all(torch.equal(a, b) for a, b in zip(fused.state_dict().values(), loop.state_dict().values(), strict=True))
    assert sum(int((p.abs() == loop.hparams.clip_value).sum()) for p in loop.critic.parameters()) > 10
    assert set(seen) == {(torch.float32, torch.float32)} and len(seen) == 12  # the control of bf16
    bf16 = train_tiny(precision="bf16-mixed")
    assert set(seen[12:]) == {(torch.bfloat16, torch.float32)}  # bf16 scores, the loss (and W) in float32
    assert all(p.dtype == torch.float32 for p in bf16.parameters())


def test_compile_is_in_place_keeps_the_plain_keys_and_the_compiled_networks_train(monkeypatch):
    # The eager backend: what is tested is the module's use of compile, not inductor's code generation.
    compile_ = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kw: compile_(self, backend="eager"))
    compiled, plain = train_tiny(compile=True), WGAN(**TINY)
    assert compiled.generator._compiled_call_impl is not None and compiled.critic._compiled_call_impl is not None
    assert plain.generator._compiled_call_impl is None and list(compiled.state_dict()) == list(plain.state_dict())
    assert_same_functions(compiled, plain)


def test_every_rank_decides_on_a_divergence_with_the_others(tiny_model):
    """A rank whose own losses are finite still stops when another rank saw a NaN (the reduce over ranks)."""
    tiny_model._watch(torch.tensor(1.0))  # this rank: finite
    assert not [name for name, _ in tiny_model.named_buffers() if "bad" in name]  # per rank: DDP broadcasts
    tiny_model._trainer = SimpleNamespace(world_size=2, strategy=SimpleNamespace(
        reduce=lambda t, reduce_op: torch.minimum(t, torch.tensor(4.0)) if reduce_op == "min" else t))
    with pytest.raises(module_mod.DivergenceError, match="at generator step 4") as err:
        tiny_model.check_finite()
    assert err.value.gen_step == 4
    tiny_model._trainer = SimpleNamespace(world_size=1)  # control: alone, this rank sees nothing wrong
    tiny_model.check_finite()


def test_with_the_penalty_and_no_clip_the_critic_leaves_the_clip_range_and_the_penalty_changes_its_step():
    def critic_after_one_step(gp_weight: float) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = WGAN(clip_value=0, gp_weight=gp_weight, critic_batchnorm=False, optimizer="adam", lr_d=1e-2,
                     n_critic=5, **TINY)
        tiny_trainer(1).fit(model, RandomImages(n=8, batch_size=8))
        return state(model.critic, params=True)

    with_penalty, without = critic_after_one_step(10.0), critic_after_one_step(0.0)
    assert max(float(p.abs().max()) for p in with_penalty.values()) > 0.01  # no clipping
    assert any(not torch.equal(with_penalty[k], without[k]) for k in without)  # the penalty reaches the update


def test_the_gan_model_trains_one_d_step_per_g_step_without_clipping():
    cfg = validate(compose_train(["model=gan"]))
    hp = {k: getattr(cfg.model, k) for k in ("loss", "optimizer", "n_critic", "clip_value")}
    assert hp == {"loss": "gan", "optimizer": "adam", "n_critic": 1, "clip_value": 0}
    model = WGAN(**{**hp, "lr_d": 5e-2, **TINY})
    tiny_trainer(4).fit(model, RandomImages(n=32, batch_size=8))
    assert model.gen_step == 4 and max(float(p.abs().max()) for p in model.critic.parameters()) > 0.01


def test_the_averaged_generator_averages_the_weights_samples_like_the_live_one_and_saves_fitting_statistics(
        tiny_model, tmp_path):
    L.seed_everything(0, verbose=False)
    model, seen = WGAN(ema_decay=0.9, n_critic=1, lr_g=1e-2, **TINY), []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append(list(state(pl_module.generator, params=True).values()))

    trainer = tiny_trainer(20, [Record()])
    trainer.fit(model, RandomImages(n=160, batch_size=8))
    expected = seen[0]  # the first update copies the weights
    for weights in seen[1:]:
        expected = [0.9 * e + 0.1 * w for e, w in zip(expected, weights, strict=True)]
    averaged = list(model.generator_ema.module.parameters())
    assert all(torch.allclose(e, a, atol=1e-6) for e, a in zip(expected, averaged, strict=True))
    assert not all(torch.equal(a, w) for a, w in zip(averaged, seen[-1], strict=True))  # not the raw weights
    assert not any(p.requires_grad for p in model.generator_ema.parameters()) and tiny_model.generator_ema is None
    # Samples come from the averaged generator, with BatchNorm statistics of its own weights, not the live ones
    # copied over (AveragedModel's use_buffers=False): those misfit more as a run goes on (near-blank samples).
    z = model.latents(256, 0)
    ema, raw = torch.cat(list(model.sample(z, batch_size=100))), torch.cat(list(model.sample(z, ema=False)))
    assert not torch.equal(ema, raw) and torch.allclose(ema, model.generator_ema.module.eval()(z), atol=1e-6)
    assert raw.std() > 0.02 and 0.5 < ema.std() / raw.std() < 2, (float(ema.std()), float(raw.std()))
    own = copy.deepcopy(model.generator_ema.module)
    update_bn(model.latents(512, 1234).split(64), own)  # from the seeded noise
    assert all(torch.equal(a, b) for a, b in zip(own.buffers(), model.generator_ema.module.buffers(), strict=True))
    # A checkpoint's statistics fit its averaged weights: recomputing them from the saved weights gives them.
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    fresh = WGAN.load_from_checkpoint(tmp_path / "m.ckpt")  # its statistics are recomputed at first use
    saved = {k: v.clone() for k, v in fresh.generator_ema.state_dict().items() if "running" in k}
    assert fresh.refresh_ema_batchnorm() and fresh.gen_step == 20
    assert all(torch.allclose(fresh.generator_ema.state_dict()[k], v, rtol=1e-5, atol=1e-7) for k, v in saved.items())


@pytest.mark.parametrize("path", [LEGACY_CKPT, LEGACY_EMA_CKPT], ids=["plain", "averaged"])
def test_checkpoints_of_e089f38_load_and_sample(path):
    """Written with the runtime switches among the hyperparameters, and the averaged generator's BatchNorm."""
    ckpt, by_lightning = load(path), WGAN.load_from_checkpoint(path, map_location="cpu")
    rebuilt = WGAN(**model_hparams(ckpt["hyper_parameters"]))  # as generate and evaluate rebuild it
    rebuilt.load_state_dict(ckpt["state_dict"])
    rebuilt.on_load_checkpoint(ckpt)
    assert "compile" not in rebuilt.hparams and "channels_last" not in by_lightning.hparams
    assert by_lightning.gen_step == rebuilt.gen_step == 6 and (rebuilt.generator_ema is None) == (path == LEGACY_CKPT)
    z = rebuilt.latents(5, 0)
    a, b = (torch.cat(list(m.sample(z, batch_size=2))) for m in (by_lightning, rebuilt))
    assert torch.equal(a, b) and a.shape == (5, 1, 28, 28) and a.min() >= -1 and a.max() <= 1 and a.std() > 0
