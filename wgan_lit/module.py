"""The WGAN LightningModule: Algorithm 1 of Arjovsky, Chintala & Bottou (2017), arXiv:1701.07875.

Every training batch is one critic update on fresh real images and fresh noise, followed by clamping all
critic parameters to [-c, c]. After ``n_critic`` such updates comes one generator update on fresh noise.
The paper's comparisons are options of the same loop: the gradient penalty of Gulrajani et al. (2017) in
place of clipping (``gp_weight``), and the standard GAN (``loss="gan"``) as the baseline.
Lightning's ``global_step`` counts both kinds of optimizer step, so the module keeps its own
``gen_step`` counter: it is the x axis of the logged curves and the unit of ``max_gen_steps``.
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
    """A loss or a weight became NaN or inf; the message names the generator step."""

    def __init__(self, message: str, gen_step: int) -> None:
        super().__init__(message)
        self.gen_step = gen_step


@torch.no_grad()
def clamp_(params: list[torch.Tensor], clip_value: float) -> None:
    """Clamp every tensor to [-clip_value, clip_value] with two multi-tensor kernels, not a Python loop."""
    torch._foreach_clamp_min_(params, -clip_value)
    torch._foreach_clamp_max_(params, clip_value)


def model_hparams(hparams: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's ``hyper_parameters`` without the runtime switches that checkpoints written before
    RuntimeConfig kept there: what ``WGAN(**...)`` takes to rebuild the model, with this machine's defaults."""
    return {k: v for k, v in hparams.items() if k not in RUNTIME_KEYS}


class WGAN(L.LightningModule):
    def __init__(self, image_size: int = DataConfig.image_size, channels: int = 1,
                 log_every_n_gen_steps: int = LoggerConfig.log_every_n_gen_steps,
                 channels_last: bool = RuntimeConfig.channels_last, compile: bool = RuntimeConfig.compile,
                 fused_clamp: bool = RuntimeConfig.fused_clamp, cpu_threads: int = 0, **model: Any) -> None:
        """``model``: the fields of :class:`~wgan_lit.config.ModelConfig`, the one home of their defaults.

        ``channels_last``, ``compile``, ``fused_clamp`` (:class:`~wgan_lit.config.RuntimeConfig`) and
        ``cpu_threads`` (set by train.py; only recorded here) say how this run computes: not hyperparameters,
        so a checkpoint loads anywhere with the defaults; they go into its ``wgan_runtime`` entry instead."""
        super().__init__()
        hp = ModelConfig(**model)  # an unknown key fails here, naming it
        # An explicit dict, so the runtime arguments are not among the saved hyperparameters.
        self.save_hyperparameters({"image_size": image_size, "channels": channels,
                                   "log_every_n_gen_steps": log_every_n_gen_steps, **dataclasses.asdict(hp)})
        self.runtime = RuntimeConfig(channels_last=channels_last, compile=compile, fused_clamp=fused_clamp)
        self.cpu_threads = cpu_threads
        self.automatic_optimization = False
        if hp.generator == "mlp":
            self.generator: torch.nn.Module = MLPGenerator(hp.latent_dim, channels, image_size, hp.g_features,
                                                           hp.mlp_layers)
        else:
            self.generator = Generator(hp.latent_dim, channels, image_size, hp.g_features, hp.g_batchnorm,
                                       hp.n_extra_layers)
        if hp.critic == "mlp":
            self.critic: torch.nn.Module = MLPCritic(channels, image_size, hp.d_features, hp.mlp_layers)
        else:
            self.critic = Critic(channels, image_size, hp.d_features, hp.critic_batchnorm, hp.n_extra_layers)
        if channels_last:  # NHWC weights; training_step converts the real batch, G's output follows its weights
            self.generator.to(memory_format=torch.channels_last)
            self.critic.to(memory_format=torch.channels_last)
        # The averaged generator lives in the module, so checkpoints hold it and a resume continues it exactly.
        # Built before compile: it only samples, and a copy of a compiled module would compile again.
        # Parameters only: averaged BatchNorm statistics lag the weights (running_var 100x the live one's for
        # thousands of steps at 0.999, near-blank samples), so they are recomputed from noise before every use.
        self.generator_ema: AveragedModel | None = None
        if hp.ema_decay > 0:
            self.generator_ema = AveragedModel(self.generator, multi_avg_fn=get_ema_multi_avg_fn(hp.ema_decay),
                                               use_buffers=False)
            self.generator_ema.requires_grad_(False)  # no optimizer's, and DDP must not wait for its gradients
        self._ema_bn_step: int | None = None  # the gen_step of the averaged weights its BatchNorm stats fit
        if compile:  # in place, so state_dict keys (and checkpoints) stay those of the plain networks
            self.generator.compile()
            self.critic.compile()
        # Persistent so a resumed run or a reloaded checkpoint draws its grids from the same noise.
        self.register_buffer("fixed_noise", self.latents(hp.n_fixed_samples, hp.fixed_noise_seed))
        self.gen_step = 0  # generator updates done
        # Divergence guard: the first generator step (absolute, 1-based) at which a loss was NaN/inf, inf while
        # none was. On the device, so it costs no sync per step; read at log points and before every checkpoint
        # write, decided with the other ranks (check_finite). A plain attribute, not a buffer: DDP would
        # overwrite every rank's with rank 0's.
        self._first_bad_step: torch.Tensor | None = None
        self.critic_step_in_iter = 0  # critic updates done since the last generator update

    # ---- the algorithm -------------------------------------------------------------------------------

    def critic_iters(self, gen_step: int) -> int:
        """Critic updates before generator update number ``gen_step`` (0-based)."""
        if self.hparams.paper_critic_schedule and (gen_step < 25 or gen_step % 500 == 0):
            return 100  # the paper's code: lets the critic approach optimality early and now and then
        return self.hparams.n_critic

    def noise(self, n: int) -> torch.Tensor:
        return torch.randn(n, self.hparams.latent_dim, device=self.device)

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        opt_g, opt_d = self.optimizers()
        real = batch.contiguous(memory_format=torch.channels_last) if self.runtime.channels_last else batch
        n = real.shape[0]

        hp = self.hparams
        penalty = None
        with self.toggled_optimizer(opt_d):
            with torch.no_grad():
                fake = self.generator(self.noise(n))
            real_scores = self.critic(real)  # two passes, as in the paper: BatchNorm sees real and fake apart
            fake_scores = self.critic(fake)
            d_loss = LOSSES[hp.loss].critic(real_scores, fake_scores)
            estimate = d_loss.detach()  # logged: the critic's loss without the penalty
            if hp.gp_weight > 0:
                penalty = gradient_penalty(self.critic, real, fake)
                d_loss = d_loss + hp.gp_weight * penalty
            opt_d.zero_grad(set_to_none=True)
            self.manual_backward(d_loss)
            opt_d.step()
            if hp.clip_value > 0 and self.runtime.fused_clamp:
                clamp_(self._critic_params, hp.clip_value)
            elif hp.clip_value > 0:  # the seed projects' loop, one kernel launch per tensor (kept to measure it)
                for p in self.critic.parameters():
                    p.data.clamp_(-hp.clip_value, hp.clip_value)
        self._watch(d_loss)
        self.critic_step_in_iter += 1

        if self.critic_step_in_iter < self.critic_iters(self.gen_step):
            return
        with self.toggled_optimizer(opt_g):
            fake_scores = self.critic(self.generator(self.noise(n)))
            g_loss = LOSSES[hp.loss].generator(fake_scores)
            opt_g.zero_grad(set_to_none=True)
            self.manual_backward(g_loss)
            opt_g.step()
        if self.generator_ema is not None:
            self.generator_ema.update_parameters(self.generator)
        self._watch(g_loss)
        self.critic_step_in_iter = 0
        self.gen_step += 1
        self.log("gen_step", self.gen_step, prog_bar=True, logger=False)  # host int: no device sync
        if self.gen_step % self.hparams.log_every_n_gen_steps == 0:
            self._log_curves(d_loss=estimate, g_loss=g_loss, penalty=penalty)

    def _watch(self, loss: torch.Tensor) -> None:
        """Note the generator step in progress if ``loss`` is not finite (no device sync)."""
        # Python scalars, not host tensors: a tensor made from a host value would be one copy (a wait) per step.
        bad = torch.where(torch.isfinite(loss.detach()), math.inf, float(self.gen_step + 1))
        first = self._first_bad_step
        self._first_bad_step = bad if first is None or first.device != bad.device else torch.minimum(first, bad)

    def _agreed_first_bad_step(self, device: torch.device) -> torch.Tensor:
        """The first bad step over all ranks (the minimum), so that every rank decides alike."""
        first_bad = self._first_bad_step if self._first_bad_step is not None else torch.tensor(math.inf)
        first_bad = first_bad.to(device)
        if self._trainer is not None and self.trainer.world_size > 1:
            first_bad = self.trainer.strategy.reduce(first_bad, reduce_op="min")
        return first_bad

    def _log_curves(self, d_loss: torch.Tensor, g_loss: torch.Tensor, penalty: torch.Tensor | None) -> None:
        """``d_loss``: the critic's loss without the penalty, whose negative is the W estimate."""
        # One device sync per log point, none in between. Every rank logs at the same step: the reduce is safe.
        bad = self._agreed_first_bad_step(d_loss.device)
        gp = torch.zeros_like(bad) if penalty is None else penalty.detach().float()
        d, g, gp, bad = torch.stack([d_loss.detach().float(), g_loss.detach().float(), gp, bad]).cpu().tolist()
        if bad != math.inf:  # any rank's NaN stops them all, with one message
            raise self._divergence(int(bad))
        objective = LOSSES[self.hparams.loss]
        metrics = {"critic/loss": d, "generator/loss": g, objective.curve: objective.estimate(d)}
        if penalty is not None:
            metrics["critic/gradient_penalty"] = gp
        for logger in self.loggers:
            logger.log_metrics(metrics, step=self.gen_step)
        # Also into callback_metrics (progress bar, checkpoint names); the loggers got them above.
        self.log(objective.short, metrics[objective.curve], prog_bar=True, logger=False)
        self.log("g_loss", g, logger=False)  # final value goes to the HParams view (HParamsSummary)

    def _divergence(self, gen_step: int, what: str = "a critic or generator loss") -> DivergenceError:
        return DivergenceError(
            f"Training diverged: {what} became NaN or inf at generator step {gen_step}. The run was stopped; "
            "checkpoints written before that step are kept and were not overwritten. Resume from the last "
            "good one with lower learning rates (model.lr_d, model.lr_g) or a smaller model.clip_value.",
            gen_step,
        )

    def check_finite(self) -> None:
        """Raise DivergenceError, on every rank alike, unless every loss so far and every weight is finite."""
        weights_ok = torch.stack([torch.isfinite(p).all() for p in self.parameters()]).all().float()
        if self._trainer is not None and self.trainer.world_size > 1:
            weights_ok = self.trainer.strategy.reduce(weights_ok, reduce_op="min")
        bad, ok = torch.stack([self._agreed_first_bad_step(weights_ok.device), weights_ok]).cpu().tolist()
        if bad != math.inf:
            raise self._divergence(int(bad))
        if not ok:
            raise self._divergence(self.gen_step, what="a network weight")

    @property
    def _critic_params(self) -> list[torch.Tensor]:
        return list(self.critic.parameters())

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        hp = self.hparams
        if hp.optimizer == "rmsprop":
            make = torch.optim.RMSprop
        elif hp.optimizer == "adam":  # the paper reports it less stable with clipping; DCGAN's betas by default
            make = functools.partial(torch.optim.Adam, betas=(hp.adam_beta1, hp.adam_beta2))
        else:
            raise ValueError(f"optimizer={hp.optimizer!r}: expected 'rmsprop' or 'adam'")
        return [make(self.generator.parameters(), lr=hp.lr_g), make(self.critic.parameters(), lr=hp.lr_d)]

    # ---- counters survive checkpoints ----------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.refresh_ema_batchnorm():  # the saved statistics fit the saved averaged weights
            checkpoint["state_dict"].update(
                {f"generator_ema.{k}": v for k, v in self.generator_ema.state_dict().items()})
        checkpoint["wgan_counters"] = {"gen_step": self.gen_step, "critic_step_in_iter": self.critic_step_in_iter}
        checkpoint["wgan_runtime"] = self.runtime_record()

    def runtime_record(self) -> dict[str, Any]:
        """How this run computes (RUNTIME_KEYS): a resume reuses it rather than probing again (fast_path.py)."""
        precision = str(self.trainer.precision) if self._trainer is not None else None
        return {"precision": precision, "cpu_threads": self.cpu_threads, **dataclasses.asdict(self.runtime)}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        counters = checkpoint.get("wgan_counters", {})
        self.gen_step = counters.get("gen_step", 0)
        self.critic_step_in_iter = counters.get("critic_step_in_iter", 0)
        self._ema_bn_step = None  # recomputed at first use: a checkpoint may predate recomputing them

    # ---- sampling --------------------------------------------------------------------------------------

    EMA_BN_BATCHES, EMA_BN_BATCH = 8, 64  # noise images whose statistics the averaged generator's BatchNorm gets

    @torch.no_grad()
    def refresh_ema_batchnorm(self) -> bool:
        """Give the averaged generator's BatchNorm the statistics of its own weights, unless they already fit:
        train-mode passes of noise (``update_bn``), drawn from a private seeded generator so the result depends
        on the weights alone and the training's random stream is untouched. False when there is no average."""
        if self.generator_ema is None:
            return False
        if self._ema_bn_step != self.gen_step:
            # One draw of all the codes is bit-identical to consecutive per-batch draws from one generator.
            noise = self.latents(self.EMA_BN_BATCHES * self.EMA_BN_BATCH, self.hparams.fixed_noise_seed)
            update_bn(noise.split(self.EMA_BN_BATCH), self.generator_ema.module, device=self.device)
            self._ema_bn_step = self.gen_step
        return True

    @torch.no_grad()
    def generate(self, z: torch.Tensor, ema: bool = True) -> torch.Tensor:
        """Images in [-1, 1] for latent codes ``z``, with BatchNorm in inference mode (the training networks'
        state is unchanged). From the averaged generator when the model keeps one, unless ``ema=False``."""
        net = self.generator if not ema or not self.refresh_ema_batchnorm() else self.generator_ema.module
        was_training = net.training
        net.eval()
        try:
            return net(z.to(self.device))
        finally:
            net.train(was_training)

    def latents(self, n: int, seed: int) -> torch.Tensor:
        """``n`` latent codes from ``seed``, drawn on the CPU from a private generator: the same codes on any
        device, and the training's random stream untouched."""
        return torch.randn(n, self.hparams.latent_dim, generator=torch.Generator().manual_seed(seed))

    def sample(self, z: torch.Tensor, batch_size: int = 256, ema: bool = True) -> Iterator[torch.Tensor]:
        """Images for the codes ``z``, ``batch_size`` at a time: float32 in [-1, 1] on the module's device, from
        the averaged generator when there is one (unless ``ema=False``), as :meth:`generate` makes them."""
        for start in range(0, len(z), batch_size):
            yield self.generate(z[start:start + batch_size], ema=ema).float().clamp_(-1, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.generator(z)
