"""The paper's claims on Fashion-MNIST, one command: ``python -m wgan_lit.study [key=value ...]``.

Trains every arm below for the same wall-clock budget (``minutes``), one after another, each a normal run of
``python -m wgan_lit.train`` in ``<runs>/<arm>/``, scored during training every ``metric_seconds`` and at the
end by ``wgan_lit.evaluate`` (the test set). An arm whose run finished with the same settings is reused, so
an interrupted study goes on where it stopped. Then it writes ``<out>/paper.md`` and its figures:

1. meaningful loss (paper Fig. 3-4): the critic's W estimate, and the standard GAN's JS estimate, against
   ``fd_classifier`` over training, with the Spearman correlation over the scored points;
2. robustness to architecture (Fig. 5-6): WGAN and the standard GAN with the DCGAN, no-BN and MLP generators;
3. the clip value c (Sec. 3; Gulrajani et al. 2017, Fig. 1): W curves and the critic's weight histograms;
4. weight clipping vs the gradient penalty at the same budget.

Every arm shares the base settings (``BASE``); an arm changes only what its name says. Nothing is tuned per arm.
Words after ``--`` go to every arm's ``wgan_lit.train`` command line (``-- data.root=/data``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from wgan_lit import cli

# The project's CPU settings (conf/experiment/fashion_cpu_15min.yaml's networks) in float32 for every arm.
BASE = ["model.g_features=32", "model.d_features=32", "trainer.precision=32-true", "trainer.max_epochs=-1",
        "logger.sample_every_n_gen_steps=0", "logger.timelapse=false", "metrics.inception=false",
        "metrics.checkpoint_monitor=", "checkpoint_every_n_gen_steps=0"]
WGAN = ["model.lr_g=2e-4", "model.lr_d=2e-4"]  # 4x the paper's 5e-5, which learns little in 5 minutes
MLP_G = ["model.generator=mlp", "model.g_features=512"]  # the paper's MLP generator: 4 ReLU layers of 512
CLIPS = (0.001, 0.005, 0.01, 0.05, 0.1)
ARMS: dict[str, list[str]] = {
    "wgan_dcgan": WGAN,  # also c = 0.01 of the clip sweep and weight clipping of the GP comparison
    "wgan_nobn": [*WGAN, "model.g_batchnorm=false"],
    "wgan_mlp": [*WGAN, *MLP_G],
    "gan_dcgan": ["model=gan"],
    "gan_nobn": ["model=gan", "model.g_batchnorm=false"],
    "gan_mlp": ["model=gan", *MLP_G],
    **{f"clip_{c}": [*WGAN, f"model.clip_value={c}"] for c in CLIPS if c != 0.01},
    "wgan_gp": ["model=wgan_gp"],
}
ARCHITECTURES = {"dcgan": "DCGAN", "nobn": "no BatchNorm", "mlp": "MLP (4 x 512)"}


@dataclass
class StudyConfig:
    """The keys of ``python -m wgan_lit.study``."""

    runs: str = "study"  # one run directory per arm; finished arms are reused
    out: str = "docs"  # where paper.md and its figures (paper_*.png) go
    minutes: float = 5.0  # wall-clock training budget per arm
    arms: str = ""  # comma-separated arm names; "" = all (python -m wgan_lit.study --help lists them)
    cpu_threads: int = 0  # torch threads per arm; 0 = one per core
    metric_seconds: float = 20.0  # score during training every this many seconds (and at the start and end)
    n_samples: int = 2000  # images per score during training
    eval_samples: int = 5000  # images of the final score (wgan_lit.evaluate, against the test set)
    report_only: bool = False  # write paper.md from the arms already finished; train nothing


def arm_overrides(name: str, cfg: StudyConfig, extra: list[str]) -> list[str]:
    """The arm's command line for wgan_lit.train; ``extra``: the study's own ``-- key=value ...`` words."""
    seconds = round(cfg.minutes * 60)
    return [*BASE, *ARMS[name], f"trainer.max_time=00:00:{seconds // 60:02d}:{seconds % 60:02d}",
            f"metrics.every_n_seconds={cfg.metric_seconds}", f"metrics.n_samples={cfg.n_samples}",
            f"cpu_threads={cfg.cpu_threads}", *extra]


def selected(cfg: StudyConfig) -> list[str]:
    return [a.strip() for a in cfg.arms.split(",") if a.strip()] or list(ARMS)


def check(cfg: StudyConfig) -> list[str]:
    unknown = [a for a in selected(cfg) if a not in ARMS]
    rules = [
        ("arms", cfg.arms, not unknown, f"a comma-separated list of {', '.join(ARMS)} (unknown: {unknown})"),
        ("minutes", cfg.minutes, cfg.minutes * 60 >= 1, "a number of minutes >= 1/60"),
        ("metric_seconds", cfg.metric_seconds, cfg.metric_seconds > 0, "a number of seconds > 0"),
        ("n_samples", cfg.n_samples, cfg.n_samples >= 2, "an integer >= 2"),
        ("eval_samples", cfg.eval_samples, cfg.eval_samples >= 2, "an integer >= 2"),
        ("cpu_threads", cfg.cpu_threads, cfg.cpu_threads >= 0, "an integer >= 0"),
    ]
    return [f"{key}={value!r}: expected {expected}" for key, value, ok, expected in rules if not ok]


# ---- running the arms ------------------------------------------------------------------------------------


def run_arm(name: str, cfg: StudyConfig, extra: list[str]) -> Path:
    """Train and score one arm unless a finished run with the same overrides is there; its run directory."""
    run_dir = Path(cfg.runs) / name
    overrides = arm_overrides(name, cfg, extra)
    done = run_dir / "done.json"
    if done.is_file() and json.loads(done.read_text())["overrides"] == overrides:
        print(f"[study] {name}: finished before, reused ({run_dir})", flush=True)
        return run_dir
    if run_dir.exists():  # unfinished, or other settings: a run directory holds one run
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    print(f"[study] {name}: training {cfg.minutes:g} min: {' '.join(ARMS[name])}", flush=True)
    with open(run_dir / "study.log", "w") as log:
        code = subprocess.call([sys.executable, "-m", "wgan_lit.train", *overrides, f"hydra.run.dir={run_dir}"],
                               stdout=log, stderr=subprocess.STDOUT)
    if code != 0:
        cli.fail(f"arm {name} failed (exit code {code}); its log: {run_dir / 'study.log'}")
    from wgan_lit.evaluate import EvaluateConfig, evaluate

    ev = EvaluateConfig(checkpoint=str(run_dir / "checkpoints" / "last.ckpt"))
    ev.metrics.n_samples, ev.metrics.inception = cfg.eval_samples, False
    # the classifier the arm trained with (``-- metrics.classifier_path=...``), not the default one
    ev.metrics.classifier_path = OmegaConf.load(run_dir / ".hydra" / "config.yaml").metrics.classifier_path
    (run_dir / "evaluate.json").write_text(json.dumps(evaluate(ev), indent=2))
    done.write_text(json.dumps({"overrides": overrides}, indent=2))
    return run_dir


# ---- reading the results ---------------------------------------------------------------------------------


def scalars(run_dir: str | Path) -> dict[str, list[tuple[float, int, float]]]:
    """Every TensorBoard scalar of a run: tag -> [(wall time, generator step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(Path(run_dir) / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.wall_time, e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman's rank correlation (no ties expected among float losses and scores); nan below 3 points."""
    if len(x) < 3:
        return math.nan
    rx, ry = (torch.tensor(v, dtype=torch.float64).argsort().argsort().double() for v in (x, y))
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return float((rx * ry).sum() / (rx.norm() * ry.norm()))


def loss_vs_quality(curves: dict[str, list[tuple[float, int, float]]], loss_tag: str
                    ) -> tuple[list[int], list[float], list[float]]:
    """(steps, loss, fd_classifier) at every scored step after the first: the loss averaged over the log points
    since the previous score (the paper plots a median-filtered curve)."""
    fd = [(s, v) for _, s, v in curves.get("metrics/fd_classifier", [])]
    loss = [(s, v) for _, s, v in curves.get(loss_tag, [])]
    steps, losses, fds = [], [], []
    for (prev, _), (step, value) in zip(fd, fd[1:], strict=False):
        window = [v for s, v in loss if prev < s <= step]
        if window:
            steps.append(step)
            losses.append(sum(window) / len(window))
            fds.append(value)
    return steps, losses, fds


def critic_weights(run_dir: str | Path) -> torch.Tensor:
    """Every critic weight of the run's last checkpoint, flattened."""
    state = torch.load(Path(run_dir) / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    return torch.cat([v.flatten().float() for k, v in state["state_dict"].items()
                      if k.startswith("critic.") and v.is_floating_point()])


def load(cfg: StudyConfig) -> dict[str, dict[str, Any]]:
    """arm -> {"dir", "curves", "eval", "steps"} for every finished arm."""
    results = {}
    for name in ARMS:
        run_dir = Path(cfg.runs) / name
        if not (run_dir / "done.json").is_file():
            continue
        ev = json.loads((run_dir / "evaluate.json").read_text())
        results[name] = {"dir": run_dir, "curves": scalars(run_dir), "eval": ev, "steps": ev["gen_step"]}
    return results


# ---- figures and the report ------------------------------------------------------------------------------


def pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        cli.fail("the study's figures need matplotlib: pip install -e '.[notebook]'")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def figure_meaningful_loss(results: dict[str, dict[str, Any]], path: Path) -> dict[str, float]:
    """Loss and fd_classifier against generator steps, WGAN and the standard GAN; their Spearman rho."""
    plt = pyplot()
    pairs = [(a, t, lab) for a, t, lab in [("wgan_dcgan", "critic/wasserstein", "W estimate (critic)"),
                                           ("gan_dcgan", "critic/js_estimate", "JS estimate (discriminator)")]
             if a in results]
    rho = {}
    fig, axes = plt.subplots(1, max(len(pairs), 1), figsize=(6 * max(len(pairs), 1), 4), squeeze=False)
    for ax, (arm, tag, label) in zip(axes[0], pairs, strict=False):
        steps, losses, fds = loss_vs_quality(results[arm]["curves"], tag)
        rho[arm] = spearman(losses, fds)
        ax.plot(steps, losses, color="tab:blue", marker=".")
        ax.set_xlabel("generator step")
        ax.set_ylabel(label, color="tab:blue")
        twin = ax.twinx()
        twin.plot(steps, fds, color="tab:red", marker=".")
        twin.set_ylabel("fd_classifier (lower is better)", color="tab:red")
        ax.set_title(f"{arm}: Spearman rho = {rho[arm]:.2f}")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return rho


def figure_samples(results: dict[str, dict[str, Any]], path: Path) -> None:
    """A 3 x 2 table of sample grids: generator architecture (rows) x loss (columns)."""
    from wgan_lit.generate import batches, latents, load_generator

    plt = pyplot()
    fig, axes = plt.subplots(3, 2, figsize=(6, 9))
    for row, arch in enumerate(ARCHITECTURES):
        for col, loss in enumerate(("wgan", "gan")):
            ax, arm = axes[row][col], f"{loss}_{arch}"
            ax.axis("off")
            if arm not in results:
                continue
            model = load_generator(results[arm]["dir"] / "checkpoints" / "last.ckpt", "cpu")
            images = next(batches(model, latents(model, 36, 0), 36))
            from torchvision.utils import make_grid

            grid = make_grid(images, nrow=6, normalize=True, value_range=(-1, 1))
            ax.imshow(grid.permute(1, 2, 0).numpy())
            ev = results[arm]["eval"]["metrics"]
            ax.set_title(f"{'WGAN' if loss == 'wgan' else 'GAN'}, {ARCHITECTURES[arch]}\n"
                         f"fd {ev['fd_classifier']:.1f}, coverage {ev['coverage']:.2f}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def clip_arms(results: dict[str, dict[str, Any]]) -> dict[float, str]:
    arms = {c: "wgan_dcgan" if c == 0.01 else f"clip_{c}" for c in CLIPS}
    return {c: a for c, a in arms.items() if a in results}


def figure_clip(results: dict[str, dict[str, Any]], path: Path) -> dict[float, float]:
    """W curves (left) and the critic's final weight histograms (right) per clip value; the share of
    critic weights at the bound (|w| >= 0.99 c) per c."""
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
    at_bound = {}
    for c, arm in clip_arms(results).items():
        curve = results[arm]["curves"].get("critic/wasserstein", [])
        left.plot([s for _, s, _ in curve], [v for _, _, v in curve], label=f"c = {c}", linewidth=0.8)
        w = critic_weights(results[arm]["dir"])
        at_bound[c] = float((w.abs() >= 0.99 * c).double().mean())
        right.hist((w / c).numpy(), bins=60, histtype="step", label=f"c = {c}", density=True)
    left.set(xlabel="generator step", ylabel="W estimate", yscale="symlog", title="W estimate per clip value")
    right.set(xlabel="critic weight / c", ylabel="density", yscale="log", title="critic weights at the end")
    left.legend()
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return at_bound


def figure_over_time(results: dict[str, dict[str, Any]], arms: list[str], path: Path) -> None:
    """fd_classifier against wall-clock minutes of training."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for arm in arms:
        if arm in results:
            minutes, fds = over_time(results[arm]["curves"])
            ax.plot(minutes, fds, marker=".", label=arm)
    ax.set(xlabel="wall-clock minutes of training", ylabel="fd_classifier (lower is better)", yscale="log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def over_time(curves: dict[str, list[tuple[float, int, float]]], tag: str = "metrics/fd_classifier"
              ) -> tuple[list[float], list[float]]:
    """(minutes since the first score, value) of a scored metric."""
    points = curves.get(tag, [])
    if not points:
        return [], []
    start = points[0][0]
    return [(t - start) / 60 for t, _, _ in points], [v for _, _, v in points]


def _row(results: dict[str, dict[str, Any]], arm: str, label: str) -> str:
    if arm not in results:
        return f"| {label} | not run | | | |"
    r = results[arm]
    m = r["eval"]["metrics"]
    return (f"| {label} | {m['fd_classifier']:.1f} | {m['coverage']:.3f} | {m['kid']:.4f} | {r['steps']:,} |")


def _verdict(ok: bool | None, yes: str, no: str, missing: str = "not measured (arms missing)") -> str:
    return missing if ok is None else (yes if ok else no)


def _rho_verdict(rho: float, ok: bool, arm: str, results: dict[str, dict[str, Any]], yes: str, no: str) -> str:
    """A verdict on a Spearman rho; nan when the arm is missing or has fewer than 3 (loss, score) pairs."""
    if arm not in results:
        return f"not measured ({arm} missing)."
    if math.isnan(rho):
        return (f"not measured ({arm} has fewer than 3 scores with loss log points before them: train longer, "
                "or lower metric_seconds or logger.log_every_n_gen_steps).")
    return yes if ok else no


def robustness(fd: dict[str, float], cov: dict[str, float]) -> str:
    """The architecture claim, worst arm against worst arm, and every architecture where the GAN did better."""
    wgan, gan = [f"wgan_{a}" for a in ARCHITECTURES], [f"gan_{a}" for a in ARCHITECTURES]
    if not all(a in fd for a in wgan + gan):
        return "not measured (arms missing)."
    worst_w, worst_g = max(fd[a] for a in wgan), max(fd[a] for a in gan)
    text = (f"the worst WGAN arm scored {worst_w:.1f} (lowest coverage {min(cov[a] for a in wgan):.3f}), the worst "
            f"GAN arm {worst_g:.1f} (lowest coverage {min(cov[a] for a in gan):.3f}): "
            + ("WGAN was the more robust, as the paper says." if worst_w < worst_g else "the claim did not hold."))
    better = [ARCHITECTURES[a] for a in ARCHITECTURES if fd[f"gan_{a}"] < fd[f"wgan_{a}"]]
    if better:
        text += (f" But the GAN scored better than WGAN with the {', '.join(better)} generator(s), with more "
                 "generator steps in the same time (table), against the paper's picture of the GAN as the fragile one.")
    return text


def report(cfg: StudyConfig, machine: str, extra: list[str] = ()) -> Path:
    """Write <out>/paper.md and its figures from the finished arms."""
    results = load(cfg)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    rho = figure_meaningful_loss(results, out / "paper_meaningful_loss.png")
    figure_samples(results, out / "paper_architectures.png")
    at_bound = figure_clip(results, out / "paper_clip.png")
    figure_over_time(results, ["wgan_dcgan", "wgan_gp"], out / "paper_clip_vs_gp.png")
    fd = {a: r["eval"]["metrics"]["fd_classifier"] for a, r in results.items()}
    cov = {a: r["eval"]["metrics"]["coverage"] for a, r in results.items()}
    head = "| arm | fd_classifier | coverage | kid | generator steps |\n|---|---|---|---|---|"

    def both(*arms: str) -> bool:
        return all(a in results for a in arms)

    w_rho, g_rho = rho.get("wgan_dcgan", math.nan), rho.get("gan_dcgan", math.nan)
    clips = clip_arms(results)
    best_c = min(clips, key=lambda c: fd[clips[c]]) if clips else None
    lines = [
        "# The paper's claims, reproduced on Fashion-MNIST",
        "",
        "Arjovsky, Chintala & Bottou (2017), arXiv:1701.07875, checked on a 2-core CPU. Written by",
        "",
        "    " + " ".join(["python -m wgan_lit.study", *cli_args(cfg), *(["--", *extra] if extra else [])]),
        "",
        f"on {machine}. Every arm trained for {cfg.minutes:g} minutes of wall-clock time "
        f"({cfg.cpu_threads or 'all'} torch threads), one arm at a time; scores during training every "
        f"{cfg.metric_seconds:g} s on {cfg.n_samples} samples against training images; the tables' scores are "
        f"`python -m wgan_lit.evaluate` of each arm's `last.ckpt` ({cfg.eval_samples} samples, the test set). "
        "Shared settings of every arm: DCGAN networks of width 32 at 28 x 28, batch 64, float32 "
        "(`wgan_lit/study.py`, `BASE`). WGAN arms: RMSprop 2e-4, n_critic 5, c = 0.01 unless the arm says "
        "otherwise (the paper's rate, 5e-5, learns little in minutes on a CPU). Standard GAN arms: `model=gan` "
        "(Adam 2e-4, betas (0.5, 0.999), one D step per G step). Gradient penalty: `model=wgan_gp` "
        "(lambda 10, Adam 1e-4, betas (0, 0.9), no critic BatchNorm). Nothing is tuned per arm. One run per arm "
        "and seed 0: differences of a few fd points are within run-to-run noise.",
        "",
        "## 1. A meaningful loss (paper Fig. 3-4)",
        "",
        "![loss against sample quality](paper_meaningful_loss.png)",
        "",
        "Spearman correlation, over the scores during training, between the loss (averaged since the previous "
        "score) and `fd_classifier`. The paper's claim: the WGAN critic's estimate falls as the samples improve "
        "(rho near 1); the standard GAN's JS estimate does not track quality.",
        "",
        "| arm | loss | Spearman rho with fd_classifier |",
        "|---|---|---|",
        f"| wgan_dcgan | W estimate | {w_rho:.2f} |",
        f"| gan_dcgan | JS estimate | {g_rho:.2f} |",
        "",
        "Here: " + _rho_verdict(w_rho, w_rho > 0.5, "wgan_dcgan", results,
                                f"the W estimate tracked quality (rho {w_rho:.2f} > 0.5), as the paper says.",
                                f"the W estimate did not track quality well here (rho {w_rho:.2f} <= 0.5), "
                                "against the paper."),
        " " + _rho_verdict(g_rho, abs(g_rho) < 0.5, "gan_dcgan", results,
                           f"The GAN's JS estimate did not (rho {g_rho:.2f}), as the paper says.",
                           f"The GAN's JS estimate tracked it too (rho {g_rho:.2f} >= 0.5): in runs this short "
                           "the paper's contrast did not show."),
        "",
        "## 2. Robustness to the generator's architecture (paper Fig. 5-6)",
        "",
        head,
        *[_row(results, f"{loss}_{arch}", f"{'WGAN' if loss == 'wgan' else 'GAN'}, {label}")
          for loss in ("wgan", "gan") for arch, label in ARCHITECTURES.items()],
        "",
        "![samples per arm](paper_architectures.png)",
        "",
        "The paper's claim: WGAN trains with all three generators, the standard GAN fails (collapses or makes "
        "poor samples) without BatchNorm or with the MLP. Here: " + robustness(fd, cov),
        "",
        "## 3. The clip value (paper Sec. 3; Gulrajani et al. 2017, Fig. 1)",
        "",
        "| c | arm | fd_classifier | coverage | critic weights at +-c | generator steps |",
        "|---|---|---|---|---|---|",
        *[f"| {c} | {a} | {fd[a]:.1f} | {cov[a]:.3f} | {100 * at_bound[c]:.1f} % | {results[a]['steps']:,} |"
          for c, a in clips.items()],
        "",
        "![W curves and weight histograms per clip value](paper_clip.png)",
        "",
        "The paper: a large c makes the critic slow to reach its optimum, a small c gives vanishing "
        "gradients; Gulrajani et al. show the weights piling up at +-c. Here: "
        + (f"c = {best_c} scored best ({fd[clips[best_c]]:.1f}); " if best_c is not None else "")
        + (f"{100 * max(at_bound.values()):.0f} % of the critic's weights sat at the bound at the most "
           f"(c = {max(at_bound, key=at_bound.get)}), {100 * min(at_bound.values()):.0f} % at the least "
           f"(c = {min(at_bound, key=at_bound.get)})." if at_bound else "not measured (arms missing)."),
        "",
        "## 4. Weight clipping vs gradient penalty at the same budget",
        "",
        head,
        _row(results, "wgan_dcgan", "weight clipping (c = 0.01, RMSprop 2e-4, critic BatchNorm)"),
        _row(results, "wgan_gp", "gradient penalty (lambda 10, Adam 1e-4, no critic BatchNorm)"),
        "",
        "![fd_classifier over wall-clock time](paper_clip_vs_gp.png)",
        "",
        "Here: " + _verdict(None if not both("wgan_dcgan", "wgan_gp") else fd["wgan_gp"] < fd["wgan_dcgan"],
                            "the gradient penalty reached the better score in the same time, as Gulrajani et "
                            "al. report.",
                            "weight clipping reached the better score in the same time: the penalty's double "
                            "backward costs steps on a CPU, and this budget did not recover them."),
        "",
        "## Reproduce",
        "",
        "    python -m wgan_lit.study                  # every arm, then this page; finished arms are reused",
        "    python -m wgan_lit.study report_only=true # rewrite this page from the finished arms",
        "",
        "`notebooks/paper_study.ipynb` reads the same run directories and draws the figures.",
        "",
    ]
    path = out / "paper.md"
    path.write_text("\n".join(lines))
    return path


def cli_args(cfg: StudyConfig) -> list[str]:
    """The non-default keys of ``cfg`` as key=value words, for the page's command line."""
    default = StudyConfig()
    return [f"{f.name}={getattr(cfg, f.name)}" for f in dataclasses.fields(cfg)
            if getattr(cfg, f.name) != getattr(default, f.name) and f.name != "report_only"]


def machine() -> str:
    import os

    from wgan_lit.fast_path import cpu_name

    return f"{cpu_name()} ({os.cpu_count()} cores), torch {torch.__version__}"


def main(argv: list[str] | None = None) -> int:
    """``python -m wgan_lit.study [key=value ...] [-- train overrides for every arm ...]``."""
    argv = sys.argv[1:] if argv is None else list(argv)
    own, extra = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    # arms=a,b is one string here, not the Hydra sweep that a bare comma would make it
    own = [f"arms='{w[5:]}'" if w.startswith("arms=") and w[5:6] not in ("'", '"') else w for w in own]
    cfg = cli.parse(StudyConfig, own, prog="wgan_lit.study",
                    doc=__doc__ + "\nArms:\n" + "\n".join(f"  {a}: {' '.join(o)}" for a, o in ARMS.items()),
                    check=check)
    if not cfg.report_only:
        for name in selected(cfg):
            run_arm(name, cfg, extra)
    print(f"[study] wrote {report(cfg, machine(), extra)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
