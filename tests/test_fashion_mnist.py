"""Fashion-MNIST's IDX files: reading them with checks that name the bad file, finding them, loading them."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

import wgan_lit.fashion_mnist as fmnist_mod
from tests.conftest import idx_bytes, write_fake_fashion_mnist
from wgan_lit.config import DataError
from wgan_lit.fashion_mnist import SPLIT_PREFIX, load_fashion_mnist, locate_fashion_mnist, read_idx, search_dirs

SYSTEM = Path("/usr/share/datasets/fashion-mnist")


# Also in tests/test_data.py: a candidate for tests/conftest.py.

def load(root: Path, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    return load_fashion_mnist(*locate_fashion_mnist(root, split))


# ----------------------------------------------------------------------------------------------- reading


@pytest.mark.parametrize("gz", [True, False])
def test_reads_generated_idx_files_gzipped_or_raw(tmp_path, gz):
    root = write_fake_fashion_mnist(tmp_path, n_train=100, n_test=20, gz=gz)
    images, labels = load(root)
    assert images.shape == (100, 1, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (100,) and labels.dtype == torch.int64 and 0 <= labels.min() <= labels.max() <= 9
    assert images.min() == 0 and images.max() == 255  # the generated blobs use the full range

pytestmark = pytest.mark.usefixtures("no_system_copy")


def test_gzipped_and_raw_files_hold_the_same_data(tmp_path):
    gz = write_fake_fashion_mnist(tmp_path / "gz", n_train=30, n_test=10, gz=True)
    raw = write_fake_fashion_mnist(tmp_path / "raw", n_train=30, n_test=10, gz=False)
    for split in SPLIT_PREFIX:
        (a_images, a_labels), (b_images, b_labels) = load(gz, split), load(raw, split)
        assert torch.equal(a_images, b_images) and torch.equal(a_labels, b_labels)


def test_read_idx_round_trips_an_array(tmp_path):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "x-idx3-ubyte").write_bytes(idx_bytes(array))
    out = read_idx(tmp_path / "x-idx3-ubyte", 3)
    assert out.dtype == np.uint8 and np.array_equal(out, array)


def test_loaded_images_are_writable_copies(tmp_path):
    """np.frombuffer gives a read-only array; torch warns on (and cannot write into) a tensor over it."""
    images, _ = load(write_fake_fashion_mnist(tmp_path, n_train=10, n_test=5))
    images[0, 0, 0, 0] = 7  # no error: the tensor owns its memory
    assert images[0, 0, 0, 0] == 7


def test_truncated_file_names_the_file(tmp_path):
    root = write_fake_fashion_mnist(tmp_path, n_train=50, gz=False)
    f = root / "train-images-idx3-ubyte"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte: header says shape \(50, 28, 28\).*truncated"):
        load(root)


def test_a_file_shorter_than_its_header_names_the_file(tmp_path):
    (tmp_path / "short-idx3-ubyte").write_bytes(bytes([0, 0, 8, 3, 0, 0]))
    with pytest.raises(DataError, match=r"short-idx3-ubyte: only 6 bytes, too short for an IDX header"):
        read_idx(tmp_path / "short-idx3-ubyte", 3)


def test_truncated_gzip_names_the_file(tmp_path):
    root = write_fake_fashion_mnist(tmp_path, n_train=50)
    f = root / "train-images-idx3-ubyte.gz"
    f.write_bytes(f.read_bytes()[:-20])
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte.gz: cannot be decompressed"):
        load(root)


def test_not_gzip_names_the_file(tmp_path):
    root = write_fake_fashion_mnist(tmp_path, n_train=50)
    (root / "train-images-idx3-ubyte.gz").write_bytes(b"this is not gzip data at all")
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte.gz: cannot be decompressed"):
        load(root)


def test_wrong_magic_names_the_file(tmp_path):
    root = write_fake_fashion_mnist(tmp_path, n_train=50)
    labels = np.zeros(50, dtype=np.uint8)  # a labels file where the images belong
    (root / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(labels)))
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte.gz: wrong magic number 00000801"):
        load(root)


def test_mismatched_counts_are_reported(tmp_path):
    root = write_fake_fashion_mnist(tmp_path, n_train=50)
    (root / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.zeros(49, np.uint8))))
    with pytest.raises(DataError, match="50 images but .* 49 labels"):
        load(root)


# ----------------------------------------------------------------------------------------------- locating


def test_torchvision_layout_under_root_and_test_split(tmp_path):
    write_fake_fashion_mnist(tmp_path / "FashionMNIST" / "raw", n_train=40, n_test=30)
    images, labels = locate_fashion_mnist(tmp_path, "test")
    assert images.parent == tmp_path / "FashionMNIST" / "raw" and images.name.startswith("t10k-images")
    assert read_idx(labels, 1).shape == (30,)


def test_search_order_is_root_then_torchvision_layout_then_the_system_copy(tmp_path, monkeypatch):
    monkeypatch.setattr(fmnist_mod, "SYSTEM_DIRS", [tmp_path / "system"])
    assert search_dirs(tmp_path / "r") == [tmp_path / "r", tmp_path / "r" / "FashionMNIST" / "raw",
                                           tmp_path / "system"]
    write_fake_fashion_mnist(tmp_path / "system", n_train=12, n_test=4)
    assert locate_fashion_mnist(tmp_path / "r")[0].parent == tmp_path / "system"  # the fallback
    write_fake_fashion_mnist(tmp_path / "r" / "FashionMNIST" / "raw", n_train=11, n_test=4)
    assert locate_fashion_mnist(tmp_path / "r")[0].parent == tmp_path / "r" / "FashionMNIST" / "raw"
    write_fake_fashion_mnist(tmp_path / "r", n_train=10, n_test=4, gz=False)
    images, labels = locate_fashion_mnist(tmp_path / "r")
    assert images == tmp_path / "r" / "train-images-idx3-ubyte"  # root itself wins
    assert load_fashion_mnist(images, labels)[0].shape[0] == 10


def test_an_unknown_split_is_an_error():
    with pytest.raises(DataError, match=r"data.split='valid': expected one of train, test"):
        locate_fashion_mnist("anywhere", "valid")


def test_missing_data_lists_the_paths_tried_and_three_ways_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setattr(fmnist_mod, "SYSTEM_DIRS", [tmp_path / "system"])
    with pytest.raises(DataError) as err:
        locate_fashion_mnist(tmp_path / "nowhere")
    msg = str(err.value)
    for expected in ("nowhere", "nowhere/FashionMNIST/raw", "system", "data.download=true",
                     "apt-get install dataset-fashion-mnist", "data.root="):
        assert expected in msg


def test_a_failed_download_gives_its_cause_and_does_not_advise_the_download(tmp_path, monkeypatch):
    import torchvision.datasets

    def offline(*args, **kwargs):
        raise ConnectionError("no network here")

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", offline)
    with pytest.raises(DataError) as err:
        locate_fashion_mnist(tmp_path, download=True)
    msg = str(err.value)
    assert "The download failed: ConnectionError: no network here" in msg
    assert "data.download=true" not in msg  # it was given: adding it is no way forward
    assert "apt-get install dataset-fashion-mnist" in msg and "data.root=FOLDER" in msg  # the other ways remain
    with pytest.raises(DataError) as err:  # control: without the download, it is the first way to get it
        locate_fashion_mnist(tmp_path, download=False)
    assert "1. add data.download=true" in str(err.value) and "download failed" not in str(err.value)


def test_download_is_not_attempted_when_the_files_are_there(tmp_path, monkeypatch):
    import torchvision.datasets

    def never(*args, **kwargs):
        raise AssertionError("downloaded although the files are on disk")

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", never)
    root = write_fake_fashion_mnist(tmp_path, n_train=10, n_test=5)
    assert locate_fashion_mnist(root, download=True)[0].parent == root


# ----------------------------------------------------------------------------------------------- the real data


@pytest.mark.real_data
@pytest.mark.skipif(not SYSTEM.is_dir(), reason="real Fashion-MNIST absent: apt-get install dataset-fashion-mnist")
@pytest.mark.parametrize("split,n", [("train", 60000), ("test", 10000)])
def test_real_fashion_mnist(tmp_path, split, n):
    images, labels = load(tmp_path, split)  # empty root: falls back to the system copy
    assert images.shape == (n, 1, 28, 28)
    mean = images.float().mean().item()
    assert 70 < mean < 75  # Fashion-MNIST's known pixel mean is about 72.9 (train) / 73.1 (test)
    assert images.max() == 255 and images.min() == 0
    assert torch.equal(torch.bincount(labels), torch.full((10,), n // 10))  # ten balanced classes
