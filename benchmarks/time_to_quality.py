"""Sample quality against wall-clock minutes of training, read from the runs' TensorBoard scalars.

Each run must have scored itself on a clock (``metrics.every_n_seconds``, as ``experiment=fashion_cpu_15min``
does); give the same ``metrics.n_samples`` to every run, distances shrink with more samples. Draws
``metrics/fd_classifier`` (the averaged generator's, with ``model.ema_decay``; dashed: the raw generator's)
against minutes since the run's first score (before its first batch) and prints the score at a few times.

    python benchmarks/time_to_quality.py preset=outputs/A paper=outputs/B --out docs/time_to_quality.png
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run as a script from anywhere

from wgan_lit.study import pyplot, scalars  # noqa: E402

TAG, RAW = "metrics/fd_classifier", "metrics_raw/fd_classifier"
AT_MINUTES = (1, 2, 5, 10, 15)


def over_time(curves: dict[str, list[tuple[float, int, float]]], tag: str) -> tuple[list[float], list[float]]:
    """(minutes since the first score, value) of a scored metric."""
    points = curves.get(tag, [])
    if not points:
        return [], []
    start = points[0][0]
    return [(t - start) / 60 for t, _, _ in points], [v for _, _, v in points]


def at(minutes: list[float], values: list[float], t: float) -> float | None:
    """The score nearest to ``t`` minutes (scores come about once a minute); None after the run ended."""
    if not minutes or t > minutes[-1] + 0.5:
        return None
    return min(zip(minutes, values, strict=True), key=lambda mv: abs(mv[0] - t))[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", metavar="LABEL=RUN_DIR", help="a name for the legend = a run directory")
    p.add_argument("--out", default="time_to_quality.png", help="the PNG to write")
    p.add_argument("--title", default="", help="the figure's title (e.g. the CPU)")
    args = p.parse_args(argv)
    pairs = [r.rpartition("=") for r in args.runs]  # at the last "=": labels may hold "n_critic=1"
    bad = [r for r, (label, eq, d) in zip(args.runs, pairs, strict=True)
           if not eq or not label or not (Path(d) / "tensorboard").is_dir()]
    if bad:
        p.error(f"expected LABEL=RUN_DIR with a tensorboard/ folder in RUN_DIR; got {bad}")
    args.runs = [(label, Path(d)) for label, _, d in pairs]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    width = max(len("run"), *(len(label) for label, _ in args.runs))
    print(f"{'run':<{width}} {'scores':>6} " + " ".join(f"{f'{t} min':>8}" for t in AT_MINUTES)
          + f" {'final':>8} {'minutes':>8} {'steps':>7}")
    for i, (label, run_dir) in enumerate(args.runs):
        curves = scalars(run_dir)
        minutes, fds = over_time(curves, TAG)
        if len(minutes) < 2:
            sys.exit(f"Error: {run_dir} has {len(minutes)} {TAG} scores; train it with metrics.every_n_seconds=60")
        color = f"C{i}"
        ax.plot(minutes, fds, color=color, marker=".", label=label)
        raw_minutes, raw = over_time(curves, RAW)
        if raw:
            ax.plot(raw_minutes, raw, color=color, linestyle="--", linewidth=0.8, label=f"{label} (without EMA)")
        cells = [at(minutes, fds, t) for t in AT_MINUTES]
        cols = " ".join(f"{c:>8.1f}" if c is not None else f"{'':>8}" for c in cells)
        print(f"{label:<{width}} {len(fds):>6} {cols} {fds[-1]:>8.1f} {minutes[-1]:>8.1f} {curves[TAG][-1][1]:>7}")
    ax.set(xlabel="wall-clock minutes of training", ylabel="fd_classifier (lower is better)", yscale="log",
           title=args.title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out, dpi=100)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
