"""Shared fixtures and helpers: tiny Fashion-MNIST files, the tiny-model settings, runs and their checkpoints."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch.utils.data import DataLoader

import wgan_lit.fashion_mnist as fmnist_mod
from wgan_lit.classifier import FashionClassifier
from wgan_lit.config import LoggerConfig, TrainConfig, register_configs
from wgan_lit.data import InMemoryImages, pass_through, to_unit_range
from wgan_lit.module import WGAN

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(REPO)}
PROBE = REPO / "tests" / "ddp_probe.py"
register_configs()

# The tiny model every run in the tests uses, as module keyword arguments and as command-line overrides.
TINY = dict(g_features=8, d_features=8, latent_dim=16, n_fixed_samples=4)
TINY_ARGS = ["trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "model.g_features=8",
             "model.d_features=8", "model.latent_dim=16", "model.n_fixed_samples=4", "data.batch_size=16",
             "model.n_critic=2"]
TAGS = ("critic/loss", "critic/wasserstein", "generator/loss")


def idx_bytes(array: np.ndarray) -> bytes:
    """Encode a uint8 array as an IDX file (magic 0x0000 08 ndim, big-endian dims, data)."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_fake_fashion_mnist(root: Path, n_train: int = 256, n_test: int = 64, gz: bool = True) -> Path:
    """Fashion-MNIST-shaped IDX files with structured (not uniform) content, in ``root``."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        yy, xx = np.mgrid[:28, :28]
        centres = rng.integers(6, 22, size=(n, 2))
        images = (255 * np.exp(-((yy - centres[:, :1, None]) ** 2 + (xx - centres[:, 1:, None]) ** 2) / 40.0))
        labels = rng.integers(0, 10, size=n)
        for name, arr in ((f"{prefix}-images-idx3-ubyte", images), (f"{prefix}-labels-idx1-ubyte", labels)):
            data = idx_bytes(arr.astype(np.uint8))
            if gz:
                (root / f"{name}.gz").write_bytes(gzip.compress(data))
            else:
                (root / name).write_bytes(data)
    return root


@pytest.fixture
def fake_fmnist(tmp_path: Path) -> Path:
    return write_fake_fashion_mnist(tmp_path / "fmnist")


# Checkpoints written by main at e089f38, before the runtime settings left the hyperparameters (and before the
# averaged generator left its BatchNorm buffers out): g_features=d_features=4, latent_dim=8, 6 generator steps.
LEGACY_CKPT = REPO / "tests" / "data" / "e089f38.ckpt"
LEGACY_EMA_CKPT = REPO / "tests" / "data" / "e089f38_ema.ckpt"


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One real ``python -m wgan_lit.train`` run shared by every test that only reads a run (never write into
    it: copy it first). Fake Fashion-MNIST, the tiny model, averaged generator, 12 generator steps, curves every
    step, grids every 3. Holds checkpoints/ (last.ckpt), tensorboard/, samples/, .hydra/, train.log."""
    base = tmp_path_factory.mktemp("tiny_run")
    data = write_fake_fashion_mnist(base / "fmnist")
    run_cli(["-m", "wgan_lit.train", *TINY_ARGS, f"data.root={data}", "max_gen_steps=12", "model.ema_decay=0.9",
             "logger.log_every_n_gen_steps=1", "logger.sample_every_n_gen_steps=3", "trainer.deterministic=true",
             f"hydra.run.dir={base / 'run'}"], cwd=base)
    return base / "run"


@pytest.fixture
def tiny_model() -> WGAN:
    """The tiny model of every in-process test, with its averaged generator off (WGAN's defaults otherwise)."""
    torch.manual_seed(0)
    return WGAN(n_critic=2, **TINY)


class RandomImages(L.LightningDataModule):
    """Random uint8 images served the way the real data modules serve them."""

    channels = 1

    def __init__(self, n: int = 512, batch_size: int = 16, image_size: int = 28, channels: int = 1) -> None:
        super().__init__()
        self.channels = channels
        g = torch.Generator().manual_seed(0)
        self.images = torch.randint(0, 256, (n, channels, image_size, image_size), dtype=torch.uint8, generator=g)
        self.batch_size = batch_size

    def train_dataloader(self) -> DataLoader:
        return DataLoader(InMemoryImages(self.images), batch_size=self.batch_size, shuffle=True,
                          drop_last=True, collate_fn=pass_through)

    def on_after_batch_transfer(self, batch: torch.Tensor, dataloader_idx: int) -> torch.Tensor:
        return to_unit_range(batch)


def tiny_trainer(n_batches: int, callbacks: list | None = None, **kwargs) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu", devices=1, max_epochs=1, limit_train_batches=n_batches, limit_val_batches=0,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=callbacks or [], **kwargs,
    )


def tiny_config(data: Path, max_gen_steps: int, ckpt_path: str = "", logger: dict | None = None,
                **model) -> TrainConfig:
    """For ``train()`` in-process. 128 images / batch 16 = 8 critic batches per epoch; n_critic=2 -> 4 generator
    steps per epoch. ``logger``: LoggerConfig fields (default: curves every step, grids every 3)."""
    c = TrainConfig()
    c.data.root, c.data.batch_size = str(data), 16
    for k, v in {**TINY, "n_critic": 2, **model}.items():
        setattr(c.model, k, v)
    c.trainer = {"accelerator": "cpu", "devices": 1, "deterministic": True, "enable_progress_bar": False,
                 "enable_model_summary": False, "max_epochs": 10}
    default_logger = {"log_every_n_gen_steps": 1, "sample_every_n_gen_steps": 3}
    c.logger = LoggerConfig(**(default_logger if logger is None else logger))
    c.max_gen_steps, c.ckpt_path = max_gen_steps, ckpt_path
    return c


def compose_train(overrides: list[str], hydra: bool = False):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="train", overrides=overrides, return_hydra_config=hydra)


def run_cli(command: list[str], cwd: Path, check: bool = True, timeout: int = 400) -> subprocess.CompletedProcess:
    """``python <command>`` (e.g. ``["-m", "wgan_lit.train", ...]``) in ``cwd``; asserts success unless told not."""
    proc = subprocess.run([sys.executable, *command], cwd=cwd, env=ENV, capture_output=True, text=True,
                          timeout=timeout)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def curves(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()  # reads every event file of the directory: the first run's and the resumed run's
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in TAGS}


def assert_same_training_state(a: dict, b: dict) -> None:
    assert a["wgan_counters"] == b["wgan_counters"]
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key, value in a["state_dict"].items():  # generator, critic, BatchNorm statistics, fixed noise
        assert torch.equal(value, b["state_dict"][key]), key
    for opt_a, opt_b in zip(a["optimizer_states"], b["optimizer_states"], strict=True):
        for (ia, sa), (ib, sb) in zip(opt_a["state"].items(), opt_b["state"].items(), strict=True):
            assert ia == ib and all(torch.equal(torch.as_tensor(sa[k]), torch.as_tensor(sb[k])) for k in sa)


def execute_notebook(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, **env: str) -> list:
    """Run notebooks/<name> top to bottom in this interpreter with ``env`` set; its code cells' outputs.
    The committed outputs are dropped first: what is checked must come from this execution."""
    import nbclient
    import nbformat

    spec = tmp_path / "jupyter" / "kernels" / "wgan-test"  # this interpreter, not a system-wide "python3"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "wgan-test", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    nb = nbformat.read(REPO / "notebooks" / name, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = []
    nbclient.NotebookClient(nb, timeout=300, kernel_name="wgan-test",
                            resources={"metadata": {"path": str(REPO / "notebooks")}}).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    return outputs


def probe_reports(run_dir: Path, rank: int) -> list[dict]:
    """The ddp_probe.py reports of one rank of a run, in the order its parts ran (a resumed run has several)."""
    paths = sorted((run_dir / "probe").glob(f"rank{rank}-from*.json"), key=lambda p: int(p.stem.split("from")[1]))
    return [json.loads(p.read_text()) for p in paths]


@pytest.fixture
def no_system_copy(monkeypatch, request):
    """Only the generated files are found, not an installed copy, except in the tests of the real data."""
    if "real_data" not in request.keywords:
        monkeypatch.setattr(fmnist_mod, "SYSTEM_DIRS", [])


def tiny_classifier(seed: int = 0) -> FashionClassifier:
    torch.manual_seed(seed)
    return FashionClassifier(width=4, num_features=8).eval()


# ---- the commands' one-line errors ---------------------------------------------------------------------------


def call(main: Callable[[list[str]], int], args: list[str], capsys) -> tuple[int, str, str]:
    """A command's main(args) as the shell sees it: (exit code, stdout, stderr); SystemExit (cli.parse) included."""
    try:
        code = main(list(args))
    except SystemExit as stop:
        code = stop.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_error(code: int, out: str, err: str, *fragments: str, one_line: bool = True) -> None:
    assert code == 2, (code, out, err)
    assert err.startswith("Error: ") and err.count("\nError: ") == 0, err
    if one_line:
        assert len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in out + err and "HYDRA_FULL_ERROR" not in out + err
    for fragment in fragments:
        assert fragment in err, (fragment, err)


# ---- CelebA in its own layout, generated -----------------------------------------------------------------------

N_JPEGS, W, H = 40, 40, 50  # CelebA's faces are 178 wide, 218 high: portrait, like these
SPLIT_OF = {**{i: 0 for i in range(30)}, **{i: 1 for i in range(30, 35)}, **{i: 2 for i in range(35, 40)}}


def picture(i: int, w: int = W, h: int = H) -> np.ndarray:
    """A smooth gradient in a colour of its own plus noise: realistic JPEGs, different from each other."""
    rng = np.random.default_rng(i)
    yy, xx = np.mgrid[:h, :w] / max(w, h)
    colour = rng.uniform(40, 215, size=3)
    img = colour + 40 * np.stack([yy, xx, yy * xx], -1) + rng.normal(0, 8, size=(h, w, 3))
    return img.clip(0, 255).astype(np.uint8)


def make_celeba(root: Path, partition: bool = True) -> Path:
    """40 JPEGs in CelebA's layout, a corrupt one, a gray one, an RGBA and a palette PNG (all 'train')."""
    folder = root / "celeba" / "img_align_celeba"
    folder.mkdir(parents=True)
    for i in range(N_JPEGS):
        Image.fromarray(picture(i)).save(folder / f"{i:06d}.jpg", quality=90)
    (folder / "000040.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a JPEG")
    Image.new("L", (W, H), 100).save(folder / "000041.jpg")
    rgba = np.zeros((H, W, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 255
    rgba[:, W // 2:, 3] = 0  # right half fully transparent
    Image.fromarray(rgba, "RGBA").save(folder / "000042.png")
    Image.new("P", (W, H), 3).save(folder / "000043.png")  # palette index 3 of the default palette
    if partition:
        lines = [f"{i:06d}.jpg {SPLIT_OF[i]}" for i in range(N_JPEGS)]
        lines += ["000040.jpg 0", "000041.jpg 0", "000042.png 0", "000043.png 0"]
        (root / "celeba" / "list_eval_partition.txt").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture
def celeba(tmp_path: Path) -> Path:
    return make_celeba(tmp_path / "data")


def make_folder(root: Path) -> Path:
    """Images in every format, nested, with a file that is no image: what data=folder reads."""
    (root / "sub" / "deeper").mkdir(parents=True)
    for i, name in enumerate(["a.JPG", "sub/b.png", "sub/deeper/c.webp", "sub/d.bmp", "sub/e.jpeg"]):
        Image.fromarray(picture(i)).save(root / name)
    (root / "notes.txt").write_text("not an image")
    return root


def cache_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*.npy"))
