"""The paper's claims on Fashion-MNIST, one command: ``python -m wgan_lit.study [key=value ...]``.

Trains every arm below for the same wall-clock budget (``minutes``), one after another, each a normal run of
``python -m wgan_lit.train`` in ``<runs>/<arm>/``, scored during training every ``metric_seconds`` and at the
end by ``wgan_lit.evaluate`` (the test set). An arm whose run finished with the same settings is reused, so
an interrupted study goes on where it stopped. Then it writes every number it reports to
``<out>/paper_data.json`` and renders ``<out>/paper.md`` and its figures from that file alone
(``render=<out>/paper_data.json`` renders them again without training):

1. meaningful loss (paper Fig. 3-4): the critic's W estimate, and the standard GAN's JS estimate, against
   ``fd_classifier`` over training, with the Spearman correlation over the scored points;
2. robustness to architecture (Fig. 5-6): WGAN and the standard GAN with the DCGAN, no-BN and MLP generators;
3. the clip value c (Sec. 3; Gulrajani et al. 2017, Fig. 1): W curves and the critic's weight histograms;
4. weight clipping vs the gradient penalty at the same budget.

Every arm shares the base settings (``BASE``); an arm changes only what its name says. Nothing is tuned per arm.
Words after ``--`` go to every arm's ``wgan_lit.train`` command line (``-- data.root=/data``).
"""

from __future__ import annotations

import base64
import dataclasses
import json
import math
import os
import re
import shutil
import subprocess
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path
from string import Template
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
HIST_BINS = 60  # of the critic's weight histograms, on [-c, c]


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
    report_only: bool = False  # write paper_data.json and paper.md from the arms already finished; train nothing
    render: str = ""  # a paper_data.json: write paper.md and its figures from it alone (the other keys unused)


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
        ("render", cfg.render, not cfg.render or Path(cfg.render).is_file(),
         "the path of a paper_data.json that this command wrote, or nothing"),
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


def build_classifier(extra: list[str]) -> None:
    """Build the metrics' Fashion-MNIST classifier before the first arm if it is not cached: built inside an
    arm, it would spend that arm's budget (trainer.max_time counts it)."""
    from wgan_lit import classifier as clf
    from wgan_lit.config import register_configs

    register_configs()  # the schema that conf/train.yaml names
    train = cli.compose_or_exit("train", [*BASE, *extra])
    if train.data.name == "fashion_mnist":
        clf.load_or_build(train.metrics.classifier_path or None, train.data.root)


# ---- the data file: everything the page and its figures show ---------------------------------------------


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


def critic_weights(model: torch.nn.Module, c: float) -> dict[str, Any]:
    """The share of the critic's parameters at the bound (|w| >= 0.99 c) and their histogram in units of c.
    Parameters only: BatchNorm's running statistics are not clipped weights."""
    w = torch.cat([p.detach().flatten().double() for p in model.critic.parameters()]) / c
    return {"at_bound": sig(float((w.abs() >= 0.99).double().mean())),
            "hist": torch.histc(w, bins=HIST_BINS, min=-1, max=1).long().tolist()}


def sig(x: float, digits: int = 6) -> float:
    """``x`` to ``digits`` significant digits: the data file holds what the page can show, not float noise."""
    return float(f"{x:.{digits}g}")


def arm_data(name: str, run_dir: Path, c: float | None) -> dict[str, Any]:
    """One finished arm's scores, curves and figure inputs."""
    from wgan_lit.generate import batches, latents, load_generator

    ev, curves = json.loads((run_dir / "evaluate.json").read_text()), scalars(run_dir)
    tag = "critic/js_estimate" if name.startswith("gan_") else "critic/wasserstein"
    fd, loss = curves.get("metrics/fd_classifier", []), curves.get(tag, [])
    loss = loss[:: -(-len(loss) // 300) or 1]  # at most 300 points of the W curves, which have thousands
    steps, losses, fds = loss_vs_quality(curves, tag)
    arm = {"overrides": ARMS[name], "gen_steps": ev["gen_step"],
           "scores": {k: sig(v) for k, v in ev["metrics"].items() if isinstance(v, float | int)},
           "fd_over_time": {"minutes": [sig((t - fd[0][0]) / 60, 4) for t, _, _ in fd],
                            "step": [s for _, s, _ in fd], "value": [sig(v, 5) for _, _, v in fd]},
           "loss": {"tag": tag, "step": [s for _, s, _ in loss], "value": [sig(v, 4) for _, _, v in loss]},
           "loss_vs_fd": {"step": steps, "loss": [sig(v) for v in losses], "fd": [sig(v) for v in fds]}}
    model = load_generator(run_dir / "checkpoints" / "last.ckpt", "cpu")
    if name in [f"{loss}_{a}" for loss in ("wgan", "gan") for a in ARCHITECTURES]:
        images = ((next(batches(model, latents(model, 36, 0), 36)) + 1) * 127.5).round().to(torch.uint8)
        arm["samples"] = {"shape": list(images.shape),
                          "uint8_zlib_base64": base64.b64encode(zlib.compress(images.numpy().tobytes(), 9)).decode()}
    if c is not None:
        arm["critic_weights"] = critic_weights(model, c)
    return arm


def collect(cfg: StudyConfig, extra: list[str]) -> dict[str, Any]:
    """The data file's contents: the study's settings and machine, and every finished arm."""
    from wgan_lit.fast_path import cpu_name

    clip_of = {a: c for c, a in clip_arms(list(ARMS)).items()}
    arms = {name: arm_data(name, Path(cfg.runs) / name, clip_of.get(name)) for name in ARMS
            if (Path(cfg.runs) / name / "done.json").is_file()}
    budget = {k: getattr(cfg, k) for k in ("minutes", "cpu_threads", "metric_seconds", "n_samples", "eval_samples")}
    return {"study": {"command": command(cfg, extra), "machine": cpu_name(), "cores": os.cpu_count(),
                      "torch": torch.__version__, "base": BASE, "budget": budget}, "arms": arms}


def write_data(data: dict[str, Any], path: Path) -> Path:
    """``data`` as JSON, one line per list of numbers, so that a new study's diff reads per curve."""
    text = re.sub(r"\[\n\s*([^\[\]{}]*?)\n\s*\]", lambda m: "[" + re.sub(r",\n\s*", ", ", m.group(1)) + "]",
                  json.dumps(data, indent=1))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")
    return path


def read_data(path: str | Path) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
        data["study"]["budget"], data["arms"]  # noqa: B018 (the keys every page needs)
    except (OSError, ValueError, KeyError, TypeError) as err:
        cli.fail(f"render={str(path)!r}: not a study data file ({type(err).__name__}: {err}); expected the "
                 "paper_data.json that python -m wgan_lit.study writes")
    return data


def command(cfg: StudyConfig, extra: list[str]) -> str:
    """The study's command line as run, an absolute path as its key in capitals (``runs=RUNS``): the page
    must not name the folders of the machine it ran on."""
    portable = lambda w: re.sub(r"^([^=]*?)([^.=]*)=/.*", lambda m: f"{m[1]}{m[2]}={m[2].upper()}", w)
    default = StudyConfig()
    own = [f"{f.name}={getattr(cfg, f.name)}" for f in dataclasses.fields(cfg)
           if getattr(cfg, f.name) != getattr(default, f.name) and f.name not in ("report_only", "render")]
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    prefix = [f"taskset -c {','.join(map(str, cpus))}"] if cpus and len(cpus) < (os.cpu_count() or 0) else []
    prefix += [f"nice -n {os.nice(0)}"] if hasattr(os, "nice") and os.nice(0) > 0 else []
    return " ".join([*prefix, "python -m wgan_lit.study", *map(portable, own),
                     *(["--", *map(portable, extra)] if extra else [])])


# ---- the page and its figures, from the data file alone --------------------------------------------------


def pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        cli.fail("the study's figures need matplotlib: pip install -e '.[notebook]'")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig: Any, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    pyplot().close(fig)


def rho(arms: dict[str, Any], arm: str) -> float:
    """Spearman's rho between an arm's loss and its fd_classifier over the scores; nan when missing."""
    pairs = arms.get(arm, {}).get("loss_vs_fd", {"loss": [], "fd": []})
    return spearman(pairs["loss"], pairs["fd"])


def figure_meaningful_loss(arms: dict[str, Any], path: Path) -> None:
    """Loss and fd_classifier against generator steps, WGAN and the standard GAN, with their Spearman rho."""
    plt = pyplot()
    pairs = [(a, lab) for a, lab in [("wgan_dcgan", "W estimate (critic)"),
                                     ("gan_dcgan", "JS estimate (discriminator)")] if a in arms]
    fig, axes = plt.subplots(1, max(len(pairs), 1), figsize=(6 * max(len(pairs), 1), 4), squeeze=False)
    for ax, (arm, label) in zip(axes[0], pairs, strict=False):
        points = arms[arm]["loss_vs_fd"]
        ax.plot(points["step"], points["loss"], color="tab:blue", marker=".")
        ax.set_xlabel("generator step")
        ax.set_ylabel(label, color="tab:blue")
        twin = ax.twinx()
        twin.plot(points["step"], points["fd"], color="tab:red", marker=".")
        twin.set_ylabel("fd_classifier (lower is better)", color="tab:red")
        ax.set_title(f"{arm}: Spearman rho = {rho(arms, arm):.2f}")
    save(fig, path)


def figure_samples(arms: dict[str, Any], path: Path) -> None:
    """A 3 x 2 table of sample grids: generator architecture (rows) x loss (columns)."""
    from torchvision.utils import make_grid

    plt = pyplot()
    fig, axes = plt.subplots(3, 2, figsize=(6, 9))
    for row, arch in enumerate(ARCHITECTURES):
        for col, loss in enumerate(("wgan", "gan")):
            ax, arm = axes[row][col], arms.get(f"{loss}_{arch}")
            ax.axis("off")
            if arm is None:
                continue
            raw = zlib.decompress(base64.b64decode(arm["samples"]["uint8_zlib_base64"]))
            images = torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(arm["samples"]["shape"])
            ax.imshow(make_grid(images, nrow=6).permute(1, 2, 0).numpy())
            m = arm["scores"]
            ax.set_title(f"{'WGAN' if loss == 'wgan' else 'GAN'}, {ARCHITECTURES[arch]}\n"
                         f"fd {m['fd_classifier']:.1f}, coverage {m['coverage']:.2f}", fontsize=9)
    save(fig, path)


def clip_arms(names: Any) -> dict[float, str]:
    """c -> the arm that trained with it, among ``names``."""
    arms = {c: "wgan_dcgan" if c == 0.01 else f"clip_{c}" for c in CLIPS}
    return {c: a for c, a in arms.items() if a in names}


def figure_clip(arms: dict[str, Any], path: Path) -> None:
    """W curves (left) and the critic's final weight histograms (right) per clip value."""
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
    edges = torch.linspace(-1, 1, HIST_BINS + 1).tolist()
    for c, arm in clip_arms(arms).items():
        left.plot(arms[arm]["loss"]["step"], arms[arm]["loss"]["value"], label=f"c = {c}", linewidth=0.8)
        counts = arms[arm]["critic_weights"]["hist"]
        density = [n / (sum(counts) * (edges[1] - edges[0])) for n in counts]
        right.stairs(density, edges, label=f"c = {c}")
    left.set(xlabel="generator step", ylabel="W estimate", yscale="symlog", title="W estimate per clip value")
    right.set(xlabel="critic weight / c", ylabel="density", yscale="log", title="critic weights at the end")
    for ax in (left, right):
        ax.legend()
    save(fig, path)


def figure_over_time(arms: dict[str, Any], names: list[str], path: Path) -> None:
    """fd_classifier against wall-clock minutes of training."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in names:
        if name in arms:
            ax.plot(arms[name]["fd_over_time"]["minutes"], arms[name]["fd_over_time"]["value"], marker=".",
                    label=name)
    ax.set(xlabel="wall-clock minutes of training", ylabel="fd_classifier (lower is better)", yscale="log")
    ax.legend()
    save(fig, path)


def cells(arms: dict[str, Any], arm: str) -> str:
    """An arm's row cells: its final scores and generator steps."""
    if arm not in arms:
        return "not run | | |"
    m = arms[arm]["scores"]
    return f"{m['fd_classifier']:.1f} | {m['coverage']:.3f} | {m['kid']:.4f} | {arms[arm]['gen_steps']:,}"


def _rho_verdict(rho: float, ok: bool, arm: str, arms: dict[str, Any], yes: str, no: str) -> str:
    """A verdict on a Spearman rho; nan when the arm is missing or has fewer than 3 (loss, score) pairs."""
    if arm not in arms:
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


def fields(data: dict[str, Any]) -> dict[str, str]:
    """The page's placeholders, every verdict computed from the data file's numbers."""
    arms, study, b = data["arms"], data["study"], data["study"]["budget"]
    fd = {a: r["scores"]["fd_classifier"] for a, r in arms.items()}
    cov = {a: r["scores"]["coverage"] for a, r in arms.items()}
    w_rho, g_rho = rho(arms, "wgan_dcgan"), rho(arms, "gan_dcgan")
    clips = clip_arms(arms)
    bound = {c: arms[a]["critic_weights"]["at_bound"] for c, a in clips.items()}
    best, most, least = (min(clips, key=lambda c: fd[clips[c]]), max(bound, key=bound.get),
                         min(bound, key=bound.get)) if clips else (None, None, None)
    gp = fd["wgan_gp"] < fd["wgan_dcgan"] if {"wgan_dcgan", "wgan_gp"} <= arms.keys() else None
    return {
        **{arm: cells(arms, arm) for arm in ARMS}, **{k: str(v) for k, v in study.items()},
        **{k: str(v) if isinstance(v, int) else f"{v:g}" for k, v in b.items()},
        "threads": str(b["cpu_threads"] or "all"),
        "w_rho": f"{w_rho:.2f}", "g_rho": f"{g_rho:.2f}",
        "rho_verdict": _rho_verdict(w_rho, w_rho > 0.5, "wgan_dcgan", arms,
                                    f"the W estimate tracked quality (rho {w_rho:.2f} > 0.5), as the paper says.",
                                    f"the W estimate did not track quality well here (rho {w_rho:.2f} <= 0.5), "
                                    "against the paper.")
        + " " + _rho_verdict(g_rho, abs(g_rho) < 0.5, "gan_dcgan", arms,
                             f"The GAN's JS estimate did not (rho {g_rho:.2f}), as the paper says.",
                             f"The GAN's JS estimate tracked it too (rho {g_rho:.2f}, |rho| >= 0.5): in runs this "
                             "short the paper's contrast did not show."),
        "robustness": robustness(fd, cov),
        "clip_rows": "\n".join(f"| {c} | {a} | {fd[a]:.1f} | {cov[a]:.3f} | {100 * bound[c]:.1f} % | "
                               f"{arms[a]['gen_steps']:,} |" for c, a in clips.items()),
        "clip_verdict": "not measured (arms missing)." if best is None else (
            f"c = {best} scored best ({fd[clips[best]]:.1f}); {100 * bound[most]:.0f} % of the critic's weights sat "
            f"at the bound at the most (c = {most}), {100 * bound[least]:.0f} % at the least (c = {least})."),
        "gp_verdict": "not measured (arms missing)." if gp is None else (
            "the gradient penalty reached the better score in the same time, as Gulrajani et al. report." if gp else
            "weight clipping reached the better score in the same time: the penalty's double backward costs steps "
            "on a CPU, and this budget did not recover them."),
    }


# The page, in markdown: one line per paragraph.
PAGE = Template("""\
# The paper's claims, reproduced on Fashion-MNIST

Arjovsky, Chintala & Bottou (2017), arXiv:1701.07875, checked on a CPU. Written by

    $command

on $machine ($cores cores), torch $torch. Every arm trained for $minutes minutes of wall-clock time (torch threads: $threads), one arm at a time; scores during training every $metric_seconds s on $n_samples samples against training images; the tables' scores are `python -m wgan_lit.evaluate` of each arm's `last.ckpt` ($eval_samples samples, the test set). Shared settings of every arm: DCGAN networks of width 32 at 28 x 28, batch 64, float32 (`wgan_lit/study.py`, `BASE`). WGAN arms: RMSprop 2e-4, n_critic 5, c = 0.01 unless the arm says otherwise (the paper's rate, 5e-5, learns little in minutes on a CPU). Standard GAN arms: `model=gan` (Adam 2e-4, betas (0.5, 0.999), one D step per G step). Gradient penalty: `model=wgan_gp` (lambda 10, Adam 1e-4, betas (0, 0.9), no critic BatchNorm). Nothing is tuned per arm. One run per arm and seed 0: differences of a few fd points are within run-to-run noise. The numbers of this page and of its figures are in `paper_data.json`, beside it.

## 1. A meaningful loss (paper Fig. 3-4)

![loss against sample quality](paper_meaningful_loss.png)

Spearman correlation, over the scores during training, between the loss (averaged since the previous score) and `fd_classifier`. The paper's claim: the WGAN critic's estimate falls as the samples improve (rho near 1); the standard GAN's JS estimate does not track quality.

| arm | loss | Spearman rho with fd_classifier |
|---|---|---|
| wgan_dcgan | W estimate | $w_rho |
| gan_dcgan | JS estimate | $g_rho |

Here: $rho_verdict

## 2. Robustness to the generator's architecture (paper Fig. 5-6)

| arm | fd_classifier | coverage | kid | generator steps |
|---|---|---|---|---|
| WGAN, DCGAN | $wgan_dcgan |
| WGAN, no BatchNorm | $wgan_nobn |
| WGAN, MLP (4 x 512) | $wgan_mlp |
| GAN, DCGAN | $gan_dcgan |
| GAN, no BatchNorm | $gan_nobn |
| GAN, MLP (4 x 512) | $gan_mlp |

![samples per arm](paper_architectures.png)

The paper's claim: WGAN trains with all three generators, the standard GAN fails (collapses or makes poor samples) without BatchNorm or with the MLP. Here: $robustness

## 3. The clip value (paper Sec. 3; Gulrajani et al. 2017, Fig. 1)

| c | arm | fd_classifier | coverage | critic weights at +-c | generator steps |
|---|---|---|---|---|---|
$clip_rows

![W curves and weight histograms per clip value](paper_clip.png)

The paper: a large c makes the critic slow to reach its optimum, a small c gives vanishing gradients; Gulrajani et al. show the weights piling up at +-c. Here: $clip_verdict

## 4. Weight clipping vs gradient penalty at the same budget

| arm | fd_classifier | coverage | kid | generator steps |
|---|---|---|---|---|
| weight clipping (c = 0.01, RMSprop 2e-4, critic BatchNorm) | $wgan_dcgan |
| gradient penalty (lambda 10, Adam 1e-4, no critic BatchNorm) | $wgan_gp |

![fd_classifier over wall-clock time](paper_clip_vs_gp.png)

Here: $gp_verdict

## Reproduce

    python -m wgan_lit.study                    # every arm, then paper_data.json and this page; finished arms reused
    python -m wgan_lit.study report_only=true   # paper_data.json and this page from the finished arms
    python -m wgan_lit.study render=docs/paper_data.json out=docs   # this page and its figures from the data alone

`notebooks/paper_study.ipynb` draws the same figures from `paper_data.json` or from a study's run directories.
""")  # noqa: E501 (the paragraphs are the page's lines)


def render(data: dict[str, Any], out: Path) -> Path:
    """Write <out>/paper.md and its figures from a data file's contents, and nothing else."""
    page = PAGE.substitute(fields(data))  # first: a data file that lacks a number fails before anything is written
    out.mkdir(parents=True, exist_ok=True)
    arms = data["arms"]
    figure_meaningful_loss(arms, out / "paper_meaningful_loss.png")
    figure_samples(arms, out / "paper_architectures.png")
    figure_clip(arms, out / "paper_clip.png")
    figure_over_time(arms, ["wgan_dcgan", "wgan_gp"], out / "paper_clip_vs_gp.png")
    (out / "paper.md").write_text(page)
    return out / "paper.md"


def main(argv: list[str] | None = None) -> int:
    """``python -m wgan_lit.study [key=value ...] [-- train overrides for every arm ...]``."""
    argv = sys.argv[1:] if argv is None else list(argv)
    own, extra = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    # arms=a,b is one string here, not the Hydra sweep that a bare comma would make it
    own = [f"arms='{w[5:]}'" if w.startswith("arms=") and w[5:6] not in ("'", '"') else w for w in own]
    cfg = cli.parse(StudyConfig, own, prog="wgan_lit.study",
                    doc=__doc__ + "\nArms:\n" + "\n".join(f"  {a}: {' '.join(o)}" for a, o in ARMS.items()),
                    check=check)
    if cfg.render:
        data = read_data(cfg.render)
    else:
        if not cfg.report_only:
            build_classifier(extra)
            for name in selected(cfg):
                run_arm(name, cfg, extra)
        data = read_data(write_data(collect(cfg, extra), Path(cfg.out) / "paper_data.json"))
    print(f"[study] wrote {render(data, Path(cfg.out))}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
