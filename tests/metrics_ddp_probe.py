"""``python tests/metrics_ddp_probe.py OUT_DIR`` (tests/test_metrics.py): the metrics callback under DDP on two CPU
processes (Lightning starts rank 1 by re-running this script), each printing one RESULT line of JSON."""

import json
import os
import sys
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from wgan_lit.classifier import FashionClassifier  # noqa: E402
from wgan_lit.metrics import SampleQuality, SampleQualityCallback, best_checkpoint  # noqa: E402
from wgan_lit.module import WGAN  # noqa: E402

if __name__ == "__main__":
    real = torch.randint(0, 256, (64, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    quality = SampleQualityCallback(lambda device: SampleQuality(real, FashionClassifier(4, 8), kid_subsets=3,
                                                                 kid_subset_size=20, device=device), 2, n_samples=30)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp_find_unused_parameters_true", max_epochs=1,
                        logger=False, callbacks=[quality, best_checkpoint(Path(sys.argv[1]) / "ckpt", "fd_classifier")],
                        enable_progress_bar=False, enable_model_summary=False)
    images = torch.rand(64, 1, 28, 28) * 2 - 1  # 64 / 2 ranks / batch 8 = 4 critic steps, 2 generator steps each
    trainer.fit(WGAN(n_critic=2, g_features=8, d_features=8, latent_dim=16), DataLoader(images, batch_size=8))
    result = dict(rank=trainer.global_rank, built=quality.scorer is not None, metrics={
        k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("metrics/")})
    # One write with its newline (print() may write the two apart; the ranks share stdout), and no interpreter
    # teardown after it: seconds in each rank.
    sys.stdout.write(f"RESULT {json.dumps(result)}\n")
    sys.stdout.flush()
    os._exit(0)
