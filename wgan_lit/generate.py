"""Sample a trained generator: ``python -m wgan_lit.generate [checkpoint=]RUN/checkpoints/last.ckpt [key=value ...]``
(--help: the keys), e.g. ``n=50000 output=samples.npz seed=1`` or ``interpolate=[3,7] steps=10 output=walk.gif``."""

from __future__ import annotations

import math
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from omegaconf import MISSING
from torchvision.transforms.functional import to_pil_image
from torchvision.utils import save_image

from wgan_lit import cli
from wgan_lit.checkpointing import CheckpointError, atomic_write, read_checkpoint
from wgan_lit.module import WGAN, model_hparams


@dataclass
class GenerateConfig:  # the keys of python -m wgan_lit.generate: the one home of their defaults
    checkpoint: str = MISSING  # a .ckpt file of a run, e.g. RUN/checkpoints/last.ckpt
    n: int = 64  # number of samples
    output: str = "samples.png"  # .png grid (row); .pt / .npz N x C x H x W float32 in [-1, 1]; .gif (interpolate)
    seed: int = 0  # seed of the latent codes (drawn on the CPU: the same codes on any device)
    batch_size: int = 500  # images generated at a time: memory does not grow with n
    device: str = "auto"  # auto (cuda when one is visible, else cpu), cpu or cuda
    nrow: int = 0  # images per row of a .png grid; 0 = sqrt(n), or one row for an interpolation
    interpolate: list[int] = field(default_factory=list)  # [] = sample; [A,B] = walk from seed A's code to B's
    steps: int = 10  # images along an interpolation, both ends included
    fps: float = 8.0  # frames per second of an interpolation's .gif


def device_problem(device: str) -> str | None:
    """Why ``device=...`` cannot be used here, or None."""
    return next(iter(cli.problems([
        ("device", device, device in ("auto", "cpu", "cuda"), "one of auto, cpu, cuda"),
        ("device", device, device != "cuda" or torch.cuda.is_available(),
         "device=cpu (or device=auto): no CUDA device is visible (torch.cuda.is_available() is False)")])), None)


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
    return model.to(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device).eval()


def slerp(a: torch.Tensor, b: torch.Tensor, steps: int) -> torch.Tensor:
    """``steps`` codes on the great circle from ``a`` to ``b`` (Gaussian codes keep their typical norm)."""
    t, w = torch.linspace(0, 1, steps).unsqueeze(1), torch.arccos(torch.dot(a / a.norm(), b / b.norm()).clamp(-1, 1))
    if w.abs() < 1e-6:  # (nearly) parallel: a straight line is the same path
        return (1 - t) * a + t * b
    return (torch.sin((1 - t) * w) * a + torch.sin(t * w) * b) / torch.sin(w)


def run(cfg: GenerateConfig) -> Path:
    """The samples (or the interpolation) ``cfg`` asks for, to ``cfg.output`` in its suffix's format: all or nothing."""
    if bad := check(cfg):
        raise ValueError("\n".join(bad))
    model, out, suffix = load_generator(cfg.checkpoint, cfg.device), Path(cfg.output), Path(cfg.output).suffix.lower()
    z = (slerp(*(model.latents(1, seed)[0] for seed in cfg.interpolate), cfg.steps) if cfg.interpolate
         else model.latents(cfg.n, cfg.seed))
    parts, shape = model.sample(z, cfg.batch_size), (len(z), model.hparams.channels, *[model.hparams.image_size] * 2)
    with atomic_write(out) as tmp, open(tmp, "wb") as f:
        if suffix == ".png":
            save_image(torch.cat([p.cpu() for p in parts]), f, format="png", normalize=True, value_range=(-1, 1),
                       padding=2, nrow=cfg.nrow or (len(z) if cfg.interpolate else max(1, math.isqrt(len(z)))))
        elif suffix == ".gif":  # enlarged (nearest) to at least 128 pixels, played forward then back: no jump
            s = max(1, math.ceil(128 / max(shape[-2:])))
            pixels = torch.cat([p.cpu() for p in parts]).add(1).mul(127.5).round().clamp(0, 255).byte()
            frames = [to_pil_image(im) for im in pixels.repeat_interleave(s, -1).repeat_interleave(s, -2)]
            frames[0].save(f, format="GIF", save_all=True, append_images=[*frames[1:], *frames[-2:0:-1]],
                           duration=round(1000 / cfg.fps), loop=0)
        else:  # a file-backed buffer: its pages are the OS's page cache, not process memory
            with tempfile.NamedTemporaryFile(dir=out.parent, prefix=f"{out.name}.buffer-") as buf:
                samples = torch.from_file(buf.name, shared=True, size=math.prod(shape), dtype=torch.float32).view(shape)
                for i, part in enumerate(parts):  # every batch but the last has batch_size images
                    samples[i * cfg.batch_size:(i + 1) * cfg.batch_size] = part
                torch.save(samples, f) if suffix == ".pt" else np.savez(f, samples=samples.numpy())
    return out


def generate(checkpoint: str | Path, n: int, output: str | Path, seed: int = GenerateConfig.seed,
             batch_size: int = GenerateConfig.batch_size, device: str = GenerateConfig.device,
             nrow: int | None = GenerateConfig.nrow) -> Path:
    """Write ``n`` samples of the checkpoint's generator to ``output`` (format from its suffix)."""
    return run(GenerateConfig(str(checkpoint), n, str(output), seed, batch_size, device, nrow or 0))


def interpolate(checkpoint: str | Path, seed_a: int, seed_b: int, output: str | Path,
                steps: int = GenerateConfig.steps, device: str = GenerateConfig.device,
                fps: float = GenerateConfig.fps) -> Path:
    """Images along the latent path from ``seed_a``'s code to ``seed_b``'s: a row, a GIF or a tensor."""
    return run(GenerateConfig(str(checkpoint), output=str(output), device=device, interpolate=[seed_a, seed_b],
                              steps=steps, fps=fps))


def check(cfg: GenerateConfig) -> list[str]:
    formats = (".png", ".gif", ".pt", ".npz") if cfg.interpolate else (".png", ".pt", ".npz")
    return cli.problems([
        ("n", cfg.n, cfg.n >= 1, "an integer >= 1"),
        ("batch_size", cfg.batch_size, cfg.batch_size >= 1, "an integer >= 1"),
        ("nrow", cfg.nrow, cfg.nrow >= 0, "0 (sqrt(n) per row) or an integer >= 1"),
        ("interpolate", cfg.interpolate, len(cfg.interpolate) in (0, 2), "[] (sample) or two seeds [A,B], e.g. [3,7]"),
        ("steps", cfg.steps, cfg.steps >= 2, "an integer >= 2 (the path includes both ends)"),
        ("fps", cfg.fps, cfg.fps > 0, "a number > 0"),
        ("output", cfg.output, Path(cfg.output).suffix.lower() in formats, f"a {', '.join(formats[:-1])} or .npz file"
         + ("" if cfg.interpolate else " for samples (.gif is for interpolate=[A,B])")),
    ]) + [p for p in [device_problem(cfg.device)] if p]


def main(argv: list[str] | None = None) -> int:
    cfg = cli.parse(GenerateConfig, sys.argv[1:] if argv is None else argv, prog="wgan_lit.generate",
                    doc=__doc__, path_key=("checkpoint", "a checkpoint"))  # run(cfg) checks the values
    try:
        print(f"Wrote {run(cfg)}")
    except (CheckpointError, ValueError, OSError) as err:  # OSError: the output's folder cannot be made or written
        cli.fail(f"output={cfg.output!r}: cannot be written ({type(err).__name__}: {err})"
                 if isinstance(err, OSError) else str(err))
    return 0


if __name__ == "__main__":
    sys.exit(main())
