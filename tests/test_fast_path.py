"""The fast-path switches change speed, never the algorithm: each gives the plain path's results."""

from __future__ import annotations

from types import SimpleNamespace

import lightning as L
import pytest
import torch

from tests.conftest import TINY, RandomImages, tiny_trainer, write_fake_fashion_mnist
from tests.test_config import make
from wgan_lit.config import ConfigError, validate
from wgan_lit.data import FashionMNISTDataModule
from wgan_lit.module import WGAN


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


def test_bf16_mixed_precision_works_with_manual_optimization_and_the_clip():
    """Autocast computes in bf16 but the weights stay float32, so the clamp bounds them exactly."""
    seen: list[torch.dtype] = []

    class Dtypes(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            assert critic_within_clip(pl_module)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                seen.append(pl_module.critic(batch).dtype)

    model = train_tiny(callbacks=[Dtypes()], precision="bf16-mixed")
    assert model.gen_step == 3 and len(seen) == 6
    assert set(seen) == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_device_resident_moves_the_images_to_the_trainers_device_and_batches_stay_there(fake_fmnist):
    dm = FashionMNISTDataModule(root=str(fake_fmnist), batch_size=8, device_resident=True)
    dm.trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("meta")))  # a stand-in GPU
    dm.setup("fit")
    assert dm.images.device.type == "meta"
    loader = dm.train_dataloader()
    assert not loader.pin_memory  # device tensors cannot be pinned
    batch = next(iter(loader))
    assert batch.device.type == "meta" and batch.shape == (8, 1, 28, 28) and batch.dtype == torch.uint8


def test_device_resident_is_a_no_op_on_cpu(fake_fmnist):
    dm = FashionMNISTDataModule(root=str(fake_fmnist), batch_size=8, device_resident=True)
    dm.trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cpu")))
    dm.setup("fit")
    assert dm.images.device.type == "cpu"


def test_device_resident_refuses_worker_processes():
    with pytest.raises(ConfigError, match="data.num_workers=2.*device_resident"):
        validate(make(["data.device_resident=true", "data.num_workers=2"]))
    validate(make(["data.device_resident=true"]))
    validate(make(["data.num_workers=2"]))


def test_fast_path_defaults_are_the_measured_choice():
    cfg = validate(make([]))
    assert cfg.model.fused_clamp and cfg.model.channels_last and not cfg.model.compile
    assert not cfg.data.device_resident and cfg.cpu_threads == 0


def test_cpu_threads_must_not_be_negative():
    with pytest.raises(ConfigError, match="cpu_threads=-1"):
        validate(make(["cpu_threads=-1"]))


def test_fast_path_data_module_still_used_by_train_with_the_switch(tmp_path):
    from wgan_lit.train import build_datamodule

    root = write_fake_fashion_mnist(tmp_path / "d")
    dm = build_datamodule(validate(make([f"data.root={root}", "data.device_resident=true"])).data)
    assert isinstance(dm, FashionMNISTDataModule) and dm.device_resident


def test_cpu_15min_preset_stops_lightning_after_15_minutes_of_training():
    import dataclasses

    from lightning.pytorch.callbacks import Timer

    cfg = validate(make(["experiment=fashion_cpu_15min"]))
    # time alone bounds it: no epoch or generator-step limit cuts the 15 minutes short
    assert cfg.trainer.max_time == "00:00:15:00" and cfg.trainer.max_epochs == -1 and cfg.max_gen_steps == -1
    trainer = L.Trainer(**{**dataclasses.asdict(cfg.trainer), "accelerator": "cpu", "devices": 1},
                        logger=False, enable_checkpointing=False)
    (timer,) = [c for c in trainer.callbacks if isinstance(c, Timer)]
    assert timer._duration == 15 * 60


def test_train_sets_the_number_of_cpu_threads_from_the_config(tmp_path, monkeypatch):
    from wgan_lit.train import train

    calls: list[int] = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)  # record, and leave this process's threads alone
    root = write_fake_fashion_mnist(tmp_path / "d")
    cfg = validate(make([f"data.root={root}", "cpu_threads=1", "trainer=cpu", "trainer.enable_progress_bar=false",
                         "model.g_features=8", "model.d_features=8", "model.latent_dim=16", "model.n_fixed_samples=4",
                         "model.n_critic=1", "data.batch_size=16", "max_gen_steps=1",
                         "logger.sample_every_n_gen_steps=0"]))
    train(cfg, tmp_path / "run")
    assert calls == [1]
