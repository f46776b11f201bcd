"""The Python steps of benchmarks/gpu_check.sh: its data, the checks of its checkpoints, the metrics' RNG check.

    python benchmarks/gpu_check.py missing               # the project's requirements not installed here
    python benchmarks/gpu_check.py data DIR              # DIR/images: PNGs (64 x 64 RGB); DIR/data: IDX files
    python benchmarks/gpu_check.py ckpt PATH STEPS       # a checkpoint at generator step STEPS, finite weights
    python benchmarks/gpu_check.py compare A B           # every tensor of two checkpoints equal
    python benchmarks/gpu_check.py rng --device cuda     # scoring leaves torch's CPU and CUDA RNG states alone

Each check prints one line starting with "RESULT: " and exits 0 when it holds, 1 when not. Only ``missing``
runs without the project's requirements, so the imports are inside the functions.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # wgan_lit and the tests' helpers, from a checkout without installing


def missing() -> list[str]:
    """The requirements of pyproject.toml (and pytest, for the tests' helpers) with no installed distribution.
    torch and torchvision are left out: a GPU machine's own CUDA build must not be replaced."""
    import importlib.metadata

    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        sys.exit("Error: reading pyproject.toml needs Python 3.11 or later (tomllib); install the project's "
                 "requirements yourself (pip install -e .) or run with PYTHON=a newer python")

    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    out = []
    for req in [*deps, "pytest"]:
        name = re.match(r"[A-Za-z0-9._-]+", req)[0]
        if name in ("torch", "torchvision"):
            continue
        try:
            importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            out.append(req)
    return out


def make_data(out: Path, n_images: int = 512) -> str:
    """PNGs for data=folder and Fashion-MNIST-shaped IDX files for benchmarks/throughput.py, both generated."""
    from PIL import Image

    from tests.conftest import picture, write_fake_fashion_mnist

    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    for i in range(n_images):
        Image.fromarray(picture(i, 64, 64)).save(images / f"{i:04d}.png")
    write_fake_fashion_mnist(out / "data", n_train=2048, n_test=256)
    return f"{n_images} PNGs of 64 x 64 RGB in {images}; Fashion-MNIST-shaped IDX files in {out / 'data'}"


def load(path: Path) -> dict:
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)  # as Lightning resumes


def check_checkpoint(path: Path, steps: int) -> tuple[bool, str]:
    import torch

    ckpt = load(path)
    step = ckpt["wgan_counters"]["gen_step"]
    (loader,) = ckpt["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    bad = [k for k, v in ckpt["state_dict"].items() if v.is_floating_point() and not torch.isfinite(v).all()]
    ok = step == steps and not bad
    return ok, (f"generator step {step} of {steps}, {loader['_num_yielded']} batches into epoch {ckpt['epoch']}, "
                + (f"not finite: {', '.join(bad)}" if bad else "weights finite"))


def tensors(obj: object, path: str = "") -> Iterator[tuple[str, object]]:
    """Every tensor in a checkpoint, by its path of keys."""
    import torch

    if isinstance(obj, torch.Tensor):
        yield path, obj
    elif isinstance(obj, dict):
        for key, value in obj.items():
            yield from tensors(value, f"{path}/{key}")
    elif isinstance(obj, list | tuple):
        for i, value in enumerate(obj):
            yield from tensors(value, f"{path}/{i}")


def compare(a: Path, b: Path) -> tuple[bool, str]:
    import torch

    ca, cb = load(a), load(b)
    ta, tb = dict(tensors(ca)), dict(tensors(cb))
    differ = sorted(k for k in ta.keys() | tb.keys() if k not in ta or k not in tb or ta[k].dtype != tb[k].dtype
                    or not torch.equal(ta[k], tb[k]))
    counters = ca["wgan_counters"] == cb["wgan_counters"]
    if differ or not counters:
        return False, (f"{len(differ)} of {len(ta.keys() | tb.keys())} tensors differ (first: "
                       f"{', '.join(differ[:3]) or '-'}); counters {ca['wgan_counters']} vs {cb['wgan_counters']}")
    return True, (f"all {len(ta)} tensors of both checkpoints equal (weights, optimizer and RNG states), "
                  f"counters {ca['wgan_counters']}")


def check_rng(device: str) -> tuple[bool, str]:
    """The training callback's scoring (SampleQualityCallback.evaluate), with an averaged generator and a tiny
    classifier built here, must leave torch.random's and torch.cuda's RNG states as they were."""
    import torch

    from tests.conftest import TINY, tiny_classifier
    from wgan_lit.metrics import SampleQuality, SampleQualityCallback
    from wgan_lit.module import WGAN

    dev = torch.device(device)
    module = WGAN(image_size=28, channels=1, ema_decay=0.999, **TINY).to(dev)
    real = torch.randint(0, 256, (200, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    callback = SampleQualityCallback(None, every_n_gen_steps=1, n_samples=200, batch_size=100)
    callback.scorer = SampleQuality(real, tiny_classifier(), kid_subsets=10, kid_subset_size=50, device=dev)

    def states() -> dict[str, torch.Tensor]:
        out = {"torch.random": torch.random.get_rng_state()}
        if dev.type == "cuda":
            out["torch.cuda"] = torch.cuda.get_rng_state()
        return out

    torch.manual_seed(0)  # CPU and every CUDA device
    before = states()
    scores = callback.evaluate(module)
    after = states()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    what = f"SampleQualityCallback.evaluate on {dev.type} (metrics/fd_classifier {scores['metrics/fd_classifier']:.3g})"
    if changed:
        return False, f"{what} changed the RNG state of {' and '.join(changed)}"
    return True, f"{what} left the RNG states of {' and '.join(before)} unchanged"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("missing")
    sub.add_parser("data").add_argument("dir", type=Path)
    c = sub.add_parser("ckpt")
    c.add_argument("path", type=Path)
    c.add_argument("steps", type=int)
    c = sub.add_parser("compare")
    c.add_argument("a", type=Path)
    c.add_argument("b", type=Path)
    sub.add_parser("rng").add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    args = p.parse_args(argv)
    if args.command == "missing":
        for req in missing():
            print(req)
        return 0
    if args.command == "data":
        ok, line = True, make_data(args.dir)
    elif args.command == "ckpt":
        ok, line = check_checkpoint(args.path, args.steps)
    elif args.command == "compare":
        ok, line = compare(args.a, args.b)
    else:
        ok, line = check_rng(args.device)
    print(f"RESULT: {line}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
