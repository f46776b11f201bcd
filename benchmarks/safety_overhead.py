"""What the divergence guard and atomic checkpoint writes cost, next to what they protect.

    python benchmarks/safety_overhead.py [--device cpu|cuda] [--batch-size 64]

Prints (a) the per-critic-step guard work (``isfinite`` of the loss folded into a device flag, no sync)
against one critic step of the default Fashion-MNIST model, and (b) an atomic checkpoint write (temp file,
fsync, rename) against a plain ``torch.save`` of the same checkpoint, with their ratios.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from wgan_lit.checkpointing import atomic_torch_save  # noqa: E402
from wgan_lit.losses import critic_loss  # noqa: E402
from wgan_lit.module import WGAN, clamp_  # noqa: E402


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def per_call(fn: Callable[[], object], device: str, repeat: int) -> float:
    fn()  # warm-up
    sync(device)
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    sync(device)
    return (time.perf_counter() - start) / repeat


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=64)
    args = p.parse_args()
    dev, m = args.device, args.batch_size

    model = WGAN().to(dev)  # the paper's defaults: 28 px, 64 features, latent 100
    opt = torch.optim.RMSprop(model.critic.parameters(), lr=5e-5)
    real = torch.rand(m, 1, 28, 28, device=dev) * 2 - 1
    params = list(model.critic.parameters())
    loss_box: list[torch.Tensor] = []

    def critic_step() -> None:
        with torch.no_grad():
            fake = model.generator(torch.randn(m, 100, device=dev))
        loss = critic_loss(model.critic(real), model.critic(fake))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        clamp_(params, 0.01)
        loss_box[:] = [loss.detach()]

    def guard() -> None:  # exactly what training_step adds per critic step
        model._all_finite &= torch.isfinite(loss_box[0])

    step_s = per_call(critic_step, dev, 20)
    guard_s = per_call(guard, dev, 2000)
    check_s = per_call(model.check_finite, dev, 50)  # once per checkpoint write

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = {"state_dict": model.state_dict(), "optimizer": opt.state_dict()}
        plain_s = per_call(lambda: torch.save(ckpt, Path(tmp) / "plain.ckpt"), "cpu", 10)
        atomic_s = per_call(lambda: atomic_torch_save(ckpt, Path(tmp) / "atomic.ckpt"), "cpu", 10)
        size_mb = (Path(tmp) / "atomic.ckpt").stat().st_size / 1e6

    n_params = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"device {dev}, batch {m}, default model ({n_params:.2f} M params)")
    print(f"critic step                 {step_s * 1e3:9.3f} ms")
    print(f"guard per critic step       {guard_s * 1e6:9.1f} us   ratio to a step {guard_s / step_s:.5f}")
    print(f"check_finite per ckpt write {check_s * 1e3:9.3f} ms")
    print(f"torch.save ({size_mb:.1f} MB)        {plain_s * 1e3:9.1f} ms")
    print(f"atomic save (fsync, rename) {atomic_s * 1e3:9.1f} ms   "
          f"ratio to torch.save {atomic_s / plain_s:.2f}")


if __name__ == "__main__":
    main()
