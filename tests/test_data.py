from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

import wgan_lit.data as data_mod
from tests.conftest import idx_bytes, write_fake_fashion_mnist
from wgan_lit.data import DataError, FashionMNISTDataModule, locate_fashion_mnist, read_idx

SYSTEM = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(autouse=True)
def no_system_copy(monkeypatch, request):
    if "real_data" not in request.keywords:
        monkeypatch.setattr(data_mod, "SYSTEM_DIRS", [])


@pytest.mark.parametrize("gz", [True, False])
def test_reads_generated_idx_files_gzipped_or_raw(tmp_path, gz):
    root = write_fake_fashion_mnist(tmp_path, n_train=100, n_test=20, gz=gz)
    dm = FashionMNISTDataModule(root=str(root), batch_size=32)
    dm.prepare_data()
    dm.setup("fit")
    assert dm.images.shape == (100, 1, 28, 28) and dm.images.dtype == torch.uint8
    batches = list(dm.train_dataloader())
    assert len(batches) == 3  # drop_last: every critic step sees a full batch
    assert all(b.shape == (32, 1, 28, 28) and b.dtype == torch.uint8 for b in batches)
    x = dm.on_after_batch_transfer(batches[0], 0)
    assert x.dtype == torch.float32 and x.min() >= -1 and x.max() <= 1
    assert x.min() == -1 and x.max() > 0.9  # the full range is used


def test_torchvision_layout_under_root_and_test_split(tmp_path):
    write_fake_fashion_mnist(tmp_path / "FashionMNIST" / "raw", n_train=40, n_test=30)
    images, labels = locate_fashion_mnist(tmp_path, "test")
    assert images.parent == tmp_path / "FashionMNIST" / "raw" and images.name.startswith("t10k-images")
    assert read_idx(labels, 1).shape == (30,)


def test_resizes_the_whole_tensor_once(fake_fmnist):
    dm = FashionMNISTDataModule(root=str(fake_fmnist), batch_size=8, image_size=32)
    dm.setup("fit")
    assert dm.images.shape[-2:] == (32, 32) and dm.images.dtype == torch.uint8


def test_truncated_file_names_the_file(tmp_path):
    root = write_fake_fashion_mnist(tmp_path, n_train=50, gz=False)
    f = root / "train-images-idx3-ubyte"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte: header says shape \(50, 28, 28\).*truncated"):
        FashionMNISTDataModule(root=str(root)).setup("fit")


def test_truncated_gzip_names_the_file(tmp_path):
    root = write_fake_fashion_mnist(tmp_path, n_train=50)
    f = root / "train-images-idx3-ubyte.gz"
    f.write_bytes(f.read_bytes()[:-20])
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte.gz: cannot be decompressed"):
        FashionMNISTDataModule(root=str(root)).setup("fit")


def test_not_gzip_names_the_file(tmp_path):
    root = write_fake_fashion_mnist(tmp_path, n_train=50)
    (root / "train-images-idx3-ubyte.gz").write_bytes(b"this is not gzip data at all")
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte.gz: cannot be decompressed"):
        FashionMNISTDataModule(root=str(root)).setup("fit")


def test_wrong_magic_names_the_file(tmp_path):
    root = write_fake_fashion_mnist(tmp_path, n_train=50)
    labels = np.zeros(50, dtype=np.uint8)  # a labels file where the images belong
    (root / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(labels)))
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte.gz: wrong magic number 00000801"):
        FashionMNISTDataModule(root=str(root)).setup("fit")


def test_mismatched_counts_are_reported(tmp_path):
    root = write_fake_fashion_mnist(tmp_path, n_train=50)
    (root / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.zeros(49, np.uint8))))
    with pytest.raises(DataError, match="50 images but .* 49 labels"):
        FashionMNISTDataModule(root=str(root)).setup("fit")


def test_missing_data_lists_the_paths_tried_and_three_ways_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setattr(data_mod, "SYSTEM_DIRS", [tmp_path / "system"])
    with pytest.raises(DataError) as err:
        FashionMNISTDataModule(root=str(tmp_path / "nowhere")).prepare_data()
    msg = str(err.value)
    for expected in ("nowhere", "nowhere/FashionMNIST/raw", "system", "data.download=true",
                     "apt-get install dataset-fashion-mnist", "data.root="):
        assert expected in msg


def test_failed_download_is_reported_with_its_cause(tmp_path, monkeypatch):
    import torchvision.datasets

    def offline(*args, **kwargs):
        raise ConnectionError("no network here")

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", offline)
    with pytest.raises(DataError, match="download .* failed: ConnectionError: no network here"):
        locate_fashion_mnist(tmp_path, download=True)


def test_batch_larger_than_dataset_is_an_error(tmp_path):
    root = write_fake_fashion_mnist(tmp_path, n_train=10)
    with pytest.raises(DataError, match="data.batch_size=64 is larger than the dataset"):
        FashionMNISTDataModule(root=str(root)).train_dataloader()


@pytest.mark.real_data
@pytest.mark.skipif(not SYSTEM.is_dir(), reason="real Fashion-MNIST absent: apt-get install dataset-fashion-mnist")
@pytest.mark.parametrize("split,n", [("train", 60000), ("test", 10000)])
def test_real_fashion_mnist(tmp_path, split, n):
    dm = FashionMNISTDataModule(root=str(tmp_path), split=split)  # empty root: falls back to the system copy
    dm.setup("fit")
    assert dm.images.shape == (n, 1, 28, 28)
    mean = dm.images.float().mean().item()
    assert 70 < mean < 75  # Fashion-MNIST's known pixel mean is about 72.9 (train) / 73.1 (test)
    assert dm.images.max() == 255 and dm.images.min() == 0
