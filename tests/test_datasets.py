"""Offline datasets: digits, and the IDX loader on files written here (and the real ones)."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from fedge.common.datasets import (
    DEFAULT_FASHION_MNIST_DIR,
    DatasetError,
    DatasetMissing,
    load_digits,
    load_idx,
    load_idx_raw,
    parse_idx,
)


def idx_bytes(arr: np.ndarray, type_code: int = 0x08) -> bytes:
    header = struct.pack(">BBBB", 0, 0, type_code, arr.ndim)
    header += struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + arr.tobytes()


def write_split(
    folder: Path,
    prefix: str,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    gz: bool = False,
    dotted: bool = False,
) -> tuple[Path, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    sep = "." if dotted else "-"
    paths = []
    for kind, arr, d in (("images", images, 3), ("labels", labels, 1)):
        path = folder / f"{prefix}-{kind}{sep}idx{d}-ubyte{'.gz' if gz else ''}"
        data = idx_bytes(arr)
        path.write_bytes(gzip.compress(data) if gz else data)
        paths.append(path)
    return paths[0], paths[1]


def small_set(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), rng.integers(0, 10, n, dtype=np.uint8)


def test_digits_shape_range_and_labels() -> None:
    x, y = load_digits()
    assert x.shape == (1797, 1, 8, 8) and x.dtype == np.float32
    assert y.shape == (1797,) and y.dtype == np.int64
    assert x.min() == 0.0 and x.max() == 1.0
    assert set(np.unique(y)) == set(range(10))
    assert load_digits()[0] is x and not x.flags.writeable


@pytest.mark.parametrize("gz", [False, True])
def test_idx_plain_and_gz_decode_exactly(tmp_path: Path, gz: bool) -> None:
    images, labels = small_set(7)
    write_split(tmp_path, "train", images, labels, gz=gz)
    x, y = load_idx(tmp_path, "train")
    assert x.shape == (7, 1, 28, 28) and x.dtype == np.float32
    assert y.dtype == np.int64 and np.array_equal(y, labels)
    np.testing.assert_allclose(x[:, 0] * 255.0, images, atol=1e-4)
    assert x.min() >= 0.0 and x.max() <= 1.0


def test_idx_test_split_and_dotted_names(tmp_path: Path) -> None:
    images, labels = small_set(3, seed=1)
    write_split(tmp_path, "t10k", images, labels, dotted=True)
    raw_x, raw_y = load_idx_raw(tmp_path, "test")
    assert np.array_equal(raw_x, images) and np.array_equal(raw_y, labels)


def test_decoded_arrays_are_cached_and_read_only(tmp_path: Path) -> None:
    write_split(tmp_path, "train", *small_set(4), gz=True)
    a = load_idx_raw(tmp_path, "train")
    b = load_idx_raw(tmp_path, "train")
    assert a[0] is b[0] and not a[0].flags.writeable
    # a float copy per call, safe to modify
    x, _ = load_idx(tmp_path, "train")
    x[:] = 0.0
    assert load_idx(tmp_path, "train")[0].max() > 0


def test_truncated_plain_file_is_a_dataset_error(tmp_path: Path) -> None:
    images_path, _ = write_split(tmp_path, "train", *small_set(5))
    images_path.write_bytes(images_path.read_bytes()[:-100])
    with pytest.raises(DatasetError, match="truncated"):
        load_idx(tmp_path, "train")


def test_truncated_gz_file_is_a_dataset_error(tmp_path: Path) -> None:
    images_path, _ = write_split(tmp_path, "train", *small_set(5), gz=True)
    images_path.write_bytes(images_path.read_bytes()[:-40])
    with pytest.raises(DatasetError, match="gzip"):
        load_idx(tmp_path, "train")


def test_wrong_magic_and_header_errors(tmp_path: Path) -> None:
    images_path, _ = write_split(tmp_path, "train", *small_set(5))
    images_path.write_bytes(b"\x1f\x8b" + images_path.read_bytes()[2:])
    with pytest.raises(DatasetError, match="magic"):
        load_idx(tmp_path, "train")
    with pytest.raises(DatasetError, match="too short"):
        parse_idx(b"\x00\x00")
    with pytest.raises(DatasetError, match="unknown IDX data type"):
        parse_idx(b"\x00\x00\x42\x01" + b"\x00" * 8)
    with pytest.raises(DatasetError, match="truncated IDX header"):
        parse_idx(b"\x00\x00\x08\x03\x00\x00\x00\x01")


def test_trailing_bytes_and_count_mismatch_are_rejected(tmp_path: Path) -> None:
    images, labels = small_set(5)
    images_path, labels_path = write_split(tmp_path, "train", images, labels)
    labels_path.write_bytes(idx_bytes(labels) + b"\x00")
    with pytest.raises(DatasetError, match="trailing"):
        load_idx(tmp_path, "train")
    labels_path.write_bytes(idx_bytes(labels[:4]))
    with pytest.raises(DatasetError, match=r"5 images but .* 4 labels"):
        load_idx(tmp_path, "train")
    # images stored as 2-d are not an image file
    images_path.write_bytes(idx_bytes(images.reshape(5, -1)))
    labels_path.write_bytes(idx_bytes(labels))
    with pytest.raises(DatasetError, match="expected uint8 images"):
        load_idx(tmp_path, "train")


def test_parse_idx_reads_big_endian_types() -> None:
    arr = np.arange(6, dtype=">i4").reshape(2, 3)
    out = parse_idx(idx_bytes(arr, type_code=0x0C))
    assert out.dtype == np.int32 and out.dtype.isnative
    assert np.array_equal(out, np.arange(6).reshape(2, 3))


def test_missing_folder_says_how_to_get_the_files(tmp_path: Path) -> None:
    where = tmp_path / "nowhere"
    with pytest.raises(DatasetMissing) as info:
        load_idx(where, "train")
    msg = str(info.value)
    assert str(where) in msg
    assert "apt-get install dataset-fashion-mnist" in msg
    assert "--data-dir" in msg and "train-images-idx3-ubyte[.gz]" in msg
    assert isinstance(info.value, FileNotFoundError)


def test_missing_labels_file_is_named(tmp_path: Path) -> None:
    _, labels_path = write_split(tmp_path, "train", *small_set(2))
    labels_path.unlink()
    with pytest.raises(DatasetMissing, match=r"missing train-labels-idx1-ubyte\[\.gz\]"):
        load_idx(tmp_path, "train")
    with pytest.raises(ValueError, match="split"):
        load_idx(tmp_path, "validation")  # type: ignore[arg-type]


@pytest.mark.skipif(
    not (DEFAULT_FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").exists()
    and not (DEFAULT_FASHION_MNIST_DIR / "train-images-idx3-ubyte").exists(),
    reason="Debian's dataset-fashion-mnist is not installed here",
)
def test_real_fashion_mnist() -> None:
    x, y = load_idx(split="train")
    xt, yt = load_idx(split="test")
    assert x.shape == (60000, 1, 28, 28) and xt.shape == (10000, 1, 28, 28)
    assert np.array_equal(np.bincount(y), np.full(10, 6000))
    assert np.array_equal(np.bincount(yt), np.full(10, 1000))
    assert x.min() >= 0.0 and x.max() <= 1.0
    assert 0.2 < float(x.mean()) < 0.4  # Fashion-MNIST's mean pixel is about 0.286
