"""Generator iterations per second: the project's Lightning training vs a plain PyTorch loop, in one process.

One generator iteration = ``n_critic`` critic steps (each on a fresh batch, then the weight clip) + one
generator step, at the configured batch size. Both sides train the same networks (``wgan_lit.networks``)
on the same Fashion-MNIST IDX files:

* ``plain``: the loop the seed projects write (the WGAN authors' ``main.py``, the PyTorch DCGAN example):
  torchvision's ``FashionMNIST`` dataset with per-item ``ToTensor`` + ``Normalize`` in a ``DataLoader``,
  and ``for p in netD.parameters(): p.data.clamp_(-c, c)``.
* ``lightning`` and its variants: ``conf/train.yaml`` composed by Hydra with the listed overrides, the
  project's own data module and ``WGAN`` module, a ``lightning.Trainer`` as ``wgan_lit.train.train`` builds
  it (TensorBoard logger in a temporary folder, no checkpoints, no sample grids, no progress bar).

Each variant trains ``--warmup`` generator iterations untimed, then ``--iters`` timed ones. The FLOP
efficiency is (matmul/conv FLOPs of one generator iteration, counted by ``FlopCounterMode``) x rate divided
by the float32 matmul peak timed on the same device in the same process.

    python benchmarks/throughput.py                      # CPU, default Fashion-MNIST settings
    python benchmarks/throughput.py --quick              # smoke test: one timed iteration per variant
    python benchmarks/throughput.py --device cuda --image-size 64 --channels 3
    python benchmarks/throughput.py --probe --features 32 --variants lightning "lightning bf16-mixed" \
        "lightning NCHW" "lightning compile" "lightning 1 thread"   # the probe's choice vs each fixed setting
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import itertools
import logging
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader
from torch.utils.flop_counter import FlopCounterMode

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run as a script from anywhere

from wgan_lit import fast_path  # noqa: E402
from wgan_lit.cli import CONF_DIR  # noqa: E402
from wgan_lit.config import register_configs, validate  # noqa: E402
from wgan_lit.data import FashionMNISTDataModule, build_datamodule  # noqa: E402
from wgan_lit.fashion_mnist import locate_fashion_mnist  # noqa: E402
from wgan_lit.losses import critic_loss, generator_loss  # noqa: E402
from wgan_lit.module import WGAN  # noqa: E402
from wgan_lit.networks import Critic, Generator  # noqa: E402

# name -> Hydra overrides on top of the default config; each switches one fast-path option off or on.
CPU_VARIANTS: dict[str, list[str]] = {
    "lightning": [],  # the defaults: in-memory uint8 batches, fused clamp, channels_last
    "lightning per-item loader": ["+bench.per_item_loader=true"],
    "lightning python clamp": ["runtime.fused_clamp=false"],
    "lightning NCHW": ["runtime.channels_last=false"],
    "lightning compile": ["runtime.compile=true"],
    "lightning bf16-mixed": ["trainer.precision=bf16-mixed"],  # oneDNN bf16 kernels on AVX512-BF16/AMX CPUs
    "lightning 1 thread": ["cpu_threads=1"],
}
GPU_VARIANTS: dict[str, list[str]] = {
    **CPU_VARIANTS,
    "lightning device_resident": ["data.device_resident=true"],
    "lightning all on": ["data.device_resident=true", "runtime.compile=true", "trainer.precision=bf16-mixed"],
}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- the plain loop, written the seed projects' way ----------------------------------------------------


def torchvision_fashion_mnist(tmp: Path, image_size: int, channels: int) -> torch.utils.data.Dataset:
    """torchvision's FashionMNIST over the same IDX files (unpacked into its raw layout), per-item transforms."""
    from torchvision import datasets, transforms

    raw = tmp / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):  # torchvision checks that all four files are there
        for path in locate_fashion_mnist("data", split):
            target = raw / path.name.removesuffix(".gz")
            target.write_bytes(gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes())
    steps: list[Callable] = []
    if image_size != 28:
        steps.append(transforms.Resize(image_size))
    if channels == 3:
        steps.append(transforms.Grayscale(num_output_channels=3))
    steps += [transforms.ToTensor(), transforms.Normalize([0.5] * channels, [0.5] * channels)]
    return datasets.FashionMNIST(str(tmp), train=True, download=False, transform=transforms.Compose(steps))


def seed_loader(dataset: torch.utils.data.Dataset, batch_size: int, workers: int, device: torch.device
                ) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True, num_workers=workers,
                      pin_memory=device.type == "cuda", persistent_workers=workers > 0)


def plain_rate(cfg: argparse.Namespace, dataset: torch.utils.data.Dataset, device: torch.device) -> float:
    """Generator iterations/s of the seed projects' loop."""
    torch.manual_seed(0)
    netG = Generator(cfg.latent_dim, cfg.channels, cfg.image_size, cfg.features).to(device)
    netD = Critic(cfg.channels, cfg.image_size, cfg.features, True).to(device)
    optD = torch.optim.RMSprop(netD.parameters(), lr=5e-5)
    optG = torch.optim.RMSprop(netG.parameters(), lr=5e-5)
    loader = seed_loader(dataset, cfg.batch_size, cfg.workers, device)
    data_iter, gen_iterations, c = iter(loader), 0, 0.01
    stamps: list[float] = []
    while gen_iterations < cfg.warmup + cfg.iters:
        if gen_iterations >= cfg.warmup:
            sync(device)
            stamps.append(time.perf_counter())
        for p in netD.parameters():
            p.requires_grad = True
        for _ in range(cfg.n_critic):
            try:
                real, _ = next(data_iter)
            except StopIteration:
                data_iter = iter(loader)
                real, _ = next(data_iter)
            real = real.to(device, non_blocking=True)
            netD.zero_grad()
            with torch.no_grad():
                fake = netG(torch.randn(cfg.batch_size, cfg.latent_dim, device=device))
            errD = critic_loss(netD(real), netD(fake))
            errD.backward()
            optD.step()
            for p in netD.parameters():
                p.data.clamp_(-c, c)
        for p in netD.parameters():
            p.requires_grad = False
        netG.zero_grad()
        errG = generator_loss(netD(netG(torch.randn(cfg.batch_size, cfg.latent_dim, device=device))))
        errG.backward()
        optG.step()
        gen_iterations += 1
    sync(device)
    stamps.append(time.perf_counter())
    return rate_from(stamps)


def rate_from(stamps: list[float]) -> float:
    """Iterations/s from the median iteration time: robust to bursts of load from other processes."""
    return 1.0 / statistics.median(b - a for a, b in itertools.pairwise(stamps))


# ---- the project's training through Lightning ------------------------------------------------------------


class PerItemDataModule(L.LightningDataModule):
    """The 'in-memory uint8 batches' switch turned off: the seed projects' loader inside Lightning."""

    def __init__(self, dataset: torch.utils.data.Dataset, batch_size: int, workers: int, channels: int,
                 device: torch.device) -> None:
        super().__init__()
        self.dataset, self.batch_size, self.workers, self.channels = dataset, batch_size, workers, channels
        self.run_device = device  # pin_memory as in the plain loop

    def train_dataloader(self) -> DataLoader:
        return seed_loader(self.dataset, self.batch_size, self.workers, self.run_device)

    def on_after_batch_transfer(self, batch: object, dataloader_idx: int) -> torch.Tensor:
        return batch[0]  # (images in [-1, 1], labels) -> images


class RGBFashionMNIST(FashionMNISTDataModule):
    """Fashion-MNIST with the gray channel copied three times: an RGB workload without another dataset."""

    channels = 3

    def setup(self, stage: str | None = None) -> None:
        super().setup(stage)
        if self.images.shape[1] == 1:
            self.images = self.images.expand(-1, 3, -1, -1).contiguous()


def compose_config(cfg: argparse.Namespace, overrides: list[str]) -> tuple[object, bool]:
    ours = [o for o in overrides if not o.startswith("+bench.")]
    accelerator = "gpu" if cfg.device.type == "cuda" else "cpu"
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        raw = compose(config_name="train", overrides=[
            f"trainer.accelerator={accelerator}", "trainer.devices=1", "trainer.enable_progress_bar=false",
            "trainer.max_epochs=-1", "logger.sample_every_n_gen_steps=0", f"data.batch_size={cfg.batch_size}",
            f"data.image_size={cfg.image_size}", f"data.num_workers={cfg.workers}",
            f"model.n_critic={cfg.n_critic}", f"model.latent_dim={cfg.latent_dim}",
            f"model.g_features={cfg.features}", f"model.d_features={cfg.features}", *ours,
        ])
    return validate(raw), "+bench.per_item_loader=true" in overrides


def lightning_rate(cfg: argparse.Namespace, overrides: list[str], dataset: torch.utils.data.Dataset,
                   log_dir: Path) -> float:
    """Generator iterations/s of the project's training with ``overrides``."""
    tc, per_item = compose_config(cfg, overrides)
    L.seed_everything(0, verbose=False)
    if per_item:
        datamodule: L.LightningDataModule = PerItemDataModule(dataset, cfg.batch_size, cfg.workers, cfg.channels,
                                                              cfg.device)
    elif cfg.channels == 3:
        datamodule = RGBFashionMNIST(tc.data)
    else:
        datamodule = build_datamodule(tc.data)
    model = WGAN(image_size=tc.data.image_size, channels=datamodule.channels,
                 log_every_n_gen_steps=tc.logger.log_every_n_gen_steps, **dataclasses.asdict(tc.runtime),
                 **dataclasses.asdict(tc.model))
    timer = fast_path.GenIterStamps(cfg.warmup, cfg.iters)
    trainer = L.Trainer(
        **{**tc.trainer, "enable_checkpointing": False, "enable_model_summary": False},
        logger=TensorBoardLogger(save_dir=log_dir, name="tb", version="", default_hp_metric=False),
        callbacks=[timer], default_root_dir=log_dir,
    )
    threads = torch.get_num_threads()
    if tc.cpu_threads > 0:  # as wgan_lit.train sets it; restored for the next variant
        torch.set_num_threads(tc.cpu_threads)
    try:
        trainer.fit(model, datamodule=datamodule)
    finally:
        torch.set_num_threads(threads)
    return rate_from(timer.stamps)


def probe_choice(cfg: argparse.Namespace, tmp: Path) -> tuple[str, list[str]]:
    """What ``fast_path.probe=true`` picks for this workload here (a fresh cache), as a named variant."""
    probe = ["fast_path.probe=true", f"fast_path.cache={tmp / 'fast_path.json'}"]
    if cfg.quick:
        probe += ["fast_path.iters=2", "fast_path.rounds=1", "fast_path.compile=false"]
    tc, _ = compose_config(cfg, probe)
    chosen = fast_path.resolve(tc, cfg.channels)
    precision, threads, rt = chosen.trainer["precision"], chosen.cpu_threads, chosen.runtime
    label = (f"{precision}, {threads or 'all'} thread{'s' * (threads != 1)}, "
             f"{'channels_last' if rt.channels_last else 'NCHW'}{', compile' * rt.compile}")
    return f"lightning fast_path choice ({label})", [
        f"trainer.precision={precision}", f"cpu_threads={threads}",
        f"runtime.channels_last={str(rt.channels_last).lower()}", f"runtime.compile={str(rt.compile).lower()}"]


# ---- FLOPs and the matmul peak --------------------------------------------------------------------------


def flops_per_gen_iter(cfg: argparse.Namespace, device: torch.device) -> int:
    """Matmul/conv FLOPs (forward and backward) of n_critic critic steps + one generator step."""
    netG = Generator(cfg.latent_dim, cfg.channels, cfg.image_size, cfg.features).to(device)
    netD = Critic(cfg.channels, cfg.image_size, cfg.features, True).to(device)
    real = torch.zeros(cfg.batch_size, cfg.channels, cfg.image_size, cfg.image_size, device=device)
    z = torch.randn(cfg.batch_size, cfg.latent_dim, device=device)
    with FlopCounterMode(display=False) as counter:
        for _ in range(cfg.n_critic):
            with torch.no_grad():
                fake = netG(z)
            critic_loss(netD(real), netD(fake)).backward()
        for p in netD.parameters():
            p.requires_grad_(False)
        generator_loss(netD(netG(z))).backward()
    return counter.get_total_flops()


def matmul_peak(device: torch.device, quick: bool) -> float:
    """Best float32 FLOP/s of a square matmul on ``device`` (best of many short runs: robust to load)."""
    n = 1024 if device.type == "cpu" else 8192
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    best = float("inf")
    for _ in range(3 if quick else 20):
        sync(device)
        t = time.perf_counter()
        torch.matmul(a, b)
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


# ---- main -----------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="one timed iteration per variant, one round (smoke test)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--warmup", type=int, default=3, help="untimed generator iterations per variant and round")
    p.add_argument("--iters", type=int, default=10, help="timed generator iterations per variant and round")
    p.add_argument("--repeats", type=int, default=3, help="rounds over all variants; the median is reported")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--n-critic", type=int, default=5)
    p.add_argument("--image-size", type=int, default=28)
    p.add_argument("--channels", type=int, default=1, choices=(1, 3))
    p.add_argument("--features", type=int, default=64, help="g_features = d_features")
    p.add_argument("--latent-dim", type=int, default=100)
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers on both sides")
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    p.add_argument("--variants", nargs="*", help="names of Lightning variants to run (default: all)")
    p.add_argument("--probe", action="store_true",
                   help="first run fast_path's probe, then time its choice next to the fixed settings")
    args = p.parse_args(argv)
    if args.quick:
        args.warmup, args.iters, args.repeats = 1, 1, 1  # the fewest that give a rate (two time stamps)
    args.device = torch.device(args.device)
    return args


def main(argv: list[str] | None = None) -> None:
    cfg = parse_args(argv)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # no per-fit banners
    warnings.filterwarnings("ignore")
    register_configs()
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    variants = GPU_VARIANTS if cfg.device.type == "cuda" else CPU_VARIANTS
    if cfg.variants:
        unknown = set(cfg.variants) - set(variants)
        if unknown:
            sys.exit(f"unknown variant(s) {sorted(unknown)}; choose from {list(variants)}")
        variants = {k: v for k, v in variants.items() if k in cfg.variants}
    name = torch.cuda.get_device_name(cfg.device) if cfg.device.type == "cuda" else "cpu"
    print(f"device: {name}  torch {torch.__version__}  lightning {L.__version__}  threads "
          f"{torch.get_num_threads()}")
    print(f"workload: batch {cfg.batch_size}, n_critic {cfg.n_critic}, {cfg.channels}x{cfg.image_size}x"
          f"{cfg.image_size}, features {cfg.features}, latent {cfg.latent_dim}; warmup {cfg.warmup}, "
          f"timed {cfg.iters} generator iterations")
    flops = flops_per_gen_iter(cfg, cfg.device)

    tmp = Path(tempfile.mkdtemp(prefix="wgan_bench_"))
    try:
        dataset = torchvision_fashion_mnist(tmp / "tv", cfg.image_size, cfg.channels)
        if cfg.probe:
            name, overrides = probe_choice(cfg, tmp)
            print(f"probe: {name.removeprefix('lightning ')}", flush=True)
            variants = {name: overrides, **variants}
        # Rounds interleave the variants, so load from other processes hits all of them alike. Each round
        # gives a rate from the median iteration time; the median over rounds is reported.
        rates: dict[str, list[float]] = {"plain": [], **{v: [] for v in variants}}
        peaks: list[float] = []
        for round_ in range(cfg.repeats):
            peaks.append(matmul_peak(cfg.device, cfg.quick))
            rates["plain"].append(plain_rate(cfg, dataset, cfg.device))
            for variant, overrides in variants.items():
                rates[variant].append(lightning_rate(cfg, overrides, dataset, tmp / "logs"))
            print(f"round {round_}: " + "  ".join(f"{k} {v[-1]:.3f}" for k, v in rates.items()), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    peak = max(peaks)
    print(f"flops_per_gen_iter: {flops / 1e9:.3f} GFLOP  matmul_peak: {peak / 1e9:.1f} GFLOP/s")
    for name, values in rates.items():
        rate = statistics.median(values)
        # Ratio within each round, then the median: a round-long change in load cancels out.
        ratio = statistics.median(v / p for v, p in zip(values, rates["plain"], strict=True))
        print(f"rate[{name}]: {rate:.3f} gen_iter/s  ratio_vs_plain: {ratio:.2f}  "
              f"flop_efficiency: {100 * flops * rate / peak:.1f}%  rounds: {' '.join(f'{v:.3f}' for v in values)}")


if __name__ == "__main__":
    main()
