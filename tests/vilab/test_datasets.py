"""Data sets: IDX reading, splits, fixed and dynamic binarization, helpful errors."""

import gzip
import math
import os
import struct

import numpy as np
import pytest
import torch

from vilab.datasets import (
    FASHION_MNIST_DIR,
    DynamicBinarization,
    binarize,
    load_dataset,
    load_digits,
    load_idx_directory,
    make_loader,
    read_idx,
)


def _write_idx(path, array):
    codes = {np.uint8: 0x08}
    header = bytes([0, 0, codes[array.dtype.type], array.ndim]) + struct.pack(">" + "I" * array.ndim, *array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + array.tobytes())


@pytest.fixture
def idx_dir(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 60), ("t10k", 20)):
        _write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        _write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", rng.integers(0, 10, (n,), dtype=np.uint8))
    return str(tmp_path)


def test_read_idx_round_trips_an_array(tmp_path):
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    _write_idx(tmp_path / "a.gz", array)
    np.testing.assert_array_equal(read_idx(str(tmp_path / "a.gz")), array)


def test_read_idx_reports_a_truncated_file(tmp_path):
    path = tmp_path / "a.gz"
    _write_idx(path, np.zeros((5, 4, 4), dtype=np.uint8))
    data = gzip.open(path).read()[:-7]
    with gzip.open(path, "wb") as handle:
        handle.write(data)
    with pytest.raises(ValueError, match="truncated"):
        read_idx(str(path))


def test_idx_directory_splits_and_binarizes_validation_and_test_once(idx_dir):
    data = load_idx_directory(idx_dir, validation_size=10, seed=3)
    assert data.train.shape == (50, 1, 28, 28) and data.validation.shape == (10, 1, 28, 28)
    assert data.test.shape == (20, 1, 28, 28) and data.likelihood == "bernoulli"
    assert set(data.validation.unique().tolist()) <= {0.0, 1.0}
    assert set(data.test.unique().tolist()) <= {0.0, 1.0}
    assert 0 <= data.train.min() and data.train.max() <= 1
    again = load_idx_directory(idx_dir, validation_size=10, seed=3)
    assert torch.equal(again.test, data.test) and torch.equal(again.validation, data.validation)


def test_a_smaller_validation_split_keeps_its_first_images(idx_dir):
    # A smaller validation split is a prefix of the larger one, so runs that validate on the
    # first N of the default split and runs that train on the rest see the same validation images.
    default, smaller = (load_idx_directory(idx_dir, validation_size=n, seed=3) for n in (10, 4))
    assert torch.equal(smaller.validation, default.validation[:4])
    assert len(smaller.train) == 56 and torch.equal(smaller.test, default.test)


@pytest.mark.parametrize("size", [0, -1, "all"])
def test_a_validation_size_that_leaves_no_images_is_refused(idx_dir, size):
    for load, available in (
        (lambda n: load_idx_directory(idx_dir, validation_size=n), 60),
        (lambda n: load_dataset("digits", validation_size=n), 1500),
    ):
        n = available if size == "all" else size
        with pytest.raises(ValueError, match=f"validation_size: expected 0 < validation_size < {available}.*got {n}"):
            load(n)


def test_missing_dataset_error_gives_the_install_command(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        load_dataset("fashion-mnist", data_dir=str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="--data-dir"):
        load_dataset("mnist", data_dir=str(tmp_path))


def test_unknown_dataset_and_missing_directory_are_value_errors():
    with pytest.raises(ValueError, match="expected one of .*got 'cifar'"):
        load_dataset("cifar")
    with pytest.raises(ValueError, match="data_dir"):
        load_dataset("kmnist")


def test_digits_keep_seventeen_levels():
    data = load_digits()
    assert data.num_levels == 17 and data.image_shape == (1, 8, 8)
    assert (len(data.train), len(data.validation), len(data.test)) == (1300, 200, 297)
    assert data.train.max() == 16 and torch.equal(data.train, data.train.round())


def test_dynamic_binarization_has_the_grey_level_as_mean():
    grey = torch.full((4000, 1, 2, 2), 0.3)
    x, _ = DynamicBinarization()([(image, torch.tensor(0)) for image in grey])
    assert set(x.unique().tolist()) <= {0.0, 1.0}
    # Mean of 16000 Bernoulli(0.3) bits; 4.5 standard errors is a 1e-5 failure budget.
    assert abs(x.mean().item() - 0.3) < 4.5 * math.sqrt(0.3 * 0.7 / x.numel())


def test_dynamic_binarization_draws_fresh_bits_each_epoch():
    loader = make_loader(torch.full((64, 1, 4, 4), 0.5), batch_size=64, dynamic_binarization=True)
    first, second = next(iter(loader))[0], next(iter(loader))[0]
    assert not torch.equal(first, second)


def test_binarize_is_reproducible():
    grey = torch.rand(10, 1, 4, 4)
    assert torch.equal(binarize(grey, seed=1), binarize(grey, seed=1))


@pytest.mark.skipif(not os.path.isdir(FASHION_MNIST_DIR), reason="dataset-fashion-mnist not installed")
def test_fashion_mnist_loads_from_the_debian_package():
    data = load_dataset("fashion-mnist")
    assert data.train.shape == (50000, 1, 28, 28) and data.test.shape == (10000, 1, 28, 28)
    assert data.train_labels.max() == 9
