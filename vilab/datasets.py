r"""Image data sets for the VAE: Fashion-MNIST, any MNIST-format IDX directory, sklearn digits.

Every loader returns an :class:`ImageData` record with ``train``/``validation``/``test`` splits
of shape ``(N, C, H, W)``:

* binary data sets (``"fashion-mnist"``, ``"mnist"``, ``"kmnist"``, ``"idx"``) keep the training
  images as grey levels in :math:`[0, 1]` and binarize them afresh each time a batch is drawn
  (*dynamic binarization*, :math:`x \sim \mathrm{Bernoulli}(\text{grey})`), while validation and
  test images are binarized once with a fixed seed so every model is scored on the same bits;
* ``"digits"`` (scikit-learn's 8x8 digits) keeps its 17 integer grey levels ``0..16`` for a
  categorical decoder.

The validation split is carved from the training set with a seeded permutation.
"""

from __future__ import annotations

import gzip
import os
import struct
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

__all__ = [
    "ImageData",
    "DATASETS",
    "FASHION_MNIST_DIR",
    "read_idx",
    "load_dataset",
    "load_idx_directory",
    "load_digits",
    "binarize",
    "DynamicBinarization",
    "make_loader",
]

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
DATASETS = ("fashion-mnist", "mnist", "kmnist", "idx", "digits")
_INSTALL_HINT = {
    "fashion-mnist": "install it with `sudo apt-get install dataset-fashion-mnist` "
    f"(files go to {FASHION_MNIST_DIR}) or pass --data-dir DIR holding the four IDX files",
    "mnist": "download the four MNIST IDX files (train-images-idx3-ubyte.gz, ...) into a "
    "directory and pass it with --data-dir DIR (or `pip install vilab[vision]` and use "
    "torchvision.datasets.MNIST(DIR, download=True))",
    "kmnist": "download the four KMNIST IDX files into a directory and pass --data-dir DIR "
    "(or use torchvision.datasets.KMNIST(DIR, download=True) with the `vision` extra)",
    "idx": "pass --data-dir DIR holding train-/t10k- images and labels in IDX format",
}
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


@dataclass
class ImageData:
    """Train/validation/test images and labels of one data set.

    Attributes:
        name: Data-set name.
        train: ``(N_train, C, H, W)`` float; grey levels in ``[0, 1]`` (binary data sets, to be
            binarized dynamically) or integer levels ``0..num_levels-1`` (categorical).
        train_labels: ``(N_train,)`` long.
        validation: ``(N_val, C, H, W)`` float; already binarized for binary data sets.
        validation_labels: ``(N_val,)`` long.
        test: ``(N_test, C, H, W)`` float; already binarized for binary data sets.
        test_labels: ``(N_test,)`` long.
        num_levels: 2 for binary images, 17 for digits.
    """

    name: str
    train: torch.Tensor
    train_labels: torch.Tensor
    validation: torch.Tensor
    validation_labels: torch.Tensor
    test: torch.Tensor
    test_labels: torch.Tensor
    num_levels: int

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of every image."""
        return tuple(self.train.shape[1:])  # type: ignore[return-value]

    @property
    def likelihood(self) -> str:
        """``"bernoulli"`` for binary data, ``"categorical"`` for multi-level data."""
        return "bernoulli" if self.num_levels == 2 else "categorical"

    def subset(
        self, *, num_train: Optional[int] = None, num_validation: Optional[int] = None, num_test: Optional[int] = None
    ) -> "ImageData":
        """The first ``num_*`` examples of each split (for quick runs and tests)."""

        def cut(x, n):
            return x if n is None else x[:n]

        return ImageData(
            self.name,
            cut(self.train, num_train),
            cut(self.train_labels, num_train),
            cut(self.validation, num_validation),
            cut(self.validation_labels, num_validation),
            cut(self.test, num_test),
            cut(self.test_labels, num_test),
            self.num_levels,
        )


def read_idx(path: str) -> np.ndarray:
    """Read one IDX file (optionally gzipped) into a NumPy array.

    Raises:
        ValueError: if the file is not in IDX format or is truncated.
    """
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as handle:
        data = handle.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"path: expected an IDX file (magic 0x0000TTDD); got {path!r}")
    ndim = data[3]
    shape = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    count = int(np.prod(shape))
    payload = data[4 + 4 * ndim :]
    if len(payload) != count * dtype.itemsize:
        raise ValueError(
            f"path: IDX file {path!r} holds {len(payload)} bytes of data; "
            f"expected {count * dtype.itemsize} for shape {shape} (truncated?)"
        )
    return np.frombuffer(payload, dtype=dtype).reshape(shape)


def _find_idx(directory: str, prefix: str, kind: str) -> str:
    for name in (f"{prefix}-{kind}", f"{prefix}-{kind}".replace("-idx", ".idx")):
        for suffix in (".gz", ""):
            path = os.path.join(directory, name + suffix)
            if os.path.exists(path):
                return path
    raise FileNotFoundError(f"{prefix}-{kind}[.gz] not found in {directory!r}")


def binarize(images: torch.Tensor, *, seed: int) -> torch.Tensor:
    r"""Draw :math:`x \sim \mathrm{Bernoulli}(\text{images})` once with a fixed ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    return torch.bernoulli(images, generator=generator)


def _check_validation_size(validation_size: int, available: int, note: str = "") -> None:
    if not 0 < validation_size < available:
        raise ValueError(f"validation_size: expected 0 < validation_size < {available}{note}; got {validation_size}")


def _split(images, labels, *, validation_size, seed):
    _check_validation_size(validation_size, len(images))
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    train, val = order[validation_size:], order[:validation_size]
    return images[train], labels[train], images[val], labels[val]


def load_idx_directory(directory: str, *, name: str = "idx", validation_size: int = 10000, seed: int = 0) -> ImageData:
    """Load a directory of MNIST-format IDX files (MNIST, Fashion-MNIST, KMNIST...).

    The directory must hold ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
    ``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte`` (each optionally ``.gz``).

    Args:
        directory: Path of the directory.
        name: Data-set name recorded in the result (selects the install hint on error).
        validation_size: Number of training images moved to the validation split.
        seed: Seed of the split and of the one-off binarization of validation and test.

    Raises:
        FileNotFoundError: if a file is missing; the message says how to install the data.
    """
    try:
        paths = {
            (split, kind): _find_idx(directory, split, kind)
            for split in ("train", "t10k")
            for kind in ("images-idx3-ubyte", "labels-idx1-ubyte")
        }
    except FileNotFoundError as error:
        hint = _INSTALL_HINT.get(name, _INSTALL_HINT["idx"])
        raise FileNotFoundError(f"data set {name!r}: {error}; {hint}") from None
    arrays = {key: read_idx(path) for key, path in paths.items()}
    train = torch.from_numpy(arrays["train", "images-idx3-ubyte"].astype(np.float32) / 255.0)
    test = torch.from_numpy(arrays["t10k", "images-idx3-ubyte"].astype(np.float32) / 255.0)
    train_labels = torch.from_numpy(arrays["train", "labels-idx1-ubyte"].astype(np.int64))
    test_labels = torch.from_numpy(arrays["t10k", "labels-idx1-ubyte"].astype(np.int64))
    train, test = train.unsqueeze(1), test.unsqueeze(1)
    train, train_labels, val, val_labels = _split(train, train_labels, validation_size=validation_size, seed=seed)
    return ImageData(
        name,
        train,
        train_labels,
        binarize(val, seed=seed + 1),
        val_labels,
        binarize(test, seed=seed + 2),
        test_labels,
        num_levels=2,
    )


def load_digits(*, validation_size: int = 200, test_size: int = 297, seed: int = 0) -> ImageData:
    """scikit-learn's 8x8 digits (1797 images, 17 grey levels) split train/validation/test.

    The split sizes follow common practice for this set: 1300/200/297.
    """
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    images = torch.from_numpy(bunch.images.astype(np.float32)).unsqueeze(1)
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
    test, rest = order[:test_size], order[test_size:]
    _check_validation_size(validation_size, len(rest), f" (the digits left after the {test_size} test images)")
    val, train = rest[:validation_size], rest[validation_size:]
    return ImageData(
        "digits", images[train], labels[train], images[val], labels[val], images[test], labels[test], num_levels=17
    )


def load_dataset(
    name: str, *, data_dir: Optional[str] = None, validation_size: Optional[int] = None, seed: int = 0
) -> ImageData:
    """Load a data set by name.

    Args:
        name: One of :data:`DATASETS`.
        data_dir: Directory of IDX files; required for ``"mnist"``, ``"kmnist"``, ``"idx"``,
            defaults to :data:`FASHION_MNIST_DIR` for ``"fashion-mnist"``, unused for digits.
        validation_size: Training images moved to validation (10000 for IDX sets, 200 digits).
        seed: Seed of the split and of the fixed binarization.

    Raises:
        ValueError: for an unknown name, a missing ``data_dir`` or a ``validation_size`` that
            leaves no training (or no validation) images.
        FileNotFoundError: when the files are absent; the message gives the install command.
    """
    if name not in DATASETS:
        raise ValueError(f"data: expected one of {', '.join(DATASETS)}; got {name!r}")
    # None keeps each loader's own default split.
    split = {} if validation_size is None else {"validation_size": validation_size}
    if name == "digits":
        return load_digits(seed=seed, **split)
    if data_dir is None:
        if name != "fashion-mnist":
            raise ValueError(f"data_dir: data set {name!r} needs a directory; {_INSTALL_HINT[name]}")
        data_dir = FASHION_MNIST_DIR
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(f"data set {name!r}: directory {data_dir!r} does not exist; {_INSTALL_HINT[name]}")
    return load_idx_directory(data_dir, name=name, seed=seed, **split)


class DynamicBinarization:
    r"""Collate function that binarizes grey images afresh for every batch.

    Draws :math:`x \sim \mathrm{Bernoulli}(\text{grey})` from the global torch generator, so the
    bits are reproducible under a fixed seed and a resumed run that restores the RNG state.
    """

    def __call__(self, batch: list[tuple[torch.Tensor, ...]]) -> list[torch.Tensor]:
        images = torch.stack([item[0] for item in batch])
        rest = [torch.stack([item[i] for item in batch]) for i in range(1, len(batch[0]))]
        return [torch.bernoulli(images), *rest]


def make_loader(
    images: torch.Tensor,
    labels: Optional[torch.Tensor] = None,
    *,
    batch_size: int = 128,
    shuffle: bool = False,
    dynamic_binarization: bool = False,
) -> DataLoader:
    """A ``DataLoader`` over ``(images, labels)`` yielding ``[x, y]`` lists.

    Args:
        images: ``(N, C, H, W)``.
        labels: ``(N,)`` or ``None`` (then a zero label is attached).
        batch_size: Batch size.
        shuffle: Shuffle every epoch (global torch RNG, so seeded runs repeat).
        dynamic_binarization: Binarize every batch afresh (training split of binary data).
    """
    if labels is None:
        labels = torch.zeros(len(images), dtype=torch.long)
    collate = DynamicBinarization() if dynamic_binarization else None
    return DataLoader(TensorDataset(images, labels), batch_size=batch_size, shuffle=shuffle, collate_fn=collate)
