"""Sample a trained generator: ``python -m wgan_lit.generate [checkpoint=]PATH [key=value ...]``.

Examples::

    python -m wgan_lit.generate checkpoint=RUN/checkpoints/last.ckpt n=64 output=grid.png
    python -m wgan_lit.generate checkpoint=RUN/checkpoints/last.ckpt n=50000 output=samples.npz seed=1
    python -m wgan_lit.generate checkpoint=RUN/checkpoints/last.ckpt interpolate=[3,7] steps=10 output=walk.gif

The output's suffix picks the format: ``.png`` a grid (or one row for an interpolation), ``.gif`` an
animation of an interpolation, ``.pt`` / ``.npz`` the raw values in [-1, 1] as one N x C x H x W float32
tensor / array named ``samples``. Samples are made ``batch_size`` at a time and ``.pt``/``.npz`` are written
batch by batch, so N = 50,000 needs memory for one batch. The latent codes come from ``seed`` on the CPU, so
the same seed gives the same codes whatever the device or batch size. A checkpoint trained on a GPU loads on
a CPU (``device=cpu``, or ``auto`` when no GPU is present). ``interpolate=[A,B]`` walks the great circle from
seed A's code to seed B's in ``steps`` images instead of sampling (``n``, ``seed``, ``batch_size`` and
``nrow`` are then unused); ``fps`` is the speed of its ``.gif``. ``nrow`` is the images per row of a grid.
"""

from __future__ import annotations

import io
import math
import os
import sys
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from omegaconf import MISSING
from PIL import Image
from torchvision.utils import save_image

from wgan_lit import cli
from wgan_lit.checkpointing import CheckpointError, atomic_torch_save, atomic_write, read_checkpoint
from wgan_lit.module import WGAN, model_hparams

FORMATS = (".png", ".gif", ".pt", ".npz")
DEVICES = ("auto", "cpu", "cuda")


@dataclass
class GenerateConfig:
    """The keys of ``python -m wgan_lit.generate``: the one home of their defaults."""

    checkpoint: str = MISSING  # a .ckpt file of a run, e.g. RUN/checkpoints/last.ckpt
    n: int = 64  # number of samples
    output: str = "samples.png"  # .png grid; .pt / .npz raw N x C x H x W in [-1, 1]; .gif with interpolate
    seed: int = 0  # seed of the latent codes (drawn on the CPU: the same codes on any device)
    batch_size: int = 500  # images generated at a time: memory does not grow with n
    device: str = "auto"  # auto (cuda when one is visible, else cpu), cpu or cuda
    nrow: int = 0  # images per row of a .png grid; 0 = sqrt(n)
    interpolate: list[int] = field(default_factory=list)  # [] = sample; [A,B] = walk from seed A's code to B's
    steps: int = 10  # images along an interpolation, both ends included
    fps: float = 8.0  # frames per second of an interpolation's .gif


def device_problem(device: str) -> str | None:
    """Why ``device=...`` cannot be used here, or None."""
    if device not in DEVICES:
        return f"device={device!r}: expected one of {', '.join(DEVICES)}"
    if device == "cuda" and not torch.cuda.is_available():
        return ("device='cuda': no CUDA device is visible (torch.cuda.is_available() is False); "
                "use device=cpu (or device=auto)")
    return None


def output_problem(output: str | Path, interpolating: bool = False) -> str | None:
    """Why ``output=...`` is no file this command can write, or None."""
    suffix = Path(output).suffix.lower()
    if interpolating and suffix not in FORMATS:
        return f"output={str(output)!r}: expected a {', '.join(FORMATS[:-1])} or {FORMATS[-1]} file"
    if not interpolating and (suffix not in FORMATS or suffix == ".gif"):
        return (f"output={str(output)!r}: expected a .png, .pt or .npz file for samples "
                "(.gif is for interpolate=[A,B])")
    return None


def resolve_device(device: str) -> str:
    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


def load_generator(path: str | Path, device: str = GenerateConfig.device) -> WGAN:
    """The WGAN of a checkpoint on ``device`` ('auto': CUDA when available), in inference mode."""
    ckpt = read_checkpoint(path, what="checkpoint")  # loaded on the CPU: GPU checkpoints open anywhere
    try:
        model = WGAN(**model_hparams(ckpt["hyper_parameters"]))  # this machine's runtime defaults
        model.load_state_dict(ckpt["state_dict"])
    except (TypeError, RuntimeError) as err:  # hyperparameters or tensors this version's WGAN does not take
        raise CheckpointError(f"checkpoint {path}: does not fit this version's WGAN "
                              f"({type(err).__name__}: {str(err).splitlines()[0][:200]})") from err
    model.on_load_checkpoint(ckpt)  # the generator-step counter, for captions
    return model.to(resolve_device(device)).eval()


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
    with (atomic_write(out) as tmp,  # the archive is closed (complete) before it is renamed
          zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf,
          zf.open("samples.npy", "w", force_zip64=True) as f):
        f.write(_npy_header(shape))
        for part in parts:
            f.write(part.numpy().astype("<f4", copy=False).tobytes())


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


def save_gif(images: torch.Tensor, out: Path, fps: float = GenerateConfig.fps, bounce: bool = True) -> None:
    """One frame per image; ``bounce`` plays it forward then back, so the loop has no jump."""
    frames = [to_pil(im) for im in images]
    if bounce and len(frames) > 2:
        frames = frames + frames[-2:0:-1]
    frames[0].save(out, format="GIF", save_all=True, append_images=frames[1:], duration=round(1000 / fps),
                   loop=0)


def generate(checkpoint: str | Path, n: int, output: str | Path, seed: int = GenerateConfig.seed,
             batch_size: int = GenerateConfig.batch_size, device: str = GenerateConfig.device,
             nrow: int | None = GenerateConfig.nrow) -> Path:
    """Write ``n`` samples of the checkpoint's generator to ``output`` (format from its suffix)."""
    out = Path(output)
    if problem := output_problem(out):
        raise ValueError(problem)
    model = load_generator(checkpoint, device)
    z = latents(model, n, seed)
    shape = (n, model.hparams.channels, model.hparams.image_size, model.hparams.image_size)
    out.parent.mkdir(parents=True, exist_ok=True)
    parts = batches(model, z, batch_size)
    suffix = out.suffix.lower()
    if suffix == ".npz":
        write_npz(parts, shape, out)
    elif suffix == ".pt":
        write_pt(parts, shape, out)
    else:
        save_grid(torch.cat(list(parts)), out, nrow)
    return out


def interpolate(checkpoint: str | Path, seed_a: int, seed_b: int, output: str | Path,
                steps: int = GenerateConfig.steps, device: str = GenerateConfig.device,
                fps: float = GenerateConfig.fps) -> Path:
    """Images along the latent path from ``seed_a``'s code to ``seed_b``'s: a row, a GIF or a tensor."""
    out = Path(output)
    if problem := output_problem(out, interpolating=True):
        raise ValueError(problem)
    model = load_generator(checkpoint, device)
    z = slerp(latents(model, 1, seed_a)[0], latents(model, 1, seed_b)[0], steps)
    images = torch.cat(list(batches(model, z, steps)))
    out.parent.mkdir(parents=True, exist_ok=True)
    suffix = out.suffix.lower()
    if suffix == ".gif":
        save_gif(images, out, fps)
    elif suffix == ".png":
        save_grid(images, out, nrow=steps)
    else:
        (write_npz if suffix == ".npz" else write_pt)(iter([images]), tuple(images.shape), out)
    return out


def check(cfg: GenerateConfig) -> list[str]:
    """One line per value the types allow but the command does not."""
    rules = [
        ("n", cfg.n, cfg.n >= 1, "an integer >= 1"),
        ("batch_size", cfg.batch_size, cfg.batch_size >= 1, "an integer >= 1"),
        ("nrow", cfg.nrow, cfg.nrow >= 0, "0 (sqrt(n) per row) or an integer >= 1"),
        ("interpolate", cfg.interpolate, len(cfg.interpolate) in (0, 2),
         "[] (sample) or two seeds [A,B], e.g. interpolate=[3,7]"),
        ("steps", cfg.steps, cfg.steps >= 2, "an integer >= 2 (the path includes both ends)"),
        ("fps", cfg.fps, cfg.fps > 0, "a number > 0"),
    ]
    bad = [f"{key}={value!r}: expected {expected}" for key, value, ok, expected in rules if not ok]
    problems = (device_problem(cfg.device), output_problem(cfg.output, interpolating=bool(cfg.interpolate)))
    return bad + [p for p in problems if p]


def main(argv: list[str] | None = None) -> int:
    cfg = cli.parse(GenerateConfig, sys.argv[1:] if argv is None else argv, prog="wgan_lit.generate",
                    doc=__doc__, check=check, path_key=("checkpoint", "a checkpoint"))
    try:
        if cfg.interpolate:
            seed_a, seed_b = cfg.interpolate
            out = interpolate(cfg.checkpoint, seed_a, seed_b, cfg.output, cfg.steps, cfg.device, cfg.fps)
        else:
            out = generate(cfg.checkpoint, cfg.n, cfg.output, cfg.seed, cfg.batch_size, cfg.device, cfg.nrow)
    except (CheckpointError, ValueError) as err:
        print(f"Error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # the output's folder cannot be made or written
        print(f"Error: output={cfg.output!r}: cannot be written ({type(err).__name__}: {err})", file=sys.stderr)
        return 2
    print(f"Wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
