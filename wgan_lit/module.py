"""The WGAN LightningModule: Algorithm 1 of Arjovsky, Chintala & Bottou (2017), arXiv:1701.07875.

Each batch is one critic update, after which every critic weight is clamped to [-c, c]; each ``n_critic``-th is
followed by one generator update. The objective is ``losses.LOSSES[model.loss]``, plus the gradient penalty when
``gp_weight`` > 0. ``gen_step`` counts generator updates (Lightning's ``global_step`` counts both kinds).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Iterator
from typing import Any

import lightning as L
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn, update_bn

from wgan_lit.config import RUNTIME_KEYS, DataConfig, LoggerConfig, ModelConfig, RuntimeConfig
from wgan_lit.losses import LOSSES, gradient_penalty
from wgan_lit.networks import Critic, Generator, MLPCritic, MLPGenerator


class DivergenceError(RuntimeError):
    """A loss or a weight became NaN or inf at generator step ``gen_step``."""

    def __init__(self, gen_step: int, what: str = "a critic or generator loss") -> None:
        super().__init__(
            f"Training diverged: {what} became NaN or inf at generator step {gen_step}. The run was stopped; "
            "checkpoints written before that step are kept and were not overwritten. Resume from the last "
            "good one with lower learning rates (model.lr_d, model.lr_g) or a smaller model.clip_value.")
        self.gen_step = gen_step


@torch.no_grad()
def clamp_(params: list[torch.Tensor], clip_value: float) -> None:
    """Clamp every tensor to [-clip_value, clip_value] with two multi-tensor kernels, not a Python loop."""
    torch._foreach_clamp_min_(params, -clip_value)
    torch._foreach_clamp_max_(params, clip_value)


def model_hparams(hparams: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's ``hyper_parameters`` less the runtime keys old checkpoints held there: WGAN's arguments."""
    return {k: v for k, v in hparams.items() if k not in RUNTIME_KEYS}


class WGAN(L.LightningModule):
    EMA_BN_BATCHES, EMA_BN_BATCH = 8, 64  # noise images whose statistics the averaged generator's BatchNorm gets

    def __init__(self, image_size: int = DataConfig.image_size, channels: int = 1,
                 log_every_n_gen_steps: int = LoggerConfig.log_every_n_gen_steps,
                 channels_last: bool = RuntimeConfig.channels_last, compile: bool = RuntimeConfig.compile,
                 fused_clamp: bool = RuntimeConfig.fused_clamp, cpu_threads: int = 0, **model: Any) -> None:
        """``model``: ModelConfig's fields. The runtime switches and cpu_threads go to ``wgan_runtime``, not hparams."""
        super().__init__()
        hp = ModelConfig(**model)  # an unknown key fails here, naming it
        self.save_hyperparameters({"image_size": image_size, "channels": channels,
                                   "log_every_n_gen_steps": log_every_n_gen_steps, **dataclasses.asdict(hp)})
        self.runtime = RuntimeConfig(channels_last=channels_last, compile=compile, fused_clamp=fused_clamp)
        self.cpu_threads, self.automatic_optimization = cpu_threads, False
        self.generator: torch.nn.Module = (
            MLPGenerator(hp.latent_dim, channels, image_size, hp.g_features, hp.mlp_layers) if hp.generator == "mlp"
            else Generator(hp.latent_dim, channels, image_size, hp.g_features, hp.g_batchnorm, hp.n_extra_layers))
        self.critic: torch.nn.Module = (
            MLPCritic(channels, image_size, hp.d_features, hp.mlp_layers) if hp.critic == "mlp"
            else Critic(channels, image_size, hp.d_features, hp.critic_batchnorm, hp.n_extra_layers))
        if channels_last:  # NHWC weights; training_step converts the real batch, G's output follows its weights
            self.generator.to(memory_format=torch.channels_last)
            self.critic.to(memory_format=torch.channels_last)
        # In the module, so checkpoints hold it; built before compile; no gradients, so DDP waits for none. Only
        # parameters: averaged BatchNorm statistics lag the weights, so refresh_ema_batchnorm recomputes them.
        self.generator_ema: AveragedModel | None = AveragedModel(
            self.generator, multi_avg_fn=get_ema_multi_avg_fn(hp.ema_decay), use_buffers=False
        ).requires_grad_(False) if hp.ema_decay > 0 else None
        self._ema_bn_step: int | None = None  # the gen_step of the averaged weights its BatchNorm stats fit
        if compile:  # in place, so state_dict keys (and checkpoints) stay those of the plain networks
            self.generator.compile()
            self.critic.compile()
        # A buffer, so a resumed run or a reloaded checkpoint draws its grids from the same noise.
        self.register_buffer("fixed_noise", self.latents(hp.n_fixed_samples, hp.fixed_noise_seed))
        self.gen_step = self.critic_step_in_iter = 0  # generator updates; critic updates since the last one
        # The first generator step (1-based) with a NaN/inf loss, inf while none: on the device, so no sync per
        # step; read at log points and checkpoint writes, agreed over ranks. Not a buffer: DDP would broadcast it.
        self._first_bad_step: torch.Tensor | None = None

    def critic_iters(self, gen_step: int) -> int:
        """Critic updates before generator update ``gen_step`` (0-based); the paper's code: 100 early, every 500th."""
        paper = self.hparams.paper_critic_schedule and (gen_step < 25 or gen_step % 500 == 0)
        return 100 if paper else self.hparams.n_critic

    def noise(self, n: int) -> torch.Tensor:
        return torch.randn(n, self.hparams.latent_dim, device=self.device)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        hp, objective, (opt_g, opt_d) = self.hparams, LOSSES[self.hparams.loss], self.optimizers()
        real = batch.contiguous(memory_format=torch.channels_last) if self.runtime.channels_last else batch
        penalty = None
        with self.toggled_optimizer(opt_d):
            with torch.no_grad():
                fake = self.generator(self.noise(real.shape[0]))
            d_loss = objective.critic(self.critic(real), self.critic(fake))  # 2 passes: BatchNorm sees each apart
            estimate = d_loss.detach()  # logged: the critic's loss without the penalty
            if hp.gp_weight > 0:
                penalty = gradient_penalty(self.critic, real, fake)
                d_loss = d_loss + hp.gp_weight * penalty
            opt_d.zero_grad(set_to_none=True)
            self.manual_backward(d_loss)
            opt_d.step()
            if hp.clip_value > 0 and self.runtime.fused_clamp:
                clamp_(list(self.critic.parameters()), hp.clip_value)
            elif hp.clip_value > 0:  # the seed projects' loop, one kernel per tensor (kept to measure it)
                for p in self.critic.parameters():
                    p.data.clamp_(-hp.clip_value, hp.clip_value)
        self._watch(d_loss)
        self.critic_step_in_iter += 1
        if self.critic_step_in_iter < self.critic_iters(self.gen_step):
            return
        with self.toggled_optimizer(opt_g):
            g_loss = objective.generator(self.critic(self.generator(self.noise(real.shape[0]))))
            opt_g.zero_grad(set_to_none=True)
            self.manual_backward(g_loss)
            opt_g.step()
        if self.generator_ema is not None:
            self.generator_ema.update_parameters(self.generator)
        self._watch(g_loss)
        self.critic_step_in_iter, self.gen_step = 0, self.gen_step + 1
        self.log("gen_step", self.gen_step, prog_bar=True, logger=False)  # host int: no device sync
        if self.gen_step % hp.log_every_n_gen_steps == 0:
            self._log_curves(estimate, g_loss, penalty)

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        hp = self.hparams
        make = {"rmsprop": torch.optim.RMSprop,  # the paper's; it reports Adam less stable with clipping
                "adam": functools.partial(torch.optim.Adam, betas=(hp.adam_beta1, hp.adam_beta2))}.get(hp.optimizer)
        if make is None:
            raise ValueError(f"optimizer={hp.optimizer!r}: expected 'rmsprop' or 'adam'")
        return [make(self.generator.parameters(), lr=hp.lr_g), make(self.critic.parameters(), lr=hp.lr_d)]

    # ---- divergence: noted on the device, decided at log points and checkpoint writes, alike on every rank ----
    def _watch(self, loss: torch.Tensor) -> None:
        # Python scalars, not host tensors: a tensor made from a host value would be one copy (a wait) per step.
        bad = torch.where(torch.isfinite(loss.detach()), math.inf, float(self.gen_step + 1))
        first = self._first_bad_step
        self._first_bad_step = bad if first is None or first.device != bad.device else torch.minimum(first, bad)

    def _agreed_min(self, device: torch.device, *values: torch.Tensor) -> torch.Tensor:
        """[first bad step, *values] on ``device``, each the minimum over all ranks, so every rank decides alike."""
        first = self._first_bad_step if self._first_bad_step is not None else torch.tensor(math.inf)
        stacked = torch.stack([first.to(device), *(v.float() for v in values)])
        if self._trainer is not None and self.trainer.world_size > 1:
            stacked = self.trainer.strategy.reduce(stacked, reduce_op="min")
        return stacked

    def _log_curves(self, d_loss: torch.Tensor, g_loss: torch.Tensor, penalty: torch.Tensor | None) -> None:
        """``d_loss``: the critic's loss without the penalty. Every rank logs at the same step: the reduce is safe."""
        bad = self._agreed_min(d_loss.device)[0]  # one device sync per log point, none in between
        gp = torch.zeros_like(bad) if penalty is None else penalty.detach().float()
        d, g, gp, bad = torch.stack([d_loss.detach().float(), g_loss.detach().float(), gp, bad]).cpu().tolist()
        if bad != math.inf:  # any rank's NaN stops them all, with one message
            raise DivergenceError(int(bad))
        objective = LOSSES[self.hparams.loss]
        metrics = {"critic/loss": d, "generator/loss": g, objective.curve: objective.estimate(d)}
        metrics.update({} if penalty is None else {"critic/gradient_penalty": gp})
        for logger in self.loggers:
            logger.log_metrics(metrics, step=self.gen_step)
        self.log(objective.short, metrics[objective.curve], prog_bar=True, logger=False)  # bar, checkpoint names
        self.log("g_loss", g, logger=False)  # final value goes to the HParams view (callbacks.RunReport)

    def check_finite(self) -> None:
        """Raise DivergenceError, on every rank alike, unless every loss so far and every weight is finite."""
        weights_ok = torch.stack([torch.isfinite(p).all() for p in self.parameters()]).all()
        bad, ok = self._agreed_min(weights_ok.device, weights_ok).cpu().tolist()
        if bad != math.inf:
            raise DivergenceError(int(bad))
        if not ok:
            raise DivergenceError(self.gen_step, what="a network weight")

    # ---- checkpoints: counters, the averaged generator's statistics and the runtime record -------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.refresh_ema_batchnorm():  # the saved statistics fit the saved averaged weights
            checkpoint["state_dict"].update(self.generator_ema.state_dict(prefix="generator_ema."))
        checkpoint["wgan_counters"] = {"gen_step": self.gen_step, "critic_step_in_iter": self.critic_step_in_iter}
        checkpoint["wgan_runtime"] = self.runtime_record()

    def runtime_record(self) -> dict[str, Any]:
        """How this run computes (RUNTIME_KEYS): a resume reuses it rather than probing again (fast_path.py)."""
        precision = str(self.trainer.precision) if self._trainer is not None else None
        return {"precision": precision, "cpu_threads": self.cpu_threads, **dataclasses.asdict(self.runtime)}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        counters = checkpoint.get("wgan_counters", {})
        self.gen_step, self.critic_step_in_iter = counters.get("gen_step", 0), counters.get("critic_step_in_iter", 0)
        self._ema_bn_step = None  # recomputed at first use: a checkpoint may predate recomputing them

    # ---- sampling: the one home of latents and samples (grids, generate, metrics, evaluate, study) -----------
    def latents(self, n: int, seed: int) -> torch.Tensor:
        """``n`` codes from ``seed``, drawn on the CPU from a private generator: the same codes on any device."""
        return torch.randn(n, self.hparams.latent_dim, generator=torch.Generator().manual_seed(seed))

    @torch.no_grad()
    def refresh_ema_batchnorm(self) -> bool:
        """Give the averaged generator's BatchNorm its own weights' statistics unless they fit already: train-mode
        passes of seeded noise (``update_bn``), so they depend on the weights alone. False without an average."""
        if self.generator_ema is None:
            return False
        if self._ema_bn_step != self.gen_step:  # one draw of all the codes equals the per-batch draws, bit for bit
            noise = self.latents(self.EMA_BN_BATCHES * self.EMA_BN_BATCH, self.hparams.fixed_noise_seed)
            update_bn(noise.split(self.EMA_BN_BATCH), self.generator_ema.module, device=self.device)
            self._ema_bn_step = self.gen_step
        return True

    @torch.no_grad()
    def generate(self, z: torch.Tensor, ema: bool = True) -> torch.Tensor:
        """One batch for ``z`` in eval mode (the mode is restored), from the averaged generator unless ema=False."""
        net = self.generator if not ema or not self.refresh_ema_batchnorm() else self.generator_ema.module
        was_training = net.training
        net.eval()
        try:
            return net(z.to(self.device))
        finally:
            net.train(was_training)

    def sample(self, z: torch.Tensor, batch_size: int = 256, ema: bool = True) -> Iterator[torch.Tensor]:
        """Images for the codes ``z``, ``batch_size`` at a time, as float32 in [-1, 1] on the module's device."""
        for start in range(0, len(z), batch_size):
            yield self.generate(z[start:start + batch_size], ema=ema).float().clamp_(-1, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.generator(z)
