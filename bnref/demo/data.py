"""The demo's data, generated or shipped offline, and the order every framework sees it in.

- MNIST-1D (Greydanus, 2020): 40-sample 1-D signals of 10 digit templates, shifted, scaled,
  sheared and noised by ``mnist1d.data.make_dataset``'s procedural generator (seeded; nothing
  is downloaded). The generator standardises the whole set (mean 0, std 1).
- scikit-learn's 8x8 digits (1797 images shipped with the package), scaled to [0, 1] and split
  80/20 with a fixed permutation.

Batches are index arrays drawn once by numpy from the seed: every framework gets the same rows
in the same order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Dataset", "batch_order", "digits", "mnist1d"]


@dataclass(frozen=True)
class Dataset:
    name: str
    x_train: np.ndarray  # float64; (N, 40) or (N, 1, 8, 8) (channels on axis 1)
    y_train: np.ndarray  # int64 labels 0..9
    x_test: np.ndarray
    y_test: np.ndarray


def mnist1d(samples: int = 4000, seed: int = 42) -> Dataset:
    """MNIST-1D from its procedural generator: ``samples`` signals, 80% for training."""
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples, args.seed = samples, seed
    data = make_dataset(args)
    return Dataset("mnist1d", np.asarray(data["x"], np.float64), np.asarray(data["y"], np.int64),
                   np.asarray(data["x_test"], np.float64), np.asarray(data["y_test"], np.int64))


def digits(seed: int = 0) -> Dataset:
    """scikit-learn's 8x8 digits as (N, 1, 8, 8) images in [0, 1]."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = data.images.astype(np.float64)[:, None] / 16.0
    order = np.random.default_rng(seed).permutation(len(images))
    cut = int(0.8 * len(images))
    train, test = order[:cut], order[cut:]
    return Dataset("digits", images[train], data.target[train].astype(np.int64), images[test],
                   data.target[test].astype(np.int64))


def batch_order(train_size: int, batch: int, steps: int, seed: int) -> list[np.ndarray]:
    """``steps`` batches of ``batch`` row indices: epochs of fresh permutations (numpy's
    generator, seeded), the last partial batch of each epoch dropped."""
    rng = np.random.default_rng(seed)
    batches: list[np.ndarray] = []
    while len(batches) < steps:
        order = rng.permutation(train_size)
        batches += [order[i:i + batch] for i in range(0, train_size - batch + 1, batch)]
    return batches[:steps]
