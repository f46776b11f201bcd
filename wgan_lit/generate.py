"""Sample a trained generator: ``python -m wgan_lit.generate CHECKPOINT [options]``.

Examples::

    python -m wgan_lit.generate outputs/.../checkpoints/last.ckpt -n 64 --output grid.png
    python -m wgan_lit.generate outputs/.../checkpoints/last.ckpt -n 50000 --output samples.npz --seed 1
    python -m wgan_lit.generate outputs/.../checkpoints/last.ckpt --interpolate 3 7 --output walk.gif

``key=value`` arguments work too (``checkpoint=PATH n=64 output=grid.png``). The output's suffix picks the
format: ``.png`` a grid (or one row per interpolation), ``.gif`` an animation of an interpolation, ``.pt`` /
``.npz`` the raw values in [-1, 1] as one N x C x H x W float32 tensor / array named ``samples``. Samples
are made ``--batch-size`` at a time and ``.pt``/``.npz`` are written batch by batch, so N = 50,000 needs
memory for one batch. The latent codes come from ``--seed`` on the CPU, so the same seed gives the same
codes whatever the device or batch size. A checkpoint trained on a GPU loads on a CPU (``--device cpu``,
or ``auto`` when no GPU is present).
"""

from __future__ import annotations

import argparse
import io
import math
import os
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.utils import save_image

from wgan_lit.checkpointing import CheckpointError, atomic_torch_save, read_checkpoint
from wgan_lit.module import WGAN

FORMATS = (".png", ".gif", ".pt", ".npz")


def load_generator(path: str | Path, device: str = "auto") -> WGAN:
    """The WGAN of a checkpoint on ``device`` ('auto': CUDA when available), in inference mode."""
    ckpt = read_checkpoint(path, what="checkpoint")  # loaded on the CPU: GPU checkpoints open anywhere
    model = WGAN(**ckpt["hyper_parameters"])
    model.load_state_dict(ckpt["state_dict"])
    model.on_load_checkpoint(ckpt)  # the generator-step counter, for captions
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return model.to(device).eval()


def latents(model: WGAN, n: int, seed: int) -> torch.Tensor:
    """``n`` latent codes from ``seed``, drawn on the CPU in one go: independent of device and batching."""
    return torch.randn(n, model.hparams.latent_dim, generator=torch.Generator().manual_seed(seed))


def batches(model: WGAN, z: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    """Images in [-1, 1] for ``z``, ``batch_size`` at a time, as float32 on the CPU."""
    for start in range(0, len(z), batch_size):
        yield model.generate(z[start:start + batch_size]).float().clamp_(-1, 1).cpu()


def slerp(a: torch.Tensor, b: torch.Tensor, steps: int) -> torch.Tensor:
    """``steps`` codes on the great circle from ``a`` to ``b`` (Gaussian codes keep their typical norm)."""
    t = torch.linspace(0, 1, steps).unsqueeze(1)
    cos = torch.dot(a / a.norm(), b / b.norm()).clamp(-1, 1)
    omega = torch.arccos(cos)
    if omega.abs() < 1e-6:  # (nearly) parallel: a straight line is the same path
        return (1 - t) * a + t * b
    return (torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / torch.sin(omega)


def _npy_header(shape: tuple[int, ...]) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": np.lib.format.dtype_to_descr(np.dtype("<f4")), "fortran_order": False, "shape": shape})
    return buf.getvalue()


def write_npz(parts: Iterator[torch.Tensor], shape: tuple[int, ...], out: Path) -> None:
    """An .npz with one float32 array ``samples`` of ``shape``, written part by part (never all in memory)."""
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            with zf.open("samples.npy", "w", force_zip64=True) as f:
                f.write(_npy_header(shape))
                for part in parts:
                    f.write(part.numpy().astype("<f4", copy=False).tobytes())
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def write_pt(parts: Iterator[torch.Tensor], shape: tuple[int, ...], out: Path) -> None:
    """A .pt holding one float32 tensor of ``shape``, filled part by part through a file-backed buffer."""
    backing = out.with_name(f"{out.name}.buffer-{os.getpid()}")
    try:
        # A file-backed tensor's pages live in the page cache, which the OS writes out, not in process memory.
        flat = torch.from_file(str(backing), shared=True, size=math.prod(shape), dtype=torch.float32)
        samples = flat.view(shape)
        start = 0
        for part in parts:
            samples[start:start + len(part)] = part
            start += len(part)
        atomic_torch_save(samples, out)
    finally:
        backing.unlink(missing_ok=True)


def save_grid(images: torch.Tensor, out: Path, nrow: int | None = None) -> None:
    nrow = nrow or max(1, math.isqrt(len(images)))
    save_image(images, out, nrow=nrow, normalize=True, value_range=(-1, 1), padding=2)


def to_pil(image: torch.Tensor, min_size: int = 128) -> Image.Image:
    """One C x H x W image in [-1, 1] as a PIL image, enlarged (nearest) to at least ``min_size`` pixels."""
    arr = image.float().add(1).mul(127.5).round().clamp(0, 255).byte()
    pil = Image.fromarray(arr[0].numpy() if arr.shape[0] == 1 else arr.permute(1, 2, 0).numpy())
    scale = max(1, math.ceil(min_size / max(pil.size)))
    return pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST) if scale > 1 else pil


def save_gif(images: torch.Tensor, out: Path, fps: float = 8.0, bounce: bool = True) -> None:
    """One frame per image; ``bounce`` plays it forward then back, so the loop has no jump."""
    frames = [to_pil(im) for im in images]
    if bounce and len(frames) > 2:
        frames = frames + frames[-2:0:-1]
    frames[0].save(out, format="GIF", save_all=True, append_images=frames[1:], duration=round(1000 / fps),
                   loop=0)


def generate(checkpoint: str | Path, n: int, output: str | Path, seed: int = 0, batch_size: int = 500,
             device: str = "auto", nrow: int | None = None) -> Path:
    """Write ``n`` samples of the checkpoint's generator to ``output`` (format from its suffix)."""
    out = Path(output)
    suffix = out.suffix.lower()
    if suffix not in FORMATS or suffix == ".gif":
        raise ValueError(f"--output {out}: expected a .png, .pt or .npz file for samples "
                         "(.gif is for --interpolate)")
    model = load_generator(checkpoint, device)
    z = latents(model, n, seed)
    shape = (n, model.hparams.channels, model.hparams.image_size, model.hparams.image_size)
    out.parent.mkdir(parents=True, exist_ok=True)
    parts = batches(model, z, batch_size)
    if suffix == ".npz":
        write_npz(parts, shape, out)
    elif suffix == ".pt":
        write_pt(parts, shape, out)
    else:
        save_grid(torch.cat(list(parts)), out, nrow)
    return out


def interpolate(checkpoint: str | Path, seed_a: int, seed_b: int, output: str | Path, steps: int = 10,
                device: str = "auto", fps: float = 8.0) -> Path:
    """Images along the latent path from ``seed_a``'s code to ``seed_b``'s: a row, a GIF or a tensor."""
    out = Path(output)
    suffix = out.suffix.lower()
    if suffix not in FORMATS:
        raise ValueError(f"--output {out}: expected one of {', '.join(FORMATS)}")
    model = load_generator(checkpoint, device)
    z = slerp(latents(model, 1, seed_a)[0], latents(model, 1, seed_b)[0], steps)
    images = torch.cat(list(batches(model, z, steps)))
    out.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".gif":
        save_gif(images, out, fps)
    elif suffix == ".png":
        save_grid(images, out, nrow=steps)
    else:
        (write_npz if suffix == ".npz" else write_pt)(iter([images]), tuple(images.shape), out)
    return out


KEYS = ("checkpoint", "n", "output", "seed", "batch_size", "device", "nrow", "steps", "fps")


def _hydra_style(argv: list[str]) -> list[str]:
    """``key=value`` -> ``--key value`` for the known keys, so both spellings work."""
    converted = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if sep and not arg.startswith("-") and key in KEYS:
            converted += [f"--{key.replace('_', '-')}", value]
        else:
            converted.append(arg)
    return converted


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m wgan_lit.generate",
                                description="Sample a trained WGAN generator from a checkpoint.")
    p.add_argument("checkpoint_pos", nargs="?", metavar="CHECKPOINT", help="a .ckpt file of a training run")
    p.add_argument("--checkpoint", help="the same, as an option")
    p.add_argument("-n", "--n", type=int, default=64, help="number of samples (default 64)")
    p.add_argument("-o", "--output", default="samples.png",
                   help="samples.png (grid), .pt or .npz (raw N x C x H x W in [-1, 1]); "
                        ".gif with --interpolate")
    p.add_argument("--seed", type=int, default=0, help="seed of the latent codes (default 0)")
    p.add_argument("--batch-size", type=int, default=500, help="images generated at a time (default 500)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--nrow", type=int, default=None, help="images per row of a PNG grid (default sqrt(N))")
    p.add_argument("--interpolate", nargs=2, type=int, metavar=("SEED_A", "SEED_B"),
                   help="walk the latent space from SEED_A's code to SEED_B's instead of sampling")
    p.add_argument("--steps", type=int, default=10, help="images along the interpolation (default 10)")
    p.add_argument("--fps", type=float, default=8.0, help="frames per second of a GIF (default 8)")
    args = p.parse_args(_hydra_style(list(sys.argv[1:] if argv is None else argv)))
    args.checkpoint = args.checkpoint or args.checkpoint_pos
    if not args.checkpoint:
        p.error("a checkpoint is required: python -m wgan_lit.generate PATH/TO/last.ckpt")
    for name in ("n", "batch_size", "steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}={getattr(args, name)}: expected an integer >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible; use --device cpu or auto")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.interpolate:
            out = interpolate(args.checkpoint, *args.interpolate, args.output, args.steps, args.device,
                              args.fps)
        else:
            out = generate(args.checkpoint, args.n, args.output, args.seed, args.batch_size, args.device,
                           args.nrow)
    except (CheckpointError, ValueError) as err:
        print(f"Error: {err}", file=sys.stderr)
        return 2
    print(f"Wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
