"""One place knows what a model takes: data sets are checked against it with one clear line."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from fedge.models.checks import DataError, ModelIO, check_data, model_io, read_npz
from fedge.models.tflite_schema import ModelFileError

pytestmark = pytest.mark.unit

ARTIFACTS = Path(__file__).resolve().parents[2] / "models" / "artifacts"
DIGITS = ModelIO(sample_shape=(64,), outputs=10, task="classify")
FORECAST = ModelIO(sample_shape=(80,), outputs=5, task="regress", target_shape=(5,))


@pytest.mark.parametrize(
    ("artifact", "want"),
    [
        ("digits_mlp.tflite", DIGITS),
        ("digits_mlp_50k.tflite", DIGITS),
        ("machine_forecaster.tflite", FORECAST),
    ],
)
def test_model_io_reads_the_signatures(artifact: str, want: ModelIO) -> None:
    got = model_io(ARTIFACTS / artifact)
    assert got == want
    assert model_io((ARTIFACTS / artifact).read_bytes()) == want


def test_model_io_refuses_what_is_not_a_model() -> None:
    with pytest.raises(ModelFileError, match="not a TFLite model"):
        model_io(b"not a model at all")


def digits(n: int = 40) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.random((n, 64)), rng.integers(0, 10, n)


def test_good_data_comes_back_in_the_runtimes_dtypes() -> None:
    x, y = digits()
    xf, yi = check_data(DIGITS, x, y.astype(np.float64), name="part.npz")
    assert xf.dtype == np.float32 and yi.dtype == np.int32 and yi.tolist() == y.tolist()
    xr, yr = check_data(FORECAST, np.ones((7, 80)), np.ones((7, 5), np.float64), name="f.npz")
    assert xr.dtype == np.float32 and yr.dtype == np.float32 and yr.shape == (7, 5)


def one_target() -> ModelIO:
    return ModelIO(sample_shape=(3,), outputs=1, task="regress", target_shape=(1,))


def test_one_target_per_sample_may_be_a_flat_y() -> None:
    _, y = check_data(one_target(), np.ones((4, 3)), np.arange(4.0), name="t.npz")
    assert y.shape == (4, 1)


def with_nan(x: np.ndarray, rows: list[int]) -> np.ndarray:
    x = x.astype(np.float64)
    x[rows, 5] = np.nan
    return x


@pytest.mark.parametrize(
    ("io", "x", "y", "line"),
    [
        (
            DIGITS,
            digits()[0][:, :5],
            digits()[1],
            "part.npz: 5 features per sample, the model takes 64",
        ),
        (
            DIGITS,
            with_nan(digits()[0], [3, 9, 20]),
            digits()[1],
            "part.npz: 3 of 40 samples have a non-finite feature (first at row 3)",
        ),
        (
            DIGITS,
            np.full((4, 64), 1e300),  # beyond float32: inf once the runtime sees it
            np.zeros(4),
            "part.npz: 4 of 4 samples have a non-finite feature (first at row 0)",
        ),
        (
            DIGITS,
            digits(10)[0],
            np.arange(7, 17),
            "part.npz: labels 7-16 but the model has 10 classes (0-9); 7 of 10 samples are out",
        ),
        (
            DIGITS,
            digits(4)[0],
            np.array([-1, 0, 1, 2]),
            "part.npz: labels -1 to 2 but the model has 10 classes (0-9); 1 of 4",
        ),
        (DIGITS, np.zeros((0, 64)), np.zeros(0), "part.npz: no samples"),
        (DIGITS, digits()[0], digits()[1][:39], "part.npz: x has 40 samples but y has 39"),
        (
            DIGITS,
            digits(4)[0],
            np.array([0, 1, 2.5, 3]),
            "part.npz: labels must be whole class numbers 0-9; row 2 has 2.5",
        ),
        (
            DIGITS,
            digits(4)[0],
            np.array([0, np.inf, 2, np.nan]),
            "part.npz: 2 of 4 labels are not finite (first at row 1)",
        ),
        (
            DIGITS,
            digits(4)[0],
            np.array(list("abcd")),
            "part.npz: labels must be class numbers 0-9",
        ),
        (DIGITS, digits(4)[0], np.zeros((4, 10)), "a classifier takes one class label per sample"),
        (DIGITS, np.full((4, 64), "a"), np.zeros(4), "part.npz: x must be numeric"),
        (DIGITS, np.zeros((4, 8, 8)), np.zeros(4), "samples of shape (8, 8), the model takes 64"),
        (
            FORECAST,
            np.ones((4, 80)),
            np.ones((4, 3)),
            "part.npz: 3 target(s) per sample, the model predicts 5",
        ),
        (
            FORECAST,
            np.ones((4, 80)),
            np.array([[0.0] * 5, [np.inf] * 5, [0.0] * 5, [0.0] * 5]),
            "part.npz: 1 of 4 samples have a non-finite target (first at row 1)",
        ),
    ],
    ids=[
        "features",
        "nan-features",
        "beyond-float32",
        "labels-7-16",
        "negative-label",
        "empty",
        "row-counts",
        "fractional-label",
        "non-finite-label",
        "text-labels",
        "one-hot-labels",
        "text-features",
        "image-shaped",
        "target-width",
        "inf-target",
    ],
)
def test_each_misfit_is_one_line_naming_the_file(
    io: ModelIO, x: np.ndarray, y: np.ndarray, line: str
) -> None:
    with pytest.raises(DataError) as info:
        check_data(io, x, y, name="part.npz")
    msg = str(info.value)
    assert line in msg and "\n" not in msg and msg.startswith("part.npz: ")


def test_read_npz_says_what_is_wrong_with_the_file(tmp_path: Path) -> None:
    good = tmp_path / "good.npz"
    np.savez(good, x=np.ones((3, 2)), y=np.arange(3))
    x, y = read_npz(good)
    assert x.shape == (3, 2) and y.tolist() == [0, 1, 2]
    np.savez(tmp_path / "noy.npz", x=np.ones((3, 2)), labels=np.arange(3))
    (tmp_path / "text.npz").write_text("x,y\n1,2\n")
    damaged = bytearray(good.read_bytes())
    damaged[200:260] = bytes(60)
    (tmp_path / "crc.npz").write_bytes(bytes(damaged))
    for name, why in [
        ("noy.npz", "needs arrays 'x' and 'y' (it has: 'labels', 'x')"),
        ("text.npz", "not an .npz archive (not a zip file)"),
        ("crc.npz", "not a readable .npz"),
        ("missing.npz", "no such file"),
    ]:
        with pytest.raises(DataError) as info:
            read_npz(tmp_path / name)
        assert str(info.value).startswith(f"{tmp_path / name}: {why}")
