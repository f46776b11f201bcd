"""classifier.py: the feature classifier of the metrics, its cache and its command."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from tests.conftest import assert_one_error, call, tiny_classifier
from wgan_lit import classifier as clf


def test_classifier_round_trip_and_refusals(tmp_path):
    model = tiny_classifier()
    loaded = clf.load(clf.save(model, tmp_path / "c.pt", test_accuracy=0.93))
    x = torch.rand(3, 1, 28, 28) * 2 - 1
    assert torch.equal(loaded.features(x), model.features(x)) and loaded.test_accuracy == 0.93
    assert loaded.features(torch.rand(3, 1, 64, 64)).shape == (3, 8)  # other sizes are resized to 28
    with pytest.raises(clf.ClassifierError, match=r"test accuracy 0.500 is below 0.90.*python -m wgan_lit.classifier"):
        clf.load(clf.save(model, tmp_path / "bad.pt", test_accuracy=0.5))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(clf.ClassifierError, match=r"junk.pt: not a wgan_lit classifier"):
        clf.load(tmp_path / "junk.pt")


def test_two_runs_that_need_the_classifier_at_once_build_it_once(tmp_path, monkeypatch):
    built = []

    def slow_build(out, data_root, log=True):
        built.append(out)
        time.sleep(0.5)  # the other caller arrives meanwhile: it must wait on the file lock, then read the file
        clf.save(clf.FashionClassifier(width=4, num_features=8), out, test_accuracy=1.0)

    monkeypatch.setattr(clf, "build", slow_build)
    # Each thread opens the lock file itself, as a process would: an OS lock, which two descriptors contend for.
    with ThreadPoolExecutor(2) as pool:
        loaded = list(pool.map(lambda _: clf.load_or_build(tmp_path / "cache" / "c.pt"), range(2)))
    assert len(built) == 1 and [m.test_accuracy for m in loaded] == [1.0, 1.0]


def test_the_command_shares_the_grammar_of_the_others(capsys):
    code, out, _ = call(clf.main, ["--help"], capsys)
    assert code == 0 and "  epochs=4" in out and "  out=" in out
    assert_one_error(*call(clf.main, ["epochs=0"], capsys), "epochs=0: expected an integer >= 1")
    assert_one_error(*call(clf.main, ["--epochs", "2"], capsys), "expected key=value")
