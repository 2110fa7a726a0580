"""User data sets: round trips through .csv and .npz, and one clear line for each bad input."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from fedge.fleet.datasets import (
    TEST_SIZE,
    DatasetError,
    Split,
    digits,
    load_user_dataset,
)

pytestmark = pytest.mark.unit


def _csv(path: Path, header: str, rows: list[str]) -> Path:
    path.write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    return path


def _animals(path: Path, n: int = 60) -> Path:
    """A CSV with string labels: three well separated clusters."""
    rng = np.random.default_rng(1)
    names = ["emu", "cat", "dog"]  # not in sorted order on purpose
    rows = []
    for i in range(n):
        k = i % 3
        a, b = rng.normal(10 * k, 1.0), rng.normal(-5 * k, 2.0)
        rows.append(f"{a:.4f},{names[k]},{b:.4f}")
    return _csv(path, "height,species,weight", rows)


def _error(path: Path, **kwargs: object) -> str:
    with pytest.raises(DatasetError) as info:
        load_user_dataset(path, **kwargs)  # type: ignore[arg-type]
    msg = str(info.value)
    assert "\n" not in msg and str(path) in msg, msg
    assert isinstance(info.value, ValueError)
    return msg


# -- round trips --------------------------------------------------------------------------


def test_csv_with_string_labels_round_trips(tmp_path: Path) -> None:
    split = load_user_dataset(_animals(tmp_path / "animals.csv"), label_column="species")
    assert split.labels == ("cat", "dog", "emu") and split.classes == 3
    assert split.x_train.shape == (48, 2) and split.x_test.shape == (12, 2)
    assert split.x_train.dtype == np.float32 and split.y_train.dtype == np.int32
    # stratified: every class in both parts, in the same proportion
    assert np.bincount(split.y_train).tolist() == [16, 16, 16]
    assert np.bincount(split.y_test).tolist() == [4, 4, 4]
    # labels follow their rows: by height the clusters are emu (0), cat (10), dog (20)
    heights = [split.x_train[split.y_train == k, 0].mean() for k in range(3)]
    assert [split.labels[k] for k in np.argsort(heights)] == ["emu", "cat", "dog"]


def test_npz_round_trips_without_normalising(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 4))
    y = np.array([3, 7]).repeat(25)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    split = load_user_dataset(tmp_path / "d.npz", normalise=False, test_size=0.3, seed=5)
    assert split.labels == ("3", "7") and split.classes == 2
    assert len(split.y_train) == 35 and len(split.y_test) == 15
    both = np.concatenate([split.x_train, split.x_test])
    labels = np.concatenate([split.y_train, split.y_test])
    # the same rows with the same labels, nothing rescaled
    x32 = x.astype(np.float32)
    got, want = np.lexsort(both.T), np.lexsort(x32.T)
    assert np.array_equal(both[got], x32[want])
    assert np.array_equal(labels[got], (y == 7).astype(np.int32)[want])
    again = load_user_dataset(tmp_path / "d.npz", normalise=False, test_size=0.3, seed=5)
    assert np.array_equal(again.y_test, split.y_test)  # the seed fixes the split


def test_numeric_text_labels_sort_by_value(tmp_path: Path) -> None:
    rows = [f"{i},{[2, 10, 9][i % 3]}" for i in range(30)]
    split = load_user_dataset(_csv(tmp_path / "n.csv", "f,label", rows), label_column="label")
    assert split.labels == ("2", "9", "10")


def test_normalisation_uses_training_statistics_only(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    x = np.column_stack([rng.normal(50, 10, 80), np.full(80, 7.0)])  # the second is constant
    y = np.arange(80) % 2
    np.savez(tmp_path / "d.npz", x=x, y=y)
    raw = load_user_dataset(tmp_path / "d.npz", normalise=False, seed=2)
    z = load_user_dataset(tmp_path / "d.npz", seed=2)
    mean, std = raw.x_train.mean(axis=0), raw.x_train.std(axis=0)
    std[std == 0] = 1.0
    assert np.allclose(z.x_train, (raw.x_train - mean) / std, atol=1e-5)
    assert np.allclose(z.x_test, (raw.x_test - mean) / std, atol=1e-5)  # train stats, not test
    assert np.allclose(z.x_train.mean(axis=0), 0, atol=1e-5)
    assert np.allclose(z.x_train[:, 0].std(), 1, atol=1e-5)
    assert not np.allclose(z.x_test[:, 0].mean(), 0, atol=1e-3)  # the test part is not re-centred
    assert np.all(z.x_train[:, 1] == 0) and np.all(z.x_test[:, 1] == 0)  # std 0 -> 1


def test_a_class_with_one_sample_falls_back_to_an_unstratified_split(tmp_path: Path) -> None:
    rows = [f"{i},{'a' if i % 2 else 'b'}" for i in range(20)] + ["99,lonely"]
    path = _csv(tmp_path / "c.csv", "f,y", rows)
    with pytest.warns(UserWarning, match="not stratified.*'lonely' has only 1 sample"):
        split = load_user_dataset(path, label_column="y")
    assert split.classes == 3 and len(split.y_train) + len(split.y_test) == 21


def test_stratified_split_does_not_warn(tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_user_dataset(_animals(tmp_path / "a.csv"), label_column="species")


def test_digits_keeps_its_scaling_and_gains_labels() -> None:
    split = digits(0)
    assert split.labels == tuple(str(k) for k in range(10))
    assert len(split.y_test) == TEST_SIZE and split.x_train.min() == 0 and split.x_train.max() == 1
    bare = Split(split.x_train, split.y_train, split.x_test, split.y_test, 10)
    assert bare.labels == split.labels


# -- every bad input: one line naming the file and the problem ------------------------------


def test_missing_file(tmp_path: Path) -> None:
    assert "no such file" in _error(tmp_path / "nope.csv", label_column="y")


def test_unknown_extension(tmp_path: Path) -> None:
    (tmp_path / "d.txt").write_text("a,b\n")
    msg = _error(tmp_path / "d.txt")
    assert "unknown extension '.txt'" in msg and ".npz or .csv" in msg


def test_empty_file(tmp_path: Path) -> None:
    (tmp_path / "e.csv").write_text("")
    assert "file is empty" in _error(tmp_path / "e.csv", label_column="y")
    (tmp_path / "blank.csv").write_text("\n\n")
    assert "file is empty" in _error(tmp_path / "blank.csv", label_column="y")
    (tmp_path / "e.npz").write_bytes(b"")
    assert "file is empty" in _error(tmp_path / "e.npz")


def test_header_without_rows(tmp_path: Path) -> None:
    msg = _error(_csv(tmp_path / "h.csv", "a,y", []), label_column="y")
    assert "header but no data rows" in msg


def test_csv_needs_a_label_column(tmp_path: Path) -> None:
    path = _animals(tmp_path / "a.csv")
    msg = _error(path)
    assert "needs label_column" in msg and "'height', 'species', 'weight'" in msg


def test_missing_label_column_lists_the_columns(tmp_path: Path) -> None:
    msg = _error(_animals(tmp_path / "a.csv"), label_column="kind")
    assert "no column 'kind'" in msg and "columns: 'height', 'species', 'weight'" in msg


def test_non_numeric_feature_names_column_and_row(tmp_path: Path) -> None:
    rows = [f"{i},{i % 2},1.5" for i in range(12)]
    rows[4] = "4,0,red"
    msg = _error(_csv(tmp_path / "n.csv", "a,y,colour", rows), label_column="y")
    assert "column 'colour' is not numeric" in msg and "line 6 has 'red'" in msg


def test_ragged_row(tmp_path: Path) -> None:
    rows = [f"{i},{i % 2}" for i in range(12)]
    rows[2] = "2,1,3"
    msg = _error(_csv(tmp_path / "r.csv", "a,y", rows), label_column="y")
    assert "line 4 has 3 fields but the header has 2" in msg


def test_nan_and_inf_say_how_many_rows_and_which_columns(tmp_path: Path) -> None:
    rows = [f"{i},{i % 2},{i * 2}" for i in range(12)]
    rows[3] = "nan,1,6"
    rows[7] = "7,1,inf"
    msg = _error(_csv(tmp_path / "f.csv", "a,y,b", rows), label_column="y")
    assert "NaN or inf in 2 rows" in msg and "columns 'a', 'b'" in msg and "line 5" in msg
    x = np.ones((20, 3))
    x[[2, 4, 6], 1] = np.nan
    np.savez(tmp_path / "f.npz", x=x, y=np.arange(20) % 2)
    msg = _error(tmp_path / "f.npz")
    assert "NaN or inf in 3 rows" in msg and "columns 1;" in msg and "x[2]" in msg


def test_npz_without_x_or_y(tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", features=np.ones((20, 2)), y=np.arange(20) % 2)
    msg = _error(tmp_path / "d.npz")
    assert "no array 'x'" in msg and "'features', 'y'" in msg
    np.savez(tmp_path / "e.npz", x=np.ones((20, 2)))
    assert "no array 'y'" in _error(tmp_path / "e.npz")


def test_not_an_npz(tmp_path: Path) -> None:
    (tmp_path / "d.npz").write_text("x,y\n1,2\n")
    assert "not an .npz archive" in _error(tmp_path / "d.npz")


@pytest.mark.parametrize(
    ("x", "y", "why"),
    [
        (np.ones(20), np.arange(20) % 2, "x must be 2-D (samples, features), got shape (20,)"),
        (np.ones((20, 2)), np.ones((20, 1)), "y must be 1-D (samples,), got shape (20, 1)"),
        (np.ones((20, 2)), np.arange(19) % 2, "x has 20 rows but y has 19"),
        (np.full((20, 2), "a"), np.arange(20) % 2, "x must be numeric"),
        (np.ones((20, 0)), np.arange(20) % 2, "no feature columns"),
        (np.ones((20, 2)), np.where(np.arange(20) % 2, 1.0, np.nan), "y has 10 NaN labels"),
    ],
)
def test_npz_shapes_and_types(tmp_path: Path, x: np.ndarray, y: np.ndarray, why: str) -> None:
    np.savez(tmp_path / "d.npz", x=x, y=y)
    assert why in _error(tmp_path / "d.npz")


def test_fewer_than_two_classes(tmp_path: Path) -> None:
    rows = [f"{i},same" for i in range(12)]
    msg = _error(_csv(tmp_path / "o.csv", "a,y", rows), label_column="y")
    assert "only one class ('same'); need at least 2" in msg


def test_too_few_samples(tmp_path: Path) -> None:
    rows = [f"{i},{i % 2}" for i in range(7)]
    msg = _error(_csv(tmp_path / "s.csv", "a,y", rows), label_column="y")
    assert "only 7 samples; need at least 10" in msg


def test_empty_label_and_label_only_csv(tmp_path: Path) -> None:
    rows = [f"{i},{i % 2}" for i in range(12)]
    rows[0] = "0, "
    assert "line 2 has an empty label" in _error(
        _csv(tmp_path / "l.csv", "a,y", rows), label_column="y"
    )
    rows = [str(i % 2) for i in range(12)]
    assert "no feature columns" in _error(_csv(tmp_path / "y.csv", "y", rows), label_column="y")


def test_bad_test_size(tmp_path: Path) -> None:
    assert "test_size must be between 0 and 1" in _error(
        _animals(tmp_path / "a.csv"), label_column="species", test_size=1.0
    )


def test_values_from_the_file_cannot_break_the_line(tmp_path: Path) -> None:
    rows = [f"{i},{i % 2}" for i in range(12)]
    rows[1] = '"1\nmore",0'
    msg = _error(_csv(tmp_path / "q.csv", "a,y", rows), label_column="y")
    assert "column 'a' is not numeric" in msg and "'1\\nmore'" in msg
