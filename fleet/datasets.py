"""Data sets for simulations: real data no one here wrote, or the user's own.

``digits`` is scikit-learn's copy of the UCI handwritten digits (8x8 images,
1,797 samples, 10 classes), standing in for MNIST. Pixels are scaled by 1/16 to
[0, 1] (not z-scored). The held-out test set is a stratified 397 samples, fixed
by the seed.

``load_user_dataset`` reads a ``.npz`` (arrays ``x`` (samples, features) and
``y`` (samples,)) or a ``.csv`` (header row; one label column, every other
column a numeric feature), maps the labels to ``0..K-1`` and splits it.
``check_split`` checks a split against the model that will train on it
(:mod:`fedge.models.checks`: features per sample, classes, finiteness).

Errors::

    ValueError
    └── DatasetError    a user data set cannot be used; one line naming the file
"""

from __future__ import annotations

import csv
import math
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

TEST_SIZE = 397
#: Fewest samples a user data set may have (before the split).
MIN_SAMPLES = 10


class DatasetError(ValueError):
    """A user data set cannot be used. The message is one line and names the file."""


@dataclass(frozen=True)
class Split:
    """Train and test arrays; labels are ``0..classes-1``, named by ``labels``.

    ``labels[k]`` is the original label of class k (``"0".."9"`` for digits); left
    empty, it is filled with ``"0".."classes-1"``.
    """

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    classes: int
    labels: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.labels:
            object.__setattr__(self, "labels", tuple(str(k) for k in range(self.classes)))
        if len(self.labels) != self.classes:
            raise ValueError(f"{len(self.labels)} label names for {self.classes} classes")


def digits(seed: int = 0) -> Split:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)
    y = y.astype(np.int32)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=TEST_SIZE, stratify=y, random_state=seed
    )
    return Split(x_tr, y_tr, x_te, y_te, 10, tuple(str(k) for k in range(10)))


def load_user_dataset(
    path: Path,
    *,
    label_column: str | None = None,
    test_size: float = 0.2,
    seed: int = 0,
    normalise: bool = True,
) -> Split:
    """Read ``path`` (.npz or .csv), map labels to ``0..K-1`` and split train/test.

    - ``.npz``: arrays ``x`` (samples, features), numeric, and ``y`` (samples,) of
      any type (ints, strings, ...). ``label_column`` is ignored.
    - ``.csv``: UTF-8, header row required; ``label_column`` names the label
      column (required); every other column must be numeric.

    Labels are mapped to ``0..K-1`` in sorted order of the distinct values
    (text labels that are all numbers sort by value, so "10" follows "9"); the
    names are kept in ``Split.labels``. The split is stratified (scikit-learn's
    ``train_test_split``, ``random_state=seed``); when a class has fewer than 2
    samples, or the test or training part would have fewer samples than there
    are classes, it falls back to an unstratified split with a warning.

    ``normalise``: z-score every feature with the mean and standard deviation of
    the training part only (a constant feature gets std 1), applied to both
    parts, so nothing about the test part leaks into training. Arrays come back
    as float32 features and int32 labels.

    Every problem with the file raises DatasetError with one line naming it.
    """
    path = Path(path)
    if not 0.0 < test_size < 1.0:
        raise DatasetError(f"{path}: test_size must be between 0 and 1, got {test_size}")
    if not path.exists():
        raise DatasetError(f"{path}: no such file")
    if not path.is_file():
        raise DatasetError(f"{path}: not a file")
    suffix = path.suffix.lower()
    if suffix not in (".npz", ".csv"):
        raise DatasetError(f"{path}: unknown extension {path.suffix!r}; expected .npz or .csv")
    if path.stat().st_size == 0:
        raise DatasetError(f"{path}: file is empty")
    if suffix == ".npz":
        x, raw, columns, lines = _read_npz(path)
    else:
        if label_column is None:
            raise DatasetError(
                f"{path}: a CSV needs label_column; columns: {_names(_csv_header(path))}"
            )
        x, raw, columns, lines = _read_csv(path, label_column)
    _check_features(path, x, columns, lines)
    y, labels = _encode_labels(path, raw)
    return _split(path, x, y, labels, test_size, seed, normalise)


# -- reading ------------------------------------------------------------------------------


def _oneline(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"


def _names(columns: list[str]) -> str:
    return ", ".join(repr(c) for c in columns)


Table = tuple[np.ndarray, np.ndarray, list[str], "list[int] | None"]
"""Features, raw labels, feature column names as shown in messages, CSV line numbers."""


def _read_npz(path: Path) -> Table:
    if not zipfile.is_zipfile(path):
        raise DatasetError(f"{path}: not an .npz archive (not a zip file)")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
    except Exception as exc:  # np.load raises many kinds (zip, pickle, format): report any
        raise DatasetError(f"{path}: cannot read as .npz ({_oneline(exc)})") from exc
    for name in ("x", "y"):
        if name not in arrays:
            raise DatasetError(
                f"{path}: .npz has no array {name!r} (it has: {_names(sorted(arrays)) or 'none'});"
                " expected 'x' (samples, features) and 'y' (samples,)"
            )
    x, y = arrays["x"], arrays["y"]
    if x.ndim != 2:
        raise DatasetError(f"{path}: x must be 2-D (samples, features), got shape {x.shape}")
    if y.ndim != 1:
        raise DatasetError(f"{path}: y must be 1-D (samples,), got shape {y.shape}")
    if len(x) != len(y):
        raise DatasetError(f"{path}: x has {len(x)} rows but y has {len(y)}")
    if x.dtype.kind not in "biuf":
        raise DatasetError(f"{path}: x must be numeric, got dtype {x.dtype.str!r}")
    if y.dtype.kind == "f" and np.isnan(y).any():
        raise DatasetError(f"{path}: y has {int(np.isnan(y).sum())} NaN labels")
    if y.dtype.kind == "f" and np.isinf(y).any():
        raise DatasetError(f"{path}: y has {int(np.isinf(y).sum())} infinite labels")
    return x.astype(np.float64), y, [str(j) for j in range(x.shape[1])], None


def _csv_rows(path: Path) -> list[tuple[int, list[str]]]:
    """(line number, cells) for every non-blank row, header first."""
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            return [(reader.line_num, row) for row in reader if any(c.strip() for c in row)]
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{path}: not UTF-8 text ({_oneline(exc)})") from exc
    except csv.Error as exc:
        raise DatasetError(f"{path}: not a readable CSV ({_oneline(exc)})") from exc


def _csv_header(path: Path) -> list[str]:
    rows = _csv_rows(path)
    if not rows:
        raise DatasetError(f"{path}: file is empty")
    return [c.strip() for c in rows[0][1]]


def _read_csv(path: Path, label_column: str) -> Table:
    rows = _csv_rows(path)
    if not rows:
        raise DatasetError(f"{path}: file is empty")
    header = [c.strip() for c in rows[0][1]]
    dupes = sorted({c for c in header if header.count(c) > 1})
    if dupes:
        raise DatasetError(f"{path}: duplicate column names in the header: {_names(dupes)}")
    if label_column not in header:
        raise DatasetError(f"{path}: no column {label_column!r}; columns: {_names(header)}")
    data = rows[1:]
    if not data:
        raise DatasetError(f"{path}: has a header but no data rows")
    li = header.index(label_column)
    features = [j for j in range(len(header)) if j != li]
    if not features:
        raise DatasetError(f"{path}: no feature columns besides the label column {label_column!r}")
    x = np.empty((len(data), len(features)))
    labels: list[str] = []
    for r, (line, row) in enumerate(data):
        if len(row) != len(header):
            raise DatasetError(
                f"{path}: line {line} has {len(row)} fields but the header has {len(header)}"
            )
        label = row[li].strip()
        if not label:
            raise DatasetError(f"{path}: line {line} has an empty label in {label_column!r}")
        if _number(label) is None and _is_number(label):  # nan, inf: a missing value
            raise DatasetError(f"{path}: line {line} has label {label!r} in {label_column!r}")
        labels.append(label)
        for k, j in enumerate(features):
            try:
                x[r, k] = float(row[j])
            except ValueError:
                raise DatasetError(
                    f"{path}: column {header[j]!r} is not numeric: line {line} has {row[j]!r}"
                ) from None
    columns = [repr(header[j]) for j in features]
    return x, np.array(labels), columns, [line for line, _ in data]


# -- checking -----------------------------------------------------------------------------


def _check_features(path: Path, x: np.ndarray, columns: list[str], lines: list[int] | None) -> None:
    if x.shape[1] == 0:
        raise DatasetError(f"{path}: no feature columns (x has shape {x.shape})")
    bad = ~np.isfinite(x)
    if bad.any():
        rows = np.flatnonzero(bad.any(axis=1))
        cols = [columns[j] for j in np.flatnonzero(bad.any(axis=0))]
        more = f" and {len(cols) - 5} more" if len(cols) > 5 else ""
        first = f"x[{rows[0]}]" if lines is None else f"line {lines[rows[0]]}"
        raise DatasetError(
            f"{path}: features contain NaN or inf in {len(rows)} rows "
            f"(columns {', '.join(cols[:5])}{more}; first at {first})"
        )
    if len(x) < MIN_SAMPLES:
        raise DatasetError(f"{path}: only {len(x)} samples; need at least {MIN_SAMPLES}")


def _label_text(value: object) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _encode_labels(path: Path, raw: np.ndarray) -> tuple[np.ndarray, tuple[str, ...]]:
    """Labels -> (0..K-1, names), in sorted order of the distinct values."""
    values, y = np.unique(raw, return_inverse=True)
    names = [_label_text(v) for v in values.tolist()]
    if raw.dtype.kind in "US":  # text: sort numerically when every label is a number
        nums = [_number(n) for n in names]
        if all(v is not None for v in nums):
            order = sorted(range(len(names)), key=lambda i: (nums[i], names[i]))
            rank = np.empty(len(order), dtype=np.int64)
            rank[order] = np.arange(len(order))
            y, names = rank[y], [names[i] for i in order]
    if len(names) < 2:
        shown = f" ({names[0]!r})" if names else ""
        raise DatasetError(f"{path}: only one class{shown}; need at least 2")
    return y.astype(np.int32).reshape(-1), tuple(names)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def check_split(path: Path, split: Split, model: Path) -> None:
    """Does ``split`` (read from ``path``) fit ``model``? DatasetError naming ``path`` if not."""
    from fedge.models.checks import DataError, check_data, model_io
    from fedge.models.runtime import RuntimeError_
    from fedge.models.tflite_schema import ModelFileError

    try:
        fits = model_io(model)
    except (RuntimeError_, ModelFileError) as exc:
        raise DatasetError(f"{model}: {exc}") from exc
    if fits.task != "classify":
        raise DatasetError(
            f"{path}: the model {model.name} is a regression model; a data set for"
            " fedge sim has class labels"
        )
    try:
        for x, y in ((split.x_train, split.y_train), (split.x_test, split.y_test)):
            check_data(fits, x, y, name=str(path))
    except DataError as exc:
        raise DatasetError(str(exc)) from exc


# -- splitting ----------------------------------------------------------------------------


def _split(
    path: Path,
    x: np.ndarray,
    y: np.ndarray,
    labels: tuple[str, ...],
    test_size: float,
    seed: int,
    normalise: bool,
) -> Split:
    from sklearn.model_selection import train_test_split

    k = len(labels)
    n = len(y)
    n_test = math.ceil(test_size * n)
    per_class = np.bincount(y, minlength=k)
    smallest = int(per_class.min())
    stratify: np.ndarray | None = y
    if smallest < 2 or n_test < k or n - n_test < k:
        why = (
            f"class {labels[int(per_class.argmin())]!r} has only {smallest} sample"
            if smallest < 2
            else f"{n_test} test / {n - n_test} training samples for {k} classes"
        )
        warnings.warn(f"{path}: split is not stratified ({why})", UserWarning, stacklevel=3)
        stratify = None
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=test_size, stratify=stratify, random_state=seed
    )
    if normalise:
        mean = x_tr.mean(axis=0)
        std = x_tr.std(axis=0)
        std[std == 0] = 1.0
        x_tr, x_te = (x_tr - mean) / std, (x_te - mean) / std
    return Split(
        x_tr.astype(np.float32),
        y_tr.astype(np.int32),
        x_te.astype(np.float32),
        y_te.astype(np.int32),
        k,
        labels,
    )
