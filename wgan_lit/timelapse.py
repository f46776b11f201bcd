"""A run's fixed-noise grids (samples/gen_XXXXXX.png) stamped with their generator steps, as one GIF: RUN/timelapse.gif
and TensorBoard tag timelapse; made at the end of every run (logger.timelapse) or by python -m wgan_lit.timelapse."""

import io
import sys
from dataclasses import dataclass
from pathlib import Path

from omegaconf import MISSING
from PIL import Image, ImageDraw, ImageOps

from wgan_lit import cli
from wgan_lit.checkpointing import atomic_write


@dataclass
class TimelapseConfig:  # the keys of python -m wgan_lit.timelapse: the one home of their defaults
    run_dir: str = MISSING  # a training run's directory (holds samples/gen_*.png)
    output: str = ""  # where to write the GIF; "" = RUN_DIR/timelapse.gif
    fps: float = 8.0  # frames per second
    tensorboard: bool = True  # also add the GIF to the run's TensorBoard log (tag timelapse), if it has one


def find_frames(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(generator step, path) of every sample grid of the run, in step order."""
    return sorted((int(p.stem[4:]), p) for p in (Path(run_dir) / "samples").glob("gen_*.png") if p.stem[4:].isdecimal())


def build_gif(run_dir: str | Path, fps: float = TimelapseConfig.fps, max_frames: int = 300) -> tuple[bytes, int]:
    """The timelapse as GIF bytes and its number of frames: at most ``max_frames``, evenly spread, first and last."""
    if not (frames := find_frames(run_dir)):  # ValueError: the run directory given is not one with grids
        raise ValueError(f"{Path(run_dir) / 'samples'}: no sample grids (made by logger.sample_every_n_gen_steps > 0)")
    if len(frames) > max_frames:
        frames = [frames[round(i * (len(frames) - 1) / (max_frames - 1))] for i in range(max_frames)]
    images = [ImageOps.expand(Image.open(p).convert("RGB"), (0, 0, 0, 14), "black") for _, p in frames]
    for (step, _), image in zip(frames, images, strict=True):  # the strip below the grid names the step
        ImageDraw.Draw(image).text((3, image.height - 12), f"generator step {step}", fill="white")
    images[0].save(buf := io.BytesIO(), format="GIF", save_all=True, append_images=images[1:],
                   duration=max(20, round(1000 / fps)), loop=0)
    return buf.getvalue(), len(images)


def write_gif_to_tensorboard(gif: bytes, log_dir: str | Path | None = None, step: int = 0,
                             writer: object | None = None) -> None:
    """Put an encoded GIF into TensorBoard as image tag ``timelapse`` (the way ``add_video`` stores video)."""
    from torch.utils.tensorboard import SummaryWriter
    from torch.utils.tensorboard.summary import Summary
    width, height = Image.open(io.BytesIO(gif)).size
    image = Summary.Image(height=height, width=width, colorspace=3, encoded_image_string=gif)
    to = writer or SummaryWriter(log_dir=str(log_dir))
    to._get_file_writer().add_summary(Summary(value=[Summary.Value(tag="timelapse", image=image)]), step)
    to.flush() if writer else to.close()


def main(argv: list[str] | None = None) -> int:
    cfg = cli.parse(TimelapseConfig, sys.argv[1:] if argv is None else argv, prog="wgan_lit.timelapse", doc=__doc__,
                    path_key=("run_dir", "a run directory"), check=lambda c: cli.problems([
                        ("run_dir", c.run_dir, Path(c.run_dir).is_dir(), "an existing training run's directory"),
                        ("fps", c.fps, c.fps > 0, "a number > 0")]))
    try:
        out, gif = Path(cfg.output or Path(cfg.run_dir) / "timelapse.gif"), build_gif(cfg.run_dir, cfg.fps)[0]
        with atomic_write(out) as tmp:
            tmp.write_bytes(gif)
    except (ValueError, OSError) as err:
        cli.fail(f"output={cfg.output!r}: cannot be written ({type(err).__name__}: {err})"
                 if isinstance(err, OSError) else str(err))
    if cfg.tensorboard and (tensorboard := Path(cfg.run_dir) / "tensorboard").is_dir():
        write_gif_to_tensorboard(gif, tensorboard, step=find_frames(cfg.run_dir)[-1][0])
    print(f"Wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
