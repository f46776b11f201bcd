"""classifier.py: the feature classifier of the metrics, its cache and its command."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO, assert_one_error, call, tiny_classifier
from wgan_lit import classifier as clf


def test_classifier_round_trip_and_refusals(tmp_path):
    model = tiny_classifier()
    path = clf.save(model, tmp_path / "c.pt", test_accuracy=0.93)
    loaded = clf.load(path)
    x = torch.rand(3, 1, 28, 28) * 2 - 1
    assert torch.equal(loaded.features(x), model.features(x)) and loaded.test_accuracy == 0.93
    assert loaded.features(torch.rand(3, 1, 64, 64)).shape == (3, 8)  # other sizes are resized to 28
    with pytest.raises(
        clf.ClassifierError, match=r"test accuracy 0.500 is below 0.90.*python -m wgan_lit.classifier"
    ):
        clf.load(clf.save(model, tmp_path / "bad.pt", test_accuracy=0.5))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(clf.ClassifierError, match=r"junk.pt: not a wgan_lit classifier"):
        clf.load(tmp_path / "junk.pt")


CONCURRENT_BUILD = """
import sys, time
from wgan_lit import classifier as clf

def slow_build(out, data_root, log=True, **kwargs):
    with open(sys.argv[2], "a") as marker:
        marker.write("built\\n")
    time.sleep(1.0)
    clf.save(clf.FashionClassifier(width=4, num_features=8), out, test_accuracy=1.0)

clf.build = slow_build
print("loaded", clf.load_or_build(sys.argv[1]).test_accuracy)
"""


@pytest.mark.slow
def test_two_runs_that_need_the_classifier_at_once_build_it_once(tmp_path):
    target, marker = tmp_path / "cache" / "clf.pt", tmp_path / "built.txt"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-c", CONCURRENT_BUILD, str(target), str(marker)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert all("loaded 1.0" in out for out, _ in outs)
    assert marker.read_text() == "built\n"  # the second waited for the first, then read its file


def test_the_command_shares_the_grammar_of_the_others(capsys):
    code, out, _ = call(clf.main, ["--help"], capsys)
    assert code == 0 and "  epochs=4" in out and "  out=" in out
    assert_one_error(*call(clf.main, ["epochs=0"], capsys), "epochs=0: expected >= 1")
    assert_one_error(*call(clf.main, ["--epochs", "2"], capsys), "expected key=value")
