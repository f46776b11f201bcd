"""Images/s of the cached image pipeline against decoding every JPEG per item, measured in the same run.

    python benchmarks/data_pipeline.py                     # 2000 generated 178x218 JPEGs (CelebA's size)
    python benchmarks/data_pipeline.py --root data/celeba/img_align_celeba --limit 20000

Cached: ``ImageFolderDataModule`` (decoded once into a uint8 memmap; the one-time build is timed apart), then
its train dataloader plus the uint8 -> [-1, 1] step. Per item: a Dataset that opens, decodes and transforms
each JPEG in ``__getitem__`` with torchvision's Resize + CenterCrop + ToTensor + Normalize (the usual DCGAN
CelebA pipeline, the same pixels as the cache's crop + resize), in a DataLoader with one worker per core.
With CUDA, it also times one WGAN critic step at the same batch size, to show whether the GPU would wait.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from wgan_lit.config import DataConfig  # noqa: E402
from wgan_lit.data import (
    ImageFolderDataModule,  # noqa: E402
    to_unit_range,  # noqa: E402
)
from wgan_lit.images import find_images  # noqa: E402


def make_jpegs(folder: Path, n: int, width: int = 178, height: int = 218) -> None:
    """Face-sized JPEGs with smooth structure and noise, so they compress (and decode) like photos."""
    folder.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[:height, :width] / max(width, height)
    for i in range(n):
        rng = np.random.default_rng(i)
        colour = rng.uniform(40, 215, size=3)
        img = colour + 60 * np.stack([np.sin(6 * yy + i), np.cos(5 * xx), yy * xx], -1)
        img += rng.normal(0, 10, size=(height, width, 3))
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(folder / f"{i:06d}.jpg", quality=90)


class PerItemJPEGs(Dataset):
    """The baseline: decode and transform one file per ``__getitem__``, every epoch."""

    def __init__(self, files: list[Path], image_size: int) -> None:
        self.files = files
        self.transform = transforms.Compose([
            transforms.Resize(image_size), transforms.CenterCrop(image_size), transforms.ToTensor(),
            transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
        ])

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        with Image.open(self.files[i]) as img:
            return self.transform(img.convert("RGB"))


def images_per_second(loader: DataLoader, to_float: Callable | None = None, epochs: int = 1) -> float:
    n, start = 0, time.perf_counter()
    for _ in range(epochs):
        for batch in loader:
            x = to_float(batch) if to_float else batch
            n += x.shape[0]
    return n / (time.perf_counter() - start)


def critic_step_ms(image_size: int, batch_size: int, device: str, steps: int = 50) -> float:
    """One WGAN critic step (generator forward, two critic passes, backward, RMSprop, clamp), in ms."""
    from wgan_lit.module import WGAN

    model = WGAN(image_size=image_size, channels=3, latent_dim=128).to(device)
    opt = torch.optim.RMSprop(model.critic.parameters(), lr=5e-5)
    real = torch.rand(batch_size, 3, image_size, image_size, device=device) * 2 - 1
    for i in range(steps + 10):
        if i == 10:
            torch.cuda.synchronize()
            start = time.perf_counter()
        with torch.no_grad():
            fake = model.generator(torch.randn(batch_size, 128, device=device))
        loss = model.critic(fake).mean() - model.critic(real).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        for p in model.critic.parameters():
            p.data.clamp_(-0.01, 0.01)
    torch.cuda.synchronize()
    return 1000 * (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, help="a folder of images (default: generate --n JPEGs)")
    parser.add_argument("--n", type=int, default=2000, help="how many JPEGs to generate")
    parser.add_argument("--limit", type=int, default=0, help="with --root: use only the first LIMIT files")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)),
                        help="DataLoader workers of the per-item pipeline (default: one per core)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs over the cache (the per-item path: 1)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads of the main process (as each per-item worker has 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        root = args.root
        if root is None:
            root = Path(tmp) / "jpegs"
            t = time.perf_counter()
            make_jpegs(root, args.n)
            print(f"generated {args.n} JPEGs of 178x218 in {time.perf_counter() - t:.1f} s")
        files = find_images(root)
        if args.limit:
            files = files[: args.limit]
            root = Path(tmp) / "subset"
            root.mkdir()
            for f in files:
                (root / f.name).symlink_to(f.resolve())
            files = find_images(root)
        size, batch = args.image_size, args.batch_size
        print(f"{len(files)} images -> {size}x{size}, batch {batch}, {os.cpu_count()} CPUs (load average "
              f"{os.getloadavg()[0]:.1f}), torch {torch.__version__}, {torch.get_num_threads()} thread(s)")

        dm = ImageFolderDataModule(DataConfig(name="folder", root=str(root), batch_size=batch, image_size=size,
                                              cache_dir=str(Path(tmp) / "cache")))
        t = time.perf_counter()
        dm.prepare_data()
        build = time.perf_counter() - t
        dm.setup("fit")
        print(f"one-time cache build: {build:.1f} s ({len(files) / build:.0f} images/s, "
              f"{len(os.sched_getaffinity(0))} processes), {dm.cache_file.stat().st_size / 2**20:.0f} MiB")

        per_item = DataLoader(PerItemJPEGs(files, size), batch_size=batch, shuffle=True, drop_last=True,
                              num_workers=args.workers, persistent_workers=False)
        per_item_rate = images_per_second(per_item)
        images_per_second(dm.train_dataloader(), to_unit_range, 1)  # page the cache in, as any later epoch
        cached_rate = images_per_second(dm.train_dataloader(), to_unit_range, args.epochs)
        uint8_rate = images_per_second(dm.train_dataloader(), None, args.epochs)
        print(f"per item (decode + Resize + CenterCrop + ToTensor + Normalize, {args.workers} workers): "
              f"{per_item_rate:9.0f} images/s = {1000 * batch / per_item_rate:7.2f} ms per batch")
        print(f"cached   (memmap uint8, one index op per batch, -> [-1, 1], no workers):  "
              f"{cached_rate:9.0f} images/s = {1000 * batch / cached_rate:7.2f} ms per batch")
        print(f"cached, uint8 batches only (the CPU side of training; [-1, 1] is done on the GPU): "
              f"{uint8_rate:9.0f} images/s = {1000 * batch / uint8_rate:7.2f} ms per batch")
        print(f"speed-up, both ending in float [-1, 1]: {cached_rate / per_item_rate:.1f}x")
        if torch.cuda.is_available():
            ms = critic_step_ms(size, batch, "cuda")
            print(f"GPU ({torch.cuda.get_device_name()}): one WGAN critic step at batch {batch}: {ms:.2f} ms;"
                  f" the cached loader needs {1000 * batch / cached_rate:.2f} ms per batch")


if __name__ == "__main__":
    main()
