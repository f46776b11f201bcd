"""The training timelapse: the fixed-noise sample grids of a run as one animated GIF.

``SampleGrid`` writes ``<run>/samples/gen_XXXXXX.png`` as training goes; this module stamps each with its
generator step and assembles them into ``<run>/timelapse.gif`` (Pillow), and puts the same GIF into the run's
TensorBoard log (tag ``timelapse``, Images tab; TensorBoard animates GIFs, so no moviepy is needed).

At the end of every run by default (``logger.timelapse=true``), or over an existing run directory::

    python -m wgan_lit.timelapse [run_dir=]outputs/2026-01-01/12-00-00-000000 [fps=8] [output=x.gif]

``tensorboard=false`` leaves the run's TensorBoard log as it is.
"""

from __future__ import annotations

import io
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from omegaconf import MISSING
from PIL import Image, ImageDraw

from wgan_lit import cli

FRAME_PATTERN = re.compile(r"gen_(\d+)\.png$")


@dataclass
class TimelapseConfig:
    """The keys of ``python -m wgan_lit.timelapse``: the one home of their defaults."""

    run_dir: str = MISSING  # a training run's directory (holds samples/gen_*.png)
    output: str = ""  # where to write the GIF; "" = RUN_DIR/timelapse.gif
    fps: float = 8.0  # frames per second
    tensorboard: bool = True  # also add the GIF to the run's TensorBoard log (tag timelapse), if it has one


class TimelapseError(RuntimeError):
    """No frames to assemble; the message names the folder."""


def find_frames(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(generator step, path) of every sample grid of the run, in step order."""
    found = []
    for p in (Path(run_dir) / "samples").glob("gen_*.png"):
        m = FRAME_PATTERN.search(p.name)
        if m:
            found.append((int(m.group(1)), p))
    return sorted(found)


def _subsample(frames: list, max_frames: int) -> list:
    """At most ``max_frames`` evenly spread frames, always keeping the first and the last."""
    if len(frames) <= max_frames:
        return frames
    idx = sorted({round(i * (len(frames) - 1) / (max_frames - 1)) for i in range(max_frames)})
    return [frames[i] for i in idx]


def _stamp(path: Path, step: int) -> Image.Image:
    """The grid with a strip below it naming the generator step."""
    grid = Image.open(path).convert("RGB")
    strip = 14
    frame = Image.new("RGB", (grid.width, grid.height + strip), "black")
    frame.paste(grid, (0, 0))
    ImageDraw.Draw(frame).text((3, grid.height + 2), f"generator step {step}", fill="white")
    return frame


def build_gif(run_dir: str | Path, fps: float = TimelapseConfig.fps, max_frames: int = 300) -> tuple[bytes, int]:
    """The timelapse as GIF bytes, and the number of frames in it."""
    run_dir = Path(run_dir)
    frames = find_frames(run_dir)
    if not frames:
        raise TimelapseError(
            f"{run_dir / 'samples'}: no sample grids (gen_XXXXXX.png) to assemble. Pass the run directory of "
            "a training run with logger.sample_every_n_gen_steps > 0."
        )
    images = [_stamp(p, step) for step, p in _subsample(frames, max_frames)]
    buf = io.BytesIO()
    images[0].save(buf, format="GIF", save_all=True, append_images=images[1:],
                   duration=max(20, round(1000 / fps)), loop=0)
    return buf.getvalue(), len(images)


def write_gif_to_tensorboard(gif: bytes, log_dir: str | Path | None = None, step: int = 0,
                             writer: object | None = None) -> None:
    """Put an encoded GIF into TensorBoard as image tag ``timelapse`` (the way ``add_video`` stores video)."""
    from torch.utils.tensorboard import SummaryWriter
    from torch.utils.tensorboard.summary import Summary

    with Image.open(io.BytesIO(gif)) as im:
        width, height = im.size
    image = Summary.Image(height=height, width=width, colorspace=3, encoded_image_string=gif)
    summary = Summary(value=[Summary.Value(tag="timelapse", image=image)])
    own = writer is None
    if own:
        writer = SummaryWriter(log_dir=str(log_dir))
    writer._get_file_writer().add_summary(summary, step)  # type: ignore[attr-defined]
    writer.flush()  # type: ignore[attr-defined]
    if own:
        writer.close()  # type: ignore[attr-defined]


def make_timelapse(run_dir: str | Path, output: str | Path | None = None, fps: float = TimelapseConfig.fps,
                   tensorboard: bool = TimelapseConfig.tensorboard) -> Path:
    """Write ``<run_dir>/timelapse.gif`` (or ``output``) and, if the run has one, into its TensorBoard log."""
    run_dir = Path(run_dir)
    gif, _ = build_gif(run_dir, fps=fps)
    out = Path(output) if output else run_dir / "timelapse.gif"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(gif)
    tb_dir = run_dir / "tensorboard"
    if tensorboard and tb_dir.is_dir():
        write_gif_to_tensorboard(gif, tb_dir, step=find_frames(run_dir)[-1][0])
    return out


def check(cfg: TimelapseConfig) -> list[str]:
    """One line per value the types allow but the command does not."""
    bad = []
    if not Path(cfg.run_dir).is_dir():
        bad.append(f"run_dir={cfg.run_dir!r}: no such directory; expected a training run's directory "
                   "(it holds samples/gen_*.png), e.g. outputs/<date>/<time>")
    if not cfg.fps > 0:
        bad.append(f"fps={cfg.fps!r}: expected a number > 0")
    return bad


def main(argv: list[str] | None = None) -> int:
    cfg = cli.parse(TimelapseConfig, sys.argv[1:] if argv is None else argv, prog="wgan_lit.timelapse",
                    doc=__doc__, check=check, path_key=("run_dir", "a run directory"))
    try:
        out = make_timelapse(cfg.run_dir, cfg.output or None, fps=cfg.fps, tensorboard=cfg.tensorboard)
    except TimelapseError as err:
        print(f"Error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # the output's folder cannot be made or written
        print(f"Error: output={cfg.output!r}: cannot be written ({type(err).__name__}: {err})", file=sys.stderr)
        return 2
    print(f"Wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
