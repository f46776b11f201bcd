"""The paper's claims on Fashion-MNIST: ``python -m wgan_lit.study [key=value ...] [-- train overrides ...]``.

Trains every arm (``BASE`` and what its name says, nothing tuned per arm) for ``minutes`` of wall-clock time, each
a ``python -m wgan_lit.train`` run in ``<runs>/<arm>/`` scored as it trains and by ``wgan_lit.evaluate``; finished
arms are reused. Writes the numbers to ``<out>/paper_data.json``, and from that file alone ``<out>/paper.md``
(docs/paper.md.j2) and its figures: the meaningful loss, the architectures, the clip value, clipping vs penalty.
Words after ``--`` go to every arm's train command line (``-- data.root=/data``).
"""

import base64
import json
import os
import re
import shutil
import subprocess
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
import torch
from omegaconf import OmegaConf

from wgan_lit import classifier, cli
from wgan_lit.config import register_configs
from wgan_lit.data import DATAMODULES
from wgan_lit.evaluate import EvaluateConfig, evaluate
from wgan_lit.fast_path import cpu_name
from wgan_lit.generate import load_generator

# The project's CPU settings (conf/experiment/fashion_cpu_15min.yaml's networks) in float32 for every arm.
BASE = ["model.g_features=32", "model.d_features=32", "trainer.precision=32-true", "trainer.max_epochs=-1",
        "logger.sample_every_n_gen_steps=0", "logger.timelapse=false", "metrics.inception=false",
        "metrics.checkpoint_monitor=", "checkpoint_every_n_gen_steps=0"]
LOSSES = {"wgan": ["model.lr_g=2e-4", "model.lr_d=2e-4"], "gan": ["model=gan"]}  # WGAN: 4x the paper's 5e-5
GENERATORS = {"dcgan": [], "nobn": ["model.g_batchnorm=false"], "mlp": ["model.generator=mlp", "model.g_features=512"]}
ARCHITECTURES = {"dcgan": "DCGAN", "nobn": "no BatchNorm", "mlp": "MLP (4 x 512)"}  # the paper's MLP: 4 x 512 ReLU
CLIP_ARMS = {c: "wgan_dcgan" if c == 0.01 else f"clip_{c}" for c in (0.001, 0.005, 0.01, 0.05, 0.1)}
ARMS: dict[str, list[str]] = {**{f"{k}_{g}": [*o, *GENERATORS[g]] for k, o in LOSSES.items() for g in GENERATORS},
                              **{a: [*LOSSES["wgan"], f"model.clip_value={c}"] for c, a in CLIP_ARMS.items()
                                 if c != 0.01}, "wgan_gp": ["model=wgan_gp"]}
TEMPLATE = Path(__file__).resolve().parents[1] / "docs" / "paper.md.j2"
sig = lambda x, digits=6: float(f"{x:.{digits}g}")  # the data file holds what the page can show, not float noise

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

    def selected(self) -> list[str]:
        return [a.strip() for a in self.arms.split(",") if a.strip()] or list(ARMS)

    def problems(self) -> list[str]:
        unknown = [a for a in self.selected() if a not in ARMS]
        return cli.problems([
            ("arms", self.arms, not unknown, f"a comma-separated list of {', '.join(ARMS)} (unknown: {unknown})"),
            ("minutes", self.minutes, self.minutes * 60 >= 1, "a number of minutes >= 1/60"),
            ("metric_seconds", self.metric_seconds, self.metric_seconds > 0, "a number of seconds > 0"),
            *[(k, getattr(self, k), getattr(self, k) >= 2, "an integer >= 2") for k in ("n_samples", "eval_samples")],
            ("cpu_threads", self.cpu_threads, self.cpu_threads >= 0, "an integer >= 0"),
            ("render", self.render, not self.render or read_data(self.render) is not None,
             "the path of a paper_data.json that python -m wgan_lit.study wrote, or nothing")])

    def overrides(self, name: str, extra: list[str]) -> list[str]:
        """The arm's wgan_lit.train command line; ``extra``: the study's own ``-- key=value ...`` words."""
        s = round(self.minutes * 60)
        return [*BASE, *ARMS[name], f"trainer.max_time=00:00:{s // 60:02d}:{s % 60:02d}",
                f"metrics.every_n_seconds={self.metric_seconds}", f"metrics.n_samples={self.n_samples}",
                f"cpu_threads={self.cpu_threads}", *extra]

    def command(self, extra: list[str]) -> str:
        """The study's command line as run, an absolute path as its key in capitals (``runs=RUNS``)."""
        cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        words = [f"taskset -c {','.join(map(str, cpus))}"] if cpus and len(cpus) < (os.cpu_count() or 0) else []
        words += [f"nice -n {os.nice(0)}"] if hasattr(os, "nice") and os.nice(0) > 0 else []
        words += ["python -m wgan_lit.study", *(f"{k}={v}" for k, v in vars(self).items() if v != getattr(
            StudyConfig, k) and k not in ("report_only", "render")), *(["--", *extra] if extra else [])]
        return " ".join(re.sub(r"^([^=]*?)([^.=]*)=/.*", lambda m: f"{m[1]}{m[2]}={m[2].upper()}", w) for w in words)

def run_arm(name: str, cfg: StudyConfig, extra: list[str]) -> Path:
    """Train and score one arm unless a finished run with the same overrides is there; its run directory."""
    run_dir, overrides = Path(cfg.runs) / name, cfg.overrides(name, extra)
    done, log = run_dir / "done.json", run_dir / "study.log"
    if done.is_file() and json.loads(done.read_text())["overrides"] == overrides:
        print(f"[study] {name}: finished before, reused ({run_dir})", flush=True)
        return run_dir
    if run_dir.exists():  # unfinished, or other settings: a run directory holds one run
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    print(f"[study] {name}: training {cfg.minutes:g} min: {' '.join(ARMS[name])}", flush=True)
    with open(log, "w") as out:
        code = subprocess.call([sys.executable, "-m", "wgan_lit.train", *overrides, f"hydra.run.dir={run_dir}"],
                               stdout=out, stderr=subprocess.STDOUT)
    if code != 0:
        cli.fail(f"arm {name} failed (exit code {code}); its log: {log}")
    ev = EvaluateConfig(checkpoint=str(run_dir / "checkpoints" / "last.ckpt"))
    ev.metrics.n_samples, ev.metrics.inception = cfg.eval_samples, False  # and the arm's classifier, not the default:
    ev.metrics.classifier_path = OmegaConf.load(run_dir / ".hydra" / "config.yaml").metrics.classifier_path
    (run_dir / "evaluate.json").write_text(json.dumps(evaluate(ev), indent=2))
    done.write_text(json.dumps({"overrides": overrides}, indent=2))
    return run_dir

def scalars(run_dir: str | Path) -> dict[str, list[tuple[float, int, float]]]:
    """Every TensorBoard scalar of a run: tag -> [(wall time, generator step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(Path(run_dir) / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.wall_time, e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}

def spearman(x: list[float], y: list[float]) -> float:
    """Spearman's rank correlation (no ties expected among float losses and scores); nan below 3 points."""
    r = torch.tensor([x, y], dtype=torch.float64).argsort().argsort().double()
    r = r - r.mean(1, keepdim=True)
    return float((r[0] * r[1]).sum() / (r[0].norm() * r[1].norm())) if len(x) >= 3 else float("nan")

def rho(arms: dict[str, Any], arm: str) -> float:
    """Spearman's rho between an arm's loss and its fd_classifier over the scores; nan when missing."""
    return spearman(*map(arms.get(arm, {}).get("loss_vs_fd", {"loss": [], "fd": []}).get, ("loss", "fd")))

def loss_vs_quality(curves: dict[str, list[tuple[float, int, float]]], tag: str) -> tuple[list, list, list]:
    """(steps, loss, fd_classifier) at every score after the first, the loss averaged over its log points since the
    previous score (the paper plots a median-filtered curve)."""
    fd, loss = ([(s, v) for _, s, v in curves.get(t, [])] for t in ("metrics/fd_classifier", tag))
    windows = [(s, v, [w for t, w in loss if prev < t <= s]) for (prev, _), (s, v) in zip(fd, fd[1:], strict=False)]
    return tuple(map(list, zip(*[(s, sum(w) / len(w), v) for s, v, w in windows if w], strict=True))) or ([], [], [])

def critic_weights(model: torch.nn.Module, c: float) -> dict[str, Any]:
    """The share of the critic's parameters at the bound (|w| >= 0.99 c) and their histogram on [-c, c] in 60 bins;
    parameters only: BatchNorm's running statistics are not clipped weights."""
    w = torch.cat([p.detach().flatten().double() for p in model.critic.parameters()]) / c
    return {"at_bound": sig(float((w.abs() >= 0.99).double().mean())),
            "hist": torch.histc(w, bins=60, min=-1, max=1).long().tolist()}

def arm_data(name: str, run_dir: Path) -> dict[str, Any]:
    """One finished arm's scores, curves and figure inputs."""
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
    if name.split("_")[1] in GENERATORS:
        images = ((next(model.sample(model.latents(36, 0), 36)).cpu() + 1) * 127.5).round().to(torch.uint8)
        arm["samples"] = {"shape": list(images.shape),
                          "uint8_zlib_base64": base64.b64encode(zlib.compress(images.numpy().tobytes(), 9)).decode()}
    for c in (c for c, a in CLIP_ARMS.items() if a == name):
        arm["critic_weights"] = critic_weights(model, c)
    return arm

def collect(cfg: StudyConfig, extra: list[str]) -> dict[str, Any]:
    """The data file's contents: the study's command line and machine, and every finished arm."""
    budget = {k: getattr(cfg, k) for k in ("minutes", "cpu_threads", "metric_seconds", "n_samples", "eval_samples")}
    return {"study": {"command": cfg.command(extra), "machine": cpu_name(), "cores": os.cpu_count(),
                      "torch": torch.__version__, "base": BASE, "budget": budget},
            "arms": {a: arm_data(a, Path(cfg.runs) / a) for a in ARMS if (Path(cfg.runs) / a / "done.json").is_file()}}

def read_data(path: str | Path) -> dict[str, Any] | None:
    """A study data file's contents; None when the file is not one."""
    try:
        data = json.loads(Path(path).read_text())
        return data if isinstance(data["arms"], dict) and isinstance(data["study"]["budget"], dict) else None
    except (OSError, ValueError, KeyError, TypeError):
        return None

def pyplot() -> Any:
    try:
        import matplotlib.pyplot as plt
    except ImportError:
        cli.fail("the study's figures need matplotlib: pip install -e '.[notebook]'")
    plt.switch_backend("Agg")
    return plt

def save(fig: Any, path: Path, *legends: Any) -> None:
    for ax in legends:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    pyplot().close(fig)

def figure_meaningful_loss(arms: dict[str, Any], path: Path) -> None:
    """Loss and fd_classifier against generator steps, WGAN and the standard GAN, with their Spearman rho."""
    shown = [p for p in (("wgan_dcgan", "W estimate (critic)"), ("gan_dcgan", "JS estimate (discriminator)"))
             if p[0] in arms]
    fig, axes = pyplot().subplots(1, max(len(shown), 1), figsize=(6 * max(len(shown), 1), 4), squeeze=False)
    for ax, (arm, label) in zip(axes[0], shown, strict=False):
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

    fig, axes = pyplot().subplots(3, 2, figsize=(6, 9))
    for ax, arch, loss in [(axes[i][j], g, k) for i, g in enumerate(GENERATORS) for j, k in enumerate(LOSSES)]:
        ax.axis("off")
        if (arm := arms.get(f"{loss}_{arch}")) is not None:
            raw = bytearray(zlib.decompress(base64.b64decode(arm["samples"]["uint8_zlib_base64"])))
            grid = make_grid(torch.frombuffer(raw, dtype=torch.uint8).view(arm["samples"]["shape"]), nrow=6)
            ax.imshow(grid.permute(1, 2, 0).numpy())
            ax.set_title(f"{loss.upper()}, {ARCHITECTURES[arch]}\nfd {arm['scores']['fd_classifier']:.1f}, "
                         f"coverage {arm['scores']['coverage']:.2f}", fontsize=9)
    save(fig, path)

def clip_arms(names: Any) -> dict[float, str]:
    """c -> the arm that trained with it, among ``names``."""
    return {c: a for c, a in CLIP_ARMS.items() if a in names}

def figure_clip(arms: dict[str, Any], path: Path) -> None:
    """W curves (left) and the critic's final weight histograms (right) per clip value."""
    fig, (left, right) = pyplot().subplots(1, 2, figsize=(12, 4))
    edges = torch.linspace(-1, 1, 61).tolist()
    for c, arm in clip_arms(arms).items():
        left.plot(arms[arm]["loss"]["step"], arms[arm]["loss"]["value"], label=f"c = {c}", linewidth=0.8)
        counts = arms[arm]["critic_weights"]["hist"]
        right.stairs([n / (sum(counts) * (edges[1] - edges[0])) for n in counts], edges, label=f"c = {c}")
    left.set(xlabel="generator step", ylabel="W estimate", yscale="symlog", title="W estimate per clip value")
    right.set(xlabel="critic weight / c", ylabel="density", yscale="log", title="critic weights at the end")
    save(fig, path, left, right)

def figure_over_time(arms: dict[str, Any], names: list[str], path: Path) -> None:
    """fd_classifier against wall-clock minutes of training."""
    fig, ax = pyplot().subplots(figsize=(6, 4))
    for name in (n for n in names if n in arms):
        ax.plot(arms[name]["fd_over_time"]["minutes"], arms[name]["fd_over_time"]["value"], marker=".", label=name)
    ax.set(xlabel="wall-clock minutes of training", ylabel="fd_classifier (lower is better)", yscale="log")
    save(fig, path, ax)

def page(data: dict[str, Any]) -> str:
    """paper.md: docs/paper.md.j2 filled from a data file's contents; it words the verdicts on these numbers."""
    arms, score = data["arms"], lambda a, k="fd_classifier": data["arms"][a]["scores"][k]
    every = {f"{k}_{g}" for k in LOSSES for g in GENERATORS} <= arms.keys()  # the architecture claim needs all six
    worst = {k: (max(score(f"{k}_{g}") for g in GENERATORS), min(score(f"{k}_{g}", "coverage") for g in GENERATORS))
             for k in LOSSES} if every else None
    clips = [{"c": c, "arm": a, "fd": score(a), "cov": score(a, "coverage"), "steps": arms[a]["gen_steps"],
              "bound": arms[a]["critic_weights"]["at_bound"]} for c, a in clip_arms(arms).items()]
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True,
                             undefined=jinja2.StrictUndefined)
    env.filters["f"], env.tests["nan"] = format, lambda x: x != x
    return env.from_string(TEMPLATE.read_text()).render(
        arms=arms, study=data["study"], b=data["study"]["budget"], arch=ARCHITECTURES, worst=worst, clips=clips,
        gan_better=[ARCHITECTURES[g] for g in GENERATORS if every and score(f"gan_{g}") < score(f"wgan_{g}")],
        rho={a: rho(arms, a) for a in ("wgan_dcgan", "gan_dcgan")})

def render(data: dict[str, Any], out: Path) -> Path:
    """Write <out>/paper.md and its figures from a data file's contents, and nothing else."""
    text = page(data)  # first: a data file that lacks a number fails before anything is written
    out.mkdir(parents=True, exist_ok=True)
    figure_meaningful_loss(data["arms"], out / "paper_meaningful_loss.png")
    figure_samples(data["arms"], out / "paper_architectures.png")
    figure_clip(data["arms"], out / "paper_clip.png")
    figure_over_time(data["arms"], ["wgan_dcgan", "wgan_gp"], out / "paper_clip_vs_gp.png")
    (out / "paper.md").write_text(text)
    return out / "paper.md"

def main(argv: list[str] | None = None) -> int:
    """``python -m wgan_lit.study [key=value ...] [-- train overrides for every arm ...]``."""
    argv = sys.argv[1:] if argv is None else list(argv)
    own, extra = (argv[: argv.index("--")], argv[argv.index("--") + 1 :]) if "--" in argv else (argv, [])
    # arms=a,b is one string here, not the Hydra sweep that a bare comma would make it
    own = [f"arms='{w[5:]}'" if w.startswith("arms=") and w[5:6] not in ("'", '"') else w for w in own]
    cfg = cli.parse(StudyConfig, own, prog="wgan_lit.study", check=StudyConfig.problems,
                    doc=__doc__ + "\nArms:\n" + "\n".join(f"  {a}: {' '.join(o)}" for a, o in ARMS.items()))
    if not cfg.render and not cfg.report_only:
        register_configs()  # the schema that conf/train.yaml names
        train = cli.compose_or_exit("train", [*BASE, *extra])
        if DATAMODULES[train.data.name].has_classifier:  # built now, not inside (and on the budget of) the first arm
            classifier.load_or_build(train.metrics.classifier_path or None, train.data.root)
        for name in cfg.selected():
            run_arm(name, cfg, extra)
    if not cfg.render:  # one line per list of numbers, so that a new study's diff reads per curve
        data = json.dumps(collect(cfg, extra), indent=1)
        (Path(cfg.out) / "paper_data.json").parent.mkdir(parents=True, exist_ok=True)
        (Path(cfg.out) / "paper_data.json").write_text(
            re.sub(r"\[\n\s*([^\[\]{}]*?)\n\s*\]", lambda m: "[" + re.sub(r",\n\s*", ", ", m[1]) + "]", data) + "\n")
    print(f"[study] wrote {render(read_data(cfg.render or Path(cfg.out) / 'paper_data.json'), Path(cfg.out))}")
    return 0

if __name__ == "__main__":
    sys.exit(main())
