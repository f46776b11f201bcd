"""Fashion-MNIST's IDX files: read with checks that name the bad file, found in order, downloaded only when asked."""

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.datasets

import wgan_lit.fashion_mnist as fmnist_mod
from tests.conftest import idx_bytes, write_fake_fashion_mnist
from wgan_lit.config import DataError
from wgan_lit.fashion_mnist import SPLIT_PREFIX, load_fashion_mnist, locate_fashion_mnist, read_idx

pytestmark = pytest.mark.usefixtures("no_system_copy")


def load(root: Path, split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    return load_fashion_mnist(*locate_fashion_mnist(root, split))


def test_gzipped_and_raw_files_read_alike_as_writable_uint8_tensors(tmp_path):
    gz = write_fake_fashion_mnist(tmp_path / "gz", n_train=30, n_test=10, gz=True)
    raw = write_fake_fashion_mnist(tmp_path / "raw", n_train=30, n_test=10, gz=False)
    for split, n in (("train", 30), ("test", 10)):
        (images, labels), (raw_images, raw_labels) = load(gz, split), load(raw, split)
        assert images.shape == (n, 1, 28, 28) and images.dtype == torch.uint8
        assert labels.shape == (n,) and labels.dtype == torch.int64 and 0 <= labels.min() <= labels.max() <= 9
        assert images.min() == 0 and images.max() == 255  # the generated blobs use the full range
        assert torch.equal(images, raw_images) and torch.equal(labels, raw_labels)
    images[0, 0, 0, 0] = 7  # np.frombuffer is read-only: the tensor must own a copy
    assert images[0, 0, 0, 0] == 7
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "x-idx3-ubyte").write_bytes(idx_bytes(array))
    assert np.array_equal(read_idx(tmp_path / "x-idx3-ubyte", 3), array)


@pytest.mark.parametrize("name,damage,message", [  # what is done to a file of 50 good training images -> the error
    ("images", lambda b: gzip.compress(gzip.decompress(b)[:-100]), r"header says shape \(50, 28, 28\).*truncated"),
    ("images", lambda b: gzip.compress(bytes([0, 0, 8, 3, 0, 0])), r"only 6 bytes, too short for an IDX header"),
    ("images", lambda b: b[:-20], r"cannot be decompressed"),
    ("images", lambda b: b"not gzip data at all", r"cannot be decompressed"),
    ("images", lambda b: gzip.compress(idx_bytes(np.zeros(50, np.uint8))), r"wrong magic number 00000801"),
    ("labels", lambda b: gzip.compress(idx_bytes(np.zeros(49, np.uint8))), r"holds 50 images but .*labels.* holds 49"),
])
def test_a_bad_file_is_one_line_naming_it(tmp_path, name, damage, message):
    path = write_fake_fashion_mnist(tmp_path, n_train=50) / f"train-{name}-idx{3 if name == 'images' else 1}-ubyte.gz"
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(DataError, match=message) as err:
        load(tmp_path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_search_order_is_root_then_torchvision_layout_then_the_system_copy(tmp_path, monkeypatch):
    monkeypatch.setattr(fmnist_mod, "SYSTEM_DIRS", [tmp_path / "system"])
    write_fake_fashion_mnist(tmp_path / "system", n_train=12, n_test=4)
    assert locate_fashion_mnist(tmp_path / "r")[0].parent == tmp_path / "system"  # the fallback
    write_fake_fashion_mnist(tmp_path / "r" / "FashionMNIST" / "raw", n_train=11, n_test=30)
    images, labels = locate_fashion_mnist(tmp_path / "r", "test")
    assert images == tmp_path / "r" / "FashionMNIST" / "raw" / f"{SPLIT_PREFIX['test']}-images-idx3-ubyte.gz"
    assert read_idx(labels, 1).shape == (30,)
    write_fake_fashion_mnist(tmp_path / "r", n_train=10, n_test=4, gz=False)
    images, labels = locate_fashion_mnist(tmp_path / "r")
    assert images == tmp_path / "r" / "train-images-idx3-ubyte"  # root itself wins
    assert load_fashion_mnist(images, labels)[0].shape[0] == 10


@pytest.mark.parametrize("download", [False, True])
def test_missing_data_lists_the_paths_tried_and_the_ways_to_get_it(tmp_path, monkeypatch, download):
    calls = []

    def offline(*args, **kwargs):
        calls.append(args)
        raise ConnectionError("no network here")

    monkeypatch.setattr(fmnist_mod, "SYSTEM_DIRS", [tmp_path / "system"])
    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", offline)
    with pytest.raises(DataError) as err:
        locate_fashion_mnist(tmp_path / "nowhere", download=download)
    msg = str(err.value)
    for expected in ("Fashion-MNIST not found", "nowhere\n", "nowhere/FashionMNIST/raw", "system",
                     "apt-get install dataset-fashion-mnist", "data.root=FOLDER"):
        assert expected in msg
    # With the download asked for, its cause is told and adding data.download=true is no longer advised.
    assert ("The download failed: ConnectionError: no network here" in msg) == download
    assert ("1. add data.download=true" in msg) == (not download)
    root = write_fake_fashion_mnist(tmp_path / "there", n_train=10, n_test=5)
    assert locate_fashion_mnist(root, download=download)[0].parent == root
    assert len(calls) == download  # the files are there: no download is attempted


@pytest.mark.real_data
@pytest.mark.skipif(not fmnist_mod.SYSTEM_DIRS[0].is_dir(), reason="apt-get install dataset-fashion-mnist")
@pytest.mark.parametrize("split,n", [("train", 60000), ("test", 10000)])
def test_real_fashion_mnist(tmp_path, split, n):
    images, labels = load(tmp_path, split)  # empty root: falls back to the system copy
    assert images.shape == (n, 1, 28, 28) and images.max() == 255 and images.min() == 0
    assert 70 < images.float().mean().item() < 75  # Fashion-MNIST's pixel mean: about 72.9 (train), 73.1 (test)
    assert torch.equal(torch.bincount(labels), torch.full((10,), n // 10))  # ten balanced classes
