"""Export a run's generator, for use without wgan_lit: ``python -m wgan_lit.export checkpoint=PATH output=FILE``.
The suffix picks the format: ``.pt2`` (torch.export; ``torch.export.load(FILE).module()(z)``) or ``.onnx`` (for
onnxruntime: pip install "wgan_lit[export]"). Input ``z``: latent codes (B, latent_dim) float32, any batch size B;
output ``images``: (B, C, H, W) float32 in [-1, 1], from the generator the samples come from (the averaged one)."""

from __future__ import annotations

import copy
import importlib
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import MISSING

from wgan_lit import cli
from wgan_lit.checkpointing import CheckpointError, atomic_write
from wgan_lit.generate import load_generator
from wgan_lit.module import WGAN

ONNX_LIBRARIES = ("onnx", "onnxscript", "onnxruntime")  # the "export" extra: the exporter's and the file's runtime


@dataclass
class ExportConfig:  # the keys of python -m wgan_lit.export
    checkpoint: str = MISSING  # a .ckpt file of a run, e.g. RUN/checkpoints/last.ckpt
    output: str = MISSING  # generator.pt2 (torch.export) or generator.onnx (onnxruntime); its folder is created


class Sampler(torch.nn.Module):
    """What ``WGAN.sample`` runs: the averaged generator when there is one (BatchNorm refreshed), eval, clamped."""

    def __init__(self, model: WGAN) -> None:
        super().__init__()
        net = model.generator_ema.module if model.refresh_ema_batchnorm() else model.generator
        self.net = copy.deepcopy(net).to(memory_format=torch.contiguous_format).requires_grad_(False)  # NCHW: plain

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z).float().clamp(-1, 1)


def export(checkpoint: str | Path, output: str | Path) -> Path:
    """Write the checkpoint's sampling generator to ``output`` (format from its suffix), on the CPU: all or nothing."""
    model, out = load_generator(checkpoint, "cpu"), Path(output)
    sampler, z, batch = Sampler(model).eval(), model.latents(2, 0), {"z": {0: torch.export.Dim("batch", min=1)}}
    pt2 = out.suffix.lower() == ".pt2"
    program = (torch.export.export(sampler, (z,), dynamic_shapes=batch) if pt2 else torch.onnx.export(
        sampler, (z,), dynamo=True, dynamic_shapes=batch, input_names=["z"], output_names=["images"], verbose=False))
    with atomic_write(out) as tmp:
        if pt2:
            with open(tmp, "wb") as f:
                torch.export.save(program, f)
        else:  # the weights inside the file: no .data file beside it
            program.save(str(tmp), external_data=False)
    return out


def check(cfg: ExportConfig) -> list[str]:
    suffix = Path(cfg.output).suffix.lower()
    for name in ONNX_LIBRARIES if suffix == ".onnx" else ():
        try:
            importlib.import_module(name)
        except ImportError:
            return [f"output={cfg.output!r}: an .onnx export needs the {name} library, which cannot be imported: "
                    'pip install "wgan_lit[export]"']
    return cli.problems([("output", cfg.output, suffix in (".pt2", ".onnx"),
                          "a .pt2 (torch.export) or .onnx (onnxruntime) file")])


def main(argv: list[str] | None = None) -> int:
    cfg = cli.parse(ExportConfig, sys.argv[1:] if argv is None else argv, prog="wgan_lit.export", doc=__doc__,
                    check=check, path_key=("checkpoint", "a checkpoint"))
    try:
        print(f"Wrote {export(cfg.checkpoint, cfg.output)}")
    except CheckpointError as err:  # missing, unreadable or not this version's: names the file
        cli.fail(str(err))
    except OSError as err:  # the output's folder cannot be made or written
        cli.fail(f"output={cfg.output!r}: cannot be written ({type(err).__name__}: {err})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
