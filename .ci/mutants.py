"""Break the training step on purpose, once per mutant, in a copy of the tree; each must fail the algorithm tests.

    .venv/bin/python .ci/mutants.py [pytest args ...]   (default: tests/test_module.py tests/test_losses.py -x -q)

Prints one line per mutant (killed / SURVIVED) and exits 1 if any survived. Not part of the suite: it runs the
given tests once per mutant (minutes).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MODULE, LOSSES = "wgan_lit/module.py", "wgan_lit/losses.py"
# (name, file, text, replacement): each text must occur exactly once.
MUTANTS = [
    ("critic arguments swapped", MODULE, "objective.critic(self.critic(real), self.critic(fake))",
     "(lambda r, f: objective.critic(f, r))(self.critic(real), self.critic(fake))"),
    ("generator loss sign flipped", MODULE, "g_loss = objective.generator(", "g_loss = -objective.generator("),
    ("Wasserstein loss sign flipped", LOSSES, "lambda fake: -fake.float().mean()", "lambda fake: fake.float().mean()"),
    ("clamp at twice the bound", MODULE, "clamp_(list(self.critic.parameters()), hp.clip_value)",
     "clamp_(list(self.critic.parameters()), 2 * hp.clip_value)"),
    ("clamp skipped", MODULE, "clamp_(list(self.critic.parameters()), hp.clip_value)", "pass"),
    ("clamp of the upper bound only", MODULE, "torch._foreach_clamp_min_(params, -clip_value)", "pass"),
    ("one critic step too many", MODULE, "if self.critic_step_in_iter < self.critic_iters(self.gen_step):",
     "if self.critic_step_in_iter <= self.critic_iters(self.gen_step):"),
    ("one critic step too few", MODULE, "if self.critic_step_in_iter < self.critic_iters(self.gen_step):",
     "if self.critic_step_in_iter < self.critic_iters(self.gen_step) - 1:"),
    ("critic never stepped", MODULE, "opt_d.step()", "pass"),
    ("generator never stepped", MODULE, "opt_g.step()", "pass"),
    ("averaged generator never updated", MODULE, "self.generator_ema.update_parameters(self.generator)", "pass"),
    ("averaged BatchNorm statistics never recomputed", MODULE,
     "update_bn(noise.split(self.EMA_BN_BATCH), self.generator_ema.module, device=self.device)", "pass"),
]


def main(pytest_args: list[str]) -> int:
    args = pytest_args or ["tests/test_module.py", "tests/test_losses.py", "-x", "-q", "-p", "no:cacheprovider"]
    survived = 0
    with tempfile.TemporaryDirectory() as tmp:
        for name, rel, text, replacement in MUTANTS:
            copy = Path(tmp) / "tree"
            shutil.rmtree(copy, ignore_errors=True)
            shutil.copytree(REPO, copy, ignore=shutil.ignore_patterns(".git", ".venv", "outputs", "__pycache__"))
            source = (copy / rel).read_text()
            assert source.count(text) == 1, f"{name}: {text!r} occurs {source.count(text)} times in {rel}"
            (copy / rel).write_text(source.replace(text, replacement))
            proc = subprocess.run([sys.executable, "-m", "pytest", *args], cwd=copy, capture_output=True,
                                  text=True)
            killed = proc.returncode != 0
            survived += not killed
            failed = [line.split(" - ")[0] for line in proc.stdout.splitlines() if line.startswith("FAILED")]
            print(f"{'killed  ' if killed else 'SURVIVED'} {name}: {', '.join(failed)[:150]}", flush=True)
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
