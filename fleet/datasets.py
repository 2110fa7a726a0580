"""Data sets for simulations: real data no one here wrote, bundled with a package.

``digits`` is scikit-learn's copy of the UCI handwritten digits (8x8 images,
1,797 samples, 10 classes), standing in for MNIST. The held-out test set is a
stratified 397 samples, fixed by the seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

TEST_SIZE = 397


@dataclass(frozen=True)
class Split:
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    classes: int


def digits(seed: int = 0) -> Split:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    y = y.astype(np.int32)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=TEST_SIZE, stratify=y, random_state=seed
    )
    return Split(x_tr, y_tr, x_te, y_te, 10)
